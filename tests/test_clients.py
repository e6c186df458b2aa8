"""Published client libraries, unchanged, driving whole flows against the real server.

The app runs on a loopback port (``aiohttp_server``) on the sandbox provider with the
FakeClock: ``clock.advance(6)`` makes the sandbox SMS arrive (``sms_delay`` 5) and also
lifts the poll throttle (``poll_interval`` 1). Sync libraries (requests / httpx) are
called through ``asyncio.to_thread`` so the server keeps serving in the loop.

Each library is pointed at the server with the override from protocol.md section 7:
``smsactivate`` -> the name-mangled ``__api_url``; ``aiosmsactivate`` -> ``base_url``;
``smsactivateru`` -> ``wrapper.url``; ``pysmshub`` -> ``.base_url``;
``grizzly-sms-client`` and ``smsbower`` -> ``base_url`` = scheme + host + port.

Every flow checks what the library returns (whole values) and what the store holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestServer

from compat_server.app import ENGINE, create_app
from compat_server.config import Config
from compat_server.engine import Engine
from compat_server.store import Activation
from tests.conftest import KEY, T0, FakeClock

API = "/stubs/handler_api.php"
T = TypeVar("T")

# ---- what the sandbox sells (its defaults), as clients see it ----------------------

TG_COST = 18.0
START_BALANCE = Decimal("1000")
AFTER_ONE_TG = Decimal("982")


def stamp(seconds: float) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in local time, as the dialect sends activation times."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


BOUGHT_AT = stamp(T0)
ENDS_AT = stamp(T0 + 1200)  # activation.lifetime in sandbox_raw

PRICES_TG_VN = {"10": {"tg": {"cost": TG_COST, "count": 420, "physicalCount": 420}}}

# The 39 keys smsactivateru.GetFreeSlots indexes (protocol.md 8.9); "0" if not sold.
LEGACY_KEYS = (
    "av_0 av_1 bd_0 dt_0 fb_0 fd_0 go_0 gt_0 ig_0 kp_0 kt_0 ma_0 mb_0 me_0 mm_0 mt_0"
    " oi_0 ok_0 ot_0 ot_1 pm_0 qw_0 sn_0 ss_0 tg_0 tn_0 tw_0 ub_0 uk_0 vi_0 vk_0 wa_0"
    " wb_0 we_0 ya_0 ya_1 ym_0 ym_1 zz_0"
).split()
SANDBOX_STOCK = {
    "tg_0": "420", "wa_0": "310", "go_0": "880", "fb_0": "640", "ig_0": "515",
    "vk_0": "120", "ok_0": "95", "mj_0": "230", "ka_0": "190", "lf_0": "270",
    "tw_0": "150", "ds_0": "205", "am_0": "160", "mm_0": "330", "ot_0": "999",
}  # fmt: skip
NUMBERS_STATUS_VN = {**{key: "0" for key in LEGACY_KEYS}, **SANDBOX_STOCK}


def _country(cid: int, rus: str, eng: str) -> dict[str, Any]:
    return {
        "id": cid,
        "rus": rus,
        "eng": eng,
        "chn": eng,
        "visible": 1,
        "retry": 1,
        "rent": 1,  # the sandbox rents in every country it serves
        "multiService": 0,
    }


COUNTRIES = {
    "0": _country(0, "Россия", "Russia"),
    "10": _country(10, "Вьетнам", "Vietnam"),
    "25": _country(25, "Лаос", "Laos"),
    "187": _country(187, "США", "USA"),
}
OPERATORS_VN = {
    "status": "success",
    "countryOperators": {
        "10": [
            "any",
            "viettel",
            "vinaphone",
            "mobifone",
            "vietnamobile",
            "itelecom",
            "wintel",
        ]
    },
}


def tg_text(code: str) -> str:
    """The sandbox's Telegram SMS."""
    return (
        f"Telegram code: {code}\n\n"
        f"You can also tap on this link to log in: t.me/login/{code}"
    )


# ---- harness -------------------------------------------------------------------------


