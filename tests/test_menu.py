"""The rest of the menu: call status, multi-service, additional service, extra
activation answer sms-activate's "not available" tokens (never BAD_ACTION, never a
purchase); CHANNELS_LIMIT where thuecodesim reports its waiting-numbers cap."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from compat_server.config import parse_config
from fakes import thuecodesim
from tests.conftest import OTHER_KEY, StartApp, call, engine_of, sandbox_raw

TEXT = "text/plain"


async def buy(client: TestClient) -> int:
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith("ACCESS_NUMBER:"), body
    return int(body.split(":")[1])


@pytest.mark.parametrize(
    ("action", "name", "own", "other"),
    [
        ("getIncomingCallStatus", "activationId", "NOT_INCOMING", "INVALID_ACTIVATION_ID"),
        ("getIncomingCallStatus", "id", "NOT_INCOMING", "INVALID_ACTIVATION_ID"),
        ("getAdditionalService", "id", "WRONG_SECURITY", "WRONG_ACTIVATION_ID"),
        ("getExtraActivation", "activationId", "RENEW_ACTIVATION_NOT_AVAILABLE",
         "WRONG_ACTIVATION_ID"),
        ("getExtraActivation", "id", "RENEW_ACTIVATION_NOT_AVAILABLE",
         "WRONG_ACTIVATION_ID"),
        ("checkExtraActivation", "activationId", "RENEW_ACTIVATION_NOT_AVAILABLE",
         "WRONG_ACTIVATION_ID"),
    ],
)  # fmt: skip
async def test_features_not_available(
    api: TestClient, action: str, name: str, own: str, other: str
) -> None:
    activation_id = await buy(api)
    engine = engine_of(api)
    before = await engine.store.count()
    balance = await engine.providers["sandbox"].balance()
    params: dict[str, Any] = {"action": action, name: activation_id, "service": "wa"}
    assert await call(api, **params) == (200, TEXT, own)
    assert await call(api, api_key=OTHER_KEY, **params) == (200, TEXT, other)
    for bad in ("999999", "abc", ""):
        assert await call(api, **{**params, name: bad}) == (200, TEXT, other)
    # nothing was bought, nothing changed
    assert await engine.store.count() == before
    assert await engine.providers["sandbox"].balance() == balance


async def test_multi_service_number_not_available(api: TestClient) -> None:
    engine = engine_of(api)
    assert await call(
        api, action="getMultiServiceNumber", multiService="tg,wa", country=10
    ) == (200, TEXT, "NOT_AVAILABLE")
    assert await call(api, action="getMultiServiceNumber", country=10) == (
        200,
        TEXT,
        "BAD_SERVICE",
    )
    assert await engine.store.count() == 0


async def test_channels_limit_from_thuecodesim(
    start_app: StartApp, store_path: str, aiohttp_server: Any
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    server = await aiohttp_server(fake.app)
    options = thuecodesim.provider_options(str(server.make_url("")).rstrip("/"))
    raw = sandbox_raw(
        store_path,
        providers={"tcs": options},
        keys=[{"key": "k" * 32, "alias": "t", "providers": ["tcs"]}],
        currency={"display": "VND"},
    )
    client = await start_app(parse_config(raw))
    fake.scenario = "limit"
    assert await call(
        client, api_key="k" * 32, action="getNumber", service="tg", country=10
    ) == (200, TEXT, "CHANNELS_LIMIT")
    assert fake.orders == {}
    fake.scenario = "no_numbers"
    assert await call(
        client, api_key="k" * 32, action="getNumber", service="tg", country=10
    ) == (200, TEXT, "NO_NUMBERS")


# ---- getExtraActivation for real: thuecodesim re-rents the number ----------------------


async def test_extra_activation_on_thuecodesim(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: Any
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    server = await aiohttp_server(fake.app)
    options = thuecodesim.provider_options(str(server.make_url("")).rstrip("/"))
    key = "k" * 32
    raw = sandbox_raw(
        store_path,
        providers={"tcs": options},
        keys=[{"key": key, "alias": "t", "providers": ["tcs"]},
              {"key": OTHER_KEY, "alias": "o", "providers": ["tcs"]}],
        currency={"display": "VND"},
    )  # fmt: skip
    client = await start_app(parse_config(raw))
    engine = engine_of(client)
    _, _, body = await call(
        client, api_key=key, action="getNumber", service="tg", country=10
    )
    parent_id = int(body.split(":")[1])
    parent = await engine.store.get(parent_id)
    assert parent is not None
    # before a code: nothing to re-activate, nothing bought
    for action in ("getExtraActivation", "checkExtraActivation"):
        assert await call(client, api_key=key, action=action, activationId=parent_id) == (
            200, TEXT, "RENEW_ACTIVATION_NOT_AVAILABLE")  # fmt: skip
    assert len(fake.orders) == 1
    fake.deliver(parent.upstream_id, "Telegram code 11111", "11111")
    clock.advance(5)
    assert (await call(client, api_key=key, action="getStatus", id=parent_id))[2] == (
        "STATUS_OK:11111"
    )
    assert (await call(client, api_key=key, action="setStatus", id=parent_id, status=6))[
        2
    ] == "ACCESS_ACTIVATION"
    status, ctype, body = await call(
        client, api_key=key, action="checkExtraActivation", activationId=parent_id
    )
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body) == {"status": "success", "cost": float(parent.cost),
                                "service": "tg", "phone": int(parent.phone),
                                "country": 10}  # fmt: skip
    assert await call(
        client, api_key=OTHER_KEY, action="getExtraActivation", activationId=parent_id
    ) == (200, TEXT, "WRONG_ACTIVATION_ID")
    assert len(fake.orders) == 1

    _, _, body = await call(
        client, api_key=key, action="getExtraActivation", activationId=parent_id
    )
    assert body == f"ACCESS_NUMBER:{parent_id + 1}:{parent.phone}"
    child = await engine.store.get(parent_id + 1)
    assert child is not None and child.state == "wait_code"
    assert len(fake.orders) == 2 and child.upstream_id in fake.orders
    [(path, query)] = [c for c in fake.calls if c[1].get("number")]
    assert (path, query["number"]) == ("/request/getv2", parent.extra.get("rerent") or parent.phone)
    fake.deliver(child.upstream_id, "Telegram code 22222", "22222")
    clock.advance(5)
    assert (await call(client, api_key=key, action="getStatus", id=parent_id + 1))[
        2
    ] == "STATUS_OK:22222"
