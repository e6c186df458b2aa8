"""The one store: activations, their messages, purchase attempts and the outbox.

SQLite through aiosqlite, WAL with ``synchronous=FULL``: a write is durable when the
method returns, so a purchase is on disk before ``ACCESS_NUMBER`` leaves the server.
Activations are also kept in memory (write-through): reads for getStatus never touch
the disk. The schema carries a version in ``meta``; :data:`MIGRATIONS` upgrades it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiosqlite

from providers.base import ActivationRef, Order, Purchase, Sms
from providers.rental import RentPurchase, RentRef, RentSms

SCHEMA_VERSION = 3
FIRST_ID = 100_000  # ids look like real ones and stay far below 2**31
MAX_ID = 2**31 - 1
FIRST_RENT_ID = 5_000  # rent ids are their own space (a table of their own)

# Rent states: active while the number is held; then finished, cancelled or expired.
RENT_ACTIVE, RENT_FINISHED, RENT_CANCELLED, RENT_EXPIRED = (
    "active",
    "finished",
    "cancelled",
    "expired",
)

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

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE activations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_id TEXT NOT NULL,
        phone TEXT NOT NULL,
        service TEXT NOT NULL,
        country INTEGER NOT NULL,
        operator TEXT NOT NULL,
        price TEXT NOT NULL,
        currency TEXT NOT NULL,
        cost TEXT NOT NULL,
        state TEXT NOT NULL,
        extra TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX activations_state ON activations(state);
    CREATE INDEX activations_upstream ON activations(provider, upstream_id);
    CREATE INDEX activations_key ON activations(key_id, state);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        activation_id INTEGER NOT NULL REFERENCES activations(id),
        uid TEXT NOT NULL,
        text TEXT NOT NULL,
        code TEXT NOT NULL,
        received_at REAL NOT NULL,
        UNIQUE (activation_id, uid)
    );
    CREATE TABLE purchases (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        service TEXT NOT NULL,
        country INTEGER NOT NULL,
        order_json TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        activation_id INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX purchases_state ON purchases(state);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        activation_id INTEGER NOT NULL REFERENCES activations(id),
        op TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        done INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE INDEX outbox_due ON outbox(done, next_at);
    """,
    2: """
    CREATE TABLE health (
        provider TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        failures INTEGER NOT NULL,
        changed_at REAL NOT NULL
    );
    """,
    3: """
    CREATE TABLE rents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_id TEXT NOT NULL,
        phone TEXT NOT NULL,
        service TEXT NOT NULL,
        country INTEGER NOT NULL,
        currency TEXT NOT NULL,
        state TEXT NOT NULL,
        extra TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        until REAL NOT NULL
    );
    CREATE INDEX rents_key ON rents(key_id, state);
    CREATE TABLE rent_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rent_id INTEGER NOT NULL REFERENCES rents(id),
        uid TEXT NOT NULL,
        sender TEXT NOT NULL,
        text TEXT NOT NULL,
        code TEXT NOT NULL,
        received_at REAL NOT NULL,
        UNIQUE (rent_id, uid)
    );
    CREATE TABLE rent_attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        kind TEXT NOT NULL,
        rent_id INTEGER,
        order_json TEXT NOT NULL,
        hours INTEGER NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        price TEXT NOT NULL DEFAULT '',
        cost TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX rent_attempts_rent ON rent_attempts(rent_id, state);
    CREATE TABLE webhooks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id TEXT NOT NULL,
        source TEXT NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        last_error TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        UNIQUE (source)
    );
    CREATE INDEX webhooks_due ON webhooks(state, next_at);
    """,
}


@dataclass
class Message:
    """One stored SMS."""

    uid: str
    text: str
    code: str
    received_at: float


@dataclass
class Activation:
    """One number sold to a client, as stored."""

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