@pytest.fixture
async def server(aiohttp_server: Any, config: Config, clock: FakeClock) -> TestServer:
    srv: TestServer = await aiohttp_server(
        create_app(config, clock=clock, background=False)
    )
    return srv


@pytest.fixture
def url(server: TestServer) -> str:
    return str(server.make_url(API))


@pytest.fixture
def root(server: TestServer) -> str:
    """scheme://host:port, for the clients that append the handler path themselves."""
    return str(server.make_url("/")).rstrip("/")


@pytest.fixture
def wire(caplog: pytest.LogCaptureFixture) -> Callable[[], list[tuple[str, str]]]:
    """(method, action) of each request the server answered (aiohttp access log)."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    line = re.compile(r'"([A-Z]+) /stubs/handler_api\.php\?(\S*) HTTP/1\.1"')

    def seen() -> list[tuple[str, str]]:
        result = []
        for record in caplog.records:
            if record.name != "aiohttp.access":
                continue
            found = line.search(record.getMessage())
            assert found is not None, record.getMessage()
            query = dict(p.split("=", 1) for p in found.group(2).split("&") if "=" in p)
            result.append((found.group(1), query.get("action", "")))
        return result

    return seen


def engine_of(server: TestServer) -> Engine:
    return server.app[ENGINE]


async def stored(server: TestServer, activation_id: int | str) -> Activation:
    activation = await engine_of(server).store.get(int(activation_id))
    assert activation is not None
    return activation


async def sandbox_balance(server: TestServer) -> Decimal:
    return await engine_of(server).providers["sandbox"].balance()


async def no_pending_ops(server: TestServer) -> None:
    """The upstream heard of every finish/cancel at once (nothing left queued)."""
    assert await engine_of(server).store.pending_ops() == []


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking library call, off the loop that serves it."""
    return await asyncio.to_thread(fn, *args, **kwargs)


# ======================================================================================
# smsactivate 1.5 (the "official" sync client; GET through requests)
# ======================================================================================


@pytest.fixture
def sa(url: str) -> Any:
    from smsactivate.api import SMSActivateAPI

    api = SMSActivateAPI(KEY)
    api._SMSActivateAPI__api_url = url  # the only override (protocol.md 7)
    return api


async def test_smsactivate_catalog(
    sa: Any, wire: Callable[[], list[tuple[str, str]]]
) -> None:
    assert await run(sa.getBalance) == {"balance": "1000.00"}
    assert await run(sa.getBalanceAndCashBack) == {"balance": "1000.00"}
    assert await run(sa.getPrices, service="tg", country=10) == PRICES_TG_VN
    assert await run(sa.getNumbersStatus, country=10) == NUMBERS_STATUS_VN
    assert await run(sa.getCountries) == COUNTRIES
    assert await run(sa.getOperators, country=10) == OPERATORS_VN
    assert await run(sa.getOperators, country=12) == {
        "status": "error",
        "error": "OPERATORS_NOT_FOUND",
    }
    assert await run(sa.getActiveActivations) == {
        "status": "error",
        "error": "NO_ACTIVATIONS",
    }
    assert {method for method, _ in wire()} == {"GET"}


