"""Fake sms-activate clones: one ``handler_api`` endpoint, ``action`` picks the call.

Three flavours, each written from its own source:

* :class:`FakeSmsActivate`: sms-activate itself as ``protocol.md`` describes it: every
  classic action plus getNumberV2, getStatusV2 and getActiveActivations; cancels refused
  with ``EARLY_CANCEL_DENIED`` in the first two minutes; ``maxPrice`` below the price is
  ``WRONG_MAX_PRICE:<price>``; activation times in Moscow time; getNumbersStatus keys
  without suffix and with string counts (the live 2025 capture).
* :class:`FakeSms3t`: the sms3t seed: getNumbersStatus (``vk_0`` keys, int counts, the
  seed's example numbers), getBalance, getNumber, setStatus 1/3/6/8, getStatus, getPrices
  (``{country: {service: {cost, count}}}``). Anything else answers ``BAD_ACTION`` (the
  seed documents nothing more, so no getActiveActivations). Vietnam (10) only.
* :class:`FakeSmsServiceOnline`: the sms-service-online seed: path without ``.php``,
  ``lang`` mandatory (``BAD_LANG``; ru = RUB, en = USD), getBalance as a bare amount,
  getCountryAndOperators, getServicesAndCost (``[{"id", "name", "price", "quantity"}]``
  with the quantity as a string), getNumber, setStatus 3/6/8 only (1 is ``BAD_STATUS``),
  getStatus without STATUS_WAIT_RETRY. No getPrices, getNumbersStatus or V2 actions.

Quirk switches seen at other clones (``protocol.md`` sections 1.5-1.7 and 5), off unless
a test turns them on: ``newline`` (a trailing " \\r\\n"), ``token_type`` (the content type
of text answers; sms-activate sent text/html), ``error_status`` (HTTP status of error
tokens: Tiger 401, privatesms 4xx), ``lower_tokens``, ``aliases`` (NO_MEANS, NO_NUMBER),
``full_text`` (STATUS_OK with the whole SMS, Tiger's full_text), ``paged``
(getActiveActivations pages by ``start``/``limit``, at most 100 rows, 50 by default,
as Hero and Tiger do) and the ``banned``
scenario (``BANNED:<date>``).

Answers the sources leave open are invented here and named: setStatus on a closed order
answers BAD_STATUS; an unknown id NO_ACTIVATION; an unknown service BAD_SERVICE.
``canned`` serves a verbatim answer for one action (for parsing tests).
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import time
import zoneinfo
from decimal import Decimal
from typing import Any

from aiohttp import web

from fakes.common import FakeOrder, FakeUpstream

TYPE = "handler_api"
API_KEY = "clone-fake-key-0123456789abcdef01"
MOSCOW = zoneinfo.ZoneInfo("Europe/Moscow")
DIAL = {"0": "7", "10": "84", "25": "856"}
OPEN = ("waiting", "received", "retry")


class FakeHandlerApi(FakeUpstream):
    """The classic dialect; subclasses say which actions and quirks their clone has."""

    path = "/stubs/handler_api.php"
    actions: frozenset[str] = frozenset()
    statuses = frozenset({"1", "3", "6", "8"})
    early_cancel = 0.0
    check_max_price = False
    # their country id -> their service code -> (price in RUB, count)
    prices: dict[str, dict[str, tuple[str, int]]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.prices = copy.deepcopy(type(self).prices)  # a test may change its own
        self.balance = Decimal("1000.00")
        self.clock = time.time
        self.newline = False
        self.token_type = "text/html"
        self.error_status = 200
        self.lower_tokens = False
        self.aliases = False
        self.full_text = False
        self.paged = False  # getActiveActivations honours Hero's start/limit (<= 100)
        self.bought: list[dict[str, str]] = []  # getNumber params of each sale
        self.methods: list[tuple[str, bool]] = []  # (HTTP method, query string sent)
        # action -> (HTTP status, body) served verbatim, no effects: parsing tests
        self.canned: dict[str, tuple[int, str]] = {}
        self._next_id = itertools.count(3_936_040_355)

    def setup_routes(self, app: web.Application) -> None:
        """One endpoint, GET or POST."""
        app.router.add_route("GET", self.path, self._dispatch)
        app.router.add_route("POST", self.path, self._dispatch)

    def call_key(self, path: str, params: dict[str, str]) -> str:
        """Calls and faults are named by action: every call shares the path."""
        return params.get("action", "")

    def actions_called(self) -> list[str]:
        return self.paths_called()

    def deliver(self, order_id: str, text: str, code: str | None = None) -> None:
        """An SMS arrives; a waiting or retrying order now holds a code."""
        order = self.orders[order_id]
        order.sms.append((text, code))
        if order.state in ("waiting", "retry"):
            order.state = "received"

    def expire(self, order_id: str) -> None:
        """The order times out upstream (refunded when no SMS came)."""
        order = self.orders[order_id]
        if order.state == "waiting":
            self.balance += order.price
        order.state = "expired"

    # ---- replies -------------------------------------------------------------------

    def text(self, body: str, *, error: bool = False) -> web.Response:
        head, sep, rest = body.partition(":")
        if self.lower_tokens and head.isupper():
            body = head.lower() + sep + rest
        if self.newline:
            body += " \r\n"
        return web.Response(
            status=self.error_status if error else 200,
            text=body,
            content_type=self.token_type,
        )

    def error(self, token: str) -> web.Response:
        return self.text(token, error=True)

    def json(self, value: Any) -> web.Response:
        return web.json_response(value)

    # ---- dispatch ------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        if request.method == "POST":
            params.update({k: str(v) for k, v in (await request.post()).items()})
        self.methods.append((request.method, bool(request.query)))
        if params.get("action", "") in self.canned:
            status, body = self.canned[params["action"]]
            return web.Response(status=status, text=body, content_type="text/html")
        if params.get("api_key") != API_KEY or self.scenario == "bad_token":
            return self.error("BAD_KEY")
        refused = self.check_extra(params)
        if refused is not None:
            return refused
        action = params.get("action", "")
        if action not in self.actions:
            return self.error("BAD_ACTION")
        handler = getattr(self, "do_" + action)
        response: web.Response = handler(params)
        return response

    def check_extra(self, params: dict[str, str]) -> web.Response | None:
        """A flavour's own checks on every call (sms-service-online: ``lang``)."""
        return None

    def do_getBalance(self, params: dict[str, str]) -> web.Response:
        return self.text(f"ACCESS_BALANCE:{self.balance}")

    def do_getNumber(self, params: dict[str, str]) -> web.Response:
        refusal, order = self._sell(params)
        if refusal is not None:
            return self.error(refusal)
        assert order is not None
        return self.text(f"ACCESS_NUMBER:{order.id}:{order.phone}")

    def do_getNumberV2(self, params: dict[str, str]) -> web.Response:
        refusal, order = self._sell(params)
        if refusal is not None:
            return self.error(refusal)
        assert order is not None
        return self.json(
            {
                "activationId": int(order.id),
                "phoneNumber": order.phone,
                "activationCost": float(order.price),
                "currency": 643,
                "countryCode": order.country,
                "canGetAnotherSms": "1",
                "activationTime": self.stamp(order.created),
                "activationOperator": self.bought[-1].get("operator") or "any",
            }
        )

    def do_getStatus(self, params: dict[str, str]) -> web.Response:
        order = self.orders.get(params.get("id", ""))
        if order is None:
            return self.error("NO_ACTIVATION")
        if order.state == "received":
            text, code = order.sms[-1]
            return self.text(f"STATUS_OK:{text if self.full_text else code}")
        if order.state == "retry":
            return self.text(f"STATUS_WAIT_RETRY:{order.sms[-1][1]}")
        if order.state == "waiting":
            return self.text("STATUS_WAIT_CODE")
        return self.text("STATUS_CANCEL")

    def do_getStatusV2(self, params: dict[str, str]) -> web.Response:
        order = self.orders.get(params.get("id", ""))
        if order is None:
            return self.error("NO_ACTIVATION")
        if order.state not in OPEN:
            return self.text("STATUS_CANCEL")
        sms = None
        if order.state == "received":
            text, code = order.sms[-1]
            sms = {"dateTime": self.stamp(self.clock()), "code": code, "text": text}
        return self.json({"verificationType": 0, "sms": sms, "call": None})

    def do_setStatus(self, params: dict[str, str]) -> web.Response:
        order = self.orders.get(params.get("id", ""))
        status = params.get("status", "")
        if order is None:
            return self.error("NO_ACTIVATION")
        order.calls.append(status)
        if status not in self.statuses or order.state not in OPEN:
            return self.error("BAD_STATUS")
        if status == "1":
            return self.text("ACCESS_READY")
        if status == "3":
            if order.state != "received":
                return self.error("BAD_STATUS")
            order.state = "retry"
            return self.text("ACCESS_RETRY_GET")
        if status == "6":
            if order.state == "waiting":
                return self.error("BAD_STATUS")
            order.state = "finished"
            return self.text("ACCESS_ACTIVATION")
        if order.state != "waiting":
            return self.error("BAD_STATUS")
        if self.clock() - order.created < self.early_cancel:
            return self.error("EARLY_CANCEL_DENIED")
        order.state = "cancelled"
        self.balance += order.price
        return self.text("ACCESS_CANCEL")

    def do_getPrices(self, params: dict[str, str]) -> web.Response:
        wanted, service = params.get("country"), params.get("service")
        return self.json(
            {
                country: {
                    code: {"cost": float(cost), "count": count}
                    for code, (cost, count) in services.items()
                    if service in (None, "", code)
                }
                for country, services in self.prices.items()
                if wanted in (None, "", country)
            }
        )

    def do_getNumbersStatus(self, params: dict[str, str]) -> web.Response:
        services = self.prices.get(params.get("country", "10"), {})
        return self.json({code: str(count) for code, (_, count) in services.items()})

    def do_getActiveActivations(self, params: dict[str, str]) -> web.Response:
        rows = [
            {
                "activationId": order.id,
                "serviceCode": order.service,
                "phoneNumber": order.phone,
                "activationCost": float(order.price),
                "activationStatus": "4",
                "smsCode": [code for _, code in order.sms] or None,
                "smsText": None,
                "activationTime": self.stamp(order.created),
                "discount": "0.00",
                "repeated": "0",
                "countryCode": order.country,
                "countryName": "Vietnam",
                "canGetAnotherSms": "1",
                "currency": 643,
            }
            for order in self.orders.values()
            if order.state in OPEN
        ]
        if self.paged:
            start = int(params.get("start", "0"))
            rows = rows[start : start + min(int(params.get("limit", "50")), 100)]
        if not rows:
            return self.json({"status": "error", "error": "NO_ACTIVATIONS"})
        return self.json({"status": "success", "activeActivations": rows})

    # ---- selling ---------------------------------------------------------------------

    def stamp(self, seconds: float) -> str:
        """``YYYY-MM-DD HH:MM:SS`` in Moscow time, as sms-activate wrote times."""
        moment = dt.datetime.fromtimestamp(seconds, MOSCOW)
        return moment.strftime("%Y-%m-%d %H:%M:%S")

    def _sell(self, params: dict[str, str]) -> tuple[str | None, FakeOrder | None]:
        if self.scenario == "no_numbers":
            return ("NO_NUMBER" if self.aliases else "NO_NUMBERS"), None
        if self.scenario == "no_balance":
            return ("NO_MEANS" if self.aliases else "NO_BALANCE"), None
        if self.scenario == "bad_service":
            return "BAD_SERVICE", None
        if self.scenario == "banned":
            return "BANNED:2026-1-5 13-20-00", None
        country, service = params.get("country", "0"), params.get("service", "")
        if not any(service in s for s in self.prices.values()):
            return "BAD_SERVICE", None
        offer = self.prices.get(country, {}).get(service)
        if offer is None or offer[1] <= 0:
            return "NO_NUMBERS", None
        cost = Decimal(offer[0])
        ceiling = params.get("maxPrice")
        if self.check_max_price and ceiling is not None and Decimal(ceiling) < cost:
            return f"WRONG_MAX_PRICE:{cost}", None
        if self.balance < cost:
            return "NO_BALANCE", None
        self.balance -= cost
        ident = str(next(self._next_id))
        phone = self._phone(country, ident, params.get("phoneException", ""))
        order = FakeOrder(
            id=ident,
            service=service,
            country=country,
            phone=phone,
            price=cost,
            created=self.clock(),
        )
        self.orders[ident] = order
        self.bought.append(dict(params))
        return None, order

    def _phone(self, country: str, ident: str, excluded: str) -> str:
        prefixes = [p for p in excluded.split(",") if p]
        for lead in "9875":
            phone = DIAL.get(country, "1") + lead + ident[-8:]
            if not any(phone.startswith(p) for p in prefixes):
                return phone
        return DIAL.get(country, "1") + "3" + ident[-8:]


