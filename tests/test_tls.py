"""The hosts trick over https: ``tls init``, ``serve`` with TLS, ``trust-python``.

Published clients that hard-code ``https://`` run unchanged in a subprocess
(``tests/tls_client.py``): their sms-activate / clone names resolve to 127.0.0.1 and
port 443 to the server's TLS port, as a hosts file plus ``--hosts-trick`` would do;
certificates are verified by each library's default, with the CA trusted through the
environment (REQUESTS_CA_BUNDLE, SSL_CERT_FILE) or the interpreter's certifi bundle.
The server runs in this process on the sandbox with the FakeClock, so the test moves
time when the client waits for its SMS and reads the store afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import certifi
import pytest
from aiohttp import web
from cryptography import x509

from compat_server import serving, tls
from compat_server.app import ENGINE, create_app
from compat_server.cli import plan_listeners
from compat_server.config import Config, parse_config
from compat_server.serving import Listener
from tests.conftest import KEY, T0, FakeClock, sandbox_raw

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).with_name("tls_client.py")
API = "/stubs/handler_api.php"
CLI = [sys.executable, "-m", "compat_server"]
# what a user's shell may carry that would change how a client finds its CAs or host
ENV_DROP = (
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
)  # fmt: skip


def hosts_example_names() -> list[str]:
    """The names of hosts.example, in order (the lines a user appends)."""
    names = []
    for line in (ROOT / "hosts.example").read_text(encoding="utf-8").splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            assert fields[0] == "127.0.0.1", line
            names.extend(fields[1:])
    return names


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(extra)
    return env


# ---- tls init -----------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, check=False,
        env=env or clean_env(), cwd=ROOT,
    )  # fmt: skip


def san(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]


def test_hosts_example_is_the_list_of_names() -> None:
    assert hosts_example_names() == list(tls.HOSTS_TRICK_NAMES)


def test_init_makes_ca_and_server_certificate(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "tls"  # missing parents are made
    done = run_cli("tls", "init", "--dir", str(folder), "--host", "Farm.Local",
                   "--host", "10.0.0.7")  # fmt: skip
    until = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=825)).date()
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        f"sms-compat: CA created: {folder}/ca.pem (install this file;"
        f" {folder}/ca-key.pem stays private)",
        f"sms-compat: server certificate {folder}/server.pem for 21 names, valid"
        f" until {until:%Y-%m-%d}",
        f"sms-compat: for Python tools: {folder}/bundle.pem (certifi's roots + this CA)",
    ]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {
        "ca.pem": 0o644, "ca-key.pem": 0o600, "server.pem": 0o644,
        "server-key.pem": 0o600, "bundle.pem": 0o644,
    }  # fmt: skip
    assert san(folder / "server.pem") == [
        *hosts_example_names(), "localhost", "127.0.0.1", "::1", "farm.local", "10.0.0.7"
    ]
    # the chain verifies with nothing but ca.pem, for every name (one cert, all SANs)
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((folder / "server.pem").read_bytes())
    assert [c.subject for c in chain] == [chain[0].subject, ca.subject]
    chain[0].verify_directly_issued_by(ca)
    bundle = (folder / "bundle.pem").read_bytes()
    assert bundle.startswith(Path(certifi.where()).read_bytes().rstrip(b"\n"))
    assert bundle.endswith((folder / "ca.pem").read_bytes() + b"# end of sms-compat local CA\n")


def test_init_again_keeps_the_ca_and_reissues(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    assert run_cli("tls", "init", "--dir", str(folder), "--host", "old.name").returncode == 0
    ca_before = (folder / "ca.pem").read_bytes(), (folder / "ca-key.pem").read_bytes()
    server_before = (folder / "server.pem").read_bytes()
    key_before = (folder / "server-key.pem").read_bytes()
    done = run_cli("tls", "init", "--dir", str(folder))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[0] == (
        f"sms-compat: CA kept: {folder}/ca.pem (install this file;"
        f" {folder}/ca-key.pem stays private)"
    )
    assert ((folder / "ca.pem").read_bytes(), (folder / "ca-key.pem").read_bytes()) == ca_before
    assert (folder / "server.pem").read_bytes() != server_before
    assert (folder / "server-key.pem").read_bytes() != key_before
    assert "old.name" not in san(folder / "server.pem")  # the names given this time
    tls.server_context(folder)  # the re-issued pair loads


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--host", "bad name"], "--host 'bad name': not a host name or IP address"),
        (None, ["--host", "https://x.org"], "--host 'https://x.org': not a host name or IP address"),
        ("file", [], "{dir} is not a directory"),
        ("lost-key", [], "{dir}/ca.pem exists but {dir}/ca-key.pem does not: restore it, or"
         " remove {dir}/ca.pem to make a new CA (clients must then trust the new ca.pem)"),
        ("foreign-key", [], "{dir}/ca-key.pem is not the key of {dir}/ca.pem"),
    ],
)  # fmt: skip
def test_init_bad_input_is_one_line(
    tmp_path: Path, setup: str | None, args: list[str], message: str
) -> None:
    folder = tmp_path / "tls"
    if setup == "file":
        folder.write_text("not a directory")
    elif setup == "lost-key":
        tls.init(folder)
        (folder / "ca-key.pem").unlink()
    elif setup == "foreign-key":
        tls.init(folder)
        tls.init(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "ca-key.pem", folder / "ca-key.pem")
    done = run_cli("tls", "init", "--dir", str(folder), *args)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"sms-compat: tls: {message.format(dir=folder)}\n"


# ---- serve: listeners, SNI, one app ------------------------------------------------


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tls"
    tls.init(folder)
    return folder


@dataclass
class Stack:
    """The app behind an http and an https listener on loopback ephemeral ports."""

    runner: web.AppRunner
    http_port: int
    tls_port: int

    @property
    def app(self) -> web.Application:
        return self.runner.app


@pytest.fixture
async def stack(config: Config, clock: FakeClock, tls_dir: Path) -> AsyncIterator[Stack]:
    app = create_app(config, clock=clock, background=False)
    runner = await serving.start(
        app,
        [Listener("127.0.0.1", 0), Listener("127.0.0.1", 0, tls.server_context(tls_dir))],
        access_log=None,
    )
    urls = serving.bound_urls(runner)
    ports = [int(u.rsplit(":", 1)[1].rstrip("/")) for u in urls]
    assert [u.split(":")[0] for u in urls] == ["http", "https"]
    yield Stack(runner, ports[0], ports[1])
    await runner.cleanup()


async def raw_get(
    port: int, name: str, context: ssl.SSLContext | None, query: str = "action=getBalance"
) -> tuple[str, str]:
    """(status line, body) of a dialect GET sent with ``Host: name``."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=name if context else None
    )
    writer.write(
        f"GET {API}?api_key={KEY}&{query} HTTP/1.1\r\nHost: {name}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    head, body = data.decode().split("\r\n\r\n", 1)
    return head.splitlines()[0], body


async def test_every_name_over_https_and_http_on_one_app(stack: Stack, tls_dir: Path) -> None:
    trusting = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    for name in hosts_example_names():
        assert await raw_get(stack.tls_port, name, trusting) == (
            "HTTP/1.1 200 OK", "ACCESS_BALANCE:1000.00"
        ), name
        assert await raw_get(stack.http_port, name, None) == (
            "HTTP/1.1 200 OK", "ACCESS_BALANCE:1000.00"
        ), name
    # one app behind both: a number bought over http is the one https reports on
    head, body = await raw_get(
        stack.http_port, "sms-activate.ru", None, "action=getNumber&service=tg&country=10"
    )
    activation = await stack.app[ENGINE].store.get(100_000)
    assert activation is not None
    assert (head, body) == ("HTTP/1.1 200 OK", f"ACCESS_NUMBER:100000:{activation.phone}")
    assert await raw_get(
        stack.tls_port, "api.sms-activate.ae", trusting, "action=getStatus&id=100000"
    ) == ("HTTP/1.1 200 OK", "STATUS_WAIT_CODE")
    assert await raw_get(stack.tls_port, "hero-sms.com", trusting) == (
        "HTTP/1.1 200 OK", "ACCESS_BALANCE:982.00"
    )


async def test_tls_refuses_what_it_must(stack: Stack, tls_dir: Path) -> None:
    trusting = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await raw_get(stack.tls_port, "example.com", trusting)
    default = ssl.create_default_context(cafile=certifi.where())  # CA not trusted
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in certificate chain"):
        await raw_get(stack.tls_port, "api.sms-activate.org", default)


def test_hosts_trick_binds_80_and_443(tmp_path: Path, tls_dir: Path) -> None:
    config = parse_config(sandbox_raw(str(tmp_path / "s.sqlite3")))
    listeners = plan_listeners(config, "0.0.0.0", None, str(tls_dir), True)
    assert [(item.host, item.port, item.scheme) for item in listeners] == [
        ("0.0.0.0", 80, "http"), ("0.0.0.0", 443, "https"),
    ]  # fmt: skip
    with_tls = parse_config(
        sandbox_raw(
            str(tmp_path / "s.sqlite3"),
            server={"host": "127.0.0.1", "port": 8080, "tls": {"port": 8443, "dir": str(tls_dir)}},
        )
    )
    assert [(i.port, i.scheme) for i in plan_listeners(with_tls, None, None, None, False)] == [
        (8080, "http"), (8443, "https")
    ]  # fmt: skip
    assert [(i.port, i.scheme) for i in plan_listeners(with_tls, None, None, None, True)] == [
        (80, "http"), (443, "https")
    ]  # fmt: skip
    assert [(i.port, i.scheme) for i in plan_listeners(config, None, None, None, False)] == [
        (0, "http")
    ]


# ---- published clients through the hosts trick --------------------------------------


@dataclass
class ClientRun:
    steps: list[list[Any]]
    returncode: int
    stderr: str


async def drive(
    stack: Stack, clock: FakeClock, client: str, env: dict[str, str]
) -> ClientRun:
    """Run tests/tls_client.py CLIENT; move the clock when it waits for the SMS."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(DRIVER), client, KEY,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**env, "TLS_TEST_NAMES": ",".join(tls.HOSTS_TRICK_NAMES),
             "TLS_TEST_PORTS": f"443:{stack.tls_port},80:{stack.http_port}"},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    steps = []
    while line := await asyncio.wait_for(proc.stdout.readline(), 60):
        step = json.loads(line)
        steps.append(step)
        if step == ["wait", "sms"]:
            clock.advance(6)  # the sandbox's sms_delay is 5
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
    stderr = (await proc.stderr.read()).decode()
    return ClientRun(steps, await proc.wait(), stderr)


def trusted(tls_dir: Path) -> dict[str, str]:
    """The README's advice: both variables at the bundle (certifi's roots + the CA)."""
    bundle = str(tls_dir / "bundle.pem")
    return clean_env(REQUESTS_CA_BUNDLE=bundle, SSL_CERT_FILE=bundle)


def expected_steps(client: str, phone: str, code: str) -> list[list[Any]]:
    """What each library returns for getBalance, buy, getStatus x2, finish, getBalance
    (JSON-shaped by tests/tls_client.py: models dumped, enums by name)."""
    wait, ok = "STATUS_WAIT_CODE", f"STATUS_OK:{code}"
    bought_at, ends_at = stamp(T0), stamp(T0 + 1200)
    v2 = {
        "activationId": 100_000, "phoneNumber": phone, "activationCost": 18.0,
        "currency": 643, "countryCode": "10", "canGetAnotherSms": "1",
        "activationTime": bought_at, "activationEndTime": ends_at,
        "activationEnd": ends_at, "activationOperator": "any",
    }  # fmt: skip
    flows: dict[str, tuple[Any, list[list[Any]], Any]] = {
        "smsactivate": (
            {"balance": "1000.00"},
            [["getNumber", {"activation_id": 100_000, "phone": int(phone)}],
             ["getStatus", wait], ["wait", "sms"], ["getStatus", ok],
             ["setStatus", "ACCESS_ACTIVATION"]],
            {"balance": "982.00"},
        ),
        "aiosmsactivate": (
            1000.0,
            [["getNumberV2", {
                "activation_id": 100_000, "phone_number": phone, "activation_cost": 18.0,
                "country_code": "10", "can_get_another_sms": True,
                "activation_time": bought_at, "operator": "any", "service": "tg",
                "activation_unix_time": int(T0), "time_life": 1200,
                "end_activation_time": int(T0) + 1200}],
             ["getStatus", ["WAIT", None]], ["wait", "sms"], ["getStatus", ["OK", code]],
             ["setStatus", "ACTIVATED"]],
            982.0,
        ),
        "async-sms-activate": (
            1000.0,
            [["getNumberV2", v2], ["getStatus", wait], ["wait", "sms"],
             ["getStatus", ok], ["setStatus", "ACCESS_ACTIVATION"]],
            982.0,
        ),
        "herosms": (
            {"amount": 1000.0, "currency": None},
            [["getNumberV2", {
                "activation_id": 100_000, "phone_number": phone, "activation_cost": 18.0,
                "currency": 643, "country_code": 10, "country_phone_code": None,
                "can_get_another_sms": True, "activation_time": bought_at,
                "activation_end_time": ends_at, "activation_operator": "any"}],
             ["getStatus", wait], ["wait", "sms"], ["getStatus", ok],
             ["setStatus", None]],  # complete() returns nothing
            {"amount": 982.0, "currency": None},
        ),
        "grizzly-sms-client": (
            1000.0,
            [["getNumber", {"activation_id": "100000", "phone_number": phone}],
             ["getStatus", {"status": wait, "code": None}], ["wait", "sms"],
             ["getStatus", {"status": "STATUS_OK", "code": code}],
             ["setStatus", "ACCESS_ACTIVATION"]],
            982.0,
        ),
        "smsbower": (
            1000.0,
            [["getNumber", {"id": "100000", "number": phone}],
             ["getStatus", {"status": wait, "code": None}], ["wait", "sms"],
             ["getStatus", {"status": "STATUS_OK", "code": code}],
             ["setStatus", "ACCESS_ACTIVATION"]],
            982.0,
        ),
        "smsactivateru": (
            1000.0,
            [["getNumber", ["100000", phone]],
             ["getStatus", {"status": wait, "code": None}], ["wait", "sms"],
             ["getStatus", {"status": "STATUS_OK", "code": code}],
             ["setStatus", {"status": "ACCESS_ACTIVATION"}]],
            982.0,
        ),
    }  # fmt: skip
    flows["smsactivatepy"] = flows["smsactivate"]
    before, middle, after = flows[client]
    return [["getBalance", before], *middle, ["getBalance", after]]


def stamp(seconds: float) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in local time, as the dialect sends activation times."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


HTTPS_CLIENTS = [
    "smsactivate", "smsactivatepy", "aiosmsactivate", "async-sms-activate", "herosms",
    "grizzly-sms-client", "smsbower",
]  # fmt: skip


@pytest.mark.parametrize("client", HTTPS_CLIENTS)
async def test_client_over_https_unchanged(
    client: str, stack: Stack, clock: FakeClock, tls_dir: Path
) -> None:
    run = await drive(stack, clock, client, trusted(tls_dir))
    engine = stack.app[ENGINE]
    activation = await engine.store.get(100_000)
    assert activation is not None
    assert (activation.state, len(activation.messages)) == ("finished", 1)
    assert run.steps == expected_steps(client, activation.phone, activation.code)
    assert (run.returncode, "Traceback" in run.stderr) == (0, False)
    assert await engine.providers["sandbox"].balance() == Decimal("982")


async def test_http_client_through_the_same_hosts_trick(
    stack: Stack, clock: FakeClock, tls_dir: Path
) -> None:
    """smsactivateru calls http://sms-activate.ru: the plain-http side, same names."""
    run = await drive(stack, clock, "smsactivateru", trusted(tls_dir))
    activation = await stack.app[ENGINE].store.get(100_000)
    assert activation is not None
    assert (activation.state, len(activation.messages)) == ("finished", 1)
    assert run.steps == expected_steps("smsactivateru", activation.phone, activation.code)
    assert (run.returncode, "Traceback" in run.stderr) == (0, False)


@pytest.mark.parametrize(
    ("client", "verify_error"),
    [
        ("smsactivate", "SSLError: HTTPSConnectionPool(host='api.sms-activate.org', port=443)"),
        ("async-sms-activate", "ClientConnectorCertificateError: Cannot connect to host"
         " api.sms-activate.org:443 ssl:True"),
    ],
)  # fmt: skip
async def test_without_trust_the_client_refuses(
    client: str, verify_error: str, stack: Stack, clock: FakeClock
) -> None:
    """The control: verification is really on; no CA in the environment, no number."""
    run = await drive(stack, clock, client, clean_env())
    assert len(run.steps) == 1 and run.steps[0][0] == "error", run.steps
    assert run.steps[0][1].startswith(verify_error)
    assert "CERTIFICATE_VERIFY_FAILED" in run.steps[0][1]
    assert run.returncode == 3
    assert await stack.app[ENGINE].store.count() == 0