async def test_smsactivate_number_code_finish(
    sa: Any,
    server: TestServer,
    clock: FakeClock,
    wire: Callable[[], list[tuple[str, str]]],
) -> None:
    bought = await run(sa.getNumber, service="tg", country=10)
    activation = await stored(server, bought["activation_id"])
    assert bought == {"activation_id": 100_000, "phone": int(activation.phone)}
    assert re.fullmatch(r"84\d{9}", activation.phone)
    assert (activation.state, activation.service, activation.country) == (
        "wait_code",
        "tg",
        10,
    )
    assert activation.cost == Decimal("18.00")
    assert await run(sa.getBalance) == {"balance": "982.00"}

    assert await run(sa.getStatus, id=100_000) == "STATUS_WAIT_CODE"
    assert await run(sa.getFullSms, id=100_000) == "STATUS_WAIT_CODE"
    clock.advance(6)
    status = await run(sa.getStatus, id=100_000)
    activation = await stored(server, 100_000)
    assert len(activation.messages) == 1
    code = activation.messages[0].code
    assert re.fullmatch(r"\d{6}", code)
    assert status == f"STATUS_OK:{code}"
    assert activation.state == "code"
    assert await run(sa.getFullSms, id=100_000) == f"FULL_SMS:{tg_text(code)}"

    assert await run(sa.getActiveActivations) == {
        "status": "success",
        "activeActivations": [active_row(activation, "2", [code], [tg_text(code)])],
        "data": [active_row(activation, "2", [code], [tg_text(code)])],
    }
    # a code came: cancelling is refused, the library maps the token to its error dict
    assert await run(sa.setStatus, id=100_000, status=8) == {
        "error": "BAD_STATUS",
        "message": "Attempt to establish a non-existent status",
    }

    assert await run(sa.setStatus, id=100_000, status=6) == "ACCESS_ACTIVATION"
    activation = await stored(server, 100_000)
    assert activation.state == "finished"
    await no_pending_ops(server)
    # closed: getStatus says STATUS_CANCEL, which smsactivate reports as an error dict
    assert await run(sa.getStatus, id=100_000) == {
        "error": "STATUS_CANCEL",
        "message": "Current activation canceled and no longer available",
    }
    assert await run(sa.getActiveActivations) == {
        "status": "error",
        "error": "NO_ACTIVATIONS",
    }
    assert await run(sa.getBalance) == {"balance": "982.00"}
    assert await sandbox_balance(server) == AFTER_ONE_TG
    assert {method for method, _ in wire()} == {"GET"}


def active_row(
    activation: Activation,
    status: str,
    codes: list[str] | None,
    texts: list[str] | None,
) -> dict[str, Any]:
    """A getActiveActivations row (protocol.md 8.10) for a sandbox tg/VN activation."""
    return {
        "activationId": str(activation.id),
        "serviceCode": "tg",
        "phoneNumber": activation.phone,
        "activationCost": TG_COST,
        "activationStatus": status,
        "smsCode": codes,
        "smsText": None if texts is None else json.dumps(texts, ensure_ascii=False),
        "activationTime": BOUGHT_AT,
        "discount": "0.00",
        "repeated": "0",
        "countryCode": "10",
        "countryName": "Vietnam",
        "canGetAnotherSms": "1",
        "currency": 643,
    }


async def test_smsactivate_cancel_refunds(sa: Any, server: TestServer) -> None:
    assert await run(sa.getBalance) == {"balance": "1000.00"}
    bought = await run(sa.getNumber, service="tg", country=10)
    activation = await stored(server, bought["activation_id"])
    assert bought == {"activation_id": 100_000, "phone": int(activation.phone)}
    assert await run(sa.getBalance) == {"balance": "982.00"}

    assert await run(sa.setStatus, id=100_000, status=8) == "ACCESS_CANCEL"
    activation = await stored(server, 100_000)
    assert activation.state == "cancelled"
    assert activation.messages == []
    await no_pending_ops(server)
    assert await run(sa.getBalance) == {"balance": "1000.00"}
    assert await sandbox_balance(server) == START_BALANCE
    assert await run(sa.getStatus, id=100_000) == {
        "error": "STATUS_CANCEL",
        "message": "Current activation canceled and no longer available",
    }
    # a repeated cancel is harmless and answers the same
    assert await run(sa.setStatus, id=100_000, status=8) == "ACCESS_CANCEL"


