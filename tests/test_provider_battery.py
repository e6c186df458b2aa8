"""One battery, every provider: the dialect through our server to each fake upstream.

Rows are (scenario or fault, what the client sends, the exact body it must get), run
against thuecodesim, sms-man, smspva and the handler_api clones sms3t and
sms-service-online alike (look at apprise's AppriseURLTester); the sandbox gets every row
that does not need an HTTP upstream (at the end).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from compat_server.config import parse_config
from compat_server.engine import Engine
from compat_server.store import CANCELLED, FINISHED, UNCERTAIN
from fakes import handler_api, smsman, smspva, thuecodesim
from fakes.common import FakeUpstream
from providers.vocabulary import ActivationRef
from tests.conftest import KEY, FakeClock, StartApp, call, engine_of, sandbox_raw

TEXT = "text/plain"


@dataclass(frozen=True)
class Backend:
    """How to stand up one provider against its fake, and what it answers."""

    fake: Callable[[], FakeUpstream]
    options: Callable[[str], dict[str, Any]]
    buy_path: str
    balance: str  # getBalance body with the fake's starting balance
    price: float  # getPrices cost of tg in Vietnam, display currency
    phone_prefix: str
    cancels_upstream: bool


BACKENDS = {
    "thuecodesim": Backend(thuecodesim.FakeThuecodesim, thuecodesim.provider_options,
                           "/request/getv2", "ACCESS_BALANCE:4000.00", 4.8, "84", False),
    "smsman": Backend(smsman.FakeSmsman, smsman.provider_options, "/control/get-number",
                      "ACCESS_BALANCE:799.70", 12.5, "84", True),
    "smspva": Backend(smspva.FakeSmspva, smspva.provider_options,
                      "/activation/number/VN/opt29", "ACCESS_BALANCE:945.00", 22.5, "84", True),
    "sms3t": Backend(handler_api.FakeSms3t, handler_api.sms3t_options, "getNumber",
                     "ACCESS_BALANCE:250.00", 15.0, "84", True),
    "sms_service_online": Backend(handler_api.FakeSmsServiceOnline,
                                  handler_api.sms_service_online_options, "getNumber",
                                  "ACCESS_BALANCE:463.02", 9.5, "84", True),
}  # fmt: skip


@dataclass
class Stack:
    """A fake upstream, our server in front of it, and the test's clock."""

    name: str
    backend: Backend
    fake: FakeUpstream
    client: TestClient
    clock: FakeClock

    @property
    def engine(self) -> Engine:
        return engine_of(self.client)

    async def buy(self) -> tuple[int, str]:
        """getNumber tg/Vietnam; returns (local id, upstream id)."""
        status, ctype, body = await call(
            self.client, action="getNumber", service="tg", country=10
        )
        assert (status, ctype) == (200, TEXT) and body.startswith("ACCESS_NUMBER:"), (
            body
        )
        ident = int(body.split(":")[1])
        stored = await self.engine.store.get(ident)
        assert stored is not None and body == f"ACCESS_NUMBER:{ident}:{stored.phone}"
        assert (
            stored.phone.startswith(self.backend.phone_prefix)
            and stored.phone.isdigit()
        )
        assert stored.upstream_id in self.fake.orders
        return ident, stored.upstream_id

    async def status(self, ident: int) -> str:
        """getStatus after the poll interval has passed."""
        self.clock.advance(10)
        _, _, body = await call(self.client, action="getStatus", id=ident)
        return body

    async def set_status(self, ident: int, status: int) -> str:
        _, _, body = await call(
            self.client, action="setStatus", id=ident, status=status
        )
        return body

    def buy_calls(self) -> int:
        return sum(
            1 for path in self.fake.paths_called() if path == self.backend.buy_path
        )


@pytest.fixture(params=sorted(BACKENDS))
async def stack(
    request: pytest.FixtureRequest, aiohttp_server: Any, start_app: StartApp,
    store_path: str, clock: FakeClock,
) -> Stack:  # fmt: skip
    backend = BACKENDS[request.param]
    fake = backend.fake()
    server: TestServer = await aiohttp_server(fake.app)
    options = backend.options(str(server.make_url("")).rstrip("/"))
    options.update(poll_interval=5)
    config = parse_config({
        "store": {"path": store_path},
        "currency": {"display": "RUB", "rates": {"VND": "0.004", "USD": "90"}},
        "upstream": {"connect_timeout": 0.5, "read_timeout": 0.5},
        "keys": [{"key": KEY, "alias": "battery", "providers": [request.param]}],
        "providers": {request.param: options},
    })  # fmt: skip
    client = await start_app(config)
    return Stack(request.param, backend, fake, client, clock)


