"""The command line: check-config, masked output, one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compat_server.cli import main

GOOD = """
server: {host: 127.0.0.1, port: 8080}
store: {path: x.sqlite3}
currency: {display: RUB, rates: {VND: 0.0036}}
keys:
  - key: ${CLIENT_KEY}
    alias: bot
    providers: [tcs, sandbox]
providers:
  sandbox: {type: sandbox}
  tcs: {type: thuecodesim, token: "${TCS_TOKEN}", markup: 1.2}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_check_config_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("CLIENT_KEY", "client-secret-key-123")
    monkeypatch.setenv("TCS_TOKEN", "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.secret")
    path = write(tmp_path, GOOD)
    assert main(["check-config", "--config", path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"config: {path}",
        "server: 127.0.0.1:8080",
        "store: x.sqlite3",
        "activation: lifetime=1200s early_cancel=0s",
        "currency: RUB rates=VND=0.0036",
        "key bot: **** -> tcs, sandbox",
        "provider sandbox: markup=1 type=sandbox",
        "provider tcs: markup=1.2 token=**** type=thuecodesim",
    ]
    assert "client-secret" not in out and "JhbGci" not in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys: [\n", "config error: {path}: line 2: expected the node content, but found '<stream end>'"),
        ("providers: {a: {type: nope}}\nkeys: [{key: k, providers: [a]}]\n",
         "config error: providers.a.type: unknown provider type 'nope' (valid: handler_api,"
         " sandbox, smsman, smspva, smspva_rent, thuecodesim)"),
        ("providers: {a: {type: sandbox}}\nkeys: [{key: k, providers: [b]}]\n",
         "config error: keys[0].providers: unknown provider 'b' (known: a)"),
        ("providers: {a: {type: thuecodesim}}\nkeys: [{key: k, providers: [a]}]\n",
         "config error: providers.a.token: missing (set it, e.g. ${ENV_VAR})"),
        ("providers: {a: {type: thuecodesim, token: '${UNSET_FOR_TEST}'}}\nkeys: [{key: k, providers: [a]}]\n",
         "config error: providers.a.token: environment variable UNSET_FOR_TEST is not set"),
        ("providers: {a: {type: sandbox}}\nkeys: []\n", "config error: keys: define at least one client key"),
        ("providers: {a: {type: smsman, token: t}}\nkeys: [{key: k, providers: [a]}]\n",
         "config error: currency.rates.RUB: missing (provider a is priced in RUB, clients see USD)"),
        ("bogus: 1\n", "config error: bogus: unknown section (known: activation, admin, breaker, currency,"
         " keys, providers, routes, server, store, upstream, workers)"),
    ],
)  # fmt: skip
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           text: str, message: str) -> None:  # fmt: skip
    if "clients see USD" in message:
        text = "currency: {display: USD}\n" + text
    path = write(tmp_path, text)
    for command in (["check-config", "--config", path], ["serve", "--config", path]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == "sms-compat: " + message.replace("{path}", path) + "\n"


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.yaml")
    assert main(["check-config", "--config", path]) == 2
    assert (
        capsys.readouterr().err
        == f"sms-compat: config error: {path}: cannot read (No such file or directory)\n"
    )


def test_ping_sandbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "providers: {sb: {type: sandbox, balance: 50}}\nkeys: [{key: k, providers: [sb]}]\n",
    )
    assert main(["check-config", "--config", path, "--ping"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[-1]
        == "sb: reachable, token accepted, balance 50.0 RUB = 50.00 RUB, circuit closed"
    )


def test_shipped_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "compat_server", "check-config", "--config", str(root / "config.yaml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert "key demo: **** -> sandbox" in result.stdout