async def test_smsactivate_number_v2_and_active(
    sa: Any, server: TestServer, clock: FakeClock
) -> None:
    bought = await run(sa.getNumberV2, service="tg", country=10)
    activation = await stored(server, 100_000)
    assert bought == {
        "activationId": 100_000,
        "phoneNumber": activation.phone,
        "activationCost": TG_COST,
        "currency": 643,
        "countryCode": "10",
        "canGetAnotherSms": "1",
        "activationTime": BOUGHT_AT,
        "activationEndTime": ENDS_AT,
        "activationEnd": ENDS_AT,
        "activationOperator": "any",
    }
    assert await run(sa.getActiveActivations) == {
        "status": "success",
        "activeActivations": [active_row(activation, "1", None, None)],
        "data": [active_row(activation, "1", None, None)],
    }
    assert await run(sa.setStatus, id=100_000, status=1) == "ACCESS_READY"
    clock.advance(6)
    assert (await stored(server, 100_000)).messages == []  # no poll has run since
    status = await run(sa.getStatus, id=100_000)
    code = (await stored(server, 100_000)).code
    assert status == f"STATUS_OK:{code}"
    # another SMS: STATUS_WAIT_RETRY with the old code until it comes
    assert await run(sa.setStatus, id=100_000, status=3) == "ACCESS_RETRY_GET"
    assert await run(sa.getStatus, id=100_000) == f"STATUS_WAIT_RETRY:{code}"
    assert (await stored(server, 100_000)).state == "wait_retry"
    clock.advance(6)
    status = await run(sa.getStatus, id=100_000)
    activation = await stored(server, 100_000)
    assert [m.code for m in activation.messages][:1] == [code]
    assert len(activation.messages) == 2
    assert status == f"STATUS_OK:{activation.messages[1].code}"
    assert await run(sa.setStatus, id=100_000, status=6) == "ACCESS_ACTIVATION"
    assert (await stored(server, 100_000)).state == "finished"


async def test_smsactivate_errors(sa: Any, url: str) -> None:
    from smsactivate.api import SMSActivateAPI

    assert await run(sa.getStatus, id=999_999) == {
        "error": "NO_ACTIVATION",
        "message": "The specified activation id does not exist",
    }
    assert await run(sa.getNumber, service="zz-unknown", country=10) == {
        "error": "BAD_SERVICE",
        "message": "Incorrect service name (service parameter)",
    }
    stranger = SMSActivateAPI("not-a-configured-key")
    stranger._SMSActivateAPI__api_url = url
    assert await run(stranger.getBalance) == {
        "error": "BAD_KEY",
        "message": "Invalid API access key",
    }


# ======================================================================================
# aiosmsactivate 1.5.1 (async; POST with every parameter in the query; pydantic)
# ======================================================================================


@pytest.fixture
def asa(url: str) -> Any:
    from aiosmsactivate import SmsActivate

    return SmsActivate(KEY, base_url=url)


async def test_aiosmsactivate_code_finish(
    asa: Any,
    server: TestServer,
    clock: FakeClock,
    wire: Callable[[], list[tuple[str, str]]],
) -> None:
    from aiosmsactivate import ActivationStatus, Number, SetActivationStatusResponse
    from aiosmsactivate.models import ActivationData, Sms

    assert await asa.get_balance() == 1000.0
    number = await asa.purchase("tg", country=10)
    activation = await stored(server, 100_000)
    assert isinstance(number, Number)
    assert number.model_dump() == {
        "activation_id": 100_000,
        "phone_number": activation.phone,
        "activation_cost": TG_COST,
        "country_code": "10",
        "can_get_another_sms": True,
        "activation_time": BOUGHT_AT,
        "operator": "any",
        "service": "tg",
        "activation_unix_time": int(T0),
        "time_life": 1200,
        "end_activation_time": int(T0) + 1200,
    }
    assert activation.state == "wait_code"
    assert await asa.get_balance() == 982.0

    assert await asa.get_activation_status(number) == ActivationData(
        verificationType=0, sms=None, call=None
    )
    assert await asa.get_activation_status_v1(100_000) == (ActivationStatus.WAIT, None)
    clock.advance(6)
    data = await asa.get_activation_status(100_000)
    activation = await stored(server, 100_000)
    assert len(activation.messages) == 1
    code = activation.code
    assert data == ActivationData(
        verificationType=0,
        sms=Sms(dateTime=stamp(T0 + 6), code=code, text=tg_text(code)),
        call=None,
    )
    assert await asa.get_activation_status_v1(100_000) == (ActivationStatus.OK, code)

    assert (
        await asa.set_activation_status(100_000, 6)
        is SetActivationStatusResponse.ACTIVATED
    )
    assert (await stored(server, 100_000)).state == "finished"
    await no_pending_ops(server)
    assert await asa.get_activation_status(100_000) == "STATUS_CANCEL"
    assert await asa.get_activation_status_v1(100_000) == (
        ActivationStatus.CANCEL,
        None,
    )
    assert await asa.get_balance() == 982.0
    assert await sandbox_balance(server) == AFTER_ONE_TG

    # it really spoke POST with the parameters in the query string
    assert wire() == [
        ("POST", "getBalance"), ("POST", "getNumberV2"), ("POST", "getBalance"),
        ("POST", "getStatusV2"), ("POST", "getStatus"), ("POST", "getStatusV2"),
        ("POST", "getStatus"), ("POST", "setStatus"), ("POST", "getStatusV2"),
        ("POST", "getStatus"), ("POST", "getBalance"),
    ]  # fmt: skip


