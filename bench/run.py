"""Benchmarks of sms-compat: every figure is a ratio against a baseline of the same run.

Run from the repository root (the venv that has the project installed)::

    python bench/run.py            # full run, about 12 minutes
    python bench/run.py --quick    # about 5 minutes, smaller samples
    python bench/run.py --only a,c # a subset (figures a to l)

It prints a table and writes ``bench/results/latest.json``. What each figure measures,
and its target, is in ``bench/README.md``. Every server under test, fake upstream and
load generator runs in a process of its own, started by this script as
``run.py --child ROLE SPEC.json``; they only listen on 127.0.0.1, stop by themselves when this
script goes away (their stdin closes) or after ``CHILD_MAX_SECONDS``, and are always
terminated in ``finally`` blocks. On a machine with two or more cores the server under
test is pinned to core 0 and everything that loads it to core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
API = "/stubs/handler_api.php"
KEY = "bench-key-0123456789abcdef0123456789"
CHILD_MAX_SECONDS = 900.0  # a child stops by itself after this, whatever happens
START_TIMEOUT = 30.0  # seconds a child has to say READY
STATS_PATH = "/__bench__/stats"
RATES = {"VND": "0.0036", "USD": "92.5"}  # display RUB, as the shipped README suggests
PROVIDERS = ("thuecodesim", "smsman", "smspva")
POLL_PATH = {  # the fake's path of a status poll (ids folded to {id})
    "thuecodesim": "/session/getv2",
    "smsman": "/control/get-sms",
    "smspva": "/activation/sms/{id}",
}
BUY_PATH = {
    "thuecodesim": "/request/getv2",
    "smsman": "/control/get-number",
    "smspva": "/activation/number/VN/opt29",
}

Json = dict[str, Any]


# ==== shared helpers ====================================================================


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (``fraction`` in 0..1); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def emit(kind: str, payload: Json) -> None:
    """A child's one-line message to the parent (``READY {...}`` or ``RESULT {...}``)."""
    sys.stdout.write(f"{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def proc_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process, all its threads (``/proc/<pid>/stat``)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, load cores): {0} and {1} with two or more cores, else unpinned."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return {available[0]}, {available[1]}


def sandbox_config(store_path: str) -> Json:
    """A config mapping with one key on the sandbox: no SMS ever, one poll only.

    The first getStatus of an activation polls the sandbox (in memory); with a poll
    interval of 10^6 s every later one is answered from the store.
    """
    options = {
        "type": "sandbox",
        "sms_delay": 1e9,
        "balance": 1e9,
        "poll_interval": 1e6,
    }
    return {
        "server": {"host": HOST, "port": 0},
        "store": {"path": store_path},
        "keys": [{"key": KEY, "alias": "bench", "providers": ["sandbox"]}],
        "providers": {"sandbox": options},
    }


def upstream_config(store_path: str, kind: str, options: Json) -> Json:
    """A config mapping with one key on one provider pointed at a fake."""
    return {
        "server": {"host": HOST, "port": 0},
        "store": {"path": store_path},
        "currency": {"display": "RUB", "rates": dict(RATES)},
        "keys": [{"key": KEY, "alias": "bench", "providers": [kind]}],
        "providers": {kind: options},
    }


class BenchError(RuntimeError):
    """A benchmark could not be measured (a child failed, a reply was wrong)."""


# ==== children ==========================================================================


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when the parent goes away (our stdin reaches EOF)."""
    try:
        sys.stdin.buffer.read()
    finally:
        loop.call_soon_threadsafe(stop.set)


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM, SIGINT or the parent's exit."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    return stop


async def serve(app: web.Application) -> None:
    """Serve ``app`` on a free loopback port until stopped; say READY with the port."""
    stop = stop_event()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        loop = type(
            asyncio.get_running_loop()
        ).__module__  # (g): "uvloop" or "asyncio..."
        emit("READY", {"port": sock.getsockname()[1], "pid": os.getpid(), "loop": loop})
        try:
            await asyncio.wait_for(stop.wait(), CHILD_MAX_SECONDS)
        except asyncio.TimeoutError:
            pass
    finally:
        await runner.cleanup()


async def role_server(spec: Json) -> None:
    """sms-compat itself, built by ``create_app`` from a config mapping."""
    from compat_server.app import create_app
    from compat_server.config import parse_config

    config = parse_config(spec["config"])
    app = create_app(config, background=spec.get("background", True))
    if not spec.get("profile"):
        await serve(app)
        return
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        await serve(app)
    finally:
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).strip_dirs()
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        Path(spec["profile"]).write_text(text.getvalue())


async def role_bare(spec: Json) -> None:
    """The baseline of (a): a bare aiohttp handler answering a constant text."""
    reply = spec.get("text", "STATUS_WAIT_CODE")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=reply)

    app = web.Application()
    app.router.add_route("*", API, handler)
    await serve(app)


async def role_fake(spec: Json) -> None:
    """A fake upstream from ``fakes``, with a stats route for the benchmark.

    ``GET /__bench__/stats`` answers the calls seen per path (ids folded to ``{id}``),
    the last parameters per path, and how many TCP connections were opened.
    """
    kind = spec["kind"]
    fake: Any
    if kind == "thuecodesim":
        from fakes.thuecodesim import FakeThuecodesim

        fake = FakeThuecodesim()
        fake.balance = 10**15
    elif kind == "smsman":
        from fakes.smsman import FakeSmsman

        fake = FakeSmsman()
        fake.balance = Decimal(10**12)
    elif kind == "smspva":
        from fakes.smspva import FakeSmspva

        fake = FakeSmspva()
        fake.balance = 1e12
    else:
        raise BenchError(f"unknown fake {kind!r}")
    seen: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
    opened = [0]

    @web.middleware
    async def count_connections(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        transport = request.transport
        if transport is not None and transport not in seen:
            seen.add(transport)
            opened[0] += 1
        return await handler(request)

    async def stats(request: web.Request) -> web.Response:
        counts: Counter[str] = Counter()
        last: dict[str, dict[str, str]] = {}
        for path, params in fake.calls:
            folded = re.sub(r"/\d+(?=/|$)", "/{id}", path)
            counts[folded] += 1
            last[folded] = params
        body = {"calls": dict(counts), "last": last, "connections": opened[0]}
        return web.json_response(body)

    fake.app.middlewares.append(count_connections)
    fake.app.router.add_get(STATS_PATH, stats)
    await serve(fake.app)


async def role_loadgen(spec: Json) -> None:
    """An aiohttp load generator: closed loop, or one client per URL at a fixed rate.

    Closed loop (``connections``): that many workers send back to back to ``url``.
    Paced (``urls`` and ``interval``): one client per URL sends every ``interval``
    seconds, starting at a random offset within ``stagger`` seconds. Both stop after
    ``duration`` seconds and print ``RESULT`` with counts, latencies and CPU time.
    """
    duration = float(spec["duration"])
    interval: float | None = spec.get("interval")
    urls: list[str] = spec.get("urls") or [spec["url"]] * int(spec["connections"])
    expect = spec.get("expect", "")
    latencies: list[float] = []
    finished: list[float] = []  # monotonic completion times
    errors = Counter[str]()
    # ``limit``: connections shared by the clients (default one each)
    connector = aiohttp.TCPConnector(
        limit=spec.get("limit", len(urls)), limit_per_host=0
    )
    timeout = aiohttp.ClientTimeout(total=10)
    rng = random.Random(1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(url: str) -> None:
            started = time.perf_counter()
            try:
                async with session.get(url) as response:
                    body = await response.text()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                return
            latencies.append(time.perf_counter() - started)
            finished.append(time.monotonic())
            if response.status != 200 or not body.startswith(expect):
                errors[f"reply {response.status} {body[:40]}"] += 1

        async def closed_loop(url: str, end: float) -> None:
            while time.monotonic() < end:
                await one(url)

        async def paced(url: str, step: float, start: float, end: float) -> None:
            due = start + rng.uniform(0, float(spec.get("stagger", step)))
            while True:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() >= end:
                    return
                await one(url)
                due = max(due + step, time.monotonic())  # late: no burst to catch up

        emit("READY", {"pid": os.getpid()})
        cpu0, start = time.process_time(), time.monotonic()
        end = start + duration
        if interval is None:
            await asyncio.gather(*(closed_loop(u, end) for u in urls))
        else:
            await asyncio.gather(*(paced(u, interval, start, end) for u in urls))
        wall = time.monotonic() - start
        cpu = time.process_time() - cpu0
    low, high = spec.get("window", (0.0, duration))
    in_window = sum(1 for t in finished if low <= t - start < high)
    emit(
        "RESULT",
        {
            "requests": len(latencies),
            "window_rps": in_window / (high - low),
            "errors": dict(errors),
            "wall": wall,
            "rps": len(latencies) / wall,
            "cpu_seconds": cpu,
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p90_ms": percentile(latencies, 0.9) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
        },
    )


async def role_client_cpu(spec: Json) -> None:
    """(e): CPU seconds per 1000 upstream calls: httpx (the app's upstream client until
    issue 9; still the webhooks'), aiohttp, and the app's UpstreamHttp over aiohttp."""
    from compat_server.app import make_http_client, make_upstream_client
    from compat_server.config import Config

    url, params = spec["url"], spec["params"]
    count, rounds = int(spec["requests"]), int(spec["rounds"])
    stats_url = spec["stats_url"]
    config = Config()
    emit("READY", {"pid": os.getpid()})
    results: list[Json] = []
    session_timeout = aiohttp.ClientTimeout(
        total=config.read_timeout, connect=config.connect_timeout
    )
    async with (
        make_http_client(config) as hx,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            timeout=session_timeout,
            headers={"User-Agent": "sms-compat/0.1"},
        ) as session,
        aiohttp.ClientSession() as control,
        make_upstream_client(config) as ours,
    ):

        async def via_httpx() -> None:
            response = await hx.get(url, params=params)
            if response.status_code != 200 or not response.content:
                raise BenchError(f"httpx got HTTP {response.status_code}")

        async def via_aiohttp() -> None:
            async with session.get(url, params=params) as response:
                body = await response.read()
                if response.status != 200 or not body:
                    raise BenchError(f"aiohttp got HTTP {response.status}")

        async def via_ours() -> None:
            status, body = await ours.request("bench", "GET", url, params=params)
            if status != 200 or not body:
                raise BenchError(f"UpstreamHttp got HTTP {status}")

        async def connections() -> int:
            async with control.get(stats_url) as response:
                return int((await response.json())["connections"])

        async def run(
            call: Callable[[], Awaitable[None]], n: int, workers: int
        ) -> None:
            left = [n]

            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await call()

            await asyncio.gather(*(worker() for _ in range(workers)))

        calls = {"httpx": via_httpx, "aiohttp": via_aiohttp, "ours": via_ours}
        for concurrency in spec["concurrency"]:
            for round_no in range(rounds):
                for lib, call in calls.items():
                    await run(call, max(100, count // 5), concurrency)  # warm the pool
                    opened = await connections()
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    await run(call, count, concurrency)
                    cpu = time.process_time() - cpu0
                    wall = time.perf_counter() - wall0
                    results.append(
                        {
                            "lib": lib,
                            "concurrency": concurrency,
                            "round": round_no,
                            "requests": count,
                            "cpu_s_per_1000": cpu / count * 1000,
                            "wall_s": wall,
                            "new_connections": await connections() - opened,
                        }
                    )
    emit("RESULT", {"runs": results, "sniffio": _has_module("sniffio")})


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


ROLES: dict[str, Callable[[Json], Coroutine[Any, Any, None]]] = {
    "server": role_server,
    "bare": role_bare,
    "fake": role_fake,
    "loadgen": role_loadgen,
    "client-cpu": role_client_cpu,
}


def child_main(role: str, spec_path: str) -> int:
    """Entry point of a child process: ``run.py --child ROLE SPEC.json``."""
    logging.basicConfig(level=logging.WARNING)  # INFO off, as in production
    spec = json.loads(Path(spec_path).read_text())
    with asyncio.Runner(loop_factory=_loop_factory(spec)) as runner:  # (g): uvloop
        runner.run(ROLES[role](spec))
    return 0


# ==== the parent's side of a child ======================================================


@dataclass
class Child:
    """One child process (server, fake or load generator); use ``async with``."""

    role: str
    spec: Json
    cpus: set[int] | None
    logdir: Path
    live: set[int]  # pids of running children, for the CPU accounting of Window
    ready: Json = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        """Base URL of a child that serves HTTP."""
        return f"http://{HOST}:{self.ready['port']}"

    async def __aenter__(self) -> Child:
        cpus = self.cpus
        stem = f"{self.role}-{time.monotonic_ns()}"
        self._log_path = self.logdir / f"{stem}.log"
        spec_path = self.logdir / f"{stem}.json"
        spec_path.write_text(json.dumps(self.spec))

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(self._log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--child", self.role,
                str(spec_path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log, preexec_fn=pin, start_new_session=True, cwd=str(ROOT),
            )  # fmt: skip
        self.live.add(self.proc.pid)
        try:
            self.ready = await self.message("READY", START_TIMEOUT)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def message(self, kind: str, timeout: float) -> Json:
        """Wait for the child's next ``kind`` line; BenchError if it dies first."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.role}: no {kind} within {timeout:.0f}s")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except asyncio.TimeoutError:
                raise BenchError(
                    f"{self.role}: no {kind} within {timeout:.0f}s"
                ) from None
            if not line:
                tail = self._log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"{self.role} exited before {kind}:\n{tail}")
            if line.startswith(kind.encode() + b" "):
                result: Json = json.loads(line[len(kind) + 1 :])
                return result

    async def stop(self) -> None:
        """Close stdin, SIGTERM, and SIGKILL after 10 s; always reaps the child."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
        except ProcessLookupError:
            pass
        except BaseException:  # cancelled (Ctrl-C) while waiting: do not leave it
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        finally:
            self.live.discard(proc.pid)


@dataclass
class Run:
    """What every measurement needs: mode, scratch directory, core sets."""

    quick: bool
    tmp: Path
    server_cpus: set[int] | None
    load_cpus: set[int] | None
    profile_dir: Path | None = None  # --profile: servers run under cProfile
    live: set[int] = field(default_factory=set)
    foreign: dict[str, float] = field(default_factory=dict)  # label -> cores

    def child(
        self, role: str, spec: Json, load: bool = False, pin: bool = True
    ) -> Child:
        """A child on the server's core, or (``load``) on the load generator's core.

        ``pin=False`` lets it run on any core (latency at concurrency 1: a process pinned
        to a core that another program keeps busy waits for its turn).
        """
        cpus = (self.load_cpus if load else self.server_cpus) if pin else None
        return Child(
            role, spec, cpus or set(os.sched_getaffinity(0)), self.tmp, self.live
        )

    def store(self, name: str) -> str:
        """A fresh store path (on the real disk: durability costs are included)."""
        return str(self.tmp / f"{name}.sqlite3")

    def server(self, config: Json, name: str, pin: bool = True) -> Child:
        """sms-compat under test, as in production (background loops on)."""
        spec: Json = {"config": config, "background": True}
        if self.profile_dir is not None:
            spec["profile"] = str(self.profile_dir / f"profile-{name}.txt")
        return self.child("server", spec, pin=pin)

    def our_cpu_seconds(self) -> float:
        """CPU seconds used so far by this process and every child, live or reaped."""
        total = time.process_time()
        for pid in list(self.live):
            try:
                total += proc_cpu_seconds(pid)
            except OSError:
                pass
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + usage.ru_utime + usage.ru_stime

    async def quiet(self) -> None:
        """Wait (3 s at most in --quick, else 6 s) for other programs to go idle.

        Other programs' load is sampled over half-second steps; the wait ends at the
        first step where they used less than a tenth of a core.
        """
        deadline = time.monotonic() + (3.0 if self.quick else 6.0)
        while time.monotonic() < deadline:
            window = Window(self, "")
            await asyncio.sleep(0.5)
            if window.cores() < 0.1:
                return

    def window(self, label: str) -> Window:
        """Start watching how much CPU other programs take until ``Window.close``."""
        return Window(self, label)


class Window:
    """CPU used by processes outside this benchmark during one measurement.

    Other programs on the machine (say, test suites) slow the servers down; the figure
    is kept in the report so that a noisy run can be told from a slow server.
    """

    def __init__(self, run: Run, label: str) -> None:
        self.run = run
        self.label = label
        self.started = time.monotonic()
        self.busy = machine_busy_seconds()
        self.ours = run.our_cpu_seconds()

    def cores(self) -> float:
        """Average cores used by other processes since the start."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        busy = machine_busy_seconds() - self.busy
        ours = self.run.our_cpu_seconds() - self.ours
        return max(0.0, (busy - ours) / elapsed)

    def close(self) -> float:
        """:meth:`cores`, also recorded in the report under the window's label."""
        cores = self.cores()
        self.run.foreign[self.label] = cores
        return cores


async def get_text(client: httpx.AsyncClient, url: str, **params: Any) -> str:
    """GET and return the body; BenchError unless HTTP 200."""
    response = await client.get(url, params=params or None)
    if response.status_code != 200:
        raise BenchError(f"GET {url} -> HTTP {response.status_code}")
    return response.text


async def fake_stats(client: httpx.AsyncClient, fake: Child) -> Json:
    """The fake's call counts and connection count."""
    response = await client.get(fake.url + STATS_PATH)
    result: Json = response.json()
    return result


# ==== (a) getStatus throughput from the store ===========================================


async def wrk(
    url: str, connections: int, seconds: float, cpus: set[int] | None
) -> Json:
    """One wrk run: requests/s and latency percentiles; BenchError on any error."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        url,
    ]
    if cpus and shutil.which("taskset"):
        command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rps is None:
        raise BenchError(f"wrk output not understood:\n{text}")
    errors = re.search(r"Non-2xx or 3xx responses: .*|Socket errors: .*", text)
    if errors is not None:
        raise BenchError(f"wrk against {url}: {errors.group(0)}")
    result: Json = {"rps": float(rps.group(1)), "errors": 0}
    for name, fraction in (("p50_ms", "50"), ("p99_ms", "99")):
        found = re.search(rf"^\s+{fraction}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if found:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
            result[name] = float(found.group(1)) * scale
    return result


async def closed_load(run: Run, url: str, connections: int, seconds: float) -> Json:
    """The fallback load generator (no wrk): one aiohttp client process."""
    spec = {"url": url, "connections": connections, "duration": seconds}
    async with run.child("loadgen", spec, load=True) as gen:
        return await gen.message("RESULT", seconds + 60)


async def throughput(
    run: Run, target: Child, url: str, seconds: float, label: str, warm_up: bool = False
) -> Json:
    """Load ``url`` for ``seconds``; adds CPU shares: server, generator, others.

    A warm-up leaves no trace in the report of other programs' load.
    """
    connections = 64
    window = run.window(label)
    cpu0 = proc_cpu_seconds(target.pid)
    wall0 = time.monotonic()
    if shutil.which("wrk"):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = await wrk(url, connections, seconds, run.load_cpus)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["generator_cpu_s"] = (after.ru_utime + after.ru_stime) - (
            before.ru_utime + before.ru_stime
        )
        result["generator"] = f"wrk -t1 -c{connections}"
    else:
        result = await closed_load(run, url, connections, seconds)
        if result["errors"]:
            raise BenchError(f"load against {url}: {result['errors']}")
        result["generator_cpu_s"] = result["cpu_seconds"]
        result["generator"] = f"aiohttp client, {connections} connections"
    wall = time.monotonic() - wall0
    server_cpu = proc_cpu_seconds(target.pid) - cpu0
    result["server_cpu_share"] = server_cpu / wall
    result["rps_per_server_cpu_s"] = result["rps"] * wall / max(server_cpu, 1e-9)
    result["generator_cpu_share"] = result["generator_cpu_s"] / wall
    result["foreign_cores"] = window.cores() if warm_up else window.close()
    return result


NOISY_CORES = 0.25  # other programs' load above which an (a) pair of rounds is redone


async def measure_a(run: Run) -> Json:
    """(a) getStatus answered from the store vs a bare aiohttp handler, requests/s.

    After a warm-up of each server, short rounds come in pairs (app and bare back to
    back, the order alternating), so that both sides of a ratio see the same machine:
    on a shared virtual machine the speed drifts by tens of percent within a minute.
    A pair during which other programs used more than ``NOISY_CORES`` is redone (one
    extra pair at most with ``--quick``, two otherwise). The ratio is the median of
    the quiet pairs' ratios (of all pairs if none was quiet).
    """
    seconds, warm = (2.0, 2.0) if run.quick else (3.0, 5.0)
    wanted = 3 if run.quick else 8
    config = sandbox_config(run.store("a"))
    async with run.server(config, "a") as app, run.child("bare", {}) as bare:
        async with httpx.AsyncClient() as client:
            body = await get_text(
                client, app.url + API, api_key=KEY, action="getNumber", service="tg",
                country=10,
            )  # fmt: skip
            if not body.startswith("ACCESS_NUMBER:"):
                raise BenchError(f"getNumber answered {body!r}")
            ident = body.split(":")[1]
            query = f"{API}?api_key={KEY}&action=getStatus&id={ident}"
            for server in (app, bare):  # the first getStatus polls; later ones don't
                reply = await get_text(client, server.url + query)
                if reply != "STATUS_WAIT_CODE":
                    raise BenchError(f"getStatus answered {reply!r}")
        servers = {"app": app, "bare": bare}
        for name, server in servers.items():
            url = server.url + query
            await throughput(
                run, server, url, warm, f"(a) warm-up {name}", warm_up=True
            )
        pairs: list[dict[str, Any]] = []
        most = wanted + (1 if run.quick else 2)
        while len(pairs) < most and sum(p["clean"] for p in pairs) < wanted:
            await run.quiet()
            pair: dict[str, Any] = {}
            order = ("app", "bare") if len(pairs) % 2 == 0 else ("bare", "app")
            for name in order:
                server = servers[name]
                label = f"(a) {name} pair {len(pairs) + 1}"
                pair[name] = await throughput(
                    run, server, server.url + query, seconds, label
                )
            noise = max(pair["app"]["foreign_cores"], pair["bare"]["foreign_cores"])
            pair["clean"] = noise < NOISY_CORES
            pair["ratio"] = pair["app"]["rps"] / pair["bare"]["rps"]
            pair["ratio_per_cpu_s"] = (
                pair["app"]["rps_per_server_cpu_s"]
                / pair["bare"]["rps_per_server_cpu_s"]
            )
            pairs.append(pair)
    used = [p for p in pairs if p["clean"]] or pairs

    def median(name: str, key: str) -> float:
        return float(statistics.median(p[name][key] for p in used))

    app_cpu, bare_cpu = (median(n, "rps_per_server_cpu_s") for n in ("app", "bare"))
    ratios = [p["ratio"] for p in used]
    return {
        "app_rps": median("app", "rps"),
        "bare_rps": median("bare", "rps"),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_per_cpu_s": statistics.median(p["ratio_per_cpu_s"] for p in used),
        "bare_server_cpu_share": median("bare", "server_cpu_share"),
        "app_cpu_us_per_request": 1e6 / app_cpu,
        "bare_cpu_us_per_request": 1e6 / bare_cpu,
        "seconds": seconds,
        "pairs_used": len(used),
        "pairs_clean": sum(1 for p in pairs if p["clean"]),
        "pairs": pairs,
    }


# ==== (b) forwarding latency per provider ===============================================


@dataclass(frozen=True)
class Direct:
    """How to call a fake's buy and poll endpoints directly, as the provider does."""

    buy_path: str
    buy_params: dict[str, str]
    headers: dict[str, str]
    poll: Callable[[str], tuple[str, dict[str, str]]]  # order id -> (path, params)
    order_id: Callable[[Json], str]  # buy answer -> order id


def direct_calls(kind: str) -> Direct:
    """The fake's endpoints for ``kind``, with the parameters the provider sends."""
    if kind == "thuecodesim":
        from fakes import thuecodesim

        tg = next(s for s in thuecodesim.SERVICES["vn"] if s["name"] == "Telegram")
        token = thuecodesim.TOKEN
        return Direct(
            "/request/getv2",
            {"serviceId": str(tg["id"]), "country": "vn", "token": token},
            {},
            lambda i: ("/session/getv2", {"requestId": i, "token": token}),
            lambda body: str(body["data"]["request_id"]),
        )
    if kind == "smsman":
        from fakes import smsman

        return Direct(
            "/control/get-number",
            {"token": smsman.TOKEN, "country_id": "7", "application_id": "3"},
            {},
            lambda i: ("/control/get-sms", {"token": smsman.TOKEN, "request_id": i}),
            lambda body: str(body["request_id"]),
        )
    if kind == "smspva":
        from fakes import smspva

        return Direct(
            "/activation/number/VN/opt29",
            {},
            {"apikey": smspva.API_KEY},
            lambda i: (f"/activation/sms/{i}", {}),
            lambda body: str(body["data"]["orderId"]),
        )
    raise BenchError(f"unknown provider {kind!r}")


def fake_options(kind: str, url: str) -> Json:
    """The provider options of ``fakes`` for ``kind``, polling allowed always."""
    from fakes import smsman, smspva, thuecodesim

    module: Any = {"thuecodesim": thuecodesim, "smsman": smsman, "smspva": smspva}[kind]
    options: Json = module.provider_options(url)
    options.update(poll_interval=0, min_interval=0)
    if kind != "smsman":  # (b), (c): every poll is one activation's (not (h), (i))
        options["batch_poll"] = False
    return options


async def timed(call: Awaitable[httpx.Response]) -> tuple[float, httpx.Response]:
    """Milliseconds an awaited request took, and its response (body read)."""
    started = time.perf_counter()
    response = await call
    return (time.perf_counter() - started) * 1000, response


def spread(values: Sequence[float]) -> Json:
    """Median and p90 of a list of milliseconds."""
    return {"median_ms": statistics.median(values), "p90_ms": percentile(values, 0.9)}


async def measure_provider(run: Run, kind: str, count: int) -> Json:
    """getNumber and getStatus through ``kind`` vs the fake's endpoints called directly.

    Requests are sequential (concurrency 1) and alternate between the two paths. Every
    getStatus goes to a fresh activation, so each one makes exactly one upstream poll
    whatever the provider's poll floor (smspva keeps at least 5 s); the fake's call log
    confirms the count. Nothing is pinned to a core here (see Run.child).
    """
    direct = direct_calls(kind)
    async with run.child("fake", {"kind": kind}, pin=False) as fake:
        config = upstream_config(
            run.store(f"b-{kind}"), kind, fake_options(kind, fake.url)
        )
        server_child = run.server(config, f"b-{kind}", pin=False)
        async with server_child as server, httpx.AsyncClient(timeout=20) as client:
            api = server.url + API
            await run.quiet()
            window = run.window(f"(b) {kind}")
            cpu: dict[str, float] = {}

            def get_number() -> Awaitable[httpx.Response]:
                return client.get(api, params={"api_key": KEY, "action": "getNumber",
                                               "service": "tg", "country": "10"})  # fmt: skip

            def get_status(ident: str) -> Awaitable[httpx.Response]:
                return client.get(api, params={"api_key": KEY, "action": "getStatus",
                                               "id": ident})  # fmt: skip

            def buy() -> Awaitable[httpx.Response]:
                return client.get(fake.url + direct.buy_path, params=direct.buy_params,
                                  headers=direct.headers)  # fmt: skip

            def poll(order: str) -> Awaitable[httpx.Response]:
                path, params = direct.poll(order)
                return client.get(
                    fake.url + path, params=params, headers=direct.headers
                )

            samples: dict[str, list[float]] = {
                "getNumber": [], "buy": [], "getStatus": [], "poll": []
            }  # fmt: skip
            ours: list[str] = []
            theirs: list[str] = []
            warm = 10 if run.quick else 30
            for index in range(warm + count):
                if index == warm:
                    cpu["getNumber"] = proc_cpu_seconds(server.pid)
                pair = [(get_number(), "getNumber"), (buy(), "buy")]
                for awaitable, name in pair if index % 2 else pair[::-1]:
                    ms, response = await timed(awaitable)
                    if name == "getNumber":
                        if not response.text.startswith("ACCESS_NUMBER:"):
                            raise BenchError(f"{kind} getNumber: {response.text!r}")
                        ours.append(response.text.split(":")[1])
                    else:
                        theirs.append(direct.order_id(response.json()))
                    if index >= warm:
                        samples[name].append(ms)
            cpu["getNumber"] = proc_cpu_seconds(server.pid) - cpu["getNumber"]
            before = await fake_stats(client, fake)
            last_buy = before["last"].get(BUY_PATH[kind], {})
            if last_buy != direct.buy_params:
                raise BenchError(f"{kind}: server bought with {last_buy}")
            for index, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
                if index == warm:
                    cpu["getStatus"] = proc_cpu_seconds(server.pid)
                pair = [(get_status(mine), "getStatus"), (poll(other), "poll")]
                for awaitable, name in pair if index % 2 else pair[::-1]:
                    ms, response = await timed(awaitable)
                    if name == "getStatus" and response.text != "STATUS_WAIT_CODE":
                        raise BenchError(f"{kind} getStatus: {response.text!r}")
                    if name == "poll" and response.status_code not in (200, 202):
                        raise BenchError(f"{kind} poll: HTTP {response.status_code}")
                    if index >= warm:
                        samples[name].append(ms)
            cpu["getStatus"] = proc_cpu_seconds(server.pid) - cpu["getStatus"]
            after = await fake_stats(client, fake)
            foreign = window.close()
    poll_path = POLL_PATH[kind]
    polls = after["calls"].get(poll_path, 0) - before["calls"].get(poll_path, 0)
    calls = len(ours)
    if polls != 2 * calls:  # ours and the direct ones
        raise BenchError(f"{kind}: {polls} upstream polls for {calls} getStatus")
    result: Json = {
        "requests_per_op": count,
        "upstream_polls_per_getStatus": 1.0,
        "foreign_cores": foreign,
    }
    for op, base in (("getNumber", "buy"), ("getStatus", "poll")):
        via, plain = spread(samples[op]), spread(samples[base])
        result[op] = {
            "via_server": via,
            "direct": plain,
            "server_cpu_ms_per_request": cpu[op] / count * 1000,
            "added_median_ms": via["median_ms"] - plain["median_ms"],
            "added_p90_ms": via["p90_ms"] - plain["p90_ms"],
        }
    return result


async def measure_b(run: Run) -> Json:
    """(b) for every provider."""
    count = 100 if run.quick else 300
    return {
        "providers": {
            kind: await measure_provider(run, kind, count) for kind in PROVIDERS
        }
    }


# ==== (c) upstream polls under many polling clients =====================================


async def measure_c(run: Run) -> Json:
    """(c) 200 clients x 5 getStatus/s on 200 activations: upstream polls counted.

    The fake is thuecodesim at the provider's default poll interval (3 s). Clients
    start at random offsets within one interval so that the polls of different
    activations are spread over it; the polls are counted in the fake's call log over a
    window that starts after every client's first getStatus, so the first (immediate)
    poll of each activation is left out.
    """
    from providers.thuecodesim import ThuecodesimProvider

    clients, rate = 200, 5.0
    span = 8.0 if run.quick else 15.0
    poll_interval = ThuecodesimProvider.default_poll_interval
    async with run.child("fake", {"kind": "thuecodesim"}, load=True) as fake:
        options = fake_options("thuecodesim", fake.url)
        del options["poll_interval"]  # the provider's default
        config = upstream_config(run.store("c"), "thuecodesim", options)
        server_child = run.server(config, "c")
        async with server_child as server, httpx.AsyncClient(timeout=20) as client:
            api = server.url + API
            semaphore = asyncio.Semaphore(8)

            async def buy() -> str:
                async with semaphore:
                    body = await get_text(client, api, api_key=KEY, action="getNumber",
                                          service="tg", country=10)  # fmt: skip
                if not body.startswith("ACCESS_NUMBER:"):
                    raise BenchError(f"getNumber answered {body!r}")
                return body.split(":")[1]

            ids = await asyncio.gather(*(buy() for _ in range(clients)))
            settle = poll_interval + 1.5
            urls = [f"{api}?api_key={KEY}&action=getStatus&id={i}" for i in ids]
            await run.quiet()
            spec = {"urls": urls, "interval": 1 / rate, "stagger": poll_interval,
                    "duration": settle + span + 0.5, "window": (settle, settle + span),
                    "expect": "STATUS_WAIT_CODE"}  # fmt: skip
            async with run.child("loadgen", spec, load=True) as gen:
                await asyncio.sleep(settle)
                first = await fake_stats(client, fake)
                window = run.window("(c)")
                cpu0 = proc_cpu_seconds(server.pid)
                await asyncio.sleep(span)
                server_cpu = proc_cpu_seconds(server.pid) - cpu0
                second = await fake_stats(client, fake)
                foreign = window.close()
                measured = time.monotonic() - window.started
                load = await gen.message("RESULT", settle + span + 60)
    if load["errors"]:
        raise BenchError(f"(c) failed requests: {load['errors']}")
    path = POLL_PATH["thuecodesim"]
    polls = second["calls"].get(path, 0) - first["calls"].get(path, 0)
    per_activation = polls / clients / measured
    return {
        "clients": clients,
        "requests_per_client_per_s": rate,
        "offered_rps": clients * rate,
        "poll_interval_s": poll_interval,
        "window_s": measured,
        "upstream_polls": polls,
        "polls_per_activation_per_s": per_activation,
        "target_per_activation_per_s": 1 / poll_interval,
        "ratio": per_activation * poll_interval,
        "server_cpu_share": server_cpu / measured,
        "foreign_cores": foreign,
        "load": load,
    }


# ==== (d) resident memory with 10,000 activations =======================================


async def prefill(path: str, count: int) -> tuple[float, list[int]]:
    """Store ``count`` open sandbox activations through the Store API: (seconds taken,
    their ids; a new store's ids start from the clock)."""
    from compat_server.config import key_id
    from compat_server.store import NewActivation, SqliteStore
    from providers.vocabulary import Order, Purchase

    started = time.perf_counter()
    store = await SqliteStore.open(path)
    ids = []
    try:
        order = Order(service="tg", country=10)
        now = time.time()
        for index in range(count):
            purchase = Purchase(str(500_000_000 + index), f"84{900_000_000 + index}",
                                Decimal("18.00"))  # fmt: skip
            stored = await store.complete_purchase(None, NewActivation(
                key_id(KEY), "sandbox", "RUB", order, purchase, Decimal("18.00"),
                now, 86_400.0,
            ))  # fmt: skip
            ids.append(stored.id)
    finally:
        await store.close()
    return time.perf_counter() - started, ids


async def hammer(urls: Sequence[str], workers: int, expect: str) -> int:
    """GET every URL once with ``workers`` keep-alive connections; errors counted."""
    errors = 0
    queue = list(reversed(urls))
    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            while queue:
                url = queue.pop()
                async with session.get(url) as response:
                    body = await response.text()
                if response.status != 200 or not body.startswith(expect):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    return errors


async def settled_rss(pid: int) -> float:
    """RSS after a short pause (lets the last requests' buffers go)."""
    await asyncio.sleep(1.0)
    return proc_rss_mb(pid)


async def measure_d(run: Run) -> Json:
    """(d) RSS with 10,000 open activations vs the same server with an empty store.

    Both servers get the same warm-up traffic (getBalance, getPrices and getStatus of an
    unknown id, none of which stores anything). The full one is started on a store
    prefilled through the Store API, and then every activation is asked for its status
    once, which creates the engine's per-activation poll bookkeeping.
    """
    count = 10_000
    full_path = run.store("d-full")
    fill_seconds, stored_ids = await prefill(full_path, count)
    warm = 1000 if run.quick else 2000
    warm_urls = []
    for index in range(warm):
        action = ("getBalance", "getPrices&country=10", "getStatus&id=1")[index % 3]
        warm_urls.append(f"{API}?api_key={KEY}&action={action}")
    result: Json = {"activations": count, "prefill_s": fill_seconds}
    for name, path in (("empty", run.store("d-empty")), ("full", full_path)):
        async with run.server(sandbox_config(path), f"d-{name}") as server:
            result[f"rss_{name}_started_mb"] = await settled_rss(server.pid)
            errors = await hammer([server.url + u for u in warm_urls], 16, "")
            if name == "full":
                result["rss_full_loaded_mb"] = await settled_rss(server.pid)
                ids = stored_ids
                urls = [f"{server.url}{API}?api_key={KEY}&action=getStatus&id={i}"
                        for i in ids]  # fmt: skip
                errors += await hammer(urls, 16, "STATUS_WAIT_CODE")
            if errors:
                raise BenchError(f"(d) {errors} requests failed on the {name} server")
            result[f"rss_{name}_mb"] = await settled_rss(server.pid)
    result["ratio"] = result["rss_full_mb"] / result["rss_empty_mb"]
    result["bytes_per_activation"] = (
        (result["rss_full_mb"] - result["rss_empty_mb"]) * 1024 * 1024 / count
    )
    return result


# ==== (e) CPU per upstream call: httpx vs aiohttp =======================================


async def measure_e(run: Run) -> Json:
    """(e) CPU seconds per 1000 calls to one fake endpoint, httpx vs aiohttp.

    The calling process is a child of its own on the server's core; the fake is on the
    other core. The endpoint is thuecodesim's ``/session/getv2`` (the status poll).
    """
    from fakes.thuecodesim import TOKEN

    count = 1000 if run.quick else 3000
    async with run.child("fake", {"kind": "thuecodesim"}, load=True) as fake:
        async with httpx.AsyncClient() as client:
            bought = await client.get(
                fake.url + "/request/getv2",
                params={"serviceId": "4", "country": "vn", "token": TOKEN},
            )
            order = str(bought.json()["data"]["request_id"])
        spec = {
            "url": fake.url + "/session/getv2",
            "params": {"requestId": order, "token": TOKEN},
            "stats_url": fake.url + STATS_PATH,
            "requests": count,
            "rounds": 1 if run.quick else 2,
            "concurrency": [1, 50],
        }
        await run.quiet()
        window = run.window("(e)")
        async with run.child("client-cpu", spec) as caller:
            raw = await caller.message("RESULT", 300)
        foreign = window.close()
    result: Json = {
        "requests": count,
        "sniffio_installed": raw["sniffio"],
        "foreign_cores": foreign,
        "runs": raw["runs"],
    }
    for concurrency in (1, 50):
        best = {}
        for lib in ("httpx", "aiohttp", "ours"):
            runs = [r for r in result["runs"] if r["lib"] == lib
                    and r["concurrency"] == concurrency]  # fmt: skip
            chosen = min(runs, key=lambda r: r["cpu_s_per_1000"])
            best[lib] = chosen
        result[f"c{concurrency}"] = {
            "httpx_cpu_s_per_1000": best["httpx"]["cpu_s_per_1000"],
            "aiohttp_cpu_s_per_1000": best["aiohttp"]["cpu_s_per_1000"],
            "ratio": best["httpx"]["cpu_s_per_1000"]
            / best["aiohttp"]["cpu_s_per_1000"],
            "httpx_new_connections": best["httpx"]["new_connections"],
            "aiohttp_new_connections": best["aiohttp"]["new_connections"],
            "ours_cpu_s_per_1000": best["ours"]["cpu_s_per_1000"],
            "ours_ratio": best["ours"]["cpu_s_per_1000"]
            / best["aiohttp"]["cpu_s_per_1000"],
            "ours_new_connections": best["ours"]["new_connections"],
        }
    return result


# ==== (j) (k) 100,000 activations: restart, paging, rendered answers (issue 9, 4) =======
#
# (j) a restart on a store holding SCALE_OPEN open activations: seconds from process
#     start to listening, and resident memory; baselines in the same run: the same
#     server on an empty store, and the loading path before issue 9 (one query per
#     activation for its messages), timed in a child of its own.
# (k) on that restarted server, getActiveActivations' body and time (a page, never the
#     whole list) against getStatus; and getPrices of SCALE_SERVICES services, an answer
#     sent again as rendered against one rendered for each request (first request of
#     each of SCALE_KEYS keys, the catalog warm), server CPU per request.

SCALE_OPEN = 100_000
SCALE_SERVICES = 1_500


def scale_text(code: str) -> str:
    """The sandbox's Telegram SMS, as a stored message."""
    return (
        f"Telegram code: {code}\n\n"
        f"You can also tap on this link to log in: t.me/login/{code}"
    )


async def build_open_store(path: str, count: int) -> list[int]:
    """A store with ``count`` open sandbox activations of KEY, written in bulk (the
    schema from SqliteStore.open): 60% waiting, 30% with a code, 10% asked for another
    after a code and got it. Their ids, oldest first."""
    import sqlite3

    from compat_server.config import key_id
    from compat_server.store import SqliteStore

    store = await SqliteStore.open(path)
    await store.close()
    now = time.time()
    db = sqlite3.connect(path)
    try:
        with db:
            (seq,) = db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='activations'"
            ).fetchone()
            first, owner = seq + 1, key_id(KEY)
            rows, messages = [], []
            for index in range(count):
                ident, kind, at = first + index, index % 10, now - count + index
                state = ("wait_code" if kind < 6 else "code" if kind < 9
                         else "wait_retry")  # fmt: skip
                upstream = str(500_000_000 + index)
                rows.append((ident, owner, "sandbox", upstream, f"84{900_000_000 + index}",
                             "tg", 10, "", "18.00", "RUB", "18.00", state, "{}", at, at,
                             now + 86_400, 1 if state == "wait_retry" else 0, ""))  # fmt: skip
                for n in range({"wait_code": 0, "code": 1}.get(state, 2)):
                    code = f"{(index * 7 + n) % 1_000_000:06d}"
                    messages.append((ident, f"{upstream}:{n}", scale_text(code), code,
                                     at + n))  # fmt: skip
            db.executemany(
                "INSERT INTO activations (id, key_id, provider, upstream_id, phone,"
                " service, country, operator, price, currency, cost, state, extra,"
                " created_at, updated_at, expires_at, retry_mark, previous_ids)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            db.executemany(
                "INSERT INTO messages (activation_id, uid, text, code, received_at)"
                " VALUES (?,?,?,?,?)",
                messages,
            )
            db.execute(
                "UPDATE sqlite_sequence SET seq=? WHERE name='activations'",
                (first + count - 1,),
            )
    finally:
        db.close()
    return list(range(first, first + count))


