"""Money and reliability: routing with fallback, reconciliation, breakers, outbox, polling."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from compat_server.config import parse_config
from compat_server.engine import Engine
from compat_server.store import (
    CANCELLED,
    EXPIRED,
    FINISHED,
    RECONCILED,
    UNCERTAIN,
    WAIT_CODE,
)
from fakes import smsman, smspva, thuecodesim
from tests.conftest import KEY, FakeClock, StartApp, call, engine_of

TEXT = "text/plain"


def sandbox(price: float, count: int = 100, balance: float = 1000) -> dict[str, Any]:
    return {"type": "sandbox", "sms_delay": 5, "balance": balance, "poll_interval": 1,
            "countries": [0, 10], "services": {"tg": {"price": price, "count": count},
                                               "wa": {"price": price, "count": count}}}  # fmt: skip


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_for(
    store_path: str, providers: dict[str, Any], route: list[str], **extra: Any
) -> Any:
    raw: dict[str, Any] = {
        "store": {"path": store_path},
        "currency": {"display": "RUB", "rates": {"VND": "0.004", "USD": "90"}},
        "upstream": {"connect_timeout": 0.5, "read_timeout": 0.5},
        "keys": [{"key": KEY, "alias": "rel", "providers": route}],
        "providers": providers,
    }
    raw.update(extra)
    return parse_config(raw)


async def serve(
    aiohttp_server: Any,
    make: Callable[[], Any],
    options: Callable[[str], dict[str, Any]],
) -> tuple[Any, dict[str, Any]]:
    """Serve a fake upstream on loopback; (fake, provider options pointing at it)."""
    fake = make()
    server: TestServer = await aiohttp_server(fake.app)
    return fake, options(str(server.make_url("")).rstrip("/"))


async def bought_from(client: TestClient, body: str) -> str:
    assert body.startswith("ACCESS_NUMBER:"), body
    stored = await engine_of(client).store.get(int(body.split(":")[1]))
    assert stored is not None
    return stored.provider


# ---- routing --------------------------------------------------------------------------


async def test_ordered_fallback_on_no_numbers(
    start_app: StartApp, store_path: str
) -> None:
    client = await start_app(
        config_for(
            store_path, {"a": sandbox(10, count=0), "b": sandbox(20)}, ["a", "b"]
        )
    )
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert await bought_from(client, body) == "b"
    attempts = await engine_of(client).store.attempts(["refused", "confirmed"])
    assert [(a.provider, a.state) for a in attempts] == [
        ("a", "refused"),
        ("b", "confirmed"),
    ]


async def test_fallback_on_no_balance_and_unknown_service(
    start_app: StartApp, store_path: str
) -> None:
    providers = {"poor": sandbox(10, balance=1), "other": {**sandbox(5), "countries": [0]},
                 "rich": sandbox(30)}  # fmt: skip
    client = await start_app(
        config_for(store_path, providers, ["poor", "other", "rich"])
    )
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert await bought_from(client, body) == "rich"


async def test_route_answers_merge(start_app: StartApp, store_path: str) -> None:
    client = await start_app(
        config_for(
            store_path,
            {"a": sandbox(10, balance=1), "b": sandbox(10, balance=2)},
            ["a", "b"],
        )
    )
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_BALANCE",
    )
    assert await call(client, action="getNumber", service="xx", country=10) == (
        200,
        TEXT,
        "BAD_SERVICE",
    )


async def test_fallback_when_unreachable(start_app: StartApp, store_path: str) -> None:
    down = {
        **smsman.provider_options(f"http://127.0.0.1:{closed_port()}"),
        "type": "smsman",
    }
    client = await start_app(
        config_for(store_path, {"down": down, "sb": sandbox(10)}, ["down", "sb"])
    )
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert await bought_from(client, body) == "sb"


async def test_no_fallback_after_an_uncertain_buy(
    start_app: StartApp, store_path: str, aiohttp_server: Any
) -> None:
    fake, options = await serve(
        aiohttp_server, smsman.FakeSmsman, smsman.provider_options
    )
    client = await start_app(
        config_for(store_path, {"sm": options, "sb": sandbox(10)}, ["sm", "sb"])
    )
    fake.fault, fake.fault_paths = "after_500", {"/control/get-number"}
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    engine = engine_of(client)
    assert await engine.store.count() == 0  # the sandbox was never asked
    assert [a.provider for a in await engine.store.attempts([UNCERTAIN])] == ["sm"]
    assert len(fake.orders) == 1  # bought upstream, answer lost


async def test_cheapest_strategy_and_service_routes(
    start_app: StartApp, store_path: str
) -> None:
    providers = {"dear": sandbox(30), "cheap": sandbox(10), "wa_only": sandbox(50)}
    routes = [{"service": "wa", "providers": ["wa_only"]},
              {"service": "tg", "country": 10, "providers": ["dear", "cheap"], "strategy": "cheapest"}]  # fmt: skip
    client = await start_app(config_for(store_path, providers, ["dear"], routes=routes))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert await bought_from(client, body) == "cheap"
    _, _, body = await call(client, action="getNumber", service="wa", country=10)
    assert await bought_from(client, body) == "wa_only"
    _, _, body = await call(client, action="getNumber", service="tg", country=0)
    assert await bought_from(client, body) == "dear"  # no route matches: the key's list


async def test_max_price_skips_dear_providers(
    start_app: StartApp, store_path: str
) -> None:
    client = await start_app(
        config_for(
            store_path, {"dear": sandbox(30), "cheap": sandbox(10)}, ["dear", "cheap"]
        )
    )
    _, _, body = await call(
        client, action="getNumber", service="tg", country=10, maxPrice="15"
    )
    assert await bought_from(client, body) == "cheap"
    assert await call(
        client, action="getNumber", service="tg", country=10, maxPrice="5"
    ) == (200, TEXT, "NO_NUMBERS")


async def test_markup_and_currency_conversion(
    start_app: StartApp, store_path: str, aiohttp_server: Any
) -> None:
    fake, base = await serve(
        aiohttp_server, thuecodesim.FakeThuecodesim, thuecodesim.provider_options
    )
    options = {
        **base,
        "markup": 1.25,
    }
    client = await start_app(config_for(store_path, {"tcs": options}, ["tcs"]))
    # 1200 VND x 0.004 RUB/VND x 1.25 markup = 6.00 RUB
    assert await call(client, action="getPrices", country=10, service="tg") == (
        200, "application/json", '{"10":{"tg":{"cost":6.0,"count":100,"physicalCount":100}}}',
    )  # fmt: skip
    # the balance is money held, converted without markup: 1,000,000 VND = 4000 RUB
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:4000.00",
    )
    _, _, body = await call(client, action="getNumberV2", service="tg", country=10)
    assert '"activationCost":6.0,"currency":643' in body


# ---- reconciliation -------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["after_500", "after_hang", "after_reset"])
async def test_reconciler_cancels_a_purchase_whose_answer_was_lost(
    start_app: StartApp,
    store_path: str,
    aiohttp_server: Any,
    clock: FakeClock,
    fault: str,
) -> None:
    fake = smspva.FakeSmspva(now=clock)  # dates orders by our clock
    server: TestServer = await aiohttp_server(fake.app)
    options = smspva.provider_options(str(server.make_url("")).rstrip("/"))
    client = await start_app(config_for(store_path, {"pva": options}, ["pva"]))
    engine = engine_of(client)
    fake.fault, fake.fault_paths, fake.hang_seconds = (
        fault,
        {"/activation/number/VN/opt29"},
        2,
    )
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    [order_id] = list(fake.orders)
    fake.fault = None
    assert await engine.reconciler.step() == 1
    [orphan] = await engine.store.for_key(engine.config.keys[0].key_id, open_only=False)
    assert (orphan.upstream_id, orphan.state) == (order_id, CANCELLED)
    assert await engine.outbox.step() == 1
    assert fake.orders[order_id].state == "cancelled"
    # found once: the next rounds find nothing new
    assert await engine.reconciler.step() == 0
    assert await engine.store.attempts([RECONCILED]) != []


async def test_reconciler_stores_thuecodesim_orphans(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, options = await serve(
        aiohttp_server, thuecodesim.FakeThuecodesim, thuecodesim.provider_options
    )
    client = await start_app(config_for(store_path, {"tcs": options}, ["tcs"]))
    engine = engine_of(client)
    # the fake dates purchases by its own clock: align ours with it
    clock.now = fake.clock()  # type: ignore[attr-defined]
    fake.fault, fake.fault_paths = "after_500", {"/request/getv2"}
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    [request_id] = list(fake.orders)
    fake.fault = None
    assert await engine.reconciler.step() == 1
    [orphan] = await engine.store.for_key(engine.config.keys[0].key_id, open_only=False)
    assert (orphan.upstream_id, orphan.state) == (request_id, CANCELLED)


async def test_reconciler_waits_for_buys_in_flight(
    start_app: StartApp, store_path: str
) -> None:
    client = await start_app(config_for(store_path, {"sb": sandbox(10)}, ["sb"]))
    engine = engine_of(client)
    order = await engine.store.attempts([])  # nothing yet
    assert order == []
    from providers.vocabulary import Order

    attempt = await engine.store.begin_purchase(
        "k", "sb", Order("tg", 10), engine.clock()
    )
    engine.router.in_flight[attempt] = "sb"
    assert await engine.reconciler.step() == 0
    assert [a.state for a in await engine.store.attempts(["pending"])] == ["pending"]
    del engine.router.in_flight[attempt]
    await engine.reconciler.step()  # a stale pending attempt (a crash) becomes uncertain
    assert [a.id for a in await engine.store.attempts([UNCERTAIN])] == [attempt]


# ---- circuit breaker ------------------------------------------------------------------


async def test_circuit_opens_then_one_probe_decides(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, options = await serve(
        aiohttp_server, smsman.FakeSmsman, smsman.provider_options
    )
    client = await start_app(config_for(store_path, {"sm": options, "sb": sandbox(10)}, ["sm", "sb"],
                                        breaker={"failures": 2, "cooldown": 30}))  # fmt: skip
    engine = engine_of(client)
    fake.fault = "html500"
    for _ in range(2):
        await call(client, action="getNumber", service="tg", country=10)
    assert engine.health()["sm"] == "open"
    calls = len(fake.calls)
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert (
        await bought_from(client, body) == "sb" and len(fake.calls) == calls
    )  # skipped
    clock.advance(30)
    fake.fault = None
    # three numbers came from the sandbox (1000 - 3 x 10) + sms-man 799.70
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:1769.70",
    )
    assert engine.health()["sm"] == "closed"
    await asyncio.sleep(0.05)  # let the state change reach the store
    from compat_server.cli import recorded_circuits

    assert recorded_circuits(store_path)["sm"].startswith("closed since ")


async def test_half_open_failure_reopens(clock: FakeClock) -> None:
    from compat_server.routing import Breaker

    seen: list[str] = []
    breaker = Breaker("x", 1, 10, clock, lambda b: seen.append(b.state))
    breaker.failure()
    assert (breaker.state, breaker.allow()) == ("open", False)
    clock.advance(10)
    assert breaker.allow() is True and breaker.allow() is False  # one probe only
    breaker.failure()
    assert breaker.state == "open" and seen == ["open", "half-open", "open"]


# ---- outbox and sweeper ---------------------------------------------------------------


async def test_outbox_backs_off_and_resumes_after_restart(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, options = await serve(
        aiohttp_server, smsman.FakeSmsman, smsman.provider_options
    )
    config = config_for(store_path, {"sm": options}, ["sm"],
                        workers={"outbox_interval": 2, "outbox_max_backoff": 8})  # fmt: skip
    client = await start_app(config)
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    ident = int(body.split(":")[1])
    upstream = (await engine_of(client).store.get(ident)).upstream_id  # type: ignore[union-attr]
    fake.fault = "html500"
    assert await call(client, action="setStatus", id=ident, status=8) == (
        200,
        TEXT,
        "ACCESS_CANCEL",
    )
    engine = engine_of(client)
    waits = []
    for _ in range(4):
        before = (await engine.store.pending_ops())[0][2]
        clock.advance(100)
        await engine.outbox.step()
        waits.append((await engine.store.pending_ops())[0][2] - before)
    assert waits == [1, 1, 1, 1]
    assert (await engine.store.due_ops(clock.now)) == []  # next try is in the future
    await client.close()

    fake.fault = None
    again = await start_app(config)
    clock.advance(8)
    assert await engine_of(again).outbox.step() == 1
    assert fake.orders[upstream].state == "cancelled"
    assert await engine_of(again).store.pending_ops() == []


async def test_sweeper_cancels_upstream_what_got_no_code(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, options = await serve(
        aiohttp_server, smsman.FakeSmsman, smsman.provider_options
    )
    client = await start_app(config_for(store_path, {"sm": options}, ["sm"]))
    engine: Engine = engine_of(client)
    ids = []
    for _ in range(2):
        _, _, body = await call(client, action="getNumber", service="tg", country=10)
        ids.append(int(body.split(":")[1]))
    first, second = [await engine.store.get(i) for i in ids]
    assert first is not None and second is not None
    fake.deliver(second.upstream_id, "code 4455", "4455")
    clock.advance(10)
    assert await call(client, action="getStatus", id=ids[1]) == (
        200,
        TEXT,
        "STATUS_OK:4455",
    )
    clock.advance(1200)
    assert await engine.lifecycle.sweep() == 2
    assert (first.state, second.state) == (EXPIRED, FINISHED)
    assert await engine.outbox.step() == 2
    assert (fake.orders[first.upstream_id].state, fake.orders[second.upstream_id].state) == (
        "cancelled", "finished",
    )  # fmt: skip


# ---- polling --------------------------------------------------------------------------


async def test_concurrent_polls_share_one_upstream_request(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake = smsman.FakeSmsman()
    fake.fault, fake.fault_paths, fake.hang_seconds = "hang", {"/control/get-sms"}, 0.2
    server: TestServer = await aiohttp_server(fake.app)
    options = {
        **smsman.provider_options(str(server.make_url("")).rstrip("/")),
        "poll_interval": 3,
    }
    client = await start_app(config_for(store_path, {"sm": options}, ["sm"],
                                        upstream={"read_timeout": 2}))  # fmt: skip
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    ident = int(body.split(":")[1])

    def polls() -> int:
        return fake.paths_called().count("/control/get-sms")

    answers = await asyncio.gather(
        *[call(client, action="getStatus", id=ident) for _ in range(50)]
    )
    assert {a[2] for a in answers} == {"STATUS_WAIT_CODE"} and polls() == 1
    fake.fault = None
    for _ in range(5):  # a client hammering every 0.5 s: 2.5 s in, still one poll
        clock.advance(0.5)
        await asyncio.gather(
            *[call(client, action="getStatus", id=ident) for _ in range(4)]
        )
    assert polls() == 1
    clock.advance(0.5)
    await call(client, action="getStatus", id=ident)
    assert polls() == 2


async def test_smspva_polls_no_faster_than_every_five_seconds(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, base = await serve(aiohttp_server, smspva.FakeSmspva, smspva.provider_options)
    options = {
        **base,
        "poll_interval": 1,
    }
    client = await start_app(config_for(store_path, {"pva": options}, ["pva"]))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    ident = int(body.split(":")[1])
    for _ in range(10):
        await call(client, action="getStatus", id=ident)
        clock.advance(1)
    polls = sum(1 for p in fake.paths_called() if p.startswith("/activation/sms/"))
    assert polls == 2  # at t=0 and t=5
    assert engine_of(client).store.open_activations()[0].state == WAIT_CODE


async def test_thuecodesim_rerent_on_retry_tracks_the_new_order(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, base = await serve(
        aiohttp_server, thuecodesim.FakeThuecodesim, thuecodesim.provider_options
    )
    options = {
        **base,
               "rerent_on_retry": True}  # fmt: skip
    client = await start_app(config_for(store_path, {"tcs": options}, ["tcs"]))
    engine = engine_of(client)
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    ident = int(body.split(":")[1])
    activation = await engine.store.get(ident)
    assert activation is not None
    first = activation.upstream_id
    fake.deliver(first, "Telegram code 11111", "11111")
    clock.advance(5)
    assert await call(client, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_OK:11111",
    )
    assert await call(client, action="setStatus", id=ident, status=3) == (
        200,
        TEXT,
        "ACCESS_RETRY_GET",
    )
    second = activation.upstream_id
    assert second != first and fake.orders[second].phone == fake.orders[first].phone
    assert activation.previous_ids == (first,)
    assert await call(client, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_WAIT_RETRY:11111",
    )
    fake.deliver(second, "Telegram code 22222", "22222")
    clock.advance(5)
    assert await call(client, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_OK:22222",
    )
    # both upstream orders are known: the reconciler would never take either for an orphan
    assert {first, second} <= await engine.store.known_upstream_ids("tcs")


async def test_reconciler_claims_one_order_per_unknown_attempt(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake = smspva.FakeSmspva(now=clock)  # dates orders by our clock
    server: TestServer = await aiohttp_server(fake.app)
    url = str(server.make_url("")).rstrip("/")
    client = await start_app(
        config_for(store_path, {"pva": smspva.provider_options(url)}, ["pva"])
    )
    engine = engine_of(client)
    fake.fault, fake.fault_paths = "after_500", {"/activation/number/VN/opt29"}
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    fake.fault = None
    # the operator buys a number by hand on the same account, outside sms-compat
    import httpx

    async with httpx.AsyncClient() as http:
        resp = await http.get(
            f"{url}/activation/number/VN/opt29", headers={"apikey": smspva.API_KEY}
        )
    by_hand = str(
        resp.json()["data"]["orderId"]
        if "data" in resp.json()
        else resp.json()["orderId"]
    )
    assert await engine.reconciler.step() == 1
    assert await engine.outbox.step() == 1
    states = {order_id: order.state for order_id, order in fake.orders.items()}
    assert states[by_hand] != "cancelled"
    assert sorted(states.values()).count("cancelled") == 1


async def test_sweeper_resumes_after_restart(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake = smsman.FakeSmsman()
    server: TestServer = await aiohttp_server(fake.app)
    config = config_for(
        store_path,
        {"sm": smsman.provider_options(str(server.make_url("")).rstrip("/"))},
        ["sm"],
    )
    first = await start_app(config)
    _, _, body = await call(first, action="getNumber", service="tg", country=10)
    upstream = (await engine_of(first).store.get(int(body.split(":")[1]))).upstream_id  # type: ignore[union-attr]
    await first.close()
    clock.advance(1300)  # the server was down when the lifetime ended
    again = await start_app(config)
    assert await engine_of(again).lifecycle.sweep() == 1
    assert await engine_of(again).outbox.step() == 1
    assert fake.orders[upstream].state == "cancelled"


async def test_slow_upstream_poll_does_not_hold_get_status(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import time

    from compat_server import lifecycle as engine_module

    monkeypatch.setattr(engine_module, "POLL_WAIT", 0.2)
    fake, options = await serve(
        aiohttp_server, smsman.FakeSmsman, smsman.provider_options
    )
    client = await start_app(
        config_for(store_path, {"sm": options}, ["sm"], upstream={"read_timeout": 5})
    )
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    ident = int(body.split(":")[1])
    upstream = (await engine_of(client).store.get(ident)).upstream_id  # type: ignore[union-attr]
    fake.deliver(upstream, "code 5151", "5151")
    fake.fault, fake.fault_paths, fake.hang_seconds = "hang", {"/control/get-sms"}, 0.6
    started = time.perf_counter()
    assert await call(client, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_WAIT_CODE",
    )
    assert time.perf_counter() - started < 0.5
    await asyncio.sleep(0.6)  # the poll completes in the background...
    assert await call(client, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_OK:5151",
    )


async def test_balance_skips_a_failing_provider(
    start_app: StartApp, store_path: str, aiohttp_server: Any
) -> None:
    fake, options = await serve(
        aiohttp_server, smsman.FakeSmsman, smsman.provider_options
    )
    client = await start_app(
        config_for(store_path, {"sm": options, "sb": sandbox(10)}, ["sm", "sb"])
    )
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:1799.70",
    )
    fake.fault = "html500"
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:1000.00",
    )


async def test_sweeper_prunes_old_bookkeeping(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    client = await start_app(
        config_for(store_path, {"sb": sandbox(10, count=0)}, ["sb"])
    )
    engine = engine_of(client)
    for _ in range(3):
        assert await call(client, action="getNumber", service="tg", country=10) == (
            200,
            TEXT,
            "NO_NUMBERS",
        )
    assert len(await engine.store.attempts(["refused"])) == 3
    await engine.lifecycle.sweep()  # first sweep prunes nothing younger than a week
    assert len(await engine.store.attempts(["refused"])) == 3
    clock.advance(8 * 86400)
    await engine.lifecycle.sweep()
    assert await engine.store.attempts(["refused"]) == []
