"""One handler per wire action: parameters in, a dialect reply out.

Handlers raise our exceptions for every error (``dialect.render_errors`` turns them into
tokens) and build replies only through ``dialect`` helpers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar

from compat_server import dialect, reactivation
from compat_server.catalog import READS, Catalog, Reads, key_providers, volatile
from compat_server.config import Config, KeyConfig
from compat_server.dialect import Reply, Token, money, money_number, param, token
from compat_server.engine import Engine
from compat_server.errors import BadStatus, ClientGone, NoActivation
from compat_server.lifecycle import Lifecycle
from compat_server.reactivation import Reactivation
from compat_server.rentals import Rentals
from compat_server.routing import Prices, Upstreams
from compat_server.store import CODE, WAIT_CODE, WAIT_RETRY, Activation, Store
from providers.vocabulary import (
    BACKGROUND,
    BUDGET,
    CLIENT,
    Budget,
    Clock,
    NoBalance,
    NoNumbers,
    Offer,
    Order,
    ProviderError,
    UnknownService,
)


@dataclass
class Call:
    """One authenticated request, with the rooms its handler works with.

    The rooms are the app's own (built once by the Engine); ``config`` is the one in
    force when the request arrived (a SIGHUP reload swaps it between requests).
    """

    key: KeyConfig
    params: Mapping[str, str]
    config: Config
    store: Store
    clock: Clock
    upstreams: Upstreams
    prices: Prices
    catalog: Catalog
    lifecycle: Lifecycle
    rentals: Rentals
    reactivation: Reactivation
    buy: Callable[[KeyConfig, Order], Awaitable[Activation]]
    provider: str = "-"  # filled in by handlers that touch one provider, for the log
    activation: Activation | None = None  # bought or acted on, for the log

    @classmethod
    def of(cls, engine: Engine, key: KeyConfig, params: Mapping[str, str]) -> Call:
        """The call for ``key``, bound to the engine's rooms."""
        return cls(
            key, params, engine.config, engine.store, engine.clock, engine.upstreams,
            engine.prices, engine.catalog, engine.lifecycle, engine.rentals,
            engine.reactivation, engine.buy,
        )  # fmt: skip

    def providers(self) -> list[str]:
        """Every provider the caller's key can reach (see catalog.key_providers)."""
        return key_providers(self.config, self.key)


Action = Callable[[Call], Awaitable[Reply]]

PRICES_DEADLINE = 5.0  # seconds getPrices without a country waits for catalogs
# getNumbersStatus asks these one by one where a provider's bulk catalog failed (each
# is a paced upstream call, so only the most used)
FALLBACK_SERVICES = ("tg", "wa", "go", "fb", "ig", "vk", "ot")


@lru_cache(maxsize=1)
def reference() -> dict[str, Any]:
    """sms-activate's country, operator and service tables (shipped data)."""
    data = (
        resources.files("compat_server")
        .joinpath("data/reference.json")
        .read_text("utf-8")
    )
    result: dict[str, Any] = json.loads(data)
    return result


def _timestamp(seconds: float) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in server local time, as the original answered."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


async def _activation(call: Call) -> Activation:
    """The activation named by ``id``, if it belongs to the caller's key."""
    wanted = dialect.activation_id(call.params)
    activation = await call.store.get(wanted)
    if activation is None or activation.key_id != call.key.key_id:
        raise NoActivation(str(wanted))
    call.provider = activation.provider
    call.activation = activation
    return activation


async def _default_country(call: Call) -> int:
    if call.key.default_country is not None:
        return call.key.default_country
    for name in call.providers():
        countries = call.upstreams.providers[name].countries()
        if countries:
            return countries[0]
    return 0


# ---- money ---------------------------------------------------------------------------


async def get_balance(call: Call) -> Reply:
    """``ACCESS_BALANCE:<amount>``, always with two decimals."""
    return token(Token.ACCESS_BALANCE, money(await call.catalog.balance(call.key)))


# ---- numbers -------------------------------------------------------------------------


