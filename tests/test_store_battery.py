"""One battery for every store: SQLite and PostgreSQL keep the same promises.

Each test runs on both implementations (the ``store`` fixture is parametrized), through
the Store protocol only, and asserts exact records and figures.
"""

from __future__ import annotations

import inspect
from decimal import Decimal

from compat_server.store import (
    CANCELLED,
    CODE,
    CONFIRMED,
    FIRST_RENT_ID,
    PENDING,
    REFUSED,
    RENT_ACTIVE,
    RENT_CANCELLED,
    UNCERTAIN,
    WAIT_CODE,
    Activation,
    Message,
    NewActivation,
    OutboxOp,
    RentPayment,
    Store,
    first_id,
)
from compat_server.store.postgres import PostgresStore
from providers.vocabulary import Order, Purchase, RentPurchase, RentSms, Sms
from tests.conftest import T0, FakeClock, OpenStore

ORDER = Order("tg", 10)
FIRST = first_id(T0)


def bought(n: int, key: str = "k1", provider: str = "sandbox") -> NewActivation:
    """The n-th number a test buys."""
    return NewActivation(
        key_id=key,
        provider=provider,
        currency="RUB",
        order=ORDER,
        purchase=Purchase(f"u{n}", f"8490000000{n}", Decimal("18.5"), "viettel"),
        cost=Decimal("20.25"),
        now=T0,
        lifetime=1200,
    )


async def buy(store: Store, n: int, key: str = "k1", provider: str = "sandbox"):  # type: ignore[no-untyped-def]
    attempt = await store.begin_purchase(key, provider, ORDER, T0)
    return await store.complete_purchase(attempt, bought(n, key, provider))


def summary(a: Activation) -> tuple[object, ...]:
    return (a.id, a.key_id, a.upstream_id, a.phone, a.price, a.cost, a.state)


async def test_ids_start_from_the_clock_and_a_refused_attempt_gives_its_back(
    store: Store,
) -> None:
    refused = await store.begin_purchase("k1", "sandbox", ORDER, T0)
    await store.end_purchase(refused, REFUSED, "no numbers", T0)
    first = await buy(store, 1)
    uncertain = await store.begin_purchase("k1", "sandbox", ORDER, T0)
    await store.end_purchase(uncertain, UNCERTAIN, "timeout", T0)
    second = await buy(store, 2)
    assert (first.id, second.id) == (FIRST, FIRST + 2)  # uncertain keeps its id
    assert [(a.id, a.state) for a in await store.attempts([UNCERTAIN, REFUSED])] == [
        (refused, REFUSED),
        (uncertain, UNCERTAIN),
    ]
    assert await store.attempts([PENDING]) == []
    assert await store.count() == 2


async def test_a_bought_number_is_read_back_whole(store: Store) -> None:
    activation = await buy(store, 1)
    assert summary(activation) == (
        FIRST, "k1", "u1", "84900000001", Decimal("18.5"), Decimal("20.25"), WAIT_CODE,
    )  # fmt: skip
    got = await store.get(FIRST)
    assert got is activation  # one object per id: the rooms change it in place
    assert (got.created_at, got.expires_at, got.operator, got.country) == (
        T0, T0 + 1200, "viettel", 10,
    )  # fmt: skip
    assert await store.get(FIRST + 1) is None
    assert [a.id for a in store.open_activations()] == [FIRST]
    assert [a.id for a in await store.for_key("k1")] == [FIRST]
    assert await store.for_key("k2") == []
    assert [a.id for a in await store.recent(10, {"key_id": "k1"})] == [FIRST]
    assert await store.attempts([CONFIRMED]) != []


