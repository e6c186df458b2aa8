"""The HTTP edge as the world sends it: bodies in several TCP segments, chunked bodies,
oversized bodies, and methods other than GET and POST.

Every request here is written by a raw asyncio socket client to the app on a loopback
port, in the segments a slow or busy network delivers (50 ms apart), so the server's
parser sees exactly what the field sees. The sandbox sells tg at 18.00 RUB: a getNumber
whose maxPrice (1) is honoured answers NO_NUMBERS and buys nothing, one whose limit was
lost buys. What was bought is read from the sandbox and the store, not inferred.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from compat_server.app import ENGINE, create_app
from compat_server.config import parse_config
from compat_server.dialect import MAX_BODY
from compat_server.engine import Engine
from tests.conftest import API, KEY, FakeClock, sandbox_raw

GAP = 0.05  # seconds between two writes of one request
BUY = f"api_key={KEY}&action=getNumber&service=tg&country=10"
BALANCE = "ACCESS_BALANCE:1000.00"


@pytest.fixture
async def server(aiohttp_server: Any, config: Any, clock: FakeClock) -> TestServer:
    srv: TestServer = await aiohttp_server(
        create_app(config, clock=clock, background=False), host="127.0.0.1"
    )
    return srv


@pytest.fixture
async def quick(aiohttp_server: Any, store_path: str, clock: FakeClock) -> TestServer:
    """A server whose body_timeout is 0.3 s instead of 10 s: the tests that use it are
    about what happens when it runs out."""
    server = {"host": "127.0.0.1", "port": 0, "body_timeout": 0.3}
    config = parse_config(sandbox_raw(store_path, server=server))
    srv: TestServer = await aiohttp_server(
        create_app(config, clock=clock, background=False), host="127.0.0.1"
    )
    return srv


def engine(server: TestServer) -> Engine:
    return server.app[ENGINE]


async def bought(server: TestServer) -> tuple[int, int]:
    """(orders the sandbox sold, activations in the store)."""
    eng = engine(server)
    return len(eng.providers["sandbox"]._orders), await eng.store.count()  # type: ignore[attr-defined]


class Answer:
    """One raw HTTP response: status, headers (lower-case names), body."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.body = body
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def text(self) -> str:
        return self.body.decode()

    @classmethod
    async def read(cls, reader: asyncio.StreamReader, method: str = "POST") -> Answer:
        """Head, then Content-Length bytes of body (none for HEAD); not until EOF:
        after an answer to a body it refused, aiohttp may linger reading the rest."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        answer = cls(head[:-4], b"")
        if method != "HEAD":
            length = int(answer.headers["content-length"])
            answer.body = await asyncio.wait_for(reader.readexactly(length), 5)
        return answer


async def send(
    server: TestServer, head: str, *parts: bytes, gap: float = GAP
) -> Answer:
    """Write the request head and then each body part, ``gap`` seconds apart."""
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head.encode("latin-1"))
        await writer.drain()
        for part in parts:
            await asyncio.sleep(gap)
            try:
                writer.write(part)
                await writer.drain()
            except ConnectionError:  # the server answered early and closed
                break
        return await Answer.read(reader, head.split(" ", 1)[0])
    finally:
        writer.close()


def post_head(
    length: int | None, content_type: str = "application/x-www-form-urlencoded"
) -> str:
    size = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (
        f"POST {API} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\n{size}\r\n\r\n"
    )


async def post_split(
    server: TestServer, body: str, *cuts: int, content_type: str = ""
) -> Answer:
    """POST ``body`` with Content-Length, cut into segments at ``cuts``."""
    data = body.encode()
    bounds = [0, *cuts, len(data)]
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    head = post_head(len(data), content_type or "application/x-www-form-urlencoded")
    return await send(server, head, *parts)


def chunked(*pieces: bytes) -> list[bytes]:
    """Each piece as one chunk, then the last chunk."""
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


def assert_token(answer: Answer, body: str) -> None:
    assert (answer.status, answer.headers["content-type"], answer.text) == (
        200,
        "text/plain; charset=utf-8",
        body,
    )


# ---- item 1: the whole body, whatever its segmentation -------------------------------


async def test_max_price_in_a_later_segment_is_honoured(server: TestServer) -> None:
    body = BUY + "&maxPrice=1"
    assert_token(await post_split(server, body, len(BUY)), "NO_NUMBERS")
    assert await bought(server) == (0, 0)
    # the same request in one segment, without the limit, does buy: the price is real
    answer = await post_split(server, BUY)
    assert answer.text.startswith("ACCESS_NUMBER:")
    assert await bought(server) == (1, 1)


@pytest.mark.parametrize(
    "cut",
    ["action=getBalance&", "action=getBalance&api_key=", "action=getBalance&api_key=te"],
    ids=["before-key", "after-name", "inside-key"],
)
async def test_key_in_a_later_segment_is_read(server: TestServer, cut: str) -> None:
    body = f"action=getBalance&api_key={KEY}"
    assert_token(await post_split(server, body, len(cut)), BALANCE)


async def test_json_body_in_three_segments(server: TestServer) -> None:
    body = json.dumps(
        {"api_key": KEY, "action": "getNumber", "service": "tg", "country": 10,
         "maxPrice": 1}
    )  # fmt: skip
    answer = await post_split(server, body, 7, 30, content_type="application/json")
    assert_token(answer, "NO_NUMBERS")
    assert await bought(server) == (0, 0)
    balance = json.dumps({"api_key": KEY, "action": "getBalance"})
    answer = await post_split(server, balance, 5, content_type="application/json")
    assert_token(answer, BALANCE)


async def test_multipart_body_in_segments(server: TestServer) -> None:
    fields = {"api_key": KEY, "action": "getNumber", "service": "tg", "country": "10",
              "maxPrice": "1"}  # fmt: skip
    body = "".join(
        f'--XyZ\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ) + "--XyZ--\r\n"
    cut = body.index("maxPrice") + 3
    answer = await post_split(
        server, body, 20, cut, content_type="multipart/form-data; boundary=XyZ"
    )
    assert_token(answer, "NO_NUMBERS")
    assert await bought(server) == (0, 0)


async def test_chunked_body_in_segments(server: TestServer) -> None:
    parts = chunked(BUY[:20].encode(), BUY[20:].encode(), b"&maxPrice=1")
    assert_token(await send(server, post_head(None), *parts), "NO_NUMBERS")
    assert await bought(server) == (0, 0)
    parts = chunked(b"action=getBal", f"ance&api_key={KEY}".encode())
    assert_token(await send(server, post_head(None), *parts), BALANCE)


async def test_body_of_exactly_the_limit_is_read(server: TestServer) -> None:
    start = f"action=getBalance&api_key={KEY}&pad="
    body = start + "a" * (MAX_BODY - len(start))
    assert len(body) == MAX_BODY
    assert_token(await post_split(server, body, 1000, 40_000), BALANCE)
    assert_token(await post_split(server, body + "b", 1000, 40_000), "ERROR_SQL")


async def test_a_megabyte_form_does_not_get_past(server: TestServer) -> None:
    """Declared (Content-Length) or not (chunked), 1 MB never buys: ERROR_SQL at once."""
    padding = "&pad=" + "a" * (1 << 20)
    answer = await post_split(server, BUY + padding, 4000, 60_000)
    assert_token(answer, "ERROR_SQL")
    # the limit is in a later segment and the body is cut below 64 KiB in the first
    answer = await post_split(server, BUY + "&maxPrice=1" + padding, 10, 30_000)
    assert_token(answer, "ERROR_SQL")
    pieces = [BUY.encode()] + [padding[i : i + 32_768].encode() for i in range(0, len(padding), 32_768)]  # fmt: skip
    answer = await send(server, post_head(None), *chunked(*pieces), gap=0.005)
    assert_token(answer, "ERROR_SQL")
    assert await bought(server) == (0, 0)


# ---- item 2: only GET and POST run actions --------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "PROPFIND"])
async def test_other_methods_get_405_and_buy_nothing(
    server: TestServer, method: str
) -> None:
    head = (
        f"{method} {API}?{BUY} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(BUY)}\r\n\r\n"
    )
    answer = await send(server, head, BUY.encode())
    assert (answer.status, answer.headers["allow"]) == (405, "GET, POST")
    assert answer.body == (b"" if method == "HEAD" else b"405: Method Not Allowed")
    assert await bought(server) == (0, 0)


async def test_cors_preflight_is_refused(server: TestServer) -> None:
    """A browser's preflight gets no CORS grant: no page may drive a key's purchases."""
    head = (
        f"OPTIONS {API}?{BUY} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        "Origin: https://example.org\r\nAccess-Control-Request-Method: GET\r\n\r\n"
    )
    answer = await send(server, head)
    assert (answer.status, answer.headers["allow"]) == (405, "GET, POST")
    assert not [h for h in answer.headers if h.startswith("access-control-")]
    assert await bought(server) == (0, 0)


async def test_get_and_post_still_run(server: TestServer) -> None:
    head = f"GET {API}?api_key={KEY}&action=getBalance HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert_token(await send(server, head), BALANCE)
    # POST with every parameter in the query string and an empty body (aiosmsactivate)
    head = f"POST {API}?api_key={KEY}&action=getBalance HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert_token(await send(server, head), BALANCE)


async def test_broken_chunked_body_is_bad_input(
    quick: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk size that is not hex, after a good chunk: ERROR_SQL, no traceback.

    aiohttp leaves the body read waiting forever here, so the answer comes when
    server.body_timeout runs out (0.3 s on this server)."""
    parts = [*chunked(BUY.encode())[:1], b"zz\r\n&maxPrice=1\r\n0\r\n\r\n"]
    assert_token(await send(quick, post_head(None), *parts), "ERROR_SQL")
    assert await bought(quick) == (0, 0)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40]


