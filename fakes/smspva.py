"""A fake smspva: activation v2 (``/activation/...``) and rental (``/api/rent.php``).

Activation v2 answers ``{"statusCode": N, ...}`` with HTTP status N and the key in the
``apikey`` header; ``phoneNumber`` is an integer without the dial code. Rental answers
``{"status": 1, "data": ...}`` or ``{"status": 0, "msg": ...}`` with the key as the
``apikey`` query parameter, and keeps the documented quirks: ``activate`` answers
``"status": "1"`` (a string), ``until`` is an int, and ``sms`` answers a bare list or
``{"SmsList": [...], "OtherSms": [...]}`` depending on ``sms_style``.

Scenarios (``self.scenario``) apply to buying (``number/...`` and ``create``):
``no_numbers`` (502 / msg without a hint), ``no_balance`` (407 / "Balance is not
enough"), ``bad_service`` (405 "Invalid service" / "Service not found") and
``bad_token`` (every call rejected as a wrong key). A wrong key is always rejected.

Telegram (opt29) is sold in RU and VN through activation, in RU through rental.
Activation orders are charged when an SMS is delivered; rentals at ``create``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from fakes.common import HTML_500, FakeOrder, FakeUpstream

TYPE = "smspva"
API_KEY = "smspva-fake-key-0123456789"

ACTIVATION_STOCK = {("RU", "opt29"): 0.35, ("VN", "opt29"): 0.25}  # USD per SMS
RENT_STOCK = {("RU", "opt29"): 0.5}  # USD per day
DIAL = {"RU": "+7", "VN": "+84"}
FIRST_NUMBER = {"RU": 9876543210, "VN": 912345670}
RENT_DAYS = {"week": 7, "month": 30}


def provider_options(url: str, api: str = "activation") -> dict[str, Any]:
    """Provider options pointing both smspva APIs at the fake."""
    return {
        "type": TYPE,
        "api_key": API_KEY,
        "api": api,
        "activation_url": url,
        "base_url": url,
        # unpaced for the tests that are about something else; smspva's real 4.5 s
        # spacing is the condition tests/test_pacing.py runs under
        "min_interval": 0,
        "poll_interval": 5,
    }


@dataclass
class FakeSmspvaOrder(FakeOrder):
    """An smspva order: activation (SMS read one at a time) or rental (all SMS)."""

    api: str = "activation"
    operator: str = ""
    cleared: int = 0  # activation: SMS consumed by clearsms
    active: bool = False  # rental: activate was called
    until: int = 0  # rental: UNIX expiry
    dates: list[int] = field(default_factory=list)  # rental: date of each SMS
    read: int = 0  # rental: SMS already returned by ``sms`` (the rest are "new")


class FakeSmspva(FakeUpstream):
    """Both smspva APIs, sharing one USD balance."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.now = now
        self.balance = 10.5
        self.balance_style = "number"  # number | string | bare (no data wrapper)
        self.sms_style = "list"  # list | smslist
        self.method_faults: dict[str, str] = {}  # rent method -> html500 | after_500
        self.next_id = 123456
        self.activation_stock = dict(ACTIVATION_STOCK)  # tests may move prices
        self.rent_stock = dict(RENT_STOCK)
        self.orders_dated = True  # activation orders carry createdAt (undocumented)
        self.missing_bulk = False  # servicesprices/countnumbers answer 404 (gone)
        super().__init__()

    def setup_routes(self, app: web.Application) -> None:
        """Activation v2 paths and rent.php."""
        add = app.router.add_route
        add("GET", "/activation/balance", self.act_balance)
        add("GET", "/activation/number/{country}/{service}", self.act_number)
        add("GET", "/activation/number/{country}/{service}/{operator}", self.act_number)
        add("GET", "/activation/sms/{id}", self.act_sms)
        add("PUT", "/activation/clearsms/{id}", self.act_clearsms)
        add("PUT", "/activation/cancelorder/{id}", self.act_cancel)
        add("PUT", "/activation/stopsms/{id}", self.act_cancel)
        add("GET", "/activation/servicesprices", self.act_prices)
        add("GET", "/activation/countnumbers/{country}", self.act_counts)
        add("GET", "/activation/orders", self.act_orders)
        add("GET", "/activation/serviceprice/{country}/{service}", self.act_price)
        add("GET", "/api/rent.php", self.rent)

    # ---- test controls ---------------------------------------------------------------

    def deliver(self, order_id: str, text: str, code: str | None = None) -> None:
        """An SMS reaches the number; activation charges the balance now."""
        order = self.orders[order_id]
        assert isinstance(order, FakeSmspvaOrder)
        if order.api == "rent":
            code = None  # rental SMS are bare text
            order.dates.append(int(self.now()))
        else:
            self.balance = round(self.balance - float(order.price), 4)
        super().deliver(order_id, text, code)

    def expire(self, order_id: str) -> None:
        """The order runs out upstream."""
        order = self.orders[order_id]
        assert isinstance(order, FakeSmspvaOrder)
        order.state = "expired"
        order.until = int(self.now()) - 1

    # ---- activation v2 ---------------------------------------------------------------

    def _act(self, status: int, data: Any = None, error: str = "") -> web.Response:
        body: dict[str, Any] = {"statusCode": status}
        if error:
            body["error"] = {"type": error.upper().replace(" ", "_"), "message": error}
        elif data is not None:
            body["data"] = data
        return web.json_response(body, status=status)

    def _act_auth(self, request: web.Request) -> web.Response | None:
        if self.scenario == "bad_token" or request.headers.get("apikey") != API_KEY:
            return self._act(401, error="Wrong apikey")
        return None

    def _act_order(self, request: web.Request) -> FakeSmspvaOrder | None:
        order = self.orders.get(request.match_info["id"])
        if isinstance(order, FakeSmspvaOrder) and order.api == "activation":
            return order
        return None

    async def act_balance(self, request: web.Request) -> web.Response:
        """GET balance: number, string or without the data wrapper."""
        if refused := self._act_auth(request):
            return refused
        if self.balance_style == "bare":
            return web.json_response({"statusCode": 200, "balance": self.balance})
        value: Any = self.balance
        if self.balance_style == "string":
            value = f"{self.balance:.2f}"
        return self._act(200, {"balance": value})

    async def act_number(self, request: web.Request) -> web.Response:
        """GET number/{country}/{service}[/{operator}]: buys one number."""
        if refused := self._act_auth(request):
            return refused
        country = request.match_info["country"]
        service = request.match_info["service"]
        if self.scenario == "no_balance":
            return self._act(407, error="Your balance is too low")
        if self.scenario == "bad_service" or not service.startswith("opt"):
            return self._act(405, error="Invalid service")
        if (
            self.scenario == "no_numbers"
            or (country, service) not in self.activation_stock
        ):
            return self._act(502, error="Number not found")
        order_id = self._new_id()
        number = FIRST_NUMBER[country] + len(self.orders)
        self.orders[order_id] = FakeSmspvaOrder(
            id=order_id,
            service=service,
            country=country,
            phone=str(number),
            price=self.activation_stock[(country, service)],
            created=self.now(),
            operator=request.match_info.get("operator", ""),
        )
        data = {
            "orderId": int(order_id),
            "phoneNumber": number,
            "countryCode": country,
            "orderExpireIn": 600,
        }
        return self._act(200, data)

    async def act_sms(self, request: web.Request) -> web.Response:
        """GET sms/{id}: the current SMS, 202 while none, 410 once closed."""
        if refused := self._act_auth(request):
            return refused
        order = self._act_order(request)
        if order is None:
            return self._act(406, error="Order not found")
        order.calls.append("sms")
        if order.cleared < len(order.sms):
            text, code = order.sms[order.cleared]
            sms = {"code": code or "", "fullText": text}
            return self._act(200, {"sms": sms, "orderId": int(order.id)})
        if order.state in ("cancelled", "expired", "finished"):
            return self._act(410, error="Order closed")
        return self._act(202, error="SMS not yet received")

    async def act_clearsms(self, request: web.Request) -> web.Response:
        """PUT clearsms/{id}: drop the current SMS so that the next one shows."""
        if refused := self._act_auth(request):
            return refused
        order = self._act_order(request)
        if order is None:
            return self._act(406, error="Order not found")
        order.calls.append("clearsms")
        if order.cleared >= len(order.sms):
            return self._act(404, error="No SMS to clear")
        order.cleared += 1
        order.state = "waiting"
        return self._act(200, {"orderId": int(order.id)})

    async def act_cancel(self, request: web.Request) -> web.Response:
        """PUT cancelorder/{id} (and stopsms): close the order; 410 if closed."""
        if refused := self._act_auth(request):
            return refused
        order = self._act_order(request)
        if order is None:
            return self._act(406, error="Order not found")
        order.calls.append(request.path.split("/")[2])
        if order.state in ("cancelled", "expired", "finished"):
            return self._act(410, error="Order closed")
        order.state = "cancelled"
        return self._act(200, {"orderId": int(order.id)})

    async def act_price(self, request: web.Request) -> web.Response:
        """GET serviceprice/{country}/{service}: the documented per-service price.

        The exact data shape is not in our sources: price and count are assumed.
        """
        if refused := self._act_auth(request):
            return refused
        where = (request.match_info["country"], request.match_info["service"])
        if where not in ACTIVATION_STOCK:
            return self._act(406, error="Service not found")
        data = {"country": where[0], "service": where[1], "price": ACTIVATION_STOCK[where],
                "count": 17}  # fmt: skip
        return self._act(200, data)

    async def act_prices(self, request: web.Request) -> web.Response:
        """GET servicesprices: every (country, service) on sale."""
        if refused := self._act_auth(request):
            return refused
        if self.missing_bulk:
            return web.Response(status=404, text="Not Found")
        data = [
            {"country": country, "service": service, "price": price}
            for (country, service), price in self.activation_stock.items()
        ]
        return self._act(200, data)

    async def act_counts(self, request: web.Request) -> web.Response:
        """GET countnumbers/{country}: stock per service and operator."""
        if refused := self._act_auth(request):
            return refused
        if self.missing_bulk:
            return web.Response(status=404, text="Not Found")
        country = request.match_info["country"]
        data = {
            service: {"any": 40, "mts": 2}
            for (where, service) in self.activation_stock
            if where == country
        }
        return self._act(200, data)

    async def act_orders(self, request: web.Request) -> web.Response:
        """GET orders: the activation orders, newest last.

        The shape is not in our sources (backends.md names the endpoint only):
        ``{"orders": [{orderId, phoneNumber, countryCode, service, status}]}`` is
        invented here, ``status`` being the order's state (waiting, received, ...).
        """
        if refused := self._act_auth(request):
            return refused
        orders = [
            {
                "orderId": int(order.id),
                "phoneNumber": int(order.phone),
                "countryCode": order.country,
                "service": order.service,
                "status": order.state,
                **({"createdAt": int(order.created)} if self.orders_dated else {}),
            }
            for order in self.orders.values()
            if isinstance(order, FakeSmspvaOrder) and order.api == "activation"
        ]
        return self._act(200, {"orders": orders})

    # ---- rental ----------------------------------------------------------------------

    async def rent(self, request: web.Request) -> web.StreamResponse:
        """rent.php?method=...: dispatch on ``method`` (GET only, JSON always)."""
        method = request.query.get("method", "")
        fault = self.method_faults.get(method)
        if fault == "html500":
            return _html500()
        handler = getattr(self, f"rent_{method}", None)
        if handler is None:
            response = _fail("Unknown method")
        elif method != "getdata" and (
            self.scenario == "bad_token" or request.query.get("apikey") != API_KEY
        ):
            response = _fail("API KEY NOT FOUND!")
        else:
            response = handler(request.query)
        if fault == "after_500":
            return _html500()
        if fault == "after_hang":  # this method ran (a rent was made), then it stalls
            await asyncio.sleep(self.hang_seconds)
        return response

    def _rent_order(self, query: Any) -> FakeSmspvaOrder | None:
        order = self.orders.get(query.get("id", ""))
        if isinstance(order, FakeSmspvaOrder) and order.api == "rent":
            return order
        return None

    def rent_getdata(self, query: Any) -> web.Response:
        """getdata: services of a country (no key needed)."""
        data = [
            {"name": "Telegram", "service": service, "price_day": price, "count": 5}
            for (country, service), price in self.rent_stock.items()
            if country == query.get("country")
        ]
        return web.json_response({"status": 1, "data": data})

    def rent_create(self, query: Any) -> web.Response:
        """create: rents a number for dtype x dcount and charges it now."""
        country, service = query.get("country", ""), query.get("service", "")
        days = RENT_DAYS.get(query.get("dtype", ""), 0) * int(query.get("dcount", "0"))
        if self.scenario == "bad_service" or not service.startswith("opt"):
            return _fail("Service not found")
        if self.scenario == "no_numbers" or (country, service) not in self.rent_stock:
            return _fail("No free phone numbers, try later")
        cost = self.rent_stock[(country, service)] * days
        if self.scenario == "no_balance" or cost > self.balance:
            return _fail("Balance is not enough")
        if days <= 0:
            return _fail("Wrong period")
        self.balance = round(self.balance - cost, 4)
        order_id = self._new_id()
        pnumber = str(FIRST_NUMBER[country] + len(self.orders))
        until = int(self.now()) + days * 86400
        self.orders[order_id] = FakeSmspvaOrder(
            id=order_id,
            service=service,
            country=country,
            phone=pnumber,
            price=cost,
            created=self.now(),
            api="rent",
            until=until,
        )
        data = {
            "id": int(order_id),
            "pnumber": pnumber,
            "ccode": DIAL[country],
            "service": service,
            "until": until,
        }
        return web.json_response({"status": 1, "data": data})

    def rent_activate(self, query: Any) -> web.Response:
        """activate: answers with status as the string "1" (public sample)."""
        order = self._rent_order(query)
        if order is None:
            return _fail("Order not found")
        order.calls.append("activate")
        order.active = True
        return web.json_response({"status": "1", "data": {"id": int(order.id)}})

    def rent_sms(self, query: Any) -> web.Response:
        """sms: every SMS of the order, as a list or under SmsList."""
        order = self._rent_order(query)
        if order is None:
            return _fail("Order not found")
        order.calls.append("sms")
        order.read = len(order.sms)
        items = [
            {"text": text, "sender": "TELEGRAM", "date": date}
            for (text, _), date in zip(order.sms, order.dates, strict=True)
        ]
        if self.sms_style == "smslist":
            if not items:
                return _fail("No SMS")
            data: Any = {"SmsList": items, "OtherSms": []}
        else:
            data = items
        return web.json_response({"status": 1, "data": data})

    def rent_orders(self, query: Any) -> web.Response:
        """orders: every rental, with the seed's fields.

        ``hasnewsms`` is read as the seed's "flag of new SMS": an SMS that ``sms`` has
        not returned yet (reading them clears it). ``canprolong*`` follow the 7-day
        rule; ``lastonline`` is the last SMS's date (else the order's creation).
        """
        data = [
            {
                "id": int(order.id),
                "scode": order.service,
                "sname": "Telegram",
                "state": 1 if order.active else 0,
                "pnumber": order.phone,
                "ccode": DIAL[order.country],
                "cname": order.country,
                "hasnewsms": len(order.sms) > order.read,
                "until": order.until,
                "canprolong": order.until - self.now() < 7 * 86400,
                "canprolongmax": 162,
                "canprolonguntil": int(order.created) + 90 * 86400,
                "lastonline": order.dates[-1] if order.dates else int(order.created),
            }
            for order in self.orders.values()
            if isinstance(order, FakeSmspvaOrder)
            and order.api == "rent"
            and order.state not in ("cancelled", "expired")
        ]
        return web.json_response({"status": 1, "data": data})

    def rent_prolong(self, query: Any) -> web.Response:
        """prolong: charges price_day x days, only when fewer than 7 days are left."""
        order = self._rent_order(query)
        if order is None or order.state in ("cancelled", "expired"):
            return _fail("Order not found")
        days = RENT_DAYS.get(query.get("dtype", ""), 0) * int(query.get("dcount", "0"))
        if order.until - self.now() >= 7 * 86400:
            return _fail(
                "You can prolong number only if before expiring date left less 7 days"
            )
        cost = RENT_STOCK[(order.country, order.service)] * days
        if cost > self.balance:
            return _fail("Balance is not enough")
        self.balance = round(self.balance - cost, 4)
        order.until += days * 86400
        order.calls.append("prolong")
        return web.json_response({"status": 1, "data": {"id": int(order.id)}})

    def rent_delete(self, query: Any) -> web.Response:
        """delete: ends the rental; an order already gone is an error."""
        order = self._rent_order(query)
        if order is None or order.state in ("cancelled", "expired"):
            return _fail("Order not found")
        order.calls.append("delete")
        order.state = "cancelled"
        return web.json_response({"status": 1, "data": {"id": int(order.id)}})

    def _new_id(self) -> str:
        self.next_id += 1
        return str(self.next_id)


def _fail(message: str) -> web.Response:
    return web.json_response({"status": 0, "msg": message})


def _html500() -> web.Response:
    return web.Response(status=500, text=HTML_500, content_type="text/html")
