"""The rent family of the dialect (protocol.md 3.21): one handler per action.

Every answer is JSON; errors are ``{"status":"error","message":TOKEN}``. A key whose
providers cannot rent answers as sms-activate does when nothing is for rent
(OUT_OF_STOCK, NO_NUMBERS, NO_ID_RENT). Another key's rent is NO_ID_RENT.
"""

from __future__ import annotations

import time
from typing import Any

from compat_server import dialect
from compat_server.actions import Action, Call, _default_country, paid
from compat_server.dialect import Reply, Token, money_number, param, rent_error
from compat_server.rentals import CantCancel, RentClosed
from compat_server.store import (
    RENT_ACTIVE,
    RENT_CANCELLED,
    RENT_EXPIRED,
    RENT_FINISHED,
    Rent,
)
from providers.vocabulary import ProviderError, RentOrder

DEFAULT_HOURS = 4  # older libraries' minimum (current docs say 2; both are accepted)
MIN_HOURS, MAX_HOURS = 2, 1344
CLOSED_STATUS = {
    RENT_FINISHED: Token.STATUS_FINISH,
    RENT_EXPIRED: Token.STATUS_FINISH,
    RENT_CANCELLED: Token.STATUS_CANCEL,
}


class _Answer(Exception):
    """An error answer, raised from helpers."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body.get("message"))
        self.body = body


def _hours(call: Call, *names: str) -> int:
    """rent_time / time (the official library) / hours; INVALID_TIME if nonsense."""
    raw = param(call.params, *names)
    if not raw:
        return DEFAULT_HOURS
    if not raw.isascii() or not raw.isdigit() or not MIN_HOURS <= int(raw) <= MAX_HOURS:
        raise _Answer(
            rent_error(Token.INVALID_TIME, {"min": MIN_HOURS, "max": MAX_HOURS})
        )
    return int(raw)


def _end_date(until: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(until))


def _date(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


async def _rent(call: Call) -> Rent:
    raw = param(call.params, "id")
    rent = None
    if raw.isascii() and raw.isdigit() and len(raw) <= 18:
        rent = await call.store.get_rent(int(raw))
    if rent is None or rent.key_id != call.key.key_id:
        raise _Answer(rent_error(Token.NO_ID_RENT))
    call.provider = rent.provider
    return rent


def _answers(handler: Action) -> Action:
    async def wrapped(call: Call) -> Reply:
        try:
            return await handler(call)
        except _Answer as answer:
            return answer.body

    wrapped.__doc__ = handler.__doc__
    return wrapped


def _phone(rent: Rent) -> dict[str, Any]:
    return {"id": rent.id, "endDate": _end_date(rent.until), "number": rent.phone}


# ---- handlers -------------------------------------------------------------------------


async def get_rent_services_and_countries(call: Call) -> Reply:
    """``{"countries":{"0":id},"operators":{"0":"any"},"services":{..},"currency":n}``."""
    hours = _hours(call, "rent_time", "time", "hours")
    rentals = call.rentals
    countries = rentals.countries(call.key)
    if not countries:
        raise _Answer(rent_error(Token.OUT_OF_STOCK))
    country = dialect.country_param(call.params)
    if country is None:
        default = await _default_country(call)
        country = default if default in countries else countries[0]
    stock = (
        await rentals.stock(call.key, country, hours) if country in countries else {}
    )
    if not stock:
        raise _Answer(rent_error(Token.OUT_OF_STOCK))
    names: list[str] = []
    for name in rentals.renters(call.key, country):
        names.extend(call.upstreams.providers[name].operators(country))
    operators = ["any", *sorted(set(names) - {"any"})]
    services = {
        code: {"cost": money_number(s.cost), "quant": s.count}
        for code, s in sorted(stock.items(), key=lambda i: (i[0] != "full", i[0]))
    }
    return {
        "countries": {str(i): c for i, c in enumerate(countries)},
        "operators": {str(i): o for i, o in enumerate(operators)},
        "services": services,
        "currency": call.config.currency_number,
    }


async def get_rent_number(call: Call) -> Reply:
    """``{"status":"success","phone":{"id","endDate","number"}}``; stored first."""
    service = param(call.params, "service").lower()
    if not service or len(service) > 16:
        raise _Answer(rent_error(Token.BAD_SERVICE))
    hours = _hours(call, "rent_time", "time", "duration")
    rentals = call.rentals
    country = dialect.country_param(call.params)
    if country is None:
        countries = rentals.countries(call.key)
        default = await _default_country(call)
        country = default if default in countries or not countries else countries[0]
    operators = tuple(
        o for o in dialect.list_param(call.params, "operator") if o != "any"
    )
    if not rentals.renters(call.key, country):
        raise _Answer(rent_error(Token.NO_NUMBERS))
    order = RentOrder(service, country, hours, operators)
    try:
        rent = await paid(rentals.rent(call.key, order), rentals.abandoned)
    except ProviderError as exc:
        raise _Answer(rent_error(dialect.rent_token(exc))) from None
    call.provider = rent.provider
    return {"status": "success", "phone": _phone(rent)}


async def get_rent_status(call: Call) -> Reply:
    """SMS newest first under ``values`` "0","1",..; STATUS_* in ``message`` otherwise."""
    rent = await _rent(call)
    page = _positive(param(call.params, "page"), 1)
    size = _positive(param(call.params, "size"), 10)
    await call.rentals.refresh(rent)
    if rent.state != RENT_ACTIVE:
        raise _Answer(rent_error(CLOSED_STATUS[rent.state]))
    if not rent.messages:
        raise _Answer(rent_error(Token.STATUS_WAIT_CODE))
    newest = list(reversed(rent.messages))
    shown = newest[(page - 1) * size : page * size]
    return {
        "status": "success",
        "quantity": str(len(newest)),
        "values": {
            str(i): {
                "phoneFrom": m.sender,
                "text": m.text,
                "service": rent.service,
                "date": _date(m.received_at),
            }
            for i, m in enumerate(shown)
        },
    }


def _positive(raw: str, default: int) -> int:
    if raw.isascii() and raw.isdigit() and 0 < int(raw) <= 10_000:
        return int(raw)
    return default


async def set_rent_status(call: Call) -> Reply:
    """1 finish, 2 cancel (within 20 minutes) -> ``{"status":"success"}``."""
    status = param(call.params, "status")
    rent = await _rent(call)
    if status not in ("1", "2"):
        raise _Answer(rent_error(Token.INCORECT_STATUS))
    try:
        await call.rentals.release(rent, cancel=status == "2")
    except RentClosed:
        token = (
            Token.ALREADY_CANCEL
            if rent.state == RENT_CANCELLED
            else Token.ALREADY_FINISH
        )
        raise _Answer(rent_error(token)) from None
    except CantCancel:
        raise _Answer(rent_error(Token.CANT_CANCEL)) from None
    except ProviderError:
        raise _Answer(rent_error(Token.SERVER_ERROR)) from None
    return {"status": "success"}


async def get_rent_list(call: Call) -> Reply:
    """The key's held numbers: ``{"status":"success","values":{"0":{"id","phone"}}}``."""
    rentals = call.rentals
    rents = []
    for rent in await call.store.rents_for_key(call.key.key_id):
        await rentals.refresh(rent)
        if rent.state == RENT_ACTIVE:
            rents.append(rent)
    page = _positive(param(call.params, "page"), 1)
    length = _positive(param(call.params, "length"), 10)
    shown = rents[(page - 1) * length : page * length]
    if not shown:
        raise _Answer(rent_error(Token.NO_NUMBERS))
    return {
        "status": "success",
        "values": {
            str(i): {"id": str(r.id), "phone": r.phone} for i, r in enumerate(shown)
        },
    }


