"""Field conditions for the process as a whole: too few descriptors, a store that cannot
grow, one client holding many connections. Each runs the real ``sms-compat serve``
process (limits set with ``resource.setrlimit`` before it starts) and counts the lines
it logs; the connection caps are checked with real sockets from two loopback
addresses (127.0.0.1 and 127.0.0.2 are both this machine on Linux).
"""

from __future__ import annotations

import logging
import resource
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from compat_server.logs import Throttle
from tests.serving import ServeProcess

KEY = "Flood-Test-Key-0123456789abcdef"
BALANCE = b"ACCESS_BALANCE:1000.00"


def raw_config(tmp_path: Path, **server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", **server},
        "store": {"path": str(tmp_path / "store.sqlite3")},
        "keys": [{"key": KEY, "alias": "flood", "providers": ["sb"]}],
        "providers": {"sb": {"type": "sandbox", "sms_delay": 0, "balance": 1000}},
    }


def connect(serve: ServeProcess, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", serve.port))
    return sock


def ask(sock: socket.socket, action: str = "getBalance") -> bytes:
    """One keep-alive request on ``sock``; the body (b"" if the server closed it)."""
    try:
        sock.sendall(
            f"GET /stubs/handler_api.php?api_key={KEY}&action={action} HTTP/1.1\r\n"
            "Host: x\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(BALANCE):
            chunk = sock.recv(4096)
            if not chunk:
                return b""
            data += chunk
    except ConnectionError:
        return b""
    return data.split(b"\r\n\r\n", 1)[1]


def closed_at_once(sock: socket.socket) -> bool:
    """The server closed the connection without reading or writing anything."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def log_lines(output: str) -> list[str]:
    """The log lines without their timestamp (tracebacks' lines as they are)."""
    return [
        line.split(" ", 2)[2] if line[:2] == "20" else line
        for line in output.splitlines()
        if not line.startswith("sms-compat: serving ")
    ]


# ---- connection caps ---------------------------------------------------------------


def test_caps_per_client_and_in_total(tmp_path: Path) -> None:
    raw = raw_config(tmp_path, max_connections=8, max_connections_per_client=5)
    serve = ServeProcess(tmp_path, raw, KEY).start()
    try:
        first = [connect(serve) for _ in range(5)]
        assert [ask(s) for s in first] == [BALANCE] * 5
        over = [connect(serve) for _ in range(2)]  # the client's 6th and 7th
        assert [closed_at_once(s) for s in over] == [True, True]
        assert [ask(s) for s in first] == [BALANCE] * 5  # the first five still work
        other = [connect(serve, "127.0.0.2") for _ in range(3)]
        assert [ask(s) for s in other] == [BALANCE] * 3
        ninth = connect(serve, "127.0.0.2")  # 8 open: the total cap
        assert closed_at_once(ninth)
        first[0].close()
        first[1].close()
        time.sleep(0.2)
        again = connect(serve, "127.0.0.2")
        assert ask(again) == BALANCE
        for sock in [*first, *over, *other, ninth, again]:
            sock.close()
    finally:
        output = serve.stop()
    lines = log_lines(output)
    refusals = [line for line in lines if "closed at once" in line]
    assert refusals == [
        "WARNING compat_server: connection from 127.0.0.1 closed at once: it holds 5"
        " connections (cap 5 per client)",
        "WARNING compat_server: connection from 127.0.0.2 closed at once: the server"
        " holds 8 connections (cap 8)",
        "WARNING compat_server: repeated 1 more times in the last 60 s: connection"
        " from 127.0.0.1 closed at once: it holds 5 connections (cap 5 per client)",
    ]
    assert "Traceback" not in output


def few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_one_client_cannot_take_every_descriptor(tmp_path: Path) -> None:
    """RLIMIT_NOFILE 256 (soft and hard), the default caps (1024 / 256): the server
    lowers them to what the limit holds, a client opening 100 connections gets a
    share, another client is still served, and the log stays a few lines: no
    traceback per failed accept (before: 613,416 tracebacks, 272 MB, in two minutes
    with 64 descriptors and 300 connections)."""
    serve = ServeProcess(
        tmp_path, raw_config(tmp_path), KEY, preexec_fn=few_descriptors
    ).start()
    hog: list[socket.socket] = []
    try:
        started = time.monotonic()
        while len(hog) < 100 and time.monotonic() - started < 20:
            try:
                hog.append(connect(serve))
            except OSError:
                time.sleep(0.01)
        served = Counter(ask(s) for s in hog[:60])
        assert served[BALANCE] == 20 and served[b""] == 40, served
        for _ in range(3):
            sock = connect(serve, "127.0.0.2")
            assert ask(sock) == BALANCE
            sock.close()
    finally:
        for sock in hog:
            sock.close()
        output = serve.stop()
    lines = log_lines(output)
    assert (
        "WARNING compat_server: server.max_connections 1024 lowered to 80 and"
        " max_connections_per_client 256 to 20: the descriptor limit allows no more"
    ) in lines
    assert "Traceback" not in output and "out of system resource" not in output
    assert len([line for line in lines if "closed at once" in line]) == 2, lines
    assert len(lines) < 120, len(lines)  # start, stop and the requests above


def store_cannot_grow() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_a_full_disk_logs_one_traceback_not_one_per_request(tmp_path: Path) -> None:
    """The store cannot grow past 300 kB (RLIMIT_FSIZE: a full disk as sqlite sees
    it). 300 purchases: each answered, a handful of lines in the log, no traceback
    (before: 496 tracebacks in 14,391 lines for 500 purchases)."""
    raw = raw_config(tmp_path)
    raw["providers"]["sb"]["balance"] = 1_000_000
    serve = ServeProcess(tmp_path, raw, KEY, preexec_fn=store_cannot_grow).start()
    answers: Counter[str] = Counter()
    try:
        for _ in range(300):
            answer = serve.get("action=getNumber&service=tg&country=10")
            answers[answer.split(":", 1)[0]] += 1
    finally:
        output = serve.stop()
    # the store's own answer to a store it cannot write (issue 7 item 9): nothing
    # is bought unrecorded, so the client hears NO_NUMBERS, and the log says it once
    assert set(answers) <= {"ACCESS_NUMBER", "NO_NUMBERS"}, answers
    assert answers["NO_NUMBERS"] > 250, answers
    assert "Traceback" not in output, output[-3000:]
    events = [line for line in log_lines(output) if "action=" not in line]
    assert len(events) < 10, events
    assert sum("cannot be written" in line for line in events) == 1, events


# ---- the throttle itself -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def throttled() -> tuple[logging.Logger, Throttle, Clock, list[str]]:
    clock = Clock()
    throttle = Throttle(60, clock)
    logger = logging.getLogger("tests.floods")
    logger.setLevel(logging.DEBUG)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.levelname} {record.getMessage()}")

    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(throttle)
    logger.propagate = False
    yield logger, throttle, clock, seen
    logger.removeFilter(throttle)
    logger.removeHandler(handler)
    logger.propagate = True


def test_throttle_counts_repeats_per_interval(
    throttled: tuple[logging.Logger, Throttle, Clock, list[str]],
) -> None:
    logger, throttle, clock, seen = throttled
    mark = {"throttle": True}
    for n in range(1000):
        logger.error("accept failed on fd %d", n, extra=mark)
        logger.warning("other kind", extra=mark)
        logger.info("request %d", n, extra=mark)  # below WARNING: never held back
        if n < 3:  # a warning of ours, unmarked and without traceback: never held back
            logger.warning("activation %d kept", n)
    assert seen[:7] == [
        "ERROR accept failed on fd 0", "WARNING other kind", "INFO request 0",
        "WARNING activation 0 kept", "INFO request 1", "WARNING activation 1 kept",
        "INFO request 2",
    ]  # fmt: skip
    assert len(seen) == 1005
    assert throttle.flush() == 0  # the interval has not ended
    clock.now += 60
    assert throttle.flush() == 2
    assert seen[-2:] == [
        "ERROR repeated 999 more times in the last 60 s: accept failed on fd 0",
        "WARNING repeated 999 more times in the last 60 s: other kind",
    ]
    logger.error("accept failed on fd %d", 5, extra=mark)  # a new interval: through
    logger.error("accept failed on fd %d", 6, extra=mark)
    clock.now += 61
    logger.error("accept failed on fd %d", 7, extra=mark)  # the count rides along
    assert seen[-2:] == [
        "ERROR accept failed on fd 5",
        "ERROR accept failed on fd 7 [and 1 more like it in the last 60 s]",
    ]
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        for _ in range(5):  # a traceback is held back without a mark
            logger.exception("background sweeper failed; continuing")
    assert seen[-1] == "ERROR background sweeper failed; continuing"
    clock.now += 60
    assert throttle.flush() == 1
    assert seen[-1] == (
        "ERROR repeated 4 more times in the last 60 s: background sweeper failed;"
        " continuing (OSError)"
    )


def test_the_log_filters_never_raise_into_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A record whose arguments do not fit its message still goes out, masked."""
    from compat_server import logs

    logs.REDACTOR.add(["Never-Raise-Secret-77"])
    logger = logging.getLogger("compat_server")
    if logs.FILTER not in logger.filters:  # create_app installs it; no app here
        logger.addFilter(logs.FILTER)
    with caplog.at_level(logging.INFO, "compat_server"):
        logger.info("key %s and %d", "Never-Raise-Secret-77")  # one argument short
    assert [r.getMessage() for r in caplog.records] == ["key %s and %d ('****',)"]


ACCEPT_FLOOD = """
import asyncio, logging, resource, sys, time
from compat_server import logs
from compat_server.config import parse_config

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
config = parse_config({"keys": [{"key": "k" * 12, "providers": ["sb"]}],
                       "providers": {"sb": {"type": "sandbox"}}})
logs.install(config, logging.getLogger().handlers)

async def main():
    server = await asyncio.get_running_loop().create_server(
        asyncio.Protocol, "127.0.0.1", 0)  # keeps every connection, no cap
    print(server.sockets[0].getsockname()[1], flush=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    await asyncio.sleep(float(sys.argv[1]))
    logs.THROTTLE.flush(everything=True)

asyncio.run(main())
"""


def test_accept_failures_out_of_descriptors_are_counted_not_repeated() -> None:
    """A plain asyncio server (no gate) with 48 descriptors and 100 connections:
    accept() fails with EMFILE for as long as they stay open, and CPython's loop logs
    a traceback for each failure, many thousands a second. With the filters of
    compat_server.logs installed: one traceback and one count."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", ACCEPT_FLOOD, "2.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    socks = []
    for _ in range(100):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    time.sleep(1.5)
    for sock in socks:
        sock.close()
    output, _ = proc.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.startswith("ERROR")]
    assert lines[0] == "ERROR asyncio: socket.accept() out of system resource", output[
        -2000:
    ]
    assert (
        len(lines) == 2
        and lines[1].startswith("ERROR asyncio: repeated ")
        and lines[1].endswith(
            " more times in the last 60 s: socket.accept() out of system resource (OSError)"
        )
    ), lines
    assert int(lines[1].split()[3]) > 100  # how often it failed meanwhile
    assert output.count("Traceback") == 1
