"""No secret leaves the process: not in a log line, a response, a header, or check-config.

A full run through each provider (thuecodesim, sms-man, smspva in both APIs, and the
sandbox) with a distinctive client key and upstream tokens: buy, poll, SMS, retry,
finish, cancel, a bad key, then upstream faults (HTML 500, a hang past the read timeout,
our own token refused). Logging is set up the way ``sms-compat serve --log-level DEBUG``
sets it up (the root logger at DEBUG, the production format) and every record of every
logger is captured; the app runs, like ``serve``, without an access log. Nothing
captured may contain a secret, 8 characters of one, or a ``token=``/``apikey=`` query.

The fakes' own request logs are switched off: the fakes *are* the upstreams, and their
logs would hold the tokens by construction.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from compat_server import cli, logs, serving
from compat_server.app import ENGINE, create_app
from compat_server.config import parse_config
from fakes import handler_api, smsman, smspva, thuecodesim
from fakes.common import FakeUpstream
from providers.vocabulary import UpstreamUncertain
from tests.conftest import API, FakeClock

# Random-looking on purpose: no 8-character run of them occurs in any legitimate output.
CLIENT_KEY = "Kq7vZp2LrX9wB4tN6hMc3JdF8sGy5Ua1"
TCS_TOKEN = "tX4mQ9vB2nR7kL5pZ8wC3jH6.Fy1Gd0Ns"
SMSMAN_TOKEN = "sR8hW3zK6qM1vN9bT4xP7cL2"
SMSPVA_KEY = "pJ5nY2wQ8rE4tZ7uK1mB6vX3"
CLONE_KEY = "cV6bN1mZ8xQ3wE7rT2yU9iO4pA5sD0fG"
URL_USER = "opsW7qTn3Rk"
URL_PASSWORD = "Hv2Lx8Dq5Ws1Jb6Y"
SECRETS = {
    "client key": CLIENT_KEY,
    "thuecodesim token": TCS_TOKEN,
    "smsman token": SMSMAN_TOKEN,
    "smspva api_key": SMSPVA_KEY,
    "clone api_key": CLONE_KEY,
    "URL user": URL_USER,
    "URL password": URL_PASSWORD,
}
ALIAS = "secret-test"
URL_SECRET = re.compile(r"[?&;](?:token|apikey|api_key)=", re.IGNORECASE)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # cli.serve_forever's

TEXT = "text/plain"
JSON = "application/json"


def leaks(text: str) -> list[str]:
    """Every secret (or 8-character piece of one) and token-bearing query in ``text``."""
    found = []
    for name, secret in SECRETS.items():
        for start in range(len(secret) - 7):
            if secret[start : start + 8] in text:
                found.append(f"{name}: {secret[start : start + 8]!r}")
                break
    found += [f"query parameter {m.group(0)!r}" for m in URL_SECRET.finditer(text)]
    return found


def test_leaks_sees_pieces_and_queries() -> None:
    assert leaks(f"GET /x?apikey=...{SMSPVA_KEY[3:12]}") == [
        f"smspva api_key: {SMSPVA_KEY[3:11]!r}",
        "query parameter '?apikey='",
    ]
    assert leaks(f"token={TCS_TOKEN[:2]}**** key {CLIENT_KEY[:7]}") == []


# ---- capture ------------------------------------------------------------------------------


@dataclass
class Capture:
    """Formatted log text (production format), raw records, and every response."""

    stream: io.StringIO = field(default_factory=io.StringIO)
    records: list[logging.LogRecord] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [self.stream.getvalue(), *self.responses]
        for record in self.records:
            parts += [record.name, str(record.msg), repr(record.args)]
            parts += [
                record.getMessage(),
                record.exc_text or "",
                record.stack_info or "",
            ]
        return "\n".join(parts)

    def assert_clean(self, *more: str) -> None:
        found = leaks("\n".join([self.text(), *more]))
        assert not found, found


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)  # fills exc_text, as a real handler would
        self.records.append(record)


@pytest.fixture
def capture() -> Iterator[Capture]:
    """Root logger at DEBUG with a production-format handler, as ``serve`` does it.

    ``logging.basicConfig`` is a no-op under pytest (the root already has handlers), so
    the same configuration is made by hand. Loggers the app quiets itself (httpx,
    httpcore) stay as quiet as in production.
    """
    found = Capture()
    root = logging.getLogger()
    text = logging.StreamHandler(found.stream)
    text.setFormatter(logging.Formatter(LOG_FORMAT))
    keep = _Keep(found.records)
    keep.setFormatter(logging.Formatter(LOG_FORMAT))
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(text)
    root.addHandler(keep)
    try:
        yield found
    finally:
        root.removeHandler(text)
        root.removeHandler(keep)
        root.setLevel(old_level)


# ---- providers under test ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def secret_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fakes accept (and provider_options hand out) our distinctive secrets."""
    monkeypatch.setattr(thuecodesim, "TOKEN", TCS_TOKEN)
    monkeypatch.setattr(smsman, "TOKEN", SMSMAN_TOKEN)
    monkeypatch.setattr(smspva, "API_KEY", SMSPVA_KEY)
    monkeypatch.setattr(handler_api, "API_KEY", CLONE_KEY)