async def _order(call: Call) -> Order:
    service = param(call.params, "service").lower()
    if not service or len(service) > 16:
        raise UnknownService("request", "service missing")
    if param(call.params, "forward") == "1":
        raise NoNumbers("request", "no numbers with call forwarding")
    country = dialect.country_param(call.params)
    return Order(
        service=service,
        country=await _default_country(call) if country is None else country,
        operators=tuple(
            o for o in dialect.list_param(call.params, "operator") if o != "any"
        ),
        exclude_prefixes=dialect.exception_prefixes(call.params),
        max_price=dialect.money_param(call.params, "maxPrice", "max_price"),
    )


async def _buy(call: Call) -> Activation:
    """Buy for the caller; a number whose client left meanwhile is released."""
    activation = await paid(
        call.buy(call.key, await _order(call)), call.lifecycle.abandoned
    )
    call.provider = activation.provider
    call.activation = activation
    return activation


T = TypeVar("T")


async def paid(purchase: Awaitable[T], abandon: Callable[[T], Awaitable[None]]) -> T:
    """Run a paid call for the request; what it bought for a client that left meanwhile
    goes to ``abandon`` (released upstream where possible) instead of being kept
    silently, and ClientGone is raised (nobody reads the answer).

    The purchase runs in its own task: a handler cancelled by a disconnect never
    interrupts a paid call half-way (its outcome would be unknown).
    """
    alive = BUDGET.get().alive
    task = asyncio.ensure_future(purchase)
    try:
        bought = await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(functools.partial(_abandon_later, abandon))
        raise
    if not alive():
        await _detached(abandon, bought)
        raise ClientGone("request", "client left before its answer")
    return bought


async def _detached(abandon: Callable[[T], Awaitable[None]], bought: T) -> None:
    """``abandon(bought)`` outside the request's budget: its client has left, and the
    release must still reach the upstream."""
    scope = BUDGET.set(Budget())
    try:
        await abandon(bought)
    finally:
        BUDGET.reset(scope)


def _abandon_later(
    abandon: Callable[[Any], Awaitable[None]], task: asyncio.Future[Any]
) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    future = asyncio.ensure_future(_detached(abandon, task.result()))
    _PENDING.add(future)
    future.add_done_callback(_PENDING.discard)


_PENDING: set[asyncio.Future[None]] = set()  # abandon() calls that outlive a handler


async def get_number(call: Call) -> Reply:
    """``ACCESS_NUMBER:<id>:<phone>``; the activation is stored before this returns."""
    activation = await _buy(call)
    return token(Token.ACCESS_NUMBER, activation.id, activation.phone)


async def get_number_v2(call: Call) -> Reply:
    """getNumberV2 JSON with the documented field types."""
    activation = await _buy(call)
    return {
        "activationId": activation.id,
        "phoneNumber": activation.phone,
        "activationCost": money_number(activation.cost),
        "currency": call.config.currency_number,
        "countryCode": str(activation.country),
        "canGetAnotherSms": "1",
        "activationTime": _timestamp(activation.created_at),
        "activationEndTime": _timestamp(activation.expires_at),
        "activationEnd": _timestamp(activation.expires_at),  # grizzly-style clients
        "activationOperator": activation.operator or "any",
    }


# ---- status --------------------------------------------------------------------------


async def get_status(call: Call) -> Reply:
    """One of the five STATUS_* bodies."""
    activation = await _activation(call)
    view = await call.lifecycle.look(activation)
    if view.state == CODE:
        return token(Token.STATUS_OK, dialect.safe_code(view.code))
    if view.state == WAIT_RETRY:
        return token(Token.STATUS_WAIT_RETRY, dialect.safe_code(view.previous_code))
    if view.state == WAIT_CODE:
        return Token.STATUS_WAIT_CODE.value
    return Token.STATUS_CANCEL.value


async def get_status_v2(call: Call) -> Reply:
    """JSON with ``sms`` null while waiting; plain STATUS_CANCEL once closed."""
    activation = await _activation(call)
    view = await call.lifecycle.look(activation)
    if view.state not in (CODE, WAIT_RETRY, WAIT_CODE):
        return Token.STATUS_CANCEL.value
    sms = None
    if view.state == CODE:
        sms = {
            "dateTime": _timestamp(view.received_at),
            "code": dialect.safe_code(view.code),
            "text": view.text,
        }
    return {"verificationType": 0, "sms": sms, "call": None}