class FakeSmsActivate(FakeHandlerApi):
    """sms-activate itself (protocol.md): the whole classic surface plus V2."""

    actions = frozenset(
        {
            "getBalance",
            "getNumber",
            "getNumberV2",
            "getStatus",
            "getStatusV2",
            "setStatus",
            "getPrices",
            "getNumbersStatus",
            "getActiveActivations",
        }
    )
    statuses = frozenset({"1", "3", "6", "8", "-1"})
    early_cancel = 120.0
    check_max_price = True
    prices = {
        "10": {"tg": ("12.50", 40), "wa": ("20", 15), "fb": ("8", 0)},
        "0": {"tg": ("30", 500)},
    }

    def __init__(self) -> None:
        super().__init__()
        self.balance = Decimal("17.154")

    def do_setStatus(self, params: dict[str, str]) -> web.Response:
        if params.get("status") == "-1":
            params = {**params, "status": "8"}
        return super().do_setStatus(params)


class FakeSms3t(FakeHandlerApi):
    """sms3t (seeds/sms3t-handler-api.txt): the v1 subset, Vietnam only."""

    actions = frozenset(
        {
            "getNumbersStatus",
            "getBalance",
            "getNumber",
            "setStatus",
            "getStatus",
            "getPrices",
        }
    )
    # the seed's getNumbersStatus example gives the counts; prices are invented
    prices = {
        "10": {
            "vk": ("6", 149),
            "ok": ("4", 190),
            "wa": ("22", 64),
            "vi": ("5", 140),
            "tg": ("15", 86),
            "wb": ("9", 14),
            "go": ("7", 146),
            "av": ("3", 251),
            "fb": ("8", 58),
        }
    }

    def __init__(self) -> None:
        super().__init__()
        self.balance = Decimal("250.00")

    def do_getNumbersStatus(self, params: dict[str, str]) -> web.Response:
        """``{"vk_0":149,...,"av_1":156}``: ``_0`` without forwarding, int counts."""
        services = self.prices.get(params.get("country", "10"), {})
        body: dict[str, int] = {
            f"{code}_0": count for code, (_, count) in services.items()
        }
        body["av_1"] = 156
        return self.json(body)


