"""The PostgreSQL store: several servers on one database behave as one server.

The implementation of :class:`compat_server.store.Store` through an asyncpg pool. What
SQLite does for one process, this does across every ``sms-compat serve`` sharing the
database:

* ids come from counter rows (``counters``), taken under the row's lock in the
  purchase's transaction, so they are unique across servers and a refused attempt can
  give its id back exactly as SQLite does (a SEQUENCE cannot be wound back safely);
* :meth:`PostgresStore.lock` is the in-process ``asyncio.Lock`` plus a session-level
  advisory lock held on one dedicated connection (never a pooled one: a body that
  writes must not wait for a connection its own lock holds); on entry it refreshes
  the activation objects this store handed out;
* :meth:`due_ops` and :meth:`due_webhooks` claim what they return (``FOR UPDATE SKIP
  LOCKED``, then ``next_at`` moves CLAIM_SECONDS ahead in the same transaction);
* ``servers`` holds each server's heartbeat, and each server holds an advisory lock
  of its own for as long as its session lives: a PENDING attempt of a server silent
  for DEAD_AFTER seconds, or whose session ended while the database stayed up (the
  process was killed), is returned by :meth:`attempts` for reconciliation;
* ``open_activations()`` is an in-memory set, updated at once by this server's writes
  and by :meth:`watch` from rows other servers changed (each write stamps
  ``activations.changed`` from a sequence);
* migrations run under ``pg_advisory_lock``, so servers starting together apply them
  once.

A write that fails for a reason of the database (down, restarting, full) is a
:class:`StoreError`; a number bought then is held in memory, as in SQLite, and written
when the database is back. The pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from decimal import Decimal
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg

from compat_server.store.records import (
    CANCELLED,
    CLAIM_SECONDS,
    CODE,
    CONFIRMED,
    DEAD_AFTER,
    EXPIRED,
    OPEN_STATES,
    PENDING,
    RECONCILED,
    REFUSED,
    RENT_ACTIVE,
    RENT_CANCELLED,
    WAIT_CODE,
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
    BUSY_TIMEOUT,
    FIRST_RENT_ID,
    MAX_ID,
    WATCH_INTERVAL,
    first_id,
)
from providers.settings import MASK
from providers.vocabulary import Clock, Order, Purchase, RentPurchase, RentSms, Sms

log = logging.getLogger("compat_server")

PG_SCHEMA_VERSION = 2
SKEW_MIN, SKEW_MAX = 2.0, 86_400.0  # s of clock skew against the database corrected
CLOSE_WAIT = 2.0  # s the pool waits for connections still out at close
COMMAND_TIMEOUT = 30.0  # s a statement may take before the store counts as failing
MIGRATION_LOCK = 0x534D5300  # pg_advisory_lock key around migrations ("SMS\0")
ACTIVATION_LOCKS = 0x534D5301  # advisory lock namespace of activation ids
SERVER_LOCKS = 0x534D5302  # ... of the servers' liveness locks
HOLD_LOCKS = 0x534D5303  # advisory (transaction) lock namespace of keys' budget holds
LOCK_POLL = (0.005, 0.05)  # s between tries of a lock another server holds: first, most
LEASE_KEEP = 3600.0  # s an expired lease row is kept before the heartbeat drops it
# refreshes the open set stays behind the newest stamp it read: at WATCH_INTERVAL,
# 15 s for a write between its stamp and its commit (busy_timeout is 5 s)
REFRESH_LAG = 3
LOCKER_RETRY = 1.0  # s a failed connect of the lock connection is not tried again

# a pooled connection, as the pool hands it out
Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

# Conditions of the database, not of the query: the store is failing, not the code.
DOWN: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    asyncio.TimeoutError,
    asyncpg.InterfaceError,  # the connection closed under the pool
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, restarting
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: disk full, connections
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization, deadlock
)


class CannotConnect(ConnectionError):
    """The database refused the login (it does not exist, or the role is gone)."""


UNUSABLE: tuple[type[BaseException], ...] = (*DOWN, asyncpg.PostgresError)

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    CREATE SEQUENCE changes;
    CREATE TABLE activations (
        id BIGINT PRIMARY KEY,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_id TEXT NOT NULL,
        phone TEXT NOT NULL,
        service TEXT NOT NULL,
        country INTEGER NOT NULL,
        operator TEXT NOT NULL,
        price NUMERIC NOT NULL,
        currency TEXT NOT NULL,
        cost NUMERIC NOT NULL,
        state TEXT NOT NULL,
        extra TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        retry_mark INTEGER NOT NULL DEFAULT 0,
        previous_ids TEXT NOT NULL DEFAULT '',
        changed BIGINT NOT NULL DEFAULT nextval('changes')
    );
    CREATE INDEX activations_state ON activations(state);
    CREATE INDEX activations_upstream ON activations(provider, upstream_id);
    CREATE INDEX activations_key ON activations(key_id, state);
    CREATE INDEX activations_changed ON activations(changed);
    CREATE TABLE messages (
        id BIGSERIAL PRIMARY KEY,
        activation_id BIGINT NOT NULL REFERENCES activations(id),
        uid TEXT NOT NULL,
        text TEXT NOT NULL,
        code TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        UNIQUE (activation_id, uid)
    );
    CREATE TABLE purchases (
        id BIGSERIAL PRIMARY KEY,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        service TEXT NOT NULL,
        country INTEGER NOT NULL,
        order_json TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        activation_id BIGINT,
        server_id TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX purchases_state ON purchases(state);
    CREATE TABLE outbox (
        id BIGSERIAL PRIMARY KEY,
        activation_id BIGINT NOT NULL REFERENCES activations(id),
        op TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at DOUBLE PRECISION NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        done INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX outbox_due ON outbox(done, next_at);
    CREATE TABLE health (
        provider TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        failures INTEGER NOT NULL,
        changed_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE rents (
        id BIGINT PRIMARY KEY,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_id TEXT NOT NULL,
        phone TEXT NOT NULL,
        service TEXT NOT NULL,
        country INTEGER NOT NULL,
        currency TEXT NOT NULL,
        state TEXT NOT NULL,
        extra TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        until DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX rents_key ON rents(key_id, state);
    CREATE TABLE rent_messages (
        id BIGSERIAL PRIMARY KEY,
        rent_id BIGINT NOT NULL REFERENCES rents(id),
        uid TEXT NOT NULL,
        sender TEXT NOT NULL,
        text TEXT NOT NULL,
        code TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        UNIQUE (rent_id, uid)
    );
    CREATE TABLE rent_attempts (
        id BIGSERIAL PRIMARY KEY,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        kind TEXT NOT NULL,
        rent_id BIGINT,
        order_json TEXT NOT NULL,
        hours INTEGER NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        price TEXT NOT NULL DEFAULT '',
        cost TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX rent_attempts_rent ON rent_attempts(rent_id, state);
    CREATE TABLE webhooks (
        id BIGSERIAL PRIMARY KEY,
        key_id TEXT NOT NULL,
        source TEXT NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        last_error TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        UNIQUE (source)
    );
    CREATE INDEX webhooks_due ON webhooks(state, next_at);
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        until DOUBLE PRECISION NOT NULL,
        holder TEXT NOT NULL
    );
    CREATE TABLE servers (
        id TEXT PRIMARY KEY,
        started_at DOUBLE PRECISION NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL,
        lock_key BIGINT NOT NULL,  -- its liveness lock: (SERVER_LOCKS, lock_key)
        pg_started TEXT NOT NULL  -- the database's start when it took that lock
    );
    """,
    # budget holds of purchases in flight, per server (Store.reserve)
    2: """
    CREATE TABLE holds (
        id BIGSERIAL PRIMARY KEY,
        key_id TEXT NOT NULL,
        amount NUMERIC NOT NULL,
        server_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX holds_key ON holds(key_id);
    """,
}

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the database is, from a ``postgresql://`` URL; ``shown`` has no secret."""

    host: str
    port: int
    user: str | None
    password: str | None = dataclasses.field(repr=False)
    database: str | None
    shown: str
    ssl: str | None = None  # ?sslmode=disable|prefer|require|verify-ca|verify-full

    @classmethod
    def parse(cls, url: str) -> Target:
        """StoreError (without the password) unless ``url`` is a postgresql:// URL."""
        shown = masked_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise StoreError(f"store {shown}: not a postgresql:// URL")
        try:
            port = parts.port or 5432
        except ValueError:
            raise StoreError(f"store {shown}: the port is not a number") from None
        query = dict(parse_qsl(parts.query))
        unknown = sorted(set(query) - set(URL_PARAMETERS))
        if unknown:
            raise StoreError(
                f"store {shown}: unknown URL parameter {unknown[0]}"
                f" (known: {', '.join(URL_PARAMETERS)})"
            )
        # ?host=/run/postgresql: a unix socket directory (the URL names no host)
        host = query.get("host") or unquote(parts.hostname or "") or "localhost"
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        database = unquote(parts.path.lstrip("/")) or None
        ssl = query.get("sslmode")
        return cls(host, port, user, password, database, shown, ssl)

    def connect_args(self) -> dict[str, Any]:
        """Keyword arguments of asyncpg.connect / create_pool."""
        args: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
        }
        if self.ssl is not None:
            args["ssl"] = self.ssl
        return args