async def role_legacy_load(spec: Json) -> None:
    """The loading path before issue 9, timed: every open activation read with one
    more query for its messages (what a restart did). Says RESULT with the seconds."""
    import aiosqlite

    from compat_server.store import Activation, Message

    emit("READY", {"pid": os.getpid()})
    started = time.perf_counter()
    loaded = 0
    async with aiosqlite.connect(spec["path"]) as db:
        db.row_factory = aiosqlite.Row
        async with db.execute(
            "SELECT * FROM activations WHERE state IN ('wait_code','code','wait_retry')"
            " LIMIT ?",
            (spec["limit"],),
        ) as cur:
            rows = list(await cur.fetchall())
        for row in rows:
            activation = Activation(
                row["id"], row["key_id"], row["provider"], row["upstream_id"],
                row["phone"], row["service"], row["country"], row["operator"],
                Decimal(row["price"]), row["currency"], Decimal(row["cost"]),
                row["state"], row["created_at"], row["updated_at"], row["expires_at"],
                json.loads(row["extra"]), [], row["retry_mark"],
            )  # fmt: skip
            async with db.execute(
                "SELECT uid, text, code, received_at FROM messages"
                " WHERE activation_id=? ORDER BY id",
                (activation.id,),
            ) as cur:
                activation.messages = [Message(*m) for m in await cur.fetchall()]
            loaded += 1
    emit("RESULT", {"seconds": time.perf_counter() - started, "loaded": loaded})
    stop = stop_event()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), CHILD_MAX_SECONDS)


