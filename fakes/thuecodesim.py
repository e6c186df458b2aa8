"""A stand-in for api.thuecodesim.com, answering with the seed's JSON and its quirks.

Quirks kept on purpose (``seeds/thuecodesim-api.vi.txt``): service prices are "800"
strings in some entries and 800 numbers in others; ``request_id`` is a string; the
session ``ID`` is an int; ``IsSound`` is the string "false"/"true"; ``Code`` and
``SmsContent`` are null while waiting; history items lack ``PhoneOriginal``,
``CountryISO`` and ``CountryCode`` and give ``Phone`` as a number. Failures use the
documented envelope with ``success: false`` and a Vietnamese ``message``; the
``status_code`` numbers are invented (the real ones are undocumented), and a refused
token also gets HTTP 401, so adapters must read the body whatever the status.

Scenarios (``self.scenario``): ok, no_numbers, no_balance, bad_service, bad_token,
limit (waiting-numbers cap), error (generic "Có lỗi"), not_envelope (JSON without the
envelope). A wrong token gets the auth envelope whatever the scenario.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from fakes.common import FakeOrder, FakeUpstream

TYPE = "thuecodesim"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.fake-thuecodesim-token"

VIETNAM_TZ = timezone(timedelta(hours=7))

# Per-country catalogues: ids differ between countries, prices mix strings and numbers.
SERVICES: dict[str, list[dict[str, Any]]] = {
    "vn": [
        {"id": 7, "name": "Facebook", "price": "800"},
        {"id": 1, "name": "Momo", "price": "350"},
        {"id": 2, "name": "Shopee", "price": 600},
        {"id": 3, "name": "Zalo", "price": 700},
        {"id": 4, "name": "Telegram", "price": "1200"},
        {"id": 5, "name": "Tiktok", "price": 900},
        {"id": 6, "name": "Gmail", "price": "1000"},
        {"id": 8, "name": "Google", "price": 1100},
        {"id": 9, "name": "Lazada", "price": 500},
        {"id": 10, "name": "Grab", "price": "700"},
        {"id": 11, "name": "WhatsApp", "price": 1500},
        {"id": 12, "name": "Instagram", "price": "1000"},
        {"id": 14, "name": "ZaloPay", "price": 400},
        {"id": 15, "name": "Vietcombank", "price": "2000"},
        {"id": 16, "name": "Tinder", "price": 1500},
        {"id": 17, "name": "Twitter", "price": "1000"},
    ],
    "la": [
        {"id": 101, "name": "Telegram", "price": "3000"},
        {"id": 102, "name": "Facebook", "price": 2500},
        {"id": 103, "name": "WhatsApp", "price": "3500"},
        {"id": 104, "name": "TikTok", "price": 2000},
    ],
}

NETWORKS = [
    {"id": 1, "name": "MOBIFONE"},
    {"id": 2, "name": "VINAPHONE"},
    {"id": 3, "name": "VIETTEL"},
    {"id": 4, "name": "VIETNAMOBILE"},
    {"id": 5, "name": "ITELECOM"},
    {"id": 6, "name": "VODAFONE"},
    {"id": 7, "name": "WINTEL"},
    {"id": 8, "name": "METFONE"},
    {"id": 9, "name": "UNITEL"},
    {"id": 10, "name": "ETL"},
    {"id": 11, "name": "BEELINE"},
    {"id": 12, "name": "LAOTEL"},
]

# network -> local prefixes it sells (Vietnam: first two of the 9 digits; Laos: "20xx").
PREFIXES: dict[str, dict[str, list[str]]] = {
    "vn": {
        "VIETTEL": ["96", "97", "98", "86", "32", "33"],
        "VINAPHONE": ["91", "94", "88", "81", "83"],
        "MOBIFONE": ["90", "93", "89", "70", "77"],
        "VIETNAMOBILE": ["92", "56", "58"],
        "ITELECOM": ["87"],
        "WINTEL": ["55"],
    },
    "la": {
        "UNITEL": ["2095", "2096"],
        "ETL": ["2022"],
        "LAOTEL": ["2055"],
        "BEELINE": ["2077", "2078"],
    },
}

COUNTRY = {"vn": ("VN", "84"), "la": ("LA", "856")}

FAILURES: dict[str, tuple[int, str]] = {
    "bad_token": (401, "Lỗi xác thực"),
    "no_numbers": (404, "Kho số đang tạm hết, vui lòng liên hệ hỗ trợ"),
    "no_balance": (402, "Số dư tài khoản không đủ"),
    "bad_service": (410, "Ứng dụng không tồn tại hoặc đang tạm ngưng"),
    "limit": (429, "Limit exceeded, tối đa 5 số chờ tin nhắn"),
    "error": (400, "Có lỗi xảy ra, vui lòng thử lại sau"),
    "bad_session": (400, "Mã phiên không đúng"),
    "bad_network": (400, "Có lỗi: nhà mạng không hợp lệ"),
    "bad_country": (400, "Có lỗi: quốc gia không hợp lệ"),
}


def provider_options(url: str) -> dict[str, Any]:
    """Options that point a ThuecodesimProvider at a fake served at ``url``.

    ``min_interval: 0``: for the tests that are about something else (money, faults,
    parsing); real pacing is what tests/test_pacing.py runs under.
    """
    return {"type": TYPE, "token": TOKEN, "base_url": url, "min_interval": 0}


def vietnam_time(moment: float, tz: timezone = VIETNAM_TZ) -> str:
    """Epoch seconds -> the upstream's CreatedTime: Vietnam time, 2-digit fraction."""
    local = datetime.fromtimestamp(moment, tz)
    return local.strftime("%Y-%m-%dT%H:%M:%S") + f".{local.microsecond // 10000:02d}"


