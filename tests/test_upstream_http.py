"""The upstream client (providers/http.py): what was sent decides unreachable vs uncertain.

Each upstream here is a real server on loopback: a raw asyncio one where the fault is
in the bytes (close after reading the request, a stale keep-alive connection, silence,
a short body), or the project's fakes for the money rows through the whole app. Every
test counts what the upstream received, so a re-sent request would show. The fakes'
provider options set ``min_interval: 0``: these tests are about the transport, not
pacing (tests/test_pacing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from compat_server.config import parse_config
from compat_server.store import CANCELLED, UNCERTAIN
from fakes import smspva
from providers.http import UpstreamHttp
from providers.vocabulary import (
    BUDGET,
    PAID,
    Budget,
    UpstreamUncertain,
    UpstreamUnreachable,
)
from tests.conftest import KEY, FakeClock, StartApp, call, engine_of, upstream_client

TEXT = "text/plain"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Raw:
    """A raw HTTP/1.1 server: ``script(n)`` gives the bytes to answer the n-th request
    (0-based) of the server, or None to close the connection after reading it,
    ("close", bytes) to close after those bytes, "hang" to say nothing, or "drip"
    for an answer that never ends."""

    script: Callable[[int], Any]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    url: str = ""

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                head += await reader.readexactly(length)
                self.requests.append(head)
                answer = self.script(len(self.requests) - 1)
                if answer is None:
                    break
                if answer == "hang":
                    await asyncio.sleep(30)
                    break
                if answer == "drip":  # an answer that never ends, a byte at a time
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n")
                    for _ in range(300):
                        writer.write(b" ")
                        await writer.drain()
                        await asyncio.sleep(0.05)
                    break
                if isinstance(answer, tuple):  # these bytes, then close
                    writer.write(answer[1])
                    await writer.drain()
                    break
                assert isinstance(answer, bytes)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Awaitable[Raw]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Callable[[int], Any]) -> Raw:
        server = Raw(script)
        listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        servers.append(listening)
        port = listening.sockets[0].getsockname()[1]
        server.url = f"http://127.0.0.1:{port}/x"
        return server

    yield start
    for listening in servers:
        listening.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listening.wait_closed(), 1)


@contextlib.contextmanager
def paid() -> Any:
    """Run the block as a paid call (what routing sets for buy, cancel, quote)."""
    token = BUDGET.set(Budget(priority=PAID))
    try:
        yield
    finally:
        BUDGET.reset(token)


# ---- unreachable: provably nothing sent ------------------------------------------------


@pytest.mark.parametrize("is_paid", [False, True])
async def test_refused_connection_is_unreachable(
    http: UpstreamHttp, is_paid: bool
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/x"
    with contextlib.ExitStack() as stack:
        if is_paid:
            stack.enter_context(paid())
        with pytest.raises(UpstreamUnreachable) as caught:
            await http.request("up", "GET", url, params={"token": "t"})
    assert (caught.value.provider, caught.value.detail) == ("up", "ConnectError")


async def test_no_connection_within_the_connect_timeout_is_unreachable(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    """The pool's one connection is busy past connect + read timeout: the second call
    never gets a connection, so nothing of it was sent."""
    server = await raw(lambda n: "drip")
    async with UpstreamHttp(
        connect_timeout=0.1, read_timeout=0.3, max_connections=1
    ) as http:
        first = asyncio.ensure_future(http.request("up", "GET", server.url))
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamUnreachable) as caught:
            await http.request("up", "GET", server.url, params={"n": "2"})
        assert caught.value.detail == "ConnectTimeout"
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
    assert len(server.requests) == 1 and b"n=2" not in server.requests[0]


# ---- uncertain: the request may have been read ---------------------------------------


@pytest.mark.parametrize("is_paid", [False, True])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_closed_after_reading_the_request_is_uncertain_and_sent_once(
    http: UpstreamHttp, raw: Callable[..., Awaitable[Raw]], method: str, is_paid: bool
) -> None:
    """aiohttp would send a GET again after this disconnect; a GET that buys must not."""
    server = await raw(lambda n: None)
    with contextlib.ExitStack() as stack:
        if is_paid:
            stack.enter_context(paid())
        with pytest.raises(UpstreamUncertain) as caught:
            await http.request("up", method, server.url, params={"token": "t"})
    assert caught.value.detail == "ServerDisconnected"
    assert (len(server.requests), server.connections) == (1, 1)


async def test_a_stale_pooled_connection_is_uncertain_never_unreachable(
    http: UpstreamHttp, raw: Callable[..., Awaitable[Raw]]
) -> None:
    """The upstream closes a kept-alive connection as our next request arrives on it:
    it may have read the request, so the call is uncertain, and it is not re-sent."""
    server = await raw(lambda n: OK if n == 0 else None)
    assert await http.request("up", "GET", server.url) == (200, b"{}")
    with pytest.raises(UpstreamUncertain) as caught:
        await http.request("up", "GET", server.url, params={"n": "2"})
    assert caught.value.detail == "ServerDisconnected"
    assert (len(server.requests), server.connections) == (2, 1)


async def test_silence_past_the_read_timeout_is_uncertain(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    server = await raw(lambda n: "hang")
    async with upstream_client(read_timeout=0.2) as http:
        with pytest.raises(UpstreamUncertain) as caught:
            await http.request("up", "GET", server.url)
    assert caught.value.detail == "ReadTimeout"
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (b'HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"short', "PayloadError"),
        (b"HTTP/1.1 200 OK\r\nbroken header line\r\n\r\n", "RemoteProtocolError"),
        (b"<html>not http</html>\r\n\r\n", "RemoteProtocolError"),
    ],
)
async def test_a_broken_answer_is_uncertain(
    http: UpstreamHttp, raw: Callable[..., Awaitable[Raw]], answer: bytes, detail: str
) -> None:
    server = await raw(lambda n: ("close", answer))
    with pytest.raises(UpstreamUncertain) as caught:
        await http.request("up", "GET", server.url)
    assert caught.value.detail == detail
    assert len(server.requests) == 1


# ---- what goes out ------------------------------------------------------------------


async def test_paid_calls_get_a_connection_of_their_own(
    http: UpstreamHttp, aiohttp_server: Any
) -> None:
    seen: list[tuple[int, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append((id(request.transport), request.headers.get("Connection", "")))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/x", echo)
    server: TestServer = await aiohttp_server(app)
    url = str(server.make_url("/x"))
    for _ in range(3):
        assert await http.request("up", "GET", url) == (200, b'{"ok": true}')
    with paid():
        for _ in range(2):
            assert await http.request("up", "GET", url) == (200, b'{"ok": true}')
    transports = [t for t, _ in seen]
    assert len(set(transports[:3])) == 1  # polls, balances, prices: one pooled
    assert len(set(transports)) == 3  # each paid call: its own
    assert [c for _, c in seen[3:]] == ["close", "close"]


async def test_query_and_form_as_httpx_sent_them(
    http: UpstreamHttp, aiohttp_server: Any
) -> None:
    got: list[tuple[str, str, dict[str, str], str, str]] = []

    async def echo(request: web.Request) -> web.Response:
        form = dict(await request.post()) if request.method == "POST" else {}
        got.append((request.method, request.raw_path.partition("?")[2], {k: str(v) for k, v in form.items()},
                    request.headers.get("User-Agent", ""), request.headers.get("apikey", "")))  # fmt: skip
        return web.Response(status=503, text="busy")

    app = web.Application()
    app.router.add_route("*", "/x", echo)
    server: TestServer = await aiohttp_server(app)
    url = str(server.make_url("/x"))
    values = {"a": "x y+z&", "n": 7, "yes": True, "no": False, "none": None}
    assert await http.request("up", "GET", url, params=values) == (503, b"busy")
    assert await http.request(
        "up", "POST", url, data=values, headers={"apikey": "k"}
    ) == (503, b"busy")
    assert got == [
        ("GET", "a=x+y%2Bz%26&n=7&yes=true&no=false&none=", {}, "sms-compat/0.1", ""),
        ("POST", "", {"a": "x y+z&", "n": "7", "yes": "true", "no": "false", "none": ""},
         "sms-compat/0.1", "k"),
    ]  # fmt: skip


async def test_cookies_are_not_kept(http: UpstreamHttp, aiohttp_server: Any) -> None:
    cookies: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        cookies.append(request.headers.get("Cookie", ""))
        response = web.Response(text="{}")
        response.set_cookie("session", "abc")
        return response

    app = web.Application()
    app.router.add_get("/x", handler)
    server: TestServer = await aiohttp_server(app)
    for _ in range(2):
        await http.request("up", "GET", str(server.make_url("/x")))
    assert cookies == ["", ""]


async def test_proxies_from_the_environment_as_httpx_read_them(
    raw: Callable[..., Awaitable[Raw]], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await raw(lambda n: OK)
    direct = await raw(lambda n: OK)
    proxy_address = proxy.url.removesuffix("/x").replace("http://", "http://ops:pw@")
    for name in ("HTTPS_PROXY", "ALL_PROXY", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_address)
    monkeypatch.setenv("http_proxy", proxy_address)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,.internal")
    monkeypatch.setenv("no_proxy", "127.0.0.1,.internal")
    async with upstream_client() as http:
        assert await http.request("up", "GET", "http://up.example/x?a=1") == (
            200,
            b"{}",
        )
        assert await http.request("up", "GET", direct.url) == (200, b"{}")
    [through] = proxy.requests
    assert through.startswith(b"GET http://up.example/x?a=1 HTTP/1.1\r\n")
    assert b"\r\nProxy-Authorization: Basic b3BzOnB3\r\n" in through  # ops:pw
    assert direct.requests[0].startswith(b"GET /x HTTP/1.1\r\n")


async def test_closed_client_refuses_new_requests() -> None:
    http = upstream_client()
    await http.close()
    with pytest.raises(RuntimeError):
        await http.request("up", "GET", "http://127.0.0.1:1/x")
    await http.close()  # idempotent


# ---- money through the app -----------------------------------------------------------


def config_for(store_path: str, providers: dict[str, Any], route: list[str]) -> Any:
    return parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"USD": "90"}},
            "upstream": {"connect_timeout": 0.5, "read_timeout": 0.5},
            "keys": [{"key": KEY, "alias": "http", "providers": route}],
            "providers": providers,
        }
    )


SANDBOX = {"type": "sandbox", "sms_delay": 5, "balance": 1000, "poll_interval": 1,
           "countries": [10], "services": {"tg": {"price": 10, "count": 5}}}  # fmt: skip


async def test_refused_upstream_buys_nothing_and_the_next_provider_sells(
    start_app: StartApp, store_path: str, http: UpstreamHttp
) -> None:
    down = smspva.provider_options(f"http://127.0.0.1:{closed_port()}")
    client = await start_app(
        config_for(store_path, {"down": down, "sb": SANDBOX}, ["down", "sb"]),
        upstream=http,  # a client of the test's: create_app shares it
    )
    status, ctype, body = await call(
        client, action="getNumber", service="tg", country=10
    )
    assert (status, ctype, body.split(":")[0]) == (200, TEXT, "ACCESS_NUMBER")
    engine = engine_of(client)
    stored = await engine.store.get(int(body.split(":")[1]))
    assert stored is not None and stored.provider == "sb"
    attempts = await engine.store.attempts(["refused", "confirmed"])
    assert [(a.provider, a.state) for a in attempts] == [
        ("down", "refused"),
        ("sb", "confirmed"),
    ]


@pytest.mark.parametrize(
    ("fault", "bought"), [("reset", False), ("after_reset", True), ("after_hang", True)]
)
async def test_a_buy_lost_after_sending_never_falls_through(
    start_app: StartApp,
    store_path: str,
    aiohttp_server: Any,
    clock: FakeClock,
    fault: str,
    bought: bool,
) -> None:
    """The upstream read the purchase and the connection died (before or after it
    bought) or went silent: NO_NUMBERS, the next provider is never asked, the request
    went out once, and the reconciler settles it (cancels what was bought)."""
    fake = smspva.FakeSmspva(now=clock)
    server: TestServer = await aiohttp_server(fake.app)
    options = smspva.provider_options(str(server.make_url("")).rstrip("/"))
    client = await start_app(
        config_for(store_path, {"pva": options, "sb": SANDBOX}, ["pva", "sb"])
    )
    engine = engine_of(client)
    buy_path = "/activation/number/VN/opt29"
    fake.fault, fake.fault_paths, fake.hang_seconds = fault, {buy_path}, 2
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    assert fake.paths_called().count(buy_path) == 1
    assert await engine.store.count() == 0  # the sandbox was never asked
    assert [a.provider for a in await engine.store.attempts([UNCERTAIN])] == ["pva"]
    assert len(fake.orders) == (1 if bought else 0)
    fake.fault = None
    assert await engine.reconciler.step() == (1 if bought else 0)
    assert await engine.store.attempts([UNCERTAIN]) == [] or not bought
    if bought:
        [order_id] = list(fake.orders)
        [orphan] = await engine.store.for_key(
            engine.config.keys[0].key_id, open_only=False
        )
        assert (orphan.upstream_id, orphan.state) == (order_id, CANCELLED)
        assert await engine.outbox.step() == 1
        assert fake.orders[order_id].state == "cancelled"


async def test_polls_share_the_pool_and_the_buy_does_not(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake = smspva.FakeSmspva(now=clock)
    transports: list[int] = []

    @web.middleware
    async def watch(request: web.Request, handler: Any) -> web.StreamResponse:
        transports.append(id(request.transport))
        return await handler(request)

    fake.app.middlewares.append(watch)
    server: TestServer = await aiohttp_server(fake.app)
    options = {
        **smspva.provider_options(str(server.make_url("")).rstrip("/")),
        "poll_interval": 0,  # about connections, not the poll throttle
    }
    client = await start_app(config_for(store_path, {"pva": options}, ["pva"]))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith("ACCESS_NUMBER:")
    paid_calls = len(transports)
    ident = body.split(":")[1]
    for _ in range(3):
        clock.advance(6)  # smspva polls at most every 5 s
        assert await call(client, action="getStatus", id=ident) == (
            200,
            TEXT,
            "STATUS_WAIT_CODE",
        )
    polls = transports[paid_calls:]
    assert len(polls) == 3 and len(set(polls)) == 1
    assert len(set(transports[:paid_calls])) == paid_calls  # one connection each
    assert not set(polls) & set(transports[:paid_calls])
