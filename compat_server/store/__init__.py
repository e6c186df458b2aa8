"""The store behind an interface: what the rooms need, whatever keeps it.

:class:`Store` is the contract (a ``typing.Protocol``); the rooms (routing, lifecycle,
outbox, reconciler, rents, webhooks) are written against it and its records
(:mod:`compat_server.store.records`). :class:`SqliteStore` (``sqlite.py``) is the one
implementation today; a second one (PostgreSQL, say) implements the same methods and is
chosen where the app opens the store, without touching the rooms.

Several servers may share one store (PostgreSQL): then every method speaks for all of
them. What that asks of an implementation is said method by method; in short, ids are
unique across servers, ``get`` reads fresh, ``lock`` serialises across servers,
``lease`` has one taker per interval in total, ``due_ops``/``due_webhooks`` claim what
they hand out, ``attempts`` leaves a live server's in-flight purchases to it, and
``reserve`` holds a key's money so that two servers cannot both spend its last. An
embedded store (SQLite: one server per file) keeps the same semantics in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Protocol

from compat_server.store.records import (
    CANCELLED,
    CLAIM_SECONDS,
    CODE,
    CONFIRMED,
    DEAD_AFTER,
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
    Reservation,
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
    "CANCELLED", "CLAIM_SECONDS", "CODE", "CONFIRMED", "DEAD_AFTER", "EXPIRED", "FINISHED",
    "FIRST_ID", "FIRST_RENT_ID", "MAX_ID", "MIGRATIONS", "NO_EXTRA", "OPEN_STATES",
    "PENDING", "RECONCILED", "REFUSED",
    "RENT_ACTIVE", "RENT_CANCELLED", "RENT_EXPIRED", "RENT_FINISHED", "SCHEMA_VERSION",
    "UNCERTAIN", "WAIT_CODE", "WAIT_RETRY", "Activation", "Attempt", "Message",
    "NewActivation", "OutboxOp", "Rent", "RentAttempt", "RentMessage", "RentPayment",
    "Reservation", "SqliteStore", "Store", "StoreError", "WebhookJob", "WebhookRows", "first_id",
]  # fmt: skip


class Store(Protocol):
    """Durable state of the server: every method the rooms call, and nothing else."""

    path: str  # where it lives, for messages (credentials masked)
    problem: str | None  # why writes fail now (None: they work)
    server_id: str  # this process's identity among the servers sharing the store

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
        """Every ``interval`` s until cancelled: :meth:`heartbeat`, check the store,
        retry held numbers."""
        ...

    async def heartbeat(self, now: float) -> None:
        """Record that this server (``server_id``) is alive at ``now``.

        Called by :meth:`watch` every WATCH_INTERVAL. Other servers treat one whose
        heartbeat is older than DEAD_AFTER as dead: its pending purchase attempts go
        to their reconcilers, its budget holds stop counting. One server: a no-op.
        """
        ...

    async def schema_version(self) -> int:
        """The schema version recorded in the database."""
        ...

    def lock(self, activation_id: int) -> contextlib.AbstractAsyncContextManager[None]:
        """The lock that serialises state changes of one activation.

        Callers re-check the activation's state after entering, and never hold it
        across more than one bounded upstream call. A shared store serialises across
        servers and, on entry, refreshes in place the Activation objects it handed
        out for that id (so the re-check sees another server's change).
        """
        ...

    async def lease(self, name: str, seconds: float, now: float) -> bool:
        """Take the named lease for ``seconds`` unless another taker holds it.

        True when taken. It coalesces upstream work (a poll of one activation, a batch
        poll of one account) so it runs once per interval in total: in one process for
        an embedded store, across every server sharing a database for a shared one.
        """
        ...

    async def end_lease(self, name: str) -> None:
        """Give the named lease up before it runs out (the work it covered is done,
        or must be done again at once); anyone may take it next."""
        ...

    async def reserve(
        self,
        key_id: str,
        amount: Decimal | None,
        *,
        budget: Decimal | None,
        max_open: int | None,
        at_most: Decimal | None = None,
        now: float,
    ) -> Reservation:
        """Hold money (display currency) for one paid call of a key, atomically.

        Refused (``Reservation.id`` 0, nothing held) with ``max_active`` when the key
        has ``max_open`` numbers open or being bought (stored open activations plus
        live holds), with ``budget`` when ``budget`` minus the key's :meth:`spent`
        minus its live holds leaves no room for ``amount`` (None: everything left, at
        most ``at_most``). Without a budget the hold is 0 (it still counts toward
        ``max_open``). The check and the hold are one step for every server sharing
        the store: two servers cannot both take the last of a key's budget. A hold
        lives until :meth:`unreserve`, or until its server is dead (DEAD_AFTER).
        """
        ...

    async def unreserve(self, reservation_id: int) -> None:
        """Give a hold back (its purchase is stored, refused, or failed)."""
        ...

    async def reserved(self, key_id: str) -> tuple[int, Decimal]:
        """(how many, how much) the key's live holds set aside now."""
        ...

    async def buying(self, provider: str, now: float) -> bool:
        """Whether another live server has a purchase attempt on ``provider`` pending.

        Such a buy could have an upstream order not stored yet: a reconciler must
        not take an order for an orphan while it runs (this process's own buys it
        knows from ``Router.in_flight``). One server: always False.
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
        """Purchase attempts in the given states, oldest first.

        A PENDING attempt begun by another server is left out while that server is
        alive (its buy may still be running there); once its heartbeat is older than
        DEAD_AFTER it is returned, for this server's reconciler.
        """
        ...

    async def known_upstream_ids(self, provider: str) -> set[str]:
        """Every upstream id (current or replaced) stored for a provider, rents too"""
        ...

    async def get(self, activation_id: int) -> Activation | None:
        """An activation by id (from memory when open; a shared store reads it fresh,
        another server may have changed it)."""
        ...

    def open_activations(self) -> list[Activation]:
        """Every activation whose upstream order is alive (a shared store's list may
        lag WATCH_INTERVAL behind what other servers sold or closed)."""
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

    async def due_ops(
        self, now: float, limit: int = 50, activation_id: int | None = None
    ) -> list[OutboxOp]:
        """Claim queued calls whose time has come (only one activation's, if given).

        What is returned is claimed: nobody (another server, another caller here)
        gets it again until :meth:`op_done` or :meth:`op_failed`, or until the claim
        runs out CLAIM_SECONDS after ``now``. So claim only what will be delivered.
        """
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
        """Claim pending deliveries whose time has come, as :meth:`due_ops` claims:
        nobody gets them again until :meth:`webhook_done`/:meth:`webhook_failed` or
        CLAIM_SECONDS after ``now``."""
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
