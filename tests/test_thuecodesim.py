"""ThuecodesimProvider against FakeThuecodesim over real loopback HTTP."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fakes.thuecodesim import TOKEN, FakeThuecodesim, provider_options
from providers.http import UpstreamHttp
from providers.thuecodesim import (
    SERVICE_LIST_MEMO,
    SERVICES,
    VIETNAM_TZ,
    ThuecodesimProvider,
    classify_failure,
    name_key,
    parse_created_time,
)
from providers.vocabulary import (
    ActivationRef,
    ChannelsLimit,
    ConfigError,
    NoBalance,
    NoNumbers,
    Offer,
    Order,
    PollResult,
    ProviderError,
    Purchase,
    Sms,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)
from tests.conftest import FakeClock, ServeFake, activation_ref, upstream_client

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.25  # 2023-11-15T05:13:20.25+07:00, exact in CreatedTime
SEED_SMS = (
    "486460 la ma xac thuc OTP dang ky vi MoMo. De tranh bi mat tien, tuyet doi "
    "KHONG chia se ma nay voi bat ky ai. zniHFS3HBXG"
)
TG_VN = Order(service="tg", country=10)
TG_LA = Order(service="tg", country=25)


StepClock = FakeClock  # the shared steppable clock (tests/conftest.py)


@dataclass
class Stack:
    """A fake upstream on a loopback port, and a way to build providers against it."""

    fake: FakeThuecodesim
    url: str
    clock: StepClock
    http: UpstreamHttp

    def provider(
        self, http: UpstreamHttp | None = None, **options: Any
    ) -> ThuecodesimProvider:
        merged = {**provider_options(self.url), **options}
        return ThuecodesimProvider.from_options("tcs", merged, http or self.http, self.clock)


@pytest.fixture
async def stack(serve_fake: ServeFake, http: UpstreamHttp) -> Stack:
    fake = FakeThuecodesim()
    clock = StepClock(NOW)
    fake.clock = clock
    return Stack(fake, await serve_fake(fake) + "/", clock, http)


def ref_for(purchase: Purchase, order: Order = TG_VN) -> ActivationRef:
    return activation_ref(purchase, order, NOW)


def last_params(fake: FakeThuecodesim, path: str) -> dict[str, str]:
    return [params for called, params in fake.calls if called == path][-1]


# ---- static facts and tables ---------------------------------------------------------


def test_alias_table_is_substantial_unique_and_uses_real_codes() -> None:
    reference = json.loads(
        (ROOT / "compat_server/data/reference.json").read_text("utf-8")
    )["services"]
    owners: dict[str, str] = {}
    for code, names in SERVICES.items():
        assert code in reference, code
        for alias in names:
            assert owners.setdefault(name_key(alias), code) == code, alias
    assert len(SERVICES) >= 30
    assert {"tg", "fb", "mj", "ka", "lf", "go", "wa", "ig", "tw"} <= set(SERVICES)


def test_facts(stack: Stack) -> None:
    provider = stack.provider()
    assert (provider.type_name, provider.currency, provider.can_lookup) == (
        "thuecodesim",
        "VND",
        True,
    )
    assert provider.countries() == [10, 25]
    assert provider.operators(10) == [
        "viettel",
        "vinaphone",
        "mobifone",
        "vietnamobile",
        "itelecom",
        "wintel",
    ]
    assert provider.operators(25) == ["unitel", "etl", "telekom", "tplus"]
    assert provider.operators(0) == []
    assert "token=****" in provider.describe()
    assert TOKEN not in provider.describe()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("Lỗi xác thực", UpstreamAuth),
        ("Token không hợp lệ", UpstreamAuth),
        ("Số dư tài khoản không đủ", NoBalance),
        ("So du khong du", NoBalance),
        ("Insufficient balance", NoBalance),
        ("Not enough funds", NoBalance),
        ("Kho số đang tạm hết, vui lòng liên hệ hỗ trợ", NoNumbers),
        ("Limit exceeded, tối đa 5 số chờ tin nhắn", ChannelsLimit),
        ("Ứng dụng không tồn tại hoặc đang tạm ngưng", UnknownService),
        ("Service not found", UnknownService),
        ("Có lỗi", NoNumbers),
        ("", NoNumbers),
    ],
)
def test_classify_failure(message: str, error: type[ProviderError]) -> None:
    assert classify_failure(message) is error


def test_parse_created_time() -> None:
    expected = datetime(2020, 8, 6, 17, 13, 24, 880000, VIETNAM_TZ).timestamp()
    assert parse_created_time("2020-08-06T17:13:24.88") == expected
    assert parse_created_time("2020-08-06T10:13:24.88Z") == expected
    assert parse_created_time("2020-08-06T17:13:24.8800000") == expected
    assert parse_created_time(None) is None
    assert parse_created_time("yesterday") is None


# ---- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "place"),
    [
        ({"token": None}, "providers.tcs.token:"),
        ({"token": "  "}, "providers.tcs.token:"),
        ({"base_url": "ftp://x"}, "providers.tcs.base_url:"),
        ({"catalog_ttl": "soon"}, "providers.tcs.catalog_ttl:"),
        ({"catalog_ttl": -1}, "providers.tcs.catalog_ttl:"),
        ({"nominal_stock": True}, "providers.tcs.nominal_stock:"),
        ({"nominal_stock": 2.5}, "providers.tcs.nominal_stock:"),
        ({"rerent_on_retry": "maybe"}, "providers.tcs.rerent_on_retry:"),
        ({"poll_interval": "fast"}, "providers.tcs.poll_interval:"),
        ({"services": ["tg"]}, "providers.tcs.services:"),
        ({"services": {"tg": 4}}, "providers.tcs.services.tg:"),
        ({"services": {"TG!": "Telegram"}}, "providers.tcs.services:"),
    ],
)
def test_bad_options_raise_config_error(
    stack: Stack, options: dict[str, Any], place: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        stack.provider(**options)
    assert str(caught.value).startswith(place)
    assert stack.fake.calls == []


def test_missing_token_raises_config_error(http: UpstreamHttp) -> None:
    with pytest.raises(ConfigError, match=r"^providers\.tcs\.token: missing"):
        ThuecodesimProvider.from_options("tcs", {"base_url": "http://127.0.0.1:9"}, http)


# ---- balance -------------------------------------------------------------------------


async def test_balance(stack: Stack) -> None:
    assert await stack.provider().balance() == Decimal(1_000_000)
    assert stack.fake.calls == [("/users/balance", {"token": TOKEN})]


async def test_balance_with_a_refused_token(stack: Stack) -> None:
    with pytest.raises(UpstreamAuth):
        await stack.provider(token="eyJ.wrong").balance()


# ---- buy -----------------------------------------------------------------------------


async def test_buy_vietnam(stack: Stack) -> None:
    purchase = await stack.provider().buy(TG_VN)
    order = stack.fake.orders["122314"]
    assert purchase == Purchase(
        upstream_id="122314",
        phone="84" + order.phone,
        price=Decimal(1200),
        operator="any",
        extra={"rerent": "84" + order.phone, "country": "vn", "service_id": "4"},
    )
    assert len(order.phone) == 9 and len(purchase.phone) == 11
    assert stack.fake.balance == 1_000_000 - 1200
    assert stack.fake.paths_called() == [
        "/service/getv2",
        "/request/getv2",
        "/session/getv2",  # what it was charged
    ]
    assert last_params(stack.fake, "/request/getv2") == {
        "serviceId": "4",
        "country": "vn",
        "token": TOKEN,
    }


async def test_buy_laos(stack: Stack) -> None:
    purchase = await stack.provider().buy(TG_LA)
    order = stack.fake.orders["122314"]
    assert (order.country, len(order.phone), order.phone[:2]) == ("la", 10, "20")
    assert purchase == Purchase(
        upstream_id="122314",
        phone="856" + order.phone,
        price=Decimal(3000),
        extra={"rerent": "856" + order.phone, "country": "la", "service_id": "101"},
    )
    assert last_params(stack.fake, "/service/getv2")["country"] == "la"
    assert last_params(stack.fake, "/request/getv2") == {
        "serviceId": "101",
        "country": "la",
        "token": TOKEN,
    }


async def test_buy_maps_operators_and_phone_exceptions(stack: Stack) -> None:
    provider = stack.provider()
    order = Order(
        "fb", 10, operators=("viettel", "mobifone"), exclude_prefixes=("8496", "7916")
    )
    purchase = await provider.buy(order)
    params = last_params(stack.fake, "/request/getv2")
    assert (params["network"], params["exceptPrefix"]) == ("VIETTEL|MOBIFONE|", "96|")
    assert purchase.phone.startswith("8497")  # Viettel, 96 excluded
    assert purchase.operator == "any"

    purchase = await provider.buy(Order("fb", 10, operators=("vinaphone",)))
    assert last_params(stack.fake, "/request/getv2")["network"] == "VINAPHONE"
    assert (purchase.operator, purchase.phone[:4]) == ("vinaphone", "8491")

    order = Order("tg", 25, operators=("telekom", "tplus"), exclude_prefixes=("8562",))
    purchase = await provider.buy(order)
    params = last_params(stack.fake, "/request/getv2")
    assert params["network"] == "LAOTEL|BEELINE|"
    assert "exceptPrefix" not in params  # Vietnam only
    assert purchase.phone.startswith("8562055")

    await provider.buy(Order("tg", 10, operators=("any", "viettel")))
    assert "network" not in last_params(stack.fake, "/request/getv2")


async def test_buy_refuses_an_operator_of_another_country(stack: Stack) -> None:
    with pytest.raises(NoNumbers):
        await stack.provider().buy(Order("tg", 25, operators=("viettel",)))
    assert "/request/getv2" not in stack.fake.paths_called()


@pytest.mark.parametrize(
    ("scenario", "error"),
    [
        ("no_numbers", NoNumbers),
        ("no_balance", NoBalance),
        ("bad_service", UnknownService),
        ("bad_token", UpstreamAuth),
        ("limit", ChannelsLimit),
        ("error", NoNumbers),
        ("not_envelope", UpstreamUncertain),
    ],
)
async def test_buy_scenarios(
    stack: Stack, scenario: str, error: type[ProviderError]
) -> None:
    provider = stack.provider()
    await provider.catalog(10)  # warm: the purchase itself meets the scenario
    stack.fake.scenario = scenario
    with pytest.raises(error):
        await provider.buy(TG_VN)
    assert stack.fake.paths_called() == ["/service/getv2", "/request/getv2"]
    assert (stack.fake.orders, stack.fake.balance) == ({}, 1_000_000)


async def test_buy_with_a_refused_token_before_the_catalog(stack: Stack) -> None:
    with pytest.raises(UpstreamAuth):
        await stack.provider(token="eyJ.wrong").buy(TG_VN)
    assert stack.fake.paths_called() == ["/service/getv2"]


async def test_buy_refusals_in_the_ok_scenario(stack: Stack) -> None:
    provider = stack.provider()
    with pytest.raises(UnknownService):
        await provider.buy(Order("vk", 10))  # mapped, not on sale
    with pytest.raises(UnknownService):
        await provider.buy(Order("ot", 10))  # no thuecodesim name at all
    with pytest.raises(UnknownService):
        await provider.buy(Order("tg", 0))  # Russia
    with pytest.raises(NoNumbers):
        await provider.buy(Order("tg", 10, max_price=Decimal(1000)))
    stack.fake.balance = 1000
    with pytest.raises(NoBalance):
        await provider.buy(TG_VN)
    assert stack.fake.paths_called() == ["/service/getv2", "/request/getv2"]
    assert stack.fake.orders == {}


@pytest.mark.parametrize("fault", ["html500", "empty", "malformed", "reset"])
async def test_buy_faults_are_uncertain(stack: Stack, fault: str) -> None:
    stack.fake.fault, stack.fake.fault_paths = fault, {"/request/getv2"}
    with pytest.raises(UpstreamUncertain):
        await stack.provider().buy(TG_VN)
    assert stack.fake.orders == {}


@pytest.mark.parametrize("fault", ["after_500", "after_reset"])
async def test_buy_fault_after_the_sale_is_uncertain(stack: Stack, fault: str) -> None:
    stack.fake.fault, stack.fake.fault_paths = fault, {"/request/getv2"}
    with pytest.raises(UpstreamUncertain):
        await stack.provider().buy(TG_VN)
    assert list(stack.fake.orders) == ["122314"]
    assert stack.fake.balance == 1_000_000 - 1200


@pytest.mark.parametrize("fault", ["hang", "after_hang"])
async def test_buy_hang_is_uncertain(stack: Stack, fault: str) -> None:
    stack.fake.fault, stack.fake.fault_paths = fault, {"/request/getv2"}
    stack.fake.hang_seconds = 0.4
    async with upstream_client(read_timeout=0.15) as short:
        with pytest.raises(UpstreamUncertain):
            await stack.provider(http=short).buy(TG_VN)
    assert len(stack.fake.orders) == (1 if fault == "after_hang" else 0)


async def test_buy_connection_refused_is_unreachable(http: UpstreamHttp) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = ThuecodesimProvider.from_options(
        "tcs", provider_options(f"http://127.0.0.1:{port}"), http
    )
    with pytest.raises(UpstreamUnreachable):
        await provider.buy(TG_VN)


async def test_buy_catalog_failure_means_nothing_was_sent(stack: Stack) -> None:
    stack.fake.fault, stack.fake.fault_paths = "html500", {"/service/getv2"}
    with pytest.raises(UpstreamUnreachable):
        await stack.provider().buy(TG_VN)
    assert stack.fake.paths_called() == ["/service/getv2"]


# ---- poll ----------------------------------------------------------------------------


async def test_poll_waiting_received_and_quirky_types(stack: Stack) -> None:
    provider = stack.provider()
    purchase = await provider.buy(TG_VN)
    ref = ref_for(purchase)
    assert await provider.poll(ref) == PollResult()
    assert last_params(stack.fake, "/session/getv2") == {
        "requestId": "122314",
        "token": TOKEN,
    }

    stack.fake.deliver("122314", "Telegram code 55123", "55123")
    expected = PollResult(
        messages=(Sms("122314:55123", "Telegram code 55123", "55123", NOW),)
    )
    assert await provider.poll(ref) == expected
    stack.fake.field_list_types = True  # ID "122314", Status "1", IsSound false
    assert await provider.poll(ref) == expected


async def test_poll_extracts_the_code_when_code_is_empty(stack: Stack) -> None:
    provider = stack.provider()
    ref = ref_for(await provider.buy(TG_VN))
    stack.fake.deliver("122314", SEED_SMS, None)
    assert await provider.poll(ref) == PollResult(
        messages=(Sms("122314:486460", SEED_SMS, "486460", NOW),)
    )


async def test_poll_voice_otp(stack: Stack) -> None:
    provider = stack.provider()
    ref = ref_for(await provider.buy(TG_VN))
    url = "https://audio.thuecodesim.com/1234500000123456789000006789.wav"
    stack.fake.deliver("122314", url, "486460")
    assert await provider.poll(ref) == PollResult(
        messages=(Sms("122314:486460", url, "486460", NOW),)
    )


async def test_poll_voice_without_code_keeps_waiting(stack: Stack) -> None:
    provider = stack.provider()
    ref = ref_for(await provider.buy(TG_VN))
    stack.fake.deliver("122314", "https://audio.thuecodesim.com/20240101.wav", None)
    assert await provider.poll(ref) == PollResult()  # never digits from a URL


async def test_poll_expired(stack: Stack) -> None:
    provider = stack.provider()
    ref = ref_for(await provider.buy(TG_VN))
    stack.fake.expire("122314")
    assert await provider.poll(ref) == PollResult(closed=True)


@pytest.mark.parametrize("fault", ["html500", "empty", "malformed", "bad_token", "id"])
async def test_poll_failures_are_uncertain(stack: Stack, fault: str) -> None:
    provider = stack.provider()
    ref = ref_for(await provider.buy(TG_VN))
    if fault == "bad_token":
        stack.fake.scenario = "bad_token"
    elif fault == "id":
        ref = ActivationRef("999", ref.phone, "tg", 10, NOW, ref.extra)  # unknown id
    else:
        stack.fake.fault = fault
    with pytest.raises(UpstreamUncertain):
        await provider.poll(ref)


# ---- retry, finish, cancel -----------------------------------------------------------


async def test_retry_without_rerent_waits(stack: Stack) -> None:
    provider = stack.provider()
    ref = ref_for(await provider.buy(TG_VN))
    calls = len(stack.fake.calls)
    assert await provider.retry(ref) is None
    await provider.finish(ref)  # local only: nothing to call upstream
    await provider.cancel(ref)
    assert len(stack.fake.calls) == calls


@pytest.mark.parametrize("order", [TG_VN, TG_LA])
async def test_retry_with_rerent_buys_the_same_number(
    stack: Stack, order: Order
) -> None:
    provider = stack.provider(rerent_on_retry=True)
    first = await provider.buy(order)
    second = await provider.retry(ref_for(first, order))
    assert second == Purchase(
        upstream_id="122315",
        phone=first.phone,
        price=first.price,
        extra=first.extra,
    )
    assert last_params(stack.fake, "/request/getv2") == {
        "serviceId": first.extra["service_id"],
        "country": first.extra["country"],
        "number": first.phone,
        "token": TOKEN,
    }
    assert stack.fake.balance == 1_000_000 - 2 * int(first.price)
    assert stack.fake.orders["122315"].phone == stack.fake.orders["122314"].phone


# ---- catalog -------------------------------------------------------------------------


async def test_catalog(stack: Stack) -> None:
    provider = stack.provider(nominal_stock=7)
    assert await provider.catalog(10) == [
        Offer("fb", Decimal(800), 7),
        Offer("ka", Decimal(600), 7),
        Offer("mj", Decimal(700), 7),
        Offer("tg", Decimal(1200), 7),
        Offer("lf", Decimal(900), 7),
        Offer("go", Decimal(1100), 7),  # "Google" outranks "Gmail"
        Offer("dl", Decimal(500), 7),
        Offer("jg", Decimal(700), 7),
        Offer("wa", Decimal(1500), 7),
        Offer("ig", Decimal(1000), 7),
        Offer("oi", Decimal(1500), 7),
        Offer("tw", Decimal(1000), 7),
    ]
    assert await provider.catalog(25) == [
        Offer("tg", Decimal(3000), 7),
        Offer("fb", Decimal(2500), 7),
        Offer("wa", Decimal(3500), 7),
        Offer("lf", Decimal(2000), 7),
    ]
    assert await provider.catalog(0) == []
    assert stack.fake.calls == [
        ("/service/getv2", {"country": "vn", "token": TOKEN}),
        ("/service/getv2", {"country": "la", "token": TOKEN}),
    ]
    await provider.buy(Order("go", 10))
    assert last_params(stack.fake, "/request/getv2")["serviceId"] == "8"


async def test_catalog_is_fresh_and_buy_reuses_the_service_list_memo(
    stack: Stack,
) -> None:
    # the catalog cache is the engine's (upstream.catalog_ttl, test_provider_battery);
    # the provider asks every time and keeps the answer for buy to resolve the id
    provider = stack.provider()
    first = await provider.catalog(10)
    stack.clock.now += 59
    assert await provider.catalog(10) == first
    await provider.buy(TG_VN)
    assert stack.fake.paths_called() == [
        "/service/getv2",
        "/service/getv2",
        "/request/getv2",
        "/session/getv2",
    ]
    stack.clock.now += SERVICE_LIST_MEMO + 1
    await provider.buy(TG_VN)
    assert stack.fake.paths_called()[4:] == [
        "/service/getv2",
        "/request/getv2",
        "/session/getv2",
    ]


async def test_provider_catalog_ttl_is_deprecated_with_one_warning(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="providers.thuecodesim"):
        provider = stack.provider(catalog_ttl=600)
        stack.provider()  # without the option: no warning
    assert [r.getMessage() for r in caplog.records] == [
        "providers.tcs.catalog_ttl is deprecated and ignored: the catalog is "
        "cached once, upstream.catalog_ttl"
    ]
    await provider.catalog(10)
    await provider.catalog(10)
    assert stack.fake.paths_called() == ["/service/getv2", "/service/getv2"]


async def test_catalog_failures(stack: Stack) -> None:
    provider = stack.provider()
    stack.fake.fault = "html500"
    with pytest.raises(UpstreamUncertain):
        await provider.catalog(10)
    stack.fake.fault, stack.fake.scenario = None, "bad_token"
    with pytest.raises(UpstreamAuth):
        await provider.catalog(10)


async def test_services_option_overrides_the_table(stack: Stack) -> None:
    provider = stack.provider(
        services={"ot": "Momo", "mj": ["Zalo Pay"], "fb": None, "tg": "TELE-GRAM"}
    )
    offers = {offer.service: offer.price for offer in await provider.catalog(10)}
    assert (offers["ot"], offers["mj"]) == (Decimal(350), Decimal(400))
    assert "fb" not in offers and "tg" in offers
    purchase = await provider.buy(Order("ot", 10))
    assert (purchase.price, purchase.extra["service_id"]) == (Decimal(350), "1")
    with pytest.raises(UnknownService):
        await provider.buy(Order("fb", 10))


# ---- lookup --------------------------------------------------------------------------


async def test_lookup_finds_a_purchase_made_under_after_500(stack: Stack) -> None:
    provider = stack.provider()
    await provider.buy(TG_VN)  # an older order, outside the window
    await provider.buy(Order("fb", 10))  # another service
    stack.clock.now += 3600
    since = stack.clock.now
    stack.fake.fault, stack.fake.fault_paths = "after_500", {"/request/getv2"}
    with pytest.raises(UpstreamUncertain):
        await provider.buy(TG_VN)
    stack.fake.fault = None
    stack.clock.now += 5
    order = stack.fake.orders["122316"]
    assert await provider.lookup_purchases(TG_VN, since) == [
        Purchase(
            upstream_id="122316",
            phone="84" + order.phone,
            price=Decimal(1200),
            extra={"rerent": "84" + order.phone, "country": "vn", "service_id": "4"},
            created_at=since,  # the offset was learned from the earlier buys
        )
    ]
    assert last_params(stack.fake, "/session/historyv2") == {
        "service": "4",
        "limit": "50",
        "fromDate": "2023-11-15",
        "toDate": "2023-11-15",
        "token": TOKEN,
    }
    assert await provider.lookup_purchases(Order("wa", 10), since) == []
    assert await provider.lookup_purchases(Order("tg", 0), since) == []


async def test_lookup_failure(stack: Stack) -> None:
    provider = stack.provider()
    await provider.catalog(10)
    stack.fake.fault, stack.fake.fault_paths = "malformed", {"/session/historyv2"}
    with pytest.raises(UpstreamUncertain):
        await provider.lookup_purchases(TG_VN, NOW)
