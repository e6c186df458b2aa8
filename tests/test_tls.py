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
import logging
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
from compat_server.connections import ConnectionGate
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
    gate: ConnectionGate

    @property
    def app(self) -> web.Application:
        return self.runner.app


@pytest.fixture
async def stack(config: Config, clock: FakeClock, tls_dir: Path) -> AsyncIterator[Stack]:
    app = create_app(config, clock=clock, background=False)
    gate = ConnectionGate(64, 8)  # as `serve` runs it: every listener behind the caps
    started = await serving.start(
        app,
        [Listener("127.0.0.1", 0), Listener("127.0.0.1", 0, tls.server_context(tls_dir))],
        gate=gate,
        access_log=None,
    )
    ports = [int(url.rsplit(":", 1)[1]) for url in started.urls]
    assert started.urls == [f"http://127.0.0.1:{ports[0]}", f"https://127.0.0.1:{ports[1]}"]
    yield Stack(started.runner, ports[0], ports[1], gate)
    await started.stop()


async def test_handshakes_never_finished_count_against_the_caps(
    stack: Stack, tls_dir: Path
) -> None:
    """Before: a TLS connection was counted only once its handshake was done, so one
    address held hundreds of silent sockets past max_connections_per_client and ran
    the server out of descriptors. Now the caps count it from its accept."""
    silent = [
        await asyncio.open_connection("127.0.0.1", stack.tls_port) for _ in range(12)
    ]  # plain TCP, no ClientHello
    await asyncio.sleep(0.2)
    assert (stack.gate.total, stack.gate.per_client) == (8, {"127.0.0.1": 8})
    refused = 0
    for reader, _ in silent:  # past the cap: closed at once, before any byte
        try:
            if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                refused += 1
        except TimeoutError:
            pass
    assert refused == 4
    for _, writer in silent:
        writer.close()
    await asyncio.sleep(0.2)
    assert stack.gate.total == 0  # released, handshake or not
    # a real client gets through once the silent ones are gone
    trusting = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    assert await raw_get(stack.tls_port, "api.sms-activate.org", trusting) == (
        "HTTP/1.1 200 OK",
        "ACCESS_BALANCE:1000.00",
    )


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
    trusting.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
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


# ---- serve, the real CLI in a subprocess --------------------------------------------


def serve_config(tmp_path: Path, tls_dir: Path, tls_port: int = 0) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"server: {{host: 127.0.0.1, port: 0, tls: {{port: {tls_port}, dir: {tls_dir}}}}}\n"
        f"store: {{path: {tmp_path / 'store.sqlite3'}}}\n"
        f"keys: [{{key: {KEY}, alias: tls-check, providers: [sb]}}]\n"
        "providers: {sb: {type: sandbox}}\n",
        encoding="utf-8",
    )
    return str(path)


def serve_fails(config: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("serve", "--config", config, "--log-level", "WARNING", *extra)


def expired_dir(folder: Path) -> str:
    """A directory whose server certificate ran out; the expected message."""
    tls.init(folder, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=900))
    cert = x509.load_pem_x509_certificates((folder / "server.pem").read_bytes())[0]
    return (
        f"{folder}/server.pem expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC:"
        f" re-issue it with `sms-compat tls init --dir {folder}`"
    )