async def get_full_sms(call: Call) -> Reply:
    """``FULL_SMS:<text>`` of the newest SMS; STATUS_WAIT_CODE before; STATUS_CANCEL after."""
    activation = await _activation(call)
    view = await call.lifecycle.look(activation)
    if view.state == CODE:
        return token(Token.FULL_SMS, view.text)
    if view.state in (WAIT_CODE, WAIT_RETRY):
        return Token.STATUS_WAIT_CODE.value
    return Token.STATUS_CANCEL.value


async def set_status(call: Call) -> Reply:
    """1 ready, 3 another SMS, 6 finish, 8/-1 cancel -> exactly one ACCESS_* token."""
    status = param(call.params, "status")
    activation = await _activation(call)
    if activation.is_open and call.clock() >= activation.expires_at:
        await call.lifecycle.expire(activation)
    if status == "1":
        await call.lifecycle.ready(activation)
        return Token.ACCESS_READY.value
    if status == "3":
        await call.lifecycle.retry(activation)
        return Token.ACCESS_RETRY_GET.value
    if status == "6":
        await call.lifecycle.finish(activation)
        return Token.ACCESS_ACTIVATION.value
    if status in ("8", "-1"):
        await call.lifecycle.cancel(activation)
        return Token.ACCESS_CANCEL.value
    raise BadStatus(status[:8])


# getActiveActivations pages (protocol.md 3.16): Hero and Tiger take ``start`` and
# ``limit`` (at most 100, default 50). A classic client sends neither and cannot page:
# it gets the oldest ACTIVE_PAGE_MAX, the numbers nearest their expiry (README).
ACTIVE_PAGE_MAX = 100
ACTIVE_PAGE_DEFAULT = 50


def active_window(params: Mapping[str, str]) -> tuple[int, int]:
    """(start, limit) of the getActiveActivations page asked for, oldest first."""
    start = dialect.count_param(params, "start")
    limit = dialect.count_param(params, "limit")
    if start is None and limit is None:
        return 0, ACTIVE_PAGE_MAX
    return start or 0, min(limit or ACTIVE_PAGE_DEFAULT, ACTIVE_PAGE_MAX)


async def get_active_activations(call: Call) -> Reply:
    """One page of the key's open activations (oldest first), under both
    ``activeActivations`` and ``data``; NO_ACTIVATIONS past the last."""
    rows = []
    start, limit = active_window(call.params)
    activations = (await call.store.for_key(call.key.key_id))[start : start + limit]
    # only the page is brought up to date, side by side: each waits at most POLL_WAIT
    # for a slow upstream, so the page is answered within that too
    views = await asyncio.gather(*(call.lifecycle.look(a) for a in activations))
    for activation, view in zip(activations, views, strict=True):
        if not activation.is_open:
            continue
        codes = [dialect.safe_code(m.code) for m in activation.messages]
        rows.append(
            {
                "activationId": str(activation.id),
                "serviceCode": activation.service,
                "phoneNumber": activation.phone,
                "activationCost": money_number(activation.cost),
                "activationStatus": {WAIT_CODE: "1", WAIT_RETRY: "3", CODE: "2"}[
                    view.state
                ],
                "smsCode": codes or None,
                "smsText": json.dumps(
                    [m.text for m in activation.messages], ensure_ascii=False
                )
                if activation.messages
                else None,
                "activationTime": _timestamp(activation.created_at),
                "discount": "0.00",
                "repeated": "1" if activation.retry_mark else "0",
                "countryCode": str(activation.country),
                "countryName": _country_name(activation.country),
                "canGetAnotherSms": "1",
                "currency": call.config.currency_number,
            }
        )
    if not rows:
        return {"status": "error", "error": Token.NO_ACTIVATIONS.value}
    return {"status": "success", "activeActivations": rows, "data": rows}


