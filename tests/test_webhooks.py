"""Webhooks: sms-activate's JSON POSTed to the key's own URL when an SMS arrives, from
the store's queue (a restart loses none), retried with backoff until a 200, never
again after it, never from inside a client's request."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from compat_server.app import create_app
from compat_server.config import ConfigError, parse_config
from compat_server.engine import Engine
from compat_server.webhooks import MAX_ATTEMPTS
from tests.conftest import KEY, OTHER_KEY, FakeClock, call, engine_of, sandbox_raw


class Receiver:
    """A webhook receiver on loopback: answers ``statuses`` in turn, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.seen: list[tuple[str, str, Any]] = []  # (method, content type, JSON)
        self.app = web.Application()
        self.app.router.add_route("*", "/hook", self.hook)

    async def hook(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.content_type, await request.json()))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok" if status == 200 else "nope")


async def serve(aiohttp_server: Any, receiver: Receiver) -> str:
    server: TestServer = await aiohttp_server(receiver.app)
    return str(server.make_url("/hook"))


def config_for(store_path: str, mine: str, theirs: str | None = None) -> Any:
    keys: list[dict[str, Any]] = [
        {"key": KEY, "alias": "tester", "providers": ["sandbox"], "webhook": mine},
        {"key": OTHER_KEY, "alias": "other", "providers": ["sandbox"]},
    ]
    if theirs:
        keys[1]["webhook"] = theirs
    return parse_config(sandbox_raw(store_path, keys=keys))