class FakeThuecodesim(FakeUpstream):
    """thuecodesim's v2 GET API over a little in-memory SIM bank."""

    def __init__(self) -> None:
        super().__init__()
        self.balance = 1_000_000  # VND
        self.clock: Callable[[], float] = time.time
        self.field_list_types = False  # session types as the seed's field lists show
        self.services = copy.deepcopy(SERVICES)  # tests may move prices
        # service id -> new price, applied as a purchase arrives: a price that moved
        # after the service list was read and before the request landed
        self.reprice_on_request: dict[int, Any] = {}
        self.tz = VIETNAM_TZ  # the zone of CreatedTime and of the history's dates
        self._ids = itertools.count(122314)
        self._serial = itertools.count(1234567)

    def setup_routes(self, app: web.Application) -> None:
        """The six documented GET paths."""
        app.router.add_get("/users/balance", self._balance)
        app.router.add_get("/networks/get", self._networks)
        app.router.add_get("/service/getv2", self._services)
        app.router.add_get("/request/getv2", self._request)
        app.router.add_get("/session/getv2", self._session)
        app.router.add_get("/session/historyv2", self._history)

    def expire(self, order_id: str) -> None:
        """The order's wait runs out upstream (Status 2), unless an SMS came."""
        order = self.orders[order_id]
        if order.state == "waiting":
            order.state = "expired"

    # ---- envelope ------------------------------------------------------------------

    @staticmethod
    def ok(data: Any, message: str = "successful") -> web.Response:
        """The success envelope."""
        body = {"status_code": 200, "success": True, "message": message, "data": data}
        return web.json_response(body)

    @staticmethod
    def fail(kind: str) -> web.Response:
        """A failure envelope; HTTP 401 for auth, 200 otherwise (both plausible)."""
        code, message = FAILURES[kind]
        body = {"status_code": code, "success": False, "message": message, "data": None}
        return web.json_response(body, status=401 if kind == "bad_token" else 200)

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The answer every path gives before doing anything, if any."""
        if self.scenario == "not_envelope":
            return web.json_response({"error": "maintenance"}, status=503)
        if self.scenario == "bad_token" or request.query.get("token") != TOKEN:
            return self.fail("bad_token")
        return None

    # ---- handlers ------------------------------------------------------------------

    async def _balance(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        return refused if refused is not None else self.ok({"balance": self.balance})

    async def _networks(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        return refused if refused is not None else self.ok(NETWORKS)

    async def _services(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:  # a Response is a Mapping: empty means falsy
            return refused
        country = request.query.get("country", "vn")
        if country not in self.services:
            return self.fail("bad_country")
        return self.ok(self.services[country])

    async def _request(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        if self.scenario in FAILURES:
            return self.fail(self.scenario)
        for rows in self.services.values():
            for row in rows:
                if row["id"] in self.reprice_on_request:
                    row["price"] = self.reprice_on_request[row["id"]]
        self.reprice_on_request = {}
        query = request.query
        number = "".join(ch for ch in query.get("number", "") if ch.isdigit())
        country = "la" if number.startswith("856") else query.get("country", "vn")
        if country not in self.services:
            return self.fail("bad_country")
        service = next(
            (
                s
                for s in self.services[country]
                if str(s["id"]) == query.get("serviceId")
            ),
            None,
        )
        if service is None:
            return self.fail("bad_service")
        price = int(service["price"])
        if self.balance < price:
            return self.fail("no_balance")
        iso, dial = COUNTRY[country]
        if number:
            if number.startswith(dial) and len(number) > len(dial) + 8:
                number = number[len(dial) :]
            local = number.removeprefix("0")
        else:
            found = self._pick_number(country, query)
            if isinstance(found, web.Response):
                return found
            local = found
        request_id = str(next(self._ids))
        self.balance -= price
        self.orders[request_id] = FakeOrder(
            id=request_id,
            service=str(service["id"]),
            country=country,
            phone=local,
            price=price,
            created=self.clock(),
            calls=["request"],
        )
        data = {
            "phone_number": local,
            "balance": self.balance,
            "request_id": request_id,
            "re_phone_number": dial + local,
            "countryISO": iso,
            "countryCode": dial,
        }
        return self.ok(data, "Tạo yêu cầu thành công !")

    def _pick_number(self, country: str, query: Any) -> str | web.Response:
        """A fresh local number honouring network, prefix and exceptPrefix."""
        networks = [n for n in query.get("network", "").split("|") if n]
        for network in networks:
            if network not in PREFIXES[country]:
                return self.fail("bad_network")
        prefixes = [
            prefix
            for network in networks or list(PREFIXES[country])
            for prefix in PREFIXES[country][network]
        ]
        if country == "vn":
            wanted = [p for p in query.get("prefix", "").split("|") if p]
            unwanted = [p for p in query.get("exceptPrefix", "").split("|") if p]
            prefixes = [
                p
                for p in prefixes
                if (not wanted or any(p.startswith(w) for w in wanted))
                and not any(p.startswith(u) for u in unwanted)
            ]
        if not prefixes:
            return self.fail("no_numbers")
        width = (9 if country == "vn" else 10) - len(prefixes[0])
        return prefixes[0] + str(next(self._serial) % 10**width).zfill(width)

    async def _session(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        order = self.orders.get(request.query.get("requestId", ""))
        if order is None:
            return self.fail("bad_session")
        order.calls.append("session")
        return self.ok(self._session_data(order))

    async def _history(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        query = request.query
        try:
            start = date.fromisoformat(query.get("fromDate", "2000-01-01"))
            end = date.fromisoformat(query.get("toDate", "2999-12-31"))
            limit = int(query.get("limit", "100"))
        except ValueError:
            return self.fail("error")
        items = []
        for order in sorted(self.orders.values(), key=lambda o: -o.created):
            day = datetime.fromtimestamp(order.created, self.tz).date()
            if "service" in query and order.service != query["service"]:
                continue
            data = self._session_data(order)
            if "status" in query and str(data["Status"]) != query["status"]:
                continue
            if start <= day <= end:
                items.append(self._history_item(data))
        return self.ok(items[:limit])

    # ---- session bodies ------------------------------------------------------------

    def _session_data(self, order: FakeOrder) -> dict[str, Any]:
        """``/session/getv2`` data for an order, typed as the raw sample is."""
        iso, dial = COUNTRY[order.country]
        service = next(
            s for s in self.services[order.country] if str(s["id"]) == order.service
        )
        status = {"waiting": 0, "received": 1}.get(order.state, 2)
        text: str | None = None
        code: str | None = None
        if order.sms:
            text, sms_code = order.sms[-1]
            code = sms_code or ""
        sound = bool(text and text.endswith(".wav"))
        data: dict[str, Any] = {
            "ID": int(order.id),
            "ServiceID": int(order.service),
            "ServiceName": service["name"],
            "Status": status,
            "Price": order.price,
            "Phone": order.phone,
            "SmsContent": text,
            "IsSound": "true" if sound else "false",
            "CreatedTime": vietnam_time(order.created, self.tz),
            "Code": code,
            "PhoneOriginal": ("0" if order.country == "vn" else dial) + order.phone,
            "CountryISO": iso,
            "CountryCode": dial,
        }
        if self.field_list_types:
            data.update(ID=order.id, Status=str(status), IsSound=sound)
        return data

    @staticmethod
    def _history_item(data: dict[str, Any]) -> dict[str, Any]:
        """A history item: the session minus the optional fields, Phone as a number."""
        item = {
            key: value
            for key, value in data.items()
            if key not in ("PhoneOriginal", "CountryISO", "CountryCode")
        }
        item["Phone"] = int(data["Phone"])
        return item
