"""SmspvaProvider against the fake smspva (real HTTP on 127.0.0.1, no mocks)."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from decimal import Decimal
from importlib import resources
from typing import Any

import pytest

from fakes.smspva import API_KEY, FakeSmspva, FakeSmspvaOrder, provider_options
from providers.http import UpstreamHttp
from providers.otp import extract_code
from providers.smspva import PRICE_LIST_MEMO, SmspvaProvider
from providers.smspva_rent import SmspvaRentProvider
from providers.vocabulary import (
    ActivationRef,
    ConfigError,
    NoBalance,
    NoNumbers,
    Offer,
    Order,
    PollResult,
    ProviderError,
    Purchase,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)
from tests.conftest import FakeClock, ServeFake, activation_ref, upstream_client

TG_VN = Order(service="tg", country=10)
TG_RU = Order(service="tg", country=0)
NOW = 1_700_000_000.0
WEEK = 7 * 86400
BOTH = pytest.mark.parametrize("api", ["activation", "rent"])


Clock = FakeClock  # the shared steppable clock (tests/conftest.py)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def fake(clock: Clock) -> FakeSmspva:
    return FakeSmspva(now=clock)


@pytest.fixture
async def url(serve_fake: ServeFake, fake: FakeSmspva) -> str:
    return await serve_fake(fake)


Make = Callable[..., Any]  # SmspvaProvider, or SmspvaRentProvider for api=rent


@pytest.fixture
def make(url: str, http: UpstreamHttp, clock: Clock) -> Make:
    def build(
        api: str = "activation", client: UpstreamHttp | None = None, **extra: Any
    ) -> Any:
        options = {**provider_options(url, api), **extra}
        cls = SmspvaRentProvider if api == "rent" else SmspvaProvider
        return cls.from_options("pva", options, client or http, clock)

    return build


def ref_for(purchase: Purchase, order: Order = TG_RU) -> ActivationRef:
    return activation_ref(purchase, order, NOW)


def fake_order(fake: FakeSmspva, purchase: Purchase) -> FakeSmspvaOrder:
    order = fake.orders[purchase.upstream_id]
    assert isinstance(order, FakeSmspvaOrder)
    return order


# ---- tables and configuration --------------------------------------------------------


def test_tables_are_consistent() -> None:
    tables = json.loads(
        resources.files("providers").joinpath("data/smspva.json").read_text("utf-8")
    )
    sourced = [code for codes in tables["service_sources"].values() for code in codes]
    assert sorted(sourced) == sorted(tables["services"])  # one source per entry
    assert set(tables["countries"].values()) == set(tables["dial_codes"])
    required = {"tg": "opt29", "wa": "opt20", "fb": "opt2", "go": "opt1"}
    required |= {"ig": "opt16", "ot": "opt19", "mj": "opt158", "ka": "opt48"}
    required |= {"lf": "opt104"}
    assert required.items() <= tables["services"].items()
    reference = json.loads(
        resources.files("compat_server")
        .joinpath("data/reference.json")
        .read_text("utf-8")
    )
    iso = {str(c["id"]): c["iso"] for c in reference["countries"]}
    assert all(iso[key] == value for key, value in tables["countries"].items())
    assert set(tables["services"]) <= set(reference["services"])


def test_countries_per_api(make: Make) -> None:
    activation = make().countries()
    assert {0, 10, 25, 16, 187} <= set(activation)
    assert make("rent").countries() == [c for c in activation if c not in (10, 25)]


def test_class_facts_and_poll_floor(make: Make, http: UpstreamHttp) -> None:
    assert (SmspvaProvider.type_name, SmspvaProvider.currency) == ("smspva", "USD")
    assert SmspvaProvider.min_interval == 4.5 and SmspvaProvider.can_lookup
    assert make(poll_interval=1).poll_interval == 5.0
    assert make(poll_interval=7).poll_interval == 7.0
    default = SmspvaProvider.from_options("pva", {"api_key": API_KEY}, http)
    assert (default.min_interval, default.poll_interval) == (4.5, 5.0)
    assert make().describe().count("api_key=****") == 1
    assert API_KEY not in make().describe()


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"api_key": ""}, "api_key"),
        ({"api_key": None}, "api_key"),
        ({"api": "v1"}, "api"),
        ({"rent": {"dtype": "day", "dcount": 1}}, "rent.dtype"),
        ({"rent": {"dtype": "week", "dcount": 0}}, "rent.dcount"),
        ({"rent": "week"}, "rent"),
        ({"services": {"tg": "29"}}, "services.tg"),
        ({"countries": {"10": "Vietnam"}}, "countries.10"),
        ({"countries": {"999": "ZZ"}}, "countries.999"),
        ({"catalog_ttl": -1}, "catalog_ttl"),
        ({"min_interval": "fast"}, "min_interval"),
        ({"activation_url": "ftp://x"}, "activation_url"),
    ],
)
def test_bad_options(make: Make, extra: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^providers\.pva\.{key}: "):
        make(**extra)


# ---- balance -------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("style", ["number", "string", "bare"])
async def test_balance(make: Make, fake: FakeSmspva, api: str, style: str) -> None:
    fake.balance_style = style
    assert await make(api).balance() == Decimal("10.5")
    assert fake.paths_called() == ["/activation/balance"]


@BOTH
async def test_balance_wrong_key(make: Make, api: str) -> None:
    with pytest.raises(UpstreamAuth):
        await make(api, api_key="not-the-key").balance()


# ---- buy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "phone", "national", "path"),
    [
        (TG_VN, "84912345670", "912345670", "/activation/number/VN/opt29"),
        (TG_RU, "79876543210", "9876543210", "/activation/number/RU/opt29"),
    ],
)
async def test_buy_activation_prefixes_dial_code(
    make: Make, fake: FakeSmspva, order: Order, phone: str, national: str, path: str
) -> None:
    purchase = await make().buy(order)
    assert purchase == Purchase(
        upstream_id="123457", phone=phone, price=Decimal(0), operator="any"
    )
    assert fake.paths_called() == [path]
    assert fake_order(fake, purchase).phone == national  # sent as a JSON integer


async def test_buy_activation_operator_segment(make: Make, fake: FakeSmspva) -> None:
    order = Order(service="tg", country=10, operators=("viettel",))
    purchase = await make().buy(order)
    assert purchase.operator == "viettel"
    assert fake.paths_called() == ["/activation/number/VN/opt29/viettel"]
    assert fake_order(fake, purchase).operator == "viettel"


async def test_buy_activation_price_from_catalog(make: Make, fake: FakeSmspva) -> None:
    provider = make()
    await provider.catalog(10)
    purchase = await provider.buy(TG_VN)
    assert purchase.price == Decimal("0.25")
    with pytest.raises(NoNumbers):
        await provider.buy(Order(service="tg", country=10, max_price=Decimal("0.2")))
    assert len(fake.orders) == 1


async def test_buy_rent_creates_then_activates(
    make: Make, fake: FakeSmspva, clock: Clock
) -> None:
    provider = make("rent")
    await provider.catalog(0)
    purchase = await provider.buy(TG_RU)
    until = int(NOW) + WEEK
    assert purchase == Purchase(
        upstream_id="123457",
        phone="79876543210",
        price=Decimal("3.5"),
        extra={"until": str(until), "activated": "1"},
    )
    order = fake_order(fake, purchase)
    assert (order.active, order.until, order.calls) == (True, until, ["activate"])
    assert [p["method"] for _, p in fake.calls] == ["getdata", "create", "activate"]
    create = fake.calls[1][1]
    assert (create["dtype"], create["dcount"], create["country"]) == ("week", "1", "RU")
    assert (create["service"], create["apikey"]) == ("opt29", API_KEY)
    assert fake.balance == pytest.approx(10.5 - 3.5)


async def test_buy_rent_month_period(make: Make, fake: FakeSmspva) -> None:
    fake.balance = 100.0
    provider = make("rent", rent={"dtype": "month", "dcount": 2})
    assert await provider.catalog(0) == [Offer("tg", Decimal(30), 5)]
    purchase = await provider.buy(TG_RU)
    assert (purchase.price, fake.balance) == (Decimal(30), 70.0)
    assert purchase.extra["until"] == str(int(NOW) + 60 * 86400)


@pytest.mark.parametrize("fault", ["html500", "after_500"])
async def test_buy_rent_activate_failure_still_returns_purchase(
    make: Make, fake: FakeSmspva, fault: str
) -> None:
    fake.method_faults["activate"] = fault
    provider = make("rent")
    purchase = await provider.buy(TG_RU)
    assert purchase.phone == "79876543210"
    assert purchase.extra == {"until": str(int(NOW) + WEEK), "activated": "0"}
    order = fake_order(fake, purchase)
    assert order.active is (fault == "after_500")
    fake.method_faults.clear()
    await provider.ready(ref_for(purchase))
    assert fake_order(fake, purchase).active is True


@BOTH
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
    make: Make, fake: FakeSmspva, api: str, scenario: str, error: type[Exception]
) -> None:
    fake.scenario = scenario
    with pytest.raises(error):
        await make(api).buy(TG_RU)
    assert fake.orders == {}
    assert len(fake.calls) == 1


@BOTH
@pytest.mark.parametrize("scenario", ["ok", "no_numbers", "no_balance", "bad_service"])
async def test_wrong_key_is_auth_whatever_the_scenario(
    make: Make, fake: FakeSmspva, api: str, scenario: str
) -> None:
    fake.scenario = scenario
    with pytest.raises(UpstreamAuth):
        await make(api, api_key="wrong-key-0000").buy(TG_RU)
    assert fake.orders == {}


@BOTH
async def test_buy_unmapped_is_unknown_service_without_a_call(
    make: Make, fake: FakeSmspva, api: str
) -> None:
    provider = make(api)
    for order in (Order(service="zz", country=0), Order(service="tg", country=199)):
        with pytest.raises(UnknownService):
            await provider.buy(order)
    if api == "rent":
        with pytest.raises(UnknownService):
            await provider.buy(TG_VN)  # the rental list has no Vietnam
    assert fake.calls == []


async def test_buy_activation_not_in_stock(make: Make, fake: FakeSmspva) -> None:
    with pytest.raises(NoNumbers):
        await make().buy(Order(service="wa", country=0))
    assert fake.paths_called() == ["/activation/number/RU/opt20"]


async def test_overrides(make: Make, fake: FakeSmspva) -> None:
    provider = make(services={"tg": "opt99"}, countries={"16": "UK", "12": "US"})
    assert 12 in provider.countries()
    with pytest.raises(NoNumbers):
        await provider.buy(Order(service="tg", country=16))
    assert fake.paths_called() == ["/activation/number/UK/opt99"]


@BOTH
@pytest.mark.parametrize("fault", ["html500", "empty", "malformed", "after_500"])
async def test_buy_faults_are_uncertain(
    make: Make, fake: FakeSmspva, api: str, fault: str
) -> None:
    fake.fault = fault
    with pytest.raises(UpstreamUncertain):
        await make(api).buy(TG_RU)
    assert len(fake.orders) == (1 if fault == "after_500" else 0)


@BOTH
async def test_buy_hang_is_uncertain(make: Make, fake: FakeSmspva, api: str) -> None:
    fake.fault, fake.hang_seconds = "hang", 0.5
    async with upstream_client(read_timeout=0.1, connect_timeout=0.1) as client:
        with pytest.raises(UpstreamUncertain):
            await make(api, client=client).buy(TG_RU)


@BOTH
async def test_refused_port_is_unreachable(
    http: UpstreamHttp, clock: Clock, api: str
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = provider_options(f"http://127.0.0.1:{port}", api)
    cls = SmspvaRentProvider if api == "rent" else SmspvaProvider
    provider = cls.from_options("pva", options, http, clock)
    with pytest.raises(UpstreamUnreachable):
        await provider.buy(TG_RU)


# ---- poll, retry, cancel, finish -----------------------------------------------------


async def test_poll_activation_lifecycle(make: Make, fake: FakeSmspva) -> None:
    provider = make()
    purchase = await provider.buy(TG_RU)
    ref = ref_for(purchase)
    assert await provider.poll(ref) == PollResult()
    fake.deliver(purchase.upstream_id, "Telegram code 12345", "12345")
    assert fake.balance == pytest.approx(10.5 - 0.35)  # charged at the SMS
    first = await provider.poll(ref)
    assert [(m.uid, m.text, m.code) for m in first.messages] == [
        ("12345Telegram code 12345", "Telegram code 12345", "12345")
    ]
    assert first.closed is False
    assert await provider.retry(ref) is None
    assert fake_order(fake, purchase).calls[-1] == "clearsms"
    assert await provider.poll(ref) == PollResult()
    fake.deliver(purchase.upstream_id, "Telegram code 67890", "67890")
    second = await provider.poll(ref)
    assert [m.code for m in second.messages] == ["67890"]
    assert second.messages[0].uid != first.messages[0].uid


async def test_poll_activation_extracts_code(make: Make, fake: FakeSmspva) -> None:
    provider = make()
    purchase = await provider.buy(TG_RU)
    fake.deliver(purchase.upstream_id, "Code Instagram: 671 094.", None)
    result = await provider.poll(ref_for(purchase))
    assert [m.code for m in result.messages] == ["671094"]


async def test_poll_activation_closed(make: Make, fake: FakeSmspva) -> None:
    provider = make()
    purchase = await provider.buy(TG_RU)
    fake.expire(purchase.upstream_id)
    assert await provider.poll(ref_for(purchase)) == PollResult(closed=True)
    unknown = ActivationRef("999", "7", "tg", 0, NOW)
    assert await provider.poll(unknown) == PollResult(closed=True)


@pytest.mark.parametrize("fault", ["html500", "malformed"])
async def test_poll_activation_garbage_is_uncertain(
    make: Make, fake: FakeSmspva, fault: str
) -> None:
    provider = make()
    purchase = await provider.buy(TG_RU)
    fake.fault = fault
    with pytest.raises(UpstreamUncertain):
        await provider.poll(ref_for(purchase))


@pytest.mark.parametrize("style", ["list", "smslist"])
async def test_poll_rent(
    make: Make, fake: FakeSmspva, clock: Clock, style: str
) -> None:
    fake.sms_style = style
    provider = make("rent")
    purchase = await provider.buy(TG_RU)
    ref = ref_for(purchase)
    assert await provider.poll(ref) == PollResult()
    clock.now += 60
    fake.deliver(purchase.upstream_id, "Code Instagram: 671 094.", "ignored")
    clock.now += 60
    fake.deliver(purchase.upstream_id, "Your Telegram code: 55821")
    result = await provider.poll(ref)
    assert [(m.uid, m.code, m.received_at) for m in result.messages] == [
        (f"{int(NOW) + 60}:Code Instagram: 671 094.", "671094", NOW + 60),
        (f"{int(NOW) + 120}:Your Telegram code: 55821", "55821", NOW + 120),
    ]
    assert result.closed is False
    assert extract_code("Code Instagram: 671 094.") == "671094"
    assert await provider.retry(ref) is None
    clock.now = NOW + WEEK
    expired = await provider.poll(ref)
    assert (len(expired.messages), expired.closed) == (2, True)
    fake.fault = "html500"
    assert await provider.poll(ref) == PollResult(closed=True)


async def test_cancel_activation(make: Make, fake: FakeSmspva) -> None:
    provider = make()
    purchase = await provider.buy(TG_RU)
    ref = ref_for(purchase)
    await provider.cancel(ref)
    order = fake_order(fake, purchase)
    assert (order.state, order.calls) == ("cancelled", ["cancelorder"])
    await provider.cancel(ref)  # 410: already closed
    await provider.cancel(ActivationRef("999", "7", "tg", 0, NOW))  # 406
    assert order.calls == ["cancelorder", "cancelorder"]
    with pytest.raises(UpstreamAuth):
        await make(api_key="wrong-key-0000").cancel(ref)


async def test_cancel_rent(make: Make, fake: FakeSmspva) -> None:
    provider = make("rent")
    purchase = await provider.buy(TG_RU)
    ref = ref_for(purchase)
    await provider.cancel(ref)
    order = fake_order(fake, purchase)
    assert (order.state, order.calls) == ("cancelled", ["activate", "delete"])
    await provider.cancel(ref)  # status 0: already gone
    assert fake.calls[-1][1]["method"] == "delete"


@BOTH
async def test_finish_is_local(make: Make, fake: FakeSmspva, api: str) -> None:
    provider = make(api)
    purchase = await provider.buy(TG_RU)
    before = len(fake.calls)
    await provider.finish(ref_for(purchase))
    if api == "activation":
        await provider.ready(ref_for(purchase))
    assert len(fake.calls) == before


async def test_retry_on_closed_activation_is_quiet(
    make: Make, fake: FakeSmspva
) -> None:
    provider = make()
    purchase = await provider.buy(TG_RU)
    assert await provider.retry(ref_for(purchase)) is None  # 404: nothing to clear
    fake.expire(purchase.upstream_id)
    assert await provider.retry(ref_for(purchase)) is None


# ---- catalog and lookup ----------------------------------------------------------


async def test_catalog_activation(make: Make, fake: FakeSmspva) -> None:
    provider = make()
    assert await provider.catalog(0) == [Offer("tg", Decimal("0.35"), 42)]
    assert await provider.catalog(10) == [Offer("tg", Decimal("0.25"), 42)]
    assert await provider.catalog(199) == []
    assert fake.paths_called() == [
        "/activation/servicesprices",
        "/activation/countnumbers/RU",
        "/activation/countnumbers/VN",
    ]  # one price list serves every country (PRICE_LIST_MEMO)


async def test_catalog_is_fresh_but_the_price_list_is_shared(
    make: Make, fake: FakeSmspva, clock: Clock
) -> None:
    # the catalog cache is the engine's (upstream.catalog_ttl, test_provider_battery);
    # the provider asks the stock again and reuses only the all-country price list
    provider = make()
    first = await provider.catalog(0)
    clock.now += PRICE_LIST_MEMO - 1
    assert await provider.catalog(0) == first
    clock.now += 2
    assert await provider.catalog(0) == first
    assert fake.paths_called() == [
        "/activation/servicesprices",
        "/activation/countnumbers/RU",
        "/activation/countnumbers/RU",
        "/activation/servicesprices",
        "/activation/countnumbers/RU",
    ]


@pytest.mark.parametrize("api", ["activation", "rent"])
async def test_provider_catalog_ttl_is_deprecated_with_one_warning(
    make: Make, caplog: pytest.LogCaptureFixture, api: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="providers.smspva"):
        make(api, catalog_ttl=600)
        make(api)  # without the option: no warning
    assert [r.getMessage() for r in caplog.records] == [
        "providers.pva.catalog_ttl is deprecated and ignored: the catalog is "
        "cached once, upstream.catalog_ttl"
    ]


async def test_catalog_rent(make: Make, fake: FakeSmspva) -> None:
    provider = make("rent")
    assert await provider.catalog(0) == [Offer("tg", Decimal("3.5"), 5)]
    assert await provider.catalog(10) == []
    assert await provider.catalog(16) == []
    assert [p["country"] for _, p in fake.calls] == ["RU", "GB"]


@BOTH
async def test_lookup_finds_order_bought_under_after_500(
    make: Make, fake: FakeSmspva, clock: Clock, api: str
) -> None:
    provider = make(api)
    fake.fault = "after_500"
    with pytest.raises(UpstreamUncertain):
        await provider.buy(TG_RU)
    fake.fault = None
    found = await provider.lookup_purchases(TG_RU, since=NOW - 5)
    assert [(p.upstream_id, p.phone) for p in found] == [("123457", "79876543210")]
    assert list(fake.orders) == ["123457"]
    assert await provider.lookup_purchases(TG_VN, since=NOW - 5) == []
    assert await provider.lookup_purchases(TG_RU, since=NOW + 3600) == []
    assert await provider.lookup_purchases(Order("wa", 0), since=NOW - 5) == []


# ---- pacing ---------------------------------------------------------------------


async def test_min_interval_spaces_calls(make: Make, fake: FakeSmspva) -> None:
    """The option reaches the Pacer (a short interval: this is about the option; smspva's
    real 4.5 s spacing is tests/test_pacing.py's condition)."""
    provider = make(min_interval=0.05)
    started = time.monotonic()
    for _ in range(3):
        await provider.balance()
    assert time.monotonic() - started >= 0.1
    unpaced = make()
    started = time.monotonic()
    for _ in range(3):
        await unpaced.balance()
    assert time.monotonic() - started < 0.1


async def test_errors_never_leak_foreign_exceptions(
    make: Make, fake: FakeSmspva
) -> None:
    fake.fault = "reset"
    for call in (make().balance(), make("rent").catalog(0)):
        with pytest.raises(ProviderError):
            await call


# ---- two providers, one account: the config picks the class -----------------------------


def test_api_rent_in_the_config_builds_the_rental_provider() -> None:
    from compat_server.config import parse_config
    from providers import get_provider_class

    for entry in ({"type": "smspva", "api": "rent"}, {"type": "smspva_rent"}):
        config = parse_config({
            "keys": [{"key": "k" * 32, "providers": ["pva"]}],
            "currency": {"display": "USD"},
            "providers": {"pva": {**entry, "api_key": API_KEY}},
        })  # fmt: skip
        assert config.providers["pva"].type == "smspva_rent"
        assert get_provider_class("smspva_rent") is SmspvaRentProvider
    activation = parse_config({
        "keys": [{"key": "k" * 32, "providers": ["pva"]}],
        "currency": {"display": "USD"},
        "providers": {"pva": {"type": "smspva", "api_key": API_KEY}},
    })  # fmt: skip
    assert activation.providers["pva"].type == "smspva"


def test_each_class_serves_only_its_api(http: UpstreamHttp) -> None:
    with pytest.raises(ConfigError) as rent:
        SmspvaProvider.from_options("pva", {"api_key": API_KEY, "api": "rent"}, http)
    assert str(rent.value) == "providers.pva.api: 'rent' is not served here"
    with pytest.raises(ConfigError) as activation:
        SmspvaRentProvider.from_options("pva", {"api_key": API_KEY, "api": "activation"}, http)
    assert str(activation.value) == "providers.pva.api: 'activation' is not served here"
    assert SmspvaRentProvider.from_options("pva", {"api_key": API_KEY}, http).api == "rent"