# ---- happy paths ----------------------------------------------------------------------


async def test_balance(stack: Stack) -> None:
    assert await call(stack.client, action="getBalance") == (
        200,
        TEXT,
        stack.backend.balance,
    )


async def test_prices_and_stock(stack: Stack) -> None:
    status, ctype, body = await call(
        stack.client, action="getPrices", country=10, service="tg"
    )
    assert (status, ctype) == (200, "application/json")
    import json

    row = json.loads(body)["10"]["tg"]
    assert row["cost"] == stack.backend.price and row["count"] > 0
    _, _, body = await call(stack.client, action="getNumbersStatus", country=10)
    assert int(json.loads(body)["tg_0"]) == row["count"]


async def test_buy_poll_code_finish(stack: Stack) -> None:
    ident, upstream = await stack.buy()
    assert await stack.status(ident) == "STATUS_WAIT_CODE"
    stack.fake.deliver(
        upstream, "Telegram code: 54321. Do not give it to anyone", "54321"
    )
    assert await stack.status(ident) == "STATUS_OK:54321"
    assert await stack.set_status(ident, 6) == "ACCESS_ACTIVATION"
    assert await stack.status(ident) == "STATUS_CANCEL"
    stored = await stack.engine.store.get(ident)
    assert stored is not None and stored.state == FINISHED
    assert await stack.engine.store.pending_ops() == []


async def test_buy_cancel(stack: Stack) -> None:
    ident, upstream = await stack.buy()
    assert await stack.set_status(ident, 8) == "ACCESS_CANCEL"
    assert await stack.status(ident) == "STATUS_CANCEL"
    stored = await stack.engine.store.get(ident)
    assert stored is not None and stored.state == CANCELLED
    assert await stack.engine.store.pending_ops() == []  # delivered, nothing queued
    order = stack.fake.orders[upstream]
    assert (order.state == "cancelled") == stack.backend.cancels_upstream


async def test_retry_gets_a_second_code(stack: Stack) -> None:
    ident, upstream = await stack.buy()
    stack.fake.deliver(upstream, "Your code is 111222", "111222")
    assert await stack.status(ident) == "STATUS_OK:111222"
    assert await stack.set_status(ident, 3) == "ACCESS_RETRY_GET"
    assert await stack.status(ident) == "STATUS_WAIT_RETRY:111222"
    stack.fake.deliver(upstream, "Your code is 333444", "333444")
    assert await stack.status(ident) == "STATUS_OK:333444"
    assert await stack.set_status(ident, 6) == "ACCESS_ACTIVATION"


# ---- definite refusals --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "number", "balance"),
    [
        ("no_numbers", "NO_NUMBERS", None),
        ("no_balance", "NO_BALANCE", None),
        ("bad_service", "BAD_SERVICE", None),
        # our own token rejected: the operator's fault, never BAD_KEY for the client
        ("bad_token", "NO_NUMBERS", "ERROR_SQL"),
    ],
)
async def test_refusals(
    stack: Stack, scenario: str, number: str, balance: str | None
) -> None:
    stack.fake.scenario = scenario
    assert await call(stack.client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        number,
    )
    assert await stack.engine.store.count() == 0
    if balance is not None:
        assert await call(stack.client, action="getBalance") == (200, TEXT, balance)
    # one attempt, recorded before the call and closed as refused: nothing to reconcile
    assert len(await stack.engine.store.attempts(["refused"])) == 1
    assert await stack.engine.store.attempts(["uncertain", "pending"]) == []


# ---- faults: a buy that may have happened is never retried --------------------------------


@pytest.mark.parametrize("fault", ["html500", "empty", "malformed", "hang", "reset",
                                   "after_500", "after_reset", "after_hang"])  # fmt: skip
async def test_buy_fault_is_not_retried(stack: Stack, fault: str) -> None:
    await call(stack.client, action="getPrices", country=10)  # warm the catalog
    stack.fake.fault = fault
    stack.fake.fault_paths = {stack.backend.buy_path}
    stack.fake.hang_seconds = 2
    assert await call(stack.client, action="getNumber", service="tg", country=10) == (
        200, TEXT, "NO_NUMBERS",
    )  # fmt: skip
    assert stack.buy_calls() == 1  # exactly one paid call went out
    assert await stack.engine.store.count() == 0
    uncertain = await stack.engine.store.attempts([UNCERTAIN])
    assert [(a.provider, a.order.service, a.order.country) for a in uncertain] == [
        (stack.name, "tg", 10)
    ]