# ---- catalog -------------------------------------------------------------------------


def reused(*names: str) -> Callable[[Action], Action]:
    """A catalogue action whose rendered answer is kept and sent again until the
    catalog changes (catalog.Answers): one per api key, action and the values of the
    parameters ``names`` (and the countries the key's providers serve, which a
    clone's table can change)."""

    def wrap(handler: Action) -> Action:
        @functools.wraps(handler)
        async def answer(call: Call) -> Reply:
            providers = call.upstreams.providers
            key = (
                handler.__name__,
                call.key.key_id,
                tuple(param(call.params, name) for name in names),
                tuple(tuple(providers[n].countries()) for n in call.providers()),
            )
            answers = call.catalog.answers
            kept: dialect.Rendered | None = answers.get(key, call.clock())
            if kept is not None:
                return kept
            reads = Reads()
            scope = READS.set(reads)
            try:
                reply = await handler(call)
            finally:
                READS.reset(scope)
            made = dialect.rendered(reply)
            answers.put(key, made, len(made.body), reads)
            return made

        return answer

    return wrap


async def _stock(
    call: Call,
    country: int,
    operators: tuple[str, ...] = (),
    want: tuple[str, ...] = (),
    only_empty: bool = False,
    priority: int = CLIENT,
) -> dict[str, tuple[Decimal, int]]:
    """service -> (lowest display price, total count) over the key's providers.

    With ``operators``, a provider that names its operators in the country counts only
    if it has one of them; a provider that names none sells any operator. Services in
    ``want`` that a provider's catalog lacks (with ``only_empty``: only when its
    catalog came back empty) are asked one by one through ``service_offer``.
    """
    merged: dict[str, tuple[Decimal, int]] = {}

    def add(name: str, offer: Offer) -> None:
        price = call.prices.display(name, offer.price)
        if offer.service in merged:
            old_price, old_count = merged[offer.service]
            merged[offer.service] = (min(old_price, price), old_count + offer.count)
        else:
            merged[offer.service] = (price, offer.count)

    singles: list[tuple[str, asyncio.Future[Offer | None]]] = []
    for name in call.providers():
        provider = call.upstreams.providers[name]
        named = provider.operators(country)
        if operators and named and not set(operators) & set(named):
            continue
        offers = await call.catalog.offers(name, country, priority)
        for offer in offers:
            add(name, offer)
        if country not in provider.countries() or (only_empty and offers):
            continue
        have = {o.service for o in offers}
        for code in want:
            if code not in have:
                singles.append((name, _single_offer(call, name, country, code)))
    if singles:
        await asyncio.wait([f for _, f in singles], timeout=PRICES_DEADLINE)
        for name, future in singles:
            if future.done() and not future.exception() and future.result():
                add(name, future.result())  # type: ignore[arg-type]
    return merged


_BACKGROUND: set[asyncio.Future[Any]] = set()


def _single_offer(
    call: Call, name: str, country: int, code: str
) -> asyncio.Future[Offer | None]:
    """One service_offer call, guarded; it runs on past the deadline to fill caches.

    Its offer is not in the catalog cache: an answer that asked for one is not reused.
    """
    volatile()
    provider = call.upstreams.providers[name]

    async def ask() -> Offer | None:
        try:
            return await call.upstreams.call(
                name, "serviceprice", lambda: provider.service_offer(country, code)
            )
        except ProviderError:
            return None

    future = asyncio.ensure_future(ask())
    _BACKGROUND.add(future)
    future.add_done_callback(_BACKGROUND.discard)
    return future


async def _stocks(
    call: Call, countries: list[int]
) -> dict[int, dict[str, tuple[Decimal, int]]]:
    """Stock of several countries, fetched side by side within PRICES_DEADLINE.

    Countries whose catalog is not in within the deadline are left out of this answer;
    their fetches go on in the background and fill the cache for the next call (a
    provider that paces its calls could otherwise keep getPrices busy for minutes).
    """
    if len(countries) == 1:
        return {countries[0]: await _stock(call, countries[0])}
    # a sweep no client should wait on: paced behind purchases, polls and balances
    tasks = {
        c: asyncio.ensure_future(_stock(call, c, priority=BACKGROUND))
        for c in countries
    }
    await asyncio.wait(tasks.values(), timeout=PRICES_DEADLINE)
    return {c: t.result() for c, t in tasks.items() if t.done() and not t.exception()}