ROLES["legacy-load"] = role_legacy_load


async def timed_gets(
    session: aiohttp.ClientSession, urls: Sequence[str], expect: str
) -> tuple[list[float], int]:
    """GET each URL in turn: (latencies in seconds, bytes of the last body)."""
    latencies, size = [], 0
    for url in urls:
        began = time.perf_counter()
        async with session.get(url) as response:
            body = await response.read()
        latencies.append(time.perf_counter() - began)
        if response.status != 200 or not body.startswith(expect.encode()):
            raise BenchError(f"{url}: {response.status} {body[:80]!r}")
        size = len(body)
    return latencies, size


async def measure_j(run: Run) -> Json:
    """(j) restart with SCALE_OPEN open activations: seconds and MB, vs an empty
    store and vs the loading path before issue 9 (measured on a part in --quick)."""
    full = run.store("j-full")
    built = time.perf_counter()
    ids = await build_open_store(full, SCALE_OPEN)
    result: Json = {"activations": SCALE_OPEN, "build_s": time.perf_counter() - built}
    await run.quiet()
    window = run.window("(j)")
    figures: dict[str, Json] = {}
    for name, path in (("empty", run.store("j-empty")), ("full", full)):
        began = time.perf_counter()  # from process start to listening
        async with run.server(sandbox_config(path), f"j-{name}") as server:
            seconds = time.perf_counter() - began
            figures[name] = {"s": seconds, "mb": await settled_rss(server.pid)}
            if name == "full":  # every activation is there: the newest one answers
                async with aiohttp.ClientSession() as session:
                    url = f"{server.url}{API}?api_key={KEY}&action=getStatus&id="
                    await timed_gets(session, [url + str(ids[-1])], "STATUS_WAIT")
    part = 20_000 if run.quick else SCALE_OPEN
    async with run.child("legacy-load", {"path": full, "limit": part}) as legacy:
        before = await legacy.message("RESULT", 600)
    result["foreign_cores"] = window.close()
    result.update(
        empty_s=figures["empty"]["s"], empty_mb=figures["empty"]["mb"],
        restart_s=figures["full"]["s"], restart_mb=figures["full"]["mb"],
        legacy_loaded=before["loaded"], legacy_load_s=before["seconds"],
        legacy_s=before["seconds"] * SCALE_OPEN / max(before["loaded"], 1),
    )  # fmt: skip
    result["ratio_s"] = result["legacy_s"] / result["restart_s"]
    result["ratio_mb"] = result["restart_mb"] / result["empty_mb"]
    return result