async def test_messages_move_the_state_and_queue_one_webhook_each(
    store: Store,
) -> None:
    activation = await buy(store, 1)
    sms = [Sms("m1", "code 11111", "11111", T0 + 5), Sms("m2", "code 2", "2", T0 + 6)]

    def rows(new):  # type: ignore[no-untyped-def]
        return [("k1", f"act:{activation.id}:{m.uid}", {"code": m.code}) for m in new]

    assert await store.add_messages(activation, sms[:1], rows) is True
    assert await store.add_messages(activation, sms, rows) is True
    assert await store.add_messages(activation, sms, rows) is False
    assert activation.state == CODE
    assert activation.messages == [
        Message("m1", "code 11111", "11111", T0 + 5),
        Message("m2", "code 2", "2", T0 + 6),
    ]
    assert await store.webhook_states() == [
        (f"act:{FIRST}:m1", 0, "pending"),
        (f"act:{FIRST}:m2", 0, "pending"),
    ]
    jobs = await store.due_webhooks(T0 + 10)
    assert [(j.key_id, j.payload, j.attempts) for j in jobs] == [
        ("k1", {"code": "11111"}, 0),
        ("k1", {"code": "2"}, 0),
    ]
    await store.webhook_done(jobs[0].id, "delivered")
    await store.webhook_failed(jobs[1].id, T0 + 100, "HTTP 500")
    assert await store.due_webhooks(T0 + 99) == []
    assert [j.attempts for j in await store.due_webhooks(T0 + 100)] == [1]
    assert await store.webhook_states() == [
        (f"act:{FIRST}:m1", 1, "delivered"),
        (f"act:{FIRST}:m2", 1, "pending"),
    ]


async def test_state_changes_queue_calls_and_leave_the_open_set(store: Store) -> None:
    activation = await buy(store, 1)
    await store.set_state(activation, CANCELLED, T0 + 30, outbox="cancel")
    assert store.open_activations() == []
    assert await store.for_key("k1") == []
    assert [a.state for a in await store.for_key("k1", open_only=False)] == [CANCELLED]
    assert await store.pending_ops() == [(FIRST, "cancel", 0, "")]
    [op] = await store.due_ops(T0 + 30)
    assert op == OutboxOp(op.id, FIRST, "cancel", 0)
    await store.op_failed(op.id, T0 + 60, "timeout")
    assert await store.pending_ops() == [(FIRST, "cancel", 1, "timeout")]
    assert await store.due_ops(T0 + 59) == []
    [again] = await store.due_ops(T0 + 60)
    assert (again.id, again.attempts) == (op.id, 1)
    await store.op_done(op.id)
    assert await store.pending_ops() == []
    assert await store.figures() == {
        "attempts": [("confirmed", "", 1)],
        "outbox": [],
    }
    assert await store.prune(T0 + 1000) == 1  # the delivered call


async def test_a_re_rented_order_keeps_its_replaced_id(store: Store) -> None:
    activation = await buy(store, 1)
    await store.set_state(
        activation,
        WAIT_CODE,
        T0 + 10,
        purchase=Purchase("u9", activation.phone, Decimal("18.5"), extra={"s": "1"}),
        retry=True,
    )
    await store.add_cost(activation, Decimal("20.25"))
    assert (activation.upstream_id, activation.previous_ids, activation.extra) == (
        "u9", ("u1",), {"s": "1"},
    )  # fmt: skip
    assert await store.known_upstream_ids("sandbox") == {"u1", "u9"}
    assert await store.spent("k1") == Decimal("40.50")


async def test_spend_counts_what_is_not_given_back(store: Store) -> None:
    kept = await buy(store, 1)
    refunded = await buy(store, 2)
    unrefunded = await buy(store, 3, provider="tcs")
    await buy(store, 4, key="k2")
    assert await store.spent("k1") == Decimal("60.75")
    await store.set_state(refunded, CANCELLED, T0 + 1)
    await store.set_state(unrefunded, CANCELLED, T0 + 1)
    assert await store.spent("k1") == Decimal("20.25")
    store.set_unrefunded(frozenset({"tcs"}))
    assert await store.spent("k1") == Decimal("40.50")
    assert kept.state == WAIT_CODE
    assert await store.spent("k2") == Decimal("20.25")
    assert await store.spent("nobody") == Decimal("0.00")


