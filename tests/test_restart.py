"""Activations survive a restart of the server on the same database (SQLite file or
PostgreSQL database: the first two tests run on both)."""

from __future__ import annotations

import sqlite3

from compat_server.config import Config, key_id, parse_config
from compat_server.store import MIGRATIONS, SCHEMA_VERSION, SqliteStore
from tests.conftest import (
    KEY,
    T0,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
    stored_rows,
)

KEY_ID = key_id(KEY)


async def test_activation_survives_restart(
    store_config: Config, start_app: StartApp, clock: FakeClock
) -> None:
    config = store_config
    first = await start_app(config)
    _, _, body = await call(first, action="getNumber", service="tg", country=10)
    _, ident, phone = body.split(":")
    _, _, second_body = await call(first, action="getNumber", service="wa", country=0)
    assert await call(first, action="setStatus", id=second_body.split(":")[1], status=8) == (
        200, "text/plain", "ACCESS_CANCEL",
    )  # fmt: skip
    await first.close()

    again = await start_app(config)
    assert await call(again, action="getStatus", id=ident) == (
        200,
        "text/plain",
        "STATUS_WAIT_CODE",
    )
    assert await call(again, action="getStatus", id=second_body.split(":")[1]) == (
        200, "text/plain", "STATUS_CANCEL",
    )  # fmt: skip
    clock.advance(6)
    _, _, body = await call(again, action="getStatus", id=ident)
    stored = await engine_of(again).store.get(int(ident))
    assert stored is not None and stored.phone == phone
    assert body == f"STATUS_OK:{stored.code}"
    assert await call(again, action="setStatus", id=ident, status=6) == (
        200, "text/plain", "ACCESS_ACTIVATION",
    )  # fmt: skip
    # ids are never reused, even after a restart
    _, _, body = await call(again, action="getNumber", service="tg", country=10)
    assert body.split(":")[1] == str(int(ident) + 2)


async def test_purchase_is_committed_before_the_answer(
    store_config: Config, start_app: StartApp
) -> None:
    client = await start_app(store_config)
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    _, ident, phone = body.split(":")
    # a second, independent connection sees the row: it is on disk, not only in memory
    [row] = await stored_rows(
        store_config, f"SELECT phone, state, key_id FROM activations WHERE id={ident}"
    )
    [attempt] = await stored_rows(
        store_config, "SELECT state, activation_id FROM purchases"
    )
    assert row[0:2] == (phone, "wait_code") and len(row[2]) == 16
    assert attempt == ("confirmed", int(ident))


async def test_schema_version_is_recorded(store_path: str) -> None:
    store = await SqliteStore.open(store_path)
    try:
        assert await store.schema_version() == SCHEMA_VERSION == 4
    finally:
        await store.close()
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT value FROM meta WHERE name='version'").fetchone() == (
            "4",
        )
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_version_1_database_is_migrated(store_path: str) -> None:
    with sqlite3.connect(store_path) as db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.executescript(MIGRATIONS[1])
        db.execute("INSERT INTO meta VALUES ('version', '1')")
        db.execute(
            "INSERT INTO activations (id, key_id, provider, upstream_id, phone, service, country,"
            " operator, price, currency, cost, state, created_at, updated_at, expires_at)"
            " VALUES (100000, 'k', 'sandbox', 'u1', '84900000000', 'tg', 10, 'any', '18', 'RUB',"
            " '18', 'wait_code', 1, 1, 9999999999)"
        )
    store = await SqliteStore.open(store_path)
    try:
        assert await store.schema_version() == 4  # rents (3), columns (4) on the way
        kept = await store.get(100000)
        assert kept is not None and (kept.phone, kept.state) == (
            "84900000000",
            "wait_code",
        )
        await store.save_health("sandbox", "open", 5, 2.0)
    finally:
        await store.close()
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT * FROM health").fetchall() == [
            ("sandbox", "open", 5, 2.0)
        ]


async def test_version_3_extra_keys_become_columns(
    store_path: str, start_app: StartApp
) -> None:
    """Schema 4 moves ``_retry_mark`` and ``previous_ids`` out of the JSON ``extra``."""
    with sqlite3.connect(store_path) as db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for version in (1, 2, 3):
            db.executescript(MIGRATIONS[version])
        db.execute("INSERT INTO meta VALUES ('version', '3')")
        rows = [
            (100000, "u2", "wait_retry",
             '{"_retry_mark": "1", "previous_ids": "u0,u1", "session": "s9"}'),
            (100001, "u3", "wait_code", '{"_retry_mark": "0"}'),
            (100002, "u4", "finished", "{}"),
        ]  # fmt: skip
        for ident, upstream, state, extra in rows:
            db.execute(
                "INSERT INTO activations (id, key_id, provider, upstream_id, phone,"
                " service, country, operator, price, currency, cost, state, extra,"
                " created_at, updated_at, expires_at) VALUES (?, ?, 'sandbox', ?,"
                " '84900000000', 'tg', 10, 'any', '18', 'RUB', '18', ?, ?, ?, ?,"
                " 9999999999)",
                (ident, KEY_ID, upstream, state, extra, T0, T0),
            )
        db.execute(
            "INSERT INTO messages (activation_id, uid, text, code, received_at)"
            " VALUES (100000, 'm1', 'Telegram code 11111', '11111', ?)",
            (T0,),
        )
    store = await SqliteStore.open(store_path)
    try:
        assert await store.schema_version() == 4
        replaced = await store.get(100000)
        assert replaced is not None
        assert (replaced.retry_mark, replaced.previous_ids, replaced.extra) == (
            1, ("u0", "u1"), {"session": "s9"},
        )  # fmt: skip
        assert replaced.ref().previous_ids == ("u0", "u1")
        plain = await store.get(100001)
        assert plain is not None
        assert (plain.retry_mark, plain.previous_ids, plain.extra) == (0, (), {})
        assert await store.known_upstream_ids("sandbox") == {
            "u0",
            "u1",
            "u2",
            "u3",
            "u4",
        }
    finally:
        await store.close()
    with sqlite3.connect(store_path) as db:
        assert db.execute(
            "SELECT id, retry_mark, previous_ids, extra FROM activations ORDER BY id"
        ).fetchall() == [
            (100000, 1, "u0,u1", '{"session":"s9"}'),
            (100001, 0, "", "{}"),
            (100002, 0, "", "{}"),
        ]
    # the moved retry mark still decides the answer (the clock is at T0: the sandbox's
    # next SMS is not due), the code from before the retry
    client = await start_app(parse_config(sandbox_raw(store_path)))
    assert await call(client, action="getStatus", id=100000) == (
        200, "text/plain", "STATUS_WAIT_RETRY:11111",
    )  # fmt: skip
