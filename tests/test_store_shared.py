"""The several-servers contract of the Store, on both stores.

One SQLite file has one server, so its claims, holds and leases live in memory; the
PostgreSQL store keeps them in the database. The semantics are one: what ``due_ops``/``due_webhooks`` hand
out is claimed until done, failed or CLAIM_SECONDS; ``reserve`` checks and holds in one
step; a lease can be given up. The ``store`` fixture (conftest) is each of them.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

from compat_server.store import (
    CLAIM_SECONDS,
    NewActivation,
    OutboxOp,
    Store,
)
from providers.vocabulary import Order, Purchase, Sms

T = 1_800_000_000.0


async def sell(store: Store, key_id: str = "k1", cost: str = "0") -> int:
    order = Order(service="tg", country=0)
    attempt = await store.begin_purchase(key_id, "sandbox", order, T)
    bought = NewActivation(
        key_id, "sandbox", "RUB", order,
        Purchase(upstream_id=f"u{attempt}", phone="79990000000", price=Decimal(cost)),
        Decimal(cost), T, 1200,
    )  # fmt: skip
    return (await store.complete_purchase(attempt, bought)).id


async def test_due_ops_claims_what_it_returns_until_done_failed_or_run_out(
    store: Store,
) -> None:
    first, second = await sell(store), await sell(store)
    await store.enqueue(first, "cancel", T)
    await store.enqueue(second, "finish", T)
    claimed = await store.due_ops(T)
    assert [(o.activation_id, o.op, o.attempts) for o in claimed] == [
        (first, "cancel", 0),
        (second, "finish", 0),
    ]
    assert await store.due_ops(T + 1) == []  # claimed: nobody gets them again
    await store.op_done(claimed[0].id)
    await store.op_failed(claimed[1].id, T + 5, "UpstreamUnreachable")
    assert await store.due_ops(T + 4) == []
    assert await store.due_ops(T + 5) == [OutboxOp(claimed[1].id, second, "finish", 1)]
    # a claim nobody closes runs out
    assert await store.due_ops(T + 5 + CLAIM_SECONDS - 1) == []
    assert await store.due_ops(T + 5 + CLAIM_SECONDS) == [
        OutboxOp(claimed[1].id, second, "finish", 1)
    ]


async def test_due_ops_for_one_activation_claims_nothing_of_another(
    store: Store,
) -> None:
    first, second = await sell(store), await sell(store)
    await store.enqueue(first, "cancel", T)
    await store.enqueue(second, "cancel", T)
    mine = await store.due_ops(T, activation_id=second)
    assert [o.activation_id for o in mine] == [second]
    assert [o.activation_id for o in await store.due_ops(T)] == [first]


async def test_due_webhooks_claims_what_it_returns(store: Store) -> None:
    ident = await sell(store)
    activation = await store.get(ident)
    assert activation is not None

    def rows(messages: object) -> list[tuple[str, str, dict[str, object]]]:
        return [("k1", f"a:{ident}:1", {"activationId": ident})]

    await store.add_messages(activation, [Sms("1", "code 1", "1", T)], rows)
    jobs = await store.due_webhooks(T)
    assert [(j.key_id, j.payload, j.attempts) for j in jobs] == [
        ("k1", {"activationId": ident}, 0)
    ]
    assert await store.due_webhooks(T + 1) == []
    await store.webhook_failed(jobs[0].id, T + 10, "HTTP 500")
    assert await store.due_webhooks(T + 9) == []
    assert [j.attempts for j in await store.due_webhooks(T + 10)] == [1]
    assert await store.due_webhooks(T + 11) == []
    assert await store.due_webhooks(T + 10 + CLAIM_SECONDS) != []


async def test_reserve_checks_and_holds_in_one_step(store: Store) -> None:
    """Ten concurrent holds of 3 on a budget of 10 with 2 spent: two fit, and the
    third is refused naming what is left; a release makes room again."""
    await sell(store, cost="2")
    results = await asyncio.gather(
        *(
            store.reserve("k1", Decimal(3), budget=Decimal(10), max_open=None, now=T)
            for _ in range(10)
        )
    )
    held = [r for r in results if r.id]
    assert [r.amount for r in held] == [Decimal(3), Decimal(3)]
    assert {(r.refused, r.left) for r in results if not r.id} == {
        ("budget", Decimal(2))
    }
    assert await store.reserved("k1") == (2, Decimal(6))
    await store.unreserve(held[0].id)
    assert await store.reserved("k1") == (1, Decimal(3))
    everything = await store.reserve(
        "k1", None, budget=Decimal(10), max_open=None, at_most=Decimal("4.5"), now=T
    )
    assert (everything.amount, everything.left) == (Decimal("4.5"), Decimal(5))


async def test_reserve_counts_open_numbers_and_holds_toward_max_active(
    store: Store,
) -> None:
    await sell(store)
    first = await store.reserve("k1", Decimal(0), budget=None, max_open=2, now=T)
    assert (first.id != 0, first.amount) == (True, Decimal(0))
    second = await store.reserve("k1", Decimal(0), budget=None, max_open=2, now=T)
    assert (second.id, second.refused) == (0, "max_active")
    other = await store.reserve("k2", Decimal(0), budget=None, max_open=2, now=T)
    assert other.id != 0  # another key's numbers do not count
    await store.unreserve(first.id)
    assert (await store.reserve("k1", None, budget=None, max_open=2, now=T)).id != 0


async def test_a_lease_given_up_can_be_taken_at_once(store: Store) -> None:
    assert await store.lease("poll:1", 10.0, T) is True
    assert await store.lease("poll:1", 10.0, T + 1) is False
    await store.end_lease("poll:1")
    assert await store.lease("poll:1", 10.0, T + 1) is True


async def test_one_server_per_file_nobody_else_buys_and_heartbeats_are_free(
    store: Store,
) -> None:
    order = Order(service="tg", country=0)
    await store.begin_purchase("k1", "sandbox", order, T)
    await store.heartbeat(T)
    assert await store.buying("sandbox", T) is False
    assert [a.state for a in await store.attempts(["pending"])] == ["pending"]
    assert len(store.server_id) == 16 and store.server_id != ""


async def test_a_lease_or_a_hold_of_a_server_gone_is_nobody_s(pg_url: str) -> None:
    """PostgreSQL: a server that leaves (or dies) leaves its leases free at once (a
    reconcile round it held must not block the others for RECONCILE_LEASE), and its
    budget holds stop counting."""
    from compat_server.store.postgres import PostgresStore

    a = await PostgresStore.open(pg_url, clock=lambda: T)
    b = await PostgresStore.open(pg_url, clock=lambda: T)
    try:
        assert await a.lease("reconcile:x", 300.0, T) is True
        assert await b.lease("reconcile:x", 300.0, T + 1) is False
        held = await a.reserve("k1", Decimal(7), budget=Decimal(10), max_open=1, now=T)
        assert held.id and await b.reserved("k1") == (1, Decimal(7))
        refused = await b.reserve(
            "k1", Decimal(7), budget=Decimal(10), max_open=None, now=T
        )
        assert (refused.refused, refused.left) == ("budget", Decimal(3))
        await a.close()
        assert await b.lease("reconcile:x", 300.0, T + 2) is True
        assert await b.reserved("k1") == (0, Decimal(0))
        again = await b.reserve("k1", Decimal(7), budget=Decimal(10), max_open=1, now=T)
        assert (again.id != 0, again.left) == (True, Decimal(10))
    finally:
        await b.close()
