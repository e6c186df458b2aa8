"""Operations: config checks, --version, JSON logs, reload on SIGHUP (in process and real)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from compat_server import ops
from compat_server.cli import main
from compat_server.config import parse_config
from providers import PROVIDERS, get_provider_class
from providers.settings import ProviderSettings
from providers.vocabulary import ConfigError
from tests.conftest import (
    KEY,
    OTHER_KEY,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
)

TEXT = "text/plain"


def raw_with(store_path: str, section: str, value: Any) -> dict[str, Any]:
    raw = sandbox_raw(store_path)
    raw[section] = value
    return raw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("server", {"port": -5}), "server.port: must be between 0 and 65535, got -5"),
        (("server", {"port": 70000}), "server.port: must be between 0 and 65535, got 70000"),
        (("server", {"prot": 80}), "server.prot: unknown option (known: body_timeout, event_loop, host, log_repeat_interval, max_connections,"
         " max_connections_per_client, port, request_deadline, tls)"),
        (("store", {"path": "x", "wal": True}), "store.wal: unknown option (known: busy_timeout, path, pool, url)"),
        (("activation", {"lifetime": 0}), "activation.lifetime: must be greater than 0"),
        (("activation", {"lifetme": 5}),
         "activation.lifetme: unknown option (known: early_cancel, lifetime)"),
        (("breaker", {"failures": 0}), "breaker.failures: must be at least 1, got 0"),
        (("upstream", {"read_timeout": "nan"}), "upstream.read_timeout: must be a finite number"),
        (("workers", {"sweep_interval": -1}), "workers.sweep_interval: must not be negative"),
        (("admin", {"token": "short"}),
         "admin.token: must be a string of at least 16 characters"),
        (("admin", {"tokn": "x" * 20}), "admin.tokn: unknown option (known: token)"),
        (("currency", {"display": "RUB", "rate": {}}),
         "currency.rate: unknown option (known: display, rates)"),
    ],
)  # fmt: skip
def test_sections_reject_typos_and_out_of_range(
    store_path: str, change: tuple[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw_with(store_path, *change))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"providers": {"sandbox": {"type": "sandbox", "sms_delai": 5}}},
         "providers.sandbox.sms_delai: unknown option (known: balance, countries, currency,"
         " markup, min_interval, operators, poll_interval, price_drift, rent_countries,"
         " services, sms_delay, type)"),
        ({"keys": [{"key": KEY, "providers": ["sandbox"], "budgett": 5}]},
         "keys[0].budgett: unknown option (known: alias, budget, default_country, key,"
         " max_active, providers, routes, show_upstream_balance, webhook)"),
        ({"keys": [{"key": KEY, "providers": ["sandbox"], "budget": -1}]},
         "keys[0].budget: must not be negative"),
        ({"keys": [{"key": KEY, "providers": ["sandbox"], "max_active": 0}]},
         "keys[0].max_active: must be at least 1, got 0"),
        ({"keys": [{"key": KEY, "providers": ["sandbox"], "show_upstream_balance": "no"}]},
         "keys[0].show_upstream_balance: must be true or false"),
        ({"keys": [{"key": KEY, "alias": "a", "providers": ["sandbox"]},
                   {"key": OTHER_KEY, "alias": "a", "providers": ["sandbox"]}]},
         "keys: the same alias is used twice (aliases name keys in logs and metrics)"),
        ({"routes": [{"providers": ["sandbox"], "servce": "tg"}]},
         "routes[0].servce: unknown option (known: country, providers, service, strategy)"),
    ],
)  # fmt: skip
def test_keys_routes_and_providers_reject_typos(
    store_path: str, patch: dict[str, Any], message: str
) -> None:
    raw = sandbox_raw(store_path, **patch)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert str(caught.value) == message


def test_every_provider_declares_its_options() -> None:
    for name in PROVIDERS:
        settings_class = get_provider_class(name).settings_class
        assert settings_class is not ProviderSettings, name  # its own, not the base
        assert dataclasses.is_dataclass(settings_class), name
        assert settings_class.__dataclass_params__.frozen, name  # type: ignore[attr-defined]


def test_bad_port_is_one_line_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    raw = sandbox_raw(str(tmp_path / "s.sqlite3"))
    raw["server"]["port"] = 70000
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "sms-compat: config error: server.port: must be between 0 and 65535, got 70000\n"
    )
    assert captured.out == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == "sms-compat 0.1.0\n"


async def test_json_log_line_carries_the_activation(
    start_app: StartApp, store_path: str
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ops.JsonFormatter())
    logger = logging.getLogger("compat_server")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        client = await start_app(parse_config(sandbox_raw(store_path)))
        _, _, body = await call(client, action="getNumber", service="tg", country=10)
        await call(client, action="getStatus", id=body.split(":")[1])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [line for line in lines if "action" in line]
    ident = int(body.split(":")[1])
    bought, status = requests
    assert KEY not in stream.getvalue()
    for entry in (bought, status):
        assert entry.pop("time") and entry.pop("ms") >= 0
    assert bought == {
        "level": "INFO",
        "logger": "compat_server",
        "message": bought["message"],
        "action": "getNumber",
        "key": "tester",
        "provider": "sandbox",
        "outcome": "ACCESS_NUMBER",
        "client": "127.0.0.1",
        "id": ident,
        "service": "tg",
        "country": 10,
        "price": "18.00",
    }
    assert bought["message"].startswith("action=getNumber key=tester provider=sandbox")
    assert bought["message"].endswith(
        f" id={ident} service=tg country=10 price=18.00 client=127.0.0.1"
    )
    assert (status["action"], status["outcome"], status["id"]) == (
        "getStatus", "STATUS_WAIT_CODE", ident,
    )  # fmt: skip


async def test_apply_swaps_keys_budgets_and_providers_keeping_activations(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    client = await start_app(parse_config(sandbox_raw(store_path)))
    engine = engine_of(client)
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    ident = body.split(":")[1]
    sandbox = engine.providers["sandbox"]
    new_key = "third-key-0123456789abcdef012345"
    raw = sandbox_raw(
        store_path,
        keys=[
            {"key": KEY, "alias": "tester", "providers": ["fresh"], "budget": 30},
            {"key": new_key, "alias": "third", "providers": ["fresh"]},
        ],
        providers={
            "sandbox": {"type": "sandbox", "sms_delay": 5, "balance": 1000,
                        "poll_interval": 1},
            "fresh": {"type": "sandbox", "balance": 500},
        },
    )  # fmt: skip
    ops.apply(engine, parse_config(raw), None)
    # the removed key is refused, the new one works, the budget counts the old purchase
    assert await call(client, api_key=OTHER_KEY, action="getBalance") == (
        200, TEXT, "BAD_KEY",
    )  # fmt: skip
    assert await call(client, api_key=new_key, action="getBalance") == (
        200, TEXT, "ACCESS_BALANCE:500.00",
    )  # fmt: skip
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:12.00",
    )
    # the unchanged provider kept its instance: the number bought before still gets its SMS
    assert engine.providers["sandbox"] is sandbox
    clock.advance(6)
    _, _, status = await call(client, action="getStatus", id=ident)
    assert status.startswith("STATUS_OK:")
    assert await call(client, action="getNumber", service="go", country=10) == (
        200, TEXT, "NO_BALANCE",
    )  # fmt: skip
    _, _, body = await call(client, action="getNumber", service="tw", country=10)
    activation = await engine.store.get(int(body.split(":")[1]))
    assert activation is not None and activation.provider == "fresh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_for(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sighup_reloads_a_running_server(tmp_path: Path) -> None:
    port = _free_port()
    path = tmp_path / "config.yaml"
    raw = sandbox_raw(str(tmp_path / "store.sqlite3"))
    raw["server"]["port"] = port
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    log_path = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}/stubs/handler_api.php"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "compat_server", "serve", "--config", str(path),
             "--log-format", "json"],
            stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ),
        )  # fmt: skip
    try:

        def get(**params: Any) -> str:
            try:
                return httpx.get(base, params={"api_key": KEY, **params}).text
            except httpx.TransportError:
                return ""

        assert _wait_for(lambda: get(action="getBalance")) == "ACCESS_BALANCE:1000.00"
        bought = get(action="getNumber", service="tg", country=10)
        assert bought.startswith("ACCESS_NUMBER:")
        ident = bought.split(":")[1]

        raw["keys"][0]["budget"] = 50
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        server.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: get(action="getBalance") == "ACCESS_BALANCE:32.00")
        assert get(action="getStatus", id=ident) == "STATUS_WAIT_CODE"

        path.write_text("keys: [\n", encoding="utf-8")
        server.send_signal(signal.SIGHUP)
        _wait_for(lambda: "reload: config error" in log_path.read_text())
        assert get(action="getBalance") == "ACCESS_BALANCE:32.00"
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=15)
    lines = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    errors = [line["message"] for line in lines if line["level"] == "ERROR"]
    assert errors == [
        "reload: config error, keeping the running config: "
        f"{path}: line 2: expected the node content, but found '<stream end>'"
    ]
    assert "Traceback" not in log_path.read_text()


def test_check_config_shows_limits_and_masks_the_admin_token(
    store_path: str,
) -> None:
    from compat_server.config import describe

    raw = sandbox_raw(
        store_path,
        admin={"token": "admin-token-0123456789abcdef"},
        keys=[
            {"key": KEY, "alias": "tester", "providers": ["sandbox"], "budget": "12.5",
             "max_active": 3, "show_upstream_balance": False},
        ],
    )  # fmt: skip
    text = describe(parse_config(raw))
    assert "admin: /admin/ token=****" in text.splitlines()
    assert (
        "key tester: **** -> sandbox budget=12.5 max_active=3 show_upstream_balance=false"
        in text.splitlines()
    )
    assert "admin-token-0123" not in text
