"""Many activations (issue 9 item 4): a restart loads them whole, getActiveActivations
pages them, catalogue answers are rendered once per catalog change.

Correctness only; how fast and how small is bench/run.py's (j) and (k).
"""

from __future__ import annotations

import copy
import sqlite3
from decimal import Decimal

from compat_server.config import key_id
from compat_server.store import (
    CANCELLED,
    CODE,
    FINISHED,
    WAIT_CODE,
    WAIT_RETRY,
    Activation,
    NewActivation,
    SqliteStore,
)
from providers.vocabulary import Order, Purchase, Sms
from tests.conftest import T0, FakeClock

KEY_A = key_id("scale-key-a-0123456789abcdef012345")
KEY_B = key_id("scale-key-b-0123456789abcdef012345")


# ---- a restart with many activations --------------------------------------------------


def _sms(upstream: str, n: int, at: float) -> Sms:
    code = f"{(hash((upstream, n)) % 900_000) + 100_000}"
    return Sms(
        f"{upstream}:{n}", f"Telegram code: {code}\n\nlink t.me/{code}", code, at
    )


async def _fill(store: SqliteStore, count: int) -> dict[int, Activation]:
    """``count`` activations through the Store API, in every shape an open one takes
    (waiting, one code, asked for another and got it, re-rented with extra data) and
    some closed ones; returns a deep copy of each, as the store held it, by id."""
    made: dict[int, Activation] = {}
    for index in range(count):
        key = KEY_A if index % 3 else KEY_B
        service, country = ("tg", 10) if index % 2 else ("wa", 0)
        provider = "sandbox" if index % 4 else "other"
        extra = {"service_id": str(index % 7)} if index % 5 == 0 else {}
        purchase = Purchase(
            str(700_000 + index),
            f"84{900_000_000 + index}",
            Decimal("18.50") if index % 2 else Decimal("7"),
            operator="viettel" if index % 6 == 0 else "",
            extra=extra,
        )
        at = T0 + index
        activation = await store.complete_purchase(
            None,
            NewActivation(
                key, provider, "RUB" if provider == "sandbox" else "VND",
                Order(service=service, country=country), purchase,
                Decimal("18.50") if index % 2 else Decimal("7.25"), at, 1200.0,
            ),
        )  # fmt: skip
        shape = index % 10
        upstream = purchase.upstream_id
        if shape in (3, 4, 5):  # a code came
            await store.add_messages(activation, [_sms(upstream, 1, at + 5)])
        if shape in (6, 7):  # code, another asked, a second code (re-rented for 7)
            await store.add_messages(activation, [_sms(upstream, 1, at + 5)])
            again = (
                Purchase(f"{upstream}-r", purchase.phone, Decimal(1), extra={"r": "1"})
                if shape == 7
                else None
            )
            await store.set_state(
                activation, WAIT_RETRY, at + 6, purchase=again, retry=True
            )
            await store.add_messages(
                activation,
                [_sms(upstream, 1, at + 5), _sms(upstream, 2, at + 9)],
            )
        if shape == 8:  # asked for another, none yet
            await store.add_messages(activation, [_sms(upstream, 1, at + 5)])
            await store.set_state(activation, WAIT_RETRY, at + 6, retry=True)
        if shape == 9 and index % 20 == 9:  # closed: finished after a code
            await store.add_messages(activation, [_sms(upstream, 1, at + 5)])
            await store.set_state(activation, FINISHED, at + 7, outbox="finish")
        elif shape == 9:  # closed: cancelled before one
            await store.set_state(activation, CANCELLED, at + 3, outbox="cancel")
        made[activation.id] = copy.deepcopy(activation)
    return made


async def test_a_restart_brings_back_every_activation_message_and_state(
    store_path: str, clock: FakeClock
) -> None:
    first = await SqliteStore.open(store_path, clock)
    made = await _fill(first, 1_000)
    await first.close()
    states = sorted({a.state for a in made.values()})
    assert states == [CANCELLED, CODE, FINISHED, WAIT_CODE, WAIT_RETRY]

    again = await SqliteStore.open(store_path, clock)
    try:
        loaded = {a.id: a for a in again.open_activations()}
        assert sorted(loaded) == sorted(i for i, a in made.items() if a.is_open)
        assert len(loaded) == 900
        for ident, before in made.items():
            after = await again.get(ident)
            assert after == before, ident  # every field, messages in their order
        assert [a.id for a in await again.for_key(KEY_B)] == sorted(
            i for i, a in made.items() if a.key_id == KEY_B and a.is_open
        )
        everything = await again.for_key(KEY_A, open_only=False)
        assert everything == [made[i] for i in sorted(made) if made[i].key_id == KEY_A]
        newest = await again.recent(30)
        assert newest == [made[i] for i in sorted(made, reverse=True)[:30]]
        # a restarted activation takes new messages and states like any other
        waiting = next(a for a in loaded.values() if a.state == WAIT_CODE)
        assert await again.add_messages(waiting, [_sms("x", 1, T0 + 2_000)])
        assert (waiting.state, len(waiting.messages)) == (CODE, 1)
    finally:
        await again.close()
    third = await SqliteStore.open(store_path, clock)
    try:
        assert await third.get(waiting.id) == waiting
    finally:
        await third.close()


async def test_repeated_strings_and_amounts_are_shared_after_a_restart(
    store_path: str, clock: FakeClock
) -> None:
    first = await SqliteStore.open(store_path, clock)
    await _fill(first, 60)
    await first.close()
    again = await SqliteStore.open(store_path, clock)
    try:
        loaded = again.open_activations()
        for field in ("key_id", "provider", "service", "currency", "state", "cost"):
            values = [getattr(a, field) for a in loaded]
            distinct = {id(v) for v in values}
            assert len(distinct) == len(set(values)), field
        assert not hasattr(loaded[0], "__dict__")  # slots: no per-object dict
    finally:
        await again.close()


async def test_a_held_number_written_at_shutdown_is_back_after_the_restart(
    store_path: str, clock: FakeClock
) -> None:
    raw = {"path": store_path}
    first = await SqliteStore.open(raw["path"], clock, busy_timeout=0.1)
    attempt = await first.begin_purchase(KEY_A, "sandbox", Order("tg", 10), T0)
    lock = sqlite3.connect(store_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        held = await first.complete_purchase(
            attempt,
            NewActivation(
                KEY_A, "sandbox", "RUB", Order("tg", 10),
                Purchase("900001", "84900000001", Decimal("18")), Decimal("18.00"),
                T0, 1200.0,
            ),
            hold=True,
        )  # fmt: skip
        assert first.problem is not None
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    before = copy.deepcopy(held)
    await first.close()  # the store takes writes again: the held number is written
    again = await SqliteStore.open(store_path, clock)
    try:
        assert [a.id for a in again.open_activations()] == [before.id]
        assert await again.get(before.id) == before
    finally:
        await again.close()
