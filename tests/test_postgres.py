"""Several servers on one PostgreSQL database: two PostgresStore instances are two
servers. A real PostgreSQL server (tests/pg.py): ids, locks, leases, claims, dead
servers' attempts, migrations and an outage (the server stopped and started again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from compat_server.config import describe, parse_config
from compat_server.logs import secrets_of
from compat_server.store import (
    CANCELLED,
    CLAIM_SECONDS,
    CODE,
    DEAD_AFTER,
    PENDING,
    WAIT_CODE,
    StoreError,
)
from compat_server.store.postgres import PG_SCHEMA_VERSION, PostgresStore, masked_url
from providers.vocabulary import ConfigError, Sms
from tests.conftest import (
    KEY,
    T0,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
)
from tests.pg import PgServer
from tests.test_store_battery import FIRST, ORDER, bought, buy

TEXT = "text/plain"
Open = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def servers(pg_url: str, clock: FakeClock) -> AsyncIterator[Open]:
    """Open PostgresStores (servers) on the test's database; closed at the end."""
    opened: list[PostgresStore] = []

    async def open_(**kwargs: Any) -> PostgresStore:
        store = await PostgresStore.open(pg_url, clock, **kwargs)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


async def rows(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read through a connection of its own (what any other server would see)."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def test_ids_are_unique_under_concurrent_purchases_on_two_servers(
    servers: Open,
) -> None:
    a, b = await servers(), await servers()

    async def one(store: PostgresStore, n: int) -> int:
        return (await buy(store, n)).id

    ids = await asyncio.gather(*(one((a, b)[n % 2], n) for n in range(40)))
    assert sorted(ids) == list(range(FIRST, FIRST + 40))

    from compat_server.store import FIRST_RENT_ID
    from providers.vocabulary import RentPurchase

    async def rent(store: PostgresStore, n: int) -> int:
        attempt = await store.begin_rent_attempt("k1", "pva", "rent", {}, 4, T0)
        bought = RentPurchase(f"r{n}", f"849{n:08d}", Decimal("3"), T0 + 3600)
        return (
            await store.complete_rent(
                attempt, "k1", "pva", "USD", "tg", 10, bought, Decimal("2.5"), T0
            )
        ).id

    rents = await asyncio.gather(*(rent((a, b)[n % 2], n) for n in range(20)))
    assert sorted(rents) == list(range(FIRST_RENT_ID, FIRST_RENT_ID + 20))


async def test_an_activation_bought_on_one_is_read_and_changed_by_the_other(
    servers: Open,
) -> None:
    a, b = await servers(), await servers()
    bought_on_a = await buy(a, 1)
    seen_on_b = await b.get(bought_on_a.id)
    assert seen_on_b is not None and seen_on_b is not bought_on_a
    assert (seen_on_b.phone, seen_on_b.state) == (bought_on_a.phone, WAIT_CODE)
    async with b.lock(seen_on_b.id):
        await b.add_messages(seen_on_b, [Sms("m1", "code 777", "777", T0 + 3)])
    # a's object is stale until a reads it again: under the lock, or by get
    assert bought_on_a.state == WAIT_CODE
    async with a.lock(bought_on_a.id):
        assert (bought_on_a.state, bought_on_a.code) == (CODE, "777")
        await a.set_state(bought_on_a, CANCELLED, T0 + 4, outbox="cancel")
    assert await b.get(seen_on_b.id) is seen_on_b
    assert seen_on_b.state == CANCELLED
    assert await b.pending_ops() == [(FIRST, "cancel", 0, "")]


async def test_the_open_set_follows_the_other_servers_writes(servers: Open) -> None:
    a, b = await servers(), await servers()
    activation = await buy(a, 1)
    assert [x.id for x in a.open_activations()] == [FIRST]  # its own: at once
    assert b.open_activations() == []
    await b._refresh_open()  # what b's watch loop does every WATCH_INTERVAL
    assert [x.id for x in b.open_activations()] == [FIRST]
    await a.set_state(activation, CANCELLED, T0 + 1)
    await b._refresh_open()
    assert b.open_activations() == []