async def test_aiosmsactivate_cancel_refunds(asa: Any, server: TestServer) -> None:
    from aiosmsactivate import (
        ActivationStatus,
        SetActivationStatusResponse,
        SmsActivateException,
    )
    from aiosmsactivate.types import SetActivationStatus

    assert await asa.get_balance() == 1000.0
    number = await asa.purchase("tg", country=10)
    assert number.activation_id == 100_000
    assert number.phone_number == (await stored(server, 100_000)).phone
    assert await asa.get_balance() == 982.0

    # finishing before a code is refused: the library raises the token
    with pytest.raises(SmsActivateException) as refused:
        await asa.set_activation_status(100_000, SetActivationStatus.COMPLETE)
    assert refused.value.code == "BAD_STATUS"

    answer = await asa.set_activation_status(100_000, SetActivationStatus.CANCEL)
    assert answer is SetActivationStatusResponse.CANCEL
    activation = await stored(server, 100_000)
    assert activation.state == "cancelled"
    await no_pending_ops(server)
    assert await asa.get_balance() == 1000.0
    assert await sandbox_balance(server) == START_BALANCE
    assert await asa.get_activation_status(number) == "STATUS_CANCEL"
    assert await asa.get_activation_status_v1(100_000) == (
        ActivationStatus.CANCEL,
        None,
    )


async def test_aiosmsactivate_wait_sms_code(
    asa: Any, server: TestServer, clock: FakeClock
) -> None:
    """wait_sms_code: setStatus 1, polls getStatus, on the code asks for another (3)."""
    from aiosmsactivate import ActivationStatus, SetActivationStatusResponse
    from aiosmsactivate.models import ActivationData

    number = await asa.purchase("tg", country=10)
    clock.advance(6)
    code = await asyncio.wait_for(
        asa.wait_sms_code(number, timeout=5, per_attempt=0), 5
    )
    activation = await stored(server, 100_000)
    assert [m.code for m in activation.messages] == [code]
    assert activation.state == "wait_retry"  # the library's own setStatus 3
    assert await asa.get_activation_status(number) == ActivationData(
        verificationType=0, sms=None, call=None
    )
    assert await asa.get_activation_status_v1(100_000) == (ActivationStatus.RETRY, code)

    clock.advance(6)
    status = await asa.get_activation_status_v1(100_000)
    activation = await stored(server, 100_000)
    assert len(activation.messages) == 2
    assert status == (ActivationStatus.OK, activation.messages[1].code)
    assert (
        await asa.set_activation_status(100_000, 6)
        is SetActivationStatusResponse.ACTIVATED
    )
    assert (await stored(server, 100_000)).state == "finished"


