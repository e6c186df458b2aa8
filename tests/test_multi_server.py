"""Two real ``sms-compat serve`` processes on one PostgreSQL behave as one server.

Each test starts two servers (subprocesses, their own ports) on a fresh database of a
real PostgreSQL (skipped, saying why, where its binaries are missing), in front of one
fake sms-activate that counts every call per order (``tests/multi.py``). Nothing is
patched: what is asserted is what a client gets from either server and what the
upstream was asked.
"""

from __future__ import annotations

import concurrent.futures
import math
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multi import (
    POLL_INTERVAL,
    STATUS_ACTIONS,
    Upstream,
    servers,
    sql,
    wait_for,
)
from tests.pg import PgServer
from tests.serving import ServeProcess

TG_VN = "action=getNumber&service=tg&country=10"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    made = Upstream()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def pair(
    tmp_path: Path, pg_url: str, upstream: Upstream
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    first, second = servers(tmp_path, pg_url, upstream)
    try:
        yield first, second
    finally:
        for server in (first, second):
            server.stop()


def answer(
    server: ServeProcess, query: str, timeout: float = 15
) -> tuple[int, str, str]:
    """(status, content type, body) of one dialect request."""
    with urllib.request.urlopen(server.url(query), timeout=timeout) as resp:
        return resp.status, resp.headers.get_content_type(), resp.read().decode()


def buy(server: ServeProcess) -> tuple[int, str]:
    """(our id, the phone) of a number bought through ``server``."""
    status, kind, body = answer(server, TG_VN)
    assert (status, kind) == (200, "text/plain") and body.startswith(
        "ACCESS_NUMBER:"
    ), body
    _, ident, phone = body.split(":")
    return int(ident), phone


def upstream_id(upstream: Upstream, phone: str) -> str:
    """The upstream order that sold ``phone``."""
    found = upstream.read(
        lambda f: [i for i, o in f.orders.items() if o.phone == phone]
    )
    assert len(found) == 1, found
    return found[0]


# ---- one server, seen from both ---------------------------------------------------------


def test_two_servers_starting_together_migrate_once(
    tmp_path: Path, pg_url: str, upstream: Upstream, pg_server: PgServer
) -> None:
    first, second = servers(tmp_path, pg_url, upstream)
    outputs = [first.stop(), second.stop()]
    applied = [
        line.split("store ", 1)[1].split(": ", 1)[1]
        for text in outputs
        for line in text.splitlines()
        if " applied" in line and "schema" in line
    ]
    assert sorted(applied) == ["schema 1 applied", "schema 2 applied"]
    assert sql(pg_url, "SELECT version FROM schema_version ORDER BY version") == [
        (1,),
        (2,),
    ]


def test_ids_are_unique_and_either_server_serves_any_number(
    pair: tuple[ServeProcess, ServeProcess], upstream: Upstream
) -> None:
    a, b = pair
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        bought = list(pool.map(buy, [a, b] * 8))
    ids = [ident for ident, _ in bought]
    assert len(set(ids)) == 16 and len(upstream.orders()) == 16
    ident, phone = bought[0]  # bought on A
    assert answer(b, f"action=getStatus&id={ident}") == (
        200, "text/plain", "STATUS_WAIT_CODE",
    )  # fmt: skip
    listed = answer(b, "action=getActiveActivations")[2]
    assert all(f'"activationId": "{i}"' in listed or f'"activationId":"{i}"' in listed
               or str(i) in listed for i in ids)  # fmt: skip
    assert answer(b, f"action=setStatus&id={ident}&status=8") == (
        200, "text/plain", "ACCESS_CANCEL",
    )  # fmt: skip
    assert answer(a, f"action=getStatus&id={ident}") == (
        200, "text/plain", "STATUS_CANCEL",
    )  # fmt: skip
    order = upstream_id(upstream, phone)
    assert upstream.orders()[order] == "cancelled"
    assert upstream.status_calls(order, "8") == 1


def test_an_sms_reaches_clients_of_both_and_polls_are_coalesced(
    pair: tuple[ServeProcess, ServeProcess], upstream: Upstream
) -> None:
    """getStatus hammered on both servers for 6.5 s: the upstream is asked about the
    number about once per poll_interval in total, by getStatus of the order or by the
    batch list (getActiveActivations) that covers it (two servers on their own would
    ask about twice as often), and the SMS delivered halfway is seen through both."""
    a, b = pair
    ident, phone = buy(a)
    order = upstream_id(upstream, phone)
    seen: dict[str, set[str]] = {"a": set(), "b": set()}
    started = time.monotonic()
    delivered = False
    while (elapsed := time.monotonic() - started) < 6.5:
        if not delivered and elapsed > 3.2:
            upstream.read(lambda f: f.deliver(order, "Your code 4455", "4455"))
            delivered = True
        for name, server in (("a", a), ("b", b)):
            seen[name].add(answer(server, f"action=getStatus&id={ident}")[2])
        time.sleep(0.05)
    polls = upstream.calls_for(order, STATUS_ACTIONS) + upstream.calls_of(
        ("getActiveActivations",)
    )
    expected = math.floor(6.5 / POLL_INTERVAL) + 1  # 4
    assert expected - 1 <= polls <= expected + 1, polls
    for name in ("a", "b"):
        assert seen[name] == {"STATUS_WAIT_CODE", "STATUS_OK:4455"}, (name, seen)
    for server in (a, b):
        assert answer(server, f"action=getStatus&id={ident}") == (
            200, "text/plain", "STATUS_OK:4455",
        )  # fmt: skip


def test_a_cancel_sent_to_both_reaches_the_upstream_once(
    pair: tuple[ServeProcess, ServeProcess], upstream: Upstream
) -> None:
    a, b = pair
    ident, phone = buy(b)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda s: answer(s, f"action=setStatus&id={ident}&status=8"), [a, b]
            )
        )
    assert answers == [(200, "text/plain", "ACCESS_CANCEL")] * 2
    order = upstream_id(upstream, phone)
    time.sleep(2.5)  # both outboxes run every second: neither sends it again
    assert upstream.status_calls(order, "8") == 1
    assert upstream.orders()[order] == "cancelled"