async def test_unreachable_upstream(stack: Stack, aiohttp_server: Any) -> None:
    server = stack.fake.app  # noqa: F841 - keep the fake alive; point a provider elsewhere
    provider = stack.engine.providers[stack.name]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for attr in (
        "base_url",
        "activation_url",
        "_base_url",
        "_activation_url",
        "_rent_url",
    ):
        if hasattr(provider, attr):
            setattr(provider, attr, f"http://127.0.0.1:{port}")
    assert await call(stack.client, action="getNumber", service="tg", country=10) == (
        200, TEXT, "NO_NUMBERS",
    )  # fmt: skip
    assert await stack.engine.store.attempts([UNCERTAIN]) == []


# ---- faults while polling: the last known state stays ------------------------------------


@pytest.mark.parametrize("fault", ["html500", "empty", "malformed", "hang", "reset"])
async def test_poll_fault_keeps_state(stack: Stack, fault: str) -> None:
    ident, upstream = await stack.buy()
    stack.fake.fault = fault
    stack.fake.hang_seconds = 2
    assert await stack.status(ident) == "STATUS_WAIT_CODE"
    stack.fake.fault = None
    stack.fake.deliver(upstream, "Code 909090", "909090")
    assert await stack.status(ident) == "STATUS_OK:909090"
    stack.fake.fault = fault
    assert await stack.status(ident) == "STATUS_OK:909090"


@pytest.mark.parametrize("fault", ["html500", "malformed"])
async def test_balance_fault(stack: Stack, fault: str) -> None:
    stack.fake.fault = fault
    assert await call(stack.client, action="getBalance") == (200, TEXT, "ERROR_SQL")


async def test_cancel_while_upstream_down_is_delivered_later(stack: Stack) -> None:
    if not stack.backend.cancels_upstream:
        pytest.skip("thuecodesim has no cancel call: closed locally")
    ident, upstream = await stack.buy()
    stack.fake.fault = "html500"
    assert await stack.set_status(ident, 8) == "ACCESS_CANCEL"
    pending = await stack.engine.store.pending_ops()
    assert [(p[0], p[1], p[2]) for p in pending] == [(ident, "cancel", 1)]
    assert stack.fake.orders[upstream].state != "cancelled"
    stack.fake.fault = None
    stack.clock.advance(60)
    assert await stack.engine.outbox.step() == 1
    assert stack.fake.orders[upstream].state == "cancelled"
    assert await stack.engine.store.pending_ops() == []


async def test_upstream_expiry_reads_cancel(stack: Stack) -> None:
    ident, upstream = await stack.buy()
    stack.fake.expire(upstream)  # type: ignore[attr-defined]
    assert await stack.status(ident) == "STATUS_CANCEL"


# ---- a published client, unchanged, through our server to each fake ----------------------


async def test_published_client_whole_flow(stack: Stack) -> None:
    import asyncio

    from smsactivate.api import SMSActivateAPI

    api = SMSActivateAPI(KEY)
    api._SMSActivateAPI__api_url = str(stack.client.make_url("/stubs/handler_api.php"))  # type: ignore[attr-defined]
    balance = await asyncio.to_thread(api.getBalance)
    assert balance == {"balance": stack.backend.balance.split(":")[1]}
    number = await asyncio.to_thread(api.getNumber, service="tg", country=10)
    stored = await stack.engine.store.get(number["activation_id"])
    assert stored is not None and number == {
        "activation_id": stored.id,
        "phone": int(stored.phone),
    }
    stack.clock.advance(10)
    assert await asyncio.to_thread(api.getStatus, id=stored.id) == "STATUS_WAIT_CODE"
    stack.fake.deliver(stored.upstream_id, "Telegram code 77881", "77881")
    stack.clock.advance(10)
    assert await asyncio.to_thread(api.getStatus, id=stored.id) == "STATUS_OK:77881"
    assert (
        await asyncio.to_thread(api.setStatus, id=stored.id, status=6)
        == "ACCESS_ACTIVATION"
    )
    second = await asyncio.to_thread(api.getNumber, service="tg", country=10)
    assert (
        await asyncio.to_thread(api.setStatus, id=second["activation_id"], status=8)
        == "ACCESS_CANCEL"
    )
    assert [a.state for a in await stack.engine.store.for_key(stored.key_id, open_only=False)] == [
        FINISHED, CANCELLED,
    ]  # fmt: skip


# ---- catalog cache, ready, loud token errors, --ping ------------------------------------