@pytest.mark.parametrize(
    "case",
    ["missing-dir", "not-a-dir", "missing-file", "unreadable-key", "expired",
     "foreign-cert", "foreign-key", "garbage-cert"],
)  # fmt: skip
def test_serve_refuses_bad_tls_dir_in_one_line(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "tls"
    other = tmp_path / "other"
    if case not in ("missing-dir", "not-a-dir", "expired"):
        tls.init(folder)
    message = {
        "missing-dir": f"{folder} does not exist: create it with"
        f" `sms-compat tls init --dir {folder}`",
        "not-a-dir": f"{folder} is not a directory",
        "missing-file": f"{folder}/server-key.pem is missing: run"
        f" `sms-compat tls init --dir {folder}`",
        "unreadable-key": f"cannot read {folder}/server-key.pem (Is a directory)",
        "foreign-cert": f"{folder}/server.pem was not issued by {folder}/ca.pem:"
        f" re-issue it with `sms-compat tls init --dir {folder}`",
        "foreign-key": f"{folder}/server-key.pem is not the key of {folder}/server.pem",
        "garbage-cert": f"{folder}/server.pem is not a PEM certificate",
    }.get(case, "")
    if case == "not-a-dir":
        folder.write_text("")
    elif case == "missing-file":
        (folder / "server-key.pem").unlink()
    elif case == "unreadable-key":
        (folder / "server-key.pem").unlink()
        (folder / "server-key.pem").mkdir()
    elif case == "expired":
        message = expired_dir(folder)
    elif case in ("foreign-cert", "foreign-key"):
        tls.init(other)
        names = ["server-key.pem"] if case == "foreign-key" else ["server.pem", "server-key.pem"]
        for name in names:
            shutil.copy(other / name, folder / name)
    elif case == "garbage-cert":
        (folder / "server.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    done = serve_fails(serve_config(tmp_path, folder))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"sms-compat: tls: {message}\n"


def test_serve_refuses_unreadable_tls_dir_in_one_line(tmp_path: Path) -> None:
    """A directory the server's user may not read. Root reads everything, so as root
    the server runs without the capabilities that bypass file modes (setpriv)."""
    folder = tmp_path / "tls"
    tls.init(folder)
    command = [*CLI, "serve", "--config", serve_config(tmp_path, folder),
               "--log-level", "WARNING"]  # fmt: skip
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without util-linux's setpriv")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    folder.chmod(0)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False,
            env=clean_env(), cwd=ROOT,
        )  # fmt: skip
    finally:
        folder.chmod(0o755)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"sms-compat: tls: cannot read {folder}/ca.pem (Permission denied)\n"


def test_serve_warns_a_month_before_expiry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "tls"
    now = dt.datetime.now(dt.timezone.utc)
    tls.init(folder, now=now - dt.timedelta(days=800))  # 25 days left
    cert = x509.load_pem_x509_certificates((folder / "server.pem").read_bytes())[0]
    caplog.set_level(logging.WARNING, logger="compat_server.tls")
    tls.server_context(folder, now=now)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [(
        "WARNING",
        f"{folder}/server.pem expires on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC:"
        f" re-issue it with `sms-compat tls init --dir {folder}`",
    )]  # fmt: skip
    caplog.clear()
    tls.server_context(folder, now=now - dt.timedelta(days=10))
    assert caplog.records == []


def test_serve_tls_port_in_use_is_one_line(tmp_path: Path, tls_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_fails(serve_config(tmp_path, tls_dir, port))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"sms-compat: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def test_hosts_trick_without_certificate_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"store: {{path: {tmp_path / 's.sqlite3'}}}\n"
        "keys: [{key: k, providers: [sb]}]\nproviders: {sb: {type: sandbox}}\n"
    )
    done = serve_fails(str(path), "--hosts-trick")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "sms-compat: tls: --hosts-trick needs a certificate: run `sms-compat tls init"
        " --dir DIR`, then pass --tls-dir DIR (or set server.tls.dir)\n"
    )


@pytest.mark.parametrize(
    ("tls_section", "message"),
    [
        ("{port: 443}", "server.tls.dir: missing (the directory of `sms-compat tls init`)"),
        ("{dir: x, cert: y}", "server.tls.cert: unknown (known: dir, port)"),
        ("{dir: x, port: https}", "server.tls.port: must be a whole number"),
        ("x", "server.tls: must be a mapping (port, dir)"),
    ],
)  # fmt: skip
def test_bad_tls_config(tmp_path: Path, tls_section: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"server: {{tls: {tls_section}}}\n"
        "keys: [{key: k, providers: [sb]}]\nproviders: {sb: {type: sandbox}}\n"
    )
    done = run_cli("check-config", "--config", str(path))
    assert (done.returncode, done.stderr) == (2, f"sms-compat: config error: {message}\n")


def test_check_config_shows_tls(tmp_path: Path, tls_dir: Path) -> None:
    done = run_cli("check-config", "--config", serve_config(tmp_path, tls_dir, 8443))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[1] == f"server: 127.0.0.1:0 https:8443 tls={tls_dir}"