async def test_aiosmsactivate_catalog(asa: Any, server: TestServer) -> None:
    from aiosmsactivate import SmsActivateException

    assert await asa.get_balance_and_cashback() == 1000.0
    assert await asa.get_prices("tg", 10) == PRICES_TG_VN
    assert await asa.get_countries() == COUNTRIES
    assert await asa.get_operators("10") == OPERATORS_VN
    assert await asa.get_count_numbers("10", "any") == NUMBERS_STATUS_VN
    with pytest.raises(SmsActivateException) as none:
        await asa.get_active_activations()
    assert none.value.code == "NO_ACTIVATIONS"

    # getNumber (v1): the library hands back the raw token
    answer = await asa.get_number("tg", country=10)
    activation = await stored(server, 100_000)
    assert answer == f"ACCESS_NUMBER:100000:{activation.phone}"
    assert await asa.get_active_activations() == {
        "status": "success",
        "activeActivations": [active_row(activation, "1", None, None)],
        "data": [active_row(activation, "1", None, None)],
    }
    with pytest.raises(SmsActivateException) as unknown:
        await asa.purchase("zz-unknown", country=10)
    assert unknown.value.code == "BAD_SERVICE"


# ======================================================================================
# Optional third-party clients (protocol.md 7): skipped when not installed.
# ======================================================================================

# ---- smsactivateru 1.2.6 (tezmen; sync, requests, substring error matching) ----------


async def test_smsactivateru_flow(
    url: str, server: TestServer, clock: FakeClock
) -> None:
    smsactivateru = pytest.importorskip("smsactivateru")
    from smsactivateru import (
        GetBalance,
        GetFreeSlots,
        GetNumber,
        GetStatus,
        SmsService,
        SmsTypes,
    )

    wrapper = smsactivateru.Sms(KEY)
    wrapper.url = url
    assert await run(GetBalance().request, wrapper) == 1000.0
    slots = await run(GetFreeSlots(country=SmsTypes.Country.VN).request, wrapper)
    assert (slots.Telegram.count, slots.VkCom.count, slots.Viber.count) == (420, 120, 0)

    number = await run(
        GetNumber(service=SmsService().Telegram, country=SmsTypes.Country.VN).request,
        wrapper,
    )
    activation = await stored(server, 100_000)
    assert (number.id, number.phone_number) == ("100000", activation.phone)
    assert await run(GetStatus(id=number.id).request, wrapper) == {
        "status": "STATUS_WAIT_CODE",
        "code": None,
    }
    clock.advance(6)
    # wait_code sleeps 1 s (real time), reads the code, then sends setStatus 6 itself
    code = await run(number.wait_code, timeout=5)
    activation = await stored(server, 100_000)
    assert [m.code for m in activation.messages] == [code]
    assert activation.state == "finished"
    await no_pending_ops(server)
    assert await run(GetBalance().request, wrapper) == 982.0


async def test_smsactivateru_cancel(url: str, server: TestServer) -> None:
    smsactivateru = pytest.importorskip("smsactivateru")
    from smsactivateru import (
        GetBalance,
        GetNumber,
        GetStatus,
        SetStatus,
        SmsService,
        SmsTypes,
    )
    from smsactivateru.models import ErrorsModel

    wrapper = smsactivateru.Sms(KEY)
    wrapper.url = url
    number = await run(
        GetNumber(service=SmsService().Telegram, country=SmsTypes.Country.VN).request,
        wrapper,
    )
    assert number.id == "100000"
    assert await run(GetBalance().request, wrapper) == 982.0
    assert await run(number.was_sent) == {"status": "ACCESS_READY"}
    assert await run(number.cancel) == {"status": "ACCESS_CANCEL"}  # status -1
    assert (await stored(server, 100_000)).state == "cancelled"
    assert await run(GetBalance().request, wrapper) == 1000.0
    with pytest.raises(ErrorsModel) as closed:
        await run(GetStatus(id=number.id).request, wrapper)
    assert type(closed.value).__name__ == "CanceledActivation"
    # status 8 ("AlreadyUsed" in this library) on a fresh number cancels as well
    second = await run(
        GetNumber(service=SmsService().Telegram, country=SmsTypes.Country.VN).request,
        wrapper,
    )
    assert second.id == "100001"
    assert await run(
        SetStatus(id=second.id, status=SmsTypes.Status.AlreadyUsed).request, wrapper
    ) == {"status": "ACCESS_CANCEL"}
    assert (await stored(server, 100_001)).state == "cancelled"