class FakeSmsServiceOnline(FakeHandlerApi):
    """sms-service-online (seeds/sms-service-online-handler-api.txt)."""

    path = "/stubs/handler_api"
    actions = frozenset(
        {
            "getBalance",
            "getCountryAndOperators",
            "getServicesAndCost",
            "getNumber",
            "setStatus",
            "getStatus",
        }
    )
    statuses = frozenset({"3", "6", "8"})
    usd_rate = Decimal("90")
    # the seed's getServicesAndCost example for Russia; Vietnam and Laos invented
    prices = {
        "0": {"vk": ("29.88", 19), "ok": ("1.34", 2776), "wa": ("0", 0)},
        "10": {"tg": ("9.50", 64), "wa": ("14", 30), "mj": ("3", 12)},
        "25": {"tg": ("11", 5)},
    }
    operators = {
        "0": ["any", "tele2", "tinkoff", "ttk", "yota"],
        "10": ["any", "itelecom", "mobifone", "vietnamobile", "viettel", "vinaphone"],
        "25": ["any", "etl", "telekom", "tplus", "unitel"],
    }

    def __init__(self) -> None:
        super().__init__()
        self.balance = Decimal("463.02")
        self._lang = "ru"

    def check_extra(self, params: dict[str, str]) -> web.Response | None:
        lang = params.get("lang")
        if lang not in ("ru", "en"):
            return self.error("BAD_LANG")
        self._lang = lang
        return None

    def money(self, rub: Decimal) -> Decimal:
        """An amount in the currency ``lang`` asked for."""
        if self._lang == "en":
            return (rub / self.usd_rate).quantize(Decimal("0.01"))
        return rub

    def do_getBalance(self, params: dict[str, str]) -> web.Response:
        return self.text(f"{self.money(self.balance)}")

    def do_getCountryAndOperators(self, params: dict[str, str]) -> web.Response:
        names = {"0": "Россия", "10": "Вьетнам", "25": "Лаос"}
        return self.json(
            [
                {"id": int(cid), "name": names[cid], "operators": {o: o for o in ops}}
                for cid, ops in self.operators.items()
            ]
        )

    def do_getServicesAndCost(self, params: dict[str, str]) -> web.Response:
        services = self.prices.get(params.get("country", ""), {})
        return self.json(
            [
                {
                    "id": code,
                    "name": code.upper(),
                    "price": float(self.money(Decimal(cost))),
                    "quantity": str(count),
                }
                for code, (cost, count) in services.items()
            ]
        )

    def do_getStatus(self, params: dict[str, str]) -> web.Response:
        """No STATUS_WAIT_RETRY in this seed: a retrying order is waiting again."""
        order = self.orders.get(params.get("id", ""))
        if order is not None and order.state == "retry":
            return self.text("STATUS_WAIT_CODE")
        return super().do_getStatus(params)


def sms_activate_options(url: str) -> dict[str, Any]:
    """Provider options for a FakeSmsActivate served at ``url`` (its root)."""
    return {
        "type": TYPE,
        "base_url": url + FakeSmsActivate.path,
        "api_key": API_KEY,
        "number_v2": True,
        "status_v2": True,
        "timezone": "Europe/Moscow",
    }


def sms3t_options(url: str) -> dict[str, Any]:
    """Provider options for a FakeSms3t: Vietnam only, like the clone."""
    return {
        "type": TYPE,
        "base_url": url + FakeSms3t.path,
        "api_key": API_KEY,
        "countries": [10],
    }


def sms_service_online_options(url: str) -> dict[str, Any]:
    """Provider options for a FakeSmsServiceOnline (``lang: ru``, balance in RUB)."""
    return {
        "type": TYPE,
        "base_url": url + FakeSmsServiceOnline.path,
        "api_key": API_KEY,
        "lang": "ru",
        "countries": [0, 10, 25],
    }
