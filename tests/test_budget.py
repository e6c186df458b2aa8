"""Per-key money: keys[].budget, keys[].max_active, show_upstream_balance."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from decimal import Decimal
from typing import Any

from compat_server.config import Config, parse_config
from fakes import thuecodesim
from tests.conftest import (
    KEY,
    OTHER_KEY,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
)

TEXT = "text/plain"


def budget_config(store_path: str, **key: Any) -> Config:
    """tester has the given key options; other has none (sees the upstream balance)."""
    return parse_config(
        sandbox_raw(
            store_path,
            keys=[
                {"key": KEY, "alias": "tester", "providers": ["sandbox"], **key},
                {"key": OTHER_KEY, "alias": "other", "providers": ["sandbox"]},
            ],
        )
    )


def upstream_balance(client: Any) -> str:
    return str(engine_of(client).providers["sandbox"]._balance)  # type: ignore[attr-defined]


async def test_budget_is_spent_refused_and_given_back(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    client = await start_app(budget_config(store_path, budget=50))
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:50.00",
    )
    _, _, first = await call(client, action="getNumber", service="tg", country=10)
    _, _, second = await call(client, action="getNumber", service="tg", country=10)
    assert first.startswith("ACCESS_NUMBER:") and second.startswith("ACCESS_NUMBER:")
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:14.00",
    )
    # 18.00 does not fit in 14.00: refused before any paid call
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200, TEXT, "NO_BALANCE",
    )  # fmt: skip
    assert upstream_balance(client) == "964.00"
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT COUNT(*) FROM purchases").fetchone() == (2,)
    # a cheaper service still fits
    _, _, third = await call(client, action="getNumber", service="go", country=10)
    assert third.startswith("ACCESS_NUMBER:")
    assert await call(client, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:1.50")
    # a cancel gives the money back
    assert await call(client, action="setStatus", id=first.split(":")[1], status=8) == (
        200, TEXT, "ACCESS_CANCEL",
    )  # fmt: skip
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:19.50",
    )
    # so does an expiry
    clock.advance(1201)
    assert await engine_of(client).lifecycle.sweep() == 2
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:50.00",
    )
    # the key without a budget sees the upstream balance, as before (once the
    # expired numbers' cancels have reached the upstream)
    assert await engine_of(client).outbox.step() == 2
    assert await call(client, api_key=OTHER_KEY, action="getBalance") == (
        200, TEXT, "ACCESS_BALANCE:1000.00",
    )  # fmt: skip


async def test_finished_numbers_stay_spent_across_a_restart(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    config = budget_config(store_path, budget="40.00")
    first = await start_app(config)
    _, _, body = await call(first, action="getNumber", service="tg", country=10)
    ident = body.split(":")[1]
    clock.advance(6)
    assert (await call(first, action="getStatus", id=ident))[2].startswith("STATUS_OK:")
    assert await call(first, action="setStatus", id=ident, status=6) == (
        200, TEXT, "ACCESS_ACTIVATION",
    )  # fmt: skip
    _, _, open_one = await call(first, action="getNumber", service="tg", country=10)
    assert open_one.startswith("ACCESS_NUMBER:")
    await first.close()

    again = await start_app(config)
    assert await call(again, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:4.00")
    assert await call(again, action="getNumber", service="ds", country=10) == (
        200, TEXT, "NO_BALANCE",
    )  # fmt: skip


async def test_concurrent_purchases_cannot_overshoot(
    start_app: StartApp, store_path: str
) -> None:
    client = await start_app(budget_config(store_path, budget=40))
    answers = await asyncio.gather(
        *(call(client, action="getNumber", service="tg", country=10) for _ in range(6))
    )
    bodies = sorted(body.split(":")[0] for _, _, body in answers)
    assert bodies == ["ACCESS_NUMBER"] * 2 + ["NO_BALANCE"] * 4
    assert await call(client, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:4.00")
    assert upstream_balance(client) == "964.00"


async def test_budget_counts_the_price_clients_see(
    start_app: StartApp, store_path: str
) -> None:
    raw = sandbox_raw(
        store_path,
        keys=[{"key": KEY, "alias": "tester", "providers": ["sandbox"], "budget": 50}],
    )
    raw["providers"]["sandbox"]["markup"] = 1.5
    client = await start_app(parse_config(raw))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith("ACCESS_NUMBER:")
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:23.00",
    )
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200, TEXT, "NO_BALANCE",
    )  # fmt: skip


async def test_a_route_moves_on_to_a_provider_the_budget_affords(
    start_app: StartApp, store_path: str
) -> None:
    raw = sandbox_raw(
        store_path,
        keys=[
            {
                "key": KEY,
                "alias": "tester",
                "providers": ["dear", "cheap"],
                "budget": 30,
            }
        ],
        providers={
            "dear": {"type": "sandbox", "services": {"tg": {"price": 40}}},
            "cheap": {"type": "sandbox", "services": {"tg": {"price": 18}}},
        },
    )
    client = await start_app(parse_config(raw))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    activation = await engine_of(client).store.get(int(body.split(":")[1]))
    assert activation is not None and activation.provider == "cheap"
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:12.00",
    )


async def test_max_active_caps_open_numbers(
    start_app: StartApp, store_path: str
) -> None:
    client = await start_app(budget_config(store_path, max_active=2))
    ids = []
    for _ in range(2):
        _, _, body = await call(client, action="getNumber", service="tg", country=10)
        ids.append(body.split(":")[1])
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200, TEXT, "NO_NUMBERS",
    )  # fmt: skip
    # the other key is not capped
    _, _, body = await call(client, api_key=OTHER_KEY, action="getNumber", service="tg")
    assert body.startswith("ACCESS_NUMBER:")
    assert await call(client, action="setStatus", id=ids[0], status=8) == (
        200, TEXT, "ACCESS_CANCEL",
    )  # fmt: skip
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith("ACCESS_NUMBER:")


async def test_max_active_holds_under_concurrency(
    start_app: StartApp, store_path: str
) -> None:
    client = await start_app(budget_config(store_path, max_active=3))
    answers = await asyncio.gather(
        *(call(client, action="getNumber", service="tg", country=10) for _ in range(8))
    )
    bodies = sorted(body.split(":")[0] for _, _, body in answers)
    assert bodies == ["ACCESS_NUMBER"] * 3 + ["NO_NUMBERS"] * 5


async def test_hidden_upstream_balance(start_app: StartApp, store_path: str) -> None:
    client = await start_app(budget_config(store_path, show_upstream_balance=False))
    assert await call(client, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:0.00")
    # hidden, not refused: the key still buys
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith("ACCESS_NUMBER:")


def stored_spend(store_path: str, key_id: str) -> str:
    """What the store holds, summed independently of the server."""
    with sqlite3.connect(store_path) as db:
        rows = db.execute(
            "SELECT cost FROM activations WHERE key_id=?"
            " AND state NOT IN ('cancelled','expired')",
            (key_id,),
        ).fetchall()
    return str(sum((Decimal(cost) for (cost,) in rows), Decimal("0.00")))


async def test_spend_in_memory_follows_every_transition(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    client = await start_app(budget_config(store_path, budget=1000))
    engine = engine_of(client)
    key = engine.config.keys[0]
    assert str(await engine.store.spent(key.key_id)) == "0.00"  # loaded (and cached)
    ids = []
    for service in ("tg", "wa", "go", "fb", "ig", "tw"):
        _, _, body = await call(client, action="getNumber", service=service, country=10)
        ids.append(body.split(":")[1])
        assert str(await engine.store.spent(key.key_id)) == stored_spend(
            store_path, key.key_id
        )
    for ident in ids[:2]:
        await call(client, action="setStatus", id=ident, status=8)
    clock.advance(6)
    await call(client, action="getStatus", id=ids[2])
    await call(client, action="setStatus", id=ids[2], status=6)
    clock.advance(1200)
    await engine.lifecycle.sweep()
    expected = stored_spend(store_path, key.key_id)
    # tg and wa cancelled, go finished, fb, ig and tw expired: only go stays spent
    assert expected == "12.50"
    assert str(await engine.store.spent(key.key_id)) == expected


async def test_budget_over_http_in_a_foreign_currency(
    start_app: StartApp, store_path: str, aiohttp_server: Any
) -> None:
    """thuecodesim's fake on loopback, priced in VND (its helper sets min_interval: 0:
    this test is about money, not pacing)."""
    fake = thuecodesim.FakeThuecodesim()
    server = await aiohttp_server(fake.app)
    options = {**thuecodesim.provider_options(str(server.make_url("")).rstrip("/"))}
    options["markup"] = 1.25
    raw = {
        "store": {"path": store_path},
        "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
        "keys": [{"key": KEY, "alias": "vn", "providers": ["tcs"], "budget": 15}],
        "providers": {"tcs": options},
    }
    client = await start_app(parse_config(raw))
    # 1200 VND x 0.004 x 1.25 = 6.00 RUB a number: two fit in 15.00, a third does not
    for _ in range(2):
        _, _, body = await call(client, action="getNumber", service="tg", country=10)
        assert body.startswith("ACCESS_NUMBER:")
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200, TEXT, "NO_BALANCE",
    )  # fmt: skip
    assert await call(client, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:3.00")
    assert fake.paths_called().count("/request/getv2") == 2
    assert fake.balance == 1_000_000 - 2 * 1200
    # the reservation went upstream as the price cap, in the provider's own currency
    with sqlite3.connect(store_path) as db:
        caps = [json.loads(o)["max_price"] for (o,) in db.execute(
            "SELECT order_json FROM purchases ORDER BY id")]  # fmt: skip
    assert caps == ["1200", "1200"]


# ---- rents and extra activations spend the same budget ------------------------------


async def test_rents_and_their_prolongations_spend_the_budget(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    """Before: a key with a budget could rent (and prolong) without limit, and its
    getBalance never showed it."""
    client = await start_app(budget_config(store_path, budget=50))
    _, _, body = await call(client, action="getRentServicesAndCountries", country=10)
    cost = Decimal(str(json.loads(body)["services"]["tg"]["cost"]))
    _, _, rented = await call(
        client, action="getRentNumber", service="tg", country=10, rent_time=4
    )
    rent_id = json.loads(rented)["phone"]["id"]
    left = Decimal(50) - cost
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        f"ACCESS_BALANCE:{left:.2f}",
    )
    # what no longer fits is refused before any paid call, for rents and getNumber alike
    while left >= cost:
        _, _, more = await call(
            client, action="getRentNumber", service="tg", country=10, rent_time=4
        )
        assert json.loads(more)["status"] == "success", more
        left -= cost
    paid_upstream = upstream_balance(client)
    _, _, refused = await call(
        client, action="getRentNumber", service="tg", country=10, rent_time=4
    )
    assert json.loads(refused) == {"status": "error", "message": "NO_BALANCE"}
    _, _, longer = await call(
        client, action="continueRentNumber", id=rent_id, rent_time=4
    )
    assert json.loads(longer)["status"] == "error", longer
    assert upstream_balance(client) == paid_upstream  # nothing more was paid
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        f"ACCESS_BALANCE:{left:.2f}",
    )
    # a restart keeps the rents' spend
    await client.close()
    again = await start_app(budget_config(store_path, budget=50))
    assert await call(again, action="getBalance") == (
        200,
        TEXT,
        f"ACCESS_BALANCE:{left:.2f}",
    )
    # the other key, without a budget, still sees the upstream balance
    assert (await call(again, action="getBalance", api_key=OTHER_KEY))[2] != (
        f"ACCESS_BALANCE:{left:.2f}"
    )


async def test_a_paid_re_rent_on_retry_follows_the_money_rules(
    start_app: StartApp, store_path: str, aiohttp_server: Any, clock: FakeClock
) -> None:
    """thuecodesim with rerent_on_retry: setStatus 3 buys the same number again.
    Before: no attempt was stored before that paid call, the budget did not hold it,
    and the stored cost (and so getBalance) ignored the second charge. (The fake's
    helper sets min_interval: 0: this test is about money, not pacing.)"""
    fake = thuecodesim.FakeThuecodesim()
    server = await aiohttp_server(fake.app)
    options = thuecodesim.provider_options(str(server.make_url("")).rstrip("/"))
    options["rerent_on_retry"] = True
    raw = {
        "store": {"path": store_path},
        "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
        "keys": [{"key": KEY, "alias": "vn", "providers": ["tcs"], "budget": 10}],
        "providers": {"tcs": options},
    }
    client = await start_app(parse_config(raw))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    ident = int(body.split(":")[1])  # 1200 VND = 4.80 RUB
    [order] = fake.orders.values()
    fake.deliver(order.id, "Telegram code 12345", "12345")
    clock.advance(10)
    assert (await call(client, action="getStatus", id=ident))[2] == "STATUS_OK:12345"
    assert await call(client, action="setStatus", id=ident, status=3) == (
        200, TEXT, "ACCESS_RETRY_GET",
    )  # fmt: skip
    assert fake.balance == 1_000_000 - 2 * 1200  # charged twice upstream...
    stored = await engine_of(client).store.get(ident)
    assert stored is not None and stored.cost == Decimal("9.60")  # ...and here
    assert await call(client, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:0.40")
    with sqlite3.connect(store_path) as db:
        states = [s for (s,) in db.execute("SELECT state FROM purchases ORDER BY id")]
    assert states == ["confirmed", "reconciled"]  # the re-rent was recorded first
    # a third charge does not fit in 0.40: refused before any paid call
    [_, second] = sorted(fake.orders)
    fake.deliver(second, "Telegram code 67890", "67890")
    clock.advance(10)
    assert (await call(client, action="getStatus", id=ident))[2] == "STATUS_OK:67890"
    assert (await call(client, action="setStatus", id=ident, status=3))[2] == (
        "ACCESS_RETRY_GET"
    )  # the client waits for a further SMS on the same order
    assert len(fake.orders) == 2 and fake.balance == 1_000_000 - 2 * 1200


def drifting(store_path: str, drift: float, budget: float) -> Config:
    """The sandbox charging ``drift`` more than it lists (a price that moved between
    the quote and the purchase, or an upstream that ignores the price cap)."""
    raw = sandbox_raw(
        store_path,
        keys=[
            {"key": KEY, "alias": "tester", "providers": ["sandbox"], "budget": budget}
        ],
    )
    raw["providers"]["sandbox"]["price_drift"] = drift
    return parse_config(raw)


async def test_a_charge_above_what_the_budget_held_is_cancelled(
    start_app: StartApp, store_path: str
) -> None:
    """Before: the hold's cap went upstream as maxPrice, but an upstream that ignored
    it charged 38.00 against a budget of 30 and the key kept the number (and its
    getBalance went below what was spent)."""
    client = await start_app(drifting(store_path, drift=20, budget=30))
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200, TEXT, "NO_NUMBERS",
    )  # fmt: skip
    [stored] = await engine_of(client).store.for_key(
        engine_of(client).config.keys[0].key_id, open_only=False
    )
    assert (stored.state, stored.cost) == ("cancelled", Decimal("38.00"))
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:30.00",
    )


async def test_a_negative_price_never_grows_a_budget(
    start_app: StartApp, store_path: str
) -> None:
    """Before: an upstream answering a negative cost was stored as is (-500 made a
    budget of 20 read 520) and the metrics hook turned the purchase into ERROR_SQL."""
    client = await start_app(drifting(store_path, drift=-100, budget=50))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith("ACCESS_NUMBER:"), body
    stored = await engine_of(client).store.get(int(body.split(":")[1]))
    assert stored is not None and stored.cost == Decimal("18.00")  # the quoted price
    assert await call(client, action="getBalance") == (
        200,
        TEXT,
        "ACCESS_BALANCE:32.00",
    )


async def test_cancels_on_thuecodesim_give_no_budget_back(
    start_app: StartApp, store_path: str, aiohttp_server: Any
) -> None:
    """thuecodesim has no cancel call and keeps the money. Before: each cancel gave
    the key's budget back, so 10 x (getNumber + cancel) spent 60 RUB upstream on a
    budget of 7. (The fake's helper sets min_interval: 0: this test is about money.)"""
    fake = thuecodesim.FakeThuecodesim()
    server = await aiohttp_server(fake.app)
    raw = {
        "store": {"path": store_path},
        "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
        "keys": [{"key": KEY, "alias": "vn", "providers": ["tcs"], "budget": 7}],
        "providers": {
            "tcs": thuecodesim.provider_options(str(server.make_url("")).rstrip("/"))
        },
    }
    client = await start_app(parse_config(raw))
    answers = []
    for _ in range(3):
        _, _, body = await call(client, action="getNumber", service="tg", country=10)
        answers.append(body.split(":")[0])
        if body.startswith("ACCESS_NUMBER:"):
            ident = body.split(":")[1]
            assert (await call(client, action="setStatus", id=ident, status=8))[2] == (
                "ACCESS_CANCEL"
            )
    assert answers == ["ACCESS_NUMBER", "NO_BALANCE", "NO_BALANCE"]  # 4.80 each
    assert fake.balance == 1_000_000 - 1200
    assert await call(client, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:2.20")
    await client.close()  # a restart reads the same spend from the store
    again = await start_app(parse_config(raw))
    assert await call(again, action="getBalance") == (200, TEXT, "ACCESS_BALANCE:2.20")
