"""The rental vocabulary: numbers held for hours or days, receiving any sender's SMS.

A provider that can rent mixes in :class:`Rental` next to :class:`providers.base.Provider`.
Like ``buy``, ``rent`` and ``prolong`` are paid: never call them twice for one order.
"""

from __future__ import annotations

import abc
from decimal import Decimal

from providers.vocabulary import RentOffer, RentOrder, RentPoll, RentPurchase, RentRef


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