def test_real_serve_answers_https_and_http_then_stops(tmp_path: Path, tls_dir: Path) -> None:
    """The production entry point: both listeners on one app, a clean stop on SIGTERM."""
    import signal
    import threading
    import urllib.request

    proc = subprocess.Popen(
        [*CLI, "serve", "--config", serve_config(tmp_path, tls_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    watchdog = threading.Timer(60, proc.kill)  # a hung server fails the test, not CI
    watchdog.start()
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        http_url, https_url = (line.removeprefix("sms-compat: serving ") for line in lines)
        assert http_url.startswith("http://127.0.0.1:") and http_url.endswith(API)
        assert https_url.startswith("https://127.0.0.1:") and https_url.endswith(API)
        trusting = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
        query = f"?api_key={KEY}&action="
        with urllib.request.urlopen(https_url + query + "getNumber&service=tg&country=10",
                                    context=trusting, timeout=10) as resp:  # fmt: skip
            assert (resp.status, resp.headers["Content-Type"]) == (
                200, "text/plain; charset=utf-8"
            )
            ident = resp.read().decode().split(":")[1]
        with urllib.request.urlopen(http_url + query + f"getStatus&id={ident}",
                                    timeout=10) as resp:  # fmt: skip
            assert resp.read() == b"STATUS_WAIT_CODE"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        watchdog.cancel()
    assert proc.returncode == 0
    assert "Traceback" not in stderr
    assert "action=getNumber key=tls-check provider=sb outcome=ACCESS_NUMBER" in stderr


# ---- trust-python -------------------------------------------------------------------


@pytest.fixture
def own_certifi(tmp_path: Path) -> Path:
    """A copy of certifi first on PYTHONPATH: an interpreter whose bundle we may edit."""
    site = tmp_path / "site"
    shutil.copytree(Path(certifi.__file__).parent, site / "certifi")
    return site


async def test_trust_python_adds_once_and_undoes(
    own_certifi: Path, tls_dir: Path, stack: Stack, clock: FakeClock
) -> None:
    env = clean_env(PYTHONPATH=str(own_certifi))
    bundle = own_certifi / "certifi" / "cacert.pem"
    original = bundle.read_bytes()
    python = sys.executable

    def cli(*args: str) -> tuple[int, str, str]:
        done = run_cli("tls", "trust-python", python, *args, env=env)
        return done.returncode, done.stdout, done.stderr

    assert cli("--dir", str(tls_dir)) == (0, f"sms-compat: {bundle} now trusts {tls_dir}/ca.pem"
                                          f" (undo: sms-compat tls trust-python {python} --undo)\n", "")  # fmt: skip
    assert cli("--dir", str(tls_dir)) == (0, f"sms-compat: {bundle} already trusts {tls_dir}/ca.pem\n", "")  # fmt: skip
    assert bundle.read_bytes() == original + (
        b"# sms-compat local CA sha256="
        + x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
        .fingerprint(tls.hashes.SHA256()).hex().encode()
        + b"\n" + (tls_dir / "ca.pem").read_bytes() + b"# end of sms-compat local CA\n"
    )  # fmt: skip

    # requests reads certifi: the official client now works with nothing in the env
    run = await drive(stack, clock, "smsactivate", env)
    activation = await stack.app[ENGINE].store.get(100_000)
    assert activation is not None
    assert run.steps == expected_steps("smsactivate", activation.phone, activation.code)
    # aiohttp does not read certifi: the system store or SSL_CERT_FILE, not this
    refused = await drive(stack, clock, "async-sms-activate", env)
    assert refused.steps[0][0] == "error" and "CERTIFICATE_VERIFY_FAILED" in refused.steps[0][1]

    assert cli("--undo") == (0, f"sms-compat: removed the sms-compat CA from {bundle}\n", "")
    assert bundle.read_bytes() == original
    assert cli("--undo") == (
        0, f"sms-compat: {bundle} holds no CA added by sms-compat: nothing to undo\n", ""
    )  # fmt: skip
    again = await drive(stack, clock, "smsactivate", env)
    assert again.steps[0][0] == "error" and "CERTIFICATE_VERIFY_FAILED" in again.steps[0][1]


@pytest.mark.parametrize(
    ("certifi_source", "message"),
    [
        ("raise ImportError('no certifi here')", "{python} cannot import certifi"
         " (ImportError: no certifi here)"),
        ("def where():\n    return '/etc/ssl/certs/ca-certificates.crt'\n",
         "{python} reads /etc/ssl/certs/ca-certificates.crt, not a certifi package's own"
         " file (likely the system store): trust ca.pem system-wide instead (see the README)"),
        (None, "cannot run /nonexistent/python3 (No such file or directory)"),
        ("no-dir", "--dir DIR is required (the directory of `tls init`)"),
    ],
)  # fmt: skip
def test_trust_python_bad_input(
    tmp_path: Path, tls_dir: Path, certifi_source: str | None, message: str
) -> None:
    python = sys.executable if certifi_source is not None else "/nonexistent/python3"
    (tmp_path / "site" / "certifi").mkdir(parents=True)
    if certifi_source != "no-dir":
        (tmp_path / "site" / "certifi" / "__init__.py").write_text(certifi_source or "")
    where = [] if certifi_source == "no-dir" else ["--dir", str(tls_dir)]
    done = run_cli(
        "tls", "trust-python", python, *where,
        env=clean_env(PYTHONPATH=str(tmp_path / "site")),
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"sms-compat: tls: {message.format(python=python)}\n"


@pytest.mark.parametrize(
    ("client", "variable", "trusts"),
    [
        ("smsactivate", "REQUESTS_CA_BUNDLE", True),  # requests
        ("smsactivate", "SSL_CERT_FILE", False),
        ("grizzly-sms-client", "SSL_CERT_FILE", True),  # httpx
        ("grizzly-sms-client", "REQUESTS_CA_BUNDLE", False),
        ("async-sms-activate", "SSL_CERT_FILE", True),  # aiohttp
        ("async-sms-activate", "REQUESTS_CA_BUNDLE", False),
    ],
)
async def test_which_library_reads_which_variable(
    client: str, variable: str, trusts: bool, stack: Stack, clock: FakeClock,
    tls_dir: Path,
) -> None:  # fmt: skip
    """The README's table: one variable at a time, with only our CA in it."""
    run = await drive(stack, clock, client, clean_env(**{variable: str(tls_dir / "ca.pem")}))
    if trusts:
        activation = await stack.app[ENGINE].store.get(100_000)
        assert activation is not None
        assert run.steps == expected_steps(client, activation.phone, activation.code)
    else:
        assert len(run.steps) == 1 and run.steps[0][0] == "error", run.steps
        assert "CERTIFICATE_VERIFY_FAILED" in run.steps[0][1], run.steps
        assert await stack.app[ENGINE].store.count() == 0