async def test_rents_their_ids_messages_and_payments(store: Store) -> None:
    attempt = await store.begin_rent_attempt(
        "k1", "pva", "rent", {"service": "tg", "hours": 4}, 4, T0
    )
    purchase = RentPurchase("r1", "84911111111", Decimal("3"), T0 + 4 * 3600)
    rent = await store.complete_rent(
        attempt, "k1", "pva", "USD", "tg", 10, purchase, Decimal("2.50"), T0
    )
    assert rent.id == FIRST_RENT_ID
    prolong = await store.begin_rent_attempt("k1", "pva", "prolong", {}, 2, T0, rent.id)
    await store.end_rent_attempt(
        prolong, CONFIRMED, "", T0 + 1, Decimal("1"), Decimal("1.25")
    )
    await store.set_rent_state(rent, RENT_ACTIVE, T0 + 1, until=T0 + 6 * 3600)
    sms = [RentSms("s1", "hi 42", "42", T0 + 5, "bank")]
    assert [m.uid for m in await store.add_rent_messages(rent, sms)] == ["s1"]
    assert await store.add_rent_messages(rent, sms) == []
    again = await store.get_rent(rent.id)
    assert again is not None
    assert (again.until, [m.code for m in again.messages]) == (T0 + 6 * 3600, ["42"])
    assert await store.rent_payments(rent.id) == [
        RentPayment("rent", 4, Decimal("2.50"), T0),
        RentPayment("prolong", 2, Decimal("1.25"), T0),
    ]
    assert await store.spent("k1") == Decimal("3.75")
    assert [r.id for r in await store.active_rents()] == [rent.id]
    assert [a.state for a in await store.rent_attempts([CONFIRMED])] == [CONFIRMED]
    assert await store.known_upstream_ids("pva") == {"r1"}
    await store.set_rent_state(rent, RENT_CANCELLED, T0 + 2)
    assert await store.rents_for_key("k1") == []
    assert [r.state for r in await store.rents_for_key("k1", False)] == [RENT_CANCELLED]
    assert await store.spent("k1") == Decimal("0.00")


async def test_a_lease_is_taken_once_until_it_runs_out(store: Store) -> None:
    assert await store.lease("poll:7", 3.0, 1000.0) is True
    assert await store.lease("poll:7", 3.0, 1001.0) is False
    assert await store.lease("poll:8", 3.0, 1001.0) is True
    assert await store.lease("poll:7", 3.0, 1003.0) is True
    assert await store.lease("poll:7", 3.0, 1004.0) is False


async def test_everything_survives_a_restart(
    open_test_store: OpenStore, clock: FakeClock
) -> None:
    store = await open_test_store()
    activation = await buy(store, 1)
    await store.add_messages(activation, [Sms("m1", "code 5", "5", T0 + 5)])
    closed = await buy(store, 2)
    await store.set_state(closed, CANCELLED, T0 + 6, outbox="cancel")
    await store.save_health("sandbox", "open", 5, T0)
    version = await store.schema_version()
    await store.close()
    again = await open_test_store()
    assert await again.schema_version() == version
    assert [(a.id, a.state, a.code) for a in again.open_activations()] == [
        (FIRST, CODE, "5")
    ]
    got = await again.get(FIRST + 1)
    assert got is not None and got.state == CANCELLED
    assert await again.pending_ops() == [(FIRST + 1, "cancel", 0, "")]
    assert (await buy(again, 3)).id == FIRST + 2  # ids are never reused


def test_postgres_implements_the_protocol_signature_for_signature() -> None:
    wanted = {
        name: inspect.signature(member)
        for name, member in vars(Store).items()
        if callable(member) and not name.startswith("_")
    }
    assert "heartbeat" in wanted and "lock" in wanted
    for name, signature in wanted.items():
        assert inspect.signature(getattr(PostgresStore, name)) == signature, name


async def test_lock_is_an_async_context_manager(store: Store) -> None:
    activation = await buy(store, 1)
    async with store.lock(activation.id):
        await store.set_state(activation, CANCELLED, T0 + 1)
    assert activation.state == CANCELLED
