"""The rental vocabulary: numbers held for hours or days, receiving any sender's SMS.

A provider that can rent mixes in :class:`Rental` next to :class:`providers.base.Provider`.
Like ``buy``, ``rent`` and ``prolong`` are paid: never call them twice for one order.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal


@dataclass(frozen=True)
class RentOffer:
    """A service rentable in one country for a number of hours: native price, stock."""

    service: str  # sms-activate code; "full" = every sender
    price: Decimal
    count: int


@dataclass(frozen=True)
class RentOrder:
    """What getRentNumber asked for."""

    service: str
    country: int
    hours: int
    operators: tuple[str, ...] = ()


@dataclass(frozen=True)
class RentPurchase:
    """A number rented upstream until ``until`` (UNIX seconds)."""

    upstream_id: str
    phone: str
    price: Decimal
    until: float
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RentSms:
    """One SMS on a rented number; ``uid`` is stable across polls."""

    uid: str
    text: str
    code: str
    received_at: float
    sender: str = ""


@dataclass(frozen=True)
class RentPoll:
    """Every SMS the number holds, and whether the rent is over upstream."""

    messages: tuple[RentSms, ...] = ()
    closed: bool = False


@dataclass(frozen=True)
class RentRef:
    """What a provider needs to act on a stored rent."""

    upstream_id: str
    phone: str
    service: str
    country: int
    created_at: float
    until: float
    extra: Mapping[str, str] = field(default_factory=dict)


class Rental(abc.ABC):
    """Rent operations; every method raises ProviderError subclasses only."""

    @abc.abstractmethod
    def rent_countries(self) -> list[int]:
        """sms-activate country ids where numbers can be rented."""

    @abc.abstractmethod
    async def rent_offers(self, country: int, hours: int) -> list[RentOffer]:
        """Rentable services in a country for ``hours``, native prices; [] if none."""

    @abc.abstractmethod
    async def rent(self, order: RentOrder) -> RentPurchase:
        """Rent one number. Paid: NoNumbers/NoBalance/UnknownService = nothing bought."""

    @abc.abstractmethod
    async def rent_poll(self, ref: RentRef) -> RentPoll:
        """Every SMS the rented number received; closed once the rent is over."""

    @abc.abstractmethod
    async def rent_release(self, ref: RentRef) -> None:
        """Give the number back early (setRentStatus 1 or 2); idempotent."""

    @abc.abstractmethod
    async def prolong_price(self, ref: RentRef, hours: int) -> Decimal:
        """What prolonging the rent by ``hours`` costs, native currency."""

    @abc.abstractmethod
    async def prolong(self, ref: RentRef, hours: int) -> float:
        """Prolong by ``hours`` (paid); returns the new ``until``."""

    async def rent_lookup(
        self, country: int, service: str, since: float
    ) -> list[RentPurchase] | None:
        """Rents held upstream for this service and country since ``since``, for
        reconciliation; None when the upstream cannot list them."""
        return None
