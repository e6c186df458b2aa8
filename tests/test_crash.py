"""Crash safety: SIGKILL the real server in the middle of a burst of paid purchases.

The server runs as a subprocess against a fake smspva served in the test's loop; the
fake is slow on purchases (each buy is recorded, then answered after a growing delay),
so that when the kill lands some numbers have reached the client and others were sold
upstream without the answer ever getting back. A second server on the same database
must reconcile: every number the fake sold ends up stored exactly once, and either
belongs to the client (who got ``ACCESS_NUMBER`` for it) or is cancelled upstream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp import web

from compat_server.config import key_id
from fakes.smspva import FakeSmspva, provider_options
from tests.conftest import API, KEY

ROOT = Path(__file__).resolve().parent.parent
BURST = 40
KILL_AFTER_ANSWERS = 3  # ACCESS_NUMBER bodies the client holds before the kill
FIRST_DELAY = 0.04  # seconds the fake holds its first purchase answer
DELAY_STEP = 0.015  # ... and each later one longer: answers trickle back
STALLED = 3  # the last buys of the burst reach the fake but are never served...
STALL = 1.5  # ... until they are refused (NO_NUMBERS) this long after the kill
SETTLE_TIMEOUT = 10.0
LINGER = 1.0  # seconds watched after settling (about three reconcile rounds)
WORKERS = {"outbox_interval": 0.2, "sweep_interval": 0.5, "reconcile_interval": 0.3}


class SlowSmspva(FakeSmspva):
    """A fake smspva that records each purchase, then holds the answer a while.

    The last ``STALLED`` buys of the burst sell nothing: they hang, then are refused,
    like an upstream that never got round to the request.
    """

    def __init__(self) -> None:
        super().__init__()
        self.holding: set[str] = set()  # sold, answer not yet sent
        self.buys = 0  # buy requests received
        self.stalled = 0  # buy requests hanging without a sale
        self.orders_delay = 0.0  # seconds each ``orders`` listing takes
        self.listings = 0  # ``orders`` listings started
        # the burst is over at the kill: a buy after it is served, whatever its rank
        # (a slower store may not have sent every buy of the burst before the kill)
        self.bursting = True

    async def act_number(self, request: web.Request) -> web.Response:
        self.buys += 1
        if self.bursting and BURST - STALLED < self.buys <= BURST:
            self.stalled += 1
            try:
                await asyncio.sleep(STALL)
            finally:
                self.stalled -= 1
            return self._act(502, error="Number not found")
        before = set(self.orders)
        response = await super().act_number(request)
        sold = set(self.orders) - before
        if not sold:
            return response
        (order_id,) = sold
        self.holding.add(order_id)
        try:
            await asyncio.sleep(FIRST_DELAY + DELAY_STEP * (len(self.orders) - 1))
        finally:
            self.holding.discard(order_id)
        return response

    async def act_orders(self, request: web.Request) -> web.Response:
        self.listings += 1
        response = await super().act_orders(request)  # the listing as of the call
        await asyncio.sleep(self.orders_delay)
        return response


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One ``python -m compat_server serve`` subprocess, output to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}{API}"
        self._out = log.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        path = [str(ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        command = [sys.executable, "-m", "compat_server", "serve"]
        command += ["--config", str(config), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, env=env
        )

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        """Poll getBalance until the server answers (8 s at most)."""
        deadline = time.monotonic() + 8.0
        params = {"api_key": KEY, "action": "getBalance"}
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.output()}"
            try:
                async with session.get(
                    self.url, params=params, timeout=aiohttp.ClientTimeout(total=1.0)
                ) as resp:
                    if (await resp.text()).startswith("ACCESS_BALANCE:"):
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            assert time.monotonic() < deadline, f"server not ready:\n{self.output()}"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)

    def stop(self) -> int:
        """SIGTERM, then wait (SIGKILL if it hangs); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"SIGTERM ignored:\n{self.output()}") from None
        return int(self.proc.returncode)

    def close(self) -> None:
        try:
            self.kill()
        finally:
            self._out.close()

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text("utf-8", errors="replace")


TABLES = ("activations", "purchases", "outbox")


