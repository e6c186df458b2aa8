"""Catalogue actions, whole bodies: getServicesList, top countries, operator filter,
getCountries flags, sms-service-online's own actions, and smspva's documented
per-service price when its bulk endpoints fail."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from compat_server import dialect
from compat_server.config import parse_config
from fakes import smspva
from tests.conftest import KEY, StartApp, call, sandbox_raw

JSON = "application/json"
LEGACY = dict.fromkeys(dialect.LEGACY_STOCK_KEYS, "0")


def sandbox(**extra: Any) -> dict[str, Any]:
    """Two services in Russia and Vietnam (Telegram cheaper than WhatsApp)."""
    section = {"type": "sandbox", "sms_delay": 5, "balance": 100, "poll_interval": 1,
               "countries": [0, 10],
               "services": {"tg": {"price": 18, "count": 420},
                            "wa": {"price": 25.5, "count": 7}}}  # fmt: skip
    section.update(extra)
    return {"sandbox": section}


@pytest.fixture
async def shop(start_app: StartApp, store_path: str) -> TestClient:
    return await start_app(parse_config(sandbox_raw(store_path, providers=sandbox())))


async def json_call(client: TestClient, **params: Any) -> Any:
    status, ctype, body = await call(client, **params)
    assert (status, ctype) == (200, JSON), body
    return json.loads(body)


async def test_services_list(shop: TestClient) -> None:
    expected = {
        "status": "success",
        "services": [
            {"code": "tg", "name": "Telegram"},
            {"code": "wa", "name": "Whatsapp"},
        ],
    }
    status, ctype, body = await call(shop, action="getServicesList")
    assert (status, ctype) == (200, JSON)
    assert body == json.dumps(expected, separators=(",", ":"))
    for params in ({"country": 10}, {"country": 0, "lang": "ru"}, {"lang": "cn"}):
        assert await json_call(shop, action="getServicesList", **params) == expected
    # a country nobody serves: an empty list, not an error
    assert await json_call(shop, action="getServicesList", country=22) == {
        "status": "success",
        "services": [],
    }


async def test_top_countries(shop: TestClient) -> None:
    row = {"count": 420, "price": 18.0, "retail_price": 18.0}
    top_tg = {"0": {"country": 0, **row}, "1": {"country": 10, **row}}
    _, ctype, body = await call(shop, action="getTopCountriesByService", service="tg")
    assert ctype == JSON
    assert body == (
        '{"0":{"country":0,"count":420,"price":18.0,"retail_price":18.0},'
        '"1":{"country":10,"count":420,"price":18.0,"retail_price":18.0}}'
    )
    assert (
        await json_call(shop, action="getTopCountriesByServiceRank", service="tg")
        == top_tg
    )
    for free in ("true", "True", "1"):
        assert await json_call(
            shop, action="getTopCountriesByService", service="wa", freePrice=free
        ) == {
            "0": {"country": 0, "count": 7, "price": 25.5, "retail_price": 25.5,
                  "freePriceMap": {"25.50": 7}},
            "1": {"country": 10, "count": 7, "price": 25.5, "retail_price": 25.5,
                  "freePriceMap": {"25.50": 7}},
        }  # fmt: skip
    everything = await json_call(shop, action="getTopCountriesByService")
    assert list(everything) == ["tg", "wa"] and everything["tg"] == top_tg
    # a known code nobody sells: empty; a code nobody knows: BAD_SERVICE
    assert await json_call(shop, action="getTopCountriesByService", service="vk") == {}
    assert await call(shop, action="getTopCountriesByService", service="zzzq") == (
        200,
        "text/plain",
        "BAD_SERVICE",
    )


async def test_numbers_status_operator_filter(
    start_app: StartApp, store_path: str
) -> None:
    raw = sandbox_raw(store_path, providers=sandbox(operators=["mts", "beeline"]))
    client = await start_app(parse_config(raw))
    stock = {**LEGACY, "tg_0": "420", "wa_0": "7"}
    for operator in ("", "mts", "any", "tele2,beeline"):
        params = {"operator": operator} if operator else {}
        assert (
            await json_call(client, action="getNumbersStatus", country=0, **params)
            == stock
        )
    assert (
        await json_call(client, action="getNumbersStatus", country=0, operator="tele2")
        == LEGACY
    )
    # the same operator filter through getServicesAndCost
    assert (
        await json_call(client, action="getServicesAndCost", country=0, operator="tele2")
        == []
    )


async def test_countries_flags(start_app: StartApp, store_path: str) -> None:
    raw = sandbox_raw(store_path, providers=sandbox(rent_countries=[10]))
    client = await start_app(parse_config(raw))
    countries = await json_call(client, action="getCountries", lang="en")
    assert countries == {
        "0": {"id": 0, "rus": "Россия", "eng": "Russia", "chn": "Russia",
              "visible": 1, "retry": 1, "rent": 0, "multiService": 0},
        "10": {"id": 10, "rus": "Вьетнам", "eng": "Vietnam", "chn": "Vietnam",
               "visible": 1, "retry": 1, "rent": 1, "multiService": 0},
    }  # fmt: skip


async def test_sms_service_online_actions(start_app: StartApp, store_path: str) -> None:
    raw = sandbox_raw(store_path, providers=sandbox(countries=[0]))
    client = await start_app(parse_config(raw))
    resp = await client.get(
        "/stubs/handler_api",
        params={"api_key": KEY, "action": "getCountryAndOperators", "lang": "ru"},
    )
    assert (resp.status, resp.content_type) == (200, JSON)
    body = await resp.text()
    operators = ["any", "a_mobile", "aiva", "aquafon", "beeline", "center2m",
                 "danycom", "ezmobile", "gazprombank_mobile", "lycamobile", "matrix",
                 "mcn", "megafon", "mir_telecom", "motiv", "mtt", "mtt_virtual", "mts",
                 "rostelecom", "sber", "simsim", "tele2", "tinkoff", "ttk", "vtb_mobile",
                 "winmobile", "yota"]  # fmt: skip
    assert json.loads(body) == [
        {"id": 0, "name": "Россия", "operators": {o: o for o in operators}}
    ]
    assert body.startswith('[{"id":0,"name":"Россия","operators":{"any":"any",')
    english = await json_call(client, action="getCountryAndOperators", lang="en")
    assert english[0]["name"] == "Russia"

    status, ctype, body = await call(
        client, action="getServicesAndCost", country=0, operator="any", lang="ru"
    )
    assert (status, ctype) == (200, JSON)
    assert body == (
        '[{"id":"tg","name":"Telegram","price":18.0,"quantity":"420"},'
        '{"id":"wa","name":"Whatsapp","price":25.5,"quantity":"7"}]'
    )
    # lang is accepted by the classic actions too
    assert await call(client, action="getBalance", lang="ru") == (
        200,
        "text/plain",
        "ACCESS_BALANCE:100.00",
    )


# ---- smspva: the documented serviceprice when the bulk endpoints fail ----------------


@pytest.fixture
async def pva(aiohttp_server: Any) -> tuple[smspva.FakeSmspva, TestServer]:
    fake = smspva.FakeSmspva()
    server: TestServer = await aiohttp_server(fake.app)
    return fake, server


async def smspva_app(
    start_app: StartApp, store_path: str, server: TestServer
) -> TestClient:
    options = smspva.provider_options(str(server.make_url("")).rstrip("/"))
    raw = sandbox_raw(
        store_path,
        providers={"pva": options},
        keys=[{"key": KEY, "alias": "tester", "providers": ["pva"]}],
        currency={"display": "USD"},
    )
    return await start_app(parse_config(raw))


@pytest.mark.parametrize("fault", ["html500", "missing"])
async def test_smspva_prices_fall_back_to_serviceprice(
    start_app: StartApp,
    store_path: str,
    pva: tuple[smspva.FakeSmspva, TestServer],
    fault: str,
) -> None:
    fake, server = pva
    if fault == "missing":
        fake.missing_bulk = True  # the undocumented endpoints answer 404
    else:
        fake.fault = "html500"
        fake.fault_paths = {"/activation/servicesprices", "/activation/countnumbers/RU"}
    client = await smspva_app(start_app, store_path, server)
    assert await json_call(client, action="getPrices", service="tg", country=0) == {
        "0": {"tg": {"cost": 0.35, "count": 17, "physicalCount": 17}}
    }
    assert ("/activation/serviceprice/RU/opt29") in fake.paths_called()
    # getNumbersStatus: the bulk catalog is empty, the legacy services are asked one
    # by one (cached: the second call sends nothing new for tg)
    stock = await json_call(client, action="getNumbersStatus", country=0)
    assert stock == {**LEGACY, "tg_0": "17"}
    before = len(fake.calls)
    await asyncio.sleep(0)
    assert await json_call(client, action="getPrices", service="tg", country=0) == {
        "0": {"tg": {"cost": 0.35, "count": 17, "physicalCount": 17}}
    }
    assert fake.paths_called()[before:].count("/activation/serviceprice/RU/opt29") == 0


async def test_smspva_prices_bulk_when_it_works(
    start_app: StartApp, store_path: str, pva: tuple[smspva.FakeSmspva, TestServer]
) -> None:
    fake, server = pva
    client = await smspva_app(start_app, store_path, server)
    assert await json_call(client, action="getPrices", service="tg", country=0) == {
        "0": {"tg": {"cost": 0.35, "count": 42, "physicalCount": 42}}
    }
    assert "/activation/serviceprice/RU/opt29" not in fake.paths_called()


# ---- smsactivatepy's getServicesList, unchanged ----------------------------------------


async def test_smsactivatepy_services_list(
    aiohttp_server: Any, store_path: str, clock: Any
) -> None:
    from smsactivatepy.api import SMSActivateAPI

    from compat_server.app import create_app

    config = parse_config(sandbox_raw(store_path, providers=sandbox()))
    server = await aiohttp_server(create_app(config, clock=clock, background=False))
    api = SMSActivateAPI(KEY)
    api._SMSActivateAPI__api_url = str(server.make_url("/stubs/handler_api.php"))
    expected = {
        "status": "success",
        "services": [
            {"code": "tg", "name": "Telegram"},
            {"code": "wa", "name": "Whatsapp"},
        ],
    }
    assert await asyncio.to_thread(api.getServicesList) == expected
    assert await asyncio.to_thread(api.getServicesList, country=10, lang="en") == expected
