"""The rent family, whole bodies: on the sandbox (which rents and delivers one SMS
sms_delay seconds after the rent starts) and on smspva's rental API fake; the official
smsactivate library's rent calls unchanged."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from compat_server.app import create_app
from compat_server.config import parse_config
from compat_server.rentals import reconcile as reconcile_rents
from compat_server.store import RENT_CANCELLED, RENT_FINISHED
from fakes import smspva
from tests.conftest import (
    KEY,
    OTHER_KEY,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
)

JSON = "application/json"


def sandbox(**extra: Any) -> dict[str, Any]:
    section = {"type": "sandbox", "sms_delay": 5, "balance": 100, "poll_interval": 1,
               "countries": [0, 10],
               "services": {"tg": {"price": 18, "count": 420},
                            "wa": {"price": 25.5, "count": 7}}}  # fmt: skip
    section.update(extra)
    return {"sandbox": section}


@pytest.fixture
async def shop(start_app: StartApp, store_path: str) -> TestClient:
    return await start_app(parse_config(sandbox_raw(store_path, providers=sandbox())))


async def rent_call(client: TestClient, **params: Any) -> Any:
    status, ctype, body = await call(client, **params)
    assert (status, ctype) == (200, JSON), body
    return json.loads(body)


def end_date(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))


def date(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


async def balance(client: TestClient) -> Decimal:
    return await engine_of(client).providers["sandbox"].balance()


async def test_services_and_countries(shop: TestClient) -> None:
    services = {"full": {"cost": 30.0, "quant": 50}, "tg": {"cost": 18.0, "quant": 420},
                "wa": {"cost": 25.5, "quant": 7}}  # fmt: skip
    status, ctype, body = await call(shop, action="getRentServicesAndCountries")
    assert (status, ctype) == (200, JSON)
    assert body == (
        '{"countries":{"0":0,"1":10},"operators":{"0":"any"},"services":'
        '{"full":{"cost":30.0,"quant":50},"tg":{"cost":18.0,"quant":420},'
        '"wa":{"cost":25.5,"quant":7}},"currency":643}'
    )
    # rent_time, and `time` as the official library sends it: priced for the hours
    for name in ("rent_time", "time", "time "):  # aiosmsactivate: "time "
        answer = await rent_call(
            shop, action="getRentServicesAndCountries", country=10, **{name: 8}
        )
        assert answer["services"] == {
            code: {"cost": s["cost"] * 2, "quant": s["quant"]}
            for code, s in services.items()
        }
    assert await rent_call(shop, action="getRentServicesAndCountries", country=22) == {
        "status": "error",
        "message": "OUT_OF_STOCK",
    }
    assert await rent_call(shop, action="getRentServicesAndCountries", time=1) == {
        "status": "error",
        "message": "INVALID_TIME",
        "info": {"min": 2, "max": 1344},
    }


async def test_rent_lifecycle_on_the_sandbox(
    shop: TestClient, clock: FakeClock
) -> None:
    started = clock.now
    answer = await rent_call(shop, action="getRentNumber", service="tg", country=10)
    rent = await engine_of(shop).store.get_rent(5000)
    assert rent is not None and rent.key_id == engine_of(shop).config.keys[0].key_id
    assert answer == {
        "status": "success",
        "phone": {"id": 5000, "endDate": end_date(started + 4 * 3600),
                  "number": rent.phone},
    }  # fmt: skip
    assert rent.phone.startswith("84") and len(rent.phone) == 11
    assert await balance(shop) == Decimal("82.00")
    # rent ids are their own space: activation 5000 does not exist
    assert await call(shop, action="getStatus", id=5000) == (
        200,
        "text/plain",
        "NO_ACTIVATION",
    )

    waiting = {"status": "error", "message": "STATUS_WAIT_CODE"}
    assert await rent_call(shop, action="getRentStatus", id=5000) == waiting
    # another key's rent does not exist for it
    for action in ("getRentStatus", "setRentStatus", "continueRentNumber",
                   "getContinueRentPriceNumber", "continueRentInfo"):  # fmt: skip
        assert await rent_call(
            shop, api_key=OTHER_KEY, action=action, id=5000, status=1
        ) == {"status": "error", "message": "NO_ID_RENT"}
    assert await rent_call(shop, api_key=OTHER_KEY, action="getRentList") == {
        "status": "error",
        "message": "NO_NUMBERS",
    }

    clock.advance(6)
    answer = await rent_call(shop, action="getRentStatus", id=5000)
    rent = await engine_of(shop).store.get_rent(5000)
    assert rent is not None and len(rent.messages) == 1
    code = rent.messages[0].code
    assert answer == {
        "status": "success",
        "quantity": "1",
        "values": {"0": {"phoneFrom": "Sandbox",
                         "text": f"Your Telegram verification code is {code}",
                         "service": "tg", "date": date(started + 5)}},
    }  # fmt: skip
    assert await rent_call(shop, action="getRentList") == {
        "status": "success",
        "values": {"0": {"id": "5000", "phone": rent.phone}},
    }

    # prolong: price first, then pay
    assert await rent_call(
        shop, action="getContinueRentPriceNumber", id=5000, rent_time=4
    ) == {"status": "success", "price": 18.0, "currency": 643}
    answer = await rent_call(shop, action="continueRentNumber", id=5000, rent_time=4)
    assert answer == {
        "status": "success",
        "phone": {"id": 5000, "endDate": end_date(started + 8 * 3600),
                  "number": rent.phone},
    }  # fmt: skip
    assert await balance(shop) == Decimal("64.00")
    assert await rent_call(
        shop, action="continueRentInfo", id=5000, hours=2, needHistory="true"
    ) == {
        "status": "success", "price": 9.0, "currency": 643, "hours": 2,
        "history": {"0": {"createDate": date(started), "price": "18.00", "hours": 4},
                    "1": {"createDate": date(started + 6), "price": "18.00",
                          "hours": 4}},
    }  # fmt: skip
    assert await rent_call(
        shop, action="continueRentNumber", id=5000, rent_time=9999
    ) == {"status": "error", "message": "INVALID_TIME", "info": {"min": 2, "max": 1344}}

    # setRentStatus: the documented words
    assert await rent_call(shop, action="setRentStatus", id=5000, status=3) == {
        "status": "error",
        "message": "INCORECT_STATUS",
    }
    assert await rent_call(shop, action="setRentStatus", id=5000, status=1) == {
        "status": "success"
    }
    rent = await engine_of(shop).store.get_rent(5000)
    assert rent is not None and rent.state == RENT_FINISHED
    for status in (1, 2):
        assert await rent_call(
            shop, action="setRentStatus", id=5000, status=status
        ) == {"status": "error", "message": "ALREADY_FINISH"}
    assert await rent_call(shop, action="getRentStatus", id=5000) == {
        "status": "error",
        "message": "STATUS_FINISH",
    }
    assert await rent_call(shop, action="continueRentNumber", id=5000) == {
        "status": "error",
        "message": "RENT_DIE",
        "info": {},
    }
    assert await rent_call(shop, action="getRentList") == {
        "status": "error",
        "message": "NO_NUMBERS",
    }


async def test_cancel_window_and_refusals(shop: TestClient, clock: FakeClock) -> None:
    await rent_call(shop, action="getRentNumber", service="wa", country=0)
    assert await balance(shop) == Decimal("74.50")
    assert await rent_call(shop, action="setRentStatus", id=5000, status=2) == {
        "status": "success"
    }
    assert await balance(shop) == Decimal("100.00")  # the sandbox refunds before an SMS
    rent = await engine_of(shop).store.get_rent(5000)
    assert rent is not None and rent.state == RENT_CANCELLED
    assert await rent_call(shop, action="setRentStatus", id=5000, status=2) == {
        "status": "error",
        "message": "ALREADY_CANCEL",
    }
    assert await rent_call(shop, action="getRentStatus", id=5000) == {
        "status": "error",
        "message": "STATUS_CANCEL",
    }

    await rent_call(shop, action="getRentNumber", service="tg", country=0, time=4)
    clock.advance(1201)
    assert await rent_call(shop, action="setRentStatus", id=5001, status=2) == {
        "status": "error",
        "message": "CANT_CANCEL",
    }
    # the rent runs out: finished, with its SMS still counted
    clock.advance(4 * 3600)
    assert await rent_call(shop, action="getRentStatus", id=5001) == {
        "status": "error",
        "message": "STATUS_FINISH",
    }

    refusals = [
        ({"service": "zz"}, "BAD_SERVICE"),
        ({"service": ""}, "BAD_SERVICE"),
        ({"service": "tg", "country": 22}, "NO_NUMBERS"),
        ({"service": "tg", "rent_time": "abc"}, "INVALID_TIME"),
    ]
    for params, message in refusals:
        answer = await rent_call(shop, action="getRentNumber", **params)
        assert (answer["status"], answer["message"]) == ("error", message)
    full = await rent_call(shop, action="getRentNumber", service="full", rent_time=8)
    assert (full["status"], full["phone"]["id"]) == ("success", 5002)
    assert await balance(shop) == Decimal("22.00")
    # not enough money: NO_BALANCE and nothing stored
    count = len(await engine_of(shop).store.rents_for_key(
        engine_of(shop).config.keys[0].key_id, active_only=False))  # fmt: skip
    assert await rent_call(
        shop, action="getRentNumber", service="full", rent_time=96
    ) == {
        "status": "error",
        "message": "NO_BALANCE",
    }
    assert count == len(await engine_of(shop).store.rents_for_key(
        engine_of(shop).config.keys[0].key_id, active_only=False))  # fmt: skip


async def test_a_key_that_cannot_rent(start_app: StartApp, store_path: str) -> None:
    raw = sandbox_raw(store_path, providers=sandbox(rent_countries=[]))
    client = await start_app(parse_config(raw))
    error = {"status": "error"}
    assert await rent_call(client, action="getRentServicesAndCountries") == {
        **error, "message": "OUT_OF_STOCK"}  # fmt: skip
    assert await rent_call(client, action="getRentNumber", service="tg") == {
        **error, "message": "NO_NUMBERS"}  # fmt: skip
    assert await rent_call(client, action="getRentList") == {
        **error, "message": "NO_NUMBERS"}  # fmt: skip
    assert await rent_call(client, action="getRentStatus", id=5000) == {
        **error, "message": "NO_ID_RENT"}  # fmt: skip
    countries = await rent_call(client, action="getCountries")
    assert {c["rent"] for c in countries.values()} == {0}


async def test_countries_say_where_rent_is_possible(shop: TestClient) -> None:
    countries = await rent_call(shop, action="getCountries")
    assert {k: v["rent"] for k, v in countries.items()} == {"0": 1, "10": 1}


async def test_rent_survives_a_restart(
    aiohttp_client: Any, store_path: str, clock: FakeClock
) -> None:
    config = parse_config(sandbox_raw(store_path, providers=sandbox()))
    first = await aiohttp_client(create_app(config, clock=clock, background=False))
    await rent_call(first, action="getRentNumber", service="tg", country=10)
    await first.close()
    second = await aiohttp_client(create_app(config, clock=clock, background=False))
    clock.advance(6)
    answer = await rent_call(second, action="getRentStatus", id=5000)
    assert answer["status"] == "success" and answer["quantity"] == "1"
    assert await engine_of(second).store.schema_version() >= 3


# ---- smspva's rental API -----------------------------------------------------------------


async def smspva_shop(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> tuple[smspva.FakeSmspva, TestClient]:
    fake = smspva.FakeSmspva(now=clock)
    server: TestServer = await aiohttp_server(fake.app)
    options = smspva.provider_options(str(server.make_url("")).rstrip("/"), api="rent")
    raw = sandbox_raw(
        store_path,
        providers={"pva": options},
        keys=[{"key": KEY, "alias": "tester", "providers": ["pva"]}],
        currency={"display": "USD"},
    )
    return fake, await start_app(parse_config(raw))


async def test_rent_on_smspva(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, client = await smspva_shop(start_app, store_path, aiohttp_server, clock)
    offer = await rent_call(client, action="getRentServicesAndCountries", country=0)
    assert {k: offer[k] for k in ("operators", "services", "currency")} == {
        "operators": {"0": "any"},
        "services": {"tg": {"cost": 3.5, "quant": 5}},  # one week: rent.php's unit
        "currency": 840,
    }
    assert offer["countries"]["0"] == 0 and 10 not in offer["countries"].values()

    started = clock.now
    answer = await rent_call(client, action="getRentNumber", service="tg", country=0)
    [order] = fake.orders.values()
    assert answer == {
        "status": "success",
        "phone": {"id": 5000, "endDate": end_date(int(started) + 7 * 86400),
                  "number": "7" + order.phone},
    }  # fmt: skip
    assert order.calls == ["activate"] and fake.balance == 7.0
    assert await rent_call(client, action="getRentStatus", id=5000) == {
        "status": "error",
        "message": "STATUS_WAIT_CODE",
    }
    fake.deliver(order.id, "Telegram code: 12345")
    first = int(clock.now)
    clock.advance(6)
    assert await rent_call(client, action="getRentStatus", id=5000) == {
        "status": "success",
        "quantity": "1",
        "values": {"0": {"phoneFrom": "TELEGRAM", "text": "Telegram code: 12345",
                         "service": "tg", "date": date(first)}},
    }  # fmt: skip
    fake.deliver(order.id, "Telegram code: 67890")
    second = int(clock.now)
    clock.advance(6)
    status = await rent_call(client, action="getRentStatus", id=5000, page=1, size=1)
    assert status["quantity"] == "2"
    assert status["values"] == {
        "0": {"phoneFrom": "TELEGRAM", "text": "Telegram code: 67890", "service": "tg",
              "date": date(second)}
    }  # fmt: skip

    assert await rent_call(
        client, action="getContinueRentPriceNumber", id=5000, rent_time=24
    ) == {"status": "success", "price": 3.5, "currency": 840}
    answer = await rent_call(client, action="continueRentNumber", id=5000, rent_time=24)
    assert answer["phone"]["endDate"] == end_date(int(started) + 14 * 86400)
    assert fake.balance == 3.5 and "prolong" in order.calls
    # smspva refuses a second prolongation with more than 7 days left: nothing paid
    assert await rent_call(
        client, action="continueRentNumber", id=5000, rent_time=24
    ) == {"status": "error", "message": "NO_NUMBERS", "info": {}}
    assert fake.balance == 3.5

    assert await rent_call(client, action="getRentNumber", service="tg", time=1344) == {
        "status": "error",
        "message": "NO_BALANCE",
    }
    assert await rent_call(client, action="getRentNumber", service="full") == {
        "status": "error",
        "message": "BAD_SERVICE",
    }
    assert await rent_call(client, action="setRentStatus", id=5000, status=1) == {
        "status": "success"
    }
    assert order.calls[-1] == "delete"


async def test_smspva_rent_answer_lost_is_not_retried(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, client = await smspva_shop(start_app, store_path, aiohttp_server, clock)
    await rent_call(client, action="getRentServicesAndCountries", country=0)
    fake.method_faults["create"] = "after_500"
    assert await rent_call(client, action="getRentNumber", service="tg", country=0) == {
        "status": "error",
        "message": "NO_NUMBERS",
    }
    # one paid call went out, and only one; the attempt is kept as uncertain
    assert [p for p, q in fake.calls if q.get("method") == "create"] == [
        "/api/rent.php"
    ]
    assert len(fake.orders) == 1


# ---- the official smsactivate library's rent calls, unchanged --------------------------


async def test_smsactivate_rent_calls(
    aiohttp_server: Any, store_path: str, clock: FakeClock
) -> None:
    from smsactivate.api import SMSActivateAPI

    config = parse_config(sandbox_raw(store_path, providers=sandbox()))
    server = await aiohttp_server(create_app(config, clock=clock, background=False))
    api = SMSActivateAPI(KEY)
    api._SMSActivateAPI__api_url = str(server.make_url("/stubs/handler_api.php"))

    def run(name: str, **kwargs: Any) -> Any:
        return asyncio.to_thread(getattr(api, name), **kwargs)

    offer = await run("getRentServicesAndCountries", time=4, country=10)
    assert offer["services"]["tg"] == {"cost": 18.0, "quant": 420}
    rented = await run("getRentNumber", service="tg", time=4, country=10)
    assert rented["status"] == "success" and rented["phone"]["id"] == 5000
    assert await run("getRentStatus", id=5000) == {
        "status": "error",
        "message": "STATUS_WAIT_CODE",
    }
    clock.advance(6)
    status = await run("getRentStatus", id=5000)
    assert status["status"] == "success" and status["quantity"] == "1"
    assert await run("getRentList") == {
        "status": "success",
        "values": {"0": {"id": "5000", "phone": rented["phone"]["number"]}},
    }
    assert await run("getContinueRentPriceNumber", id=5000) == {
        "status": "success",
        "price": 18.0,
        "currency": 643,
    }
    prolonged = await run("continueRentNumber", id=5000, time=4)
    assert prolonged["phone"]["endDate"] == end_date(clock.now - 6 + 8 * 3600)
    assert await run("setRentStatus", id=5000, status=1) == {"status": "success"}
    assert await run("setRentStatus", id=5000, status=2) == {
        "status": "error",
        "message": "ALREADY_FINISH",
    }


async def test_rent_reconciler_gives_back_an_unowned_rent(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    fake, client = await smspva_shop(start_app, store_path, aiohttp_server, clock)
    engine = engine_of(client)
    await rent_call(client, action="getRentServicesAndCountries", country=0)
    fake.method_faults["create"] = "after_500"
    assert (await rent_call(client, action="getRentNumber", service="tg"))[
        "message"
    ] == "NO_NUMBERS"
    fake.method_faults.clear()
    [order] = fake.orders.values()
    clock.advance(61)
    assert await reconcile_rents(engine.rentals) == 1
    [orphan] = await engine.store.rents_for_key(
        engine.config.keys[0].key_id, active_only=False
    )
    assert (orphan.upstream_id, orphan.state) == (order.id, RENT_CANCELLED)
    assert order.calls[-1] == "delete"
    # the orphan is not the client's: it never shows up as theirs
    assert await rent_call(client, action="getRentList") == {
        "status": "error",
        "message": "NO_NUMBERS",
    }
    assert await reconcile_rents(engine.rentals) == 0  # resolved: not looked for again


async def test_activation_reconciler_never_takes_a_rent(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    """smspva's rent.php sells both activations (api: rent) and rents."""
    fake, client = await smspva_shop(start_app, store_path, aiohttp_server, clock)
    engine = engine_of(client)
    rented = await rent_call(client, action="getRentNumber", service="tg", country=0)
    assert rented["status"] == "success"
    [rent_order] = fake.orders.values()
    fake.method_faults["create"] = "after_500"
    assert await call(client, action="getNumber", service="tg", country=0) == (
        200,
        "text/plain",
        "NO_NUMBERS",
    )
    fake.method_faults.clear()
    lost = next(o for o in fake.orders.values() if o.id != rent_order.id)
    assert await engine.reconciler.step() == 1
    [orphan] = await engine.store.for_key(engine.config.keys[0].key_id, open_only=False)
    assert orphan.upstream_id == lost.id
    await engine.outbox.step()
    assert "delete" not in rent_order.calls and lost.calls[-1] == "delete"
    assert (await rent_call(client, action="getRentList"))["status"] == "success"
