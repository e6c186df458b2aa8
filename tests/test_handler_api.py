"""The ``handler_api`` provider: sms-activate clones as backends, through our server.

Fakes in ``fakes/handler_api.py``: sms-activate itself (V2 actions, early-cancel
window, getActiveActivations), sms3t and sms-service-online (from their seeds). The
battery in test_provider_battery.py runs the two seeded clones through every common
row; this file covers what is particular to clones: the V2 calls and their fallback,
the quirks clones answer with, money rules (lost purchases, cancels refused at first),
lang/currency, POST, published clients, and a chain where the upstream is sms-compat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compat_server.app import create_app
from compat_server.config import parse_config
from compat_server.engine import RECONCILE_WINDOW, Engine
from compat_server.store import (
    CANCELLED,
    CONFIRMED,
    FINISHED,
    RECONCILED,
    REFUSED,
    UNCERTAIN,
    WAIT_CODE,
)
from fakes import handler_api as fakes
from fakes.handler_api import FakeHandlerApi
from providers.handler_api import (
    AUTH_TOKENS,
    NO_BALANCE_TOKENS,
    NO_NUMBERS_TOKENS,
    UNKNOWN_SERVICE_TOKENS,
    HandlerApiProvider,
    HandlerApiSettings,
    decode,
)
from providers.vocabulary import (
    NoBalance,
    NoNumbers,
    Order,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
)
from tests.conftest import (
    KEY,
    OTHER_KEY,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
    upstream_client,
)

TEXT = "text/plain"
NAME = "clone"


@dataclass
class Clone:
    """A fake clone, our server in front of it, and the shared clock."""

    fake: FakeHandlerApi
    client: TestClient
    clock: FakeClock

    @property
    def engine(self) -> Engine:
        return engine_of(self.client)

    @property
    def provider(self) -> HandlerApiProvider:
        provider = self.engine.providers[NAME]
        assert isinstance(provider, HandlerApiProvider)
        return provider

    async def get(self, **params: Any) -> tuple[int, str, str]:
        return await call(self.client, **params)

    async def buy(self, **params: Any) -> tuple[int, str]:
        """getNumber tg/Vietnam: (our id, the clone's id)."""
        params = {"service": "tg", "country": 10, **params}
        status, ctype, body = await self.get(action="getNumber", **params)
        assert (status, ctype) == (200, TEXT) and body.startswith("ACCESS_NUMBER:"), (
            body
        )
        stored = await self.engine.store.get(int(body.split(":")[1]))
        assert (
            stored is not None and body == f"ACCESS_NUMBER:{stored.id}:{stored.phone}"
        )
        assert self.fake.orders[stored.upstream_id].phone == stored.phone
        return stored.id, stored.upstream_id

    async def status(self, ident: int, action: str = "getStatus") -> str:
        self.clock.advance(10)  # past the poll interval
        _, _, body = await self.get(action=action, id=ident)
        return body


Start = Callable[..., Any]


@pytest.fixture
def start_clone(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> Start:
    async def start(
        make: Callable[[], FakeHandlerApi],
        options: Callable[[str], dict[str, Any]],
        **overrides: Any,
    ) -> Clone:
        fake = make()
        fake.clock = clock
        server: TestServer = await aiohttp_server(fake.app)
        provider = options(str(server.make_url("")).rstrip("/"))
        provider.update(overrides)
        provider = {k: v for k, v in provider.items() if v is not None}
        config = parse_config({
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"USD": "90"}},
            "upstream": {"connect_timeout": 0.5, "read_timeout": 0.5},
            "keys": [{"key": KEY, "alias": "clones", "providers": [NAME]}],
            "providers": {NAME: provider},
        })  # fmt: skip
        return Clone(fake, await start_app(config), clock)

    return start


# ---- sms-activate itself: getNumberV2 / getStatusV2 ------------------------------------


async def test_v2_buy_passes_the_order_on_and_reads_the_cost(
    start_clone: Start,
) -> None:
    clone = await start_clone(fakes.FakeSmsActivate, fakes.sms_activate_options)
    ident, upstream = await clone.buy(
        operator="viettel", maxPrice="13", phoneException="849,8497"
    )
    # the price limit made the router read the catalogue, then a fresh quote right
    # before the paid call; V2 tells the cost itself
    assert clone.fake.actions_called() == ["getPrices", "getPrices", "getNumberV2"]
    sent = clone.fake.bought[0]
    assert (sent["service"], sent["country"], sent["operator"]) == (
        "tg",
        "10",
        "viettel",
    )
    assert (sent["maxPrice"], sent["phoneException"]) == ("13", "849,8497")
    assert "lang" not in sent
    stored = await clone.engine.store.get(ident)
    assert stored is not None
    assert stored.phone.startswith("848")  # the clone honoured phoneException
    assert (stored.price, stored.cost, stored.operator) == (
        Decimal("12.5"),
        Decimal("12.50"),
        "viettel",
    )
    assert await clone.status(ident) == "STATUS_WAIT_CODE"
    clone.fake.deliver(
        upstream, "Telegram code: 40721. Don't give it to anyone", "40721"
    )
    assert await clone.status(ident) == "STATUS_OK:40721"
    assert await clone.get(action="getFullSms", id=ident) == (
        200,
        TEXT,
        "FULL_SMS:Telegram code: 40721. Don't give it to anyone",
    )
    assert await clone.get(action="setStatus", id=ident, status=6) == (
        200,
        TEXT,
        "ACCESS_ACTIVATION",
    )
    assert clone.fake.orders[upstream].state == "finished"
    assert set(clone.fake.actions_called()) == {
        "getPrices",
        "getNumberV2",
        "getStatusV2",
        "setStatus",
    }
    assert await clone.engine.store.pending_ops() == []