async def read_store(db: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every row of the tables that matter, through a connection of its own
    (read-only for SQLite); ``db`` is the config's store section."""
    if "url" in db:
        pg = await asyncpg.connect(db["url"])
        try:
            return {
                name: [
                    dict(r) for r in await pg.fetch(f"SELECT * FROM {name} ORDER BY id")
                ]
                for name in TABLES
            }
        finally:
            await pg.close()
    conn = sqlite3.connect(f"file:{db['path']}?mode=ro", uri=True, timeout=2.0)
    try:
        conn.row_factory = sqlite3.Row
        return {
            name: [dict(r) for r in conn.execute(f"SELECT * FROM {name} ORDER BY id")]
            for name in TABLES
        }
    finally:
        conn.close()


async def get_number(session: aiohttp.ClientSession, url: str) -> str:
    params = {"api_key": KEY, "action": "getNumber", "service": "tg", "country": "10"}
    timeout = aiohttp.ClientTimeout(total=5)
    async with session.get(url, params=params, timeout=timeout) as resp:
        return await resp.text()


@dataclass
class Crash:
    """A fake upstream, a database, and what the client got before the kill."""

    fake: SlowSmspva
    db: dict[str, Any]  # the config's store section
    config: Path
    tmp: Path
    session: aiohttp.ClientSession
    servers: list[Server] = field(default_factory=list)
    answered: dict[int, str] = field(default_factory=dict)  # activation id -> phone
    held_at_kill: set[str] = field(default_factory=set)  # answer not even sent
    stalled_at_kill = 0  # buys in flight that sold nothing

    def start(self, name: str) -> Server:
        server = Server(self.config, self.tmp / f"{name}.log")
        self.servers.append(server)
        return server

    def report(self, store: dict[str, list[dict[str, Any]]]) -> str:
        return (
            f"\nactivations={store['activations']}\npurchases={store['purchases']}"
            f"\noutbox={store['outbox']}"
            f"\nfake={[(o.id, o.phone, o.state, o.calls) for o in self.fake.orders.values()]}"
            f"\nanswered={self.answered} held_at_kill={sorted(self.held_at_kill)}"
            f" stalled_at_kill={self.stalled_at_kill}"
        )

    async def unsettled(self) -> list[str]:
        """Why reconciliation is not finished yet ([] once it is)."""
        try:
            store = await read_store(self.db)
        except (sqlite3.Error, asyncpg.PostgresError, OSError) as exc:
            return [f"store unreadable: {exc}"]
        stored = {row["upstream_id"]: row for row in store["activations"]}
        reasons = []
        for order in self.fake.orders.values():
            row = stored.get(order.id)
            if row is None:
                reasons.append(f"order {order.id} not stored")
            elif row["state"] == "cancelled" and "cancelorder" not in order.calls:
                reasons.append(f"order {order.id} not cancelled upstream yet")
        reasons += [f"op {r['id']} queued" for r in store["outbox"] if not r["done"]]
        reasons += [
            f"attempt {r['id']} pending"
            for r in store["purchases"]
            if r["state"] == "pending"
        ]
        return reasons

    async def settle(self, server: Server) -> None:
        """Wait (bounded) until every order the fake sold is stored and resolved."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while reasons := await self.unsettled():
            assert server.proc.poll() is None, f"server died:\n{server.output()}"
            assert time.monotonic() < deadline, (
                f"reconciliation did not settle: {reasons}\n{server.output()}"
            )
            await asyncio.sleep(0.1)


@pytest.fixture
async def crash(
    store_section: dict[str, Any], aiohttp_server: Any, tmp_path: Path
) -> AsyncIterator[Crash]:
    """Run a server, fire a burst of getNumber, SIGKILL it while buys are in flight
    (on SQLite, and on PostgreSQL: there the second server finds the first one's
    PENDING attempts by its liveness lock, which died with it)."""
    fake = SlowSmspva()
    upstream = await aiohttp_server(fake.app, host="127.0.0.1")
    db = store_section
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": db,
        "activation": {"lifetime": 1200, "early_cancel": 0},
        "currency": {"display": "USD"},
        "keys": [{"key": KEY, "alias": "tester", "providers": ["pva"]}],
        "providers": {"pva": provider_options(str(upstream.make_url("")).rstrip("/"))},
        "upstream": {"connect_timeout": 2, "read_timeout": 5},
        "workers": WORKERS,
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw), "utf-8")
    connector = aiohttp.TCPConnector(limit=BURST + 10)
    async with aiohttp.ClientSession(connector=connector) as session:
        state = Crash(fake, db, config, tmp_path, session)
        try:
            await burst_and_kill(state)
            yield state
        finally:
            for server in state.servers:
                server.close()


async def burst_and_kill(crash: Crash) -> None:
    first = crash.start("first")
    await first.wait_ready(crash.session)
    results: list[str | BaseException] = [""] * BURST

    async def one(index: int) -> None:
        try:
            results[index] = await get_number(crash.session, first.url)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            results[index] = exc

    def numbers() -> list[str]:
        return [r for r in results if isinstance(r, str) and r.startswith("ACCESS_NUM")]

    tasks = [asyncio.create_task(one(i)) for i in range(BURST)]
    try:
        deadline = time.monotonic() + 5.0
        fake = crash.fake
        while (
            len(numbers()) < KILL_AFTER_ANSWERS or not fake.holding or not fake.stalled
        ):
            assert time.monotonic() < deadline, (
                f"no moment to kill: {results} holding={fake.holding}\n{first.output()}"
            )
            await asyncio.sleep(0.002)
        first.kill()
        fake.bursting = False
        crash.held_at_kill = set(fake.holding)
        crash.stalled_at_kill = fake.stalled
    finally:
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    crash.answered = {int(b.split(":")[1]): b.split(":")[2] for b in numbers()}
    assert len(crash.answered) >= KILL_AFTER_ANSWERS
    assert crash.held_at_kill, "no purchase was in flight when the kill landed"
    others = [r for r in results if r not in numbers()]
    # nothing but ACCESS_NUMBER or a broken connection (no NO_NUMBERS, no ERROR_SQL)
    assert all(isinstance(r, BaseException) for r in others), others
    phones = set(crash.answered.values())
    unanswered = [
        o
        for o in crash.fake.orders.values()
        if not any(p.endswith(o.phone) for p in phones)
    ]
    assert unanswered, "every order sold reached the client"


async def test_sigkill_mid_burst_loses_no_number(crash: Crash) -> None:
    fake = crash.fake
    second = crash.start("second")
    await second.wait_ready(crash.session)
    await crash.settle(second)
    await asyncio.sleep(LINGER)  # later rounds must not store or cancel anything more
    assert second.stop() == 0, second.output()

    # ---- the verdict, purchase by purchase -------------------------------------------
    store = await read_store(crash.db)
    report = crash.report(store)
    by_upstream: dict[str, list[dict[str, Any]]] = {}
    for row in store["activations"]:
        by_upstream.setdefault(row["upstream_id"], []).append(row)
    assert set(by_upstream) <= set(fake.orders), "a stored order nobody sold" + report
    cancel_ops = {
        row["activation_id"] for row in store["outbox"] if row["op"] == "cancel"
    }
    kept = cancelled = stored_unanswered = 0
    for order in fake.orders.values():
        rows = by_upstream.get(order.id, [])
        assert len(rows) == 1, f"order {order.id} stored {len(rows)} times" + report
        (row,) = rows
        assert row["key_id"] == key_id(KEY) and row["provider"] == "pva", report
        assert row["phone"].endswith(order.phone), report
        if row["id"] in crash.answered:
            # (a) the client's number: alive on both sides, never cancelled
            assert crash.answered[row["id"]] == row["phone"], report
            assert row["state"] == "wait_code", report
            assert order.state == "waiting" and "cancelorder" not in order.calls, report
            kept += 1
        elif row["state"] == "cancelled":
            # (b) an orphan found by reconciliation, cancelled upstream by the outbox
            assert order.state == "cancelled", report
            assert order.calls.count("cancelorder") == 1, report
            assert row["id"] in cancel_ops, report
            cancelled += 1
        else:
            # stored before the kill, answer lost on the way: open, the sweeper's
            assert row["state"] == "wait_code", report
            assert order.id not in crash.held_at_kill, report
            assert "cancelorder" not in order.calls, report
            stored_unanswered += 1
        if order.id in crash.held_at_kill:  # the server cannot have stored it
            assert row["state"] == "cancelled", report
    assert cancelled >= len(crash.held_at_kill) >= 1, report
    assert kept == len(crash.answered), report
    # every ACCESS_NUMBER the client got is a stored activation with that phone
    stored = {row["id"]: row for row in store["activations"]}
    for ident, phone in crash.answered.items():
        assert ident in stored and stored[ident]["phone"] == phone, report
    # every attempt is resolved and owns at most one activation
    owners = [r["activation_id"] for r in store["purchases"] if r["activation_id"]]
    assert len(owners) == len(set(owners)), report
    assert not [r for r in store["purchases"] if r["state"] == "pending"], report
    assert all(row["done"] for row in store["outbox"]), report
    for server in crash.servers:
        assert "Traceback" not in server.output(), server.output()
    print(
        f"kept={kept} cancelled={cancelled} stored-unanswered={stored_unanswered}"
        f" sold={len(fake.orders)} attempts={len(store['purchases'])}"
    )


async def test_purchase_after_crash_restart_is_not_taken_for_an_orphan(
    crash: Crash,
) -> None:
    """A client buys while the restarted server is still reconciling the crash.

    The crash leaves attempts of unknown outcome that the reconciler keeps looking up;
    a number bought meanwhile is the client's, not an orphan to cancel.
    """
    fake = crash.fake
    second = crash.start("second")
    await second.wait_ready(crash.session)
    await crash.settle(second)
    store = await read_store(crash.db)
    lingering = [r for r in store["purchases"] if r["state"] == "uncertain"]
    if not lingering:
        pytest.skip("no attempt left to reconcile after the crash")
    # each listing now takes a while: buy while a reconcile round is under way
    fake.orders_delay = 0.05
    listings = fake.listings
    deadline = time.monotonic() + 5.0
    while fake.listings == listings:
        assert time.monotonic() < deadline, "the reconciler stopped looking up"
        await asyncio.sleep(0.005)
    body = await get_number(crash.session, second.url)
    assert body.startswith("ACCESS_NUMBER:"), body
    _, ident, phone = body.split(":")
    await asyncio.sleep(LINGER)
    assert second.stop() == 0, second.output()

    store = await read_store(crash.db)
    report = crash.report(store)
    (order,) = [o for o in fake.orders.values() if phone.endswith(o.phone)]
    rows = [r for r in store["activations"] if r["upstream_id"] == order.id]
    assert [(r["id"], r["state"]) for r in rows] == [(int(ident), "wait_code")], (
        f"order {order.id} bought after the restart: {rows}" + report
    )
    assert order.state == "waiting" and "cancelorder" not in order.calls, report
    for server in crash.servers:
        assert "Traceback" not in server.output(), server.output()