async def test_catalog_is_cached_for_its_ttl(stack: Stack) -> None:
    def catalog_calls() -> int:
        return len(stack.fake.calls)

    first = await call(stack.client, action="getPrices", country=10)
    after_first = catalog_calls()
    for action in ("getPrices", "getNumbersStatus", "getPrices"):
        await call(stack.client, action=action, country=10)
    assert catalog_calls() == after_first  # answered from the cache
    stack.clock.advance(61)  # upstream.catalog_ttl defaults to 60 s
    stale = await call(stack.client, action="getPrices", country=10)
    assert stale == first  # served at once from the expired entry...
    for _ in range(100):  # ...while a background refresh asks the upstream again
        if catalog_calls() > after_first:
            break
        await asyncio.sleep(0.01)
    assert catalog_calls() > after_first


async def test_ready_reaches_the_upstream_where_it_means_something(
    stack: Stack,
) -> None:
    ident, upstream = await stack.buy()
    assert await stack.set_status(ident, 1) == "ACCESS_READY"
    calls = stack.fake.orders[upstream].calls
    # sms_service_online documents no status 1: it answers BAD_STATUS, taken as final
    ready = {"smsman": "ready", "sms3t": "1", "sms_service_online": "1"}
    if stack.name in ready:
        assert calls[-1] == ready[stack.name]
    else:
        assert "ready" not in calls and "activate" not in calls
    assert await stack.engine.store.pending_ops() == []


async def test_rejected_upstream_token_is_loud_in_the_log(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stack.fake.scenario = "bad_token"
    with caplog.at_level("ERROR", logger="compat_server"):
        await call(stack.client, action="getBalance")
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"provider={stack.name} rejected our credentials: fix providers.{stack.name} in the config"
    ]