def scale_catalogue_config(store_path: str, keys: int) -> Json:
    """The sandbox selling SCALE_SERVICES services in Vietnam, to ``keys`` keys."""
    services = {f"s{n:04d}": {"price": 10 + n % 90, "count": 100 + n}
                for n in range(SCALE_SERVICES)}  # fmt: skip
    config = sandbox_config(store_path)
    config["providers"]["sandbox"].update(countries=[10], services=services)
    config["keys"] = [{"key": f"{KEY}-{n}" if n else KEY, "alias": f"k{n}",
                       "providers": ["sandbox"]} for n in range(keys)]  # fmt: skip
    return config


async def measure_k(run: Run) -> Json:
    """(k) getActiveActivations with SCALE_OPEN open (a page: bytes and ms) against
    getStatus on the same server; getPrices of SCALE_SERVICES services sent again as
    rendered against rendered for each request (server CPU per request)."""
    path = run.store("k-full")
    ids = await build_open_store(path, SCALE_OPEN)
    rounds = 20 if run.quick else 60
    result: Json = {"activations": SCALE_OPEN}
    await run.quiet()
    window = run.window("(k)")
    async with run.server(sandbox_config(path), "k-full") as server:
        base = f"{server.url}{API}?api_key={KEY}&action="
        async with aiohttp.ClientSession() as session:
            await timed_gets(session, [base + "getBalance"] * 5, "ACCESS_BALANCE")
            page, page_bytes = await timed_gets(
                session, [base + "getActiveActivations"] * rounds, '{"status":"success"'
            )
            hero, hero_bytes = await timed_gets(
                session,
                [f"{base}getActiveActivations&start={n * 100}&limit=100"
                 for n in range(rounds)],
                '{"status":"success"',
            )  # fmt: skip
            status, _ = await timed_gets(
                session,
                [
                    f"{base}getStatus&id={ids[n * 997 % len(ids)]}"
                    for n in range(rounds)
                ],
                "STATUS_",
            )
        result["rss_after_pages_mb"] = await settled_rss(server.pid)
    rows = 100
    result.update(
        page_rows=rows, page_bytes=page_bytes, hero_page_bytes=hero_bytes,
        page_ms=statistics.median(page) * 1000,
        hero_page_ms=statistics.median(hero) * 1000,
        status_ms=statistics.median(status) * 1000,
        whole_list_bytes=page_bytes * SCALE_OPEN // rows,  # what one body would hold
    )  # fmt: skip
    result["page_ratio"] = result["page_ms"] / result["status_ms"]
    keys = 40 if run.quick else 150
    config = scale_catalogue_config(run.store("k-prices"), keys)
    async with run.server(config, "k-prices") as server:
        urls = [f"{server.url}{API}?api_key={k['key']}&action=getPrices&country=10"
                for k in config["keys"]]  # fmt: skip
        async with aiohttp.ClientSession() as session:
            await timed_gets(session, urls[:1] * 3, '{"10":')  # the catalog is warm
            spent = proc_cpu_seconds(server.pid)
            fresh, size = await timed_gets(session, urls[1:], '{"10":')
            render_cpu = (proc_cpu_seconds(server.pid) - spent) / len(urls[1:])
            spent = proc_cpu_seconds(server.pid)
            reuses = 300 if run.quick else 1000  # enough CPU ticks to measure
            again, _ = await timed_gets(session, urls[:1] * reuses, '{"10":')
            reuse_cpu = (proc_cpu_seconds(server.pid) - spent) / reuses
    result["foreign_cores"] = window.close()
    result["prices"] = {
        "services": SCALE_SERVICES, "body_bytes": size, "rendered": len(fresh),
        "reused": len(again),
        "rendered_rps": len(fresh) / sum(fresh), "reused_rps": len(again) / sum(again),
        "rendered_ms": statistics.median(fresh) * 1000,
        "reused_ms": statistics.median(again) * 1000,
        "rendered_cpu_ms": render_cpu * 1000, "reused_cpu_ms": reuse_cpu * 1000,
    }  # fmt: skip
    prices = result["prices"]
    prices["ratio_rps"] = prices["reused_rps"] / prices["rendered_rps"]
    prices["ratio_cpu"] = prices["rendered_cpu_ms"] / prices["reused_cpu_ms"]
    return result