async def test_v2_currency_other_than_configured_is_logged(
    start_clone: Start, caplog: pytest.LogCaptureFixture
) -> None:
    clone = await start_clone(
        fakes.FakeSmsActivate, fakes.sms_activate_options, currency="USD"
    )
    with caplog.at_level("WARNING", logger="providers"):
        await clone.buy()
    assert [
        r.getMessage() for r in caplog.records if r.name.startswith("providers")
    ] == [
        f"{NAME}: getNumberV2 priced in currency 643, but providers.{NAME}.currency is"
        " USD: check the config"
    ]


async def test_a_price_raised_since_the_catalogue_is_refused_before_buying(
    start_clone: Start,
) -> None:
    clone = await start_clone(fakes.FakeSmsActivate, fakes.sms_activate_options)
    await clone.get(action="getPrices", country=10)  # we believe tg costs 12.50
    clone.fake.prices["10"]["tg"] = ("14", 40)  # the clone raised it since
    assert await clone.get(
        action="getNumber", service="tg", country=10, maxPrice="13"
    ) == (200, TEXT, "NO_NUMBERS")
    # the fresh quote saw 14 > 13: no paid call was made at all
    assert "getNumberV2" not in clone.fake.actions_called()
    assert clone.fake.bought == [] and clone.fake.balance == Decimal("17.154")
    assert await clone.engine.store.attempts([REFUSED, UNCERTAIN]) == []


async def test_cancel_refused_early_waits_in_the_outbox(start_clone: Start) -> None:
    clone = await start_clone(fakes.FakeSmsActivate, fakes.sms_activate_options)
    ident, upstream = await clone.buy()
    assert clone.fake.balance == Decimal("4.654")
    assert await clone.get(action="setStatus", id=ident, status=8) == (
        200,
        TEXT,
        "ACCESS_CANCEL",
    )
    assert clone.fake.orders[upstream].calls == ["8"]  # EARLY_CANCEL_DENIED
    assert clone.fake.orders[upstream].state == "waiting"
    pending = await clone.engine.store.pending_ops()
    assert [(p[0], p[1], p[2]) for p in pending] == [(ident, "cancel", 1)]
    clone.clock.advance(121)
    assert await clone.engine.outbox.step() == 1
    assert clone.fake.orders[upstream].calls == ["8", "8"]
    assert clone.fake.orders[upstream].state == "cancelled"
    assert clone.fake.balance == Decimal("17.154")  # refunded
    assert await clone.engine.store.pending_ops() == []


async def test_refused_early_cancels_never_open_the_circuit(start_clone: Start) -> None:
    """Before: each EARLY_CANCEL_DENIED counted as a failure; the retries of one
    cancel opened the breaker in about 29 s and cut off the whole provider."""
    clone = await start_clone(fakes.FakeSmsActivate, fakes.sms_activate_options)
    clone.fake.balance = Decimal("100")
    ident, upstream = await clone.buy()
    await clone.get(action="setStatus", id=ident, status=8)
    for _ in range(59):  # the outbox tries again and again inside the clone's window
        clone.clock.advance(2)
        await clone.engine.outbox.step()
    refused = clone.fake.orders[upstream].calls
    assert refused == ["8"] * len(refused) and len(refused) >= 6  # breaker opens at 5
    assert clone.fake.orders[upstream].state == "waiting"
    assert clone.engine.health() == {"clone": "closed"}
    second, _ = await clone.buy()  # the provider still sells
    assert second != ident