def test_a_budget_is_never_overspent_by_two_servers_buying_at_once(
    tmp_path: Path, pg_url: str, upstream: Upstream
) -> None:
    """A key with 50.00 of budget and numbers at 12.50: ten concurrent getNumber on
    each server buy exactly four numbers in total (the holds are in the database)."""
    a, b = servers(tmp_path, pg_url, upstream, key={"budget": 50})
    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            bodies = list(pool.map(lambda s: answer(s, TG_VN)[2], [a, b] * 10))
        assert sorted(b.split(":")[0] for b in bodies) == (
            ["ACCESS_NUMBER"] * 4 + ["NO_BALANCE"] * 16
        )
        assert len(upstream.orders()) == 4
        assert answer(b, "action=getBalance")[2] == "ACCESS_BALANCE:0.00"
    finally:
        a.stop()
        b.stop()


def test_a_webhook_is_posted_once_by_two_servers(
    tmp_path: Path, pg_url: str, upstream: Upstream
) -> None:
    """Both servers poll a webhook key's numbers (coalesced) and deliver what is due
    (claimed): the SMS is posted once."""
    hook = {"webhook": f"{upstream.url}/hook"}
    a, b = servers(tmp_path, pg_url, upstream, key=hook)
    try:
        ident, phone = buy(a)
        order = upstream_id(upstream, phone)
        upstream.read(lambda f: f.deliver(order, "Your code 7788", "7788"))
        wait_for(lambda: upstream.read(lambda f: len(f.hooks)) >= 1, 15, "the webhook")
        time.sleep(2.5)  # both servers' webhook loops run every second
        hooks = upstream.read(lambda f: list(f.hooks))
        assert [(h["activationId"], h["code"]) for h in hooks] == [(ident, "7788")]
    finally:
        a.stop()
        b.stop()


# ---- a server killed, the database gone ---------------------------------------------


