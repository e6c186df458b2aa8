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
    assert serving.loop_factory("asyncio", tls=True) == ("asyncio", None)


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


def test_https_runs_on_asyncio() -> None:
    expected = ("asyncio" if not HAS_UVLOOP
                else "asyncio (uvloop is not used with https listeners)")  # fmt: skip
    assert serving.loop_factory("auto", tls=True) == (expected, None)
    if HAS_UVLOOP:
        with pytest.raises(serving.LoopError) as caught:
            serving.loop_factory("uvloop", tls=True)
        assert str(caught.value) == (
            "server.event_loop uvloop cannot serve https (server.tls)"
        )


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
