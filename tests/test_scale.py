"""Many activations (issue 9 item 4): a restart loads them whole, getActiveActivations
pages them, catalogue answers are rendered once per catalog change.

Correctness only; how fast and how small is bench/run.py's (j) and (k).
"""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
import time
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from compat_server.app import ENGINE, create_app
from compat_server.config import key_id, parse_config
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
from fakes import thuecodesim
from providers.vocabulary import Order, Purchase, Sms
from tests.conftest import (
    API,
    KEY,
    OTHER_KEY,
    T0,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
)

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
        empty = [a.extra for a in loaded if not a.extra]
        assert len(empty) > 1 and len({id(e) for e in empty}) == 1
        with pytest.raises(TypeError):
            empty[0]["changed"] = "in place"  # replaced, never changed in place
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


# ---- getActiveActivations: pages, never one body of every number ----------------------

ACTIVE_CAP = 100  # a page at most (Hero/Tiger: limit <= 100); classic: the oldest 100


def _row(activation: Activation) -> dict[str, Any]:
    """The getActiveActivations row of a sandbox tg/VN activation still waiting."""
    return {
        "activationId": str(activation.id),
        "serviceCode": "tg",
        "phoneNumber": activation.phone,
        "activationCost": 18.0,
        "activationStatus": "1",
        "smsCode": None,
        "smsText": None,
        "activationTime": time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(activation.created_at)
        ),
        "discount": "0.00",
        "repeated": "0",
        "countryCode": "10",
        "countryName": "Vietnam",
        "canGetAnotherSms": "1",
        "currency": 643,
    }


def _page(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"status": "success", "activeActivations": rows, "data": rows}


NONE_ACTIVE = {"status": "error", "error": "NO_ACTIVATIONS"}


