"""Shared fixtures: a steppable clock, sandbox configs, the app under test, and the
provider tests' kit (one upstream client, a fake served on a loopback port, refs)."""

from __future__ import annotations

import contextlib
import copy
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from compat_server.app import ENGINE, create_app, open_store
from compat_server.config import Config, parse_config
from compat_server.engine import Engine
from compat_server.store import Store
from fakes.common import FakeUpstream
from providers.http import UpstreamHttp
from providers.vocabulary import ActivationRef, Order, Purchase
from tests.pg import PgServer, start_server

API = "/stubs/handler_api.php"
KEY = "test-key-0123456789abcdef01234567"
OTHER_KEY = "other-key-0123456789abcdef0123456"
T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


class FakeClock:
    """A wall clock that only moves when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sandbox_raw(store_path: str, **sections: Any) -> dict[str, Any]:
    """A config mapping on the sandbox; keyword sections replace the defaults."""
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"path": store_path},
        "activation": {"lifetime": 1200, "early_cancel": 0},
        "keys": [
            {"key": KEY, "alias": "tester", "providers": ["sandbox"]},
            {"key": OTHER_KEY, "alias": "other", "providers": ["sandbox"]},
        ],
        "providers": {
            "sandbox": {
                "type": "sandbox",
                "sms_delay": 5,
                "balance": 1000,
                "poll_interval": 1,
            }
        },
    }
    raw.update(copy.deepcopy(sections))
    return raw


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def upstream_client(
    read_timeout: float = 2.0, connect_timeout: float = 1.0
) -> UpstreamHttp:
    """The upstream client providers under test are built on (``async with`` it)."""
    return UpstreamHttp(connect_timeout=connect_timeout, read_timeout=read_timeout)


@pytest.fixture
async def http() -> AsyncIterator[UpstreamHttp]:
    """The upstream client a provider under test is built on."""
    async with upstream_client() as client:
        yield client


ServeFake = Callable[[FakeUpstream], Awaitable[str]]


@pytest.fixture
def serve_fake(aiohttp_server: Any) -> ServeFake:
    """Serve a fake upstream on a free loopback port; returns its base URL."""

    async def serve(fake: FakeUpstream) -> str:
        server = await aiohttp_server(fake.app)
        return str(server.make_url("")).rstrip("/")

    return serve


def activation_ref(
    purchase: Purchase, order: Order, created_at: float
) -> ActivationRef:
    """The ref a stored activation of ``purchase`` for ``order`` hands its provider."""
    return ActivationRef(
        upstream_id=purchase.upstream_id,
        phone=purchase.phone,
        service=order.service,
        country=order.country,
        created_at=created_at,
        extra=purchase.extra,
    )


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    return str(tmp_path / "store.sqlite3")


@pytest.fixture
def config(store_path: str) -> Config:
    return parse_config(sandbox_raw(store_path))


StartApp = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def start_app(aiohttp_client: Any, clock: FakeClock) -> StartApp:
    """Start the app for a config (background loops off: tests step them)."""

    async def start(config: Config, **kwargs: Any) -> TestClient:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("background", False)
        client: TestClient = await aiohttp_client(create_app(config, **kwargs))
        return client

    return start


@pytest.fixture
async def api(start_app: StartApp, config: Config) -> TestClient:
    return await start_app(config)


def engine_of(client: TestClient) -> Engine:
    """The engine behind a test client."""
    return client.server.app[ENGINE]


async def call(client: TestClient, **params: Any) -> tuple[int, str, str]:
    """GET the dialect endpoint: (status, content type, body)."""
    params.setdefault("api_key", KEY)
    resp = await client.get(API, params={k: str(v) for k, v in params.items()})
    return resp.status, resp.content_type, await resp.text()


# ---- the store, on both implementations ----------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session (skips when PostgreSQL is missing)."""
    server = start_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def pg_url(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database of its own for the test."""
    url = await pg_server.create()
    yield url
    await pg_server.drop(url)


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which store implementation the test runs on."""
    return str(request.param)


@pytest.fixture
def store_section(
    store_kind: str, request: pytest.FixtureRequest, store_path: str
) -> dict[str, Any]:
    """The config's ``store`` section for ``store_kind`` (a fresh database)."""
    if store_kind == "sqlite":
        return {"path": store_path}
    return {"url": request.getfixturevalue("pg_url")}


@pytest.fixture
def store_config(store_section: dict[str, Any]) -> Config:
    """The sandbox config on the store under test."""
    raw = sandbox_raw("")
    raw["store"] = store_section
    return parse_config(raw)


OpenStore = Callable[[], Awaitable[Store]]


@pytest.fixture
async def open_test_store(
    store_config: Config, clock: FakeClock
) -> AsyncIterator[OpenStore]:
    """Open (again and again: a restart) the store under test; closed at the end."""
    opened: list[Store] = []

    async def open_() -> Store:
        store = await open_store(store_config, clock)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_test_store: OpenStore) -> Store:
    """The store under test, on SQLite and on PostgreSQL."""
    return await open_test_store()


async def stored_rows(config: Config, query: str) -> list[tuple[Any, ...]]:
    """Rows read through a connection of its own: what is in the database (SQLite
    or PostgreSQL), not in the server's memory."""
    if config.store_url is not None:
        conn = await asyncpg.connect(config.store_url)
        try:
            return [tuple(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()
    with contextlib.closing(sqlite3.connect(config.store_path)) as db:
        return db.execute(query).fetchall()
