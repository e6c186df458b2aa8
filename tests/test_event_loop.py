"""server.event_loop: uvloop when it is installed (the ``uvloop`` extra), else asyncio.

The real ``serve`` runs as a child process; its event loop is named in its log.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from compat_server import serving
from compat_server.config import parse_config
from providers.vocabulary import ConfigError
from tests.conftest import API, KEY

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_uvloop = pytest.mark.skipif(
    not HAS_UVLOOP, reason="uvloop is not installed (pip install '.[uvloop]')"
)


def test_asyncio_when_asked() -> None:
    assert serving.loop_factory("asyncio") == ("asyncio", None)


@needs_uvloop
def test_auto_takes_uvloop_when_installed() -> None:
    import uvloop

    for choice in ("auto", "uvloop"):
        name, factory = serving.loop_factory(choice)
        assert factory is not None and name.startswith("uvloop 0.")
        loop = factory()
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()


def test_uvloop_asked_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "UVLOOP", "uvloop_is_not_installed")
    assert serving.loop_factory("auto") == ("asyncio", None)
    with pytest.raises(serving.LoopError) as caught:
        serving.loop_factory("uvloop")
    assert str(caught.value) == (
        "server.event_loop is uvloop, but uvloop is not installed"
        " (pip install 'sms-compat[uvloop]')"
    )


def test_config_reads_the_choice(store_path: str) -> None:
    raw = {
        "store": {"path": store_path},
        "keys": [{"key": KEY, "providers": ["sb"]}],
        "providers": {"sb": {"type": "sandbox"}},
    }
    assert parse_config(raw).event_loop == "auto"
    raw["server"] = {"event_loop": "asyncio"}
    assert parse_config(raw).event_loop == "asyncio"
    raw["server"] = {"event_loop": "trio"}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert str(caught.value) == (
        "server.event_loop: must be one of auto, asyncio, uvloop, got 'trio'"
    )


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_real_serve_names_its_loop(tmp_path: Path, choice: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"server: {{host: 127.0.0.1, port: 0, event_loop: {choice}}}\n"
        f"store: {{path: {tmp_path / 'store.sqlite3'}}}\n"
        f"keys: [{{key: {KEY}, alias: loop, providers: [sb]}}]\n"
        "providers: {sb: {type: sandbox}}\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "compat_server", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    watchdog = threading.Timer(60, proc.kill)  # a hung server fails the test, not CI
    watchdog.start()
    try:
        url = proc.stdout.readline().strip().removeprefix("sms-compat: serving ")
        assert url.endswith(API)
        with urllib.request.urlopen(
            f"{url}?api_key={KEY}&action=getBalance", timeout=10
        ) as resp:
            assert (resp.status, resp.read()) == (200, b"ACCESS_BALANCE:1000.00")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        watchdog.cancel()
    assert proc.returncode == 0
    loop_lines = [line for line in stderr.splitlines() if "event loop: " in line]
    assert len(loop_lines) == 1
    used = loop_lines[0].split("event loop: ")[1]
    if choice == "auto" and HAS_UVLOOP:
        assert used.startswith("uvloop 0.")
    else:
        assert used == "asyncio"


@needs_uvloop
def test_real_serve_on_uvloop_answers_https(tmp_path: Path) -> None:
    """uvloop reads a new connection before a task can start TLS on it: the gated
    https listener hands those first bytes (the ClientHello) to the TLS protocol.
    (At DEBUG the server loses that race every time here; without the hand-over in
    connections.py each handshake then times out.)"""
    import ssl

    from compat_server import tls

    tls.init(tmp_path / "tls")
    path = tmp_path / "config.yaml"
    path.write_text(
        "server: {host: 127.0.0.1, port: 0, event_loop: uvloop,"
        f" tls: {{port: 0, dir: {tmp_path / 'tls'}}}}}\n"
        f"store: {{path: {tmp_path / 'store.sqlite3'}}}\n"
        f"keys: [{{key: {KEY}, alias: loop, providers: [sb]}}]\n"
        "providers: {sb: {type: sandbox}}\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "compat_server", "serve", "--config", str(path),
         "--log-level", "DEBUG"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        urls = [proc.stdout.readline().strip().removeprefix("sms-compat: serving ")
                for _ in range(2)]  # fmt: skip
        https = next(u for u in urls if u.startswith("https://"))
        trusting = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
        for _ in range(5):  # a new connection, and a handshake, each time
            with urllib.request.urlopen(
                f"{https}?api_key={KEY}&action=getBalance", context=trusting, timeout=10
            ) as resp:
                assert (resp.status, resp.read()) == (200, b"ACCESS_BALANCE:1000.00")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        watchdog.cancel()
    assert proc.returncode == 0
    assert "event loop: uvloop 0." in stderr