def scale_rows(name: str, data: Json) -> list[Row]:
    """The table rows of (j) and (k)."""
    if name == "j":
        j = data
        return [
            Row(
                f"(j) restart, {j['activations']:,} open",
                f"{j['restart_s']:.2f} s, {j['restart_mb']:.0f} MB",
                f"{j['empty_s']:.2f} s, {j['empty_mb']:.0f} MB empty;"
                f" {j['legacy_s']:.1f} s before issue 9",
                f"{j['ratio_s']:.1f}x faster than before; {j['ratio_mb']:.2f}x empty MB",
                "<= 3 s, <= 150 MB",
                j["restart_s"] <= 3.0 and j["restart_mb"] <= 150,
            )
        ]  # fmt: skip
    if name == "k":
        k, p = data, data["prices"]
        return [
            Row(
                f"(k) getActiveActivations, {k['activations']:,} open",
                f"{k['page_bytes'] / 1024:.0f} KB, {k['page_ms']:.1f} ms p50",
                f"getStatus {k['status_ms']:.2f} ms; one body of all:"
                f" {k['whole_list_bytes'] / 2**20:.0f} MB",
                f"{k['page_rows']} rows a page; {k['page_ratio']:.1f}x getStatus",
                "bounded", k["page_bytes"] < 2**20,
            ),
            Row(
                f"(k) getPrices {p['services']:,} services, req/s",
                f"{p['reused_rps']:,.0f} reused ({p['reused_cpu_ms']:.2f} ms CPU)",
                f"{p['rendered_rps']:,.0f} rendered ({p['rendered_cpu_ms']:.2f} ms CPU)",
                f"{p['ratio_rps']:.1f}x req/s, {p['ratio_cpu']:.1f}x less CPU",
                "reused until the catalog changes", p["ratio_rps"] > 1,
            ),
        ]  # fmt: skip
    return []


# ==== (l) several servers on one PostgreSQL ==============================================
# getStatus req/s of one server and of two on one database (ratio two/one), and
# purchases per second on the sandbox, SQLite vs PostgreSQL. PostgreSQL is Debian's
# (the binaries under /usr/lib/postgresql), a cluster of its own in a temporary
# directory, durability on (as a server would run it). Everything else unpinned: two
# servers, the database and the load generators share the machine's cores.

