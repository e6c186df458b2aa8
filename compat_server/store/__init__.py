"""The store behind an interface: what the rooms need, whatever keeps it.

:class:`Store` is the contract (a ``typing.Protocol``); the rooms (routing, lifecycle,
outbox, reconciler, rents, webhooks) are written against it and its records
(:mod:`compat_server.store.records`). :class:`SqliteStore` (``sqlite.py``) is the one
implementation today; a second one (PostgreSQL, say) implements the same methods and is
chosen where the app opens the store, without touching the rooms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Protocol

from compat_server.store.records import (
    CANCELLED,
    CODE,
    CONFIRMED,
    EXPIRED,
    FINISHED,
    NO_EXTRA,
    OPEN_STATES,
    PENDING,
    RECONCILED,
    REFUSED,
    RENT_ACTIVE,
    RENT_CANCELLED,
    RENT_EXPIRED,
    RENT_FINISHED,
    UNCERTAIN,
    WAIT_CODE,
    WAIT_RETRY,
    Activation,
    Attempt,
    Message,
    NewActivation,
    OutboxOp,
    Rent,
    RentAttempt,
    RentMessage,
    RentPayment,
    StoreError,
    WebhookJob,
    WebhookRows,
)
from compat_server.store.sqlite import (
    FIRST_ID,
    FIRST_RENT_ID,
    MAX_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    WATCH_INTERVAL,
    SqliteStore,
    first_id,
)
from providers.vocabulary import Order, Purchase, RentPurchase, RentSms, Sms

__all__ = [
    "CANCELLED", "CODE", "CONFIRMED", "EXPIRED", "FINISHED", "FIRST_ID", "FIRST_RENT_ID",
    "MAX_ID", "MIGRATIONS", "NO_EXTRA", "OPEN_STATES", "PENDING", "RECONCILED", "REFUSED",
    "RENT_ACTIVE", "RENT_CANCELLED", "RENT_EXPIRED", "RENT_FINISHED", "SCHEMA_VERSION",
    "UNCERTAIN", "WAIT_CODE", "WAIT_RETRY", "Activation", "Attempt", "Message",
    "NewActivation", "OutboxOp", "Rent", "RentAttempt", "RentMessage", "RentPayment",
    "SqliteStore", "Store", "StoreError", "WebhookJob", "WebhookRows", "first_id",
]  # fmt: skip


class Store(Protocol):
    """Durable state of the server: every method the rooms call, and nothing else."""

    path: str  # where it lives, for messages
    problem: str | None  # why writes fail now (None: they work)

    async def close(self) -> None:
        """Write held numbers if the store takes them, close the database, unlock it."""
        ...

    def check_file(self) -> bool:
        """Whether the path still names the file opened; logs once when that changes."""
        ...

    async def flush(self) -> int:
        """Try to write the numbers held in memory; how many remain held."""
        ...

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Check the file and retry held numbers every ``interval`` s, until cancelled."""
        ...

    async def schema_version(self) -> int:
        """The schema version recorded in the database."""
        ...

    def lock(self, activation_id: int) -> asyncio.Lock:
        """The lock that serialises state changes of one activation."""
        ...

    async def lease(self, name: str, seconds: float, now: float) -> bool:
        """Take the named lease for ``seconds`` unless another taker holds it.

        True when taken. It coalesces upstream work (a poll of one activation, a batch
        poll of one account) so it runs once per interval in total: in one process for
        an embedded store, across every server sharing a database for a shared one.
        """
        ...

    async def begin_purchase(
        self, key_id: str, provider: str, order: Order, now: float
    ) -> int:
        """Record that a paid call is about to be made; durable on return."""
        ...

    async def end_purchase(
        self, attempt_id: int, state: str, detail: str, now: float
    ) -> None:
        """Close an attempt that bought nothing (refused) or may have (uncertain)."""
        ...

    async def complete_purchase(
        self, attempt_id: int | None, bought: NewActivation, *, hold: bool = False
    ) -> Activation:
        """Store the bought number as an activation (and confirm its attempt) atomically."""
        ...

    async def attempts(self, states: Iterable[str]) -> list[Attempt]:
        """Purchase attempts in the given states, oldest first."""
        ...

    async def known_upstream_ids(self, provider: str) -> set[str]:
        """Every upstream id (current or replaced) stored for a provider, rents too"""
        ...

    async def get(self, activation_id: int) -> Activation | None:
        """An activation by id (from memory when open)."""
        ...

    def open_activations(self) -> list[Activation]:
        """Every activation whose upstream order is alive."""
        ...

    async def for_key(self, key_id: str, open_only: bool = True) -> list[Activation]:
        """A key's activations, oldest first."""
        ...

    async def count(self) -> int:
        """How many activations are stored."""
        ...

    async def add_messages(
        self,
        activation: Activation,
        messages: Iterable[Sms],
        webhooks: WebhookRows | None = None,
    ) -> bool:
        """Append messages not seen before; a new one moves the state to CODE."""
        ...

    async def set_state(
        self,
        activation: Activation,
        state: str,
        now: float,
        *,
        purchase: Purchase | None = None,
        retry: bool = False,
        outbox: str | None = None,
    ) -> None:
        """Change state (optionally swapping in a re-rented order, or queueing an op)."""
        ...

    async def prune(self, before: float) -> int:
        """Forget attempts that bought nothing, and delivered calls, older than ``before``."""
        ...

    async def save_health(
        self, provider: str, state: str, failures: int, now: float
    ) -> None:
        """Record a circuit-breaker state change (read by ``check-config --ping``)."""
        ...

    async def enqueue(self, activation_id: int, op: str, now: float) -> None:
        """Queue an upstream call to be retried until it succeeds."""
        ...

    async def due_ops(self, now: float, limit: int = 50) -> list[OutboxOp]:
        """Queued calls whose time has come."""
        ...

    async def pending_ops(self) -> list[tuple[int, str, int, str]]:
        """(activation id, op, attempts, last error) of every queued call not yet done."""
        ...

    async def op_done(self, op_id: int) -> None:
        """Mark a queued call as delivered."""
        ...

    async def op_failed(self, op_id: int, next_at: float, error: str) -> None:
        """Reschedule a queued call after a failure."""
        ...

    async def spent(self, key_id: str) -> Decimal:
        """Sum of ``cost`` of the key's activations not cancelled or expired."""
        ...

    async def figures(self) -> dict[str, list[tuple[Any, ...]]]:
        """Aggregates for /metrics and the dashboard (one read, no secrets)."""
        ...

    async def recent(
        self, limit: int = 100, where: Mapping[str, str] | None = None
    ) -> list[Activation]:
        """The newest activations, optionally filtered by key_id, state, provider."""
        ...

    async def writable(self) -> bool:
        """Whether a write transaction can be taken (for /readyz)."""
        ...

    async def begin_rent_attempt(
        self,
        key_id: str,
        provider: str,
        kind: str,
        order: dict[str, Any],
        hours: int,
        now: float,
        rent_id: int | None = None,
    ) -> int:
        """Record that a paid rent call (rent or prolong) is about to be made."""
        ...

    async def end_rent_attempt(
        self,
        attempt_id: int,
        state: str,
        detail: str,
        now: float,
        price: Decimal | None = None,
        cost: Decimal | None = None,
    ) -> None:
        """Close a rent attempt: refused, uncertain, or confirmed (with its price)."""
        ...

    async def complete_rent(
        self,
        attempt_id: int,
        key_id: str,
        provider: str,
        currency: str,
        service: str,
        country: int,
        purchase: RentPurchase,
        cost: Decimal,
        now: float,
    ) -> Rent:
        """Store a rented number (and confirm its attempt) atomically."""
        ...

    async def get_rent(self, rent_id: int) -> Rent | None:
        """A rent by id."""
        ...

    async def rents_for_key(self, key_id: str, active_only: bool = True) -> list[Rent]:
        """A key's rents, oldest first."""
        ...

    async def active_rents(self) -> list[Rent]:
        """Every rent whose number is still held."""
        ...

    async def add_rent_messages(
        self,
        rent: Rent,
        messages: Iterable[RentSms],
        webhooks: WebhookRows | None = None,
    ) -> list[RentMessage]:
        """Append messages not seen before (with their webhooks); the new ones."""
        ...

    async def set_rent_state(
        self, rent: Rent, state: str, now: float, until: float | None = None
    ) -> None:
        """Change a rent's state (and its end, after a prolongation)."""
        ...

    async def rent_payments(self, rent_id: int) -> list[RentPayment]:
        """The confirmed paid calls of a rent, oldest first."""
        ...

    async def due_webhooks(self, now: float, limit: int = 50) -> list[WebhookJob]:
        """Pending deliveries whose time has come."""
        ...

    async def webhook_done(self, job_id: int, state: str, error: str = "") -> None:
        """Mark a delivery as delivered (or given up)."""
        ...

    async def webhook_failed(self, job_id: int, next_at: float, error: str) -> None:
        """Reschedule a delivery after a failed attempt."""
        ...

    async def webhook_states(self) -> list[tuple[str, int, str]]:
        """(source, attempts, state) of every delivery, oldest first."""
        ...

    async def rent_attempts(self, states: Iterable[str]) -> list[RentAttempt]:
        """Rent (not prolong) attempts in the given states, oldest first."""
        ...

    async def add_cost(self, activation: Activation, amount: Decimal) -> None:
        """A further charge on an open activation (a paid re-rent on setStatus 3)."""
        ...

    def set_unrefunded(self, providers: frozenset[str]) -> None:
        """Name the providers whose cancels refund nothing; spend is read again."""
        ...