class Store:
    """Durable state of the server. Use :meth:`open` and :meth:`close`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._cache: dict[int, Activation] = {}
        self._write = asyncio.Lock()
        self._locks: dict[int, asyncio.Lock] = {}
        self._spent: dict[str, Decimal] = {}  # key_id -> spend, once read (see spent)

    @classmethod
    async def open(cls, path: str) -> Store:
        """Open (creating or migrating) the database at ``path``."""
        db = await aiosqlite.connect(path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = aiosqlite.Row
            store = cls(db)
            await store._migrate()
            await store._load_open()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()

    async def _migrate(self) -> None:
        await self._db.execute(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        async with self._db.execute(
            "SELECT value FROM meta WHERE name='version'"
        ) as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"database schema {version} is newer than this program")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await self._db.executescript(MIGRATIONS[target])
            if target == 1:
                await self._db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('activations', ?)",
                    (FIRST_ID - 1,),
                )
            if target == 3:
                await self._db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('rents', ?)",
                    (FIRST_RENT_ID - 1,),
                )
            await self._db.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('version', ?)",
                (str(target),),
            )
        await self._db.commit()

    async def schema_version(self) -> int:
        """The schema version recorded in the database."""
        async with self._db.execute(
            "SELECT value FROM meta WHERE name='version'"
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _load_open(self) -> None:
        placeholders = ",".join("?" * len(OPEN_STATES))
        query = f"SELECT * FROM activations WHERE state IN ({placeholders})"
        for activation in await self._fetch(query, tuple(OPEN_STATES)):
            self._cache[activation.id] = activation

    async def _fetch(self, query: str, args: Iterable[Any]) -> list[Activation]:
        async with self._db.execute(query, tuple(args)) as cur:
            rows = list(await cur.fetchall())
        result = []
        for row in rows:
            activation = Activation(
                id=row["id"],
                key_id=row["key_id"],
                provider=row["provider"],
                upstream_id=row["upstream_id"],
                phone=row["phone"],
                service=row["service"],
                country=row["country"],
                operator=row["operator"],
                price=Decimal(row["price"]),
                currency=row["currency"],
                cost=Decimal(row["cost"]),
                state=row["state"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                expires_at=row["expires_at"],
                extra=json.loads(row["extra"]),
            )
            activation.retry_mark = int(activation.extra.pop("_retry_mark", "0"))
            async with self._db.execute(
                "SELECT uid, text, code, received_at FROM messages"
                " WHERE activation_id=? ORDER BY id",
                (activation.id,),
            ) as cur:
                activation.messages = [Message(*m) for m in await cur.fetchall()]
            result.append(activation)
        return result

    def lock(self, activation_id: int) -> asyncio.Lock:
        """The lock that serialises state changes of one activation."""
        lock = self._locks.get(activation_id)
        if lock is None:
            lock = self._locks[activation_id] = asyncio.Lock()
        return lock

    # ---- purchases ----------------------------------------------------------------------

    async def begin_purchase(
        self, key_id: str, provider: str, order: Order, now: float
    ) -> int:
        """Record that a paid call is about to be made; durable on return."""
        order_json = json.dumps(
            {
                "service": order.service,
                "country": order.country,
                "operators": list(order.operators),
                "exclude_prefixes": list(order.exclude_prefixes),
                "max_price": None if order.max_price is None else str(order.max_price),
            }
        )
        async with self._write:
            cur = await self._db.execute(
                "INSERT INTO purchases (key_id, provider, service, country, order_json,"
                " state, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    key_id,
                    provider,
                    order.service,
                    order.country,
                    order_json,
                    PENDING,
                    now,
                    now,
                ),
            )
            await self._db.commit()
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def end_purchase(
        self, attempt_id: int, state: str, detail: str, now: float
    ) -> None:
        """Close an attempt that bought nothing (refused) or may have (uncertain)."""
        async with self._write:
            await self._db.execute(
                "UPDATE purchases SET state=?, detail=?, updated_at=? WHERE id=?",
                (state, detail, now, attempt_id),
            )
            await self._db.commit()

    async def complete_purchase(
        self,
        attempt_id: int | None,
        key_id: str,
        provider: str,
        currency: str,
        order: Order,
        purchase: Purchase,
        cost: Decimal,
        now: float,
        lifetime: float,
        state: str = WAIT_CODE,
    ) -> Activation:
        """Store the bought number as an activation (and confirm its attempt) atomically."""
        extra = dict(purchase.extra)
        async with self._write:
            cur = await self._db.execute(
                "INSERT INTO activations (key_id, provider, upstream_id, phone, service,"
                " country, operator, price, currency, cost, state, extra, created_at,"
                " updated_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    key_id,
                    provider,
                    purchase.upstream_id,
                    purchase.phone,
                    order.service,
                    order.country,
                    purchase.operator,
                    str(purchase.price),
                    currency,
                    str(cost),
                    state,
                    json.dumps(extra),
                    now,
                    now,
                    now + lifetime,
                ),
            )
            activation_id = cur.lastrowid
            assert activation_id is not None and activation_id < MAX_ID
            if attempt_id is not None:
                await self._db.execute(
                    "UPDATE purchases SET state=?, activation_id=?, updated_at=? WHERE id=?",
                    (
                        CONFIRMED if state == WAIT_CODE else RECONCILED,
                        activation_id,
                        now,
                        attempt_id,
                    ),
                )
            await self._db.commit()
        activation = Activation(
            id=activation_id,
            key_id=key_id,
            provider=provider,
            upstream_id=purchase.upstream_id,
            phone=purchase.phone,
            service=order.service,
            country=order.country,
            operator=purchase.operator,
            price=purchase.price,
            currency=currency,
            cost=cost,
            state=state,
            created_at=now,
            updated_at=now,
            expires_at=now + lifetime,
            extra=extra,
        )
        if activation.is_open:
            self._cache[activation.id] = activation
        if state not in (CANCELLED, EXPIRED):
            self._count_spend(key_id, cost)
        return activation

    async def attempts(self, states: Iterable[str]) -> list[Attempt]:
        """Purchase attempts in the given states, oldest first."""
        states = tuple(states)
        placeholders = ",".join("?" * len(states))
        async with self._db.execute(
            "SELECT id, key_id, provider, order_json, state, created_at FROM purchases"
            f" WHERE state IN ({placeholders}) ORDER BY id",
            states,
        ) as cur:
            rows = list(await cur.fetchall())
        result = []
        for row in rows:
            data = json.loads(row[3])
            order = Order(
                service=data["service"],
                country=data["country"],
                operators=tuple(data["operators"]),
                exclude_prefixes=tuple(data["exclude_prefixes"]),
                max_price=None
                if data["max_price"] is None
                else Decimal(data["max_price"]),
            )
            result.append(Attempt(row[0], row[1], row[2], order, row[4], row[5]))
        return result

    async def known_upstream_ids(self, provider: str) -> set[str]:
        """Every upstream id (current or replaced) stored for a provider, rents too
        (smspva's rent.php sells both: a reconciler must never take a rent)."""
        async with self._db.execute(
            "SELECT upstream_id, extra FROM activations WHERE provider=?", (provider,)
        ) as cur:
            rows = list(await cur.fetchall())
        known = set()
        for upstream_id, extra in rows:
            known.add(upstream_id)
            known.update(
                i for i in json.loads(extra).get("previous_ids", "").split(",") if i
            )
        async with self._db.execute(
            "SELECT upstream_id FROM rents WHERE provider=?", (provider,)
        ) as cur:
            known.update(row[0] for row in await cur.fetchall())
        return known

    # ---- activations --------------------------------------------------------------------

    async def get(self, activation_id: int) -> Activation | None:
        """An activation by id (from memory when open)."""
        cached = self._cache.get(activation_id)
        if cached is not None:
            return cached
        found = await self._fetch(
            "SELECT * FROM activations WHERE id=?", (activation_id,)
        )
        return found[0] if found else None

    def open_activations(self) -> list[Activation]:
        """Every activation whose upstream order is alive."""
        return list(self._cache.values())

    async def for_key(self, key_id: str, open_only: bool = True) -> list[Activation]:
        """A key's activations, oldest first."""
        if open_only:
            return sorted(
                (a for a in self._cache.values() if a.key_id == key_id),
                key=lambda a: a.id,
            )
        return await self._fetch(
            "SELECT * FROM activations WHERE key_id=? ORDER BY id", (key_id,)
        )

    async def count(self) -> int:
        """How many activations are stored."""
        async with self._db.execute("SELECT COUNT(*) FROM activations") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def add_messages(
        self,
        activation: Activation,
        messages: Iterable[Sms],
        webhooks: WebhookRows | None = None,
    ) -> bool:
        """Append messages not seen before; a new one moves the state to CODE.

        ``webhooks`` turns the new messages into queued deliveries, written in the
        same transaction (an SMS is never stored without its webhook).
        """
        seen = {m.uid for m in activation.messages}
        new = [m for m in messages if m.uid not in seen]
        if not new:
            return False
        state = CODE if activation.is_open else activation.state
        async with self._write:
            await self._db.executemany(
                "INSERT OR IGNORE INTO messages (activation_id, uid, text, code, received_at)"
                " VALUES (?,?,?,?,?)",
                [(activation.id, m.uid, m.text, m.code, m.received_at) for m in new],
            )
            await self._db.execute(
                "UPDATE activations SET state=?, updated_at=? WHERE id=?",
                (state, new[-1].received_at, activation.id),
            )
            if webhooks is not None:
                await self._queue_webhooks(webhooks(new), new[-1].received_at)
            await self._db.commit()
        activation.messages.extend(
            Message(m.uid, m.text, m.code, m.received_at) for m in new
        )
        activation.state = state
        return True

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
        if retry:
            activation.retry_mark = len(activation.messages)
        if purchase is not None:
            previous = activation.extra.get("previous_ids", "")
            activation.extra = dict(purchase.extra)
            activation.extra["previous_ids"] = ",".join(
                i for i in (previous, activation.upstream_id) if i
            )
            activation.upstream_id = purchase.upstream_id
        extra = dict(activation.extra, _retry_mark=str(activation.retry_mark))
        async with self._write:
            await self._db.execute(
                "UPDATE activations SET state=?, upstream_id=?, extra=?, updated_at=?"
                " WHERE id=?",
                (state, activation.upstream_id, json.dumps(extra), now, activation.id),
            )
            if outbox is not None:
                await self._db.execute(
                    "INSERT INTO outbox (activation_id, op, next_at, created_at)"
                    " VALUES (?,?,?,?)",
                    (activation.id, outbox, now, now),
                )
            await self._db.commit()
        unspent = (CANCELLED, EXPIRED)
        if (activation.state in unspent) != (state in unspent):
            sign = 1 if state not in unspent else -1
            self._count_spend(activation.key_id, sign * activation.cost)
        activation.state = state
        activation.updated_at = now
        if not activation.is_open:
            self._cache.pop(activation.id, None)
            self._locks.pop(activation.id, None)

    async def prune(self, before: float) -> int:
        """Forget attempts that bought nothing, and delivered calls, older than ``before``."""
        async with self._write:
            cur = await self._db.execute(
                "DELETE FROM purchases WHERE state=? AND updated_at<?",
                (REFUSED, before),
            )
            removed = cur.rowcount
            cur = await self._db.execute(
                "DELETE FROM outbox WHERE done=1 AND created_at<?", (before,)
            )
            removed += cur.rowcount
            await self._db.commit()
        return removed

    # ---- provider health ----------------------------------------------------------------

    async def save_health(
        self, provider: str, state: str, failures: int, now: float
    ) -> None:
        """Record a circuit-breaker state change (read by ``check-config --ping``)."""
        async with self._write:
            await self._db.execute(
                "INSERT OR REPLACE INTO health (provider, state, failures, changed_at)"
                " VALUES (?,?,?,?)",
                (provider, state, failures, now),
            )
            await self._db.commit()

    # ---- outbox -------------------------------------------------------------------------

    async def enqueue(self, activation_id: int, op: str, now: float) -> None:
        """Queue an upstream call to be retried until it succeeds."""
        async with self._write:
            await self._db.execute(
                "INSERT INTO outbox (activation_id, op, next_at, created_at) VALUES (?,?,?,?)",
                (activation_id, op, now, now),
            )
            await self._db.commit()

    async def due_ops(self, now: float, limit: int = 50) -> list[OutboxOp]:
        """Queued calls whose time has come."""
        async with self._db.execute(
            "SELECT id, activation_id, op, attempts FROM outbox"
            " WHERE done=0 AND next_at<=? ORDER BY next_at LIMIT ?",
            (now, limit),
        ) as cur:
            return [OutboxOp(*row) for row in await cur.fetchall()]

    async def pending_ops(self) -> list[tuple[int, str, int, str]]:
        """(activation id, op, attempts, last error) of every queued call not yet done."""
        async with self._db.execute(
            "SELECT activation_id, op, attempts, last_error FROM outbox WHERE done=0"
            " ORDER BY id"
        ) as cur:
            return [tuple(row) for row in await cur.fetchall()]

    async def op_done(self, op_id: int) -> None:
        """Mark a queued call as delivered."""
        async with self._write:
            await self._db.execute("UPDATE outbox SET done=1 WHERE id=?", (op_id,))
            await self._db.commit()

    async def op_failed(self, op_id: int, next_at: float, error: str) -> None:
        """Reschedule a queued call after a failure."""
        async with self._write:
            await self._db.execute(
                "UPDATE outbox SET attempts=attempts+1, next_at=?, last_error=? WHERE id=?",
                (next_at, error[:200], op_id),
            )
            await self._db.commit()

    # ---- money and figures for the operator ---------------------------------------------

    async def spent(self, key_id: str) -> Decimal:
        """Sum of ``cost`` of the key's activations not cancelled or expired.

        Costs are stored in whole cents (Prices.display), so the sum is taken in
        integer cents inside SQLite (exact); it is read once per key, then kept in
        memory and updated by every write that changes it.
        """
        cached = self._spent.get(key_id)
        if cached is not None:
            return cached
        # under the write lock: no write can land between this read and the cache
        # (writes update the cache right after releasing the lock, with no await)
        async with self._write:
            cached = self._spent.get(key_id)
            if cached is not None:
                return cached
            async with self._db.execute(
                "SELECT SUM(CAST(ROUND(CAST(cost AS REAL) * 100) AS INTEGER))"
                " FROM activations WHERE key_id=? AND state NOT IN (?,?)",
                (key_id, CANCELLED, EXPIRED),
            ) as cur:
                row = await cur.fetchone()
            cents = row[0] if row is not None and row[0] is not None else 0
            total = (Decimal(cents) / 100).quantize(Decimal("0.01"))
            self._spent[key_id] = total
        return total

    def _count_spend(self, key_id: str, amount: Decimal) -> None:
        """Keep a loaded spend total in step with a write (no-op until first read)."""
        if key_id in self._spent:
            self._spent[key_id] += amount

    async def figures(self) -> dict[str, list[tuple[Any, ...]]]:
        """Aggregates for /metrics and the dashboard (one read, no secrets)."""
        queries = {
            "attempts": "SELECT state, detail, COUNT(*) FROM purchases"
            " GROUP BY state, detail",
            "outbox": "SELECT op, COUNT(*) FROM outbox WHERE done=0 GROUP BY op",
        }
        result: dict[str, list[tuple[Any, ...]]] = {}
        for name in ("attempts", "outbox"):
            async with self._db.execute(queries[name]) as cur:
                result[name] = [tuple(row) for row in await cur.fetchall()]
        return result

    async def recent(
        self, limit: int = 100, where: Mapping[str, str] | None = None
    ) -> list[Activation]:
        """The newest activations, optionally filtered by key_id, state, provider."""
        clauses, args = [], []
        for column in ("key_id", "state", "provider"):
            value = (where or {}).get(column)
            if value:
                clauses.append(f"{column}=?")
                args.append(value)
        query = "SELECT * FROM activations"
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY id DESC LIMIT ?"
        found = await self._fetch(query, (*args, limit))
        # open ones come from memory: the same objects the engine changes
        return [self._cache.get(a.id, a) for a in found]

    async def writable(self) -> bool:
        """Whether a write transaction can be taken (for /readyz)."""
        try:
            async with self._write:
                await self._db.execute("BEGIN IMMEDIATE")
                await self._db.rollback()
        except Exception:
            return False
        return True

    # ---- rents --------------------------------------------------------------------------

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
        async with self._write:
            cur = await self._db.execute(
                "INSERT INTO rent_attempts (key_id, provider, kind, rent_id, order_json,"
                " hours, state, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (key_id, provider, kind, rent_id, json.dumps(order), hours, PENDING,
                 now, now),
            )  # fmt: skip
            await self._db.commit()
        assert cur.lastrowid is not None
        return cur.lastrowid

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
        async with self._write:
            await self._db.execute(
                "UPDATE rent_attempts SET state=?, detail=?, price=?, cost=?,"
                " updated_at=? WHERE id=?",
                (state, detail, "" if price is None else str(price),
                 "" if cost is None else str(cost), now, attempt_id),
            )  # fmt: skip
            await self._db.commit()

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
        extra = dict(purchase.extra)
        async with self._write:
            cur = await self._db.execute(
                "INSERT INTO rents (key_id, provider, upstream_id, phone, service,"
                " country, currency, state, extra, created_at, updated_at, until)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (key_id, provider, purchase.upstream_id, purchase.phone, service,
                 country, currency, RENT_ACTIVE, json.dumps(extra), now, now,
                 purchase.until),
            )  # fmt: skip
            rent_id = cur.lastrowid
            assert rent_id is not None and rent_id < MAX_ID
            await self._db.execute(
                "UPDATE rent_attempts SET state=?, rent_id=?, price=?, cost=?,"
                " updated_at=? WHERE id=?",
                (CONFIRMED, rent_id, str(purchase.price), str(cost), now, attempt_id),
            )
            await self._db.commit()
        return Rent(
            rent_id, key_id, provider, purchase.upstream_id, purchase.phone, service,
            country, currency, RENT_ACTIVE, now, now, purchase.until, extra,
        )  # fmt: skip

    async def _fetch_rents(self, query: str, args: Iterable[Any]) -> list[Rent]:
        async with self._db.execute(query, tuple(args)) as cur:
            rows = list(await cur.fetchall())
        result = []
        for row in rows:
            rent = Rent(
                id=row["id"],
                key_id=row["key_id"],
                provider=row["provider"],
                upstream_id=row["upstream_id"],
                phone=row["phone"],
                service=row["service"],
                country=row["country"],
                currency=row["currency"],
                state=row["state"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                until=row["until"],
                extra=json.loads(row["extra"]),
            )
            async with self._db.execute(
                "SELECT uid, sender, text, code, received_at FROM rent_messages"
                " WHERE rent_id=? ORDER BY received_at, id",
                (rent.id,),
            ) as cur:
                rent.messages = [RentMessage(*m) for m in await cur.fetchall()]
            result.append(rent)
        return result

    async def get_rent(self, rent_id: int) -> Rent | None:
        """A rent by id."""
        found = await self._fetch_rents("SELECT * FROM rents WHERE id=?", (rent_id,))
        return found[0] if found else None

    async def rents_for_key(self, key_id: str, active_only: bool = True) -> list[Rent]:
        """A key's rents, oldest first."""
        if active_only:
            return await self._fetch_rents(
                "SELECT * FROM rents WHERE key_id=? AND state=? ORDER BY id",
                (key_id, RENT_ACTIVE),
            )
        return await self._fetch_rents(
            "SELECT * FROM rents WHERE key_id=? ORDER BY id", (key_id,)
        )

    async def active_rents(self) -> list[Rent]:
        """Every rent whose number is still held."""
        return await self._fetch_rents(
            "SELECT * FROM rents WHERE state=? ORDER BY id", (RENT_ACTIVE,)
        )

    async def add_rent_messages(
        self,
        rent: Rent,
        messages: Iterable[RentSms],
        webhooks: WebhookRows | None = None,
    ) -> list[RentMessage]:
        """Append messages not seen before (with their webhooks); the new ones."""
        seen = {m.uid for m in rent.messages}
        new = [
            RentMessage(m.uid, m.sender, m.text, m.code, m.received_at)
            for m in messages
            if m.uid not in seen
        ]
        if not new:
            return []
        async with self._write:
            await self._db.executemany(
                "INSERT OR IGNORE INTO rent_messages (rent_id, uid, sender, text, code,"
                " received_at) VALUES (?,?,?,?,?,?)",
                [
                    (rent.id, m.uid, m.sender, m.text, m.code, m.received_at)
                    for m in new
                ],
            )
            if webhooks is not None:
                await self._queue_webhooks(webhooks(new), new[-1].received_at)
            await self._db.commit()
        rent.messages.extend(new)
        return new

    async def set_rent_state(
        self, rent: Rent, state: str, now: float, until: float | None = None
    ) -> None:
        """Change a rent's state (and its end, after a prolongation)."""
        if until is not None:
            rent.until = until
        async with self._write:
            await self._db.execute(
                "UPDATE rents SET state=?, until=?, updated_at=? WHERE id=?",
                (state, rent.until, now, rent.id),
            )
            await self._db.commit()
        rent.state = state
        rent.updated_at = now

    async def rent_payments(self, rent_id: int) -> list[RentPayment]:
        """The confirmed paid calls of a rent, oldest first."""
        async with self._db.execute(
            "SELECT kind, hours, cost, created_at FROM rent_attempts"
            " WHERE rent_id=? AND state=? ORDER BY id",
            (rent_id, CONFIRMED),
        ) as cur:
            rows = list(await cur.fetchall())
        return [RentPayment(r[0], r[1], Decimal(r[2] or "0"), r[3]) for r in rows]

    # ---- webhooks -----------------------------------------------------------------------

    async def _queue_webhooks(
        self, items: Iterable[tuple[str, str, dict[str, Any]]], now: float
    ) -> None:
        """Queue (key id, source, payload) deliveries inside the caller's transaction;
        a source already queued is skipped (one SMS, one webhook)."""
        rows = [
            (k, src, json.dumps(p, ensure_ascii=False), now, now) for k, src, p in items
        ]
        if rows:
            await self._db.executemany(
                "INSERT OR IGNORE INTO webhooks (key_id, source, payload, next_at,"
                " created_at) VALUES (?,?,?,?,?)",
                rows,
            )

    async def due_webhooks(self, now: float, limit: int = 50) -> list[WebhookJob]:
        """Pending deliveries whose time has come."""
        async with self._db.execute(
            "SELECT id, key_id, payload, attempts, created_at FROM webhooks"
            " WHERE state='pending' AND next_at<=? ORDER BY next_at LIMIT ?",
            (now, limit),
        ) as cur:
            rows = list(await cur.fetchall())
        return [WebhookJob(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    async def webhook_done(self, job_id: int, state: str, error: str = "") -> None:
        """Mark a delivery as delivered (or given up)."""
        async with self._write:
            await self._db.execute(
                "UPDATE webhooks SET state=?, attempts=attempts+1, last_error=?"
                " WHERE id=?",
                (state, error[:200], job_id),
            )
            await self._db.commit()

    async def webhook_failed(self, job_id: int, next_at: float, error: str) -> None:
        """Reschedule a delivery after a failed attempt."""
        async with self._write:
            await self._db.execute(
                "UPDATE webhooks SET attempts=attempts+1, next_at=?, last_error=?"
                " WHERE id=?",
                (next_at, error[:200], job_id),
            )
            await self._db.commit()

    async def webhook_states(self) -> list[tuple[str, int, str]]:
        """(source, attempts, state) of every delivery, oldest first."""
        async with self._db.execute(
            "SELECT source, attempts, state FROM webhooks ORDER BY id"
        ) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def rent_attempts(self, states: Iterable[str]) -> list[RentAttempt]:
        """Rent (not prolong) attempts in the given states, oldest first."""
        states = tuple(states)
        placeholders = ",".join("?" * len(states))
        async with self._db.execute(
            "SELECT id, key_id, provider, order_json, state, created_at FROM"
            f" rent_attempts WHERE kind='rent' AND state IN ({placeholders}) ORDER BY id",
            states,
        ) as cur:
            rows = list(await cur.fetchall())
        return [
            RentAttempt(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows
        ]
