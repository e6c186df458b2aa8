"""Pacing, deadlines and clients that leave (issue 7, items 4 and 5).

The field conditions here run on real time: smspva's own documented spacing (4.5 s
between calls, the provider's default, not overridden), clients with real socket
timeouts that really disconnect, and an upstream that really holds its answer. The
Pacer unit tests use short intervals because they are about ordering, not about
smspva; they say so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from compat_server.app import ENGINE, create_app
from compat_server.config import Config, parse_config
from compat_server.store import CANCELLED, REFUSED
from fakes import smspva, thuecodesim
from fakes.common import FakeUpstream
from providers.base import Pacer
from providers.vocabulary import BACKGROUND, CLIENT, PAID, Budget, NotSent
from tests.conftest import API, KEY, StartApp, call, engine_of

SMSPVA_SPACING = 4.5  # providers/smspva.py's default min_interval, from its seed
BUY_PATH = "/activation/number/VN/opt29"


# ---- the Pacer alone (short intervals: these tests are about order, not smspva) -------


async def test_pacer_serves_the_most_urgent_waiter_first() -> None:
    pacer = Pacer("p", 0.05)
    started: list[str] = []

    async def take(name: str, priority: int) -> None:
        await pacer.slot(Budget(priority=priority))
        started.append(name)

    await take("first", BACKGROUND)  # takes the free slot at once
    waiters = [
        asyncio.ensure_future(take(name, priority))
        for name, priority in [
            ("sweep-1", BACKGROUND),
            ("sweep-2", BACKGROUND),
            ("poll", CLIENT),
            ("buy", PAID),
        ]
    ]
    await asyncio.gather(*waiters)
    assert started == ["first", "buy", "poll", "sweep-1", "sweep-2"]


async def test_pacer_keeps_the_spacing() -> None:
    pacer = Pacer("p", 0.1)
    moments = []
    for _ in range(4):
        await pacer.slot(Budget())
        moments.append(time.monotonic())
    gaps = [b - a for a, b in zip(moments, moments[1:], strict=False)]
    assert all(gap >= 0.099 for gap in gaps), gaps


async def test_pacer_refuses_a_waiter_whose_deadline_passes() -> None:
    pacer = Pacer("p", 0.5)
    await pacer.slot(Budget())
    began = time.monotonic()
    with pytest.raises(NotSent, match="deadline"):
        await pacer.slot(Budget(deadline=time.monotonic() + 0.1, priority=PAID))
    assert time.monotonic() - began < 0.3  # refused at its deadline, not at the slot
    # and it took no slot: the next caller starts on the original schedule
    await pacer.slot(Budget())
    assert time.monotonic() - began < 0.6


async def test_pacer_skips_a_waiter_whose_client_left() -> None:
    pacer = Pacer("p", 0.1)
    await pacer.slot(Budget())
    connected = True
    gone = asyncio.ensure_future(
        pacer.slot(Budget(alive=lambda: connected, priority=PAID))
    )
    later = asyncio.ensure_future(pacer.slot(Budget(priority=BACKGROUND)))
    await asyncio.sleep(0.02)
    connected = False
    with pytest.raises(NotSent, match="client gone"):
        await gone
    await later
    assert pacer.queued == 0


async def test_a_budget_refuses_after_its_deadline_without_pacing() -> None:
    pacer = Pacer("p", 0)  # unpaced upstream: the deadline is still checked
    with pytest.raises(NotSent):
        await pacer.slot(Budget(deadline=time.monotonic() - 1))


# ---- smspva at its real pace ----------------------------------------------------------


def smspva_config(url: str, store_path: str, **server: Any) -> Config:
    options = smspva.provider_options(url)
    del options["min_interval"]  # smspva's own 4.5 s spacing: the condition under test
    return parse_config(
        {
            "server": server,
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"USD": "90"}},
            "keys": [{"key": KEY, "alias": "farm", "providers": ["smspva"]}],
            "providers": {"smspva": options},
        }
    )


async def serve(aiohttp_server: Any, fake: FakeUpstream) -> str:
    server: TestServer = await aiohttp_server(fake.app)
    return str(server.make_url("")).rstrip("/")


async def timed(
    make: Callable[[], Awaitable[tuple[int, str, str]]],
) -> tuple[float, str]:
    began = time.monotonic()
    _, _, body = await make()
    return time.monotonic() - began, body


async def test_a_catalog_sweep_never_holds_up_a_purchase_or_a_balance(
    aiohttp_server: Any, start_app: StartApp, store_path: str
) -> None:
    """Before: one country-less getPrices took every smspva call for minutes (63
    countries x 4.5 s); getBalance answered after 282 s and getNumber after 290 s.
    Now purchases go first, balances next, and the sweep fills the cache behind them.
    """
    fake = smspva.FakeSmspva()
    client = await start_app(
        smspva_config(await serve(aiohttp_server, fake), store_path)
    )
    sweep = asyncio.ensure_future(call(client, action="getPrices"))
    await asyncio.sleep(0.3)  # the sweep has queued its calls
    balance = asyncio.ensure_future(timed(lambda: call(client, action="getBalance")))
    await asyncio.sleep(0.05)
    number = asyncio.ensure_future(
        timed(lambda: call(client, action="getNumber", service="tg", country=10))
    )
    (buy_wait, bought), (balance_wait, balance_body) = await asyncio.wait_for(
        asyncio.gather(number, balance), 3 * SMSPVA_SPACING
    )
    assert bought.startswith("ACCESS_NUMBER:"), bought
    assert balance_body == "ACCESS_BALANCE:945.00"
    # the purchase took the next slot, the balance the one after it
    assert buy_wait < SMSPVA_SPACING + 1, buy_wait
    assert balance_wait < 2 * SMSPVA_SPACING + 1, balance_wait
    buy_index = fake.paths_called().index(BUY_PATH)
    assert fake.paths_called()[buy_index + 1] == "/activation/balance"
    # the sweep itself answered within its own bound, with what was in by then
    status, _, _ = await asyncio.wait_for(sweep, 10)
    assert status == 200
    sweep_calls = [p for p in fake.paths_called() if "countnumbers" in p]
    assert len(sweep_calls) < 10  # the rest goes on in the background, paced


async def test_a_purchase_that_cannot_start_before_its_deadline_buys_nothing(
    aiohttp_server: Any, start_app: StartApp, store_path: str
) -> None:
    """A getNumber queued behind smspva's spacing past its deadline answers
    NO_NUMBERS at the deadline and never reaches the upstream."""
    fake = smspva.FakeSmspva()
    url = await serve(aiohttp_server, fake)
    client = await start_app(smspva_config(url, store_path, request_deadline=2))
    assert await call(client, action="getBalance") == (
        200,
        "text/plain",
        "ACCESS_BALANCE:945.00",
    )  # took the slot: the next call may start only 4.5 s later
    wait, body = await timed(
        lambda: call(client, action="getNumber", service="tg", country=10)
    )
    assert body == "NO_NUMBERS"
    assert 1.9 < wait < 3.0, wait
    assert BUY_PATH not in fake.paths_called() and fake.orders == {}
    store = engine_of(client).store
    assert [a.state for a in await store.attempts([REFUSED])] == [REFUSED]
    # the breaker did not count it against smspva
    assert engine_of(client).health() == {"smspva": "closed"}


async def test_a_client_that_leaves_while_queued_buys_nothing(
    aiohttp_server: Any, start_app: StartApp, store_path: str
) -> None:
    fake = smspva.FakeSmspva()
    client = await start_app(
        smspva_config(await serve(aiohttp_server, fake), store_path)
    )
    await call(client, action="getBalance")  # the next slot is 4.5 s away
    with pytest.raises(asyncio.TimeoutError):
        await client.get(
            API,
            params={
                "api_key": KEY,
                "action": "getNumber",
                "service": "tg",
                "country": "10",
            },
            timeout=aiohttp.ClientTimeout(total=1),
        )  # the client gives up and closes its connection
    await asyncio.sleep(SMSPVA_SPACING)  # past the slot it would have had
    assert BUY_PATH not in fake.paths_called() and fake.orders == {}
    assert (
        await engine_of(client).store.for_key(
            engine_of(client).config.keys[0].key_id, open_only=False
        )
        == []
    )


# ---- a purchase answer that arrives after its client left ----------------------------


@pytest.fixture(params=["handler cancelled", "handler runs on"])
async def serve_app(
    request: pytest.FixtureRequest, clock: Any
) -> AsyncIterator[Callable[[Config], Awaitable[str]]]:
    """Serve the app as `web.run_app` does (the handler goes on after a disconnect)
    and as aiohttp's test server does (the handler is cancelled): both must release
    a number whose client left."""
    runners: list[web.AppRunner] = []
    apps: list[web.Application] = []

    async def start(config: Config) -> str:
        app = create_app(config, clock=clock, background=True)
        apps.append(app)
        runner = web.AppRunner(
            app, handler_cancellation=request.param == "handler cancelled"
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{port}"

    start.apps = apps  # type: ignore[attr-defined]
    yield start
    for runner in runners:
        await runner.cleanup()


async def buy_and_leave(
    url: str,
    fake: FakeUpstream,
    buy_path: str,
    action: str = "getNumber",
    country: str = "10",
) -> None:
    """A purchase whose upstream answers after 1.5 s, from a client that waits 0.5 s."""
    fake.fault, fake.fault_paths, fake.hang_seconds = "after_hang", {buy_path}, 1.5
    params = {"api_key": KEY, "action": action, "service": "tg", "country": country}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.get(
                url + API, params=params, timeout=aiohttp.ClientTimeout(total=0.5)
            )
    await asyncio.sleep(1.5)  # the upstream answers; nobody reads our answer
    fake.fault = None


async def get(url: str, **params: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + API, params={"api_key": KEY, **params}) as resp:
            return resp.status, resp.content_type, await resp.text()


async def test_a_number_whose_client_left_is_cancelled_upstream(
    aiohttp_server: Any, serve_app: Callable[[Config], Awaitable[str]],
    store_path: str, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    fake = smspva.FakeSmspva()
    options = smspva.provider_options(await serve(aiohttp_server, fake))
    options["min_interval"] = 0  # about leaving clients, not pacing
    config = parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"USD": "90"}},
            "upstream": {"read_timeout": 5},
            "keys": [{"key": KEY, "alias": "farm", "providers": ["smspva"]}],
            "providers": {"smspva": options},
        }
    )
    url = await serve_app(config)
    with caplog.at_level(logging.WARNING, logger="compat_server"):
        await buy_and_leave(url, fake, BUY_PATH)
        for _ in range(50):  # the outbox delivers the cancel
            if fake.orders and all(
                o.state == "cancelled" for o in fake.orders.values()
            ):
                break
            await asyncio.sleep(0.05)
    [order] = fake.orders.values()
    assert order.state == "cancelled"
    store = serve_app.apps[-1][ENGINE].store  # type: ignore[attr-defined]
    [stored] = await store.for_key(config.keys[0].key_id, open_only=False)
    assert (stored.state, stored.upstream_id) == (CANCELLED, order.id)
    [line] = [r.getMessage() for r in caplog.records if "client left" in r.getMessage()]
    assert line == (
        f"id={stored.id} provider=smspva client left before its number was delivered:"
        " cancel queued upstream (abandoned so far: 1)"
    )
    # the key does not see it among its open activations
    assert await get(url, action="getActiveActivations") == (
        200,
        "application/json",
        '{"status":"error","error":"NO_ACTIVATIONS"}',
    )


async def test_a_number_that_cannot_be_cancelled_stays_listed_for_its_key(
    aiohttp_server: Any, serve_app: Callable[[Config], Awaitable[str]],
    store_path: str, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    fake = thuecodesim.FakeThuecodesim()
    config = parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
            "upstream": {"read_timeout": 5},
            "keys": [{"key": KEY, "alias": "farm", "providers": ["thuecodesim"]}],
            "providers": {
                "thuecodesim": thuecodesim.provider_options(
                    await serve(aiohttp_server, fake)
                )
            },
        }
    )
    url = await serve_app(config)
    with caplog.at_level(logging.WARNING, logger="compat_server"):
        await buy_and_leave(url, fake, "/request/getv2")
    [order] = fake.orders.values()
    status, ctype, body = await get(url, action="getActiveActivations")
    assert (status, ctype) == (200, "application/json")
    [row] = json.loads(body)["activeActivations"]
    assert row["phoneNumber"].endswith(order.phone[-9:])
    [line] = [r.getMessage() for r in caplog.records if "client left" in r.getMessage()]
    assert line == (
        f"id={row['activationId']} provider=thuecodesim client left before its number"
        " was delivered: kept open (this provider cannot cancel), see"
        " getActiveActivations (abandoned so far: 1)"
    )


async def test_a_rent_whose_client_left_is_cancelled_upstream(
    aiohttp_server: Any, serve_app: Callable[[Config], Awaitable[str]],
    store_path: str, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The same for getRentNumber on smspva's rental API (before: the rent was kept
    silently, and with a cancelled handler its paid call was cut off half-way)."""
    fake = smspva.FakeSmspva()
    options = smspva.provider_options(await serve(aiohttp_server, fake), api="rent")
    options["min_interval"] = 0  # about leaving clients, not pacing
    config = parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"USD": "90"}},
            "upstream": {"read_timeout": 5},
            "keys": [{"key": KEY, "alias": "farm", "providers": ["smspva"]}],
            "providers": {"smspva": options},
        }
    )
    url = await serve_app(config)
    fake.method_faults["create"] = "after_hang"  # only the paid call stalls
    with caplog.at_level(logging.WARNING, logger="compat_server"):
        await buy_and_leave(
            url, fake, "/nothing-else", action="getRentNumber", country="0"
        )  # smspva's fake rents in Russia
        fake.method_faults.clear()
        for _ in range(50):
            if fake.orders and all(
                o.state == "cancelled" for o in fake.orders.values()
            ):
                break
            await asyncio.sleep(0.05)
    [order] = fake.orders.values()
    assert (order.state, order.calls) == ("cancelled", ["delete"])
    [line] = [r.getMessage() for r in caplog.records if "client left" in r.getMessage()]
    assert line.endswith(
        "provider=smspva client left before its number was delivered: cancelled upstream"
    )
    assert await get(url, action="getRentList") == (
        200,
        "application/json",
        '{"status":"error","message":"NO_NUMBERS"}',
    )


async def test_active_activations_wait_for_a_slow_upstream_once_not_per_number(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: Any
) -> None:
    """Before: each open number was refreshed in turn, each waiting up to 2 s for a
    hanging poll: 5 numbers took 10 s, 100 would take 200 s. (min_interval 0: this
    test is about a slow upstream, not pacing.)"""
    fake = thuecodesim.FakeThuecodesim()
    config = parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
            "upstream": {"read_timeout": 5},
            "keys": [{"key": KEY, "alias": "farm", "providers": ["thuecodesim"]}],
            "providers": {
                "thuecodesim": thuecodesim.provider_options(
                    await serve(aiohttp_server, fake)
                )
            },
        }
    )
    client = await start_app(config)
    for _ in range(5):
        _, _, body = await call(client, action="getNumber", service="tg", country=10)
        assert body.startswith("ACCESS_NUMBER:")
    fake.fault, fake.fault_paths, fake.hang_seconds = "hang", {"/session/getv2"}, 4
    clock.advance(60)  # every number is due for a poll
    wait, body = await timed(lambda: call(client, action="getActiveActivations"))
    assert len(json.loads(body)["activeActivations"]) == 5
    assert wait < 3.5, wait
    fake.fault = None