def received_at(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


async def start(aiohttp_client: Any, config: Any, clock: FakeClock) -> TestClient:
    client: TestClient = await aiohttp_client(
        create_app(config, clock=clock, background=False)
    )
    return client


async def test_delivery_retried_across_a_restart(
    aiohttp_client: Any, aiohttp_server: Any, store_path: str, clock: FakeClock
) -> None:
    mine, theirs = Receiver([500, 503]), Receiver([])
    config = config_for(
        store_path, await serve(aiohttp_server, mine), await serve(aiohttp_server, theirs)
    )
    client = await start(aiohttp_client, config, clock)
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    activation_id = int(body.split(":")[1])
    # the other key's activation must never reach my receiver (nor its own: no SMS yet)
    await call(client, api_key=OTHER_KEY, action="getNumber", service="wa", country=0)
    clock.advance(6)
    # the client's getStatus sees the SMS; the POST is not made inside its request
    _, _, status = await call(client, action="getStatus", id=activation_id)
    assert status.startswith("STATUS_OK:") and mine.seen == []
    code = status.split(":")[1]
    engine: Engine = engine_of(client)
    # queued in the transaction that stored the SMS
    [(source, attempts, state)] = await engine.store.webhook_states()
    assert (source.startswith(f"a:{activation_id}:"), attempts, state) == (
        True,
        0,
        "pending",
    )
    # mine answers 500; the other key's own SMS (polled in the background) goes to
    # the other key's URL and gets a 200
    assert await engine.webhooks.step() == 1
    assert await engine.webhooks.step() == 0  # not due yet: nothing sent
    assert (len(mine.seen), len(theirs.seen)) == (1, 1)
    await client.close()

    # a restart: the queue is on disk
    client = await start(aiohttp_client, config, clock)
    engine = engine_of(client)
    clock.advance(10)
    assert await engine.webhooks.step() == 0  # 503
    clock.advance(30)
    assert await engine.webhooks.step() == 1  # 200
    clock.advance(3600)
    assert await engine.webhooks.step() == 0  # never again after a 200
    text = (
        f"Telegram code: {code}\n\nYou can also tap on this link to log in:"
        f" t.me/login/{code}"
    )
    expected = {"activationId": activation_id, "service": "tg", "text": text,
                "code": code, "country": 10, "receivedAt": received_at(clock.now - 3640)}  # fmt: skip
    assert mine.seen == [("POST", "application/json", expected)] * 3
    # the other key's own activation got its SMS in the background poll: its URL only
    assert [(m, c, b["service"]) for m, c, b in theirs.seen] == [
        ("POST", "application/json", "wa")
    ]
    states = await engine.store.webhook_states()
    assert [(source.split(":")[:2], n, state) for source, n, state in states] == [
        (["a", str(activation_id)], 3, "delivered"),
        (["a", str(activation_id + 1)], 1, "delivered"),
    ]


async def test_background_poll_delivers_a_rent_sms(
    aiohttp_client: Any, aiohttp_server: Any, store_path: str, clock: FakeClock
) -> None:
    mine = Receiver([])
    client = await start(
        aiohttp_client, config_for(store_path, await serve(aiohttp_server, mine)), clock
    )
    _, _, body = await call(client, action="getRentNumber", service="wa", country=0)
    rent_id = json.loads(body)["phone"]["id"]
    started = clock.now
    clock.advance(6)
    # nobody asks getRentStatus: the webhook loop polls the rent itself
    assert await engine_of(client).webhooks.step() == 1
    [(_, ctype, sent)] = mine.seen
    rent = await engine_of(client).store.get_rent(rent_id)
    assert rent is not None
    code = rent.messages[0].code
    assert (ctype, sent) == ("application/json", {
        "activationId": rent_id, "service": "wa",
        "text": f"Your WhatsApp verification code is {code}", "code": code,
        "country": 0, "receivedAt": received_at(started + 5)})  # fmt: skip
    clock.advance(60)
    assert await engine_of(client).webhooks.step() == 0
    assert len(mine.seen) == 1


async def test_gives_up_after_eight_attempts(
    aiohttp_client: Any, aiohttp_server: Any, store_path: str, clock: FakeClock
) -> None:
    mine = Receiver([500] * 20)
    client = await start(
        aiohttp_client, config_for(store_path, await serve(aiohttp_server, mine)), clock
    )
    await call(client, action="getNumber", service="tg", country=10)
    clock.advance(6)
    engine = engine_of(client)
    started = clock.now
    for _ in range(30):
        await engine.webhooks.step()
        clock.advance(300)
    assert len(mine.seen) == MAX_ATTEMPTS == 8
    [(_, attempts, state)] = await engine.store.webhook_states()
    assert (attempts, state) == (8, "gave_up")
    assert clock.now - started <= 7200 + 30 * 300


@pytest.mark.parametrize("url", ["ftp://x/y", "not a url", 7, "http://"])
def test_webhook_must_be_an_http_url(store_path: str, url: Any) -> None:
    with pytest.raises(ConfigError, match=r"keys\[0\]\.webhook"):
        config_for(store_path, url)


def test_https_webhooks_are_accepted(store_path: str) -> None:
    config = config_for(store_path, "https://user:pw@hooks.example/sms")
    assert config.keys[0].webhook == "https://user:pw@hooks.example/sms"
    assert "pw" not in repr(config.keys[0])


@pytest.fixture
def tls_files(tmp_path: Any) -> tuple[str, str]:
    """A throw-away self-signed certificate for 127.0.0.1 (needs the openssl tool)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_receiver(
    aiohttp_client: Any,
    aiohttp_server: Any,
    store_path: str,
    clock: FakeClock,
    tls_files: tuple[str, str],
) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    mine = Receiver([])
    server: TestServer = await aiohttp_server(mine.app, ssl=server_ctx)
    url = str(server.make_url("/hook"))
    assert url.startswith("https://")
    trusting = httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert))
    config = config_for(store_path, url)
    client: TestClient = await aiohttp_client(
        create_app(config, clock=clock, background=False, http=trusting)
    )
    await call(client, action="getNumber", service="tg", country=10)
    clock.advance(6)
    assert await engine_of(client).webhooks.step() == 1
    [(method, ctype, body)] = mine.seen
    assert (method, ctype, body["service"]) == ("POST", "application/json", "tg")
    await trusting.aclose()
