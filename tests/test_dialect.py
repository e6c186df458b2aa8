"""Golden bodies for every action and error token, through the real HTTP front."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from compat_server import dialect
from compat_server.config import parse_config
from compat_server.store import CANCELLED, WAIT_CODE
from providers import vocabulary
from tests.conftest import (
    API,
    KEY,
    OTHER_KEY,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
)

TEXT = "text/plain"
JSON = "application/json"
LEGACY = dict.fromkeys(dialect.LEGACY_STOCK_KEYS, "0")


def sandbox(**services: Any) -> dict[str, Any]:
    """A sandbox provider section selling only the given services in countries 0 and 10."""
    return {"sandbox": {"type": "sandbox", "sms_delay": 5, "balance": 100, "poll_interval": 1,
                        "countries": [0, 10], "services": services}}  # fmt: skip


@pytest.fixture
async def shop(start_app: StartApp, store_path: str) -> TestClient:
    """Sandbox with two priced services and a small balance."""
    raw = sandbox_raw(store_path, providers=sandbox(
        tg={"price": 18, "count": 420}, wa={"price": 25.5, "count": 0}))  # fmt: skip
    return await start_app(parse_config(raw))


async def buy(client: TestClient, service: str = "tg", country: int = 10) -> int:
    status, ctype, body = await call(
        client, action="getNumber", service=service, country=country
    )
    assert (status, ctype) == (200, TEXT) and body.startswith("ACCESS_NUMBER:"), body
    return int(body.split(":")[1])


# ---- authentication and dispatch ------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "body"),
    [
        ({"action": "getBalance"}, "NO_KEY"),
        ({"action": "getBalance", "api_key": ""}, "NO_KEY"),
        ({"action": "getBalance", "api_key": "wrong"}, "BAD_KEY"),
        ({"action": "getBalance", "api_key": "x" * 300}, "BAD_KEY"),
        ({"api_key": KEY}, "BAD_ACTION"),
        ({"api_key": KEY, "action": "buyPartnerProduct"}, "BAD_ACTION"),
        ({"api_key": KEY, "action": "getbalance"}, "BAD_ACTION"),
        ({"api_key": "wrong", "action": "nonsense"}, "BAD_KEY"),
    ],
)
async def test_auth_and_action_errors(
    shop: TestClient, params: dict[str, str], body: str
) -> None:
    resp = await shop.get(API, params=params)
    assert (resp.status, resp.content_type, await resp.text()) == (200, TEXT, body)


async def test_every_error_class_has_a_token() -> None:
    def concrete(cls: type) -> list[type]:
        subs = cls.__subclasses__()
        return [c for s in subs for c in concrete(s)] + ([cls] if not subs else [])

    missing = [
        c for c in concrete(vocabulary.CompatError) if c not in dialect.ERROR_TOKENS
    ]
    assert missing == []


# ---- money ----------------------------------------------------------------------------


async def test_get_balance_always_has_decimals(shop: TestClient) -> None:
    assert await call(shop, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:100.00")
    assert await call(shop, action="getBalanceAndCashBack") == (
        200,
        TEXT,
        "ACCESS_BALANCE:100.00",
    )
    await buy(shop)
    assert await call(shop, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:82.00")


# ---- getNumber ------------------------------------------------------------------------


async def test_get_number_stores_before_answering(
    shop: TestClient, clock: FakeClock
) -> None:
    status, ctype, body = await call(shop, action="getNumber", service="tg", country=10)
    kind, ident, phone = body.split(":")
    assert (status, ctype, kind) == (200, TEXT, "ACCESS_NUMBER")
    assert (
        ident == "100000"
        and phone.startswith("84")
        and len(phone) == 11
        and phone.isdigit()
    )
    stored = await engine_of(shop).store.get(100000)
    assert stored is not None
    assert (stored.phone, stored.service, stored.country, stored.state, stored.cost) == (
        phone, "tg", 10, WAIT_CODE, 18,
    )  # fmt: skip
    assert stored.expires_at == clock.now + 1200


@pytest.mark.parametrize(
    ("params", "body"),
    [
        ({"service": "wa", "country": 10}, "NO_NUMBERS"),  # count 0
        ({"service": "zz", "country": 10}, "BAD_SERVICE"),  # nobody sells it
        ({"country": 10}, "BAD_SERVICE"),  # service missing
        ({"service": "tg", "country": 187}, "NO_NUMBERS"),  # country not served
        ({"service": "tg", "country": "abc"}, "ERROR_SQL"),
        ({"service": "tg", "country": 10, "forward": 1}, "NO_NUMBERS"),
        ({"service": "tg", "country": 10, "maxPrice": "10"}, "NO_NUMBERS"),
        ({"service": "tg", "country": 10, "maxPrice": "x"}, "ERROR_SQL"),
        (
            {"service": "tg", "country": 10, "phoneException": "84a"},
            "WRONG_EXCEPTION_PHONE",
        ),
    ],
)
async def test_get_number_refusals(
    shop: TestClient, params: dict[str, Any], body: str
) -> None:
    assert await call(shop, action="getNumber", **params) == (200, TEXT, body)
    assert await engine_of(shop).store.count() == 0


async def test_get_number_no_balance(start_app: StartApp, store_path: str) -> None:
    raw = sandbox_raw(store_path, providers=sandbox(tg={"price": 150, "count": 5}))
    client = await start_app(parse_config(raw))
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_BALANCE",
    )
    assert await call(client, action="getNumberV2", service="tg", country=10) == (
        200,
        TEXT,
        "NO_BALANCE",
    )


async def test_get_number_accepts_operator_max_price_and_any_country(
    shop: TestClient,
) -> None:
    status, _, body = await call(
        shop, action="getNumber", service="tg", country="any", operator="viettel,mobifone",
        maxPrice="18.00", phoneException="7900,7901", ref="pythonsmsactivate", json="1",
    )  # fmt: skip
    assert status == 200 and body.startswith("ACCESS_NUMBER:100000:"), body
    stored = await engine_of(shop).store.get(100000)
    assert stored is not None and (stored.country, stored.operator) == (0, "viettel")
    assert not stored.phone.startswith(("7900", "7901"))


async def test_get_number_v2_types(shop: TestClient, clock: FakeClock) -> None:
    status, ctype, body = await call(
        shop, action="getNumberV2", service="tg", country=10
    )
    assert (status, ctype) == (200, JSON)
    data = json.loads(body)
    stored = await engine_of(shop).store.get(100000)
    assert stored is not None
    assert data == {
        "activationId": 100000,
        "phoneNumber": stored.phone,
        "activationCost": 18.0,
        "currency": 643,
        "countryCode": "10",
        "canGetAnotherSms": "1",
        "activationTime": _local(clock.now),
        "activationEndTime": _local(clock.now + 1200),
        "activationEnd": _local(clock.now + 1200),
        "activationOperator": "any",
    }


def _local(seconds: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


# ---- status actions -------------------------------------------------------------------


async def test_status_actions_through_a_whole_activation(
    shop: TestClient, clock: FakeClock
) -> None:
    ident = await buy(shop)
    assert await call(shop, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_WAIT_CODE",
    )
    assert await call(shop, action="getStatusV2", id=ident) == (
        200, JSON, '{"verificationType":0,"sms":null,"call":null}',
    )  # fmt: skip
    assert await call(shop, action="getFullSms", id=ident) == (
        200,
        TEXT,
        "STATUS_WAIT_CODE",
    )
    clock.advance(6)
    _, _, body = await call(shop, action="getStatus", id=ident)
    stored = await engine_of(shop).store.get(ident)
    assert stored is not None and len(stored.messages) == 1
    sms = stored.messages[0]
    assert body == f"STATUS_OK:{sms.code}"
    assert (
        sms.text
        == f"Telegram code: {sms.code}\n\nYou can also tap on this link to log in: t.me/login/{sms.code}"
    )
    assert await call(shop, action="getStatusV2", id=ident) == (200, JSON, json.dumps(
        {"verificationType": 0, "sms": {"dateTime": _local(clock.now), "code": sms.code,
         "text": sms.text}, "call": None}, ensure_ascii=False, separators=(",", ":")))  # fmt: skip
    assert await call(shop, action="getFullSms", id=ident) == (
        200,
        TEXT,
        f"FULL_SMS:{sms.text}",
    )
    assert await call(shop, action="setStatus", id=ident, status=3) == (
        200,
        TEXT,
        "ACCESS_RETRY_GET",
    )
    assert await call(shop, action="getStatus", id=ident) == (
        200,
        TEXT,
        f"STATUS_WAIT_RETRY:{sms.code}",
    )
    assert await call(shop, action="getStatusV2", id=ident) == (
        200, JSON, '{"verificationType":0,"sms":null,"call":null}',
    )  # fmt: skip
    clock.advance(6)
    _, _, body = await call(shop, action="getStatus", id=ident)
    assert len(stored.messages) == 2 and body == f"STATUS_OK:{stored.messages[1].code}"
    assert stored.messages[1].code != sms.code
    assert await call(shop, action="setStatus", id=ident, status=6) == (
        200,
        TEXT,
        "ACCESS_ACTIVATION",
    )
    for action in ("getStatus", "getStatusV2", "getFullSms"):
        assert await call(shop, action=action, id=ident) == (200, TEXT, "STATUS_CANCEL")


@pytest.mark.parametrize(
    "action", ["getStatus", "getStatusV2", "getFullSms", "setStatus"]
)
@pytest.mark.parametrize(
    ("ident", "body"),
    [("", "WRONG_ACTIVATION_ID"), ("12a", "WRONG_ACTIVATION_ID"), ("-5", "WRONG_ACTIVATION_ID"),
     ("1" * 40, "WRONG_ACTIVATION_ID"), ("999999", "NO_ACTIVATION")],
)  # fmt: skip
async def test_activation_id_errors(
    shop: TestClient, action: str, ident: str, body: str
) -> None:
    assert await call(shop, action=action, id=ident, status=8) == (200, TEXT, body)


async def test_other_keys_activation_is_invisible(shop: TestClient) -> None:
    ident = await buy(shop)
    for action in ("getStatus", "getStatusV2", "getFullSms", "setStatus"):
        assert await call(shop, api_key=OTHER_KEY, action=action, id=ident, status=8) == (
            200, TEXT, "NO_ACTIVATION",
        )  # fmt: skip
    assert await call(shop, api_key=OTHER_KEY, action="getActiveActivations") == (
        200, JSON, '{"status":"error","error":"NO_ACTIVATIONS"}',
    )  # fmt: skip
    stored = await engine_of(shop).store.get(ident)
    assert stored is not None and stored.state == WAIT_CODE


async def test_lifetime_reads_cancel(shop: TestClient, clock: FakeClock) -> None:
    ident = await buy(shop, "tg")
    clock.advance(1201)
    assert await call(shop, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_CANCEL",
    )
    assert await call(shop, action="setStatus", id=ident, status=8) == (
        200,
        TEXT,
        "ACCESS_CANCEL",
    )
    assert await call(shop, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:82.00")
    assert await engine_of(shop).outbox.step() == 1  # the expiry's upstream cancel
    assert await call(shop, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:100.00")


# ---- setStatus lifecycle (protocol.md section 2.2) ------------------------------------

# (state reached before, status sent, expected body, state after)
LIFECYCLE = [
    ("wait", "1", "ACCESS_READY", "wait_code"),
    ("wait", "3", "BAD_STATUS", "wait_code"),
    ("wait", "6", "BAD_STATUS", "wait_code"),
    ("wait", "8", "ACCESS_CANCEL", "cancelled"),
    ("wait", "-1", "ACCESS_CANCEL", "cancelled"),
    ("wait", "2", "BAD_STATUS", "wait_code"),
    ("wait", "", "BAD_STATUS", "wait_code"),
    ("wait", "x", "BAD_STATUS", "wait_code"),
    ("code", "1", "ACCESS_READY", "code"),
    ("code", "3", "ACCESS_RETRY_GET", "wait_retry"),
    ("code", "6", "ACCESS_ACTIVATION", "finished"),
    ("code", "8", "BAD_STATUS", "code"),
    ("code", "-1", "BAD_STATUS", "code"),
    ("retry", "3", "ACCESS_RETRY_GET", "wait_retry"),
    ("retry", "6", "ACCESS_ACTIVATION", "finished"),
    ("retry", "8", "BAD_STATUS", "wait_retry"),
    ("cancelled", "8", "ACCESS_CANCEL", "cancelled"),
    ("cancelled", "6", "BAD_STATUS", "cancelled"),
    ("cancelled", "3", "BAD_STATUS", "cancelled"),
    ("cancelled", "1", "BAD_STATUS", "cancelled"),
    ("finished", "6", "ACCESS_ACTIVATION", "finished"),
    ("finished", "8", "BAD_STATUS", "finished"),
    ("finished", "3", "BAD_STATUS", "finished"),
]


@pytest.mark.parametrize(("before", "status", "body", "after"), LIFECYCLE)
async def test_lifecycle(
    shop: TestClient, clock: FakeClock, before: str, status: str, body: str, after: str
) -> None:
    ident = await buy(shop)
    steps = {"wait": [], "code": ["code"], "retry": ["code", "3"], "cancelled": ["8"],
             "finished": ["code", "6"]}[before]  # fmt: skip
    for step in steps:
        if step == "code":
            clock.advance(6)
            assert (await call(shop, action="getStatus", id=ident))[2].startswith(
                "STATUS_OK:"
            )
        else:
            assert (await call(shop, action="setStatus", id=ident, status=step))[
                2
            ].startswith("ACCESS_")
    assert await call(shop, action="setStatus", id=ident, status=status) == (
        200,
        TEXT,
        body,
    )
    stored = await engine_of(shop).store.get(ident)
    assert stored is not None and stored.state == after


async def test_early_cancel_window(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    raw = sandbox_raw(store_path, activation={"lifetime": 1200, "early_cancel": 120})
    client = await start_app(parse_config(raw))
    ident = await buy(client)
    clock.advance(119)
    assert await call(client, action="setStatus", id=ident, status=8) == (
        200,
        TEXT,
        "EARLY_CANCEL_DENIED",
    )
    clock.advance(1)
    assert await call(client, action="setStatus", id=ident, status=8) == (
        200,
        TEXT,
        "ACCESS_CANCEL",
    )
    stored = await engine_of(client).store.get(ident)
    assert stored is not None and stored.state == CANCELLED


# ---- catalog actions ------------------------------------------------------------------


async def test_get_prices(shop: TestClient) -> None:
    expected = {"tg": {"cost": 18.0, "count": 420, "physicalCount": 420},
                "wa": {"cost": 25.5, "count": 0, "physicalCount": 0}}  # fmt: skip
    assert await call(shop, action="getPrices", country=10, service="tg") == (
        200, JSON, '{"10":{"tg":{"cost":18.0,"count":420,"physicalCount":420}}}',
    )  # fmt: skip
    _, ctype, body = await call(shop, action="getPrices")
    assert (ctype, json.loads(body)) == (JSON, {"0": expected, "10": expected})
    assert await call(shop, action="getPrices", country=187) == (200, JSON, "{}")
    assert await call(shop, action="getPrices", country=10, service="zz") == (
        200,
        JSON,
        "{}",
    )


async def test_get_numbers_status(shop: TestClient) -> None:
    _, ctype, body = await call(shop, action="getNumbersStatus", country=10)
    assert (ctype, json.loads(body)) == (JSON, {**LEGACY, "tg_0": "420", "wa_0": "0"})
    _, _, body = await call(shop, action="getNumbersStatus", country=187)
    assert json.loads(body) == LEGACY
    _, _, body = await call(
        shop, action="getNumbersStatus"
    )  # default: first country (0)
    assert json.loads(body) == {**LEGACY, "tg_0": "420", "wa_0": "0"}


async def test_get_countries(shop: TestClient) -> None:
    assert await call(shop, action="getCountries") == (200, JSON, json.dumps({
        "0": {"id": 0, "rus": "Россия", "eng": "Russia", "chn": "Russia", "visible": 1,
              "retry": 1, "rent": 1, "multiService": 0},
        "10": {"id": 10, "rus": "Вьетнам", "eng": "Vietnam", "chn": "Vietnam", "visible": 1,
               "retry": 1, "rent": 1, "multiService": 0},
    }, ensure_ascii=False, separators=(",", ":")))  # fmt: skip


async def test_get_operators(shop: TestClient) -> None:
    assert await call(shop, action="getOperators", country=10) == (200, JSON, (
        '{"status":"success","countryOperators":{"10":["any","viettel","vinaphone",'
        '"mobifone","vietnamobile","itelecom","wintel"]}}'
    ))  # fmt: skip
    assert await call(shop, action="getOperators", country=187) == (
        200, JSON, '{"status":"error","error":"OPERATORS_NOT_FOUND"}',
    )  # fmt: skip
    _, _, body = await call(shop, action="getOperators")
    assert sorted(json.loads(body)["countryOperators"]) == ["0", "10"]


async def test_get_active_activations(shop: TestClient, clock: FakeClock) -> None:
    assert await call(shop, action="getActiveActivations") == (
        200, JSON, '{"status":"error","error":"NO_ACTIVATIONS"}',
    )  # fmt: skip
    first = await buy(shop)
    second = await buy(shop)
    clock.advance(6)
    await call(shop, action="getStatus", id=first)
    stored = await engine_of(shop).store.get(first)
    other = await engine_of(shop).store.get(second)
    assert stored is not None and other is not None
    _, ctype, body = await call(shop, action="getActiveActivations")
    data = json.loads(body)
    assert (
        ctype == JSON
        and data["status"] == "success"
        and data["data"] == data["activeActivations"]
    )
    assert data["activeActivations"] == [
        {"activationId": str(first), "serviceCode": "tg", "phoneNumber": stored.phone,
         "activationCost": 18.0, "activationStatus": "2", "smsCode": [stored.code],
         "smsText": json.dumps([stored.messages[0].text], ensure_ascii=False),
         "activationTime": _local(clock.now - 6), "discount": "0.00", "repeated": "0",
         "countryCode": "10", "countryName": "Vietnam", "canGetAnotherSms": "1",
         "currency": 643},
        {"activationId": str(second), "serviceCode": "tg", "phoneNumber": other.phone,
         "activationCost": 18.0, "activationStatus": "2",
         "smsCode": [other.code], "smsText": json.dumps([other.messages[0].text], ensure_ascii=False),
         "activationTime": _local(clock.now - 6), "discount": "0.00", "repeated": "0",
         "countryCode": "10", "countryName": "Vietnam", "canGetAnotherSms": "1",
         "currency": 643},
    ]  # fmt: skip


# ---- transport: paths, methods, hosts ---------------------------------------------------


@pytest.mark.parametrize("path", ["/stubs/handler_api.php", "/stubs/handler_api"])
@pytest.mark.parametrize(
    "host", ["sms-activate.org", "api.sms-activate.org", "sms-activate.ru",
             "api.sms-activate.ae", "sms-activate.io", "127.0.0.1:8080"],
)  # fmt: skip
async def test_hosts_trick_and_paths(shop: TestClient, path: str, host: str) -> None:
    resp = await shop.get(path, params={"api_key": KEY, "action": "getBalance"},
                          headers={"Host": host})  # fmt: skip
    assert (resp.status, resp.content_type, await resp.text()) == (
        200,
        TEXT,
        "ACCESS_BALANCE:100.00",
    )


async def test_post_form_body(shop: TestClient) -> None:
    resp = await shop.post(API, data={"api_key": KEY, "action": "getNumber", "service": "tg",
                                      "country": "10"})  # fmt: skip
    assert resp.status == 200 and (await resp.text()).startswith(
        "ACCESS_NUMBER:100000:"
    )


async def test_post_with_query_string_and_empty_body(shop: TestClient) -> None:
    resp = await shop.post(API, params={"api_key": KEY, "action": "getBalance"})
    assert (resp.status, await resp.text()) == (200, "ACCESS_BALANCE:100.00")


async def test_post_mixed_query_and_body(shop: TestClient) -> None:
    resp = await shop.post(f"{API}?api_key={KEY}&", data={"action": "getBalance"})
    assert (resp.status, await resp.text()) == (200, "ACCESS_BALANCE:100.00")


async def test_post_json_body(shop: TestClient) -> None:
    resp = await shop.post(API, json={"api_key": KEY, "action": "getBalance"})
    assert (resp.status, await resp.text()) == (200, "ACCESS_BALANCE:100.00")


async def test_unencoded_values_and_trailing_separators(shop: TestClient) -> None:
    # the official Java client does not URL-encode: commas arrive raw
    resp = await shop.get(
        f"{API}?api_key={KEY}&action=getNumber&service=tg&country=10&operator=viettel,mobifone&"
    )
    assert (await resp.text()).startswith("ACCESS_NUMBER:")


async def test_oversized_body_is_a_token_not_an_error(shop: TestClient) -> None:
    resp = await shop.post(
        API, data={"api_key": KEY, "action": "getBalance", "pad": "x" * 70000}
    )
    assert resp.status in (200, 413)
    if resp.status == 200:
        assert await resp.text() == "ERROR_SQL"


async def test_no_trailing_newline_anywhere(shop: TestClient) -> None:
    ident = await buy(shop)
    for action in (
        "getBalance",
        "getStatus",
        "getStatusV2",
        "getPrices",
        "getCountries",
    ):
        _, _, body = await call(shop, action=action, id=ident)
        assert body == body.strip()


async def test_post_multipart_form(shop: TestClient) -> None:
    import aiohttp

    form = aiohttp.FormData()
    for name, value in (("api_key", KEY), ("action", "getBalance")):
        form.add_field(name, value)
    resp = await shop.post(API, data=form)
    assert (resp.status, await resp.text()) == (200, "ACCESS_BALANCE:100.00")


@pytest.mark.parametrize(
    "body",
    ['{"api_key":"\\ud800","action":"getBalance"}', "[" * 5000,
     f'{{"api_key":"{KEY}","action":"getNumber","service":"tg","operator":"m\\udc80"}}'],
)  # fmt: skip
async def test_unusable_json_bodies_buy_nothing(shop: TestClient, body: str) -> None:
    resp = await shop.post(API, data=body, headers={"Content-Type": "application/json"})
    assert (resp.status, await resp.text()) == (200, "ERROR_SQL")
    assert (
        await engine_of(shop).store.attempts(["pending", "confirmed", "refused"]) == []
    )