# ---- pysmshub 0.1.3 (kuudori; async via aiohttp, sync via requests) ------------------


async def test_pysmshub_flow(url: str, server: TestServer, clock: FakeClock) -> None:
    pysmshub = pytest.importorskip("pysmshub")
    from pysmshub import Status

    api = pysmshub.AsyncSmsHubApi(KEY)
    api.base_url = url
    assert await api.get_balance() == 1000.0
    assert await api.get_numbers_status(country="10") == NUMBERS_STATUS_VN
    assert await api.get_prices("tg", country="10") == PRICES_TG_VN
    activation_id, phone = await api.get_number("tg", country="10")
    activation = await stored(server, 100_000)
    assert (activation_id, phone) == ("100000", activation.phone)
    assert await api.get_status(100_000) == (Status.WAIT, None)
    clock.advance(6)
    status = await api.get_status(100_000)
    activation = await stored(server, 100_000)
    assert status == (Status.SENT, activation.code)
    assert await api.set_status(100_000, Status.SUCCESS) == "ACCESS_ACTIVATION"
    assert (await stored(server, 100_000)).state == "finished"
    assert await api.get_status(100_000) == (Status.CANCEL, None)
    assert await api.get_balance() == 982.0


async def test_pysmshub_sync_cancel(url: str, server: TestServer) -> None:
    pysmshub = pytest.importorskip("pysmshub")
    from pysmshub import Status

    api = pysmshub.SyncSmsHubApi(KEY)
    api.base_url = url
    activation_id, phone = await run(api.get_number, "tg", country=10)
    assert (activation_id, phone) == ("100000", (await stored(server, 100_000)).phone)
    assert await run(api.get_balance) == 982.0
    assert await run(api.set_status, 100_000, Status.CANCEL) == "ACCESS_CANCEL"
    assert (await stored(server, 100_000)).state == "cancelled"
    assert await run(api.get_status, 100_000) == (Status.CANCEL, None)
    assert await run(api.get_balance) == 1000.0


# ---- grizzly-sms-client 0.1.1 (TysikGG; sync httpx, adds ref_id) ---------------------


async def test_grizzly_flow(root: str, server: TestServer, clock: FakeClock) -> None:
    grizzly_sms = pytest.importorskip("grizzly_sms")
    from grizzly_sms import (
        ActivationStatus,
        CountryInfo,
        OrderedNumberV2,
        PriceQuote,
        ReceivedCode,
    )

    with grizzly_sms.GrizzlySms(KEY, base_url=root, timeout_ms=5000) as sms:
        assert await run(sms.get_balance) == 1000.0
        assert await run(sms.get_countries) == [
            CountryInfo(id=row["id"], rus=row["rus"], eng=row["eng"], chn=row["chn"])
            for row in COUNTRIES.values()
        ]
        assert await run(sms.get_prices, service="tg", country=10) == PRICES_TG_VN
        assert await run(sms.find_prices, service="tg", country=10) == [
            PriceQuote(country="10", service="tg", cost=TG_COST, count=420.0)
        ]
        number = await run(sms.get_number_v2, "tg", country=10)
        activation = await stored(server, 100_000)
        # activationEnd is a Grizzly extension we send too; activationCancel we do not
        assert number == OrderedNumberV2(
            activation_id="100000",
            phone_number=activation.phone,
            activation_cost=TG_COST,
            currency=643.0,
            country_code="10",
            can_get_another_sms=True,
            activation_time=BOUGHT_AT,
            activation_cancel=None,
            activation_end=ENDS_AT,
        )
        assert await run(sms.get_status, "100000") == ActivationStatus(
            status="STATUS_WAIT_CODE"
        )
        assert await run(sms.get_status_v2, "100000") == {
            "verificationType": 0,
            "sms": None,
            "call": None,
        }
        assert await run(sms.ready, "100000") == "ACCESS_READY"
        clock.advance(6)
        received = await run(
            sms.wait_for_code, "100000", interval_ms=20, timeout_ms=3000
        )
        activation = await stored(server, 100_000)
        assert received == ReceivedCode(code=activation.code)
        assert await run(sms.get_status_v2, "100000") == {
            "verificationType": 0,
            "sms": {
                "dateTime": stamp(T0 + 6),
                "code": activation.code,
                "text": tg_text(activation.code),
            },
            "call": None,
        }
        assert await run(sms.complete, "100000") == "ACCESS_ACTIVATION"
        assert (await stored(server, 100_000)).state == "finished"
        assert await run(sms.get_status, "100000") == ActivationStatus(
            status="STATUS_CANCEL"
        )
        assert await run(sms.get_balance) == 982.0
        # not checked: get_active_activations expects a bare JSON array (Grizzly's
        # own shape) where protocol.md 8.10 answers the classic object.


