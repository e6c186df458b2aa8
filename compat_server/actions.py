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
from typing import Any

from compat_server import dialect
from compat_server.config import KeyConfig
from compat_server.dialect import Reply, Token, money, money_number, param, token
from compat_server.engine import Engine
from compat_server.errors import (
    BadStatus,
    ClientGone,
    NoActivation,
    NoNumbers,
    UnknownService,
)
from compat_server.store import CODE, WAIT_CODE, WAIT_RETRY, Activation
from providers.base import BACKGROUND, BUDGET, CLIENT, Order


@dataclass
class Call:
    """One authenticated request."""

    engine: Engine
    key: KeyConfig
    params: Mapping[str, str]
    provider: str = "-"  # filled in by handlers that touch one provider, for the log
    activation: Activation | None = None  # bought or acted on, for the log


Action = Callable[[Call], Awaitable[Reply]]

PRICES_DEADLINE = 5.0  # seconds getPrices without a country waits for catalogs


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
    activation = await call.engine.store.get(wanted)
    if activation is None or activation.key_id != call.key.key_id:
        raise NoActivation(str(wanted))
    call.provider = activation.provider
    call.activation = activation
    return activation


async def _default_country(call: Call) -> int:
    if call.key.default_country is not None:
        return call.key.default_country
    for name in call.engine.key_providers(call.key):
        countries = call.engine.providers[name].countries()
        if countries:
            return countries[0]
    return 0


# ---- money ---------------------------------------------------------------------------


async def get_balance(call: Call) -> Reply:
    """``ACCESS_BALANCE:<amount>``, always with two decimals."""
    return token(Token.ACCESS_BALANCE, money(await call.engine.balance(call.key)))


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
    """Buy for the caller; a number whose client left meanwhile is released.

    The purchase runs in its own task: a handler cancelled by a disconnect never
    interrupts a paid call half-way (its outcome would be unknown), and the number
    that call bought is handed to Engine.abandoned instead of being kept silently.
    """
    engine = call.engine
    order = await _order(call)
    alive = BUDGET.get().alive
    task = asyncio.ensure_future(engine.buy(call.key, order))
    try:
        activation = await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(functools.partial(_abandon_later, engine))
        raise
    call.provider = activation.provider
    call.activation = activation
    if not alive():
        await engine.abandoned(activation)
        raise ClientGone(activation.provider, f"id={activation.id}")
    return activation


def _abandon_later(engine: Engine, task: asyncio.Task[Activation]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    future = asyncio.ensure_future(engine.abandoned(task.result()))
    _PENDING.add(future)
    future.add_done_callback(_PENDING.discard)


_PENDING: set[asyncio.Future[None]] = set()  # abandoned() calls that outlive a handler


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
        "currency": call.engine.config.currency_number,
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
    await call.engine.refresh(activation)
    view = call.engine.view(activation)
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
    await call.engine.refresh(activation)
    view = call.engine.view(activation)
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
    await call.engine.refresh(activation)
    view = call.engine.view(activation)
    if view.state == CODE:
        return token(Token.FULL_SMS, view.text)
    if view.state in (WAIT_CODE, WAIT_RETRY):
        return Token.STATUS_WAIT_CODE.value
    return Token.STATUS_CANCEL.value


async def set_status(call: Call) -> Reply:
    """1 ready, 3 another SMS, 6 finish, 8/-1 cancel -> exactly one ACCESS_* token."""
    status = param(call.params, "status")
    activation = await _activation(call)
    engine = call.engine
    if activation.is_open and engine.clock() >= activation.expires_at:
        await engine.expire(activation)
    if status == "1":
        await engine.ready(activation)
        return Token.ACCESS_READY.value
    if status == "3":
        await engine.retry(activation)
        return Token.ACCESS_RETRY_GET.value
    if status == "6":
        await engine.finish(activation)
        return Token.ACCESS_ACTIVATION.value
    if status in ("8", "-1"):
        await engine.cancel(activation)
        return Token.ACCESS_CANCEL.value
    raise BadStatus(status[:8])


async def get_active_activations(call: Call) -> Reply:
    """Open activations of the key, under both ``activeActivations`` and ``data``."""
    engine = call.engine
    rows = []
    for activation in await engine.store.for_key(call.key.key_id):
        await engine.refresh(activation)
        if not activation.is_open:
            continue
        view = engine.view(activation)
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
                "currency": engine.config.currency_number,
            }
        )
    if not rows:
        return {"status": "error", "error": Token.NO_ACTIVATIONS.value}
    return {"status": "success", "activeActivations": rows, "data": rows}


# ---- catalog -------------------------------------------------------------------------


async def _stock(
    call: Call, country: int, priority: int = CLIENT
) -> dict[str, tuple[Decimal, int]]:
    """service -> (lowest display price, total count) over the key's providers."""
    engine = call.engine
    merged: dict[str, tuple[Decimal, int]] = {}
    for name in engine.key_providers(call.key):
        for offer in await engine.offers(name, country, priority):
            price = engine.prices.display(name, offer.price)
            if offer.service in merged:
                old_price, old_count = merged[offer.service]
                merged[offer.service] = (min(old_price, price), old_count + offer.count)
            else:
                merged[offer.service] = (price, offer.count)
    return merged


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
    tasks = {c: asyncio.ensure_future(_stock(call, c, BACKGROUND)) for c in countries}
    await asyncio.wait(tasks.values(), timeout=PRICES_DEADLINE)
    return {c: t.result() for c, t in tasks.items() if t.done() and not t.exception()}


async def _countries(call: Call) -> list[int]:
    found: set[int] = set()
    for name in call.engine.key_providers(call.key):
        found.update(call.engine.providers[name].countries())
    return sorted(found)


async def get_prices(call: Call) -> Reply:
    """``{"<country>":{"<service>":{"cost":x,"count":n,"physicalCount":n}}}``."""
    country = dialect.country_param(call.params)
    service = param(call.params, "service").lower()
    countries = [country] if country is not None else await _countries(call)
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


async def get_numbers_status(call: Call) -> Reply:
    """``{"<service>_0":"<count>"}`` with every legacy key present ("0" if none)."""
    country = dialect.country_param(call.params)
    if country is None:
        country = await _default_country(call)
    counts = {key: "0" for key in dialect.LEGACY_STOCK_KEYS}
    for code, (_, count) in sorted((await _stock(call, country)).items()):
        counts[f"{code}_0"] = str(count)
    return counts


@lru_cache(maxsize=1)
def _country_rows() -> dict[int, dict[str, Any]]:
    """sms-activate's country table keyed by id."""
    return {row["id"]: row for row in reference()["countries"]}


def _country_name(country: int) -> str:
    row = _country_rows().get(country)
    return str(row["eng"]) if row else str(country)


async def get_countries(call: Call) -> Reply:
    """Countries the key's providers serve, keyed by id."""
    rows = _country_rows()
    result = {}
    for country in await _countries(call):
        row = rows.get(country, {"eng": str(country), "rus": str(country)})
        result[str(country)] = {
            "id": country,
            "rus": row["rus"],
            "eng": row["eng"],
            "chn": row["eng"],
            "visible": 1,
            "retry": 1,
            "rent": 0,
            "multiService": 0,
        }
    return result


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
        for name in call.engine.key_providers(call.key):
            names.extend(call.engine.providers[name].operators(country_id))
        if not names:
            names = list(table.get(str(country_id), []))
        if names:
            result[str(country_id)] = list(dict.fromkeys(["any", *names]))
    if not result:
        return {"status": "error", "error": Token.OPERATORS_NOT_FOUND.value}
    return {"status": "success", "countryOperators": result}


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
}