L_CONNECTIONS = 64  # getStatus load, split over two generators
L_BUYERS = 16  # getNumber load


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@contextlib.asynccontextmanager
async def pg_cluster() -> Any:
    """A PostgreSQL server on a free loopback port; yields a superuser URL builder."""
    bindir = _pg_bin()
    if bindir is None:
        raise BenchError("(l) needs PostgreSQL: apt-get install postgresql")
    home = Path(tempfile.mkdtemp(prefix="sms-compat-bench-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses root
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(home, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]

    async def run_tool(*args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *prefix, *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise BenchError(f"(l) {Path(args[0]).name} failed: {out.decode()[-500:]}")

    data = str(home / "data")
    try:
        await run_tool(str(bindir / "initdb"), "-D", data, "-A", "trust",
                       "-U", "postgres", "-E", "UTF8")  # fmt: skip
        options = f"-h {HOST} -p {port} -k {home} -c max_connections=100"
        await run_tool(str(bindir / "pg_ctl"), "-D", data, "-o", options,
                       "-l", str(home / "log"), "-w", "start")  # fmt: skip
        try:
            yield lambda db: f"postgresql://postgres@{HOST}:{port}/{db}"
        finally:
            await run_tool(str(bindir / "pg_ctl"), "-D", data, "-m", "fast", "-w",
                           "stop")  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def _create_db(url_of: Callable[[str], str], name: str) -> str:
    import asyncpg

    admin = await asyncpg.connect(url_of("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return url_of(name)


def _store_config(store: Json) -> Json:
    config = sandbox_config("")
    config["store"] = store
    return config


async def _load(run: Run, urls: Sequence[str], seconds: float) -> float:
    """Closed-loop load on each URL of ``urls`` at once (the connections split evenly);
    total requests/s. BenchError on any error."""
    share = max(1, L_CONNECTIONS // len(urls))
    if shutil.which("wrk"):
        results = await asyncio.gather(*(wrk(u, share, seconds, None) for u in urls))
        return float(sum(r["rps"] for r in results))
    spec = {"urls": [u for u in urls for _ in range(share)], "duration": seconds}
    async with run.child("loadgen", spec, load=True, pin=False) as gen:
        result = await gen.message("RESULT", seconds + 60)
    if result["errors"]:
        raise BenchError(f"(l) load: {result['errors']}")
    return float(result["rps"])


async def _stored(store: Json) -> int:
    """How many activations the store holds (read through a connection of its own)."""
    if "url" in store:
        import asyncpg

        conn = await asyncpg.connect(store["url"])
        try:
            return int(await conn.fetchval("SELECT count(*) FROM activations"))
        finally:
            await conn.close()
    import sqlite3

    with contextlib.closing(sqlite3.connect(store["path"])) as db:
        return int(db.execute("SELECT count(*) FROM activations").fetchone()[0])


async def measure_l(run: Run) -> Json:
    """(l) getStatus req/s, one server vs two on one PostgreSQL; purchases/s (sandbox)
    on SQLite vs PostgreSQL."""
    seconds = 3.0 if run.quick else 6.0
    result: Json = {"seconds": seconds, "cpus": os.cpu_count()}
    if _pg_bin() is None:  # the other figures still count: this one says why not
        result["skipped"] = "no PostgreSQL (apt-get install postgresql)"
        return result
    async with pg_cluster() as url_of, httpx.AsyncClient(timeout=30) as client:
        status_store = {"url": await _create_db(url_of, "l_status")}
        async with run.server(_store_config(status_store), "l-a", pin=False) as a:
            bought = await get_text(client, a.url + API, api_key=KEY,
                                    action="getNumber", service="tg", country=10)  # fmt: skip
            if not bought.startswith("ACCESS_NUMBER:"):
                raise BenchError(f"(l) getNumber answered {bought}")
            ident = bought.split(":")[1]
            query = f"{API}?api_key={KEY}&action=getStatus&id={ident}"
            await _load(run, [a.url + query], 1.0)  # warm-up
            await run.quiet()
            window = run.window("l-one")
            result["one_rps"] = await _load(run, [a.url + query] * 2, seconds)
            result["one_foreign_cores"] = window.close()
            async with run.server(_store_config(status_store), "l-b", pin=False) as b:
                answer = await get_text(client, b.url + query)
                if answer != "STATUS_WAIT_CODE":
                    raise BenchError(f"(l) the second server answered {answer}")
                await _load(run, [b.url + query], 1.0)
                await run.quiet()
                window = run.window("l-two")
                result["two_rps"] = await _load(run, [a.url + query, b.url + query],
                                                seconds)  # fmt: skip
                result["two_foreign_cores"] = window.close()
        result["ratio"] = result["two_rps"] / result["one_rps"]
        stores = {
            "sqlite": {"path": run.store("l-buy")},
            "postgres": {"url": await _create_db(url_of, "l_buy")},
        }
        for name, store in stores.items():
            async with run.server(
                _store_config(store), f"l-buy-{name}", pin=False
            ) as s:
                buy = (
                    f"{s.url}{API}?api_key={KEY}&action=getNumber&service=tg&country=10"
                )
                before = await _stored(store)
                await run.quiet()
                window = run.window(f"l-buy-{name}")
                started = time.monotonic()
                share = L_BUYERS
                if shutil.which("wrk"):
                    await wrk(buy, share, seconds, None)
                else:
                    spec = {"url": buy, "connections": share, "duration": seconds}
                    async with run.child("loadgen", spec, load=True, pin=False) as g:
                        await g.message("RESULT", seconds + 60)
                wall = time.monotonic() - started
                result[f"{name}_foreign_cores"] = window.close()
                result[f"{name}_purchases_per_s"] = (
                    await _stored(store) - before
                ) / wall
        result["buy_ratio"] = (
            result["postgres_purchases_per_s"] / result["sqlite_purchases_per_s"]
        )
    return result


def rows_l(data: Json) -> list[Row]:
    """The table rows of (l)."""
    if "skipped" in data:
        return [Row("(l) several servers on PostgreSQL", "-", "-",
                    f"skipped: {data['skipped']}", "-", None)]  # fmt: skip
    return [
        Row(
            "(l) getStatus req/s, 2 servers on 1 PostgreSQL",
            f"{data['two_rps']:.0f} two", f"{data['one_rps']:.0f} one",
            f"ratio {data['ratio']:.2f} ({data['cpus']} cores)", "-", None,
        ),
        Row(
            "(l) purchases/s (sandbox), PostgreSQL",
            f"{data['postgres_purchases_per_s']:.0f} PostgreSQL",
            f"{data['sqlite_purchases_per_s']:.0f} SQLite",
            f"ratio {data['buy_ratio']:.2f}", "-", None,
        ),
    ]  # fmt: skip


# ==== (f) (g) transport: CPU per forwarded getStatus, uvloop =============================
# Issue 9 items 1 and 5. A bare forwarder (aiohttp server -> one aiohttp.ClientSession
# -> JSON -> text) and sms-compat (thuecodesim, poll_interval 0: every getStatus polls
# upstream) call the same fake; the figure is the server process's CPU seconds per
# 1,000 requests, measured in pairs of rounds as in (a).

FORWARD_CONNECTIONS = 16  # closed-loop clients, each on an activation of its own


def _loop_factory(spec: Json) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for a child whose spec says ``"event_loop": "uvloop"``."""
    if spec.get("event_loop") != "uvloop":
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def role_forwarder(spec: Json) -> None:
    """The baseline of (f): each request makes one upstream GET through one
    aiohttp.ClientSession, decodes its JSON, answers a text token."""
    upstream, params = spec["upstream"], spec["params"]
    session = aiohttp.ClientSession()

    async def handler(request: web.Request) -> web.Response:
        async with session.get(upstream, params=params) as response:
            data = json.loads(await response.read())
        if not isinstance(data, dict):
            raise web.HTTPBadGateway()
        return web.Response(text="STATUS_WAIT_CODE")

    app = web.Application()
    app.router.add_get(API, handler)

    async def close_session(app: web.Application) -> None:
        await session.close()

    app.on_cleanup.append(close_session)
    await serve(app)


async def forwarded_round(
    run: Run, target: Child, urls: list[str], fake: Child, seconds: float, label: str
) -> Json:
    """One closed-loop round against ``target``: server CPU per 1,000 requests, and
    the fake's poll count (every request must reach the upstream once)."""
    async with httpx.AsyncClient(timeout=20) as client:
        before = await fake_stats(client, fake)
        window = run.window(label)
        spec = {"urls": urls, "duration": seconds, "expect": "STATUS_WAIT_CODE"}
        cpu0 = proc_cpu_seconds(target.pid)
        async with run.child("loadgen", spec, load=True) as gen:
            load = await gen.message("RESULT", seconds + 60)
        cpu = proc_cpu_seconds(target.pid) - cpu0
        foreign = window.close()
        after = await fake_stats(client, fake)
    if load["errors"]:
        raise BenchError(f"{label}: failed requests {load['errors']}")
    path = POLL_PATH["thuecodesim"]
    polls = after["calls"].get(path, 0) - before["calls"].get(path, 0)
    requests = int(load["requests"])
    return {
        "requests": requests,
        "rps": load["rps"],
        "server_cpu_s": cpu,
        "cpu_s_per_1000": cpu / max(requests, 1) * 1000,
        "upstream_polls_per_request": polls / max(requests, 1),
        "p50_ms": load["p50_ms"],
        "foreign_cores": foreign,
    }


async def forwarding_pairs(
    run: Run, sides: dict[str, tuple[Child, list[str]]], fake: Child, tag: str
) -> Json:
    """Warm each side, then rounds in pairs, order alternating; the median of the
    per-pair ratios (first side over second) of CPU per 1,000 requests."""
    seconds = 2.0 if run.quick else 4.0
    wanted = 3 if run.quick else 6
    names = list(sides)
    for name, (child, urls) in sides.items():
        await forwarded_round(run, child, urls, fake, 1.0, f"({tag}) warm-up {name}")
    pairs: list[Json] = []
    most = wanted + (1 if run.quick else 2)
    while len(pairs) < most and sum(p["clean"] for p in pairs) < wanted:
        await run.quiet()
        pair: Json = {}
        order = names if len(pairs) % 2 == 0 else names[::-1]
        for name in order:
            child, urls = sides[name]
            label = f"({tag}) {name} pair {len(pairs) + 1}"
            pair[name] = await forwarded_round(run, child, urls, fake, seconds, label)
        noise = max(pair[n]["foreign_cores"] for n in names)
        pair["clean"] = noise < NOISY_CORES
        pair["ratio"] = (
            pair[names[0]]["cpu_s_per_1000"] / pair[names[1]]["cpu_s_per_1000"]
        )
        pairs.append(pair)
    used = [p for p in pairs if p["clean"]] or pairs
    result: Json = {
        "ratio": statistics.median(p["ratio"] for p in used),
        "ratio_min": min(p["ratio"] for p in used),
        "ratio_max": max(p["ratio"] for p in used),
        "pairs_used": len(used),
        "pairs_clean": sum(1 for p in pairs if p["clean"]),
        "seconds": seconds,
        "connections": FORWARD_CONNECTIONS,
        "pairs": pairs,
    }
    for name in names:
        for key in ("cpu_s_per_1000", "rps", "p50_ms", "upstream_polls_per_request"):
            result[f"{name}_{key}"] = statistics.median(p[name][key] for p in used)
    return result


async def buy_for_status(
    client: httpx.AsyncClient, server: Child, count: int
) -> list[str]:
    """``count`` activations on ``server``; a getStatus URL for each."""
    api = server.url + API
    urls = []
    for _ in range(count):
        body = await get_text(client, api, api_key=KEY, action="getNumber",
                              service="tg", country=10)  # fmt: skip
        if not body.startswith("ACCESS_NUMBER:"):
            raise BenchError(f"getNumber answered {body!r}")
        urls.append(f"{api}?api_key={KEY}&action=getStatus&id={body.split(':')[1]}")
        reply = await get_text(client, urls[-1])
        if reply != "STATUS_WAIT_CODE":
            raise BenchError(f"getStatus answered {reply!r}")
    return urls


def app_spec(run: Run, config: Json, name: str, event_loop: str = "asyncio") -> Json:
    """The server role's spec (as Run.server builds it) on the given event loop."""
    spec: Json = {"config": config, "background": True, "event_loop": event_loop}
    if run.profile_dir is not None:
        spec["profile"] = str(run.profile_dir / f"profile-{name}.txt")
    return spec


async def fake_order(fake: Child) -> Json:
    """Buy one order on the thuecodesim fake directly; its poll parameters."""
    from fakes.thuecodesim import TOKEN

    async with httpx.AsyncClient() as client:
        bought = await client.get(
            fake.url + "/request/getv2",
            params={"serviceId": "4", "country": "vn", "token": TOKEN},
        )
    return {"requestId": str(bought.json()["data"]["request_id"]), "token": TOKEN}


async def measure_f(run: Run) -> Json:
    """(f) Server CPU per forwarded getStatus: sms-compat vs the bare forwarder."""
    async with run.child("fake", {"kind": "thuecodesim"}, load=True) as fake:
        options = fake_options("thuecodesim", fake.url)  # poll_interval 0, min 0
        config = upstream_config(run.store("f"), "thuecodesim", options)
        forwarder_spec = {"upstream": fake.url + POLL_PATH["thuecodesim"],
                          "params": await fake_order(fake)}  # fmt: skip
        async with (
            run.child("server", app_spec(run, config, "f")) as app,
            run.child("forwarder", forwarder_spec) as bare,
        ):
            async with httpx.AsyncClient(timeout=20) as client:
                app_urls = await buy_for_status(client, app, FORWARD_CONNECTIONS)
            bare_urls = [bare.url + API] * FORWARD_CONNECTIONS
            sides = {"app": (app, app_urls), "bare": (bare, bare_urls)}
            result = await forwarding_pairs(run, sides, fake, "f")
    for name in ("app", "bare"):
        polls = result[f"{name}_upstream_polls_per_request"]
        if not 0.99 <= polls <= 1.01:
            raise BenchError(f"(f) {name}: {polls:.3f} upstream polls per request")
    return result


async def measure_g(run: Run) -> Json:
    """(g) uvloop: (f)'s figure for sms-compat on uvloop vs asyncio's loop, and
    getStatus from the store (as (a)) req/s on each loop."""
    if importlib.util.find_spec("uvloop") is None:
        return {"skipped": "uvloop is not installed (pip install '.[uvloop]')"}
    import uvloop

    result: Json = {"uvloop": uvloop.__version__}
    async with run.child("fake", {"kind": "thuecodesim"}, load=True) as fake:
        options = fake_options("thuecodesim", fake.url)
        sides: dict[str, tuple[Child, list[str]]] = {}
        async with contextlib.AsyncExitStack() as stack:
            for loop in ("uvloop", "asyncio"):
                config = upstream_config(run.store(f"g-{loop}"), "thuecodesim", options)
                spec = app_spec(run, config, f"g-{loop}", loop)
                child = await stack.enter_async_context(run.child("server", spec))
                if not child.ready["loop"].startswith(loop):
                    raise BenchError(f"(g) asked for {loop}, got {child.ready['loop']}")
                async with httpx.AsyncClient(timeout=20) as client:
                    urls = await buy_for_status(client, child, FORWARD_CONNECTIONS)
                sides[loop] = (child, urls)
            result["forwarded"] = await forwarding_pairs(run, sides, fake, "g")
    seconds = 2.0 if run.quick else 3.0
    rounds = 3 if run.quick else 5
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[str, Child] = {}
        for loop in ("uvloop", "asyncio"):
            spec = app_spec(run, sandbox_config(run.store(f"g-store-{loop}")),
                            f"g-store-{loop}", loop)  # fmt: skip
            servers[loop] = await stack.enter_async_context(run.child("server", spec))
        async with httpx.AsyncClient(timeout=20) as client:
            query = {loop: (await buy_for_status(client, child, 1))[0]
                     for loop, child in servers.items()}  # fmt: skip
        for loop, child in servers.items():
            await throughput(run, child, query[loop], 1.0, f"(g) warm-up {loop}", True)
        pairs = []
        for index in range(rounds):
            await run.quiet()
            order = ("uvloop", "asyncio") if index % 2 == 0 else ("asyncio", "uvloop")
            pair = {}
            for loop in order:
                pair[loop] = await throughput(
                    run,
                    servers[loop],
                    query[loop],
                    seconds,
                    f"(g) store {loop} {index}",
                )
            pair["ratio"] = pair["uvloop"]["rps"] / pair["asyncio"]["rps"]
            pair["ratio_per_cpu_s"] = (
                pair["uvloop"]["rps_per_server_cpu_s"]
                / pair["asyncio"]["rps_per_server_cpu_s"]
            )
            pairs.append(pair)
    result["store"] = {
        "uvloop_rps": statistics.median(p["uvloop"]["rps"] for p in pairs),
        "asyncio_rps": statistics.median(p["asyncio"]["rps"] for p in pairs),
        "ratio": statistics.median(p["ratio"] for p in pairs),
        "ratio_min": min(p["ratio"] for p in pairs),
        "ratio_max": max(p["ratio"] for p in pairs),
        "ratio_per_cpu_s": statistics.median(p["ratio_per_cpu_s"] for p in pairs),
        "uvloop_per_cpu_s": statistics.median(
            p["uvloop"]["rps_per_server_cpu_s"] for p in pairs
        ),
        "asyncio_per_cpu_s": statistics.median(
            p["asyncio"]["rps_per_server_cpu_s"] for p in pairs
        ),
        "uvloop_server_cpu_share": statistics.median(
            p["uvloop"]["server_cpu_share"] for p in pairs
        ),
        "pairs": pairs,
    }
    return result


def transport_rows(name: str, data: Json) -> list[Row]:
    """The table rows of (f) and (g)."""
    if name == "f":
        f = data
        return [
            Row(
                "(f) server CPU per forwarded getStatus",
                f"{f['app_cpu_s_per_1000']:.3f} s/1000 app",
                f"{f['bare_cpu_s_per_1000']:.3f} s/1000 bare forwarder",
                f"ratio {f['ratio']:.2f} (pairs {f['ratio_min']:.2f}-{f['ratio_max']:.2f},"
                f" {f['pairs_clean']}/{len(f['pairs'])} quiet)",
                "<= 2.0", f["ratio"] <= 2.0,
            )
        ]  # fmt: skip
    if "skipped" in data:
        return [Row("(g) uvloop", "-", "-", f"SKIPPED: {data['skipped']}", "-", None)]
    fw, st = data["forwarded"], data["store"]
    return [
        Row(
            "(g) CPU per forwarded getStatus, uvloop",
            f"{fw['uvloop_cpu_s_per_1000']:.3f} s/1000 uvloop",
            f"{fw['asyncio_cpu_s_per_1000']:.3f} s/1000 asyncio",
            f"ratio {fw['ratio']:.2f} (pairs {fw['ratio_min']:.2f}-{fw['ratio_max']:.2f})",
            "-", None,
        ),
        Row(
            "(g) getStatus from store, req/s, uvloop",
            f"{st['uvloop_rps']:,.0f} uvloop", f"{st['asyncio_rps']:,.0f} asyncio",
            f"ratio {st['ratio']:.2f} (pairs {st['ratio_min']:.2f}-{st['ratio_max']:.2f});"
            f" per server CPU s {st['ratio_per_cpu_s']:.2f}",
            "-", None,
        ),
    ]  # fmt: skip


ROLES["forwarder"] = role_forwarder


# ==== (h) (i) batch polling: upstream calls and staleness with many open numbers ========
# Issue 9 items 2 and 3. A fake of each backend holds N open orders (made in the fake
# itself, ids from BATCH_FIRST_ID); the server's store is prefilled with the matching
# activations through the Store API (provider "up"), so nothing is bought. (h) counts
# every call the fake sees while 1,000 clients each ask getStatus once per poll
# interval; (i) holds 10,000 and measures how long an SMS delivered upstream takes to
# show in getStatus, and the server's CPU, while the batch poller polls them all.

BATCH_FIRST_ID = 500_000_000
BATCH_KINDS = ("thuecodesim", "smspva", "handler_api", "smsman")  # smsman: no list call


def _batch_fake(kind: str) -> Any:
    """The fake of ``kind`` with money enough for anything."""
    if kind == "thuecodesim":
        from fakes.thuecodesim import FakeThuecodesim

        return FakeThuecodesim()
    if kind == "smspva":
        from fakes.smspva import FakeSmspva

        return FakeSmspva()
    if kind == "handler_api":
        from fakes.handler_api import FakeSmsActivate

        return FakeSmsActivate()
    if kind == "smsman":
        from fakes.smsman import FakeSmsman

        return FakeSmsman()
    raise BenchError(f"unknown fake {kind!r}")


def _batch_order(kind: str, order_id: str, now: float) -> Any:
    """One open order as the fake of ``kind`` keeps it (Telegram, the provider's way)."""
    from fakes.common import FakeOrder

    if kind == "thuecodesim":
        from fakes.thuecodesim import SERVICES

        tg = next(s for s in SERVICES["vn"] if s["name"] == "Telegram")
        return FakeOrder(order_id, str(tg["id"]), "vn", "912" + order_id[-6:],
                         tg["price"], created=now)  # fmt: skip
    if kind == "smspva":
        from fakes.smspva import FakeSmspvaOrder

        return FakeSmspvaOrder(order_id, "opt29", "RU", "98" + order_id[-8:], 0.35,
                               created=now)  # fmt: skip
    if kind == "handler_api":
        return FakeOrder(order_id, "tg", "10", "849" + order_id[-8:], 12.5, created=now)
    return FakeOrder(order_id, "3", "7", "849" + order_id[-8:], 18, created=now)


async def role_batch_fake(spec: Json) -> None:
    """A fake holding ``count`` open orders; ``POST /__bench__/deliver?count=K`` gives
    K random waiting orders an SMS (their ids back), the stats route counts calls."""
    kind, count = spec["kind"], int(spec["count"])
    fake = _batch_fake(kind)
    now = time.time()
    for index in range(count):
        order_id = str(BATCH_FIRST_ID + index)
        fake.orders[order_id] = _batch_order(kind, order_id, now)
    waiting = list(fake.orders)
    rng = random.Random(9)
    rng.shuffle(waiting)

    async def deliver(request: web.Request) -> web.Response:
        ids = [waiting.pop() for _ in range(min(int(request.query["count"]),
                                                  len(waiting)))]  # fmt: skip
        for order_id in ids:
            fake.deliver(order_id, f"Telegram code {order_id[-5:]}", order_id[-5:])
        return web.json_response({"ids": ids})

    async def stats(request: web.Request) -> web.Response:
        counts: Counter[str] = Counter()
        for path, _ in fake.calls:
            if path and not path.startswith("/__bench__"):  # "": a clone's bench route
                counts[re.sub(r"/\d+(?=/|$)", "/{id}", path)] += 1
        return web.json_response({"calls": dict(counts), "total": counts.total()})

    fake.app.router.add_post("/__bench__/deliver", deliver)
    fake.app.router.add_get(STATS_PATH, stats)
    await serve(fake.app)


def batch_options(kind: str, url: str) -> Json:
    """Provider options at the fake, each backend's own pacing and poll interval."""
    from fakes import handler_api, smsman, smspva, thuecodesim

    if kind == "handler_api":
        return handler_api.sms_activate_options(url)
    module: Any = {"thuecodesim": thuecodesim, "smsman": smsman, "smspva": smspva}[kind]
    options: Json = module.provider_options(url)
    options.pop("min_interval", None)  # the backend's real pacing (smspva 4.5 s)
    options.pop("poll_interval", None)  # its default (3 s; smspva 5 s)
    return options


async def prefill_batch(path: str, count: int) -> list[int]:
    """``count`` open activations of provider "up" whose upstream ids are the fake's."""
    from compat_server.config import key_id
    from compat_server.store import NewActivation, SqliteStore
    from providers.vocabulary import Order, Purchase

    store = await SqliteStore.open(path)
    ids = []
    try:
        order, now = Order(service="tg", country=10), time.time()
        for index in range(count):
            purchase = Purchase(str(BATCH_FIRST_ID + index), f"84{900_000_000 + index}",
                                Decimal("1"))  # fmt: skip
            stored = await store.complete_purchase(None, NewActivation(
                key_id(KEY), "up", "RUB", order, purchase, Decimal("1"), now, 86_400.0,
            ))  # fmt: skip
            ids.append(stored.id)
    finally:
        await store.close()
    return ids


_BUCKET = re.compile(
    r'^sms_compat_request_seconds_bucket\{action="getStatus",le="([^"]+)"\} (\S+)$',
    re.M,
)


async def status_buckets(
    session: aiohttp.ClientSession, url: str
) -> dict[float, float]:
    """The server's own getStatus latency histogram (cumulative counts per bound)."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    return {float(le): float(n) for le, n in _BUCKET.findall(text)}


def bucket_p99(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The bound under which 99 % of the getStatus answered between two reads fell."""
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts.get(math.inf, 0.0)
    for le, n in counts.items():
        if total and n >= 0.99 * total:
            return le
    return None


async def batch_case(
    run: Run,
    kind: str,
    template: tuple[str, list[int]],
    seconds: float,
    deliveries: float,
) -> Json:
    """One backend with the template's activations open: calls, staleness, CPU.

    Clients (a load generator on the load core, 200 connections) ask every activation
    getStatus once per poll interval, staggered. ``deliveries``: SMS per second given
    upstream to random waiting orders, each then watched with getStatus every 0.1 s
    until it shows (its staleness). Calls, CPU and client rate are counted over
    ``seconds`` after one interval (and 2 s) of settling.
    """
    path, ids = template
    store = run.store(f"batch-{kind}-{len(ids)}")
    shutil.copy(path, store)
    by_upstream = {str(BATCH_FIRST_ID + i): ident for i, ident in enumerate(ids)}
    fake_spec = {"kind": kind, "count": len(ids)}
    async with run.child("batch-fake", fake_spec, load=True) as fake:
        options = batch_options(kind, fake.url)
        config = upstream_config(store, "up", options)
        config["keys"][0]["providers"] = ["up"]
        interval = 5.0 if kind == "smspva" else 3.0  # the providers' defaults
        settle = interval + 2.0  # the first batch (or first polls) are left out
        async with run.server(config, f"batch-{kind}") as server:
            api = f"{server.url}{API}?api_key={KEY}&action=getStatus&id="
            load_spec = {"urls": [api + str(i) for i in ids], "interval": interval,
                         "stagger": interval, "limit": 200,
                         "duration": settle + seconds + 0.5,
                         "window": (settle, settle + seconds)}  # fmt: skip
            stale: list[float] = []
            async with (
                run.child("loadgen", load_spec, load=True) as gen,
                # 40 + the generator's 200: under the per-client cap of 256
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=40)
                ) as session,
            ):
                stop_at = time.monotonic() + settle + seconds

                async def watch(ident: int, since: float) -> None:
                    url = api + str(ident)
                    while time.monotonic() < stop_at + 4 * interval:
                        async with session.get(url) as response:
                            if (await response.text()).startswith("STATUS_OK"):
                                stale.append(time.monotonic() - since)
                                return
                        await asyncio.sleep(0.1)

                async def deliver() -> list[asyncio.Task[None]]:
                    watchers: list[asyncio.Task[None]] = []
                    await asyncio.sleep(settle)
                    step = max(1.0, 1.0 / deliveries) if deliveries else 0.0
                    while deliveries and time.monotonic() < stop_at - 2 * interval:
                        count = max(1, round(deliveries * step))
                        async with session.post(
                            f"{fake.url}/__bench__/deliver", params={"count": count}
                        ) as response:
                            got = (await response.json())["ids"]
                        since = time.monotonic()
                        watchers += [asyncio.create_task(watch(by_upstream[u], since))
                                     for u in got]  # fmt: skip
                        await asyncio.sleep(step)
                    return watchers

                delivering = asyncio.create_task(deliver())
                await asyncio.sleep(settle)
                async with session.get(fake.url + STATS_PATH) as response:
                    first = await response.json()
                served = await status_buckets(session, server.url)
                window = run.window(f"({'h' if deliveries == 0 else 'i'}) {kind}")
                cpu0 = proc_cpu_seconds(server.pid)
                await asyncio.sleep(seconds)
                cpu = proc_cpu_seconds(server.pid) - cpu0
                async with session.get(fake.url + STATS_PATH) as response:
                    second = await response.json()
                p99_bound = bucket_p99(
                    served, await status_buckets(session, server.url)
                )
                measured = time.monotonic() - window.started
                foreign = window.close()
                await asyncio.gather(*(await delivering))
                load = await gen.message("RESULT", settle + seconds + 60)
    calls = {k: v - first["calls"].get(k, 0) for k, v in second["calls"].items()}
    total = second["total"] - first["total"]
    return {
        "activations": len(ids),
        "poll_interval_s": interval,
        "window_s": measured,
        "upstream_calls": total,
        "calls_by_path": {k: v for k, v in calls.items() if v},
        "calls_per_s": total / measured,
        "per_activation_per_s": len(ids) / interval,
        "server_cores": cpu / measured,
        "client_rps": load["window_rps"],
        "client_errors": load["errors"],
        "client_p99_ms": load["p99_ms"],
        # the server's own view: a bucket bound of its histogram (0.005 ... 30 s)
        "server_getstatus_p99_le_s": p99_bound,
        "sms_delivered": len(stale),
        "staleness_p50_s": percentile(stale, 0.5) if stale else None,
        "staleness_p99_s": percentile(stale, 0.99) if stale else None,
        "foreign_cores": foreign,
    }


async def measure_h(run: Run) -> Json:
    """(h) upstream calls/s with 1,000 open activations per backend, clients polling."""
    count = 1000
    path = run.store("h-template")
    template = (path, await prefill_batch(path, count))
    seconds = 6.0 if run.quick else 20.0
    result: Json = {}
    for kind in BATCH_KINDS:
        result[kind] = await batch_case(run, kind, template, seconds, 0.0)
    return result


async def measure_i(run: Run) -> Json:
    """(i) 10,000 open activations, polled by the batch poller where the backend lists
    orders (one by one on sms-man): staleness and CPU."""
    count = 10_000
    path = run.store("i-template")
    started = time.perf_counter()
    template = (path, await prefill_batch(path, count))
    result: Json = {"prefill_s": time.perf_counter() - started}
    seconds = 10.0 if run.quick else 30.0
    rates = {"thuecodesim": 5.0, "handler_api": 5.0, "smspva": 0.1, "smsman": 5.0}
    # sms-man has no list call: its 10,000 numbers are polled one by one (3,333 a
    # second at 3 s), the case batch polling cannot help
    for kind in ("thuecodesim", "handler_api", "smspva", "smsman"):
        # smspva's pacing (4.5 s) lets one SMS be fetched every other slot: a slower
        # rate, watched twice as long
        span = seconds * (2 if kind == "smspva" else 1)
        result[kind] = await batch_case(run, kind, template, span, rates[kind])
    return result


def batch_rows(name: str, data: Json) -> list[Row]:
    """The table rows of (h) and (i)."""
    rows = []
    for kind, per in data.items():
        if not isinstance(per, dict):
            continue
        interval = per["poll_interval_s"]
        if name == "h":
            # a list call per interval: at most one more than the window's intervals
            batches = per["upstream_calls"] / (per["window_s"] / interval + 1)
            rows.append(Row(
                f"(h) upstream calls/s, 1,000 open, {kind}",
                f"{per['calls_per_s']:.2f}",
                f"{per['per_activation_per_s']:.0f} (1000/poll_interval)",
                f"ratio {per['calls_per_s'] / per['per_activation_per_s']:.4f}",
                "1 call/interval (listed)",
                None if kind == "smsman" else batches <= 1.0,
            ))  # fmt: skip
        else:
            p99 = per["staleness_p99_s"]
            shown = "-" if p99 is None else f"{p99:.2f} s (n={per['sms_delivered']})"
            rows.append(Row(
                f"(i) 10,000 open, {kind}: staleness p99 / CPU",
                f"{shown} / {per['server_cores']:.2f} cores",
                f"{2 * interval:.0f} s (2 x poll_interval) / 1 core",
                f"{per['calls_per_s']:.2f} upstream calls/s,"
                f" {per['client_rps']:,.0f} getStatus/s",
                "<= 2 x interval, < 1 core",
                p99 is not None and p99 <= 2 * interval and per["server_cores"] < 1.0,
            ))  # fmt: skip
    return rows


ROLES["batch-fake"] = role_batch_fake


# ==== report ============================================================================


@dataclass
class Row:
    """One line of the figure table."""

    figure: str
    measured: str
    baseline: str
    result: str
    target: str
    met: bool | None


def rows_for(name: str, data: Json) -> list[Row]:
    """The table rows of one measurement."""
    if name in ("h", "i"):
        return batch_rows(name, data)
    if name in ("j", "k"):
        return scale_rows(name, data)
    if name == "l":
        return rows_l(data)
    if name == "a":
        a = data
        result = (
            f"ratio {a['ratio']:.2f} (pairs {a['ratio_min']:.2f}-{a['ratio_max']:.2f},"
            f" {a['pairs_clean']}/{len(a['pairs'])} quiet)"
        )
        met: bool | None = a["ratio"] >= 0.5
        if a["bare_server_cpu_share"] < 0.9:  # the load generator was the bottleneck
            result += (
                f"; NOT JUDGED: bare server at {a['bare_server_cpu_share']:.0%} CPU"
            )
            met = None
        return [
            Row(
                "(a) getStatus from store, req/s",
                f"{a['app_rps']:,.0f} app", f"{a['bare_rps']:,.0f} bare aiohttp",
                result, ">= 0.5", met,
            )
        ]  # fmt: skip
    if name == "b":
        rows = []
        for kind, per in data["providers"].items():
            for op in ("getNumber", "getStatus"):
                item = per[op]
                via, plain = item["via_server"], item["direct"]
                rows.append(
                    Row(
                        f"(b) {op} via {kind}, ms p50/p90",
                        f"{via['median_ms']:.2f}/{via['p90_ms']:.2f}",
                        f"{plain['median_ms']:.2f}/{plain['p90_ms']:.2f} direct",
                        f"+{item['added_median_ms']:.2f} ms p50"
                        f" (server CPU {item['server_cpu_ms_per_request']:.2f} ms)",
                        "<= +1 ms p50", item["added_median_ms"] <= 1.0,
                    )
                )  # fmt: skip
        return rows
    if name == "c":
        c = data
        return [
            Row(
                "(c) upstream polls /activation/s",
                f"{c['polls_per_activation_per_s']:.3f}",
                f"{c['target_per_activation_per_s']:.3f} (1/poll_interval)",
                f"ratio {c['ratio']:.2f}", "<= 1/poll_interval", c["ratio"] <= 1.0,
            ),
            Row(
                "(c)   getStatus served, req/s",
                f"{c['load']['window_rps']:,.0f} (p99 {c['load']['p99_ms']:.1f} ms)",
                f"{c['offered_rps']:,.0f} offered",
                f"ratio {c['load']['window_rps'] / c['offered_rps']:.2f}", "-", None,
            ),
        ]  # fmt: skip
    if name == "d":
        d = data
        return [
            Row(
                "(d) RSS, 10,000 activations",
                f"{d['rss_full_mb']:.1f} MB", f"{d['rss_empty_mb']:.1f} MB empty",
                f"ratio {d['ratio']:.2f}, {d['bytes_per_activation']:,.0f} B/act",
                "< 100 MB", d["rss_full_mb"] < 100,
            )
        ]  # fmt: skip
    if name in ("f", "g"):
        return transport_rows(name, data)
    if name == "e":
        rows = []
        for concurrency in (1, 50):
            e = data[f"c{concurrency}"]
            rows.append(
                Row(
                    f"(e) CPU s/1000 calls, conc {concurrency}",
                    f"{e['httpx_cpu_s_per_1000']:.3f} httpx",
                    f"{e['aiohttp_cpu_s_per_1000']:.3f} aiohttp",
                    f"ratio {e['ratio']:.2f}", "-", None,
                )
            )  # fmt: skip
            rows.append(
                Row(
                    f"(e)   UpstreamHttp, conc {concurrency}",
                    f"{e['ours_cpu_s_per_1000']:.3f} UpstreamHttp",
                    f"{e['aiohttp_cpu_s_per_1000']:.3f} aiohttp",
                    f"ratio {e['ours_ratio']:.2f}", "-", None,
                )
            )  # fmt: skip
        return rows
    return []


def render(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    head = ("figure", "measured", "baseline", "result", "target", "met")
    cells = [head] + [
        (r.figure, r.measured, r.baseline, r.result, r.target,
         "-" if r.met is None else ("yes" if r.met else "NO"))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


MEASUREMENTS: dict[str, Callable[[Run], Awaitable[Json]]] = {
    "a": measure_a,
    "b": measure_b,
    "c": measure_c,
    "d": measure_d,
    "e": measure_e,
    "f": measure_f,
    "g": measure_g,
    "h": measure_h,
    "i": measure_i,
    "j": measure_j,
    "k": measure_k,
    "l": measure_l,  # several servers on one PostgreSQL (its own section above)
}


async def bench(quick: bool, only: Sequence[str], out: Path, profile: bool) -> int:
    """Run the chosen measurements, print the table, write the JSON."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    server_cpus, load_cpus = cpu_sets()
    with tempfile.TemporaryDirectory(prefix="sms-compat-bench-") as scratch:
        profile_dir = out.parent if profile else None
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
        run = Run(quick, Path(scratch), server_cpus, load_cpus, profile_dir)
        figures: Json = {}
        rows: list[Row] = []
        started = time.monotonic()
        for name in only:
            t0 = time.monotonic()
            print(f"measuring ({name}) ...", flush=True)
            figures[name] = await MEASUREMENTS[name](run)
            figures[name]["elapsed_s"] = time.monotonic() - t0
            rows.extend(rows_for(name, figures[name]))
        elapsed = time.monotonic() - started
    table = render(rows)
    print()
    print(table)
    print(f"\n{'quick' if quick else 'full'} run, {elapsed:.0f} s")
    busiest = max(run.foreign.values(), default=0.0)
    if busiest > 0.1:
        label = max(run.foreign, key=lambda k: run.foreign[k])
        print(
            f"note: other programs used up to {busiest:.2f} cores during a measurement"
            f" ({label}); the machine was not idle, latencies are inflated"
        )
    if profile:
        print(
            f"profiles (cProfile, figures distorted by it): {out.parent}/profile-*.txt"
        )
    report = {
        "mode": "quick" if quick else "full",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": elapsed,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "httpx": httpx.__version__,
            "httpcore": importlib.metadata.version("httpcore"),
            "aiosqlite": importlib.metadata.version("aiosqlite"),
            "load_generator": "wrk" if shutil.which("wrk") else "aiohttp client",
            "server_cpus": sorted(server_cpus or []),
            "load_cpus": sorted(load_cpus or []),
        },
        "figures": figures,
        "foreign_cores": run.foreign,
        "profiled": profile,
        "table": table,
        "targets_met": all(r.met for r in rows if r.met is not None),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # fakes, and the project if not installed
    if args[:1] == ["--child"]:
        return child_main(args[1], args[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about one minute")
    parser.add_argument(
        "--only", default=",".join(MEASUREMENTS), help="figures, e.g. a,c"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the servers under cProfile; write profile-*.txt beside --out",
    )
    options = parser.parse_args(args)
    only = [name.strip() for name in options.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in MEASUREMENTS]
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(unknown)}")
    try:
        return asyncio.run(bench(options.quick, only, options.out, options.profile))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every child process was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