@pytest.mark.parametrize("fault", ["after_reset", "after_500", "after_hang"])
async def test_lost_purchase_is_found_and_cancelled(
    start_clone: Start, fault: str
) -> None:
    clone = await start_clone(fakes.FakeSmsActivate, fakes.sms_activate_options)
    fake, engine = clone.fake, clone.engine
    fake.balance = Decimal("100")
    # bought on the same account by someone else: ten minutes ago, and another service
    _, older = fake._sell({"service": "tg", "country": "10"})
    assert older is not None
    older.created -= 600
    _, other = fake._sell({"service": "wa", "country": "10"})
    assert other is not None
    fake.fault, fake.fault_paths, fake.hang_seconds = fault, {"getNumberV2"}, 2
    assert await clone.get(action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    assert fake.actions_called().count("getNumberV2") == 1  # never retried
    [lost] = [o for o in fake.orders.values() if o not in (older, other)]
    fake.fault = None
    assert await engine.reconciler.step() == 1
    [orphan] = await engine.store.for_key(engine.config.keys[0].key_id, open_only=False)
    assert (orphan.upstream_id, orphan.state, orphan.phone) == (
        lost.id,
        CANCELLED,
        lost.phone,
    )
    assert await engine.outbox.step() == 0  # inside the clone's early-cancel window
    clone.clock.advance(121)
    assert await engine.outbox.step() == 1
    assert lost.state == "cancelled"
    assert (older.state, other.state) == ("waiting", "waiting")  # spared
    assert await engine.reconciler.step() == 0


# ---- what clones do differently ----------------------------------------------------


@pytest.mark.parametrize(
    "quirk",
    [
        {"newline": True},
        {"token_type": "application/json"},
        {"error_status": 400},
        {"error_status": 401},
        {"lower_tokens": True},
        {"newline": True, "lower_tokens": True, "error_status": 404},
    ],
    ids=["newline", "json_type", "http400", "http401", "lower", "all"],
)
async def test_quirks_do_not_change_what_clients_get(
    start_clone: Start, quirk: dict[str, Any]
) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    for attribute, value in quirk.items():
        setattr(clone.fake, attribute, value)
    assert await clone.get(action="getBalance") == (200, TEXT, "ACCESS_BALANCE:250.00")
    ident, upstream = await clone.buy()
    assert await clone.status(ident) == "STATUS_WAIT_CODE"
    clone.fake.deliver(upstream, "Your code is 5567", "5567")
    assert await clone.status(ident) == "STATUS_OK:5567"
    assert await clone.get(action="setStatus", id=ident, status=3) == (
        200,
        TEXT,
        "ACCESS_RETRY_GET",
    )
    assert await clone.status(ident) == "STATUS_WAIT_RETRY:5567"
    clone.fake.deliver(upstream, "Your code is 8812", "8812")
    assert await clone.status(ident) == "STATUS_OK:8812"
    assert await clone.get(action="setStatus", id=ident, status=6) == (
        200,
        TEXT,
        "ACCESS_ACTIVATION",
    )
    assert clone.fake.orders[upstream].state == "finished"
    for scenario, body in [("no_numbers", "NO_NUMBERS"), ("no_balance", "NO_BALANCE"),
                           ("bad_service", "BAD_SERVICE")]:  # fmt: skip
        clone.fake.scenario = scenario
        assert await clone.get(action="getNumber", service="tg", country=10) == (
            200,
            TEXT,
            body,
        )
    clone.fake.scenario = "bad_token"
    assert await clone.get(action="getBalance") == (200, TEXT, "ERROR_SQL")
    assert len(await clone.engine.store.attempts([REFUSED])) == 3
    assert await clone.engine.store.attempts([UNCERTAIN]) == []


@pytest.mark.parametrize(
    ("scenario", "body"),
    [("no_numbers", "NO_NUMBERS"), ("no_balance", "NO_BALANCE")],
)
async def test_aliases_no_number_and_no_means(
    start_clone: Start, scenario: str, body: str
) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    clone.fake.aliases, clone.fake.scenario = True, scenario
    assert await clone.get(action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        body,
    )
    [attempt] = await clone.engine.store.attempts([REFUSED])
    assert attempt.provider == NAME


async def test_banned_account_is_refused_and_loud(
    start_clone: Start, caplog: pytest.LogCaptureFixture
) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    clone.fake.scenario = "banned"
    with caplog.at_level("ERROR", logger="compat_server"):
        assert await clone.get(action="getNumber", service="tg", country=10) == (
            200,
            TEXT,
            "NO_NUMBERS",
        )
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"provider={NAME} rejected our credentials: fix providers.{NAME} in the config"
    ]
    assert len(await clone.engine.store.attempts([REFUSED])) == 1


async def test_status_with_the_whole_sms_text(start_clone: Start) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    clone.fake.full_text = True
    ident, upstream = await clone.buy()
    text = "Ma xac thuc Telegram: 731904. Het han sau 5 phut. Hotline 1900 1234"
    clone.fake.deliver(upstream, text, "731904")
    assert await clone.status(ident) == "STATUS_OK:731904"
    assert await clone.get(action="getFullSms", id=ident) == (
        200,
        TEXT,
        f"FULL_SMS:{text}",
    )


# Verbatim getNumber answers: a definite refusal (REFUSED, the token the client gets)
# or an outcome we cannot know (UNCERTAIN: never retried, left to the reconciler).
BUY_ANSWERS = [
    (200, "WRONG_MAX_PRICE:20.5", REFUSED, "NO_NUMBERS"),
    (200, "no_numbers\n", REFUSED, "NO_NUMBERS"),
    (200, "\ufeffNO_NUMBERS\r\n", REFUSED, "NO_NUMBERS"),
    (200, '"NO_BALANCE"', REFUSED, "NO_BALANCE"),
    (200, "CHANNELS_LIMIT", REFUSED, "NO_NUMBERS"),
    (200, "BAD_COUNTRY", REFUSED, "BAD_SERVICE"),
    (402, '{"title":"NO_BALANCE","details":"Not enough funds","info":{}}', REFUSED,
     "NO_BALANCE"),
    (200, '{"status":"error","message":"NO_NUMBERS"}', REFUSED, "NO_NUMBERS"),
    (200, '{"activationId":"77","phoneNumber":"+84 912 345 678","activationCost":"15.5"}',
     CONFIRMED, "ACCESS_NUMBER:100000:84912345678"),
    (200, "ACCESS_NUMBER:3936040355", UNCERTAIN, "NO_NUMBERS"),
    (200, "ACCESS_NUMBER::84912345678", UNCERTAIN, "NO_NUMBERS"),
    (200, "ERROR_SQL", UNCERTAIN, "NO_NUMBERS"),
    (200, "SERVER_ERROR", UNCERTAIN, "NO_NUMBERS"),
    (200, "The service is prohibited for sale by administration", UNCERTAIN,
     "NO_NUMBERS"),
    (503, "NO_NUMBERS", UNCERTAIN, "NO_NUMBERS"),
    (404, "<html><body>Not Found</body></html>", UNCERTAIN, "NO_NUMBERS"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "answer", "state", "body"), BUY_ANSWERS)
async def test_buy_answers(
    start_clone: Start, status: int, answer: str, state: str, body: str
) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    await clone.get(action="getPrices", country=10)
    clone.fake.canned["getNumber"] = (status, answer)
    assert await clone.get(action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        body,
    )
    assert clone.fake.actions_called().count("getNumber") == 1
    attempts = await clone.engine.store.attempts([REFUSED, UNCERTAIN, CONFIRMED])
    assert [a.state for a in attempts] == [state]
    assert await clone.engine.store.count() == (state == CONFIRMED)