async def _countries(call: Call) -> list[int]:
    found: set[int] = set()
    for name in call.providers():
        found.update(call.upstreams.providers[name].countries())
    return sorted(found)


@reused("country", "service")
async def get_prices(call: Call) -> Reply:
    """``{"<country>":{"<service>":{"cost":x,"count":n,"physicalCount":n}}}``."""
    country = dialect.country_param(call.params)
    service = param(call.params, "service").lower()
    countries = [country] if country is not None else await _countries(call)
    if service and len(countries) == 1:
        stocks = {countries[0]: await _stock(call, countries[0], want=(service,))}
    else:
        stocks = await _stocks(call, countries)
    result: dict[str, Any] = {}
    for country_id in countries:
        services = {}
        for code, (price, count) in sorted(stocks.get(country_id, {}).items()):
            if service and code != service:
                continue
            services[code] = {
                "cost": money_number(price),
                "count": count,
                "physicalCount": count,
            }
        if services:
            result[str(country_id)] = services
    return result


@reused("country", "operator")
async def get_numbers_status(call: Call) -> Reply:
    """``{"<service>_0":"<count>"}`` with every legacy key present ("0" if none)."""
    country = dialect.country_param(call.params)
    if country is None:
        country = await _default_country(call)
    operators = tuple(
        o for o in dialect.list_param(call.params, "operator") if o != "any"
    )
    counts = {key: "0" for key in dialect.LEGACY_STOCK_KEYS}
    stock = await _stock(
        call, country, operators, want=FALLBACK_SERVICES, only_empty=True
    )
    for code, (_, count) in sorted(stock.items()):
        counts[f"{code}_0"] = str(count)
    return counts


@lru_cache(maxsize=1)
def _country_rows() -> dict[int, dict[str, Any]]:
    """sms-activate's country table keyed by id."""
    return {row["id"]: row for row in reference()["countries"]}


def _country_name(country: int) -> str:
    row = _country_rows().get(country)
    return str(row["eng"]) if row else str(country)


@reused()
async def get_countries(call: Call) -> Reply:
    """Countries the key's providers serve (or rent in), keyed by id.

    ``rent`` is 1 where a provider of the key rents numbers; ``multiService`` stays 0
    since no backend sells one number for several services (getMultiServiceNumber
    answers NOT_AVAILABLE).
    """
    rows = _country_rows()
    result = {}
    renting = set(rent_countries(call))
    for country in sorted(set(await _countries(call)) | renting):
        row = rows.get(country, {"eng": str(country), "rus": str(country)})
        result[str(country)] = {
            "id": country,
            "rus": row["rus"],
            "eng": row["eng"],
            "chn": row["eng"],
            "visible": 1,
            "retry": 1,
            "rent": 1 if country in renting else 0,
            "multiService": 0,
        }
    return result


@reused("country")
async def get_operators(call: Call) -> Reply:
    """``countryOperators`` per served country; OPERATORS_NOT_FOUND for none."""
    country = dialect.country_param(call.params)
    countries = [country] if country is not None else await _countries(call)
    served = set(await _countries(call))
    table = reference()["operators"]
    result: dict[str, list[str]] = {}
    for country_id in countries:
        if country_id not in served:
            continue
        names: list[str] = []
        for name in call.providers():
            names.extend(call.upstreams.providers[name].operators(country_id))
        if not names:
            names = list(table.get(str(country_id), []))
        if names:
            result[str(country_id)] = list(dict.fromkeys(["any", *names]))
    if not result:
        return {"status": "error", "error": Token.OPERATORS_NOT_FOUND.value}
    return {"status": "success", "countryOperators": result}


def rent_countries(call: Call) -> list[int]:
    """Countries where a provider of the key rents numbers."""
    return call.rentals.countries(call.key)