async def test_check_config_ping(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    from compat_server.cli import ping

    config = stack.engine.config
    assert await ping(config) == 0
    native = {
        "thuecodesim": "1000000 VND",
        "smsman": "799.70 RUB",
        "smspva": "10.5 USD",
        "sms3t": "250.00 RUB",
        "sms_service_online": "463.02 RUB",
    }[stack.name]
    shown = stack.backend.balance.split(":")[1]
    assert capsys.readouterr().out == (
        f"{stack.name}: reachable, token accepted, balance {native} = {shown} RUB, circuit closed\n"
    )
    stack.fake.scenario = "bad_token"
    assert await ping(config) == 1
    assert capsys.readouterr().out == (
        f"{stack.name}: reachable, TOKEN REJECTED (fix providers.{stack.name}), circuit closed\n"
    )
    stack.fake.scenario = "ok"
    stack.fake.fault = "html500"
    assert await ping(config) == 1
    detail = "HTTP 500, body is not JSON"
    if stack.name in ("sms3t", "sms_service_online"):  # the text dialect
        detail = "getBalance: HTTP 500"
    assert capsys.readouterr().out == (
        f"{stack.name}: UNREACHABLE (UpstreamUncertain: {detail}), circuit closed\n"
    )


# ---- the sandbox: the same rows, in memory ----------------------------------------------
# The sandbox has no upstream, so the HTTP fault rows above have nothing to break; every
# other row runs against it here, stock, balance and services set from its config.


@dataclass
class Sandbox:
    """Our server on the sandbox, and the test's clock."""

    client: TestClient
    clock: FakeClock

    @property
    def engine(self) -> Engine:
        return engine_of(self.client)

    async def buy(self, service: str = "tg") -> int:
        status, ctype, body = await call(
            self.client, action="getNumber", service=service, country=10
        )
        assert (status, ctype) == (200, TEXT) and body.startswith("ACCESS_NUMBER:")
        ident = int(body.split(":")[1])
        stored = await self.engine.store.get(ident)
        assert stored is not None and body == f"ACCESS_NUMBER:{ident}:{stored.phone}"
        assert stored.phone.startswith("84") and stored.phone.isdigit()
        return ident

    async def status(self, ident: int) -> str:
        return (await call(self.client, action="getStatus", id=ident))[2]

    async def set_status(self, ident: int, status: int) -> str:
        return (await call(self.client, action="setStatus", id=ident, status=status))[2]

    async def last_code(self, ident: int) -> str:
        """The code of the sandbox's latest SMS for ``ident`` (asked of the provider)."""
        stored = await self.engine.store.get(ident)
        assert stored is not None
        provider = self.engine.providers["sandbox"]
        ref = ActivationRef(
            stored.upstream_id, stored.phone, stored.service, stored.country,
            stored.created_at, stored.extra,
        )  # fmt: skip
        code = (await provider.poll(ref)).messages[-1].code
        assert len(code) == 6 and code.isdigit()
        return code


SANDBOX_TG = {"tg": {"price": 18, "count": 420}}


async def start_sandbox(
    start_app: StartApp, store_path: str, clock: FakeClock, **options: Any
) -> Sandbox:
    raw = sandbox_raw(store_path)
    raw["providers"]["sandbox"].update(options)
    return Sandbox(await start_app(parse_config(raw)), clock)


@pytest.fixture
async def sandbox(start_app: StartApp, store_path: str, clock: FakeClock) -> Sandbox:
    return await start_sandbox(start_app, store_path, clock, services=SANDBOX_TG)


async def test_sandbox_balance(sandbox: Sandbox) -> None:
    assert await call(sandbox.client, action="getBalance") == (
        200, TEXT, "ACCESS_BALANCE:1000.00",
    )  # fmt: skip


async def test_sandbox_prices_and_stock(sandbox: Sandbox) -> None:
    status, ctype, body = await call(
        sandbox.client, action="getPrices", country=10, service="tg"
    )
    assert (status, ctype, body) == (
        200, "application/json", '{"10":{"tg":{"cost":18.0,"count":420,"physicalCount":420}}}',
    )  # fmt: skip
    status, ctype, body = await call(
        sandbox.client, action="getNumbersStatus", country=10
    )
    assert (status, ctype) == (200, "application/json")
    in_stock = {k: v for k, v in json.loads(body).items() if v != "0"}
    assert in_stock == {"tg_0": "420"}  # every other service listed at "0"


async def test_sandbox_buy_poll_code_finish(sandbox: Sandbox) -> None:
    ident = await sandbox.buy()
    assert await sandbox.status(ident) == "STATUS_WAIT_CODE"
    sandbox.clock.advance(5)  # sms_delay
    body = await sandbox.status(ident)
    assert body == f"STATUS_OK:{await sandbox.last_code(ident)}"
    assert await sandbox.set_status(ident, 6) == "ACCESS_ACTIVATION"
    assert await sandbox.status(ident) == "STATUS_CANCEL"
    stored = await sandbox.engine.store.get(ident)
    assert stored is not None and stored.state == FINISHED
    assert await sandbox.engine.store.pending_ops() == []


async def test_sandbox_buy_cancel_refunds(sandbox: Sandbox) -> None:
    ident = await sandbox.buy()
    assert await call(sandbox.client, action="getBalance") == (
        200, TEXT, "ACCESS_BALANCE:982.00",
    )  # fmt: skip
    assert await sandbox.set_status(ident, 8) == "ACCESS_CANCEL"
    assert await sandbox.status(ident) == "STATUS_CANCEL"
    stored = await sandbox.engine.store.get(ident)
    assert stored is not None and stored.state == CANCELLED
    assert await sandbox.engine.store.pending_ops() == []
    assert await call(sandbox.client, action="getBalance") == (
        200, TEXT, "ACCESS_BALANCE:1000.00",
    )  # fmt: skip


async def test_sandbox_retry_gets_a_second_code(sandbox: Sandbox) -> None:
    ident = await sandbox.buy()
    sandbox.clock.advance(5)
    first = await sandbox.last_code(ident)
    assert await sandbox.status(ident) == f"STATUS_OK:{first}"
    assert await sandbox.set_status(ident, 3) == "ACCESS_RETRY_GET"
    assert await sandbox.status(ident) == f"STATUS_WAIT_RETRY:{first}"
    sandbox.clock.advance(5)
    body = await sandbox.status(ident)
    second = await sandbox.last_code(ident)
    assert body == f"STATUS_OK:{second}" and second != first
    assert await sandbox.set_status(ident, 6) == "ACCESS_ACTIVATION"


@pytest.mark.parametrize(
    ("options", "service", "number"),
    [
        ({"services": {"tg": {"price": 18, "count": 0}}}, "tg", "NO_NUMBERS"),
        ({"services": SANDBOX_TG, "balance": 10}, "tg", "NO_BALANCE"),
        ({"services": SANDBOX_TG}, "wa", "BAD_SERVICE"),
    ],
)
async def test_sandbox_refusals(
    start_app: StartApp, store_path: str, clock: FakeClock,
    options: dict[str, Any], service: str, number: str,
) -> None:  # fmt: skip
    sandbox = await start_sandbox(start_app, store_path, clock, **options)
    assert await call(
        sandbox.client, action="getNumber", service=service, country=10
    ) == (200, TEXT, number)
    assert await sandbox.engine.store.count() == 0
    assert len(await sandbox.engine.store.attempts(["refused"])) == 1
    assert await sandbox.engine.store.attempts(["uncertain", "pending"]) == []