async def test_buy_price_comes_from_the_catalog(start_clone: Start) -> None:
    """getNumber (v1) says no price: the last catalogue price is stored, fetched if new."""
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    ident, _ = await clone.buy()
    assert clone.fake.actions_called() == ["getPrices", "getNumber"]
    stored = await clone.engine.store.get(ident)
    assert stored is not None and (stored.price, stored.cost) == (
        Decimal("15"),
        Decimal("15.00"),
    )
    # the catalogue failing before a buy: nothing paid was sent, the route may go on
    clone.provider._prices.clear()
    clone.fake.fault, clone.fake.fault_paths = "html500", {"getPrices"}
    assert await clone.get(action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    assert clone.fake.actions_called().count("getNumber") == 1
    assert await clone.engine.store.attempts([UNCERTAIN]) == []
    assert len(await clone.engine.store.attempts([REFUSED])) == 1


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        ("status_ok:1234 \n", "STATUS_OK:1234"),
        ("STATUS_OK:Нет кода", "STATUS_WAIT_CODE"),
        ("STATUS_WAIT_RESEND", "STATUS_WAIT_CODE"),
        ("ACCESS_CANCEL", "STATUS_CANCEL"),
        ("NO_ACTIVATION", "STATUS_CANCEL"),
        ("ERROR_SQL", "STATUS_WAIT_CODE"),
        ("<html>502 Bad Gateway</html>", "STATUS_WAIT_CODE"),
        ("HTTP 503 STATUS_CANCEL", "STATUS_WAIT_CODE"),  # a 5xx body is not believed
    ],
)
async def test_status_answers(start_clone: Start, answer: str, body: str) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    ident, _ = await clone.buy()
    status = 200
    if answer.startswith("HTTP "):
        code, answer = answer[5:].split(" ", 1)
        status = int(code)
    clone.fake.canned["getStatus"] = (status, answer)
    assert await clone.status(ident) == body


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        ("ACCESS_BALANCE:17.154\n", "ACCESS_BALANCE:17.15"),
        ("463.02", "ACCESS_BALANCE:463.02"),
        ('{"balance":"4.6820","currency":840}', "ACCESS_BALANCE:4.68"),
        ("BAD_KEY", "ERROR_SQL"),
        ("ACCESS_BALANCE:", "ERROR_SQL"),
        ("", "ERROR_SQL"),
    ],
)
async def test_balance_answers(start_clone: Start, answer: str, body: str) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    clone.fake.canned["getBalance"] = (200, answer)
    assert await clone.get(action="getBalance") == (200, TEXT, body)


def test_decode_keeps_codes_and_phones_as_sent() -> None:
    answer = decode(200, b"\xef\xbb\xbfaccess_number:3936040355:84912345678 \r\n")
    assert (answer.token, answer.detail, answer.data) == (
        "ACCESS_NUMBER",
        "3936040355:84912345678",
        None,
    )
    envelope = decode(409, b'{"status":"error","error":"NO_ACTIVATIONS"}')
    assert (envelope.token, envelope.data) == (
        "NO_ACTIVATIONS",
        {"status": "error", "error": "NO_ACTIVATIONS"},
    )
    assert decode(200, b'{"verificationType":0,"sms":null}').token == ""
    assert decode(200, b"463.02").token == ""


# ---- V2 where the clone lacks it; POST; lang and currency -------------------------------


async def test_v2_falls_back_when_the_clone_has_no_v2(start_clone: Start) -> None:
    clone = await start_clone(
        fakes.FakeSms3t, fakes.sms3t_options, number_v2=True, status_v2=True
    )
    ident, upstream = await clone.buy()
    # BAD_ACTION bought nothing: the one getNumber is the purchase
    assert clone.fake.actions_called() == ["getNumberV2", "getPrices", "getNumber"]
    assert len(clone.fake.bought) == 1
    clone.fake.deliver(upstream, "code 9090", "9090")
    assert await clone.status(ident) == "STATUS_OK:9090"
    second, _ = await clone.buy()
    assert clone.fake.actions_called()[3:] == ["getStatusV2", "getStatus", "getNumber"]
    assert await clone.status(second) == "STATUS_WAIT_CODE"
    assert clone.fake.actions_called()[-1] == "getStatus"


async def test_post_sends_a_form_body_only(start_clone: Start) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options, method="post")
    assert await clone.get(action="getBalance") == (200, TEXT, "ACCESS_BALANCE:250.00")
    ident, upstream = await clone.buy()
    assert await clone.get(action="setStatus", id=ident, status=8) == (
        200,
        TEXT,
        "ACCESS_CANCEL",
    )
    assert clone.fake.orders[upstream].state == "cancelled"
    assert set(clone.fake.methods) == {("POST", False)}


async def test_lang_en_prices_in_usd(start_clone: Start) -> None:
    clone = await start_clone(
        fakes.FakeSmsServiceOnline,
        fakes.sms_service_online_options,
        lang="en",
        currency="USD",
    )
    # 463.02 RUB = 5.14 USD at the clone; shown in RUB at our rate of 90
    assert await clone.get(action="getBalance") == (200, TEXT, "ACCESS_BALANCE:462.60")
    status, ctype, body = await clone.get(action="getPrices", country=10, service="tg")
    assert (status, ctype, body) == (
        200,
        "application/json",
        '{"10":{"tg":{"cost":9.9,"count":64,"physicalCount":64}}}',
    )
    ident, _ = await clone.buy()
    stored = await clone.engine.store.get(ident)
    assert stored is not None
    assert (stored.price, stored.currency, stored.cost) == (
        Decimal("0.11"),
        "USD",
        Decimal("9.90"),
    )
    assert {params.get("lang") for _, params in clone.fake.calls} == {"en"}