def service_name(code: str) -> str:
    """The service's display name from sms-activate's table (the code if unknown)."""
    return str(reference()["services"].get(code, code))


@reused("country", "lang")
async def get_services_list(call: Call) -> Reply:
    """``{"status":"success","services":[{"code","name"}]}``: what the key can buy.

    With ``country``, the services on sale there; without, those of every served
    country (within PRICES_DEADLINE). ``lang`` is accepted; names are English.
    """
    country = dialect.country_param(call.params)
    countries = [country] if country is not None else await _countries(call)
    codes: set[str] = set()
    for stock in (await _stocks(call, countries)).values():
        codes.update(stock)
    services = [{"code": c, "name": service_name(c)} for c in sorted(codes)]
    return {"status": "success", "services": services}


def _top_rows(
    offers: list[tuple[int, Decimal, int]], free_price: bool
) -> dict[str, Any]:
    """Rank-keyed rows, cheapest first (then the larger stock)."""
    rows: dict[str, Any] = {}
    ranked = sorted(offers, key=lambda o: (o[1], -o[2], o[0]))
    for rank, (country, price, count) in enumerate(ranked):
        row: dict[str, Any] = {
            "country": country,
            "count": count,
            "price": money_number(price),
            "retail_price": money_number(price),
        }
        if free_price:
            row["freePriceMap"] = {money(price): count}
        rows[str(rank)] = row
    return rows


@reused("service", "freePrice")
async def get_top_countries(call: Call) -> Reply:
    """getTopCountriesByService(Rank): ``{"0":{"country","count","price",...}}``.

    Numbers, not strings (async-sms-activate does ``int(row["price"])``). Without
    ``service``, one such object per service. BAD_SERVICE for a code nobody knows.
    """
    service = param(call.params, "service").lower()
    free_price = param(call.params, "freePrice").lower() in ("true", "1", "yes")
    stocks = await _stocks(call, await _countries(call))
    by_service: dict[str, list[tuple[int, Decimal, int]]] = {}
    for country, stock in stocks.items():
        for code, (price, count) in stock.items():
            by_service.setdefault(code, []).append((country, price, count))
    if service:
        if service not in by_service and service not in reference()["services"]:
            raise UnknownService("request", service[:16])
        return _top_rows(by_service.get(service, []), free_price)
    return {
        code: _top_rows(offers, free_price)
        for code, offers in sorted(by_service.items())
    }


def _lang_name(row: Mapping[str, Any], lang: str) -> str:
    return str(row["rus"] if lang == "ru" else row["eng"])


@reused("lang")
async def get_country_and_operators(call: Call) -> Reply:
    """sms-service-online: ``[{"id":0,"name":"Россия","operators":{"any":"any",...}}]``.

    ``lang=ru`` names countries in Russian, anything else in English.
    """
    lang = param(call.params, "lang").lower()
    rows = _country_rows()
    table = reference()["operators"]
    result = []
    for country in await _countries(call):
        names: list[str] = []
        for name in call.providers():
            names.extend(call.upstreams.providers[name].operators(country))
        if not names:
            names = list(table.get(str(country), []))
        row = rows.get(country, {"eng": str(country), "rus": str(country)})
        operators = ["any", *sorted(set(names) - {"any"})]  # as in the clone's sample
        result.append(
            {
                "id": country,
                "name": _lang_name(row, lang),
                "operators": {o: o for o in operators},
            }
        )
    return result


@reused("country", "operator")
async def get_services_and_cost(call: Call) -> Reply:
    """sms-service-online: ``[{"id":"vk","name":..,"price":29.88,"quantity":"19"}]``.

    For ``country`` (default: the key's) and optionally ``operator``; quantity is a
    string and price a number, as in that clone's documentation.
    """
    country = dialect.country_param(call.params)
    if country is None:
        country = await _default_country(call)
    operators = tuple(
        o for o in dialect.list_param(call.params, "operator") if o != "any"
    )
    stock = await _stock(call, country, operators)
    return [
        {
            "id": code,
            "name": service_name(code),
            "price": money_number(price),
            "quantity": str(count),
        }
        for code, (price, count) in sorted(stock.items())
    ]