async def test_grizzly_cancel(root: str, server: TestServer) -> None:
    grizzly_sms = pytest.importorskip("grizzly_sms")
    from grizzly_sms import GrizzlySmsError, OrderedNumber

    with grizzly_sms.GrizzlySms(KEY, base_url=root, timeout_ms=5000) as sms:
        number = await run(sms.get_number, "tg", country=10)
        assert number == OrderedNumber("100000", (await stored(server, 100_000)).phone)
        with pytest.raises(GrizzlySmsError) as refused:
            await run(sms.complete, "100000")
        assert refused.value.code == "BAD_STATUS"
        assert await run(sms.cancel, "100000") == "ACCESS_CANCEL"
        assert (await stored(server, 100_000)).state == "cancelled"
        assert await run(sms.get_balance) == 1000.0
        with pytest.raises(GrizzlySmsError) as missing:
            await run(sms.get_status, "999999")
        assert missing.value.code == "NO_ACTIVATION"


# ---- smsbower 0.1.0 (TysikGG; sync httpx, adds ref) ----------------------------------


async def test_smsbower_flow(root: str, server: TestServer, clock: FakeClock) -> None:
    smsbower = pytest.importorskip("smsbower")
    from smsbower import ActivationNumber, ActivationStatus, CountryItem

    with smsbower.SmsBowerClient(KEY, base_url=root, timeout=5.0) as client:
        assert await run(client.get_balance) == 1000.0
        assert await run(client.get_countries) == {
            cid: CountryItem(
                id=str(row["id"]), rus=row["rus"], eng=row["eng"], chn=row["chn"]
            )
            for cid, row in COUNTRIES.items()
        }
        assert await run(client.get_prices, "tg", 10) == PRICES_TG_VN
        number = await run(client.get_number, "tg", country=10)
        activation = await stored(server, 100_000)
        assert number == ActivationNumber(id="100000", number=activation.phone)
        assert await run(client.get_status, "100000") == ActivationStatus(
            "STATUS_WAIT_CODE"
        )
        clock.advance(6)
        status = await run(client.get_status, "100000")
        activation = await stored(server, 100_000)
        assert status == ActivationStatus("STATUS_OK", activation.code)
        assert await run(client.set_status, "100000", 6) == "ACCESS_ACTIVATION"
        assert (await stored(server, 100_000)).state == "finished"
        assert await run(client.get_balance) == 982.0

        order = await run(client.get_number_v2, "tg", country=10)
        second = await stored(server, 100_001)
        assert order == {
            "activationId": 100_001,
            "phoneNumber": second.phone,
            "activationCost": TG_COST,
            "currency": 643,
            "countryCode": "10",
            "canGetAnotherSms": "1",
            "activationTime": stamp(T0 + 6),
            "activationEndTime": stamp(T0 + 6 + 1200),
            "activationEnd": stamp(T0 + 6 + 1200),
            "activationOperator": "any",
        }
        assert await run(client.set_status, "100001", 8) == "ACCESS_CANCEL"
        assert (await stored(server, 100_001)).state == "cancelled"
        assert await run(client.get_status, "100001") == ActivationStatus(
            "STATUS_CANCEL"
        )
        assert await run(client.get_balance) == 982.0
        await no_pending_ops(server)