async def test_missing_lang_is_an_operator_fault(
    start_clone: Start, caplog: pytest.LogCaptureFixture
) -> None:
    clone = await start_clone(
        fakes.FakeSmsServiceOnline, fakes.sms_service_online_options, lang=None
    )
    with caplog.at_level("ERROR", logger="compat_server"):
        assert await clone.get(action="getBalance") == (200, TEXT, "ERROR_SQL")
    assert any("rejected our credentials" in r.getMessage() for r in caplog.records)
    assert await clone.get(action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    assert await clone.engine.store.attempts([UNCERTAIN]) == []


async def test_sms_service_online_catalog_learns_its_action(start_clone: Start) -> None:
    clone = await start_clone(
        fakes.FakeSmsServiceOnline, fakes.sms_service_online_options
    )
    _, _, body = await clone.get(action="getPrices", country=0)
    assert body == (
        '{"0":{"ok":{"cost":1.34,"count":2776,"physicalCount":2776},'
        '"vk":{"cost":29.88,"count":19,"physicalCount":19},'
        '"wa":{"cost":0.0,"count":0,"physicalCount":0}}}'
    )
    clone.clock.advance(61)
    await clone.get(action="getPrices", country=0)  # stale; refreshed behind it
    for _ in range(100):
        if len(clone.fake.actions_called()) == 3:
            break
        await asyncio.sleep(0.01)
    assert clone.fake.actions_called() == [
        "getPrices",
        "getServicesAndCost",
        "getServicesAndCost",
    ]


async def test_counts_missing_from_prices_come_from_numbers_status(
    start_clone: Start,
) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    clone.fake.canned["getPrices"] = (
        200,
        '{"10":{"tg":{"cost":15},"vk":{"cost":"6"}}}',
    )
    assert await clone.get(action="getPrices", country=10) == (
        200,
        "application/json",
        '{"10":{"tg":{"cost":15.0,"count":86,"physicalCount":86},'
        '"vk":{"cost":6.0,"count":149,"physicalCount":149}}}',
    )
    assert clone.fake.actions_called() == ["getPrices", "getNumbersStatus"]


async def test_without_countries_one_call_reads_every_country(
    start_clone: Start,
) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options, countries=None)
    assert clone.provider.countries() == list(range(200))  # nothing read yet
    _, _, everywhere = await clone.get(action="getPrices")
    assert everywhere == (
        '{"10":{"av":{"cost":3.0,"count":251,"physicalCount":251},'
        '"fb":{"cost":8.0,"count":58,"physicalCount":58},'
        '"go":{"cost":7.0,"count":146,"physicalCount":146},'
        '"ok":{"cost":4.0,"count":190,"physicalCount":190},'
        '"tg":{"cost":15.0,"count":86,"physicalCount":86},'
        '"vi":{"cost":5.0,"count":140,"physicalCount":140},'
        '"vk":{"cost":6.0,"count":149,"physicalCount":149},'
        '"wa":{"cost":22.0,"count":64,"physicalCount":64},'
        '"wb":{"cost":9.0,"count":14,"physicalCount":14}}}'
    )
    assert [p.get("country") for _, p in clone.fake.calls] == [None]  # one call
    assert clone.provider.countries() == [10]  # what the clone's table holds
    _, _, countries = await clone.get(action="getCountries")
    assert list(json.loads(countries)) == ["10"]
    ident, _ = await clone.buy()
    assert clone.fake.actions_called() == ["getPrices", "getNumber"]


async def test_without_countries_per_country_where_the_table_cannot_come(
    start_clone: Start,
) -> None:
    clone = await start_clone(
        fakes.FakeSmsServiceOnline, fakes.sms_service_online_options, countries=None
    )
    _, _, body = await clone.get(action="getPrices", country=25, service="tg")
    assert body == '{"25":{"tg":{"cost":11.0,"count":5,"physicalCount":5}}}'
    await clone.get(action="getPrices", country=10, service="tg")
    assert [(a, p.get("country")) for a, p in clone.fake.calls] == [
        ("getPrices", None),
        ("getServicesAndCost", "25"),
        ("getServicesAndCost", "10"),
    ]


async def test_code_maps_translate_both_ways(start_clone: Start) -> None:
    clone = await start_clone(
        fakes.FakeSmsServiceOnline,
        fakes.sms_service_online_options,
        services={"zalo": "mj"},
        operators={"viettel": "vtl"},
        countries={10: "10"},
    )
    _, _, body = await clone.get(action="getPrices", country=10)
    assert '"zalo":{"cost":3.0,"count":12,' in body and '"mj"' not in body
    ident, upstream = await clone.buy(service="zalo", operator="viettel")
    assert (clone.fake.bought[0]["service"], clone.fake.bought[0]["operator"]) == (
        "mj",
        "vtl",
    )
    assert clone.fake.orders[upstream].service == "mj"
    assert await clone.get(action="getNumber", service="tg", country=0) == (
        200,
        TEXT,
        "NO_NUMBERS",  # country 0 is not in the map: never asked upstream
    )
    assert len(clone.fake.bought) == 1