# ---- the rest of the menu: what sms-activate answers where a feature is missing --------


async def _own_activation(call: Call) -> Activation | None:
    """The caller's activation named by ``activationId``/``id``; None if not theirs."""
    raw = param(call.params, "activationId", "id")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        return None
    activation = await call.store.get(int(raw))
    if activation is None or activation.key_id != call.key.key_id:
        return None
    call.provider = activation.provider
    return activation


async def get_incoming_call_status(call: Call) -> Reply:
    """No backend verifies by call: NOT_INCOMING for an SMS activation."""
    if await _own_activation(call) is None:
        return Token.INVALID_ACTIVATION_ID.value
    return Token.NOT_INCOMING.value


async def get_multi_service_number(call: Call) -> Reply:
    """No backend sells one number for several services (getCountries says
    ``multiService`` 0 everywhere): NOT_AVAILABLE, nothing bought."""
    if not dialect.list_param(call.params, "multiService"):
        raise UnknownService("request", "multiService missing")
    return Token.NOT_AVAILABLE.value


async def get_additional_service(call: Call) -> Reply:
    """Needs a parent with call forwarding, which is never sold: WRONG_SECURITY."""
    if await _own_activation(call) is None:
        return Token.WRONG_ACTIVATION_ID.value
    return Token.WRONG_SECURITY.value


async def get_extra_activation(call: Call) -> Reply:
    """``ACCESS_NUMBER:<new id>:<phone>`` on a number that got a code, where its
    backend re-rents (thuecodesim); RENEW_ACTIVATION_NOT_AVAILABLE elsewhere."""
    parent = await _own_activation(call)
    if parent is None:
        return Token.WRONG_ACTIVATION_ID.value
    try:
        activation = await paid(
            call.reactivation.reactivate(call.key, parent),
            call.lifecycle.abandoned,
        )
    except reactivation.NotReactivatable:
        return Token.RENEW_ACTIVATION_NOT_AVAILABLE.value
    except NoBalance:
        return Token.NO_BALANCE.value
    except ProviderError:
        return Token.NEW_ACTIVATION_IMPOSSIBLE.value
    return token(Token.ACCESS_NUMBER, activation.id, activation.phone)


async def check_extra_activation(call: Call) -> Reply:
    """``{"status":"success","cost":..,"service":..,"phone":..,"country":..}``."""
    parent = await _own_activation(call)
    if parent is None:
        return Token.WRONG_ACTIVATION_ID.value
    if not call.reactivation.can_reactivate(parent):
        return Token.RENEW_ACTIVATION_NOT_AVAILABLE.value
    return {
        "status": "success",
        "cost": money_number(await call.reactivation.price(parent)),
        "service": parent.service,
        "phone": int(parent.phone),
        "country": parent.country,
    }


ACTIONS: dict[str, Action] = {
    "getBalance": get_balance,
    "getBalanceAndCashBack": get_balance,
    "getNumber": get_number,
    "getNumberV2": get_number_v2,
    "getStatus": get_status,
    "getStatusV2": get_status_v2,
    "getFullSms": get_full_sms,
    "setStatus": set_status,
    "getActiveActivations": get_active_activations,
    "getPrices": get_prices,
    "getNumbersStatus": get_numbers_status,
    "getCountries": get_countries,
    "getOperators": get_operators,
    "getServicesList": get_services_list,
    "getTopCountriesByService": get_top_countries,
    "getTopCountriesByServiceRank": get_top_countries,
    "getCountryAndOperators": get_country_and_operators,
    "getServicesAndCost": get_services_and_cost,
    "getIncomingCallStatus": get_incoming_call_status,
    "getMultiServiceNumber": get_multi_service_number,
    "getAdditionalService": get_additional_service,
    "getExtraActivation": get_extra_activation,
    "checkExtraActivation": check_extra_activation,
}

# The rent family lives in its own module (it builds on the helpers above).
from compat_server.rent_actions import RENT_ACTIONS  # noqa: E402

ACTIONS.update(RENT_ACTIONS)