@dataclass(frozen=True)
class Kind:
    """One provider as configured for the run."""

    fake: type[FakeUpstream] | None
    country: int
    api: str = "activation"  # smspva only: or "rent"
    # getFullSms shows the SMS text; sms-man's get-sms sends only the code
    full_text: bool = True

    def options(self, url: str) -> dict[str, Any]:
        if self.fake is thuecodesim.FakeThuecodesim:  # credentials in its URL too
            return thuecodesim.provider_options(with_credentials(url))
        if self.fake is smsman.FakeSmsman:
            return smsman.provider_options(url)
        if self.fake is smspva.FakeSmspva:
            return smspva.provider_options(url, api=self.api)
        clones = {
            handler_api.FakeSms3t: handler_api.sms3t_options,
            handler_api.FakeSmsServiceOnline: handler_api.sms_service_online_options,
        }
        if self.fake in clones:
            return clones[self.fake](url)
        return {"type": "sandbox", "sms_delay": 5, "balance": 1000, "poll_interval": 1}


def with_credentials(url: str) -> str:
    """``url`` with ``user:password@`` (a proxy or basic-auth gateway in front)."""
    return url.replace("://", f"://{URL_USER}:{URL_PASSWORD}@", 1)


KINDS = {
    "thuecodesim": Kind(thuecodesim.FakeThuecodesim, 10),
    "smsman": Kind(smsman.FakeSmsman, 10, full_text=False),
    "smspva": Kind(smspva.FakeSmspva, 10),
    "smspva_rent": Kind(smspva.FakeSmspva, 0, api="rent"),  # rental: Russia only
    "sandbox": Kind(None, 10),
    # handler_api clones: the key travels in the query string of every GET
    "sms3t": Kind(handler_api.FakeSms3t, 10, full_text=False),
    "sms_service_online": Kind(handler_api.FakeSmsServiceOnline, 10, full_text=False),
}


def raw_config(store_path: str, providers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "store": {"path": store_path},
        "activation": {"lifetime": 1200, "early_cancel": 0},
        "currency": {"display": "RUB", "rates": {"VND": 0.0036, "USD": 92.5}},
        "upstream": {"connect_timeout": 1, "read_timeout": 0.3},
        "breaker": {"failures": 100},  # every fault below must reach the upstream
        "keys": [{"key": CLIENT_KEY, "alias": ALIAS, "providers": sorted(providers)}],
        "providers": providers,
    }


async def start_fake(aiohttp_server: Any, kind: Kind) -> tuple[FakeUpstream, str]:
    assert kind.fake is not None
    fake = kind.fake()
    server: TestServer = await aiohttp_server(fake.app, access_log=None)
    return fake, str(server.make_url("")).rstrip("/")


@dataclass
class Run:
    """Our server in front of one provider; every answer lands in the capture."""

    client: TestClient
    capture: Capture
    clock: FakeClock

    async def ask(self, key: str = CLIENT_KEY, **params: Any) -> str:
        """One GET, its status, headers and body recorded; returns the body."""
        query = {"api_key": key, **{k: str(v) for k, v in params.items()}}
        resp = await self.client.get(API, params=query)
        body = await resp.text()
        headers = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
        self.capture.responses.append(f"{resp.status}\n{headers}\n\n{body}")
        assert resp.status == 200 and resp.content_type in (TEXT, JSON), body
        return body