async def test_no_get_active_activations_is_logged_once_per_lost_purchase(
    start_clone: Start, caplog: pytest.LogCaptureFixture
) -> None:
    clone = await start_clone(fakes.FakeSms3t, fakes.sms3t_options)
    await clone.get(action="getPrices", country=10)
    clone.fake.fault, clone.fake.fault_paths = "after_reset", {"getNumber"}
    assert await clone.get(action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    clone.fake.fault = None
    with caplog.at_level("ERROR", logger="providers"):
        assert await clone.engine.reconciler.step() == 0
        assert await clone.engine.reconciler.step() == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{NAME}: the clone has no getActiveActivations: a tg/10 purchase whose"
        " answer was lost cannot be found, check the account by hand"
    ]
    clone.clock.advance(RECONCILE_WINDOW + 1)
    await clone.engine.reconciler.step()
    assert [a.state for a in await clone.engine.store.attempts([RECONCILED])] == [
        RECONCILED
    ]


def test_options_are_checked() -> None:
    from providers.settings import parse
    from providers.vocabulary import ConfigError

    good = {"base_url": "http://clone.example/stubs/handler_api", "api_key": "k" * 32}
    settings = parse(HandlerApiSettings, "c", good)
    assert (settings.base_url, settings.api_key, settings.currency, settings.method) == (
        "http://clone.example/stubs/handler_api",
        "k" * 32,
        "RUB",
        "GET",
    )
    for bad, message in [
        ({"api_key": "k"}, "providers.c.base_url: missing"),
        ({"base_url": "ftp://x"}, "providers.c.base_url: must be an http(s) URL"),
        ({"method": "PUT"}, "providers.c.method: must be GET or POST"),
        ({"currency": "rubles"}, "providers.c.currency: expected a currency code"),
        ({"countries": "10"}, "providers.c.countries: expected a list of ids"),
        ({"services": ["tg"]}, "providers.c.services: expected a mapping"),
        ({"timezone": "Mars/Olympus"}, "providers.c.timezone: unknown time zone"),
        (
            {"base_url": "http://h/stubs/handler_api.php?api_key=abc&"},
            "providers.c.base_url: holds an api_key; move it to providers.c.api_key",
        ),
    ]:
        options = {**good, **bad}
        if "api_key" in bad:
            del options["base_url"]
        with pytest.raises(ConfigError) as raised:
            parse(HandlerApiSettings, "c", options)
        assert str(raised.value).startswith(message), str(raised.value)
    provider = HandlerApiProvider.from_options("c", {**good, "countries": {10: 84}}, None)  # type: ignore[arg-type]
    assert provider.countries() == [10]
    assert provider.describe() == (
        "type=handler_api api_key=**** base_url=http://clone.example/stubs/handler_api"
        " countries={10: 84}"
    )
    assert HandlerApiProvider.from_options("c", good, None).countries() == list(range(200))  # type: ignore[arg-type]


# ---- published clients, unchanged, through sms-compat to each fake ---------------------

FLAVOURS = {
    "sms-activate": (fakes.FakeSmsActivate, fakes.sms_activate_options, 12.5),
    "sms3t": (fakes.FakeSms3t, fakes.sms3t_options, 15.0),
    "sms-service-online": (
        fakes.FakeSmsServiceOnline,
        fakes.sms_service_online_options,
        9.5,
    ),
}


def stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
async def test_aiosmsactivate_through_each_clone(
    start_clone: Start, flavour: str
) -> None:
    from aiosmsactivate import SetActivationStatusResponse, SmsActivate
    from aiosmsactivate.models import ActivationData, Sms

    make, options, price = FLAVOURS[flavour]
    clone = await start_clone(make, options)
    api = SmsActivate(
        KEY, base_url=str(clone.client.make_url("/stubs/handler_api.php"))
    )
    start = clone.fake.balance
    assert await api.get_balance() == float(start.quantize(Decimal("0.01")))
    number = await api.purchase("tg", country=10)
    stored = await clone.engine.store.get(number.activation_id)
    assert stored is not None
    assert (number.phone_number, number.activation_cost, number.country_code) == (
        stored.phone,
        price,
        "10",
    )
    assert await api.get_activation_status(number) == ActivationData(
        verificationType=0, sms=None, call=None
    )
    clone.fake.deliver(stored.upstream_id, "Telegram code 66120", "66120")
    clone.clock.advance(10)
    # v1 clones tell the code only: it stands for the text as well
    text = "Telegram code 66120" if flavour == "sms-activate" else "66120"
    assert await api.get_activation_status(number) == ActivationData(
        verificationType=0,
        sms=Sms(dateTime=stamp(clone.clock()), code="66120", text=text),
        call=None,
    )
    answer = await api.set_activation_status(number.activation_id, 6)
    assert answer is SetActivationStatusResponse.ACTIVATED
    assert clone.fake.orders[stored.upstream_id].state == "finished"
    assert clone.fake.balance == start - Decimal(str(price))
    assert await api.get_balance() == float(
        clone.fake.balance.quantize(Decimal("0.01"))
    )