def test_a_server_killed_in_the_middle_of_purchases_loses_nothing(
    pair: tuple[ServeProcess, ServeProcess],
    upstream: Upstream,
    pg_server: PgServer,
    pg_url: str,
) -> None:
    """A has sold two numbers, cancelled one while the upstream refuses setStatus
    (its cancel waits in the outbox), and has three purchases whose numbers the
    upstream sold but whose answers it holds, when it is killed with -9. B finishes
    A's outbox and, once A counts as dead, reconciles the three purchases: every
    number the upstream sold is then either served by B or cancelled upstream."""
    a, b = pair
    kept, kept_phone = buy(a)
    gone, gone_phone = buy(a)
    upstream.read(lambda f: setattr(f, "status_down", True))
    assert answer(a, f"action=setStatus&id={gone}&status=8") == (
        200, "text/plain", "ACCESS_CANCEL",
    )  # fmt: skip
    gone_order = upstream_id(upstream, gone_phone)
    assert upstream.orders()[gone_order] == "waiting"  # queued, not delivered

    upstream.read(lambda f: setattr(f, "holding", True))
    before = set(upstream.orders())
    pool = concurrent.futures.ThreadPoolExecutor(3)
    stuck = [pool.submit(answer, a, TG_VN, 60) for _ in range(3)]
    wait_for(lambda: len(upstream.orders()) == len(before) + 3, 15, "three held sales")
    held = sorted(set(upstream.orders()) - before)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    for future in stuck:
        with pytest.raises(OSError):
            future.result(15)
    pool.shutdown()
    upstream.read(lambda f: setattr(f, "status_down", False))
    upstream.read(lambda f: setattr(f, "holding", False))

    # B finishes A's outbox (its claim, if any, ended with A's transaction)
    wait_for(lambda: upstream.orders()[gone_order] == "cancelled", 20, "A's cancel")
    # A's pending purchases are B's once A is dead: killed, its liveness lock is
    # gone with its sessions, so at once (no DEAD_AFTER to wait)
    wait_for(
        lambda: all(upstream.orders()[o] == "cancelled" for o in held),
        30,
        "A's three held purchases reconciled and cancelled upstream",
    )
    assert [upstream.status_calls(o, "8") for o in held] == [1, 1, 1]
    unresolved = (
        "SELECT count(*) FROM purchases WHERE state IN ('pending', 'uncertain')"
    )
    assert sql(pg_url, unresolved) == [(0,)]
    # nothing sold is lost: the one kept is served by B, every other is cancelled
    states = upstream.orders()
    kept_order = upstream_id(upstream, kept_phone)
    assert {o: s for o, s in states.items() if s != "cancelled"} == {
        kept_order: "waiting"
    }
    assert answer(b, f"action=getStatus&id={kept}") == (
        200, "text/plain", "STATUS_WAIT_CODE",
    )  # fmt: skip
    assert str(kept) in answer(b, "action=getActiveActivations")[2]
    assert upstream.status_calls(gone_order, "8") >= 1


def test_a_database_outage_answers_dialect_tokens_and_recovers(
    pair: tuple[ServeProcess, ServeProcess],
    upstream: Upstream,
    pg_server: PgServer,
) -> None:
    a, b = pair
    ident, _ = buy(a)
    sold = len(upstream.orders())
    pg_server.stop()
    try:
        for server in (a, b):
            status, kind, body = answer(server, TG_VN, timeout=30)
            assert (status, kind, body) == (200, "text/plain", "NO_NUMBERS")
            status, kind, body = answer(
                server, f"action=getStatus&id={ident}", timeout=30
            )
            # the server that sold it answers from memory; the other would read the
            # database, and answers sms-activate's token for a database failure
            assert (status, kind) == (200, "text/plain")
            assert body in ("STATUS_WAIT_CODE", "ERROR_SQL"), body
        assert len(upstream.orders()) == sold  # nothing bought that was not recorded
    finally:
        pg_server.start()

    def both_sell() -> bool:
        return all(answer(s, TG_VN)[2].startswith("ACCESS_NUMBER:") for s in (a, b))

    wait_for(both_sell, 30, "both servers selling again after the database is back")
    for server in (a, b):
        assert answer(server, f"action=getStatus&id={ident}") == (
            200, "text/plain", "STATUS_WAIT_CODE",
        )  # fmt: skip
