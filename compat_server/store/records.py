"""What the store keeps, as the rooms see it: states, records, the store's error.

Every implementation of :class:`compat_server.store.Store` speaks these types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from providers.vocabulary import ActivationRef, Order, Purchase, RentRef

# Activation states. The first three are "open": an upstream order is alive.
WAIT_CODE, CODE, WAIT_RETRY = "wait_code", "code", "wait_retry"
FINISHED, CANCELLED, EXPIRED = "finished", "cancelled", "expired"
OPEN_STATES = frozenset({WAIT_CODE, CODE, WAIT_RETRY})

# Purchase attempt states.
PENDING, CONFIRMED, REFUSED, UNCERTAIN, RECONCILED = (
    "pending",
    "confirmed",
    "refused",
    "uncertain",
    "reconciled",
)

# Rent states: active while the number is held; then finished, cancelled or expired.
RENT_ACTIVE, RENT_FINISHED, RENT_CANCELLED, RENT_EXPIRED = (
    "active",
    "finished",
    "cancelled",
    "expired",
)


# Several servers on one shared store (see Store): a server whose heartbeat is older
# than DEAD_AFTER is dead, and its PENDING purchase attempts and its budget holds are
# no longer its own; due_ops and due_webhooks claim what they return for CLAIM_SECONDS.
DEAD_AFTER = 30.0
CLAIM_SECONDS = 120.0


class StoreError(Exception):
    """The store cannot be used (or written) now; the message names the store and why."""


class NoExtra(dict[str, str]):
    """The empty ``extra`` of activations without provider state, one shared object.

    Read-only: an activation's ``extra`` is replaced (``set_state`` with a re-rented
    order), never changed in place, so one empty mapping can serve them all.
    """

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an activation's extra is replaced, never changed in place")

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = __ior__ = _refuse


NO_EXTRA = NoExtra()


@dataclass(slots=True)
class Message:
    """One stored SMS."""

    uid: str
    text: str
    code: str
    received_at: float


@dataclass(slots=True, weakref_slot=True)  # the PostgreSQL store keeps weak references
class Activation:
    """One number sold to a client, as stored.

    Slotted (no per-object ``__dict__``): a server keeps every open one in memory, and
    100,000 of them must fit in a small process (bench/run.py figure j).
    """

    id: int
    key_id: str
    provider: str
    upstream_id: str
    phone: str
    service: str
    country: int
    operator: str
    price: Decimal  # native currency of the provider
    currency: str  # that native currency
    cost: Decimal  # what the client is shown, display currency
    state: str
    created_at: float
    updated_at: float
    expires_at: float
    extra: dict[str, str] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    retry_mark: int = 0  # messages present when the client last asked for another
    previous_ids: tuple[
        str, ...
    ] = ()  # upstream ids this activation replaced, oldest first

    @property
    def is_open(self) -> bool:
        """An upstream order is alive for it."""
        return self.state in OPEN_STATES

    @property
    def code(self) -> str:
        """The newest code, or "" before any SMS."""
        return self.messages[-1].code if self.messages else ""

    def ref(self) -> ActivationRef:
        """What the provider needs to act on it."""
        return ActivationRef(
            upstream_id=self.upstream_id,
            phone=self.phone,
            service=self.service,
            country=self.country,
            created_at=self.created_at,
            extra=dict(self.extra),
            previous_ids=self.previous_ids,
        )


@dataclass
class Rent:
    """One number rented to a client, as stored."""

    id: int
    key_id: str
    provider: str
    upstream_id: str
    phone: str
    service: str
    country: int
    currency: str
    state: str
    created_at: float
    updated_at: float
    until: float
    extra: dict[str, str] = field(default_factory=dict)
    messages: list[RentMessage] = field(default_factory=list)

    def ref(self) -> RentRef:
        """What the provider needs to act on it."""
        return RentRef(
            upstream_id=self.upstream_id,
            phone=self.phone,
            service=self.service,
            country=self.country,
            created_at=self.created_at,
            until=self.until,
            extra=dict(self.extra),
        )


@dataclass
class RentMessage:
    """One SMS stored for a rent."""

    uid: str
    sender: str
    text: str
    code: str
    received_at: float


@dataclass(frozen=True)
class RentAttempt:
    """A rent attempt: the record written before a paid rent call."""

    id: int
    key_id: str
    provider: str
    order: dict[str, Any]  # service, country, hours, operators
    state: str
    created_at: float


@dataclass(frozen=True)
class RentPayment:
    """A confirmed paid rent call (the rent itself or a prolongation)."""

    kind: str  # rent | prolong
    hours: int
    cost: Decimal  # display currency
    created_at: float


# new messages -> (key id, source, payload) rows for the webhooks table
WebhookRows = Callable[[Sequence[Any]], Iterable[tuple[str, str, dict[str, Any]]]]


@dataclass(frozen=True)
class WebhookJob:
    """One queued webhook delivery."""

    id: int
    key_id: str
    payload: dict[str, Any]
    attempts: int
    created_at: float


@dataclass(frozen=True)
class Attempt:
    """A purchase attempt: the record written before a paid call."""

    id: int
    key_id: str
    provider: str
    order: Order
    state: str
    created_at: float


@dataclass(frozen=True)
class OutboxOp:
    """A pending upstream call that must eventually succeed."""

    id: int
    activation_id: int
    op: str  # cancel | finish | ready
    attempts: int


@dataclass(frozen=True)
class Reservation:
    """What :meth:`Store.reserve` set aside for one paid call of a key, or why not.

    ``id`` 0 means refused (``refused`` names why: ``max_active`` or ``budget``) and
    nothing is held. ``left`` is the key's budget left before this hold (never below
    0; None without a budget).
    """

    id: int
    amount: Decimal
    left: Decimal | None = None
    refused: str = ""


@dataclass(frozen=True)
class NewActivation:
    """A number just bought (or found upstream), to be stored as an activation."""

    key_id: str
    provider: str
    currency: str  # the provider's native currency (that of ``purchase.price``)
    order: Order
    purchase: Purchase
    cost: Decimal  # what the client is shown, display currency
    now: float
    lifetime: float  # seconds until it expires
    state: str = WAIT_CODE
