"""SmsmanProvider against the fake sms-man (real HTTP on 127.0.0.1, no mocks).

``provider_options`` sets ``min_interval: 0``: these tests are about sms-man's answers,
prices and faults, not pacing (real pacing is tests/test_pacing.py's condition).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from fakes.smsman import TOKEN, FakeSmsman, provider_options
from providers.http import UpstreamHttp
from providers.smsman import ID_TABLES_TTL, SmsmanProvider
from providers.vocabulary import (
    ActivationRef,
    ConfigError,
    NoBalance,
    NoNumbers,
    Offer,
    Order,
    PollResult,
    Purchase,
    Sms,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)
from tests.conftest import FakeClock, ServeFake, activation_ref, upstream_client

TG_VN = Order(service="tg", country=10)
TG_RU = Order(service="tg", country=0)
NOW = 1_700_000_000.0


Clock = FakeClock  # the shared steppable clock (tests/conftest.py)


@pytest.fixture
def fake() -> FakeSmsman:
    return FakeSmsman()


@pytest.fixture
async def url(serve_fake: ServeFake, fake: FakeSmsman) -> str:
    return await serve_fake(fake)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


Make = Callable[..., SmsmanProvider]


@pytest.fixture
def make(url: str, http: UpstreamHttp, clock: Clock) -> Make:
    def build(client: UpstreamHttp | None = None, **extra: Any) -> SmsmanProvider:
        options = {**provider_options(url), **extra}
        return SmsmanProvider.from_options("sm", options, client or http, clock)

    return build


def ref_for(purchase: Purchase, order: Order = TG_VN) -> ActivationRef:
    return activation_ref(purchase, order, NOW)


def calls_to(fake: FakeSmsman, endpoint: str) -> list[dict[str, str]]:
    return [params for path, params in fake.calls if path == f"/control/{endpoint}"]


# ---- balance ---------------------------------------------------------------------


async def test_balance_string_becomes_decimal(make: Make, fake: FakeSmsman) -> None:
    assert await make().balance() == Decimal("799.70")
    assert fake.calls == [("/control/get-balance", {"token": TOKEN})]


async def test_balance_wrong_token_string_message(make: Make) -> None:
    with pytest.raises(UpstreamAuth):
        await make(token="not-the-token").balance()


@pytest.mark.parametrize("fault", ["html500", "empty", "malformed"])
async def test_balance_garbage_is_uncertain(
    make: Make, fake: FakeSmsman, fault: str
) -> None:
    fake.fault = fault
    with pytest.raises(UpstreamUncertain):
        await make().balance()


# ---- buy -------------------------------------------------------------------------


async def test_buy_maps_service_and_country_on_the_wire(
    make: Make, fake: FakeSmsman
) -> None:
    purchase = await make().buy(TG_VN)

    assert purchase == Purchase(
        upstream_id="1001",
        phone="84000001001",
        price=Decimal(0),  # get-prices never fetched: no cached cost
        extra={"country_id": "7", "application_id": "3"},
    )
    assert calls_to(fake, "get-number") == [
        {"token": TOKEN, "country_id": "7", "application_id": "3"}
    ]
    order = fake.orders["1001"]
    assert (order.service, order.country, order.state) == ("3", "7", "waiting")
    assert fake.balance == Decimal("787.20")


async def test_buy_price_from_cached_catalog_and_max_price(
    make: Make, fake: FakeSmsman
) -> None:
    provider = make()
    await provider.catalog(10)
    order = Order(service="tg", country=10, max_price=Decimal("13"))

    purchase = await provider.buy(order)

    assert purchase.price == Decimal("12.5")
    assert calls_to(fake, "get-number")[0]["maxPrice"] == "13.00"
    assert calls_to(fake, "get-number")[0]["currency"] == "RUB"


async def test_buy_above_max_price_is_no_numbers(make: Make, fake: FakeSmsman) -> None:
    with pytest.raises(NoNumbers):
        await make().buy(Order(service="tg", country=10, max_price=Decimal("5")))
    assert fake.orders == {}


@pytest.mark.parametrize(
    ("scenario", "error"),
    [
        ("no_numbers", NoNumbers),
        ("no_balance", NoBalance),
        ("bad_service", UnknownService),
        ("bad_token", UpstreamAuth),
    ],
)
async def test_buy_scenarios(
    make: Make, fake: FakeSmsman, scenario: str, error: type[Exception]
) -> None:
    provider = make(services={"tg": 3}, countries={10: 7})  # no list look-ups
    fake.scenario = scenario
    with pytest.raises(error):
        await provider.buy(TG_VN)
    assert fake.orders == {}
    assert fake.balance == Decimal("799.70")


async def test_buy_wrong_token_object_message(make: Make, fake: FakeSmsman) -> None:
    provider = make(token="wrong", services={"tg": 3}, countries={10: 7})
    fake.scenario = "no_numbers"  # a wrong token wins over any scenario
    with pytest.raises(UpstreamAuth) as info:
        await provider.buy(TG_VN)
    assert info.value.detail == "get-number: wrong_token token: Wrong token!"


async def test_buy_refusal_string_message(make: Make, fake: FakeSmsman) -> None:
    fake.canned["get-number"] = {
        "success": False,
        "error_code": "no_numbers",
        "error_msg": "No free numbers",
    }
    with pytest.raises(NoNumbers) as info:
        await make(services={"tg": 3}, countries={10: 7}).buy(TG_VN)
    assert info.value.detail == "get-number: no_numbers No free numbers"


async def test_buy_out_of_stock_and_not_enough_money(
    make: Make, fake: FakeSmsman
) -> None:
    provider = make()
    with pytest.raises(NoNumbers):  # WhatsApp in Russia: count 0
        await provider.buy(Order(service="wa", country=0))
    fake.balance = Decimal("1.00")
    with pytest.raises(NoBalance):
        await provider.buy(TG_RU)
    assert fake.orders == {}


async def test_buy_unknown_service_or_country(make: Make, fake: FakeSmsman) -> None:
    provider = make()
    with pytest.raises(UnknownService):
        await provider.buy(Order(service="zz", country=10))
    with pytest.raises(UnknownService):  # in the table, not in the fake's list
        await provider.buy(Order(service="tg", country=43))
    with pytest.raises(UnknownService):  # not in the table at all
        await provider.buy(Order(service="tg", country=4242))
    assert calls_to(fake, "get-number") == []


@pytest.mark.parametrize(
    ("fault", "bought"),
    [
        ("html500", []),
        ("empty", []),
        ("malformed", []),
        ("reset", []),
        ("after_500", ["1001"]),
        ("after_reset", ["1001"]),
    ],
)
async def test_buy_garbage_is_uncertain(
    make: Make, fake: FakeSmsman, fault: str, bought: list[str]
) -> None:
    provider = make(services={"tg": 3}, countries={10: 7})
    fake.fault = fault
    with pytest.raises(UpstreamUncertain):
        await provider.buy(TG_VN)
    assert list(fake.orders) == bought


@pytest.mark.parametrize(("fault", "bought"), [("hang", []), ("after_hang", ["1001"])])
async def test_buy_hang_is_uncertain(
    make: Make, fake: FakeSmsman, fault: str, bought: list[str]
) -> None:
    fake.fault, fake.hang_seconds = fault, 0.3
    async with upstream_client(read_timeout=0.1) as short:
        provider = make(client=short, services={"tg": 3}, countries={10: 7})
        with pytest.raises(UpstreamUncertain):
            await provider.buy(TG_VN)
    assert list(fake.orders) == bought  # after_hang: bought, we never heard back


async def test_buy_refused_port_is_unreachable(http: UpstreamHttp) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = provider_options(f"http://127.0.0.1:{port}")
    provider = SmsmanProvider.from_options("sm", options, http)
    with pytest.raises(UpstreamUnreachable):
        await provider.buy(TG_VN)


async def test_buy_failed_lookup_is_unreachable(make: Make, fake: FakeSmsman) -> None:
    fake.fault, fake.fault_paths = "html500", {"/control/applications"}
    with pytest.raises(UpstreamUnreachable):  # get-number was never sent
        await make().buy(TG_VN)
    assert calls_to(fake, "get-number") == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"success": True}, UpstreamUncertain),
        ({"request_id": 5, "country_id": 7, "application_id": 3}, UpstreamUncertain),
        ([], UpstreamUncertain),
        ({"success": False}, NoNumbers),
        ({"success": "false", "error_code": "limit_exceeded"}, NoNumbers),
        (
            {"success": False, "error_code": "no_numbers", "error_msg": "None"},
            NoNumbers,
        ),
        ({"success": False, "error_code": "no_balance", "error_msg": "Pay"}, NoBalance),
        (
            {"success": False, "error_code": "wrong_country", "error_msg": {}},
            UnknownService,
        ),
    ],
)
async def test_buy_odd_answers(
    make: Make, fake: FakeSmsman, body: Any, error: type[Exception]
) -> None:
    fake.canned["get-number"] = body
    with pytest.raises(error):
        await make(services={"tg": 3}, countries={10: 7}).buy(TG_VN)


# ---- poll and status -------------------------------------------------------------


async def test_poll_waiting_received_closed(make: Make, fake: FakeSmsman) -> None:
    provider = make()
    ref = ref_for(await provider.buy(TG_VN))
    assert await provider.poll(ref) == PollResult()

    fake.deliver(ref.upstream_id, "Telegram code: 12345", "12345")
    assert await provider.poll(ref) == PollResult(
        messages=(Sms(uid="12345", text="12345", code="12345", received_at=NOW),)
    )

    fake.expire(ref.upstream_id)
    assert await provider.poll(ref) == PollResult(closed=True)


async def test_poll_reads_full_text_when_present(make: Make, fake: FakeSmsman) -> None:
    provider = make()
    ref = ref_for(await provider.buy(TG_VN))
    fake.send_sms_text = True
    fake.deliver(ref.upstream_id, "Telegram code: 12345", "12345")
    assert await provider.poll(ref) == PollResult(
        messages=(
            Sms(
                uid="12345", text="Telegram code: 12345", code="12345", received_at=NOW
            ),
        )
    )


async def test_poll_errors(make: Make, fake: FakeSmsman) -> None:
    provider = make()
    ref = ref_for(await provider.buy(TG_VN))
    fake.fault = "html500"
    with pytest.raises(UpstreamUncertain):
        await provider.poll(ref)
    fake.fault, fake.scenario = None, "bad_token"
    with pytest.raises(UpstreamAuth):
        await provider.poll(ref)


async def test_ready_then_retry_gives_a_second_code(
    make: Make, fake: FakeSmsman
) -> None:
    provider = make()
    ref = ref_for(await provider.buy(TG_VN))
    fake.deliver(ref.upstream_id, "code 11111", "11111")
    assert [m.code for m in (await provider.poll(ref)).messages] == ["11111"]

    await provider.ready(ref)
    assert await provider.poll(ref) == PollResult()
    fake.deliver(ref.upstream_id, "code 22222", "22222")
    assert [m.code for m in (await provider.poll(ref)).messages] == ["22222"]

    assert await provider.retry(ref) is None
    assert await provider.poll(ref) == PollResult()
    fake.deliver(ref.upstream_id, "code 33333", "33333")
    assert [m.code for m in (await provider.poll(ref)).messages] == ["33333"]
    assert fake.orders[ref.upstream_id].calls == ["ready", "ready"]


async def test_finish_reaches_the_fake(make: Make, fake: FakeSmsman) -> None:
    provider = make()
    ref = ref_for(await provider.buy(TG_VN))
    fake.deliver(ref.upstream_id, "code 11111", "11111")
    await provider.finish(ref)
    order = fake.orders[ref.upstream_id]
    assert (order.calls, order.state) == (["close"], "finished")
    assert calls_to(fake, "set-status")[-1] == {
        "token": TOKEN,
        "request_id": ref.upstream_id,
        "status": "close",
    }
    assert await provider.poll(ref) == PollResult(closed=True)


async def test_cancel_refunds_and_is_idempotent(make: Make, fake: FakeSmsman) -> None:
    provider = make()
    ref = ref_for(await provider.buy(TG_VN))
    assert fake.balance == Decimal("787.20")

    await provider.cancel(ref)
    await provider.cancel(ref)  # already final upstream: "order_closed", no loop

    order = fake.orders[ref.upstream_id]
    assert (order.calls, order.state) == (["reject", "reject"], "cancelled")
    assert fake.balance == Decimal("799.70")
    assert len(calls_to(fake, "set-status")) == 2


async def test_cancel_unknown_or_expired_order_returns(
    make: Make, fake: FakeSmsman
) -> None:
    provider = make()
    ref = ref_for(await provider.buy(TG_VN))
    fake.expire(ref.upstream_id)
    await provider.cancel(ref)
    await provider.finish(ref)
    gone = ActivationRef("999999", "84000000000", "tg", 10, NOW)
    await provider.cancel(gone)  # "wrong_request_id": final as far as we can tell
    assert fake.orders[ref.upstream_id].calls == ["reject", "close"]


async def test_set_status_failures_propagate(make: Make, fake: FakeSmsman) -> None:
    provider = make()
    ref = ref_for(await provider.buy(TG_VN))
    fake.fault = "html500"
    with pytest.raises(UpstreamUncertain):
        await provider.cancel(ref)
    fake.fault, fake.scenario = None, "bad_token"
    with pytest.raises(UpstreamAuth):
        await provider.finish(ref)
    assert fake.orders[ref.upstream_id].calls == []


# ---- catalog ---------------------------------------------------------------------


async def test_catalog_translates_ids_to_codes(make: Make, fake: FakeSmsman) -> None:
    offers = await make().catalog(10)
    assert offers == [
        Offer(service="fb", price=Decimal("8"), count=300),
        Offer(service="mj", price=Decimal("4"), count=25),
        Offer(service="tg", price=Decimal("12.5"), count=40),
    ]
    assert calls_to(fake, "get-prices") == [{"token": TOKEN, "country_id": "7"}]


async def test_catalog_of_unserved_country_is_empty(
    make: Make, fake: FakeSmsman
) -> None:
    provider = make()
    assert await provider.catalog(4242) == []  # not in the table
    assert await provider.catalog(43) == []  # Germany: not in the fake's list
    assert calls_to(fake, "get-prices") == []


async def test_catalog_is_fresh_and_id_tables_follow_the_clock(
    make: Make, fake: FakeSmsman, clock: Clock
) -> None:
    # the catalog cache is the engine's (upstream.catalog_ttl, test_provider_battery);
    # the provider asks get-prices every time and reuses only its id tables
    provider = make()
    first = await provider.catalog(0)
    clock.now += ID_TABLES_TTL - 1
    assert await provider.catalog(0) == first
    assert len(calls_to(fake, "get-prices")) == 2
    assert len(calls_to(fake, "applications")) == 1
    assert len(calls_to(fake, "countries")) == 1

    clock.now += 2
    assert await provider.catalog(0) == first
    assert len(calls_to(fake, "get-prices")) == 3
    assert len(calls_to(fake, "applications")) == 2
    assert len(calls_to(fake, "countries")) == 2


async def test_provider_catalog_ttl_is_deprecated_with_one_warning(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="providers.smsman"):
        make(catalog_ttl=600)
        make()  # without the option: no warning
    assert [r.getMessage() for r in caplog.records] == [
        "providers.sm.catalog_ttl is deprecated and ignored: the catalog is "
        "cached once, upstream.catalog_ttl"
    ]


async def test_catalog_flat_prices(make: Make, fake: FakeSmsman) -> None:
    fake.prices_shape = "flat"
    assert await make().catalog(25) == [
        Offer(service="tg", price=Decimal("20"), count=3)
    ]


async def test_catalog_wrong_token(make: Make, fake: FakeSmsman) -> None:
    provider = make(services={"tg": 3}, countries={10: 7})
    fake.scenario = "bad_token"
    with pytest.raises(UpstreamAuth):
        await provider.catalog(10)


@pytest.mark.parametrize("shape", ["list", "object"])
async def test_list_and_object_shapes(make: Make, fake: FakeSmsman, shape: str) -> None:
    fake.applications_shape = fake.countries_shape = shape
    provider = make()
    purchase = await provider.buy(Order(service="TG", country=25))
    assert purchase.extra == {"country_id": "9", "application_id": "3"}
    assert await provider.catalog(187) == [
        Offer(service="tg", price=Decimal("60"), count=12)
    ]
    assert calls_to(fake, "get-prices") == [{"token": TOKEN, "country_id": "5"}]


# ---- configuration ---------------------------------------------------------------


async def test_config_overrides_win(make: Make, fake: FakeSmsman) -> None:
    # "tg" -> WhatsApp's id and Vietnam -> Russia's id, to see the override on the wire
    provider = make(services={"tg": "3", "zl": 6}, countries={"10": 0, 99: 7})
    await provider.buy(TG_VN)
    await provider.buy(Order(service="zl", country=99))
    assert [
        (c["country_id"], c["application_id"]) for c in calls_to(fake, "get-number")
    ] == [
        ("0", "3"),
        ("7", "6"),
    ]
    assert calls_to(fake, "countries") == []
    assert 99 in provider.countries()
    assert {o.service for o in await provider.catalog(99)} == {"fb", "tg", "zl"}


def test_countries_and_operators(make: Make) -> None:
    provider = make()
    ids = provider.countries()
    assert len(ids) == 200
    assert {0, 1, 2, 3, 4, 6, 10, 12, 16, 22, 25, 187} <= set(ids)
    assert provider.operators(10) == []
    assert type(provider).can_lookup is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"token": ""}, "providers.sm.token: missing"),
        ({"token": None}, "providers.sm.token: missing"),
        ({"base_url": "ftp://x"}, "providers.sm.base_url:"),
        ({"catalog_ttl": "soon"}, "providers.sm.catalog_ttl:"),
        ({"catalog_ttl": -1}, "providers.sm.catalog_ttl:"),
        ({"poll_interval": "x"}, "providers.sm.poll_interval:"),
        ({"services": ["tg"]}, "providers.sm.services:"),
        ({"services": {"tg": "telegram"}}, "providers.sm.services.tg:"),
        ({"countries": {"vn": 7}}, "providers.sm.countries.vn:"),
    ],
)
def test_config_errors(
    http: UpstreamHttp, options: dict[str, Any], message: str
) -> None:
    base = {**provider_options("http://127.0.0.1:9"), **options}
    with pytest.raises(ConfigError) as info:
        SmsmanProvider.from_options("sm", base, http)
    assert str(info.value).startswith(message)


def test_missing_token_and_describe(http: UpstreamHttp) -> None:
    options = provider_options("http://127.0.0.1:9")
    del options["token"]
    with pytest.raises(ConfigError, match=r"^providers\.sm\.token: missing"):
        SmsmanProvider.from_options("sm", options, http)
    provider = SmsmanProvider.from_options("sm", provider_options("http://127.0.0.1:9"), http)
    assert provider.describe() == (
        "type=smsman base_url=http://127.0.0.1:9/control min_interval=0 token=****"
    )


async def test_fake_answers_post_like_get(url: str, http: UpstreamHttp) -> None:
    status, body = await http.request(
        "sm", "POST", f"{url}/control/get-balance", data={"token": TOKEN}
    )
    assert (status, json.loads(body)) == (200, {"balance": "799.70"})
