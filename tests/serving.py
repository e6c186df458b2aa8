"""``sms-compat serve`` as a real process on a loopback port, its whole output kept."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """Start with :meth:`start`; :meth:`stop` (SIGTERM) returns everything it printed."""

    def __init__(
        self,
        tmp_path: Path,
        raw: dict[str, Any],
        key: str,
        *,
        preexec_fn: Callable[[], None] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.port = free_port()
        self.key = key
        self.config = tmp_path / "config.yaml"
        self.config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        self._preexec = preexec_fn
        self._level = log_level
        self._chunks: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def url(self, query: str) -> str:
        return f"http://127.0.0.1:{self.port}/stubs/handler_api.php?api_key={self.key}&{query}"

    def get(self, query: str, timeout: float = 5) -> str:
        with urllib.request.urlopen(self.url(query), timeout=timeout) as resp:
            return str(resp.read().decode())

    def start(self) -> ServeProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "compat_server", "serve", "--config", str(self.config),
             "--port", str(self.port), "--log-level", self._level],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=self._preexec,
        )  # fmt: skip
        out = self.proc.stdout
        assert out is not None
        # read all the time: a full pipe would block the server's logging
        reader = threading.Thread(target=lambda: self._chunks.append(out.read()))
        reader.daemon = True
        reader.start()
        self._reader = reader
        for _ in range(150):
            try:
                if self.get("action=getBalance", timeout=1).startswith("ACCESS_BALANCE"):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"serve did not come up: {self.stop()[-2000:]}")

    def stop(self) -> str:
        """SIGTERM, wait, and everything the process wrote."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return "".join(self._chunks)
