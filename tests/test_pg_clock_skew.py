"""Two servers on one PostgreSQL whose wall clocks differ (two hosts), found by the
attack pass.

The README's deployment puts the database on another host (``db.internal``) and
servers anywhere; their clocks are never exactly equal. A server's liveness
(``servers.seen_at``) was written with its own clock and judged with another's, so a
skew above DEAD_AFTER (30 s) made a live server look dead. Liveness, leases and holds
are now in the database's time (PostgresStore._shared).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from compat_server.store import PENDING
from compat_server.store.postgres import PostgresStore
from tests.conftest import T0, FakeClock
from tests.test_store_battery import ORDER, bought

SKEW = 40.0  # seconds: B's clock is ahead of A's


@pytest.fixture(params=[0.0, SKEW], ids=["same-clock", "skew-40s"])
async def pair(
    pg_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    skew = request.param  # same-clock: the control; skew-40s: the finding
    # real time: the store corrects a skew it measures against the database (one of
    # seconds to a day; a fake clock months off, as the other tests use, is left)
    base = time.time()
    a = await PostgresStore.open(pg_url, FakeClock(base))
    b = await PostgresStore.open(pg_url, FakeClock(base + skew))
    a.t0 = base  # type: ignore[attr-defined]
    b.skew = skew  # type: ignore[attr-defined]
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_live_servers_purchase_is_not_taken_by_a_server_whose_clock_is_ahead(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    t0 = a.t0  # type: ignore[attr-defined]
    await a.heartbeat(t0)
    await b.heartbeat(t0 + b.skew)  # type: ignore[attr-defined]
    attempt = await a.begin_purchase("k1", "sandbox", ORDER, t0)
    assert [x.id for x in await a.attempts([PENDING])] == [attempt]
    # A is alive (its liveness lock is held, it beat just now): B must leave it
    assert await b.attempts([PENDING]) == []


async def test_a_live_servers_budget_hold_counts_on_a_server_whose_clock_is_ahead(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    t0 = a.t0  # type: ignore[attr-defined]
    await a.heartbeat(t0)
    await b.heartbeat(t0 + b.skew)  # type: ignore[attr-defined]
    budget = Decimal("12.50")
    held = await a.reserve("k1", Decimal("12.50"), budget=budget, max_open=None, now=t0)
    assert held.id != 0
    second = await b.reserve(
        "k1",
        Decimal("12.50"),
        budget=budget,
        max_open=None,
        now=t0 + b.skew,  # type: ignore[attr-defined]
    )
    # the budget fits one number and A's purchase is in flight: B is refused
    assert (second.id, second.refused) == (0, "budget")


async def test_a_live_servers_lease_holds_on_a_server_whose_clock_is_ahead(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    t0 = a.t0  # type: ignore[attr-defined]
    skew = b.skew  # type: ignore[attr-defined]
    await a.heartbeat(t0)
    await b.heartbeat(t0 + skew)
    assert await a.lease("poll:1", 10, t0)
    # A took it for 10 s, by its clock, a moment ago: B must be refused
    assert not await b.lease("poll:1", 10, t0 + skew)


async def test_the_server_that_bought_stores_its_number_after_another_reconciled_it(
    pg_url: str,
) -> None:
    """A pause longer than DEAD_AFTER (GC, SIGSTOP, a VM migration: B's clock 40 s on
    from A's last beat): B reconciles A's pending purchase and stores the number under
    the attempt's id; then A's paid call answers and A stores it too. It was asyncpg's
    UniqueViolationError (ERROR_SQL with an "unexpected error" traceback); now A gets
    the stored activation, and the router hands it out only if it is open."""
    clock_a, clock_b = FakeClock(T0), FakeClock(T0)
    a = await PostgresStore.open(pg_url, clock_a)
    b = await PostgresStore.open(pg_url, clock_b)
    try:
        attempt = await a.begin_purchase("k1", "sandbox", ORDER, T0)
        clock_b.advance(SKEW)  # A silent (paused) for 40 s
        await b.heartbeat(clock_b())
        [taken] = await b.attempts([PENDING])
        stored = await b.complete_purchase(taken.id, bought(1))
        # A resumes: its call answered with the same number
        try:
            mine = await a.complete_purchase(attempt, bought(1))
        except Exception as exc:  # noqa: BLE001 - what the attack pass found
            pytest.fail(f"A's complete_purchase raised {type(exc).__name__}: {exc}")
        assert mine.id == stored.id
    finally:
        await a.close()
        await b.close()
