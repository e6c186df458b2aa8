"""The SQLite store: activations, their messages, purchase attempts and the outbox.

The implementation of :class:`compat_server.store.Store` through aiosqlite, WAL with ``synchronous=FULL``: a write is durable when the
method returns, so a purchase is on disk before ``ACCESS_NUMBER`` leaves the server.
Activations are also kept in memory (write-through): reads for getStatus never touch
the disk. The schema carries a version in ``meta``; :data:`MIGRATIONS` upgrades it.

The file holds phone numbers and SMS texts: it (and its ``-wal``/``-shm``) is kept 0600.
One server per file, enforced with ``flock`` on ``<store>.lock``. A store that is not
writable, or held by another server, is a :class:`StoreError` at open. While running,
the file is watched (device and inode): a store deleted or replaced under the server
stops purchases. A number bought when the store cannot be written (locked, disk full)
is held in memory under the id reserved before the paid call and written as soon as
the store accepts writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
import secrets
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from decimal import Decimal
from typing import Any

import aiosqlite

from compat_server.store.records import (
    CANCELLED,
    CLAIM_SECONDS,
    CODE,
    CONFIRMED,
    EXPIRED,
    NO_EXTRA,
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
from providers.vocabulary import (
    Clock,
    Order,
    Purchase,
    RentPurchase,
    RentSms,
    Sms,
)

log = logging.getLogger("compat_server")

SCHEMA_VERSION = 4
FIRST_ID = 100_000  # ids look like real ones and stay far below 2**31
MAX_ID = 2**31 - 1
FIRST_RENT_ID = 5_000  # rent ids are their own space (a table of their own)

# A new store's ids start from the clock, so a store recreated on the same machine never
# hands out an id an earlier one did, as long as that one averaged at most
# IDS_PER_SECOND purchases since its creation. Ids stay below 2**31 (the official Java
# client parses them with Integer.parseInt) until about 2058.
# 2026-01-01 00:00:00 UTC: a store created then starts at FIRST_ID
ID_EPOCH = 1_767_225_600
IDS_PER_SECOND = 2
ID_CEILING = MAX_ID - 100_000_000  # the highest first id: room for 10**8 activations
BUSY_TIMEOUT = 5.0  # s a write waits for another process's lock before failing
WATCH_INTERVAL = 5.0  # s between checks of the file (and retries of held numbers)
FILE_MODE = 0o600
FETCH_CHUNK = 2_000  # rows per fetch when loading activations (bounds the peak)
# the columns of an Activation, in its field order (extra before created_at: see _fetch)
ACTIVATION_COLUMNS = (
    "id, key_id, provider, upstream_id, phone, service, country, operator, price,"
    " currency, cost, state, extra, created_at, updated_at, expires_at, retry_mark,"
    " previous_ids"
)
SHARED_MAX = 100_000  # distinct amounts shared at most (see Shared)


class Shared:
    """One object per repeated value of the activations in memory.

    Key ids, provider names, service codes, currencies, states and amounts repeat
    across thousands of activations; each is kept once (equal values, one object).
    Strings go through ``sys.intern`` (freed when no activation holds them); past
    SHARED_MAX distinct amounts new ones are simply not shared.
    """

    text = staticmethod(sys.intern)

    def __init__(self) -> None:
        self._amounts: dict[str, Decimal] = {}

    def amount(self, value: str) -> Decimal:
        """``Decimal(value)``, the one already made from the same text if any.

        Keyed by the text: "18.5" and "18.50" stay distinct (equal, not the same)."""
        found = self._amounts.get(value)
        if found is not None:
            return found
        amount = Decimal(value)
        if len(self._amounts) < SHARED_MAX:
            self._amounts[value] = amount
        return amount


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
    # retry marks and replaced upstream ids leave the JSON ``extra`` for real columns
    4: """
    ALTER TABLE activations ADD COLUMN retry_mark INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE activations ADD COLUMN previous_ids TEXT NOT NULL DEFAULT '';
    UPDATE activations SET
        retry_mark = CAST(COALESCE(json_extract(extra, '$._retry_mark'), '0') AS INTEGER),
        previous_ids = COALESCE(json_extract(extra, '$.previous_ids'), ''),
        extra = json_remove(extra, '$._retry_mark', '$.previous_ids');
    """,
}


def first_id(now: float) -> int:
    """The first activation id of a store created at ``now``."""
    seed = FIRST_ID + max(0, int(now) - ID_EPOCH) * IDS_PER_SECOND
    return min(seed, ID_CEILING)  # a store created past 2058 still has room


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _prepare_file(path: str) -> None:
    """Create the store 0600 whatever the umask; tighten an existing store's files."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"store {path}: cannot create it: {exc.strerror}") from exc
    else:
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits; set them exactly
        finally:
            os.close(fd)
        return
    if not os.access(path, os.W_OK):
        raise StoreError(
            f"store {path} is read-only: the server must be able to write it"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(f"{path}-wal") and not os.access(folder, os.W_OK):
        raise StoreError(
            f"store {path}: its directory is read-only (SQLite keeps"
            f" {os.path.basename(path)}-wal and -shm next to it)"
        )
    # SQLite gives a new -wal/-shm the database file's mode; older ones are fixed here
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except FileNotFoundError:
            continue
        if not mode & 0o077:
            continue
        private = mode & 0o700  # an owner's read-only choice stays
        try:
            os.chmod(name, private)
        except OSError as exc:
            log.warning(
                "store %s is mode %04o (readable by other users), cannot change it: %s",
                name,
                mode,
                exc.strerror,
            )
        else:
            log.warning(
                "store %s was mode %04o (readable by other users), now %04o",
                name,
                mode,
                private,
            )


def _live_claims(claims: dict[int, float], now: float) -> dict[int, float]:
    """Drop the claims that ran out (in place); the same dict."""
    for claimed in [i for i, until in claims.items() if until <= now]:
        del claims[claimed]
    return claims


def _lock(path: str) -> int:
    """Hold ``<path>.lock`` exclusively (one server per store); its descriptor."""
    name = f"{path}.lock"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        verb = "open" if os.path.exists(name) else "create"
        raise StoreError(
            f"store {path}: cannot {verb} its lock file {name}: {exc.strerror}"
        ) from exc
    with contextlib.suppress(OSError):  # another owner's lock file keeps its mode
        os.fchmod(fd, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise StoreError(
            f"store {path} is in use by another sms-compat server{by}"
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class SqliteStore:
    """Durable state of the server in one SQLite file. Use :meth:`open`, :meth:`close`."""

    def __init__(
        self, db: aiosqlite.Connection, path: str = "", lock_fd: int | None = None
    ) -> None:
        self._db = db
        self.path = path
        self._lock_fd = lock_fd
        self._identity = _identity(path) if path else None
        self._cache: dict[int, Activation] = {}
        # the same open activations by key, in id order unless the key is _unordered
        self._by_key: dict[str, dict[int, Activation]] = {}
        self._unordered: set[str] = set()
        self._shared = Shared()
        self._write = asyncio.Lock()
        self._locks: dict[int, asyncio.Lock] = {}
        self._leases: dict[str, float] = {}  # name -> held until
        self._spent: dict[str, Decimal] = {}  # key_id -> spend, once read (see spent)
        # providers whose cancels give no money back (thuecodesim): what their
        # cancelled and expired numbers cost stays spent (set by the app)
        self.unrefunded: frozenset[str] = frozenset()
        self._reserved: dict[int, int] = {}  # attempt id -> activation id set aside
        # bought, answered, not yet written: activation id -> (activation, attempt id)
        self._held: dict[int, tuple[Activation, int | None]] = {}
        self.problem: str | None = None  # why writes fail now (None: they work)
        # one server per file: its identity, its claims and its budget holds are
        # this process's, kept in memory (a restart frees them all)
        self.server_id = secrets.token_hex(8)
        self.clock: Clock = time.time
        self._op_claims: dict[int, float] = {}  # outbox op id -> claimed until
        self._webhook_claims: dict[int, float] = {}  # webhook job id -> claimed until
        self._holds: dict[str, dict[int, Decimal]] = {}  # key_id -> hold id -> amount
        self._hold_keys: dict[int, str] = {}  # hold id -> key_id
        self._hold_locks: dict[str, asyncio.Lock] = {}
        self._hold_ids = itertools.count(1)

    @classmethod
    async def open(
        cls, path: str, clock: Clock = time.time, busy_timeout: float = BUSY_TIMEOUT
    ) -> SqliteStore:
        """Open (creating or migrating) the database at ``path``.

        Raises StoreError (one line naming the store) when another server holds it,
        or it cannot be opened, migrated or written.
        """
        lock_fd = _lock(path)
        try:
            _prepare_file(path)
            db = await aiosqlite.connect(path, timeout=busy_timeout)
        except BaseException as exc:
            os.close(lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"store {path} cannot be used: {exc}") from exc
            raise
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = aiosqlite.Row
            store = cls(db, path, lock_fd)
            store.clock = clock
            await store._migrate(clock())
            # a read-only file or directory lets SQLite open and read: only a write
            # tells, and a server that cannot store a purchase must not start
            await db.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('opened_at', ?)",
                (str(clock()),),
            )
            await db.commit()
            await store._load_open()
        except BaseException as exc:
            await db.close()
            os.close(lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"store {path} cannot be used: {exc}") from exc
            raise
        return store

    async def close(self) -> None:
        """Write held numbers if the store takes them, close the database, unlock it."""
        if await self.flush():
            for activation, _ in self._held.values():
                log.error(
                    "store %s: id=%d provider=%s upstream=%s bought but never"
                    " stored (its attempt is on disk for the reconciler)",
                    self.path,
                    activation.id,
                    activation.provider,
                    activation.upstream_id,
                )
        try:
            await self._db.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # ---- health of the file -------------------------------------------------------------

    def check_file(self) -> bool:
        """Whether the path still names the file opened; logs once when that changes."""
        if self._identity is None:
            return True
        current = _identity(self.path)
        if current == self._identity:
            if self.problem == "replaced":
                log.warning("store %s is back: purchases resume", self.path)
                self.problem = None
            return True
        if self.problem != "replaced":
            self.problem = "replaced"
            log.error(
                "store %s was %s while the server runs: purchases stopped (getNumber"
                " answers NO_NUMBERS); restore the file or restart the server",
                self.path,
                "deleted" if current is None else "replaced by another file",
            )
        return False

    def _failing(self, exc: BaseException) -> StoreError:
        reason = str(exc) or type(exc).__name__
        if self.problem is None:
            log.error("store %s cannot be written: %s", self.path, reason)
        self.problem = self.problem or reason
        return StoreError(f"store {self.path}: {reason}")

    def _recovered(self) -> None:
        if self.problem is not None:
            log.warning("store %s is writable again", self.path)
            self.problem = None

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """One write transaction: held numbers first, then the body, then commit.

        A failure rolls everything back (no transaction is left open) and raises
        StoreError when SQLite reports a condition of the file (locked, full, I/O).
        """
        async with self._write:
            try:
                held = dict(self._held)
                for activation, attempt_id in held.values():
                    await self._insert(activation, attempt_id)
                yield
                await self._db.commit()
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await self._db.rollback()
                if isinstance(exc, sqlite3.OperationalError):
                    raise self._failing(exc) from exc
                raise
            if self.problem is not None and self.problem != "replaced":
                self._recovered()
            for activation_id in held:
                activation, _ = self._held.pop(activation_id)
                log.warning(
                    "store %s: id=%d held in memory is now stored",
                    self.path,
                    activation_id,
                )

    async def flush(self) -> int:
        """Try to write the numbers held in memory; how many remain held."""
        if self._held:
            with contextlib.suppress(StoreError):
                async with self._writing():
                    pass
        return len(self._held)

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Every ``interval`` s until cancelled: heartbeat, check the file, retry held
        numbers."""
        while True:
            await self.heartbeat(self.clock())
            self.check_file()
            await self.flush()
            await asyncio.sleep(interval)

    async def heartbeat(self, now: float) -> None:
        """One server per file: nobody else needs to know it is alive."""

    async def _migrate(self, now: float) -> None:
        await self._db.execute(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        async with self._db.execute(
            "SELECT value FROM meta WHERE name='version'"
        ) as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path}: schema {version} is newer than this program"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await self._db.executescript(MIGRATIONS[target])
            if target == 1:
                await self._db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('activations', ?)",
                    (first_id(now) - 1,),
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
        """Every open activation into memory: one query for them, one for all their
        messages (never one per activation: 100,000 of them must load in seconds)."""
        placeholders = ",".join("?" * len(OPEN_STATES))
        found = await self._fetch(
            f"FROM activations WHERE state IN ({placeholders}) ORDER BY id",
            tuple(sorted(OPEN_STATES)),
        )
        for activation in found:
            self._keep(activation)

    def _keep(self, activation: Activation) -> None:
        """Serve an open activation from memory (and from its key's list)."""
        self._cache[activation.id] = activation
        mine = self._by_key.get(activation.key_id)
        if mine is None:
            mine = self._by_key[activation.key_id] = {}
        elif activation.id not in mine and next(reversed(mine)) > activation.id:
            self._unordered.add(activation.key_id)  # bought out of order: sort once
        mine[activation.id] = activation

    def _forget(self, activation: Activation) -> None:
        """An activation no longer open: memory lets it go."""
        self._cache.pop(activation.id, None)
        self._locks.pop(activation.id, None)
        mine = self._by_key.get(activation.key_id)
        if mine is not None:
            mine.pop(activation.id, None)
            if not mine:
                del self._by_key[activation.key_id]
                self._unordered.discard(activation.key_id)

    @contextlib.asynccontextmanager
    async def _plain(
        self, query: str, args: tuple[Any, ...]
    ) -> AsyncIterator[aiosqlite.Cursor]:
        """A cursor over ``query`` whose rows are plain tuples (cheaper than Rows)."""
        cursor = await self._db.cursor()
        try:
            cursor.row_factory = None
            await cursor.execute(query, args)
            yield cursor
        finally:
            await cursor.close()

    async def _fetch(self, tail: str, args: Iterable[Any]) -> list[Activation]:
        """Activations ``SELECT ... {tail}`` (a FROM activations clause, in order), with
        their messages read in one more query over the same rows."""
        args = tuple(args)
        messages: dict[int, list[Message]] = {}
        async with self._plain(
            "SELECT activation_id, uid, text, code, received_at FROM messages"
            f" WHERE activation_id IN (SELECT id {tail}) ORDER BY activation_id, id",
            args,
        ) as cur:
            while rows := await cur.fetchmany(FETCH_CHUNK):
                for aid, uid, text, code, received_at in rows:
                    found = messages.get(aid)
                    if found is None:
                        found = messages[aid] = []
                    found.append(Message(uid, text, code, received_at))
        result: list[Activation] = []
        shared = self._shared
        async with self._plain(f"SELECT {ACTIVATION_COLUMNS} {tail}", args) as cur:
            while rows := await cur.fetchmany(FETCH_CHUNK):
                for row in rows:
                    aid, extra, created, updated, previous = (
                        row[0], row[12], row[13], row[14], row[17],
                    )  # fmt: skip
                    result.append(
                        Activation(
                            aid, shared.text(row[1]), shared.text(row[2]), row[3],
                            row[4], shared.text(row[5]), row[6], shared.text(row[7]),
                            shared.amount(row[8]), shared.text(row[9]),
                            shared.amount(row[10]), shared.text(row[11]), created,
                            created if updated == created else updated, row[15],
                            NO_EXTRA if extra == "{}" else json.loads(extra),
                            messages.pop(aid, []),
                            row[16],
                            tuple(i for i in previous.split(",") if i)
                            if previous
                            else (),
                        )
                    )  # fmt: skip
        return result

    def lock(self, activation_id: int) -> contextlib.AbstractAsyncContextManager[None]:
        """The lock that serialises state changes of one activation (one server per
        file: an asyncio.Lock, and the Activation objects are the ones in memory)."""
        lock = self._locks.get(activation_id)
        if lock is None:
            lock = self._locks[activation_id] = asyncio.Lock()
        return lock

    async def lease(self, name: str, seconds: float, now: float) -> bool:
        """One server per file: the leases live in memory."""
        if self._leases.get(name, -1e18) > now:
            return False
        if len(self._leases) > 4 * len(self._cache) + 1024:  # forget expired ones
            self._leases = {k: t for k, t in self._leases.items() if t > now}
        self._leases[name] = now + seconds
        return True

    async def end_lease(self, name: str) -> None:
        """Give the named lease up."""
        self._leases.pop(name, None)

    # ---- budget holds -------------------------------------------------------------------

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

        One server per file: the holds live in memory, and one lock per key makes
        the check and the hold one step for concurrent purchases of this process.
        """
        lock = self._hold_locks.setdefault(key_id, asyncio.Lock())
        async with lock:
            holds = self._holds.get(key_id, {})
            if max_open is not None:
                stored = sum(1 for a in self._cache.values() if a.key_id == key_id)
                if stored + len(holds) >= max_open:
                    return Reservation(0, Decimal(0), refused="max_active")
            held, left = Decimal(0), None
            if budget is not None:
                spent = await self.spent(key_id)
                left = max(budget - spent - sum(holds.values(), Decimal(0)), Decimal(0))
                held = left if amount is None else amount
                if amount is None and at_most is not None:
                    held = min(held, at_most)
                if left <= 0 or held > left:
                    return Reservation(0, Decimal(0), left, refused="budget")
            hold_id = next(self._hold_ids)
            self._holds.setdefault(key_id, {})[hold_id] = held
            self._hold_keys[hold_id] = key_id
        return Reservation(hold_id, held, left)

    async def unreserve(self, reservation_id: int) -> None:
        """Give a hold back."""
        key_id = self._hold_keys.pop(reservation_id, None)
        if key_id is None:
            return
        holds = self._holds.get(key_id, {})
        holds.pop(reservation_id, None)
        if not holds:
            self._holds.pop(key_id, None)

    async def reserved(self, key_id: str) -> tuple[int, Decimal]:
        """(how many, how much) the key's holds set aside now."""
        holds = self._holds.get(key_id, {})
        return len(holds), sum(holds.values(), Decimal(0))

    async def buying(self, provider: str, now: float) -> bool:
        """One server per file: no other server buys."""
        return False

    # ---- purchases ----------------------------------------------------------------------

    async def begin_purchase(
        self, key_id: str, provider: str, order: Order, now: float
    ) -> int:
        """Record that a paid call is about to be made; durable on return.

        The attempt also sets aside the id its number will get. Raises StoreError when
        the store cannot take it (replaced, locked, full): then nothing may be bought.
        """
        if not self.check_file():
            raise StoreError(f"store {self.path} was replaced or deleted")
        order_json = json.dumps(
            {
                "service": order.service,
                "country": order.country,
                "operators": list(order.operators),
                "exclude_prefixes": list(order.exclude_prefixes),
                "max_price": None if order.max_price is None else str(order.max_price),
            }
        )
        async with self._writing():
            await self._db.execute(
                "UPDATE sqlite_sequence SET seq=seq+1 WHERE name='activations'"
            )
            async with self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='activations'"
            ) as seq:
                row = await seq.fetchone()
            reserved = int(row[0]) if row else None
            if reserved is not None and reserved >= MAX_ID:
                raise StoreError(f"store {self.path}: no activation id left")
            cur = await self._db.execute(
                "INSERT INTO purchases (key_id, provider, service, country, order_json,"
                " state, activation_id, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    key_id,
                    provider,
                    order.service,
                    order.country,
                    order_json,
                    PENDING,
                    reserved,
                    now,
                    now,
                ),
            )
        assert cur.lastrowid is not None
        if reserved is not None:
            self._reserved[cur.lastrowid] = reserved
        return cur.lastrowid

    async def add_cost(self, activation: Activation, amount: Decimal) -> None:
        """A further charge on an open activation (a paid re-rent on setStatus 3)."""
        async with self._writing():
            await self._db.execute(
                "UPDATE activations SET cost=? WHERE id=?",
                (str(activation.cost + amount), activation.id),
            )
        activation.cost += amount
        self._count_spend(activation.key_id, amount)

    async def end_purchase(
        self, attempt_id: int, state: str, detail: str, now: float
    ) -> None:
        """Close an attempt that bought nothing (refused) or may have (uncertain).

        A refused attempt gives its set-aside id back when no later one took the next.
        """
        reserved = self._reserved.pop(attempt_id, None)
        if state != REFUSED:
            reserved = None  # kept on disk: a reconciled order takes it
        async with self._writing():
            await self._db.execute(
                "UPDATE purchases SET state=?, detail=?, updated_at=? WHERE id=?",
                (state, detail, now, attempt_id),
            )
            if reserved is not None:
                # never shown to anyone: so ids stay consecutive for what is sold
                await self._db.execute(
                    "UPDATE purchases SET activation_id=NULL WHERE id=?", (attempt_id,)
                )
                await self._db.execute(
                    "UPDATE sqlite_sequence SET seq=seq-1"
                    " WHERE name='activations' AND seq=?",
                    (reserved,),
                )

    async def _reserved_id(self, attempt_id: int) -> int | None:
        reserved = self._reserved.pop(attempt_id, None)
        if reserved is not None:
            return reserved
        async with self._db.execute(
            "SELECT activation_id FROM purchases WHERE id=?", (attempt_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    async def _insert(self, activation: Activation, attempt_id: int | None) -> int:
        """INSERT one activation (and confirm its attempt) inside a write transaction."""
        cur = await self._db.execute(
            "INSERT INTO activations (id, key_id, provider, upstream_id, phone, service,"
            " country, operator, price, currency, cost, state, extra, created_at,"
            " updated_at, expires_at, retry_mark, previous_ids)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                activation.id or None,
                activation.key_id,
                activation.provider,
                activation.upstream_id,
                activation.phone,
                activation.service,
                activation.country,
                activation.operator,
                str(activation.price),
                activation.currency,
                str(activation.cost),
                activation.state,
                json.dumps(activation.extra),
                activation.created_at,
                activation.updated_at,
                activation.expires_at,
                activation.retry_mark,
                ",".join(activation.previous_ids),
            ),
        )
        activation_id = cur.lastrowid
        assert activation_id is not None and activation_id < MAX_ID
        if attempt_id is not None:
            await self._db.execute(
                "UPDATE purchases SET state=?, activation_id=?, updated_at=? WHERE id=?",
                (
                    CONFIRMED if activation.state == WAIT_CODE else RECONCILED,
                    activation_id,
                    activation.created_at,
                    attempt_id,
                ),
            )
        return activation_id

    async def complete_purchase(
        self, attempt_id: int | None, bought: NewActivation, *, hold: bool = False
    ) -> Activation:
        """Store the bought number as an activation (and confirm its attempt) atomically.

        It gets the id its attempt set aside. When the store cannot be written, raises
        StoreError; with ``hold`` (a paid number the client is waiting for) it keeps
        the activation in memory instead, readable at once and written as soon as the
        store accepts a write (:meth:`flush`, any other write, :meth:`watch`).
        """
        key_id, provider, order, purchase = (
            bought.key_id, bought.provider, bought.order, bought.purchase,
        )  # fmt: skip
        cost, now, state = bought.cost, bought.now, bought.state
        shared = self._shared  # as a restart would load it: repeated values shared
        activation = Activation(
            id=0 if attempt_id is None else (await self._reserved_id(attempt_id) or 0),
            key_id=shared.text(key_id),
            provider=shared.text(provider),
            upstream_id=purchase.upstream_id,
            phone=purchase.phone,
            service=shared.text(order.service),
            country=order.country,
            operator=shared.text(purchase.operator),
            price=shared.amount(str(purchase.price)),
            currency=shared.text(bought.currency),
            cost=shared.amount(str(cost)),
            state=state,
            created_at=now,
            updated_at=now,
            expires_at=now + bought.lifetime,
            extra=dict(purchase.extra) if purchase.extra else NO_EXTRA,
        )
        try:
            async with self._writing():
                activation.id = await self._insert(activation, attempt_id)
        except StoreError:
            if not hold or not activation.id:
                raise
            self._held[activation.id] = (activation, attempt_id)
            log.warning(
                "store %s: id=%d provider=%s bought but not stored (%s): held in"
                " memory until the store takes it",
                self.path,
                activation.id,
                provider,
                self.problem,
            )
        if activation.is_open:
            self._keep(activation)
        if state not in (CANCELLED, EXPIRED) or provider in self.unrefunded:
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
        held = {attempt_id for _, attempt_id in self._held.values()}
        return [a for a in result if a.id not in held]

    async def known_upstream_ids(self, provider: str) -> set[str]:
        """Every upstream id (current or replaced) stored for a provider, rents too
        (smspva's rent.php sells both: a reconciler must never take a rent)."""
        async with self._db.execute(
            "SELECT upstream_id, previous_ids FROM activations WHERE provider=?",
            (provider,),
        ) as cur:
            rows = list(await cur.fetchall())
        known = set()
        for upstream_id, previous_ids in rows:
            known.add(upstream_id)
            known.update(i for i in previous_ids.split(",") if i)
        async with self._db.execute(
            "SELECT upstream_id FROM rents WHERE provider=?", (provider,)
        ) as cur:
            known.update(row[0] for row in await cur.fetchall())
        known.update(
            a.upstream_id for a, _ in self._held.values() if a.provider == provider
        )
        return known

    # ---- activations --------------------------------------------------------------------

    async def get(self, activation_id: int) -> Activation | None:
        """An activation by id (from memory when open)."""
        cached = self._cache.get(activation_id)
        if cached is not None:
            return cached
        found = await self._fetch("FROM activations WHERE id=?", (activation_id,))
        return found[0] if found else None

    def open_activations(self) -> list[Activation]:
        """Every activation whose upstream order is alive."""
        return list(self._cache.values())

    async def for_key(self, key_id: str, open_only: bool = True) -> list[Activation]:
        """A key's activations, oldest first."""
        if open_only:
            mine = self._by_key.get(key_id)
            if mine is None:
                return []
            if key_id in self._unordered:
                mine = self._by_key[key_id] = dict(sorted(mine.items()))
                self._unordered.discard(key_id)
            return list(mine.values())
        return await self._fetch(
            "FROM activations WHERE key_id=? ORDER BY id", (key_id,)
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
        async with self._writing():
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
        activation.messages.extend(
            Message(m.uid, m.text, m.code, m.received_at) for m in new
        )
        activation.state = state
        activation.updated_at = new[-1].received_at  # as written above
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
            activation.extra = dict(purchase.extra) if purchase.extra else NO_EXTRA
            activation.previous_ids = (*activation.previous_ids, activation.upstream_id)
            activation.upstream_id = purchase.upstream_id
        async with self._writing():
            await self._db.execute(
                "UPDATE activations SET state=?, upstream_id=?, extra=?, updated_at=?,"
                " retry_mark=?, previous_ids=? WHERE id=?",
                (
                    state,
                    activation.upstream_id,
                    json.dumps(activation.extra),
                    now,
                    activation.retry_mark,
                    ",".join(activation.previous_ids),
                    activation.id,
                ),
            )
            if outbox is not None:
                await self._db.execute(
                    "INSERT INTO outbox (activation_id, op, next_at, created_at)"
                    " VALUES (?,?,?,?)",
                    (activation.id, outbox, now, now),
                )
        unspent = (CANCELLED, EXPIRED)
        refunded = activation.provider not in self.unrefunded
        if refunded and (activation.state in unspent) != (state in unspent):
            sign = 1 if state not in unspent else -1
            self._count_spend(activation.key_id, sign * activation.cost)
        activation.state = state
        activation.updated_at = now
        if not activation.is_open:
            self._forget(activation)
        else:  # open again (a refused cancel): served from memory like the others
            self._keep(activation)

    async def prune(self, before: float) -> int:
        """Forget attempts that bought nothing, and delivered calls, older than ``before``."""
        async with self._writing():
            cur = await self._db.execute(
                "DELETE FROM purchases WHERE state=? AND updated_at<?",
                (REFUSED, before),
            )
            removed = cur.rowcount
            cur = await self._db.execute(
                "DELETE FROM outbox WHERE done=1 AND created_at<?", (before,)
            )
            removed += cur.rowcount
        return removed

    # ---- provider health ----------------------------------------------------------------

    async def save_health(
        self, provider: str, state: str, failures: int, now: float
    ) -> None:
        """Record a circuit-breaker state change (read by ``check-config --ping``)."""
        async with self._writing():
            await self._db.execute(
                "INSERT OR REPLACE INTO health (provider, state, failures, changed_at)"
                " VALUES (?,?,?,?)",
                (provider, state, failures, now),
            )

    # ---- outbox -------------------------------------------------------------------------

    async def enqueue(self, activation_id: int, op: str, now: float) -> None:
        """Queue an upstream call to be retried until it succeeds."""
        async with self._writing():
            await self._db.execute(
                "INSERT INTO outbox (activation_id, op, next_at, created_at) VALUES (?,?,?,?)",
                (activation_id, op, now, now),
            )

    async def due_ops(
        self, now: float, limit: int = 50, activation_id: int | None = None
    ) -> list[OutboxOp]:
        """Claim queued calls whose time has come (only one activation's, if given).

        One server per file: the claims live in memory (a restart frees them).
        """
        claims = _live_claims(self._op_claims, now)
        query = "SELECT id, activation_id, op, attempts FROM outbox WHERE done=0"
        args: list[Any] = []
        if activation_id is not None:
            query += " AND activation_id=?"
            args.append(activation_id)
        query += " AND next_at<=? ORDER BY next_at, id LIMIT ?"
        args.extend((now, limit + len(claims)))
        async with self._db.execute(query, args) as cur:
            due = [OutboxOp(*row) for row in await cur.fetchall()]
        due = [op for op in due if op.id not in claims][:limit]
        for op in due:
            claims[op.id] = now + CLAIM_SECONDS
        return due

    async def pending_ops(self) -> list[tuple[int, str, int, str]]:
        """(activation id, op, attempts, last error) of every queued call not yet done."""
        async with self._db.execute(
            "SELECT activation_id, op, attempts, last_error FROM outbox WHERE done=0"
            " ORDER BY id"
        ) as cur:
            return [tuple(row) for row in await cur.fetchall()]

    async def op_done(self, op_id: int) -> None:
        """Mark a queued call as delivered (and end its claim)."""
        async with self._writing():
            await self._db.execute("UPDATE outbox SET done=1 WHERE id=?", (op_id,))
        self._op_claims.pop(op_id, None)

    async def op_failed(self, op_id: int, next_at: float, error: str) -> None:
        """Reschedule a queued call after a failure (and end its claim)."""
        async with self._writing():
            await self._db.execute(
                "UPDATE outbox SET attempts=attempts+1, next_at=?, last_error=? WHERE id=?",
                (next_at, error[:200], op_id),
            )
        self._op_claims.pop(op_id, None)

    # ---- money and figures for the operator ---------------------------------------------

    def set_unrefunded(self, providers: frozenset[str]) -> None:
        """Name the providers whose cancels refund nothing; spend is read again."""
        if providers != self.unrefunded:
            self.unrefunded = providers
            self._spent.clear()

    async def spent(self, key_id: str) -> Decimal:
        """Sum of ``cost`` of the key's activations not cancelled or expired (or of a
        provider whose cancels refund nothing, see ``unrefunded``), and of
        the confirmed payments (rent and prolongations) of its rents not cancelled.

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
            kept = sorted(self.unrefunded)
            async with self._db.execute(
                "SELECT SUM(CAST(ROUND(CAST(cost AS REAL) * 100) AS INTEGER))"
                " FROM activations WHERE key_id=? AND (state NOT IN (?,?)"
                f" OR provider IN ({','.join('?' * len(kept))}))",
                (key_id, CANCELLED, EXPIRED, *kept),
            ) as cur:
                row = await cur.fetchone()
            cents = row[0] if row is not None and row[0] is not None else 0
            async with self._db.execute(
                "SELECT SUM(CAST(ROUND(CAST(a.cost AS REAL) * 100) AS INTEGER))"
                " FROM rent_attempts a JOIN rents r ON a.rent_id = r.id"
                " WHERE r.key_id=? AND a.state=? AND r.state != ?",
                (key_id, CONFIRMED, RENT_CANCELLED),
            ) as cur:
                row = await cur.fetchone()
            cents += row[0] if row is not None and row[0] is not None else 0
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
        query = "FROM activations"
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
        async with self._writing():
            cur = await self._db.execute(
                "INSERT INTO rent_attempts (key_id, provider, kind, rent_id, order_json,"
                " hours, state, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (key_id, provider, kind, rent_id, json.dumps(order), hours, PENDING,
                 now, now),
            )  # fmt: skip
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _rent_spend_changed(self, key_id: str | None = None) -> None:
        """A rent payment or a rent's state changed: spend is read again next time."""
        if key_id is None:
            self._spent.clear()
        else:
            self._spent.pop(key_id, None)

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
        async with self._writing():
            await self._db.execute(
                "UPDATE rent_attempts SET state=?, detail=?, price=?, cost=?,"
                " updated_at=? WHERE id=?",
                (state, detail, "" if price is None else str(price),
                 "" if cost is None else str(cost), now, attempt_id),
            )  # fmt: skip
        self._rent_spend_changed()  # a confirmed prolongation is spent

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
        async with self._writing():
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
        self._rent_spend_changed(key_id)
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
        async with self._writing():
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
        rent.messages.extend(new)
        return new

    async def set_rent_state(
        self, rent: Rent, state: str, now: float, until: float | None = None
    ) -> None:
        """Change a rent's state (and its end, after a prolongation)."""
        if until is not None:
            rent.until = until
        async with self._writing():
            await self._db.execute(
                "UPDATE rents SET state=?, until=?, updated_at=? WHERE id=?",
                (state, rent.until, now, rent.id),
            )
        self._rent_spend_changed(rent.key_id)
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
        """Claim pending deliveries whose time has come (claims in memory, as for
        :meth:`due_ops`)."""
        claims = _live_claims(self._webhook_claims, now)
        async with self._db.execute(
            "SELECT id, key_id, payload, attempts, created_at FROM webhooks"
            " WHERE state='pending' AND next_at<=? ORDER BY next_at, id LIMIT ?",
            (now, limit + len(claims)),
        ) as cur:
            rows = [r for r in await cur.fetchall() if r[0] not in claims][:limit]
        for row in rows:
            claims[row[0]] = now + CLAIM_SECONDS
        return [WebhookJob(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    async def webhook_done(self, job_id: int, state: str, error: str = "") -> None:
        """Mark a delivery as delivered (or given up), and end its claim."""
        async with self._writing():
            await self._db.execute(
                "UPDATE webhooks SET state=?, attempts=attempts+1, last_error=?"
                " WHERE id=?",
                (state, error[:200], job_id),
            )
        self._webhook_claims.pop(job_id, None)

    async def webhook_failed(self, job_id: int, next_at: float, error: str) -> None:
        """Reschedule a delivery after a failed attempt, and end its claim."""
        async with self._writing():
            await self._db.execute(
                "UPDATE webhooks SET attempts=attempts+1, next_at=?, last_error=?"
                " WHERE id=?",
                (next_at, error[:200], job_id),
            )
        self._webhook_claims.pop(job_id, None)

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