async def test_the_lock_serialises_across_servers(servers: Open) -> None:
    a, b = await servers(), await servers()
    activation = await buy(a, 1)
    events: list[str] = []
    entered = asyncio.Event()

    async def hold_on_a() -> None:
        async with a.lock(activation.id):
            events.append("a in")
            entered.set()
            await asyncio.sleep(0.2)
            events.append("a out")

    async def then_b() -> None:
        await entered.wait()
        async with b.lock(activation.id):
            events.append("b in")

    await asyncio.gather(hold_on_a(), then_b())
    assert events == ["a in", "a out", "b in"]


async def test_a_lease_is_taken_once_across_servers(servers: Open) -> None:
    stores = [await servers() for _ in range(3)]
    taken = await asyncio.gather(
        *(s.lease("poll:100000", 3.0, T0) for s in stores for _ in range(4))
    )
    assert sorted(taken) == [False] * 11 + [True]
    assert await stores[1].lease("poll:100000", 3.0, T0 + 3) is True


async def test_due_ops_are_claimed_once_under_concurrency(
    servers: Open, pg_url: str
) -> None:
    a, b = await servers(), await servers()
    activation = await buy(a, 1)
    for _ in range(30):
        await a.enqueue(activation.id, "cancel", T0)
    batches = await asyncio.gather(
        *(s.due_ops(T0, limit=7) for s in (a, b) for _ in range(3))
    )
    claimed = [op.id for batch in batches for op in batch]
    assert len(claimed) == len(set(claimed)) == 30
    assert await a.due_ops(T0 + 1) == [] and await b.due_ops(T0 + 1) == []
    # a claimer killed with -9 never answers: its claims run out, another delivers
    again = await b.due_ops(T0 + CLAIM_SECONDS, limit=100)
    assert sorted(op.id for op in again) == sorted(claimed)
    await b.op_done(again[0].id)
    assert len(await rows(pg_url, "SELECT id FROM outbox WHERE done=0")) == 29


async def test_webhooks_are_claimed_once(servers: Open) -> None:
    a, b = await servers(), await servers()
    activation = await buy(a, 1)
    sms = [Sms(f"m{i}", "code", str(i), T0 + i) for i in range(10)]
    await a.add_messages(
        activation, sms, lambda new: [("k1", f"src:{m.uid}", {}) for m in new]
    )
    batches = await asyncio.gather(a.due_webhooks(T0 + 20), b.due_webhooks(T0 + 20))
    claimed = [job.id for batch in batches for job in batch]
    assert len(claimed) == len(set(claimed)) == 10


async def test_pending_attempts_of_a_dead_server_go_to_another(
    servers: Open, clock: FakeClock
) -> None:
    a, b = await servers(), await servers()
    attempt = await a.begin_purchase("k1", "sandbox", ORDER, T0)
    # a is alive: its paid call may be in flight, b must leave the attempt alone
    assert [x.id for x in await a.attempts([PENDING])] == [attempt]
    assert await b.attempts([PENDING]) == []
    clock.advance(DEAD_AFTER - 1)
    await b.heartbeat(clock())
    assert await b.attempts([PENDING]) == []
    clock.advance(2)  # a has been silent for longer than DEAD_AFTER (killed with -9)
    [taken] = await b.attempts([PENDING])
    assert (taken.id, taken.key_id, taken.order) == (attempt, "k1", ORDER)
    # b reconciles it: the number found upstream gets the id the attempt set aside
    found = await b.complete_purchase(attempt, bought(1))
    assert found.id == FIRST
    assert await b.attempts([PENDING]) == []