async def start_server(
    config: Any, clock: FakeClock, aiohttp_client: Any
) -> TestClient:
    """Like ``start_app``, but with the access log off, as ``serve`` runs it."""
    server = TestServer(create_app(config, clock=clock, background=False))
    await server.start_server(access_log=None)
    client: TestClient = await aiohttp_client(server)
    return client


# ---- the full run -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KINDS))
async def test_full_run_leaks_nothing(
    name: str,
    capture: Capture,
    aiohttp_server: Any,
    aiohttp_client: Any,
    store_path: str,
    clock: FakeClock,
) -> None:
    kind = KINDS[name]
    fake, url = (
        (None, "") if kind.fake is None else await start_fake(aiohttp_server, kind)
    )
    config = parse_config(raw_config(store_path, {name: kind.options(url)}))
    run = Run(await start_server(config, clock, aiohttp_client), capture, clock)

    assert re.fullmatch(r"ACCESS_BALANCE:\d+\.\d\d", await run.ask(action="getBalance"))
    prices = json.loads(await run.ask(action="getPrices", country=kind.country))
    assert prices[str(kind.country)]["tg"]["count"] > 0

    # buy, wait, an SMS, the code, another SMS, finish
    answer = await run.ask(action="getNumber", service="tg", country=kind.country)
    assert re.fullmatch(r"ACCESS_NUMBER:\d+:\d+", answer), answer
    ident = answer.split(":")[1]
    assert await run.ask(action="getStatus", id=ident) == "STATUS_WAIT_CODE"
    code, _ = await deliver(run, fake, ident, "54321", kind.full_text)
    assert await run.ask(action="getStatus", id=ident) == f"STATUS_OK:{code}"
    assert await run.ask(action="setStatus", id=ident, status=3) == "ACCESS_RETRY_GET"
    code, text = await deliver(run, fake, ident, "67890", kind.full_text)
    assert await run.ask(action="getStatus", id=ident) == f"STATUS_OK:{code}"
    assert await run.ask(action="getFullSms", id=ident) == f"FULL_SMS:{text}"
    assert await run.ask(action="setStatus", id=ident, status=6) == "ACCESS_ACTIVATION"

    # buy and cancel
    answer = await run.ask(action="getNumberV2", service="tg", country=kind.country)
    ident = str(json.loads(answer)["activationId"])
    assert await run.ask(action="setStatus", id=ident, status=8) == "ACCESS_CANCEL"
    active = await run.ask(action="getActiveActivations")
    assert json.loads(active) == {"status": "error", "error": "NO_ACTIVATIONS"}

    # keys close to the real one
    for wrong in (CLIENT_KEY[:-1] + "!", CLIENT_KEY.lower(), CLIENT_KEY + " x"):
        assert await run.ask(key=wrong, action="getBalance") == "BAD_KEY"

    if fake is not None:
        await upstream_faults(run, fake, kind)

    # the capture works: it holds our request lines (and, in them, no secret)
    text = capture.text()
    assert f"action=getNumber key={ALIAS} provider={name} outcome=ACCESS_NUMBER" in text
    assert "action=getBalance key=- provider=- outcome=BAD_KEY" in text
    capture.assert_clean()


def sms_text(code: str) -> str:
    return f"Telegram code: {code}. Do not give it to anyone"


async def deliver(
    run: Run, fake: FakeUpstream | None, ident: str, code: str, full_text: bool
) -> tuple[str, str]:
    """An SMS reaches the last number bought: (code, text) the client will see."""
    if fake is None:  # the sandbox writes its own SMS, sms_delay seconds on
        run.clock.advance(6)
        answer = await run.ask(action="getFullSms", id=ident)
        assert answer.startswith("FULL_SMS:Telegram code: "), answer
        text = answer.removeprefix("FULL_SMS:")
        return text.split()[2], text
    fake.deliver(list(fake.orders)[-1], sms_text(code), code)
    run.clock.advance(10)  # past the poll interval
    return code, sms_text(code) if full_text else code