async def continue_rent_number(call: Call) -> Reply:
    """Prolong (paid): the getRentNumber shape with the new ``endDate``."""
    rent = await _rent(call)
    hours = _hours(call, "rent_time", "time", "hours")
    try:
        await call.rentals.prolong(call.key, rent, hours)
    except RentClosed:
        raise _Answer(rent_error(Token.RENT_DIE, {})) from None
    except ProviderError as exc:
        raise _Answer(rent_error(dialect.rent_token(exc), {})) from None
    return {"status": "success", "phone": _phone(rent)}


async def continue_rent_price(call: Call) -> Reply:
    """getContinueRentPriceNumber / continueRentInfo: the price of ``hours`` more."""
    rent = await _rent(call)
    hours = _hours(call, "rent_time", "hours", "time")
    if rent.state == RENT_ACTIVE and call.clock() >= rent.until:
        await call.rentals.refresh(rent)
    if rent.state != RENT_ACTIVE:
        raise _Answer(rent_error(Token.RENT_DIE))
    try:
        price = await call.rentals.prolong_price(rent, hours)
    except ProviderError:
        raise _Answer(rent_error(Token.SERVER_ERROR)) from None
    body: dict[str, Any] = {
        "status": "success",
        "price": money_number(price),
        "currency": call.config.currency_number,
    }
    if param(call.params, "action") == "continueRentInfo":
        body["hours"] = hours
        if param(call.params, "needHistory").lower() in ("true", "1"):
            payments = await call.store.rent_payments(rent.id)
            body["history"] = {
                str(i): {
                    "createDate": _date(p.created_at),
                    "price": dialect.money(p.cost),
                    "hours": p.hours,
                }
                for i, p in enumerate(payments)
            }
    return body


RENT_ACTIONS: dict[str, Action] = {
    "getRentServicesAndCountries": _answers(get_rent_services_and_countries),
    "getRentNumber": _answers(get_rent_number),
    "getRentStatus": _answers(get_rent_status),
    "setRentStatus": _answers(set_rent_status),
    "getRentList": _answers(get_rent_list),
    "continueRentNumber": _answers(continue_rent_number),
    "getContinueRentPriceNumber": _answers(continue_rent_price),
    "continueRentInfo": _answers(continue_rent_price),
}