async def test_pending_attempts_of_a_killed_server_go_to_another_at_once(
    servers: Open,
) -> None:
    a, b = await servers(), await servers()
    attempt = await a.begin_purchase("k1", "sandbox", ORDER, T0)
    assert await b.attempts([PENDING]) == []
    # kill -9: the kernel closes its sockets, PostgreSQL ends its sessions and their
    # locks; its heartbeat is fresh, but its liveness lock is gone
    assert a._locker is not None
    a._locker.terminate()
    for _ in range(100):
        if await b.attempts([PENDING]):
            break
        await asyncio.sleep(0.01)  # the backend notices the closed socket
    assert [x.id for x in await b.attempts([PENDING])] == [attempt]
    await a.heartbeat(T0)  # alive after all: it takes its lock again
    assert await b.attempts([PENDING]) == []


async def test_a_server_that_stops_leaves_its_attempts_at_once(servers: Open) -> None:
    a, b = await servers(), await servers()
    attempt = await a.begin_purchase("k1", "sandbox", ORDER, T0)
    assert await b.attempts([PENDING]) == []
    await a.close()
    assert [x.id for x in await b.attempts([PENDING])] == [attempt]


async def test_migrations_run_once_when_servers_start_together(
    pg_url: str, clock: FakeClock
) -> None:
    stores = await asyncio.gather(
        *(PostgresStore.open(pg_url, clock) for _ in range(4))
    )
    try:
        assert [await s.schema_version() for s in stores] == [PG_SCHEMA_VERSION] * 4
        assert await rows(
            pg_url, "SELECT version FROM schema_version ORDER BY version"
        ) == [(v,) for v in range(1, PG_SCHEMA_VERSION + 1)]
        ids = await asyncio.gather(*(buy(s, n) for n, s in enumerate(stores)))
        assert sorted(a.id for a in ids) == list(range(FIRST, FIRST + 4))
    finally:
        for store in stores:
            await store.close()


async def test_budgets_read_every_servers_spend(servers: Open) -> None:
    a, b = await servers(), await servers()
    await buy(a, 1)
    assert await b.spent("k1") == Decimal("20.25")
    await buy(b, 2)
    assert await a.spent("k1") == Decimal("40.50")


# ---- an outage: the PostgreSQL server stopped, then started again ---------------------


@pytest.fixture
def owned(pg_server: PgServer) -> PgServer:
    if not pg_server.owned:
        pytest.skip("SMS_COMPAT_TEST_PG_URL names a server this session cannot stop")
    return pg_server