def _json_text(value: Any) -> str:
    """A JSON body as the dialect writes it (compact, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.fixture
async def many(
    aiohttp_server: Any, store_path: str, clock: FakeClock
) -> tuple[TestServer, list[Activation]]:
    """The app on the sandbox with 105 waiting numbers bought by KEY (and one by the
    other key, which no page of KEY may show)."""
    raw = sandbox_raw(store_path)
    raw["providers"]["sandbox"].update(balance=100_000, sms_delay=10**6)  # no SMS
    server: TestServer = await aiohttp_server(
        create_app(parse_config(raw), clock=clock, background=False)
    )
    async with aiohttp.ClientSession() as session:
        for index in range(106):
            params = {"api_key": OTHER_KEY if index == 50 else KEY,
                      "action": "getNumber", "service": "tg", "country": "10"}  # fmt: skip
            async with session.get(server.make_url(API), params=params) as resp:
                assert (await resp.text()).startswith("ACCESS_NUMBER:")
            clock.advance(1)
    store = server.app[ENGINE].store
    mine = await store.for_key(key_id(KEY))
    assert len(mine) == 105
    return server, mine


@pytest.mark.parametrize("library", ["smsactivate", "smsactivatepy"])
async def test_a_classic_client_gets_the_oldest_hundred(
    many: tuple[TestServer, list[Activation]], library: str
) -> None:
    module = __import__(f"{library}.api", fromlist=["SMSActivateAPI"])
    server, mine = many
    api = module.SMSActivateAPI(KEY)
    api._SMSActivateAPI__api_url = str(server.make_url(API))
    answer = await asyncio.to_thread(api.getActiveActivations)
    assert answer == _page([_row(a) for a in mine[:ACTIVE_CAP]])


async def test_aiosmsactivate_gets_the_same_first_page(
    many: tuple[TestServer, list[Activation]],
) -> None:
    from aiosmsactivate import SmsActivate

    server, mine = many
    client = SmsActivate(KEY, base_url=str(server.make_url(API)))
    assert await client.get_active_activations() == _page(
        [_row(a) for a in mine[:ACTIVE_CAP]]
    )


async def test_herosms_pages_through_every_number(
    many: tuple[TestServer, list[Activation]],
) -> None:
    from herosms import HeroSMSClient

    server, mine = many
    base = str(server.make_url(API))
    async with HeroSMSClient(KEY, base_url=base, retry_attempts=1) as client:
        first = await client.get_active_activations()  # its default: limit 100
        second = await client.get_active_activations(start=100)
        past = await client.get_active_activations(start=105)
        raw = await client.get_active_activations(
            start=3, limit=2, response_format="raw"
        )
    assert [a.activation_id for a in first] == [a.id for a in mine[:100]]
    assert [a.activation_id for a in second] == [a.id for a in mine[100:]]
    assert past == []
    assert json.loads(raw) == _page([_row(a) for a in mine[3:5]])  # raw: its text


@pytest.mark.parametrize(
    ("query", "window"),
    [
        ({}, (0, 100)),  # classic: no paging parameters
        ({"start": "0"}, (0, 50)),  # Hero/Tiger: limit 50 unless told
        ({"limit": "7"}, (0, 7)),
        ({"start": "98", "limit": "5"}, (98, 103)),
        ({"start": "100", "limit": "100"}, (100, 105)),
        ({"limit": "1000"}, (0, 100)),  # never more than a page
        ({"limit": "0"}, (0, 50)),
    ],
)
async def test_pages_are_windows_of_the_oldest_first(
    many: tuple[TestServer, list[Activation]],
    query: dict[str, str],
    window: tuple[int, int],
) -> None:
    server, mine = many
    async with aiohttp.ClientSession() as session:
        params = {"api_key": KEY, "action": "getActiveActivations", **query}
        async with session.get(server.make_url(API), params=params) as resp:
            got = (resp.status, resp.content_type, await resp.text())
    rows = [_row(a) for a in mine[window[0] : window[1]]]
    assert got == (200, "application/json", _json_text(_page(rows)))


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ({"start": "105"}, _json_text(NONE_ACTIVE)),
        ({"start": "-1"}, "ERROR_SQL"),
        ({"limit": "ten"}, "ERROR_SQL"),
    ],
)
async def test_a_page_past_the_end_or_malformed(
    many: tuple[TestServer, list[Activation]], query: dict[str, str], body: str
) -> None:
    server, _ = many
    async with aiohttp.ClientSession() as session:
        params = {"api_key": KEY, "action": "getActiveActivations", **query}
        async with session.get(server.make_url(API), params=params) as resp:
            got = (resp.status, await resp.text())
    assert got == (200, body)


async def test_only_the_page_is_polled_upstream(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    """30 numbers open, a page of 10 asked: 10 polls, of those 10 numbers. (The fake's
    min_interval 0: this test is about which numbers are polled, not pacing.)"""
    fake = thuecodesim.FakeThuecodesim()
    upstream: TestServer = await aiohttp_server(fake.app)
    config = parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
            "keys": [{"key": KEY, "alias": "farm", "providers": ["thuecodesim"]}],
            "providers": {
                "thuecodesim": thuecodesim.provider_options(
                    str(upstream.make_url("")).rstrip("/")
                )
            },
        }
    )
    client = await start_app(config)
    for _ in range(30):
        _, _, body = await call(client, action="getNumber", service="tg", country=10)
        assert body.startswith("ACCESS_NUMBER:")
    mine = await engine_of(client).store.for_key(key_id(KEY))
    clock.advance(60)  # every number is due for a poll
    fake.calls.clear()
    status, ctype, body = await call(
        client, action="getActiveActivations", start=10, limit=10
    )
    polled = [p["requestId"] for path, p in fake.calls if path == "/session/getv2"]
    assert sorted(polled) == sorted(a.upstream_id for a in mine[10:20])
    assert (status, ctype) == (200, "application/json")
    assert [r["activationId"] for r in json.loads(body)["data"]] == [
        str(a.id) for a in mine[10:20]
    ]


# ---- catalogue answers: rendered once per catalog change ------------------------------

OTHER = key_id(OTHER_KEY)


def _tcs_config(store_path: str, url: str) -> Any:
    """KEY on thuecodesim as is, OTHER_KEY on the same account with a 1.5 markup."""
    return parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
            "upstream": {"catalog_ttl": 60},
            "keys": [
                {"key": KEY, "alias": "plain", "providers": ["tcs"]},
                {"key": OTHER_KEY, "alias": "marked", "providers": ["tcs2"]},
            ],
            "providers": {
                "tcs": thuecodesim.provider_options(url),
                "tcs2": {**thuecodesim.provider_options(url), "markup": 1.5},
            },
        }
    )


def _prices(cost: float, count: int) -> str:
    return _json_text({"10": {"tg": {"cost": cost, "count": count,
                                     "physicalCount": count}}})  # fmt: skip


async def _settled(client: Any) -> None:
    """Wait for the catalog refreshes running in the background."""
    cache = engine_of(client).catalog.cache
    while cache._inflight:
        await asyncio.gather(*cache._inflight.values(), return_exceptions=True)


async def test_get_prices_is_rendered_again_only_when_the_catalog_changes(
    aiohttp_server: Any, start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    """(min_interval 0: this test is about the answer cache, not pacing.)"""
    fake = thuecodesim.FakeThuecodesim()
    upstream: TestServer = await aiohttp_server(fake.app)
    client = await start_app(
        _tcs_config(store_path, str(upstream.make_url("")).rstrip("/"))
    )
    answers = engine_of(client).catalog.answers
    tg = {"action": "getPrices", "country": 10, "service": "tg"}
    first = await call(client, **tg)
    count = json.loads(first[2])["10"]["tg"]["count"]
    assert first == (200, "application/json", _prices(4.8, count))
    listed = fake.paths_called().count("/service/getv2")
    assert await call(client, **tg) == first
    assert (answers.renders, answers.hits) == (1, 1)
    fake.services["vn"][4]["price"] = 1500  # Telegram: 1200 -> 1500 VND
    clock.advance(30)  # the catalog is still fresh: the same bytes again
    assert await call(client, **tg) == first
    assert (answers.renders, answers.hits) == (1, 2)
    assert fake.paths_called().count("/service/getv2") == listed
    clock.advance(31)  # expired: served stale once while the refresh runs
    assert await call(client, **tg) == first
    assert answers.renders == 2
    await _settled(client)
    fresh = (200, "application/json", _prices(6.0, count))
    assert await call(client, **tg) == fresh
    assert await call(client, **tg) == fresh
    assert (answers.renders, answers.hits) == (3, 3)


async def test_a_kept_answer_never_reaches_another_key_or_other_parameters(
    aiohttp_server: Any, start_app: StartApp, store_path: str
) -> None:
    fake = thuecodesim.FakeThuecodesim()
    upstream: TestServer = await aiohttp_server(fake.app)
    client = await start_app(
        _tcs_config(store_path, str(upstream.make_url("")).rstrip("/"))
    )
    tg = {"action": "getPrices", "country": 10, "service": "tg"}
    plain = await call(client, **tg)
    count = json.loads(plain[2])["10"]["tg"]["count"]
    marked = (200, "application/json", _prices(7.2, count))
    assert plain == (200, "application/json", _prices(4.8, count))
    for _ in range(2):
        assert await call(client, api_key=OTHER_KEY, **tg) == marked
        assert await call(client, **tg) == plain
    laos = await call(client, action="getPrices", country=25, service="tg")
    assert json.loads(laos[2]) == {
        "25": {"tg": {"cost": 12.0, "count": count, "physicalCount": count}}
    }
    whole = json.loads((await call(client, action="getPrices", country=10))[2])
    assert (
        sorted(whole["10"]) != ["tg"]
        and whole["10"]["tg"] == json.loads(plain[2])["10"]["tg"]
    )
    answers = engine_of(client).catalog.answers
    assert (answers.renders, answers.hits, len(answers)) == (4, 3, 4)


async def test_an_answer_built_before_an_entry_came_in_is_not_reused(
    clock: FakeClock,
) -> None:
    from compat_server.catalog import READS, Reads, TtlCache

    cache = TtlCache(60, clock)
    gate = asyncio.Event()

    async def slow() -> list[str]:
        await gate.wait()
        return ["loaded"]

    async def fast() -> list[str]:
        return ["there"]

    assert await cache.get("b", fast, []) == ["there"]
    reads = Reads()
    scope = READS.set(reads)
    try:
        assert await cache.get("b", fast, []) == ["there"]  # a hit
        assert await cache.get("a", slow, [], wait=0) == []  # not in yet
    finally:
        READS.reset(scope)
    assert reads.fresh(clock())
    gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await cache.get("a", slow, []) == ["loaded"]
    assert not reads.fresh(clock())  # what was missing came in
    later = Reads()
    scope = READS.set(later)
    try:
        await cache.get("a", slow, [])
    finally:
        READS.reset(scope)
    assert later.fresh(clock())
    clock.advance(60)
    assert not later.fresh(clock())  # expired


@pytest.mark.parametrize(
    "params",
    [
        {"action": "getPrices"},
        {"action": "getPrices", "country": "10"},
        {"action": "getNumbersStatus", "country": "10"},
        {"action": "getNumbersStatus"},
        {"action": "getCountries"},
        {"action": "getOperators", "country": "10"},
        {"action": "getServicesList"},
        {"action": "getServicesList", "country": "0", "lang": "ru"},
        {"action": "getTopCountriesByService", "service": "tg"},
        {"action": "getTopCountriesByServiceRank", "freePrice": "true"},
        {"action": "getCountryAndOperators", "lang": "ru"},
        {"action": "getServicesAndCost", "country": "10"},
    ],
)
async def test_every_catalogue_answer_is_sent_again_as_rendered(
    start_app: StartApp, store_path: str, params: dict[str, str]
) -> None:
    client = await start_app(parse_config(sandbox_raw(store_path)))
    answers = engine_of(client).catalog.answers
    first = await call(client, **params)
    assert first[:2] == (200, "application/json")
    assert await call(client, **params) == first
    assert await call(client, **params) == first
    assert (answers.renders, answers.hits) == (1, 2)
    # the other key has the same providers, and still gets an answer of its own
    assert await call(client, api_key=OTHER_KEY, **params) == first
    assert (answers.renders, answers.hits) == (2, 2)


async def test_a_reload_renders_again_with_the_new_markup(
    start_app: StartApp, store_path: str
) -> None:
    from compat_server import ops

    client = await start_app(parse_config(sandbox_raw(store_path)))
    tg = {"action": "getPrices", "country": "10", "service": "tg"}
    assert await call(client, **tg) == (200, "application/json", _prices(18.0, 420))
    raw = sandbox_raw(store_path)
    raw["providers"]["sandbox"]["markup"] = 1.5
    engine = engine_of(client)
    ops.apply(engine, parse_config(raw), None)
    assert await call(client, **tg) == (200, "application/json", _prices(27.0, 420))


async def test_a_keys_open_numbers_stay_oldest_first_however_they_were_stored(
    store_path: str, clock: FakeClock
) -> None:
    store = await SqliteStore.open(store_path, clock)
    try:
        order = Order("tg", 10)

        def bought(n: int) -> NewActivation:
            purchase = Purchase(f"9{n}", f"8490000000{n}", Decimal("18"))
            return NewActivation(KEY_A, "sandbox", "RUB", order, purchase,
                                 Decimal("18.00"), T0 + n, 1200.0)  # fmt: skip

        first = await store.begin_purchase(KEY_A, "sandbox", order, T0)
        second = await store.begin_purchase(KEY_A, "sandbox", order, T0)
        late = await store.complete_purchase(second, bought(2))  # answered first
        early = await store.complete_purchase(first, bought(1))
        other = await store.complete_purchase(None, bought(3))
        assert early.id < late.id < other.id
        assert await store.for_key(KEY_A) == [early, late, other]
        await store.set_state(early, CANCELLED, T0 + 5)
        assert await store.for_key(KEY_A) == [late, other]
        await store.set_state(early, WAIT_CODE, T0 + 6)  # a refused cancel: open again
        assert await store.for_key(KEY_A) == [early, late, other]
        for activation in (early, late, other):
            await store.set_state(activation, FINISHED, T0 + 7)
        assert await store.for_key(KEY_A) == []
        assert store.open_activations() == []
    finally:
        await store.close()