async def test_smsactivate_through_sms_activate(start_clone: Start) -> None:
    """The official client; the battery runs it through sms3t and sms-service-online."""
    from smsactivate.api import SMSActivateAPI

    clone = await start_clone(fakes.FakeSmsActivate, fakes.sms_activate_options)
    api = SMSActivateAPI(KEY)
    api._SMSActivateAPI__api_url = str(clone.client.make_url("/stubs/handler_api.php"))  # type: ignore[attr-defined]
    assert await asyncio.to_thread(api.getBalance) == {"balance": "17.15"}
    bought = await asyncio.to_thread(api.getNumberV2, service="tg", country=10)
    stored = await clone.engine.store.get(bought["activationId"])
    assert stored is not None
    assert (bought["phoneNumber"], bought["activationCost"]) == (stored.phone, 12.5)
    clone.fake.deliver(stored.upstream_id, "Telegram code 30303", "30303")
    clone.clock.advance(10)
    assert await asyncio.to_thread(api.getStatus, id=stored.id) == "STATUS_OK:30303"
    assert (
        await asyncio.to_thread(api.setStatus, id=stored.id, status=6)
        == "ACCESS_ACTIVATION"
    )
    assert clone.fake.orders[stored.upstream_id].state == "finished"


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
async def test_pysmshub_through_each_clone(start_clone: Start, flavour: str) -> None:
    pysmshub = pytest.importorskip("pysmshub")
    from pysmshub import Status

    make, options, price = FLAVOURS[flavour]
    clone = await start_clone(make, options)
    if flavour == "sms-activate":
        clone.fake.early_cancel = 0  # this test is about the client, not the window
    api = pysmshub.AsyncSmsHubApi(KEY)
    api.base_url = str(clone.client.make_url("/stubs/handler_api.php"))
    start = clone.fake.balance
    activation_id, phone = await api.get_number("tg", country="10")
    stored = await clone.engine.store.get(int(activation_id))
    assert stored is not None and phone == stored.phone
    assert await api.get_status(int(activation_id)) == (Status.WAIT, None)
    assert await api.set_status(int(activation_id), Status.CANCEL) == "ACCESS_CANCEL"
    assert clone.fake.orders[stored.upstream_id].state == "cancelled"
    assert clone.fake.balance == start
    assert await api.get_status(int(activation_id)) == (Status.CANCEL, None)


# ---- a chain: the upstream is another sms-compat ------------------------------------------


@pytest.fixture
async def chain(
    aiohttp_server: Any, start_app: StartApp, tmp_path: Path, clock: FakeClock
) -> tuple[Clone, Engine]:
    """sms-compat on the sandbox as the clone; our server in front of it."""
    upstream_config = parse_config(sandbox_raw(str(tmp_path / "upstream.sqlite3")))
    upstream_app = create_app(upstream_config, clock=clock, background=False)
    server: TestServer = await aiohttp_server(upstream_app)
    from compat_server.app import ENGINE

    front = parse_config({
        "store": {"path": str(tmp_path / "front.sqlite3")},
        "keys": [{"key": KEY, "alias": "front", "providers": [NAME]}],
        "providers": {NAME: {
            "type": "handler_api", "api_key": OTHER_KEY, "number_v2": True,
            "status_v2": True, "base_url": str(server.make_url("/stubs/handler_api.php")),
        }},
    })  # fmt: skip
    client = await start_app(front)
    fake = FakeHandlerApi()  # unused stand-in: the upstream here is real
    return Clone(fake, client, clock), server.app[ENGINE]


async def test_chain_whole_flow(chain: tuple[Clone, Engine]) -> None:
    clone, upstream = chain
    assert await clone.get(action="getBalance") == (200, TEXT, "ACCESS_BALANCE:1000.00")
    assert await clone.get(action="getPrices", country=10, service="tg") == (
        200,
        "application/json",
        '{"10":{"tg":{"cost":18.0,"count":420,"physicalCount":420}}}',
    )
    _, _, body = await clone.get(action="getNumber", service="tg", country=10)
    ident = int(body.split(":")[1])
    ours = await clone.engine.store.get(ident)
    assert ours is not None
    theirs = await upstream.store.get(int(ours.upstream_id))
    assert theirs is not None
    assert body == f"ACCESS_NUMBER:{ident}:{theirs.phone}"
    assert (ours.cost, theirs.cost, theirs.state) == (
        Decimal("18.00"),
        Decimal("18.00"),
        WAIT_CODE,
    )
    assert await clone.get(action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_WAIT_CODE",
    )
    status = await clone.status(ident)  # 10 s on: the sandbox SMS came upstream
    theirs = await upstream.store.get(theirs.id)
    assert theirs is not None and status == f"STATUS_OK:{theirs.code}"
    assert await clone.get(action="getFullSms", id=ident) == (
        200,
        TEXT,
        f"FULL_SMS:{theirs.messages[0].text}",
    )
    assert await clone.get(action="setStatus", id=ident, status=6) == (
        200,
        TEXT,
        "ACCESS_ACTIVATION",
    )
    assert (await upstream.store.get(theirs.id)).state == FINISHED  # type: ignore[union-attr]
    _, _, body = await clone.get(action="getNumber", service="tg", country=10)
    second = await clone.engine.store.get(int(body.split(":")[1]))
    assert second is not None
    assert await clone.get(action="setStatus", id=second.id, status=8) == (
        200,
        TEXT,
        "ACCESS_CANCEL",
    )
    assert (await upstream.store.get(int(second.upstream_id))).state == CANCELLED  # type: ignore[union-attr]
    assert await clone.get(action="getBalance") == (200, TEXT, "ACCESS_BALANCE:982.00")
    assert await clone.engine.store.pending_ops() == []