async def test_an_outage_refuses_purchases_holds_bought_numbers_and_recovers(
    owned: PgServer,
    servers: Open,
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = await servers(busy_timeout=1.0)
    attempt = await store.begin_purchase("k1", "sandbox", ORDER, T0)  # the paid call
    caplog.set_level(logging.INFO, "compat_server")
    owned.stop()
    try:
        with pytest.raises(StoreError):  # before a paid call: nothing may be bought
            await store.begin_purchase("k1", "sandbox", ORDER, T0)
        assert await store.writable() is False
        assert await store.lease("poll:1", 3.0, T0) is False  # never raises
        # after the paid call: the number is the client's, held in memory
        held = await store.complete_purchase(attempt, bought(1), hold=True)
        assert held.id == FIRST
        assert await store.get(FIRST) is held
        assert [a.id for a in store.open_activations()] == [FIRST]
        assert await store.flush() == 1
    finally:
        owned.start()
    assert await store.flush() == 0  # the pool reconnects by itself
    assert await store.writable() is True
    assert await rows(pg_url, "SELECT id, upstream_id, state FROM activations") == [
        (FIRST, "u1", WAIT_CODE)
    ]
    assert await rows(pg_url, "SELECT state, activation_id FROM purchases") == [
        ("confirmed", FIRST)
    ]
    assert (await buy(store, 2)).id == FIRST + 1
    shown = masked_url(pg_url)
    port = urlsplit(pg_url).port
    down = f"[Errno 111] Connect call failed ('127.0.0.1', {port})"
    assert [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("store ")
    ] == [
        ("ERROR", f"store {shown} cannot be written: {down}"),
        (
            "WARNING",
            f"store {shown}: id={FIRST} provider=sandbox bought but not stored"
            f" ({down}): held in memory until the store takes it",
        ),
        ("WARNING", f"store {shown} is writable again"),
        ("WARNING", f"store {shown}: id={FIRST} held in memory is now stored"),
    ]


def with_password(url: str, password: str) -> str:
    """``url`` with a password (the test server trusts any)."""
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()


async def test_the_app_answers_dialect_tokens_through_an_outage(
    owned: PgServer,
    pg_url: str,
    start_app: StartApp,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = sandbox_raw("")
    raw["store"] = {"url": with_password(pg_url, "pw-Secret-77"), "busy_timeout": 1.0}
    raw["providers"]["sandbox"]["sms_delay"] = 100  # no SMS during the outage
    client = await start_app(parse_config(raw))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith(f"ACCESS_NUMBER:{FIRST}:")
    clock.advance(6)  # polls go on during the outage (no SMS is due yet)
    owned.stop()
    try:
        assert await call(client, action="getNumber", service="tg", country=10) == (
            200,
            TEXT,
            "NO_NUMBERS",
        )
        # what was sold is served from memory meanwhile
        assert await call(client, action="getStatus", id=FIRST) == (
            200,
            TEXT,
            "STATUS_WAIT_CODE",
        )
        # a read the store cannot answer is the dialect's token, not a traceback
        assert await call(client, action="getActiveActivations") == (
            200,
            TEXT,
            "ERROR_SQL",
        )
        assert "unexpected error" not in caplog.text
        resp = await client.get("/readyz")
        assert (resp.status, (await resp.json())["store"]) == (503, "not writable")
        metrics = await (await client.get("/metrics")).text()
    finally:
        owned.start()
    resp = await client.get("/readyz")
    assert (resp.status, (await resp.json())["store"]) == (200, "writable")
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith(f"ACCESS_NUMBER:{FIRST + 1}:")
    metrics += await (await client.get("/metrics")).text()
    assert "pw-Secret-77" not in caplog.text + metrics
    assert f"store {masked_url(pg_url)} cannot be written" in caplog.text


# ---- two apps on one database ---------------------------------------------------------


async def test_two_servers_serve_each_others_activations(
    pg_url: str, start_app: StartApp, clock: FakeClock
) -> None:
    raw = sandbox_raw("")
    raw["store"] = {"url": pg_url}
    first = await start_app(parse_config(raw))
    second = await start_app(parse_config(raw))
    _, _, body = await call(first, action="getNumber", service="tg", country=10)
    _, ident, _ = body.split(":")
    assert await call(second, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_WAIT_CODE",
    )
    assert await call(second, action="setStatus", id=ident, status=8) == (
        200,
        TEXT,
        "ACCESS_CANCEL",
    )
    assert await call(first, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_CANCEL",
    )
    _, _, body = await call(second, action="getNumber", service="tg", country=10)
    assert body.startswith(f"ACCESS_NUMBER:{int(ident) + 1}:")
    assert engine_of(first).store.server_id != engine_of(second).store.server_id


# ---- config ---------------------------------------------------------------------------


def test_store_url_config_masks_the_password_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = sandbox_raw("")
    raw["store"] = {
        "url": "postgresql://sms:s3cr3t-pw@db.internal:6432/sms",
        "pool": {"min": 2, "max": 20},
    }
    config = parse_config(raw)
    assert (config.store_url, config.store_pool_min, config.store_pool_max) == (
        "postgresql://sms:s3cr3t-pw@db.internal:6432/sms", 2, 20,
    )  # fmt: skip
    text = describe(config)
    assert "store: postgresql://****@db.internal:6432/sms pool=2..20" in text
    assert "s3cr3t-pw" not in text and "s3cr3t-pw" not in repr(config)
    assert "s3cr3t-pw" in secrets_of(config) and "sms" not in secrets_of(config)
    assert (
        masked_url(config.store_url or "") == "postgresql://****@db.internal:6432/sms"
    )


@pytest.mark.parametrize(
    ("store", "error"),
    [
        (
            {"url": "postgresql://u:pw@h/db", "path": "x.sqlite3"},
            "store: url and path are both set (url: PostgreSQL, path: SQLite); keep one",
        ),
        (
            {"url": "mysql://u:pw@h/db"},
            "store.url: must be postgresql://user:password@host:port/database,"
            " got mysql://****@h/db",
        ),
        (
            {"url": "postgresql://h/db", "pool": {"min": 1, "most": 3}},
            "store.pool.most: unknown option (known: max, min)",
        ),
        (
            {"url": "postgresql://h/db", "pool": {"min": 5, "max": 3}},
            "store.pool: min 5 is more than max 3",
        ),
        (
            {"path": "x.sqlite3", "pool": {"max": 3}},
            "store.pool: only with store.url (a PostgreSQL store)",
        ),
        (
            {"url": "postgresql://u:pw@h/db?sslmode=require&timeout=3"},
            "store.url: unknown parameter timeout (known: host, sslmode)",
        ),
        (
            {"uri": "postgresql://h/db"},
            "store.uri: unknown option (known: busy_timeout, path, pool, url)",
        ),
    ],
)
def test_store_config_errors_are_one_clear_line(
    store: dict[str, Any], error: str
) -> None:
    raw = sandbox_raw("")
    raw["store"] = store
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert str(caught.value) == error


def test_the_password_may_come_from_the_environment(tmp_path: Any) -> None:
    from compat_server.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(
        "store: {url: 'postgresql://sms:${PG_PASSWORD}@127.0.0.1:5432/sms'}\n"
        f"keys: [{{key: {KEY}, providers: [sandbox]}}]\n"
        "providers: {sandbox: {type: sandbox}}\n"
    )
    config = load_config(path, env={"PG_PASSWORD": "from-env"})
    assert config.store_url == "postgresql://sms:from-env@127.0.0.1:5432/sms"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == "store.url: environment variable PG_PASSWORD is not set"


async def test_an_unreachable_database_is_one_line_without_the_password(
    clock: FakeClock,
) -> None:
    from tests.pg import free_port

    url = f"postgresql://sms:hunter22@127.0.0.1:{free_port()}/sms"
    with pytest.raises(StoreError) as caught:
        await PostgresStore.open(url, clock, busy_timeout=1.0)
    message = str(caught.value)
    assert message.startswith(f"store postgresql://****@127.0.0.1:{url.split(':')[3]}")
    assert "hunter22" not in message and "\n" not in message


async def test_check_config_ping_reads_circuits_without_showing_the_password(
    servers: Open, pg_url: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from compat_server.cli import main

    store = await servers()
    await store.save_health("sb", "open", 5, T0)
    parts = urlsplit(pg_url)  # the test server trusts any password: give one
    url = parts._replace(netloc=f"postgres:sekret-pw@{parts.hostname}:{parts.port}")
    path = tmp_path / "config.yaml"
    path.write_text(
        f"store: {{url: '{url.geturl()}', pool: {{min: 1, max: 4}}}}\n"
        "providers: {sb: {type: sandbox, balance: 50}}\n"
        "keys: [{key: k, providers: [sb]}]\n"
    )
    assert await asyncio.to_thread(main, ["check-config", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert f"store: {masked_url(url.geturl())} pool=1..4\n" in shown
    ping = ["check-config", "--config", str(path), "--ping"]
    assert await asyncio.to_thread(main, ping) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith(
        "sb: reachable, token accepted, balance 50.0 RUB = 50.00 RUB, circuit open since"
    )
    assert "sekret-pw" not in shown + out


async def test_the_pool_is_sized_by_the_config(
    pg_url: str, start_app: StartApp
) -> None:
    raw = sandbox_raw("")
    raw["store"] = {"url": pg_url, "pool": {"min": 2, "max": 3}}
    client = await start_app(parse_config(raw))
    store = engine_of(client).store
    assert isinstance(store, PostgresStore)
    pool = store._pool
    assert (pool.get_min_size(), pool.get_max_size()) == (2, 3)
    bodies = await asyncio.gather(
        *(call(client, action="getBalance") for _ in range(20))
    )  # more requests than connections: they wait for one, none fails
    assert {body for _, _, body in bodies} == {"ACCESS_BALANCE:1000.00"}


def test_without_postgresql_the_tests_skip_or_fail_as_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests import pg

    monkeypatch.setattr(pg, "binaries", lambda: None)
    monkeypatch.delenv("SMS_COMPAT_TEST_PG_URL", raising=False)
    monkeypatch.delenv("SMS_COMPAT_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        pg.start_server()
    assert str(skipped.value) == "PostgreSQL not installed: apt-get install postgresql"
    monkeypatch.setenv("SMS_COMPAT_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        pg.start_server()
    assert str(failed.value) == (
        "PostgreSQL not installed: apt-get install postgresql"
        " (SMS_COMPAT_REQUIRE_POSTGRES=1)"
    )
    monkeypatch.setenv("SMS_COMPAT_TEST_PG_URL", "postgresql://u@db.example/x")
    given = pg.start_server()
    assert (given.admin_url, given.owned) == ("postgresql://u@db.example/x", False)


def test_serve_on_an_unreachable_database_exits_with_one_line(tmp_path: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from tests.pg import free_port

    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {free_port()}}}\n"
        f"store: {{url: 'postgresql://sms:pw-Nowhere-9@127.0.0.1:{port}/sms',"
        " busy_timeout: 1}\n"
        f"keys: [{{key: {KEY}, providers: [sandbox]}}]\n"
        "providers: {sandbox: {type: sandbox}}\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "compat_server", "serve", "--config", str(config)],
        cwd=root, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"sms-compat: store postgresql://****@127.0.0.1:{port}/sms cannot be used:"
        " [Errno 111] Connection refused\n"  # the same on asyncio and uvloop
    )


def test_a_store_url_may_name_a_socket_directory_and_tls() -> None:
    from compat_server.store.postgres import Target

    target = Target.parse(
        "postgresql://sms:pw@/sms?host=/run/postgresql&sslmode=require"
    )
    assert target.connect_args() == {
        "host": "/run/postgresql",
        "port": 5432,
        "user": "sms",
        "password": "pw",
        "database": "sms",
        "ssl": "require",
    }
    assert target.shown == "postgresql://****@/sms?host=/run/postgresql&sslmode=require"
    assert "pw" not in repr(target)
    with pytest.raises(StoreError) as caught:
        Target.parse("postgresql://h/db?password=pw-in-query&sslmode=disable")
    assert str(caught.value) == (
        "store postgresql://h/db?sslmode=disable: unknown URL parameter password"
        " (known: host, sslmode)"
    )


async def test_a_write_that_commits_late_still_reaches_the_open_set(
    servers: Open, pg_url: str
) -> None:
    """A stamp is drawn when a write starts and seen when it commits: a slow
    transaction may commit a lower stamp after a higher one was read."""
    a, b = await servers(), await servers()
    early, late = await buy(a, 1), await buy(a, 2)
    await b._refresh_open()
    await b._refresh_open()
    assert sorted(x.id for x in b.open_activations()) == [early.id, late.id]
    slow = await asyncpg.connect(pg_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute(  # another server's write, stamped first, committed last
            "UPDATE activations SET state='cancelled', changed=nextval('changes')"
            " WHERE id=$1",
            early.id,
        )
        await a.set_state(late, CANCELLED, T0 + 1)  # stamped after, committed first
        await b._refresh_open()
        assert [x.id for x in b.open_activations()] == [early.id]
        await transaction.commit()
    finally:
        await slow.close()
    await b._refresh_open()  # the round behind reads it
    assert b.open_activations() == []
