"""A fake sms-man API v2: ``/control/<endpoint>``, GET or POST, ``token`` parameter.

It answers with the seed's JSON and quirks: the balance and the ``limits`` values are
strings, ``request_id`` and the ids in ``get-number`` are ints, ``get-prices`` has
``cost`` as a string and ``count`` as an int; ``error_msg`` is an object on
``get-number``, ``limits`` and ``get-prices`` and a string elsewhere. Its country ids
are deliberately not sms-activate's (Vietnam is 7 here, not 10) so tests see the
mapping.

Answers the seed does not document are invented here and named as such:
``order_closed`` (get-sms/set-status on a cancelled, finished or expired order),
``wrong_request_id`` (unknown order), ``wrong_application_id``/``wrong_country_id``
(get-number for something not on sale). ``balance`` and ``no_numbers`` come from
client libraries (backends.md, section 2).
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from decimal import Decimal
from typing import Any

from aiohttp import web

from fakes.common import FakeOrder, FakeUpstream

TYPE = "smsman"
TOKEN = "smsman-fake-token-0123456789abcdef"

# sms-man's own country ids (seed sample: 0 Russia, 3 China) and titles
COUNTRIES: dict[int, str] = {
    0: "Russia",
    1: "Ukraine",
    2: "Kazakhstan",
    3: "China",
    7: "Vietnam",
    9: "Laos",
    5: "USA",
    16: "United Kingdom",
    14: "India",
}
DIAL_PREFIX = {0: "79", 1: "380", 2: "77", 3: "86", 7: "84", 9: "856", 5: "1", 16: "44"}

# the seed's three applications plus a few more; "code" is the sms-activate code
APPLICATIONS: dict[int, tuple[str, str]] = {
    1: ("Vkontakte", "vk"),
    2: ("WeChat", "wb"),
    3: ("Telegram", "tg"),
    4: ("WhatsApp", "wa"),
    5: ("Facebook", "fb"),
    6: ("Zalo", "mj"),
}

# country id -> application id -> (cost as sms-man writes it, count)
PRICES: dict[int, dict[int, tuple[str, int]]] = {
    0: {1: ("15", 6455), 3: ("50", 124), 4: ("35.50", 0)},
    1: {3: ("6", 1000)},
    7: {3: ("12.5", 40), 5: ("8", 300), 6: ("4", 25)},
    9: {3: ("20", 3)},
    5: {3: ("60", 12)},
}


class FakeSmsman(FakeUpstream):
    """sms-man ``/control/*`` with scenarios, shapes switchable per list."""

    def __init__(self) -> None:
        super().__init__()
        self.balance = Decimal("799.70")
        self.applications_shape = "list"  # "list" (the seed) or "object" (keyed by id)
        self.countries_shape = "list"
        self.prices_shape = "nested"  # "nested" (the seed) or "flat" ({app: {...}})
        self.send_sms_text = False  # also send "sms_text" (not in the seed)
        self.canned: dict[str, Any] = {}  # endpoint -> body served verbatim, no effects
        self.prices = copy.deepcopy(PRICES)  # tests may move prices
        # maxPrice is not in the seed (only on a newer page): an sms-man that ignores
        # it is a field condition, so tests can switch it off
        self.honours_max_price = True
        self._next_id = itertools.count(1001)
        self._seen: dict[str, int] = {}  # order id -> messages consumed by "ready"

    def setup_routes(self, app: web.Application) -> None:
        """Every endpoint under ``/control/``, any method."""
        app.router.add_route("*", "/control/{endpoint}", self._dispatch)

    def expire(self, order_id: str) -> None:
        """The order times out upstream (no refund: not documented either way)."""
        self.orders[order_id].state = "expired"

    # ---- dispatch ----------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        if request.method == "POST":
            params.update({k: str(v) for k, v in (await request.post()).items()})
        endpoint = request.match_info["endpoint"]
        handler = {
            "get-balance": self._balance,
            "limits": self._limits,
            "get-number": self._get_number,
            "get-sms": self._get_sms,
            "set-status": self._set_status,
            "get-prices": self._get_prices,
            "countries": self._countries,
            "applications": self._applications,
        }.get(endpoint)
        if handler is None:
            return web.json_response({"error": "Not Found"}, status=404)
        if params.get("token") != TOKEN or self.scenario == "bad_token":
            message: Any = "Wrong token!"
            if endpoint in {"get-number", "limits", "get-prices"}:
                message = {"token": "Wrong token!"}
            return _error("wrong_token", message)
        if endpoint in self.canned:
            return web.json_response(self.canned[endpoint])
        return handler(params)

    def _balance(self, params: dict[str, str]) -> web.Response:
        return web.json_response({"balance": f"{self.balance:.2f}"})

    def _limits(self, params: dict[str, str]) -> web.Response:
        rows = [
            {"application_id": str(app), "country_id": str(country), "numbers": str(n)}
            for country, apps in self.prices.items()
            for app, (_, n) in apps.items()
            if params.get("country_id") in (None, str(country))
            and params.get("application_id") in (None, str(app))
        ]
        return web.json_response(rows)

    def _get_number(self, params: dict[str, str]) -> web.Response:
        if self.scenario == "no_balance":
            return _error("balance", {"balance": "Not enough money"})
        if self.scenario == "no_numbers":
            return _error("no_numbers", {"number": "No free numbers"})
        if self.scenario == "bad_service":
            return _error("wrong_application_id", {"application_id": "Not found"})
        country, app = (
            _int(params.get("country_id")),
            _int(params.get("application_id")),
        )
        if country not in COUNTRIES:
            return _error("wrong_country_id", {"country_id": "Not found"})
        if app not in APPLICATIONS:
            return _error("wrong_application_id", {"application_id": "Not found"})
        offer = self.prices.get(country, {}).get(app)
        if offer is None or offer[1] <= 0:
            return _error("no_numbers", {"number": "No free numbers"})
        cost = Decimal(offer[0])
        max_price = params.get("maxPrice")
        if (
            max_price is not None
            and self.honours_max_price
            and Decimal(max_price) < cost
        ):
            return _error("no_numbers", {"number": "No numbers at this price"})
        if self.balance < cost:
            return _error("balance", {"balance": "Not enough money"})
        self.balance -= cost
        request_id = next(self._next_id)
        number = DIAL_PREFIX.get(country, "1") + f"{request_id:09d}"
        self.orders[str(request_id)] = FakeOrder(
            id=str(request_id),
            service=str(app),
            country=str(country),
            phone=number,
            price=cost,
            created=time.time(),
        )
        return web.json_response(
            {
                "request_id": request_id,
                "country_id": country,
                "application_id": app,
                "number": number,
            }
        )

    def _get_sms(self, params: dict[str, str]) -> web.Response:
        order = self.orders.get(params.get("request_id", ""))
        if order is None:
            return _error("wrong_request_id", "Request not found")
        if order.state in {"cancelled", "finished", "expired"}:
            # not documented: some error code other than wait_sms
            return _error("order_closed", "Request is closed")
        fields: dict[str, Any] = {
            "request_id": int(order.id),
            "country_id": int(order.country),
            "application_id": int(order.service),
            "number": order.phone,
        }
        fresh = order.sms[self._seen.get(order.id, 0) :]
        if not fresh:
            return web.json_response(
                {**fields, "error_code": "wait_sms", "error_msg": "Still waiting..."}
            )
        text, code = fresh[-1]
        fields["sms_code"] = code or _code_in(text)
        if self.send_sms_text:
            fields["sms_text"] = text
        return web.json_response(fields)

    def _set_status(self, params: dict[str, str]) -> web.Response:
        status = params.get("status", "")
        order = self.orders.get(params.get("request_id", ""))
        if order is None:
            return _error("wrong_request_id", "Request not found")
        if status not in {"ready", "close", "reject", "used"}:
            return _error("wrong_status", f"Status {status} does not exists")
        order.calls.append(status)
        if order.state in {"cancelled", "finished", "expired"}:
            return _error("order_closed", "Request is closed")  # not documented
        if status == "reject" or status == "used":
            if not order.sms and status == "reject":
                self.balance += order.price  # reject before an SMS refunds [lib]
            order.state = "cancelled"
        elif status == "close":
            order.state = "finished"
        elif order.sms:  # ready after a code: wait for a new one
            self._seen[order.id] = len(order.sms)
            order.state = "waiting"
        return web.json_response({"request_id": int(order.id), "success": True})

    def _get_prices(self, params: dict[str, str]) -> web.Response:
        wanted = params.get("country_id")
        body: dict[str, Any] = {
            str(country): {
                str(app): {"cost": cost, "count": count}
                for app, (cost, count) in apps.items()
            }
            for country, apps in self.prices.items()
            if wanted in (None, str(country))
        }
        if self.prices_shape == "flat" and wanted is not None:
            body = body.get(wanted, {})
        return web.json_response(body)

    def _countries(self, params: dict[str, str]) -> web.Response:
        rows = [{"id": cid, "title": title} for cid, title in COUNTRIES.items()]
        if self.countries_shape == "object":
            return web.json_response(
                {str(r["id"]): {**r, "id": str(r["id"])} for r in rows}
            )
        return web.json_response(rows)

    def _applications(self, params: dict[str, str]) -> web.Response:
        rows = [
            {"id": str(aid), "name": name, "code": code}
            for aid, (name, code) in APPLICATIONS.items()
        ]
        if self.applications_shape == "object":
            return web.json_response({r["id"]: r for r in rows})
        return web.json_response(rows)


def _error(code: str, message: Any) -> web.Response:
    """sms-man's error envelope (HTTP status not documented: 200 here)."""
    return web.json_response(
        {"success": False, "error_code": code, "error_msg": message}
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _code_in(text: str) -> str:
    match = re.search(r"\d{4,8}", text)
    return match.group(0) if match else text


def provider_options(url: str) -> dict[str, Any]:
    """Options for a provider pointed at a fake served at ``url`` (its root).

    ``min_interval: 0``: for the tests that are about something else (money, faults,
    parsing); real pacing is what tests/test_pacing.py runs under.
    """
    return {
        "type": TYPE,
        "token": TOKEN,
        "base_url": url + "/control",
        "min_interval": 0,
    }
