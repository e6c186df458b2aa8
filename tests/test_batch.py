"""Batch polling (issue 9 item 2): one list call per poll interval per account.

Every provider talks HTTP to its fake. thuecodesim lists its orders in
``session/historyv2`` (dates as ``yyyy-MM-dd`` in the upstream's zone, Vietnam or UTC),
smspva in ``orders`` (activation v2, and rent.php with ``hasnewsms``), a clone in
``getActiveActivations``. The batch is stepped by hand (``engine.batch.poll``) on the
test clock; what a list does not cover must fall back to the per-activation poll, and
an SMS is never lost.

The fakes' ``provider_options`` set ``min_interval: 0``: those tests are about what a
list covers, not pacing. The smspva test that deletes it runs under smspva's real 4.5 s
spacing, the condition it is about (tests/test_pacing.py has the rest).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from compat_server.config import key_id, parse_config
from compat_server.store import EXPIRED, NewActivation
from fakes import handler_api, smspva, thuecodesim
from fakes.common import FakeOrder, FakeUpstream
from fakes.smspva import FakeSmspvaOrder
from providers.vocabulary import ConfigError, Order, Purchase
from tests.conftest import KEY, FakeClock, StartApp, call, engine_of

TEXT = "text/plain"
VIETNAM = timezone(timedelta(hours=7))
HISTORY = "/session/historyv2"
SESSION = "/session/getv2"


def config_for(store_path: str, options: dict[str, Any]) -> Any:
    return parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"VND": "0.004", "USD": "90"}},
            "upstream": {"connect_timeout": 0.5, "read_timeout": 2},
            "keys": [{"key": KEY, "alias": "farm", "providers": ["up"]}],
            "providers": {"up": options},
        }
    )


async def serve(aiohttp_server: Any, fake: FakeUpstream) -> str:
    server: TestServer = await aiohttp_server(fake.app)
    return str(server.make_url("")).rstrip("/")


async def buy(client: TestClient, count: int) -> list[tuple[int, str]]:
    """``count`` numbers through getNumber: (our id, upstream id) each."""
    engine = engine_of(client)
    bought = []
    for _ in range(count):
        status, _, body = await call(
            client, action="getNumber", service="tg", country=10
        )
        assert status == 200 and body.startswith("ACCESS_NUMBER:"), body
        ident = int(body.split(":")[1])
        activation = await engine.store.get(ident)
        assert activation is not None
        bought.append((ident, activation.upstream_id))
    return bought


async def statuses(client: TestClient, ids: list[int]) -> list[str]:
    answers = []
    for ident in ids:
        status, kind, body = await call(client, action="getStatus", id=ident)
        assert (status, kind) == (200, TEXT)
        answers.append(body)
    return answers


# ---- thuecodesim: session/historyv2 ---------------------------------------------------


@pytest.mark.parametrize("tz", [VIETNAM, UTC], ids=["utc+7", "utc"])
async def test_thuecodesim_one_history_call_serves_every_open_number(
    aiohttp_server: Any,
    start_app: StartApp,
    store_path: str,
    clock: FakeClock,
    tz: timezone,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # bought 30 s before midnight on the upstream's clock; the batch runs after it, so
    # the history's yyyy-MM-dd window must reach back to the day before
    fake = thuecodesim.FakeThuecodesim()
    fake.clock, fake.tz = clock, tz
    midnight = (clock.now // 86400 + 1) * 86400 - tz.utcoffset(None).total_seconds()
    clock.now = midnight - 30
    client = await start_app(config_for(store_path, thuecodesim.provider_options(
        await serve(aiohttp_server, fake))))  # fmt: skip
    bought = await buy(client, 20)
    clock.advance(60)
    for _, upstream_id in bought[:3]:
        fake.deliver(upstream_id, "Telegram code 48213", "48213")
    fake.expire(bought[3][1])  # Status 2 in the list: over upstream, no code
    fake.calls.clear()
    caplog.set_level(logging.INFO, "compat_server")

    changed = await engine_of(client).batch.poll("up")

    assert changed == 4
    assert fake.paths_called() == [HISTORY]
    params = fake.calls[0][1]
    assert (params["fromDate"], params["toDate"], params["limit"]) == (
        "2026-01-01", "2026-01-02", "120",
    )  # fmt: skip
    ids = [ident for ident, _ in bought]
    answers = await statuses(client, ids)
    assert (
        answers
        == ["STATUS_OK:48213"] * 3 + ["STATUS_CANCEL"] + ["STATUS_WAIT_CODE"] * 16
    )
    assert fake.paths_called() == [HISTORY]  # getStatus answered from the store
    stored = await engine_of(client).store.get(ids[3])
    assert stored is not None and stored.state == EXPIRED
    [line] = [r.getMessage() for r in caplog.records if "batch poll" in r.getMessage()]
    assert line.startswith(
        "batch poll provider=up count=20 listed=20 fetched=0 changed=4 ms="
    )
    assert thuecodesim.TOKEN not in line


async def test_thuecodesim_a_history_row_with_another_number_is_not_ours(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    """A row matched by ``ID`` alone could be another order's (the seed's sample
    shows an ``ID`` that is not the request id): its SMS is not taken, and the
    order is polled alone by its request id."""
    fake = thuecodesim.FakeThuecodesim()
    fake.clock = clock
    client = await start_app(config_for(store_path, thuecodesim.provider_options(
        await serve(aiohttp_server, fake))))  # fmt: skip
    [(ident, upstream_id)] = await buy(client, 1)
    fake.orders[upstream_id].phone = "933111222"  # the row now names another number
    fake.deliver(upstream_id, "Telegram code 31313", "31313")
    fake.calls.clear()
    assert await engine_of(client).batch.poll("up") == 1
    assert fake.paths_called() == [HISTORY, SESSION]


async def test_thuecodesim_an_order_the_history_leaves_out_is_polled_alone(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    fake.clock = clock
    client = await start_app(config_for(store_path, thuecodesim.provider_options(
        await serve(aiohttp_server, fake))))  # fmt: skip
    [(ident, upstream_id)] = await buy(client, 1)
    # another tool on the account buys 150 numbers later: newest first, the history's
    # limit (1 open + 100) leaves ours out
    service = fake.orders[upstream_id].service
    for index in range(150):
        clock.advance(1)
        other = str(900_000 + index)
        fake.orders[other] = FakeOrder(id=other, service=service, country="vn",
                                       phone="912000000", price=900, created=clock.now)  # fmt: skip
    fake.deliver(upstream_id, "Telegram code 70707", "70707")
    fake.calls.clear()

    # left out of the list: the batch polls it on its own, and gets the code (a
    # server sharing the store trusts this list and does not poll it itself)
    assert await engine_of(client).batch.poll("up") == 1
    assert fake.paths_called() == [HISTORY, SESSION]
    assert await statuses(client, [ident]) == ["STATUS_OK:70707"]
    assert fake.paths_called() == [HISTORY, SESSION]


async def test_thuecodesim_a_failed_history_call_changes_nothing_and_getstatus_polls(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    fake.clock = clock
    client = await start_app(config_for(store_path, thuecodesim.provider_options(
        await serve(aiohttp_server, fake))))  # fmt: skip
    engine = engine_of(client)
    bought = await buy(client, 2)
    clock.advance(5)
    assert await engine.batch.poll("up") == 0  # a quiet batch covers both
    fake.deliver(bought[0][1], "Telegram code 11111", "11111")
    fake.fault, fake.fault_paths = "html500", {HISTORY}
    clock.advance(3)
    fake.calls.clear()
    assert await engine.batch.poll("up") == 0
    assert fake.paths_called() == [HISTORY]
    # still covered by the batch of 3 s ago (2 x poll_interval): from the store
    ids = [ident for ident, _ in bought]
    assert await statuses(client, ids) == ["STATUS_WAIT_CODE"] * 2
    assert fake.paths_called() == [HISTORY]
    # two intervals without a batch: the cover lapsed, each number is polled alone
    clock.advance(3.5)
    assert await statuses(client, ids) == ["STATUS_OK:11111", "STATUS_WAIT_CODE"]
    assert fake.paths_called() == [HISTORY, SESSION, SESSION]


async def test_a_failing_history_backs_off(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    fake.clock = clock
    client = await start_app(config_for(store_path, thuecodesim.provider_options(
        await serve(aiohttp_server, fake))))  # fmt: skip
    batch = engine_of(client).batch
    await buy(client, 1)
    fake.fault, fake.fault_paths = "html500", {HISTORY}
    fake.calls.clear()
    started = []
    for _ in range(4):  # failures wait 2, then 4 poll intervals (3 s)
        started.append(batch.step())
        await batch.wait()
        clock.advance(3)
    assert started == [1, 0, 1, 0]
    for _ in range(4):
        started.append(batch.step())
        await batch.wait()
        clock.advance(3)
    assert started == [1, 0, 1, 0, 0, 0, 1, 0]
    assert fake.paths_called() == [HISTORY] * 3
    fake.fault = None  # the third failure waits 8 intervals (24 s)
    for _ in range(8):
        started.append(batch.step())
        await batch.wait()
        clock.advance(3)
    # the list answers again: back to one call per interval
    assert started[8:] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert fake.paths_called() == [HISTORY] * 5


async def test_the_lease_makes_one_batch_call_per_interval(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    fake.clock = clock
    client = await start_app(config_for(store_path, thuecodesim.provider_options(
        await serve(aiohttp_server, fake))))  # fmt: skip
    engine = engine_of(client)
    await buy(client, 3)
    fake.calls.clear()
    await engine.batch.poll("up")
    await engine.batch.poll("up")  # same interval: another taker holds the lease
    clock.advance(2.0)
    await engine.batch.poll("up")
    assert fake.paths_called() == [HISTORY]
    clock.advance(1.0)  # the provider's poll_interval (3 s) since the first
    await engine.batch.poll("up")
    assert fake.paths_called() == [HISTORY, HISTORY]


async def test_a_server_refused_the_lease_trusts_the_holders_list(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    """Another server sharing the store holds this interval's list call: this one
    makes no list call and no poll of its own; its getStatus reads the store."""
    fake = thuecodesim.FakeThuecodesim()
    fake.clock = clock
    client = await start_app(config_for(store_path, thuecodesim.provider_options(
        await serve(aiohttp_server, fake))))  # fmt: skip
    engine = engine_of(client)
    ids = [ident for ident, _ in await buy(client, 3)]
    assert await statuses(client, ids) == ["STATUS_WAIT_CODE"] * 3  # polled alone
    fake.calls.clear()
    for _ in range(3):  # longer than a cover lasts (COVERED_FOR intervals)
        clock.advance(3)
        # the holder (another server) took the lease of this interval
        assert await engine.store.lease("batch:up", 2.7, clock()) is True
        assert await engine.batch.poll("up") == 0
        assert await statuses(client, ids) == ["STATUS_WAIT_CODE"] * 3
    assert fake.paths_called() == []


async def test_no_open_activation_no_batch_call(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    client = await start_app(config_for(store_path, thuecodesim.provider_options(
        await serve(aiohttp_server, fake))))  # fmt: skip
    assert engine_of(client).batch.step() == 1
    assert await engine_of(client).batch.poll("up") == 0
    assert fake.paths_called() == []


# ---- smspva activation v2: orders, at smspva's real pace ------------------------------


async def stored_smspva(
    client: TestClient, fake: smspva.FakeSmspva, count: int, api: str, now: float
) -> list[tuple[int, str]]:
    engine = engine_of(client)
    made = []
    for index in range(count):
        order_id = str(700_000 + index)
        phone = str(9_876_500_000 + index)
        fake.orders[order_id] = FakeSmspvaOrder(
            id=order_id, service="opt29", country="RU", phone=phone, price=0.35,
            created=now, api=api, active=True, until=int(now) + 7 * 86400,
        )  # fmt: skip
        extra = {"until": str(int(now) + 7 * 86400), "activated": "1"}
        activation = await engine.store.complete_purchase(
            None,
            NewActivation(
                key_id(KEY), "up", "USD", Order(service="tg", country=0),
                Purchase(order_id, "7" + phone, Decimal("0.35"),
                         extra=extra if api == "rent" else {}),
                Decimal("31.50"), now, 1200.0,
            ),
        )  # fmt: skip
        made.append((activation.id, order_id))
    return made


async def test_smspva_one_paced_orders_call_then_only_the_numbers_with_news(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = smspva.FakeSmspva(now=clock)
    options = smspva.provider_options(await serve(aiohttp_server, fake))
    del options["min_interval"]  # smspva's own 4.5 s spacing: the condition under test
    client = await start_app(config_for(store_path, options))
    made = await stored_smspva(client, fake, 8, "activation", clock.now)
    fake.deliver(made[1][1], "Your Telegram code 55123", "55123")
    fake.deliver(made[5][1], "Your Telegram code 66234", "66234")
    fake.calls.clear()

    began = time.monotonic()
    changed = await engine_of(client).batch.poll("up")
    took = time.monotonic() - began

    assert changed == 2
    # one list call, then one paced sms call per number with news: 2 slots after it
    assert sorted(fake.paths_called()) == [
        "/activation/orders", f"/activation/sms/{made[1][1]}",
        f"/activation/sms/{made[5][1]}",
    ]  # fmt: skip
    assert fake.paths_called()[0] == "/activation/orders"
    assert took >= 2 * 4.5 - 0.5
    answers = await statuses(client, [ident for ident, _ in made])
    assert (
        answers
        == ["STATUS_WAIT_CODE", "STATUS_OK:55123"]
        + ["STATUS_WAIT_CODE"] * 3
        + ["STATUS_OK:66234"]
        + ["STATUS_WAIT_CODE"] * 2
    )
    assert len(fake.calls) == 3  # eight getStatus, no further paced call
    # the next interval: the two numbers holding a code are not fetched again (their
    # clients have what they waited for), the rest is covered by the one list call
    clock.advance(5)
    fake.calls.clear()
    assert await engine_of(client).batch.poll("up") == 0
    assert fake.paths_called() == ["/activation/orders"]
    clock.advance(5)
    assert await statuses(client, [ident for ident, _ in made]) == answers
    assert fake.paths_called() == ["/activation/orders"]


async def test_smspva_rent_fetches_the_numbers_with_hasnewsms_only(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = smspva.FakeSmspva(now=clock)
    # min_interval: 0 (from provider_options): about hasnewsms, not pacing
    options = smspva.provider_options(await serve(aiohttp_server, fake), api="rent")
    client = await start_app(config_for(store_path, options))
    made = await stored_smspva(client, fake, 4, "rent", clock.now)
    clock.advance(10)
    fake.deliver(made[2][1], "Code Instagram: 671 094.")
    fake.calls.clear()
    engine = engine_of(client)

    assert await engine.batch.poll("up") == 1
    methods = [params.get("method") for _, params in fake.calls]
    assert methods == ["orders", "sms"]
    assert fake.calls[1][1]["id"] == made[2][1]
    clock.advance(5)
    fake.calls.clear()
    assert await engine.batch.poll("up") == 0  # read: hasnewsms is false again
    assert [params.get("method") for _, params in fake.calls] == ["orders"]
    answers = await statuses(client, [ident for ident, _ in made])
    assert answers == ["STATUS_WAIT_CODE"] * 2 + ["STATUS_OK:671094"] + [
        "STATUS_WAIT_CODE"
    ]
    assert len(fake.calls) == 1


async def test_smspva_rent_status_zero_from_orders_covers_nothing(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = smspva.FakeSmspva(now=clock)
    # min_interval: 0 (from provider_options): about a failed list, not pacing
    options = smspva.provider_options(await serve(aiohttp_server, fake), api="rent")
    client = await start_app(config_for(store_path, options))
    [(ident, order_id)] = await stored_smspva(client, fake, 1, "rent", clock.now)
    fake.method_faults["orders"] = "html500"
    fake.deliver(order_id, "Code Instagram: 671 094.")
    assert await engine_of(client).batch.poll("up") == 0
    assert await statuses(client, [ident]) == ["STATUS_OK:671094"]  # polled alone


# ---- clones: getActiveActivations -----------------------------------------------------


async def test_a_clone_lists_its_codes_in_getactiveactivations(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = handler_api.FakeSmsActivate()
    fake.clock, fake.balance = clock, Decimal(1000)
    options = handler_api.sms_activate_options(await serve(aiohttp_server, fake))
    client = await start_app(config_for(store_path, options))
    bought = await buy(client, 5)
    fake.deliver(bought[4][1], "Your code is 90817", "90817")
    fake.orders[bought[0][1]].state = "cancelled"  # gone from the list
    fake.calls.clear()

    assert await engine_of(client).batch.poll("up") == 1
    # the one the list left out is polled alone by the batch, never closed from its
    # absence
    assert fake.actions_called() == ["getActiveActivations", "getStatusV2"]
    assert (fake.calls[0][1]["start"], fake.calls[0][1]["limit"]) == ("0", "100")
    ids = [ident for ident, _ in bought]
    assert await statuses(client, ids[1:]) == ["STATUS_WAIT_CODE"] * 3 + [
        "STATUS_OK:90817"
    ]
    assert await statuses(client, ids[:1]) == ["STATUS_CANCEL"]
    assert fake.actions_called() == ["getActiveActivations", "getStatusV2"]


async def test_a_clone_without_getactiveactivations_is_polled_one_by_one(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = handler_api.FakeSms3t()
    fake.clock = clock
    options = handler_api.sms3t_options(await serve(aiohttp_server, fake))
    client = await start_app(config_for(store_path, options))
    engine = engine_of(client)
    [(ident, upstream_id)] = await buy(client, 1)
    fake.deliver(upstream_id, "code 4242", "4242")
    fake.calls.clear()
    assert await engine.batch.poll("up") == 0
    assert engine.upstreams.providers["up"].can_poll_many is False
    clock.advance(3)
    assert await engine.batch.poll("up") == 0  # not asked again
    assert await statuses(client, [ident]) == ["STATUS_OK:4242"]
    assert fake.actions_called() == ["getActiveActivations", "getStatus"]


async def test_a_paging_clone_is_read_page_by_page(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = handler_api.FakeSmsActivate()
    fake.clock, fake.balance, fake.paged = clock, Decimal(10_000), True
    fake.prices["10"]["tg"] = ("12.50", 1000)
    options = handler_api.sms_activate_options(await serve(aiohttp_server, fake))
    client = await start_app(config_for(store_path, options))
    bought = await buy(client, 130)
    fake.deliver(bought[-1][1], "Your code is 31337", "31337")
    fake.calls.clear()

    assert await engine_of(client).batch.poll("up") == 1
    pages = [(p["start"], p["limit"]) for _, p in fake.calls]
    assert pages == [("0", "100"), ("100", "100")]
    ids = [ident for ident, _ in bought]
    assert await statuses(client, ids) == ["STATUS_WAIT_CODE"] * 129 + [
        "STATUS_OK:31337"
    ]
    assert len(fake.calls) == 2


# ---- the app's own loop ---------------------------------------------------------------


async def test_the_background_loop_polls_by_itself(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    fake.clock = clock
    options = thuecodesim.provider_options(await serve(aiohttp_server, fake))
    client = await start_app(config_for(store_path, options), background=True)
    [(ident, upstream_id)] = await buy(client, 1)
    fake.calls.clear()
    # first seen while the batch runs: left to the next batch, no poll of its own
    assert await statuses(client, [ident]) == ["STATUS_WAIT_CODE"]
    assert fake.paths_called() == []
    fake.deliver(upstream_id, "Telegram code 24680", "24680")
    clock.advance(3)  # the provider's poll_interval: a batch is due
    fake.calls.clear()
    for _ in range(100):  # the loop ticks every 0.25 s of real time
        if HISTORY in fake.paths_called():
            break
        await asyncio.sleep(0.05)
    assert fake.paths_called() == [HISTORY]
    assert await statuses(client, [ident]) == ["STATUS_OK:24680"]
    assert fake.paths_called() == [HISTORY]


async def test_batch_poll_false_polls_number_by_number(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    fake.clock = clock
    options = thuecodesim.provider_options(await serve(aiohttp_server, fake))
    options["batch_poll"] = False
    client = await start_app(config_for(store_path, options), background=True)
    engine = engine_of(client)
    assert engine.upstreams.providers["up"].can_poll_many is False
    [(ident, upstream_id)] = await buy(client, 1)
    fake.deliver(upstream_id, "Telegram code 13579", "13579")
    fake.calls.clear()
    assert await engine.batch.poll("up") == 0
    assert await statuses(client, [ident]) == ["STATUS_OK:13579"]
    assert fake.paths_called() == [SESSION]


def test_batch_poll_must_be_true_or_false(store_path: str) -> None:
    options = {
        **thuecodesim.provider_options("http://127.0.0.1:9"),
        "batch_poll": "maybe",
    }
    with pytest.raises(ConfigError) as caught:
        config_for(store_path, options)
    assert str(caught.value) == (
        "providers.up.batch_poll: must be true or false, got 'maybe'"
    )