URL_PARAMETERS = ("host", "sslmode")  # what a store URL's query may say


def masked_url(url: str) -> str:
    """``url`` without its credentials: ``postgresql://****@host:port/db``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    # the query as far as it is known (anything else could be a secret: dropped)
    query = "&".join(
        f"{k}={v}" for k, v in parse_qsl(parts.query) if k in URL_PARAMETERS
    )
    return parts._replace(netloc=netloc, query=query, fragment="").geturl()


def _order_json(order: Order) -> str:
    return json.dumps(
        {
            "service": order.service,
            "country": order.country,
            "operators": list(order.operators),
            "exclude_prefixes": list(order.exclude_prefixes),
            "max_price": None if order.max_price is None else str(order.max_price),
        }
    )


def _order_of(text: str) -> Order:
    data = json.loads(text)
    return Order(
        service=data["service"],
        country=data["country"],
        operators=tuple(data["operators"]),
        exclude_prefixes=tuple(data["exclude_prefixes"]),
        max_price=None if data["max_price"] is None else Decimal(data["max_price"]),
    )


def _activation(row: asyncpg.Record, messages: list[Message]) -> Activation:
    return Activation(
        id=row["id"],
        key_id=row["key_id"],
        provider=row["provider"],
        upstream_id=row["upstream_id"],
        phone=row["phone"],
        service=row["service"],
        country=row["country"],
        operator=row["operator"],
        price=row["price"],
        currency=row["currency"],
        cost=row["cost"],
        state=row["state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        extra=json.loads(row["extra"]),
        messages=messages,
        retry_mark=row["retry_mark"],
        previous_ids=tuple(i for i in row["previous_ids"].split(",") if i),
    )


def _dead(seen: str, locks: str, window: str) -> str:
    """SQL that is true when the LEFT JOINed ``servers`` row ``s`` is a dead server,
    as :meth:`PostgresStore.attempts` decides it; the arguments name the parameters
    holding now - DEAD_AFTER, SERVER_LOCKS and DEAD_AFTER."""
    return (
        "(s.id IS NULL"
        f" OR (s.pg_started = pg_postmaster_start_time()::text AND (s.seen_at < {seen}"
        "  OR NOT EXISTS (SELECT 1 FROM pg_locks l"
        "   WHERE l.locktype = 'advisory' AND l.granted"
        "   AND l.database = (SELECT oid FROM pg_database"
        "    WHERE datname = current_database())"
        f"   AND l.classid::bigint = {locks} AND l.objid::bigint = s.lock_key"
        "   AND l.objsubid = 2)))"
        " OR (s.pg_started <> pg_postmaster_start_time()::text"
        f"  AND now() - pg_postmaster_start_time() > make_interval(secs => {window})))"
    )


ACTIVATION_FIELDS = [f.name for f in dataclasses.fields(Activation) if f.name != "id"]


class PostgresStore:
    """Durable state shared by every server on one PostgreSQL database.

    Use :meth:`open` and :meth:`close`.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        target: Target,
        clock: Clock,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        self._pool = pool
        self._target = target
        self._clock = clock
        self._busy_timeout = busy_timeout
        self.path = target.shown
        self.server_id = secrets.token_hex(8)
        # the database's clock minus ours, measured at open: liveness, leases and
        # holds are written and compared in the database's time, so a server whose
        # clock runs ahead does not take a live server for dead (see _shared)
        self._skew = 0.0
        self._lock_key = secrets.randbelow(2**31 - 1) + 1  # its liveness lock
        self.problem: str | None = None
        self.unrefunded: frozenset[str] = frozenset()
        # every Activation handed out, one object per id, refreshed in place
        self._live: weakref.WeakValueDictionary[int, Activation] = (
            weakref.WeakValueDictionary()
        )
        self._versions: dict[int, int] = {}  # id -> ``changed`` of the live object
        self._cache: dict[int, Activation] = {}  # the open ones (strong references)
        # ``changed`` maxima of the last REFRESH_LAG refreshes (see _refresh_open)
        self._marks: collections.deque[int] = collections.deque([0], maxlen=REFRESH_LAG)
        self._locks: dict[int, asyncio.Lock] = {}
        self._locker: asyncpg.Connection | None = None  # holds the advisory locks
        self._locker_busy = asyncio.Lock()  # one statement at a time on it
        self._locker_retry_at = 0.0  # loop time before which it is not reconnected
        self._reserved: dict[int, int] = {}  # attempt id -> activation id set aside
        self._held: dict[int, tuple[Activation, int | None]] = {}
        self._figures: dict[str, list[tuple[Any, ...]]] = {"attempts": [], "outbox": []}

    @classmethod
    async def open(
        cls,
        url: str,
        clock: Clock = time.time,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> PostgresStore:
        """Connect, migrate (once, whoever else starts now) and load the open set.

        Raises StoreError (one line naming the database, never its password) when
        it cannot be reached, migrated or written.
        """
        target = Target.parse(url)
        lock_ms = str(max(1, int(busy_timeout * 1000)))
        try:
            pool = await asyncpg.create_pool(
                **target.connect_args(),
                min_size=pool_min,
                max_size=pool_max,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={
                    "application_name": "sms-compat",
                    "lock_timeout": lock_ms,
                },
                timeout=max(busy_timeout, 1.0),
            )
        except UNUSABLE as exc:
            raise StoreError(
                f"store {target.shown} cannot be used: {_why(exc)}"
            ) from exc
        assert pool is not None
        store = cls(pool, target, clock, busy_timeout)
        try:
            await store._measure_skew()
            await store._migrate(clock())
            await store.heartbeat(clock())
            await store._load_open()
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, UNUSABLE):
                raise StoreError(
                    f"store {target.shown} cannot be used: {_why(exc)}"
                ) from exc
            raise
        return store

    async def close(self) -> None:
        """Write held numbers if the database takes them, leave, close the pool."""
        if await self.flush():
            for activation, _ in self._held.values():
                log.error(
                    "store %s: id=%d provider=%s upstream=%s bought but never"
                    " stored (its attempt is in the database for the reconciler)",
                    self.path,
                    activation.id,
                    activation.provider,
                    activation.upstream_id,
                )
        # gone: its PENDING attempts are the other servers' to reconcile at once
        with contextlib.suppress(StoreError):
            async with self._writing() as conn:
                await conn.execute("DELETE FROM servers WHERE id=$1", self.server_id)
        if self._locker is not None:
            with contextlib.suppress(*DOWN):
                await self._locker.close(timeout=1.0)
            self._locker = None
        try:  # a connection still out (a request cut short by the stop) waits no longer
            await asyncio.wait_for(self._pool.close(), CLOSE_WAIT)
        except DOWN:  # (asyncio.TimeoutError among them)
            self._pool.terminate()

    # ---- health of the database ---------------------------------------------------------

    def check_file(self) -> bool:
        """No file to watch: the database answers for itself (see :meth:`writable`)."""
        return True

    async def _failing(self, exc: BaseException) -> StoreError:
        reason = str(exc) or type(exc).__name__
        if self.problem is None:
            log.error("store %s cannot be written: %s", self.path, reason)
        self.problem = self.problem or reason
        if not isinstance(exc, asyncio.TimeoutError):  # (busy, not broken: keep them)
            # a restarted server left every pooled connection dead: replace them all
            await self._pool.expire_connections()
        return StoreError(f"store {self.path}: {reason}")

    def _recovered(self) -> None:
        if self.problem is not None:
            log.warning("store %s is writable again", self.path)
            self.problem = None

    async def _connection(self) -> Conn:
        try:
            return await self._pool.acquire(timeout=max(self._busy_timeout, 0.1))
        except asyncpg.PostgresError as exc:  # refused at login: no database, no role
            raise CannotConnect(str(exc)) from exc

    async def _begin(self) -> tuple[Conn, Any]:
        """A pooled connection in a transaction; a connection found dead at BEGIN is
        replaced once (nothing was sent on it)."""
        for last in (False, True):
            conn = await self._connection()
            transaction = conn.transaction()
            try:
                await transaction.start()
            except DOWN:
                with contextlib.suppress(*DOWN):
                    await self._pool.release(conn)
                await self._pool.expire_connections()
                if last:
                    raise
                continue
            return conn, transaction
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[Conn]:
        """One write transaction: held numbers first, then the body, then commit.

        A failure of the database (not of the query) rolls back and raises
        StoreError naming the store.
        """
        held = dict(self._held)
        try:
            conn, transaction = await self._begin()
        except DOWN as exc:
            raise await self._failing(exc) from exc
        try:
            try:
                for activation, attempt_id in held.values():
                    await self._insert(conn, activation, attempt_id, again=True)
                    # another server may have stored it first (its reconciler found
                    # the number while this one was cut off): the next read adopts
                    # the database's row
                    self._versions[activation.id] = -1
                yield conn
            except BaseException:
                with contextlib.suppress(*UNUSABLE):
                    await transaction.rollback()
                raise
            await transaction.commit()
        except DOWN as exc:
            raise await self._failing(exc) from exc
        finally:
            with contextlib.suppress(*DOWN):
                await self._pool.release(conn)
        self._recovered()
        for activation_id in held:
            self._held.pop(activation_id, None)
            log.warning(
                "store %s: id=%d held in memory is now stored", self.path, activation_id
            )

    async def _read(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run a read; a dead connection is replaced and the read tried once more."""
        for last in (False, True):
            try:
                conn = await self._connection()
                try:
                    return await work(conn)
                finally:
                    with contextlib.suppress(*DOWN):
                        await self._pool.release(conn)
            except DOWN as exc:
                await self._pool.expire_connections()
                if last:
                    reason = str(exc) or type(exc).__name__
                    raise StoreError(f"store {self.path}: {reason}") from exc
        raise AssertionError("unreachable")

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async def run(conn: Conn) -> list[asyncpg.Record]:
            return list(await conn.fetch(query, *args))

        return await self._read(run)

    async def flush(self) -> int:
        """Try to write the numbers held in memory; how many remain held."""
        if self._held:
            with contextlib.suppress(StoreError):
                async with self._writing():
                    pass
        return len(self._held)

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Every ``interval`` s: heartbeat, the other servers' changes, held numbers."""
        while True:
            with contextlib.suppress(StoreError):
                await self.heartbeat(self._clock())
            with contextlib.suppress(StoreError):
                await self._refresh_open()
            await self.flush()
            self._forget_dead()
            await asyncio.sleep(interval)

    async def _measure_skew(self) -> None:
        """How far the database's clock is from ours (half a round trip is noise)."""
        before = self._clock()
        async with self._pool.acquire() as conn:
            theirs = float(
                await conn.fetchval("SELECT extract(epoch from clock_timestamp())")
            )
        skew = theirs - (before + self._clock()) / 2
        # seconds to a day: another host's clock, corrected (to the second, so that
        # servers started apart agree); less is noise, more a clock set on purpose
        # (a test's fixed clock) that the operator's times must keep following
        self._skew = float(round(skew)) if SKEW_MIN <= abs(skew) <= SKEW_MAX else 0.0

    def _shared(self, now: float) -> float:
        """``now`` of our clock as the database's clock reads it: the one time that
        every server sharing the database compares liveness, leases and holds in."""
        return now + self._skew

    async def heartbeat(self, now: float) -> None:
        """Record that this server is alive (and drop leases long expired).

        Its liveness lock is (re)taken first, on the connection that holds the
        activation locks: the database itself then knows when this process is gone.
        """
        try:
            async with self._locker_busy:
                locker = await self._locker_connection()
                pg_started = await locker.fetchval(
                    "SELECT pg_postmaster_start_time()::text"
                )
        except DOWN as exc:
            await self._drop_locker()
            raise await self._failing(exc) from exc
        async with self._writing() as conn:
            await conn.execute(
                "INSERT INTO servers (id, started_at, seen_at, lock_key, pg_started)"
                " VALUES ($1, $2, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET"
                " seen_at=EXCLUDED.seen_at, pg_started=EXCLUDED.pg_started",
                self.server_id,
                self._shared(now),
                self._lock_key,
                pg_started,
            )
            await conn.execute(
                "DELETE FROM leases WHERE until < $1", self._shared(now) - LEASE_KEEP
            )

    async def _migrate(self, now: float) -> None:
        async with self._pool.acquire() as conn:
            # servers starting together: one migrates, the others wait, then see it
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version"
                    " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION)"
                )
                version = await conn.fetchval("SELECT max(version) FROM schema_version")
                version = int(version or 0)
                if version > PG_SCHEMA_VERSION:
                    raise StoreError(
                        f"store {self.path}: schema {version} is newer than this program"
                    )
                for target in range(version + 1, PG_SCHEMA_VERSION + 1):
                    async with conn.transaction():
                        await conn.execute(MIGRATIONS[target])
                        if target == 1:
                            await conn.executemany(
                                "INSERT INTO counters (name, value) VALUES ($1, $2)",
                                [
                                    ("activations", first_id(now) - 1),
                                    ("rents", FIRST_RENT_ID - 1),
                                ],
                            )
                        await conn.execute(
                            "INSERT INTO schema_version VALUES ($1, $2)", target, now
                        )
                    log.info("store %s: schema %d applied", self.path, target)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    async def schema_version(self) -> int:
        """The schema version recorded in the database."""

        async def run(conn: Conn) -> int:
            return int(await conn.fetchval("SELECT max(version) FROM schema_version"))

        return await self._read(run)

    # ---- activations in memory ----------------------------------------------------------

    async def _activations(
        self, conn: Conn, query: str, *args: Any
    ) -> list[tuple[Activation, int]]:
        """(activation, changed) of each row, with its messages (fresh objects)."""
        rows = list(await conn.fetch(query, *args))
        # rows no newer than the object in memory: that object (held here, so it
        # stays alive until adopted), their messages not read
        current: dict[int, Activation] = {}
        for r in rows:
            known = self._live.get(r["id"])
            if known is not None and r["changed"] <= self._versions.get(r["id"], -1):
                current[r["id"]] = known
        messages: dict[int, list[Message]] = {
            r["id"]: [] for r in rows if r["id"] not in current
        }
        if messages:
            for m in await conn.fetch(
                "SELECT activation_id, uid, text, code, received_at FROM messages"
                " WHERE activation_id = ANY($1::bigint[]) ORDER BY id",
                list(messages),
            ):
                messages[m[0]].append(Message(m[1], m[2], m[3], m[4]))
        return [
            (current.get(r["id"]) or _activation(r, messages[r["id"]]), r["changed"])
            for r in rows
        ]

    def _adopt(self, fresh: Activation, changed: int) -> Activation:
        """The one object of this id, brought up to ``fresh`` unless it is newer."""
        if fresh.id in self._held:
            return self._held[fresh.id][0]
        current = self._live.get(fresh.id)
        if current is None:
            current = fresh
            self._live[fresh.id] = current
            self._versions[fresh.id] = changed
        elif changed > self._versions.get(fresh.id, -1):
            for name in ACTIVATION_FIELDS:
                if name == "messages":
                    current.messages[:] = fresh.messages
                else:
                    setattr(current, name, getattr(fresh, name))
            self._versions[fresh.id] = changed
        if current.is_open:
            self._cache[current.id] = current
        else:
            self._cache.pop(current.id, None)
        return current

    async def _select(self, query: str, *args: Any) -> list[Activation]:
        async def run(conn: Conn) -> list[tuple[Activation, int]]:
            return await self._activations(conn, query, *args)

        return [self._adopt(a, changed) for a, changed in await self._read(run)]

    async def _fresh(self, activation_id: int) -> Activation | None:
        """The activation as the database has it; one round trip when the object in
        memory is current (its row is read, with its messages, only when newer)."""
        known = self._live.get(activation_id)
        version = -1 if known is None else self._versions.get(activation_id, -1)
        found = await self._select(
            "SELECT * FROM activations WHERE id=$1 AND changed > $2",
            activation_id,
            version,
        )
        if found:
            return found[0]
        return known  # rows are never deleted: unchanged (or there is none)

    def _wrote(self, activation: Activation, changed: int) -> None:
        """This server wrote ``activation`` (stamped ``changed``): memory follows."""
        self._live[activation.id] = activation
        self._versions[activation.id] = max(
            changed, self._versions.get(activation.id, -1)
        )
        if activation.is_open:
            self._cache[activation.id] = activation
        else:
            self._cache.pop(activation.id, None)
            self._locks.pop(activation.id, None)

    async def _load_open(self) -> None:
        top = int(
            await self._read(
                lambda conn: conn.fetchval(
                    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM changes"
                )
            )
        )
        self._marks.extend([top] * REFRESH_LAG)
        await self._select(
            "SELECT * FROM activations WHERE state = ANY($1::text[])",
            sorted(OPEN_STATES),
        )

    async def _refresh_open(self) -> None:
        """Rows changed since REFRESH_LAG refreshes ago: the open set follows.

        Behind, because a ``changed`` stamp is drawn when a write starts and seen
        when it commits: a slower transaction may commit a lower stamp later (rows
        read again cost a row each: their messages are read only when newer).
        """
        since = self._marks[0]
        found = await self._select(
            "SELECT * FROM activations WHERE changed > $1 ORDER BY changed", since
        )
        top = max((self._versions.get(a.id, 0) for a in found), default=since)
        self._marks.append(max(top, self._marks[-1]))

    def _forget_dead(self) -> None:
        """Drop version stamps of objects nobody holds any more."""
        if len(self._versions) > 2 * len(self._live) + 1024:
            self._versions = {
                i: v for i, v in self._versions.items() if i in self._live
            }

    # ---- locks and leases ---------------------------------------------------------------

    def lock(self, activation_id: int) -> contextlib.AbstractAsyncContextManager[None]:
        """The lock that serialises state changes of one activation across servers;
        on entry the activation this store handed out is read again."""
        return self._locked(activation_id)

    @contextlib.asynccontextmanager
    async def _locked(self, activation_id: int) -> AsyncIterator[None]:
        local = self._locks.get(activation_id)
        if local is None:
            local = self._locks[activation_id] = asyncio.Lock()
        async with local:
            try:
                locker = await self._advisory_lock(activation_id)
            except StoreError:
                # this server cannot reach the database: no write of the body can
                # land either, so the in-process lock is enough to serve from memory
                yield
                return
            try:
                if activation_id in self._live and activation_id not in self._held:
                    with contextlib.suppress(StoreError):
                        await self._fresh(activation_id)
                yield
            finally:
                await self._advisory_unlock(locker, activation_id)

    async def _locker_connection(self) -> asyncpg.Connection:
        """The connection of the advisory locks (under ``_locker_busy``); a new one
        takes this server's liveness lock before anything else."""
        if self._locker is None or self._locker.is_closed():
            loop = asyncio.get_running_loop()
            if loop.time() < self._locker_retry_at:  # it just failed: fail fast
                raise CannotConnect("the database did not answer a moment ago")
            try:
                locker = await asyncpg.connect(
                    **self._target.connect_args(),
                    timeout=max(self._busy_timeout, 1.0),
                    command_timeout=COMMAND_TIMEOUT,
                    server_settings={"application_name": "sms-compat locks"},
                )
            except BaseException as exc:
                # a lock taken in an outage must not wait busy_timeout each time
                self._locker_retry_at = loop.time() + LOCKER_RETRY
                if isinstance(exc, asyncpg.PostgresError):
                    raise CannotConnect(str(exc)) from exc
                raise
            await locker.execute(
                f"SELECT pg_try_advisory_lock({SERVER_LOCKS}, {self._lock_key})"
            )
            self._locker = locker
        return self._locker

    async def _drop_locker(self) -> None:
        """Forget a failed lock connection (its session's locks are gone with it)."""
        if self._locker is not None and not self._locker.is_closed():
            self._locker.terminate()
        self._locker = None

    async def _advisory_lock(self, activation_id: int) -> asyncpg.Connection:
        """Take the activation's advisory lock; the connection holding it."""
        pause = LOCK_POLL[0]
        while True:
            try:
                async with self._locker_busy:
                    locker = await self._locker_connection()
                    taken = await locker.fetchval(
                        "SELECT pg_try_advisory_lock($1, $2)",
                        ACTIVATION_LOCKS,
                        activation_id,
                    )
            except DOWN as exc:
                await self._drop_locker()
                raise StoreError(
                    f"store {self.path}: {exc or type(exc).__name__}"
                ) from exc
            if taken:
                return locker
            await asyncio.sleep(pause)  # another server changes it now
            pause = min(pause * 2, LOCK_POLL[1])

    async def _advisory_unlock(
        self, locker: asyncpg.Connection, activation_id: int
    ) -> None:
        if locker is not self._locker or locker.is_closed():
            return  # that session is gone, and its locks with it
        with contextlib.suppress(*DOWN):
            async with self._locker_busy:
                await locker.fetchval(
                    "SELECT pg_advisory_unlock($1, $2)", ACTIVATION_LOCKS, activation_id
                )

    async def lease(self, name: str, seconds: float, now: float) -> bool:
        """Take the named lease for ``seconds`` unless another live server holds it.

        A lease held by a dead server (as :meth:`attempts` tells: killed, silent,
        gone) is free: a reconcile round it held must not wait for the lease to run
        out. Not taken while the database cannot be written (what the leased work
        finds could not be stored either); never raises, like the in-memory leases.
        """
        try:
            async with self._writing() as conn:
                taken = await conn.fetchval(
                    "INSERT INTO leases (name, until, holder) VALUES ($1, $2, $3)"
                    " ON CONFLICT (name) DO UPDATE SET until=EXCLUDED.until,"
                    " holder=EXCLUDED.holder WHERE leases.until <= $4"
                    " OR (leases.holder <> $3 AND EXISTS (SELECT 1 FROM"
                    " (SELECT leases.holder AS holder) h LEFT JOIN servers s"
                    f" ON s.id = h.holder WHERE {_dead('$5', '$6', '$7')}))"
                    " RETURNING name",
                    name,
                    self._shared(now + seconds),
                    self.server_id,
                    self._shared(now),
                    self._shared(self._clock()) - DEAD_AFTER,
                    SERVER_LOCKS,
                    DEAD_AFTER,
                )
        except StoreError:
            return False
        return taken is not None

    async def end_lease(self, name: str) -> None:
        """Give the named lease up, whoever holds it (the next taker may be anyone)."""
        async with self._writing() as conn:
            await conn.execute("DELETE FROM leases WHERE name=$1", name)

    # ---- budget holds (several servers: the check and the hold in one transaction) -----

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
        """Hold money for one paid call of a key (see Store.reserve).

        One transaction under the key's advisory transaction lock: every server's
        reserve of this key runs one at a time, and each sees the holds and spend the
        one before it committed. Holds of dead servers (killed, silent DEAD_AFTER,
        gone; as :meth:`attempts` tells) are dropped first: their purchases ended.
        """
        async with self._writing() as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", HOLD_LOCKS, key_id
            )
            await conn.execute(
                "DELETE FROM holds WHERE id IN (SELECT h.id FROM holds h"
                " LEFT JOIN servers s ON s.id = h.server_id WHERE h.key_id=$1"
                f" AND h.server_id <> $2 AND {_dead('$3', '$4', '$5')})",
                key_id,
                self.server_id,
                self._shared(now) - DEAD_AFTER,
                SERVER_LOCKS,
                DEAD_AFTER,
            )
            row = await conn.fetchrow(
                "SELECT count(*), COALESCE(SUM(amount), 0) FROM holds WHERE key_id=$1",
                key_id,
            )
            assert row is not None
            count, total = int(row[0]), Decimal(row[1])
            if max_open is not None:
                stored = await conn.fetchval(
                    "SELECT count(*) FROM activations WHERE key_id=$1"
                    " AND state = ANY($2::text[])",
                    key_id,
                    sorted(OPEN_STATES),
                )
                if stored + count >= max_open:
                    return Reservation(0, Decimal(0), refused="max_active")
            held, left = Decimal(0), None
            if budget is not None:
                spent = await self._spent(conn, key_id)
                left = max(budget - spent - total, Decimal(0))
                held = left if amount is None else amount
                if amount is None and at_most is not None:
                    held = min(held, at_most)
                if left <= 0 or held > left:
                    return Reservation(0, Decimal(0), left, refused="budget")
            hold_id = await conn.fetchval(
                "INSERT INTO holds (key_id, amount, server_id, created_at)"
                " VALUES ($1, $2, $3, $4) RETURNING id",
                key_id,
                held,
                self.server_id,
                now,
            )
        return Reservation(int(hold_id), held, left)

    async def unreserve(self, reservation_id: int) -> None:
        """Give a hold back."""
        async with self._writing() as conn:
            await conn.execute("DELETE FROM holds WHERE id=$1", reservation_id)

    async def reserved(self, key_id: str) -> tuple[int, Decimal]:
        """(how many, how much) the key's live holds (any server's) set aside now."""

        async def run(conn: Conn) -> tuple[int, Decimal]:
            row = await conn.fetchrow(
                "SELECT count(*), COALESCE(SUM(h.amount), 0) FROM holds h"
                " LEFT JOIN servers s ON s.id = h.server_id WHERE h.key_id=$1"
                f" AND (h.server_id = $2 OR NOT {_dead('$3', '$4', '$5')})",
                key_id,
                self.server_id,
                self._shared(self._clock()) - DEAD_AFTER,
                SERVER_LOCKS,
                DEAD_AFTER,
            )
            assert row is not None
            return int(row[0]), Decimal(row[1])

        return await self._read(run)

    async def buying(self, provider: str, now: float) -> bool:
        """Whether another live server has a purchase attempt on ``provider`` pending."""

        async def run(conn: Conn) -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM purchases p LEFT JOIN servers s"
                    " ON s.id = p.server_id WHERE p.provider=$1 AND p.state=$2"
                    f" AND p.server_id <> $3 AND NOT {_dead('$4', '$5', '$6')})",
                    provider,
                    PENDING,
                    self.server_id,
                    self._shared(now) - DEAD_AFTER,
                    SERVER_LOCKS,
                    DEAD_AFTER,
                )
            )

        return await self._read(run)

    # ---- purchases ----------------------------------------------------------------------

    async def begin_purchase(
        self, key_id: str, provider: str, order: Order, now: float
    ) -> int:
        """Record that a paid call is about to be made; committed on return.

        The attempt also sets aside the id its number will get. Raises StoreError when
        the database cannot take it: then nothing may be bought.
        """
        async with self._writing() as conn:
            reserved = int(
                await conn.fetchval(
                    "UPDATE counters SET value=value+1 WHERE name='activations'"
                    " RETURNING value"
                )
            )
            if reserved >= MAX_ID:
                raise StoreError(f"store {self.path}: no activation id left")
            attempt_id = int(
                await conn.fetchval(
                    "INSERT INTO purchases (key_id, provider, service, country,"
                    " order_json, state, activation_id, server_id, created_at,"
                    " updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$9) RETURNING id",
                    key_id,
                    provider,
                    order.service,
                    order.country,
                    _order_json(order),
                    PENDING,
                    reserved,
                    self.server_id,
                    now,
                )
            )
        self._reserved[attempt_id] = reserved
        return attempt_id

    async def add_cost(self, activation: Activation, amount: Decimal) -> None:
        """A further charge on an open activation (a paid re-rent on setStatus 3)."""
        async with self._writing() as conn:
            changed = await conn.fetchval(
                "UPDATE activations SET cost=cost+$1, changed=nextval('changes')"
                " WHERE id=$2 RETURNING changed",
                amount,
                activation.id,
            )
        activation.cost += amount
        self._wrote(activation, changed)

    async def end_purchase(
        self, attempt_id: int, state: str, detail: str, now: float
    ) -> None:
        """Close an attempt that bought nothing (refused) or may have (uncertain).

        A refused attempt gives its set-aside id back when no later one took the next
        (on any server: the counter row is shared).
        """
        reserved = self._reserved.pop(attempt_id, None)
        if state != REFUSED:
            reserved = None  # kept: a reconciled order takes it
        async with self._writing() as conn:
            await conn.execute(
                "UPDATE purchases SET state=$1, detail=$2, updated_at=$3 WHERE id=$4",
                state,
                detail,
                now,
                attempt_id,
            )
            if reserved is not None:
                await conn.execute(
                    "UPDATE purchases SET activation_id=NULL WHERE id=$1", attempt_id
                )
                await conn.execute(
                    "UPDATE counters SET value=value-1"
                    " WHERE name='activations' AND value=$1",
                    reserved,
                )

    async def _reserved_id(self, attempt_id: int) -> int | None:
        reserved = self._reserved.pop(attempt_id, None)
        if reserved is not None:
            return reserved
        found = await self._read(
            lambda conn: conn.fetchval(
                "SELECT activation_id FROM purchases WHERE id=$1", attempt_id
            )
        )
        return None if found is None else int(found)

    async def _insert(
        self,
        conn: Conn,
        activation: Activation,
        attempt_id: int | None,
        again: bool = False,
    ) -> int:
        """INSERT one activation (and confirm its attempt) inside a transaction.

        ``again``: a held number, perhaps stored by a commit whose answer was lost.
        Returns its ``changed`` stamp.
        """
        if not activation.id:
            activation.id = int(
                await conn.fetchval(
                    "UPDATE counters SET value=value+1 WHERE name='activations'"
                    " RETURNING value"
                )
            )
        assert activation.id < MAX_ID
        query = (
            "INSERT INTO activations (id, key_id, provider, upstream_id, phone,"
            " service, country, operator, price, currency, cost, state, extra,"
            " created_at, updated_at, expires_at, retry_mark, previous_ids)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18)"
        )
        if again:
            query += " ON CONFLICT (id) DO UPDATE SET id=EXCLUDED.id"
        changed = await conn.fetchval(
            query + " RETURNING changed",
            activation.id,
            activation.key_id,
            activation.provider,
            activation.upstream_id,
            activation.phone,
            activation.service,
            activation.country,
            activation.operator,
            activation.price,
            activation.currency,
            activation.cost,
            activation.state,
            json.dumps(activation.extra),
            activation.created_at,
            activation.updated_at,
            activation.expires_at,
            activation.retry_mark,
            ",".join(activation.previous_ids),
        )
        if attempt_id is not None:
            await conn.execute(
                "UPDATE purchases SET state=$1, activation_id=$2, updated_at=$3"
                " WHERE id=$4",
                CONFIRMED if activation.state == WAIT_CODE else RECONCILED,
                activation.id,
                activation.created_at,
                attempt_id,
            )
        return int(changed)

    async def complete_purchase(
        self, attempt_id: int | None, bought: NewActivation, *, hold: bool = False
    ) -> Activation:
        """Store the bought number as an activation (and confirm its attempt) atomically.

        It gets the id its attempt set aside. When the database cannot be written,
        raises StoreError; with ``hold`` (a paid number the client is waiting for) it
        keeps the activation in memory instead, readable at once and written as soon
        as the database takes a write (:meth:`flush`, any other write, :meth:`watch`).
        """
        order, purchase, now = bought.order, bought.purchase, bought.now
        reserved = 0
        if attempt_id is not None:
            with contextlib.suppress(StoreError):  # the outage: held under 0, refused
                reserved = await self._reserved_id(attempt_id) or 0
        activation = Activation(
            id=reserved,
            key_id=bought.key_id,
            provider=bought.provider,
            upstream_id=purchase.upstream_id,
            phone=purchase.phone,
            service=order.service,
            country=order.country,
            operator=purchase.operator,
            price=purchase.price,
            currency=bought.currency,
            cost=bought.cost,
            state=bought.state,
            created_at=now,
            updated_at=now,
            expires_at=now + bought.lifetime,
            extra=dict(purchase.extra),
        )
        try:
            try:
                async with self._writing() as conn:
                    changed = await self._insert(conn, activation, attempt_id)
            except asyncpg.UniqueViolationError:
                # another server took this server for dead (a pause longer than
                # DEAD_AFTER) and reconciled the attempt's purchase under its id
                existing = await self.get(reserved)
                if existing is not None and (
                    existing.provider,
                    existing.upstream_id,
                ) == (
                    activation.provider,
                    activation.upstream_id,
                ):
                    log.warning(
                        "store %s: id=%d provider=%s was stored meanwhile by another"
                        " server (state %s)",
                        self.path,
                        existing.id,
                        existing.provider,
                        existing.state,
                    )
                    return existing
                activation.id = 0  # another order under that id: a new one
                async with self._writing() as conn:
                    changed = await self._insert(conn, activation, attempt_id)
        except StoreError:
            if not hold or not reserved:
                activation.id = reserved
                raise
            activation.id = reserved
            self._held[activation.id] = (activation, attempt_id)
            self._live[activation.id] = activation
            if activation.is_open:
                self._cache[activation.id] = activation
            log.warning(
                "store %s: id=%d provider=%s bought but not stored (%s): held in"
                " memory until the store takes it",
                self.path,
                activation.id,
                bought.provider,
                self.problem,
            )
            return activation
        self._wrote(activation, changed)
        return activation

    async def attempts(self, states: Iterable[str]) -> list[Attempt]:
        """Purchase attempts in the given states, oldest first.

        A PENDING attempt of another server is left to it while it is alive (its
        paid call may be in flight). It is dead when, the database having run since
        its last heartbeat, its liveness lock is gone (its sessions ended: killed)
        or its heartbeat is older than DEAD_AFTER (hung, cut off); or when the
        database restarted since, and it has not come back within DEAD_AFTER.
        """
        rows = await self._fetch(
            "SELECT p.id, p.key_id, p.provider, p.order_json, p.state, p.created_at"
            " FROM purchases p LEFT JOIN servers s ON s.id = p.server_id"
            " WHERE p.state = ANY($1::text[]) AND (p.state <> $2 OR p.server_id = $3"
            " OR s.id IS NULL"
            " OR (s.pg_started = pg_postmaster_start_time()::text AND (s.seen_at < $4"
            "  OR NOT EXISTS (SELECT 1 FROM pg_locks l"
            "   WHERE l.locktype = 'advisory' AND l.granted"
            "   AND l.database = (SELECT oid FROM pg_database"
            "    WHERE datname = current_database())"
            "   AND l.classid::bigint = $5 AND l.objid::bigint = s.lock_key"
            "   AND l.objsubid = 2)))"
            " OR (s.pg_started <> pg_postmaster_start_time()::text"
            "  AND now() - pg_postmaster_start_time() > make_interval(secs => $6)))"
            " ORDER BY p.id",
            list(states),
            PENDING,
            self.server_id,
            self._shared(self._clock()) - DEAD_AFTER,
            SERVER_LOCKS,
            DEAD_AFTER,
        )
        held = {attempt_id for _, attempt_id in self._held.values()}
        return [
            Attempt(r[0], r[1], r[2], _order_of(r[3]), r[4], r[5])
            for r in rows
            if r[0] not in held
        ]

    async def known_upstream_ids(self, provider: str) -> set[str]:
        """Every upstream id (current or replaced) stored for a provider, rents too
        (smspva's rent.php sells both: a reconciler must never take a rent)."""
        rows = await self._fetch(
            "SELECT upstream_id, previous_ids FROM activations WHERE provider=$1",
            provider,
        )
        known = set()
        for upstream_id, previous_ids in rows:
            known.add(upstream_id)
            known.update(i for i in previous_ids.split(",") if i)
        rents = await self._fetch(
            "SELECT upstream_id FROM rents WHERE provider=$1", provider
        )
        known.update(r[0] for r in rents)
        known.update(
            a.upstream_id for a, _ in self._held.values() if a.provider == provider
        )
        return known

    # ---- activations --------------------------------------------------------------------

    async def get(self, activation_id: int) -> Activation | None:
        """An activation by id, read from the database (another server may have
        changed it); from memory while the database cannot be read, if known."""
        held = self._held.get(activation_id)
        if held is not None:
            return held[0]
        if not 0 < activation_id < MAX_ID:
            return None
        try:
            return await self._fresh(activation_id)
        except StoreError:
            known = self._live.get(activation_id)
            if known is None:
                raise
            return known

    def open_activations(self) -> list[Activation]:
        """Every activation whose upstream order is alive (at most a watch interval
        behind other servers' changes, at once for this server's)."""
        return list(self._cache.values())

    async def for_key(self, key_id: str, open_only: bool = True) -> list[Activation]:
        """A key's activations, oldest first."""
        if open_only:
            found = await self._select(
                "SELECT * FROM activations WHERE key_id=$1 AND state = ANY($2::text[])"
                " ORDER BY id",
                key_id,
                sorted(OPEN_STATES),
            )
        else:
            found = await self._select(
                "SELECT * FROM activations WHERE key_id=$1 ORDER BY id", key_id
            )
        held = [
            a
            for a, _ in self._held.values()
            if a.key_id == key_id and (a.is_open or not open_only)
        ]
        return sorted({a.id: a for a in (*found, *held)}.values(), key=lambda a: a.id)

    async def count(self) -> int:
        """How many activations are stored."""
        return int(
            await self._read(
                lambda conn: conn.fetchval("SELECT count(*) FROM activations")
            )
        )

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
        async with self._writing() as conn:
            await conn.executemany(
                "INSERT INTO messages (activation_id, uid, text, code, received_at)"
                " VALUES ($1,$2,$3,$4,$5) ON CONFLICT (activation_id, uid) DO NOTHING",
                [(activation.id, m.uid, m.text, m.code, m.received_at) for m in new],
            )
            changed = await conn.fetchval(
                "UPDATE activations SET state=$1, updated_at=$2,"
                " changed=nextval('changes') WHERE id=$3 RETURNING changed",
                state,
                new[-1].received_at,
                activation.id,
            )
            if webhooks is not None:
                await self._queue_webhooks(conn, webhooks(new), new[-1].received_at)
            stored = await conn.fetch(
                "SELECT uid, text, code, received_at FROM messages"
                " WHERE activation_id=$1 ORDER BY id",
                activation.id,
            )
        # another server may have stored some of them first: the database's list
        activation.messages[:] = [Message(*m) for m in stored]
        activation.state = state
        self._wrote(activation, changed)
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
            activation.extra = dict(purchase.extra)
            activation.previous_ids = (*activation.previous_ids, activation.upstream_id)
            activation.upstream_id = purchase.upstream_id
        async with self._writing() as conn:
            changed = await conn.fetchval(
                "UPDATE activations SET state=$1, upstream_id=$2, extra=$3,"
                " updated_at=$4, retry_mark=$5, previous_ids=$6,"
                " changed=nextval('changes') WHERE id=$7 RETURNING changed",
                state,
                activation.upstream_id,
                json.dumps(activation.extra),
                now,
                activation.retry_mark,
                ",".join(activation.previous_ids),
                activation.id,
            )
            if outbox is not None:
                await conn.execute(
                    "INSERT INTO outbox (activation_id, op, next_at, created_at)"
                    " VALUES ($1,$2,$3,$3)",
                    activation.id,
                    outbox,
                    now,
                )
        activation.state = state
        activation.updated_at = now
        self._wrote(activation, changed)

    async def prune(self, before: float) -> int:
        """Forget attempts that bought nothing, and delivered calls, older than ``before``."""
        async with self._writing() as conn:
            first = await conn.execute(
                "DELETE FROM purchases WHERE state=$1 AND updated_at<$2",
                REFUSED,
                before,
            )
            second = await conn.execute(
                "DELETE FROM outbox WHERE done=1 AND created_at<$1", before
            )
        return int(first.split()[-1]) + int(second.split()[-1])

    # ---- provider health ----------------------------------------------------------------

    async def save_health(
        self, provider: str, state: str, failures: int, now: float
    ) -> None:
        """Record a circuit-breaker state change (read by ``check-config --ping``)."""
        async with self._writing() as conn:
            await conn.execute(
                "INSERT INTO health (provider, state, failures, changed_at)"
                " VALUES ($1,$2,$3,$4) ON CONFLICT (provider) DO UPDATE SET"
                " state=EXCLUDED.state, failures=EXCLUDED.failures,"
                " changed_at=EXCLUDED.changed_at",
                provider,
                state,
                failures,
                now,
            )

    # ---- outbox -------------------------------------------------------------------------

    async def enqueue(self, activation_id: int, op: str, now: float) -> None:
        """Queue an upstream call to be retried until it succeeds."""
        async with self._writing() as conn:
            await conn.execute(
                "INSERT INTO outbox (activation_id, op, next_at, created_at)"
                " VALUES ($1,$2,$3,$3)",
                activation_id,
                op,
                now,
            )

    async def due_ops(
        self, now: float, limit: int = 50, activation_id: int | None = None
    ) -> list[OutboxOp]:
        """Queued calls whose time has come (only one activation's, if given),
        claimed: no other server gets them until op_done/op_failed, or CLAIM_SECONDS
        have passed (a killed claimer)."""
        only = "" if activation_id is None else " AND activation_id=$3"
        args: list[Any] = [now, limit]
        if activation_id is not None:
            args.append(activation_id)
        rows = await self._claim(
            "outbox", "activation_id, op, attempts", f"done=0{only}", args, now
        )
        return [OutboxOp(*r) for r in rows]

    async def _claim(
        self, table: str, columns: str, where: str, args: Sequence[Any], now: float
    ) -> list[asyncpg.Record]:
        """``id`` and ``columns`` of the rows of ``table`` (outbox, webhooks) due at
        ``args[0]`` (at most ``args[1]``) that match ``where``, claimed in one
        transaction: locked rows another server is taking are skipped, and the taken
        ones move CLAIM_SECONDS ahead, so nobody else gets them meanwhile."""
        async with self._writing() as conn:
            rows = await conn.fetch(
                f"SELECT id, {columns} FROM {table} WHERE {where} AND next_at<=$1"
                " ORDER BY next_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                *args,
            )
            if rows:
                await conn.execute(
                    f"UPDATE {table} SET next_at=$1 WHERE id = ANY($2::bigint[])",
                    now + CLAIM_SECONDS,
                    [r[0] for r in rows],
                )
        return list(rows)

    async def pending_ops(self) -> list[tuple[int, str, int, str]]:
        """(activation id, op, attempts, last error) of every queued call not yet done."""
        rows = await self._fetch(
            "SELECT activation_id, op, attempts, last_error FROM outbox WHERE done=0"
            " ORDER BY id"
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def op_done(self, op_id: int) -> None:
        """Mark a queued call as delivered."""
        async with self._writing() as conn:
            await conn.execute("UPDATE outbox SET done=1 WHERE id=$1", op_id)

    async def op_failed(self, op_id: int, next_at: float, error: str) -> None:
        """Reschedule a queued call after a failure (its claim ends)."""
        async with self._writing() as conn:
            await conn.execute(
                "UPDATE outbox SET attempts=attempts+1, next_at=$1, last_error=$2"
                " WHERE id=$3",
                next_at,
                error[:200],
                op_id,
            )

    # ---- money and figures for the operator ---------------------------------------------

    def set_unrefunded(self, providers: frozenset[str]) -> None:
        """Name the providers whose cancels refund nothing (their cancelled numbers
        stay spent)."""
        self.unrefunded = providers

    async def spent(self, key_id: str) -> Decimal:
        """Sum of ``cost`` of the key's activations not cancelled or expired (or of a
        provider whose cancels refund nothing), and of the confirmed payments of its
        rents not cancelled; read from the database every time (every server spends).

        Each cost counts in whole cents (rounded as SQLite's store does), exactly.
        """
        return await self._read(lambda conn: self._spent(conn, key_id))

    async def _spent(self, conn: Conn, key_id: str) -> Decimal:
        """:meth:`spent` on one connection (inside a caller's transaction)."""
        activations = await conn.fetchval(
            "SELECT COALESCE(SUM(ROUND(cost, 2)), 0) FROM activations"
            " WHERE key_id=$1 AND (state <> ALL($2::text[])"
            " OR provider = ANY($3::text[]))",
            key_id,
            [CANCELLED, EXPIRED],
            sorted(self.unrefunded),
        )
        rents = await conn.fetchval(
            "SELECT COALESCE(SUM(ROUND(NULLIF(a.cost, '')::numeric, 2)), 0)"
            " FROM rent_attempts a JOIN rents r ON a.rent_id = r.id"
            " WHERE r.key_id=$1 AND a.state=$2 AND r.state <> $3",
            key_id,
            CONFIRMED,
            RENT_CANCELLED,
        )
        return Decimal(activations + rents).quantize(Decimal("0.01"))

    async def figures(self) -> dict[str, list[tuple[Any, ...]]]:
        """Aggregates for /metrics and the dashboard (one read, no secrets); while
        the database cannot be read, the last ones read (/metrics goes on)."""
        try:
            self._figures = await self._read_figures()
        except StoreError:
            pass
        return self._figures

    async def _read_figures(self) -> dict[str, list[tuple[Any, ...]]]:

        async def run(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
            attempts = await conn.fetch(
                "SELECT state, detail, count(*) FROM purchases GROUP BY state, detail"
                " ORDER BY state, detail"
            )
            outbox = await conn.fetch(
                "SELECT op, count(*) FROM outbox WHERE done=0 GROUP BY op ORDER BY op"
            )
            return {
                "attempts": [tuple(r) for r in attempts],
                "outbox": [tuple(r) for r in outbox],
            }

        return await self._read(run)

    async def recent(
        self, limit: int = 100, where: Mapping[str, str] | None = None
    ) -> list[Activation]:
        """The newest activations, optionally filtered by key_id, state, provider."""
        clauses: list[str] = []
        args: list[Any] = []
        for column in ("key_id", "state", "provider"):
            value = (where or {}).get(column)
            if value:
                args.append(value)
                clauses.append(f"{column}=${len(args)}")
        query = "SELECT * FROM activations"
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        args.append(limit)
        query += f" ORDER BY id DESC LIMIT ${len(args)}::bigint"
        return await self._select(query, *args)

    async def writable(self) -> bool:
        """Whether a write transaction can be taken (for /readyz)."""
        try:
            async with self._writing() as conn:
                return not await conn.fetchval("SELECT pg_is_in_recovery()")
        except StoreError:
            return False

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
        async with self._writing() as conn:
            attempt_id = await conn.fetchval(
                "INSERT INTO rent_attempts (key_id, provider, kind, rent_id, order_json,"
                " hours, state, created_at, updated_at)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$8) RETURNING id",
                key_id,
                provider,
                kind,
                rent_id,
                json.dumps(order),
                hours,
                PENDING,
                now,
            )
        return int(attempt_id)

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
        async with self._writing() as conn:
            await conn.execute(
                "UPDATE rent_attempts SET state=$1, detail=$2, price=$3, cost=$4,"
                " updated_at=$5 WHERE id=$6",
                state,
                detail,
                "" if price is None else str(price),
                "" if cost is None else str(cost),
                now,
                attempt_id,
            )

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
        async with self._writing() as conn:
            rent_id = int(
                await conn.fetchval(
                    "UPDATE counters SET value=value+1 WHERE name='rents'"
                    " RETURNING value"
                )
            )
            assert rent_id < MAX_ID
            await conn.execute(
                "INSERT INTO rents (id, key_id, provider, upstream_id, phone, service,"
                " country, currency, state, extra, created_at, updated_at, until)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$11,$12)",
                rent_id,
                key_id,
                provider,
                purchase.upstream_id,
                purchase.phone,
                service,
                country,
                currency,
                RENT_ACTIVE,
                json.dumps(extra),
                now,
                purchase.until,
            )
            await conn.execute(
                "UPDATE rent_attempts SET state=$1, rent_id=$2, price=$3, cost=$4,"
                " updated_at=$5 WHERE id=$6",
                CONFIRMED,
                rent_id,
                str(purchase.price),
                str(cost),
                now,
                attempt_id,
            )
        return Rent(
            rent_id, key_id, provider, purchase.upstream_id, purchase.phone, service,
            country, currency, RENT_ACTIVE, now, now, purchase.until, extra,
        )  # fmt: skip

    async def _fetch_rents(self, query: str, *args: Any) -> list[Rent]:
        async def run(conn: Conn) -> list[Rent]:
            rows = list(await conn.fetch(query, *args))
            if not rows:
                return []
            messages: dict[int, list[RentMessage]] = {r["id"]: [] for r in rows}
            for m in await conn.fetch(
                "SELECT rent_id, uid, sender, text, code, received_at FROM rent_messages"
                " WHERE rent_id = ANY($1::bigint[]) ORDER BY received_at, id",
                list(messages),
            ):
                messages[m[0]].append(RentMessage(m[1], m[2], m[3], m[4], m[5]))
            return [
                Rent(
                    id=r["id"],
                    key_id=r["key_id"],
                    provider=r["provider"],
                    upstream_id=r["upstream_id"],
                    phone=r["phone"],
                    service=r["service"],
                    country=r["country"],
                    currency=r["currency"],
                    state=r["state"],
                    created_at=r["created_at"],
                    updated_at=r["updated_at"],
                    until=r["until"],
                    extra=json.loads(r["extra"]),
                    messages=messages[r["id"]],
                )
                for r in rows
            ]

        return await self._read(run)

    async def get_rent(self, rent_id: int) -> Rent | None:
        """A rent by id."""
        if not 0 < rent_id < MAX_ID:
            return None
        found = await self._fetch_rents("SELECT * FROM rents WHERE id=$1", rent_id)
        return found[0] if found else None

    async def rents_for_key(self, key_id: str, active_only: bool = True) -> list[Rent]:
        """A key's rents, oldest first."""
        if active_only:
            return await self._fetch_rents(
                "SELECT * FROM rents WHERE key_id=$1 AND state=$2 ORDER BY id",
                key_id,
                RENT_ACTIVE,
            )
        return await self._fetch_rents(
            "SELECT * FROM rents WHERE key_id=$1 ORDER BY id", key_id
        )

    async def active_rents(self) -> list[Rent]:
        """Every rent whose number is still held."""
        return await self._fetch_rents(
            "SELECT * FROM rents WHERE state=$1 ORDER BY id", RENT_ACTIVE
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
        async with self._writing() as conn:
            await conn.executemany(
                "INSERT INTO rent_messages (rent_id, uid, sender, text, code,"
                " received_at) VALUES ($1,$2,$3,$4,$5,$6)"
                " ON CONFLICT (rent_id, uid) DO NOTHING",
                [
                    (rent.id, m.uid, m.sender, m.text, m.code, m.received_at)
                    for m in new
                ],
            )
            if webhooks is not None:
                await self._queue_webhooks(conn, webhooks(new), new[-1].received_at)
        rent.messages.extend(new)
        return new

    async def set_rent_state(
        self, rent: Rent, state: str, now: float, until: float | None = None
    ) -> None:
        """Change a rent's state (and its end, after a prolongation)."""
        if until is not None:
            rent.until = until
        async with self._writing() as conn:
            await conn.execute(
                "UPDATE rents SET state=$1, until=$2, updated_at=$3 WHERE id=$4",
                state,
                rent.until,
                now,
                rent.id,
            )
        rent.state = state
        rent.updated_at = now

    async def rent_payments(self, rent_id: int) -> list[RentPayment]:
        """The confirmed paid calls of a rent, oldest first."""
        rows = await self._fetch(
            "SELECT kind, hours, cost, created_at FROM rent_attempts"
            " WHERE rent_id=$1 AND state=$2 ORDER BY id",
            rent_id,
            CONFIRMED,
        )
        return [RentPayment(r[0], r[1], Decimal(r[2] or "0"), r[3]) for r in rows]

    # ---- webhooks -----------------------------------------------------------------------

    async def _queue_webhooks(
        self,
        conn: Conn,
        items: Iterable[tuple[str, str, dict[str, Any]]],
        now: float,
    ) -> None:
        """Queue (key id, source, payload) deliveries inside the caller's transaction;
        a source already queued (by any server) is skipped: one SMS, one webhook."""
        rows = [(k, src, json.dumps(p, ensure_ascii=False), now) for k, src, p in items]
        if rows:
            await conn.executemany(
                "INSERT INTO webhooks (key_id, source, payload, next_at, created_at)"
                " VALUES ($1,$2,$3,$4,$4) ON CONFLICT (source) DO NOTHING",
                rows,
            )

    async def due_webhooks(self, now: float, limit: int = 50) -> list[WebhookJob]:
        """Pending deliveries whose time has come, claimed like :meth:`due_ops`."""
        rows = await self._claim(
            "webhooks",
            "key_id, payload, attempts, created_at",
            "state='pending'",
            [now, limit],
            now,
        )
        return [WebhookJob(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    async def webhook_done(self, job_id: int, state: str, error: str = "") -> None:
        """Mark a delivery as delivered (or given up)."""
        async with self._writing() as conn:
            await conn.execute(
                "UPDATE webhooks SET state=$1, attempts=attempts+1, last_error=$2"
                " WHERE id=$3",
                state,
                error[:200],
                job_id,
            )

    async def webhook_failed(self, job_id: int, next_at: float, error: str) -> None:
        """Reschedule a delivery after a failed attempt (its claim ends)."""
        async with self._writing() as conn:
            await conn.execute(
                "UPDATE webhooks SET attempts=attempts+1, next_at=$1, last_error=$2"
                " WHERE id=$3",
                next_at,
                error[:200],
                job_id,
            )

    async def webhook_states(self) -> list[tuple[str, int, str]]:
        """(source, attempts, state) of every delivery, oldest first."""
        rows = await self._fetch(
            "SELECT source, attempts, state FROM webhooks ORDER BY id"
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def rent_attempts(self, states: Iterable[str]) -> list[RentAttempt]:
        """Rent (not prolong) attempts in the given states, oldest first."""
        rows = await self._fetch(
            "SELECT id, key_id, provider, order_json, state, created_at FROM"
            " rent_attempts WHERE kind='rent' AND state = ANY($1::text[]) ORDER BY id",
            list(states),
        )
        return [
            RentAttempt(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows
        ]


def _why(exc: BaseException) -> str:
    """The cause in one line, the same on every event loop (asyncio says "Connect call
    failed (host, port)", uvloop "Connection refused" for the same refusal)."""
    if isinstance(exc, OSError) and exc.errno:
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    return str(exc)
