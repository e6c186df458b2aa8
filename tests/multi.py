"""Several real ``sms-compat serve`` processes on one PostgreSQL, and their upstream.

:class:`Upstream` serves a fake sms-activate (``fakes.handler_api``) from a thread of
its own, so the servers under test (subprocesses) and a synchronous test can both talk
to it; it counts every call per order, can hold getNumber answers (the order is made,
the answer never leaves: a purchase in the middle) and can fail setStatus (an outbox
left to deliver). :func:`servers` starts N servers on one database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from aiohttp import web

from fakes.common import HTML_500
from fakes.handler_api import FakeSmsActivate, sms_activate_options
from tests.serving import ServeProcess, free_port

T = TypeVar("T")
KEY = "multi-key-0123456789abcdef0123456"
POLL_INTERVAL = 2.0
STATUS_ACTIONS = ("getStatus", "getStatusV2")


class HoldingClone(FakeSmsActivate):
    """sms-activate, with no early-cancel window and two switches for tests."""

    early_cancel = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.balance = self.balance * 1000
        self.holding = False  # getNumber sells, then never answers
        self.status_down = False  # setStatus answers HTTP 500 (nothing changes)
        self.hooks: list[dict[str, Any]] = []  # webhook bodies received at /hook
        self.app.router.add_post("/hook", self._hook)

    async def _hook(self, request: web.Request) -> web.Response:
        self.hooks.append(await request.json())
        return web.Response(text="ok")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        if request.method == "POST":
            params.update({k: str(v) for k, v in (await request.post()).items()})
        action = params.get("action", "")
        if action == "setStatus" and self.status_down:
            return web.Response(status=500, text=HTML_500, content_type="text/html")
        response = await super()._dispatch(request)
        if self.holding and action in ("getNumber", "getNumberV2"):
            await asyncio.sleep(3600)  # sold; the answer is held until the caller goes
        return response


class Upstream:
    """A :class:`HoldingClone` on a loopback port, run by a thread's event loop."""

    def __init__(self) -> None:
        self.fake = HoldingClone()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self.fake.app, handler_cancellation=True)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            self.loop.run_until_complete(site.start())
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10), "the fake upstream did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def read(self, fn: Callable[[HoldingClone], T]) -> T:
        """``fn(fake)`` run in the fake's thread (its state changes only there)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(self.fake))
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return done.result(10)

    def calls_for(self, order_id: str, actions: tuple[str, ...]) -> int:
        """How many calls of ``actions`` named the upstream order ``order_id``."""
        return self.read(
            lambda f: sum(
                1 for a, p in f.calls if a in actions and p.get("id") == order_id
            )
        )

    def calls_of(self, actions: tuple[str, ...]) -> int:
        """How many calls of ``actions`` the fake answered (whatever order)."""
        return self.read(lambda f: sum(1 for a, _ in f.calls if a in actions))

    def status_calls(self, order_id: str, status: str) -> int:
        return self.read(
            lambda f: sum(
                1
                for a, p in f.calls
                if a == "setStatus"
                and p.get("id") == order_id
                and p.get("status") == status
            )
        )

    def orders(self) -> dict[str, str]:
        """Upstream order id -> its state."""
        return self.read(lambda f: {i: o.state for i, o in f.orders.items()})

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        with_timeout = asyncio.run_coroutine_threadsafe(stop(), self.loop)
        try:
            with_timeout.result(10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def config(
    store_url: str,
    upstream: Upstream,
    key: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """One server's config: the shared database, the fake as provider ``clone``;
    ``key`` adds options to the one key (a budget, a webhook)."""
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"url": store_url, "pool": {"min": 1, "max": 8}},
        "activation": {"lifetime": 1200, "early_cancel": 0},
        "upstream": {"read_timeout": 60},
        "workers": {"outbox_interval": 1, "reconcile_interval": 1},
        "keys": [{"key": KEY, "alias": "multi", "providers": ["clone"], **(key or {})}],
        "providers": {
            "clone": {
                **sms_activate_options(upstream.url),
                "poll_interval": POLL_INTERVAL,
            }
        },
    }
    raw.update(sections)
    return raw


def servers(
    tmp_path: Path,
    store_url: str,
    upstream: Upstream,
    count: int = 2,
    key: dict[str, Any] | None = None,
    **sections: Any,
) -> list[ServeProcess]:
    """``count`` servers on one database, started side by side."""
    made = []
    for index in range(count):
        folder = tmp_path / f"server{index}"
        folder.mkdir(exist_ok=True)
        made.append(
            ServeProcess(folder, config(store_url, upstream, key, **sections), KEY)
        )
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda s: s.start(), made))
    return made


def sql(url: str, query: str) -> list[tuple[Any, ...]]:
    """Rows of ``query`` on the database at ``url``, through a connection of its own."""

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the test's loop may run
        return pool.submit(asyncio.run, run()).result(30)


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``check`` until true; AssertionError naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds:g}s: {what}")