async def test_a_body_that_never_ends_is_answered(quick: TestServer) -> None:
    """Content-Length promises more than comes: ERROR_SQL after server.body_timeout
    (0.3 s on this server, to keep the test short), and nothing bought."""
    assert quick.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.port)
    writer.write((post_head(len(BUY) + 100) + BUY).encode())
    started = asyncio.get_running_loop().time()
    answer = await Answer.read(reader)
    writer.close()
    assert_token(answer, "ERROR_SQL")
    assert 0.3 <= asyncio.get_running_loop().time() - started < 2
    assert await bought(quick) == (0, 0)


def test_real_serve_process_reads_split_bodies_and_refuses_head(tmp_path: Any) -> None:
    """The same through ``sms-compat serve`` (its own listener and connection gate):
    a maxPrice in the second segment holds, HEAD gets 405, nothing is bought."""
    import socket
    import time as clock_time

    from tests.serving import ServeProcess

    raw = sandbox_raw(str(tmp_path / "store.sqlite3"))
    raw["server"] = {"host": "127.0.0.1"}
    serve = ServeProcess(tmp_path, raw, KEY).start()

    def exchange(*parts: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", serve.port), timeout=5) as sock:
            for part in parts:
                sock.sendall(part)
                clock_time.sleep(GAP)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return data

    try:
        body = BUY + "&maxPrice=1"
        head = post_head(len(body))
        answer = exchange(head.encode() + BUY.encode(), b"&maxPrice=1")
        assert answer.endswith(b"\r\n\r\nNO_NUMBERS"), answer
        answer = exchange(f"HEAD {API}?{BUY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), answer
        assert b"\r\nAllow: GET, POST\r\n" in answer
        assert serve.get("action=getActiveActivations") == (
            '{"status":"error","error":"NO_ACTIVATIONS"}'
        )
        assert serve.get("action=getBalance") == BALANCE
    finally:
        serve.stop()