async def test_chain_lost_purchase_found_through_active_activations(
    chain: tuple[Clone, Engine],
) -> None:
    clone, upstream = chain
    front = clone.engine
    _, _, body = await clone.get(action="getNumber", service="tg", country=10)
    known = await front.store.get(int(body.split(":")[1]))
    assert known is not None
    # a getNumber whose answer never came back: the upstream sold, we recorded nothing
    attempt = await front.store.begin_purchase(
        front.config.keys[0].key_id, NAME, Order("tg", 10), clone.clock()
    )
    await front.store.end_purchase(attempt, UNCERTAIN, "ReadTimeout", clone.clock())
    upstream_key = upstream.config.keys[1]
    lost = await upstream.buy(upstream_key, Order("tg", 10))
    found = await clone.provider.lookup_purchases(Order("tg", 10), clone.clock() - 60)
    assert sorted(p.upstream_id for p in found) == sorted(
        [known.upstream_id, str(lost.id)]
    )
    assert await front.reconciler.step() == 1
    assert await front.outbox.step() == 1
    assert (await upstream.store.get(lost.id)).state == CANCELLED  # type: ignore[union-attr]
    assert (await upstream.store.get(int(known.upstream_id))).state == WAIT_CODE  # type: ignore[union-attr]


async def test_chain_logs_no_secret(
    chain: tuple[Clone, Engine], caplog: pytest.LogCaptureFixture
) -> None:
    clone, _ = chain
    with caplog.at_level(logging.DEBUG):
        await clone.get(action="getBalance")
        await clone.get(action="getNumber", service="tg", country=10)
    # the access log of a bare test server is issue 7's (front) business, not ours
    ours = [r for r in caplog.records if r.name != "aiohttp.access"]
    assert {r.name for r in ours} >= {"compat_server"}
    assert [r.getMessage() for r in ours if OTHER_KEY in r.getMessage()] == []
    assert "api_key=****" in clone.provider.describe()


# ---- any answer to getNumber: a purchase only from a whole success ------------------------

KNOWN = sorted(
    handler_api_tokens := (
        AUTH_TOKENS | NO_BALANCE_TOKENS | UNKNOWN_SERVICE_TOKENS | NO_NUMBERS_TOKENS
    )
)
DEFINITE = (NoNumbers, NoBalance, UnknownService, UpstreamAuth)


def answers() -> st.SearchStrategy[str]:
    """Bodies a clone might send: tokens, details, numbers, JSON, noise."""
    token = st.sampled_from([*KNOWN, "ACCESS_NUMBER", "ERROR_SQL", "STATUS_OK"])
    detail = st.text(alphabet="0123456789:+ -.abcXYZ", max_size=24)
    tokenish = st.builds(
        lambda t, sep, d, case, pad: pad + (t.lower() if case else t) + sep + d + pad,
        token,
        st.sampled_from(["", ":"]),
        detail,
        st.booleans(),
        st.sampled_from(["", " ", "\n", "\r\n", "\ufeff"]),
    )
    v2 = st.fixed_dictionaries(
        {},
        optional={
            "activationId": st.one_of(st.integers(0, 2**40), st.text(max_size=8)),
            "phoneNumber": st.one_of(st.text(max_size=14), st.integers(0, 10**13)),
            "activationCost": st.one_of(st.floats(), st.text(max_size=6)),
            "title": token,
            "status": st.sampled_from(["error", "success"]),
            "error": token,
        },
    ).map(json.dumps)
    return st.one_of(tokenish, v2, st.text(max_size=60))


@pytest.fixture
async def sms3t_provider(
    aiohttp_server: Any,
) -> Any:
    fake = fakes.FakeSms3t()
    server: TestServer = await aiohttp_server(fake.app)
    url = str(server.make_url("")).rstrip("/")
    async with upstream_client(read_timeout=2, connect_timeout=2) as http:
        provider = HandlerApiProvider.from_options("fuzz", fakes.sms3t_options(url), http)
        provider._prices[(10, "tg")] = Decimal("15")
        yield fake, provider


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    status=st.sampled_from([200, 200, 400, 401, 402, 404, 409, 429, 500, 503]),
    body=answers(),
)
async def test_any_buy_answer_is_a_purchase_a_refusal_or_uncertain(
    sms3t_provider: Any, status: int, body: str
) -> None:
    fake, provider = sms3t_provider
    fake.canned["getNumber"] = (status, body)
    answer = decode(status, body.encode())
    try:
        purchase = await provider.buy(Order("tg", 10))
    except DEFINITE:
        # only a known refusal token, below HTTP 500, refuses for sure
        assert status < 500 and answer.token in handler_api_tokens, (status, body)
        return
    except UpstreamUncertain:
        return
    assert status < 500 and purchase.phone.isdigit() and purchase.upstream_id
    data = answer.data if isinstance(answer.data, dict) else {}
    assert answer.token == "ACCESS_NUMBER" or "activationId" in data, (status, body)


async def test_a_cancel_refused_because_the_sms_arrived_reopens_with_the_code(
    start_clone: Start,
) -> None:
    """The SMS reaches the upstream between two polls and the client cancels: the
    upstream refuses (the number was used and paid for). Before: ACCESS_CANCEL, the
    code was never seen again and the key's spend gave the money back."""
    clone = await start_clone(fakes.FakeSmsActivate, fakes.sms_activate_options)
    clone.fake.balance = Decimal("100")
    ident, upstream = await clone.buy()
    clone.clock.advance(121)  # past the clone's early-cancel window
    clone.fake.deliver(upstream, "Telegram code: 55123", "55123")  # not polled yet
    assert await clone.get(action="setStatus", id=ident, status=8) == (
        200, TEXT, "ACCESS_CANCEL",
    )  # fmt: skip
    assert clone.fake.orders[upstream].calls == ["8"]  # refused: BAD_STATUS
    stored = await clone.engine.store.get(ident)
    assert stored is not None and stored.state == "code"
    assert await clone.status(ident) == "STATUS_OK:55123"
    assert clone.fake.balance == Decimal("87.50")  # charged upstream, not refunded