async def upstream_faults(run: Run, fake: FakeUpstream, kind: Kind) -> None:
    """HTML 500, a hang past the read timeout, then our token refused."""
    fake.fault = "html500"
    run.clock.advance(120)  # past the balance and catalog caches
    assert await run.ask(action="getBalance") == "ERROR_SQL"
    assert await run.ask(action="getNumber", service="tg", country=kind.country) == (
        "NO_NUMBERS"
    )
    fake.fault, fake.hang_seconds = "hang", 1.0
    run.clock.advance(120)
    assert await run.ask(action="getBalance") == "ERROR_SQL"
    # a purchase of unknown outcome (or a catalogue that does not come)
    assert await run.ask(action="getNumber", service="tg", country=kind.country) == (
        "NO_NUMBERS"
    )
    fake.fault = None
    fake.scenario = "bad_token"
    run.clock.advance(120)
    assert await run.ask(action="getBalance") == "ERROR_SQL"
    assert await run.ask(action="getNumber", service="tg", country=kind.country) == (
        "NO_NUMBERS"
    )
    # rent.php getdata needs no key: the smspva rental catalogue still answers
    assert isinstance(
        json.loads(await run.ask(action="getPrices", country=kind.country)), dict
    )
    fake.scenario = "ok"
    rejected = [
        r for r in run.capture.records if "rejected our credentials" in r.getMessage()
    ]
    assert rejected and all(r.levelno == logging.ERROR for r in rejected)


# ---- the capture can fail ------------------------------------------------------------------


async def test_upstream_client_errors_would_be_caught(
    capture: Capture, aiohttp_client: Any, store_path: str, clock: FakeClock
) -> None:
    """aiohttp's client errors quote the whole URL, token and credentials included
    (a malformed answer: ``ClientResponseError(..., url=...)``). The upstream client
    chains them to ours; logged with a traceback and nothing masking it, the capture
    would show the token; through the filter create_app installs, it shows nothing."""

    async def malformed(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nbroken header line\r\n\r\n")
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(malformed, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
    kind = KINDS["thuecodesim"]
    config = parse_config(raw_config(store_path, {"thuecodesim": kind.options(url)}))
    run = Run(await start_server(config, clock, aiohttp_client), capture, clock)
    provider = run.client.server.app[ENGINE].upstreams.providers["thuecodesim"]
    try:
        with pytest.raises(UpstreamUncertain) as caught:
            await provider.balance()
    finally:
        upstream.close()
    assert caught.value.detail == "RemoteProtocolError"
    assert TCS_TOKEN in str(caught.value.__cause__)  # what there is to hide

    client_logger = logging.getLogger("aiohttp.client")
    assert logs.FILTER in client_logger.filters
    client_logger.removeFilter(logs.FILTER)
    try:
        client_logger.error("upstream failed", exc_info=caught.value)
    finally:
        client_logger.addFilter(logs.FILTER)
    assert "thuecodesim token: " + repr(TCS_TOKEN[:8]) in leaks(capture.text())

    capture.records.clear()
    capture.stream.seek(0)
    capture.stream.truncate()
    for name in ("aiohttp.client", "compat_server", "providers"):
        logging.getLogger(name).error("upstream failed", exc_info=caught.value)
    assert "RemoteProtocolError" in capture.text()
    assert "ClientResponseError" in capture.text()  # the traceback is there, masked
    assert "/users/balance?token=****'" in capture.text()
    assert [f for f in leaks(capture.text()) if not f.startswith("query")] == []


def test_serve_runs_without_access_log_and_quiets_httpx(
    monkeypatch: pytest.MonkeyPatch, store_path: str
) -> None:
    """What the capture above imitates: ``serve --log-level DEBUG`` logs in this format
    with the root at DEBUG, runs without an access log (it would log ``api_key=`` with
    every request line) and leaves httpx/httpcore at WARNING."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.update(log=kw))
    monkeypatch.setattr(serving, "run", lambda app, listeners, **kw: seen.update(run=kw))
    for name in ("httpx", "httpcore"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    sandbox = {"sandbox": KINDS["sandbox"].options("")}
    config = parse_config(raw_config(store_path, sandbox))
    assert cli.serve_forever(config, "127.0.0.1", 1, "DEBUG") == 0
    assert seen["log"] == {"level": logging.DEBUG, "format": LOG_FORMAT}
    assert "access_log" in seen["run"] and seen["run"]["access_log"] is None
    assert seen["run"]["keepalive_timeout"] == 75.0  # as web.run_app had it
    assert seen["run"]["gate"].max_per_client == 256
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("httpcore").level == logging.WARNING


# ---- check-config ------------------------------------------------------------------------

# min_interval: 0 below: these tests are about secrets in logs and output, not pacing
# (real pacing is tests/test_pacing.py's condition)
CONFIG_YAML = """
store: {{path: {store}}}
currency: {{display: RUB, rates: {{VND: 0.0036, USD: 92.5}}}}
upstream: {{connect_timeout: 1, read_timeout: 0.3}}
keys:
  - key: ${{CLIENT_KEY}}
    alias: {alias}
    providers: [tcs, man, pva, sandbox]
providers:
  sandbox: {{type: sandbox}}
  tcs: {{type: thuecodesim, token: "${{TCS_TOKEN}}", base_url: "{tcs}", min_interval: 0}}
  man: {{type: smsman, token: "${{SMSMAN_TOKEN}}", base_url: "{man}/control", min_interval: 0}}
  pva: {{type: smspva, api_key: "${{SMSPVA_KEY}}", activation_url: "{pva}", base_url: "{pva}",
         min_interval: 0}}
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_KEY", CLIENT_KEY)
    monkeypatch.setenv("TCS_TOKEN", TCS_TOKEN)
    monkeypatch.setenv("SMSMAN_TOKEN", SMSMAN_TOKEN)
    monkeypatch.setenv("SMSPVA_KEY", SMSPVA_KEY)


@dataclass
class Fakes:
    tcs: FakeUpstream
    man: FakeUpstream
    pva: FakeUpstream
    path: str
    tcs_port: int


@pytest.fixture
async def fakes(
    aiohttp_server: Any, tmp_path: Path, store_path: str, env: None
) -> Fakes:
    started = [
        await start_fake(aiohttp_server, KINDS[n])
        for n in ("thuecodesim", "smsman", "smspva")
    ]
    (tcs, tcs_url), (man, man_url), (pva, pva_url) = started
    path = tmp_path / "config.yaml"
    path.write_text(
        CONFIG_YAML.format(
            store=store_path,
            alias=ALIAS,
            tcs=with_credentials(tcs_url),
            man=man_url,
            pva=pva_url,
        ),
        encoding="utf-8",
    )
    return Fakes(tcs, man, pva, str(path), int(tcs_url.rsplit(":", 1)[1]))


async def test_check_config_masks_every_secret(
    fakes: Fakes, capture: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", "--config", fakes.path]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"key {ALIAS}: **** -> tcs, man, pva, sandbox" in out.splitlines()
    assert out.count(" token=**** ") == 2 and " api_key=**** " in out
    assert f" base_url=http://****@127.0.0.1:{fakes.tcs_port} " in out
    capture.assert_clean(out, err)


async def ping(path: str) -> int:
    """``check-config --ping``: it runs its own event loop, so in a thread, while the
    fakes serve on this one."""
    return await asyncio.to_thread(
        cli.main, ["check-config", "--config", path, "--ping"]
    )


async def test_check_config_ping_leaks_nothing(
    fakes: Fakes, capture: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await ping(fakes.path) == 0
    fakes.man.scenario = "bad_token"
    fakes.pva.fault = "html500"
    fakes.tcs.fault, fakes.tcs.hang_seconds = "hang", 1.0
    assert await ping(fakes.path) == 1
    out, err = capsys.readouterr()
    ping_lines = [
        line.split(", circuit")[0] for line in out.splitlines() if ": " in line
    ]
    assert [line for line in ping_lines if "reachable" in line.lower()] == [
        "sandbox: reachable, token accepted, balance 1000.0 RUB = 1000.00 RUB",
        "tcs: reachable, token accepted, balance 1000000 VND = 3600.00 RUB",
        "man: reachable, token accepted, balance 799.70 RUB = 799.70 RUB",
        "pva: reachable, token accepted, balance 10.5 USD = 971.25 RUB",
        "sandbox: reachable, token accepted, balance 1000.0 RUB = 1000.00 RUB",
        "tcs: UNREACHABLE (UpstreamUncertain: ReadTimeout)",
        "man: reachable, TOKEN REJECTED (fix providers.man)",
        "pva: UNREACHABLE (UpstreamUncertain: HTTP 500, body is not JSON)",
    ]
    capture.assert_clean(out, err)


@pytest.mark.parametrize(
    "broken",
    [
        f'keys: [{{key: "{CLIENT_KEY}", providers: [a]}}]\nproviders: {{a: {{type: thuecodesim, token: "{TCS_TOKEN}\n',
        f'keys: [{{key: "{CLIENT_KEY}", providers: [a]}}]\nproviders: {{a: {{type: thuecodesim, token: "{TCS_TOKEN}", base_url: "ftp://x"}}}}\n',
        f'keys: [{{key: "{CLIENT_KEY}", providers: [a]}}]\nproviders: {{a: {{type: smspva, api_key: "{SMSPVA_KEY}", api: "bogus"}}}}\n',
        f'keys: [{{key: "{CLIENT_KEY}", providers: [b]}}]\nproviders: {{a: {{type: smsman, token: "{SMSMAN_TOKEN}"}}}}\n',
        f'keys: [{{key: "{CLIENT_KEY}", providers: [a]}}, {{key: "{CLIENT_KEY}", providers: [a]}}]\nproviders: {{a: {{type: sandbox}}}}\n',
    ],
    ids=["yaml", "base_url", "api", "unknown-provider", "duplicate-key"],
)
def test_config_errors_leak_nothing(
    broken: str, tmp_path: Path, capture: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(broken, encoding="utf-8")
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("sms-compat: config error: ")
    capture.assert_clean(out, err)


def test_real_serve_process_logs_no_secret(tmp_path: Path) -> None:
    """The production entry point, as a process: its whole output never shows the key."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    secret = "Real-Serve-Secret-Key-0123456789abcdef"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(
        f"store: {{path: {tmp_path / 'store.sqlite3'}}}\n"
        f"keys: [{{key: {secret}, alias: prod-check, providers: [sb]}}]\n"
        "providers: {sb: {type: sandbox, sms_delay: 0}}\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "compat_server", "serve", "--config", str(config),
         "--port", str(port), "--log-level", "DEBUG"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/stubs/handler_api.php?api_key={secret}&action="
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(base + "getBalance", timeout=1) as resp:
                    assert resp.read() == b"ACCESS_BALANCE:1000.00"
                break
            except OSError:
                time.sleep(0.1)
        with urllib.request.urlopen(
            base + "getNumber&service=tg&country=10", timeout=5
        ) as resp:
            ident = resp.read().decode().split(":")[1]
        with urllib.request.urlopen(base + f"getStatus&id={ident}", timeout=5) as resp:
            assert resp.read().decode().startswith("STATUS_OK:")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert "action=getNumber key=prod-check provider=sb outcome=ACCESS_NUMBER" in output
    assert "Failed to create request handler" not in output
    for fragment in (secret, secret[:8], secret[-8:], "api_key="):
        assert fragment not in output


BAD_REQUESTS = [  # (request bytes, the one line that reports it)
    (b"GET /stubs/handler_api.php?api_key=%s&action=getBalance&x=\x01 HTTP/1.1\r\n"
     b"Host: a\r\n\r\n", "WARNING aiohttp.server: bad HTTP request from 127.0.0.1 refused: InvalidURLError (400)"),
    (b"GET /stubs/handler_api.php?api_key=%s&action=getBalance&x=" + b"a" * 9000
     + b" HTTP/1.1\r\nHost: a\r\n\r\n", "WARNING aiohttp.server: bad HTTP request from 127.0.0.1 refused: LineTooLong (400)"),
    (b"GET /stubs/handler_api.php?api_key=%s HTTP/9.1\r\n\r\n",
     "WARNING aiohttp.server: bad HTTP request from 127.0.0.1 refused: BadStatusLine (400)"),
    (b"GET /stubs/handler_api.php?api_key=%s HTTP/1.1\r\nBad Header: x\r\n\r\n",
     "WARNING aiohttp.server: bad HTTP request from 127.0.0.1 refused: BadHttpMessage (400)"),
    (b"G\x01T /stubs/handler_api.php?api_key=%s HTTP/1.1\r\n\r\n",
     "DEBUG aiohttp.server: bad HTTP request from 127.0.0.1 refused: BadHttpMethod (400)"),
]  # fmt: skip


def test_parser_errors_are_one_short_line_without_the_request(tmp_path: Path) -> None:
    """Requests aiohttp's parser rejects, each carrying the client key in its request
    line, sent to the real serve process at DEBUG: one short line each (a second
    of the same kind within log_repeat_interval is counted, not repeated), no
    traceback, no key. The config also holds an upstream with ``user:password@`` in
    its URL and a token: neither shows either (the startup line masks them)."""
    import socket

    from tests.serving import ServeProcess

    secret = "Parser-Error-Secret-Key-0123456789ab"
    raw = {
        "store": {"path": str(tmp_path / "store.sqlite3")},
        "currency": {"display": "RUB", "rates": {"VND": 0.0036}},
        "keys": [{"key": secret, "alias": "parse-check", "providers": ["sb"]}],
        "providers": {
            "sb": {"type": "sandbox", "sms_delay": 0},
            "tcs": {"type": "thuecodesim", "token": TCS_TOKEN,
                    "base_url": f"http://{URL_USER}:{URL_PASSWORD}@127.0.0.1:1"},
        },
    }  # fmt: skip
    serve = ServeProcess(tmp_path, raw, secret, log_level="DEBUG").start()
    try:
        for request, _ in [*BAD_REQUESTS, BAD_REQUESTS[0]]:
            with socket.create_connection(("127.0.0.1", serve.port), timeout=5) as sock:
                sock.sendall(request.replace(b"%s", secret.encode()))
                assert sock.recv(100).startswith(b"HTTP/1.0 400 Bad Request\r\n")
        assert serve.get("action=getBalance") == "ACCESS_BALANCE:1000.00"
    finally:
        output = serve.stop()
    lines = [line.split(" ", 2)[2] for line in output.splitlines()[1:]]
    for _, line in BAD_REQUESTS:
        assert lines.count(line) == 1, (line, output[-3000:])
    assert lines.count(
        "WARNING aiohttp.server: repeated 1 more times in the last 60 s: bad HTTP"
        " request from 127.0.0.1 refused: InvalidURLError (400)"
    ) == 1, output[-3000:]
    assert "INFO compat_server: provider tcs: type=thuecodesim base_url=http://****@127.0.0.1:1 token=****" in lines
    assert "Traceback" not in output and "Error handling request" not in output
    found = leaks(output) + [f for f in (secret, secret[:8], secret[-8:]) if f in output]
    assert not found, found


async def test_an_access_log_left_on_shows_no_key(
    capture: Capture, aiohttp_client: Any, store_path: str, clock: FakeClock
) -> None:
    """serve runs without aiohttp's access log; a deployment that turns it on (here:
    aiohttp's default) gets its lines with the key masked."""
    sandbox = {"sandbox": KINDS["sandbox"].options("")}
    config = parse_config(raw_config(store_path, sandbox))
    server = TestServer(create_app(config, clock=clock, background=False))
    await server.start_server()  # aiohttp.access at its default format
    client: TestClient = await aiohttp_client(server)
    run = Run(client, capture, clock)
    assert (await run.ask(action="getBalance")).startswith("ACCESS_BALANCE:")
    access = [r.getMessage() for r in capture.records if r.name == "aiohttp.access"]
    assert len(access) == 1 and '"GET /stubs/handler_api.php?api_key=****&action=getBalance HTTP/1.1" 200' in access[0], access
    assert [f for f in leaks(capture.text()) if not f.startswith("query")] == []
