"""smspva: activation v2 (``api.smspva.com/activation``) or rental (``rent.php``).

Both APIs share one account and one USD balance. The option ``api`` picks the one that
sells numbers; the balance always comes from activation v2, since rent.php has none.

* activation v2: ``apikey`` header, ``{"statusCode": N, "data"|"error": ...}`` with
  the HTTP status equal to ``statusCode``; charged when the SMS arrives;
  ``phoneNumber`` is an integer *without* the dial code, which we prepend from
  ``data/smspva.json``.
* rental: ``apikey`` query parameter, ``{"status": 1|"1", "data": ...}`` or
  ``{"status": 0, "msg": ...}``; charged at ``create``; a number must be ``activate``-d
  before SMS reach it; SMS come as bare text, so the code is extracted.

Branches follow the documented ``statusCode``/``status`` only; message text is a hint
(auth, balance, service) with a default branch, never the only signal.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from providers.base import (
    Provider,
    as_decimal,
    as_int,
    as_text,
    digits,
    number_option,
    require_option,
    url_option,
)
from providers.otp import extract_code
from providers.rental import Rental
from providers.vocabulary import (
    ActivationRef,
    Clock,
    ConfigError,
    NoBalance,
    NoNumbers,
    Offer,
    Order,
    PollResult,
    ProviderError,
    Purchase,
    RentOffer,
    RentOrder,
    RentPoll,
    RentPurchase,
    RentRef,
    RentSms,
    Sms,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

_TABLES: dict[str, Any] = json.loads(
    resources.files("providers").joinpath("data/smspva.json").read_text("utf-8")
)
SERVICES: dict[str, str] = dict(_TABLES["services"])  # sms-activate code -> optNN
COUNTRIES: dict[int, str] = {int(k): v for k, v in _TABLES["countries"].items()}
DIAL_CODES: dict[str, str] = dict(_TABLES["dial_codes"])  # ISO -> E.164 prefix
RENT_EXCLUDED: frozenset[str] = frozenset(_TABLES["rent_excluded"])  # no VN, LA

APIS = ("activation", "rent")
RENT_DAYS = {"week": 7, "month": 30}  # "month" as 30 days: price_day x days [doc]
POLL_FLOOR = 5.0  # seconds; the docs ask for 4-5 s between queries
SINGLE_TTL_FACTOR = 5  # serviceprice answers live 5 x catalog_ttl (paced calls)
LOOKUP_SLACK = 600.0  # seconds of clock skew tolerated when matching orders

_OPT = re.compile(r"opt\d+")
_ISO = re.compile(r"[A-Z]{2}")
_AUTH_HINTS = ("apikey", "api key", "api_key", "token", "unauthori", "forbidden")
_BALANCE_HINTS = ("balance", "funds", "money", "средств")
_SERVICE_HINTS = ("service", "country", "сервис", "стран")

# activation v2 statusCode meanings [doc, backends.md 3.2]
OK, NOT_YET, NO_SMS, BAD_PARAMS, NOT_FOUND, LOW_BALANCE, CLOSED = (
    200,
    202,
    404,
    405,
    406,
    407,
    410,
)
AUTH_CODES = (401, 403)


@dataclass(frozen=True)
class _Answer:
    """One decoded upstream answer: its status code, payload and error text."""

    code: int  # activation: statusCode (HTTP status if absent); rent: 1 or 0
    data: Any
    error: str  # lower-cased free text from error/msg, for hints only


class SmspvaProvider(Provider, Rental):
    """An smspva account, selling through activation v2 or the rental API.

    With ``api: rent`` it also serves the dialect's rent family: rent.php rents by
    whole weeks, so a rent of N hours buys ceil(N / 168) weeks (and says so in its
    price and end date).
    """

    type_name: ClassVar[str] = "smspva"
    currency: ClassVar[str] = "USD"
    secret_fields: ClassVar[tuple[str, ...]] = ("api_key",)
    option_names: ClassVar[tuple[str, ...] | None] = (
        "api_key",
        "api",
        "activation_url",
        "base_url",
        "rent",
        "catalog_ttl",
        "services",
        "countries",
    )
    min_interval: float = 4.5  # [doc] keep 4-5 s between queries
    default_poll_interval: ClassVar[float] = POLL_FLOOR
    can_lookup: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        http: httpx.AsyncClient,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(name, options, http, clock)
        self.poll_interval = max(self.poll_interval, POLL_FLOOR)
        self.api_key = require_option(name, options, "api_key")
        api = options.get("api", "activation")
        if api not in APIS:
            raise ConfigError(
                f"providers.{name}.api: {api!r} is not one of {', '.join(APIS)}"
            )
        self.api: str = api
        self.activation_url = url_option(
            name, options, "activation_url", "https://api.smspva.com"
        )
        self.base_url = url_option(name, options, "base_url", "https://smspva.com")
        self.dtype, self.dcount = _rent_period(name, options.get("rent"))
        self.rent_days = RENT_DAYS[self.dtype] * self.dcount
        self.catalog_ttl = number_option(name, options, "catalog_ttl", 60.0)
        self.services = {
            **SERVICES,
            **_service_overrides(name, options.get("services")),
        }
        self.country_iso = {
            **COUNTRIES,
            **_country_overrides(name, options.get("countries")),
        }
        # activation v2: one price list for every country; counts per country
        self._prices: tuple[float, dict[tuple[str, str], Decimal]] | None = None
        self._counts: dict[str, tuple[float, dict[str, int]]] = {}
        self._single: dict[tuple[str, str], tuple[float, Offer | None]] = {}
        self._bulk_failed_at: float | None = None  # servicesprices/countnumbers failed
        self._rent_weeks: dict[
            tuple[str, int], tuple[float, dict[str, tuple[Decimal, int]]]
        ] = {}
        # rental: getdata per country, priced for the configured period
        self._rent_offers: dict[str, tuple[float, dict[str, tuple[Decimal, int]]]] = {}

    # ---- facts ----------------------------------------------------------------------

    def countries(self) -> list[int]:
        """sms-activate ids in the country table; rental lacks Vietnam and Laos."""
        return sorted(
            country
            for country, iso in self.country_iso.items()
            if self.api == "activation" or iso not in RENT_EXCLUDED
        )

    # ---- operations -----------------------------------------------------------------

    async def balance(self) -> Decimal:
        """The USD balance from activation v2 (rent.php has no balance method)."""
        answer = await self._activation("GET", "balance")
        if answer.code != OK:
            raise self._activation_failure(answer, buying=False)
        data = answer.data if isinstance(answer.data, dict) else {}
        amount = as_decimal(data.get("balance"))
        if amount is None:
            raise UpstreamUncertain(self.name, "balance answer without a balance")
        return amount

    async def buy(self, order: Order) -> Purchase:
        """One number; NoNumbers/NoBalance/UnknownService mean nothing was bought."""
        iso, opt = self._resolve(order.country, order.service)
        price = self._known_price(iso, opt)
        if order.max_price is not None and price and price > order.max_price:
            raise NoNumbers(self.name, f"price {price} above max_price")
        if self.api == "rent":
            return await self._buy_rent(order, iso, opt, price)
        return await self._buy_activation(order, iso, opt, price)

    async def poll(self, ref: ActivationRef) -> PollResult:
        """Every SMS upstream holds for the order, and whether the order is over."""
        if self.api == "rent":
            return await self._poll_rent(ref)
        answer = await self._activation("GET", f"sms/{_segment(ref.upstream_id)}")
        if answer.code in (NOT_FOUND, CLOSED):
            return PollResult(closed=True)
        if answer.code == NOT_YET:
            return PollResult()
        if answer.code != OK:
            raise self._activation_failure(answer, buying=False)
        data = answer.data if isinstance(answer.data, dict) else {}
        found = data.get("sms")
        items = found if isinstance(found, list) else [found]
        messages = []
        for item in items:
            if not isinstance(item, dict):
                continue
            text = as_text(item.get("fullText") or item.get("text"))
            code = as_text(item.get("code"))
            if not code and not text:
                continue
            messages.append(
                Sms(
                    uid=code + text,
                    text=text,
                    code=code or _code_of(text),
                    received_at=self.clock(),
                )
            )
        return PollResult(messages=tuple(messages))

    async def ready(self, ref: ActivationRef) -> None:
        """Rental: activate the number (needed before SMS arrive); activation: no-op."""
        if self.api != "rent":
            return
        answer = await self._rent("activate", id=ref.upstream_id)
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)

    async def retry(self, ref: ActivationRef) -> Purchase | None:
        """Ask for the next SMS (activation: clearsms); never a new purchase."""
        if self.api == "rent":
            return None  # a rental keeps receiving; the next SMS has a new uid
        answer = await self._activation("PUT", f"clearsms/{_segment(ref.upstream_id)}")
        if answer.code not in (OK, NO_SMS, NOT_FOUND, CLOSED):
            raise self._activation_failure(answer, buying=False)
        return None

    async def finish(self, ref: ActivationRef) -> None:
        """Local only: nothing upstream needs closing once the code worked.

        Activation v2 charges per delivered SMS and delivers no further SMS to an
        order until clearsms, so stopsms would only add a paced call to an endpoint
        whose effect is undocumented; a rental runs on until ``until``.
        """

    async def cancel(self, ref: ActivationRef) -> None:
        """Release the number (cancelorder / delete); an order already gone is fine."""
        if self.api == "rent":
            answer = await self._rent("delete", id=ref.upstream_id)
            if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
                raise UpstreamAuth(self.name, answer.error)
            return
        path = f"cancelorder/{_segment(ref.upstream_id)}"
        answer = await self._activation("PUT", path)
        if answer.code not in (OK, NOT_FOUND, CLOSED):
            raise self._activation_failure(answer, buying=False)

    async def quote(self, order: Order) -> Offer | None:
        """The price on sale now (``servicesprices`` or ``getdata`` fetched again).

        The count is the last catalogue's: a price limit needs only the price, and
        every extra call costs the pacing interval.
        """
        try:
            iso, opt = self._resolve(order.country, order.service)
        except UnknownService:
            return None
        if self.api == "rent":
            self._rent_offers.pop(iso, None)
            offer = (await self._rent_catalog(iso)).get(opt)
            if offer is None:
                return None
            return Offer(service=order.service, price=offer[0], count=offer[1])
        self._prices = None
        price = (await self._activation_prices()).get((iso, opt))
        if price is None:
            return None
        counts = self._counts.get(iso)
        count = counts[1].get(opt, 0) if counts else 0
        return Offer(service=order.service, price=price, count=count)

    async def catalog(self, country: int) -> list[Offer]:
        """Mapped services on sale in a country, USD price and stock; [] if none."""
        iso = self._iso(country)
        if iso is None:
            return []
        if self.api == "rent":
            priced = await self._rent_catalog(iso)
        else:
            # the bulk endpoints are undocumented: without them the catalog is empty
            # and service_offer() asks the documented serviceprice per service
            try:
                prices = await self._activation_prices()
            except (UpstreamUncertain, UpstreamUnreachable):
                prices = {}
                self._bulk_failed_at = self.clock()
            try:
                counts = await self._activation_counts(iso)
            except (UpstreamUncertain, UpstreamUnreachable):
                counts = {}
                self._bulk_failed_at = self.clock()
            priced = {
                opt: (price, counts.get(opt, 0))
                for (where, opt), price in prices.items()
                if where == iso
            }
        return [
            Offer(service=code, price=priced[opt][0], count=priced[opt][1])
            for code, opt in sorted(self.services.items())
            if opt in priced
        ]

    async def service_offer(self, country: int, service: str) -> Offer | None:
        """Activation: the documented ``serviceprice/{country}/{service}``, cached.

        Asked for a service the bulk ``servicesprices``/``countnumbers`` did not
        deliver, only while those failed lately (when they work, a service they do not
        list is not on sale): paced calls are not spent on it otherwise. The count
        comes from the answer, else from a cached countnumbers, else 0 (unknown).
        Answers are kept SINGLE_TTL_FACTOR x catalog_ttl.
        """
        if self.api == "rent" or self._bulk_failed_at is None:
            return None
        try:
            iso, opt = self._resolve(country, service)
        except UnknownService:
            return None
        cached = self._single.get((iso, opt))
        if cached and self.clock() - cached[0] < self.catalog_ttl * SINGLE_TTL_FACTOR:
            return cached[1]
        answer = await self._activation("GET", f"serviceprice/{iso}/{opt}")
        offer = None
        if answer.code == OK:
            data = answer.data[0] if isinstance(answer.data, list) else answer.data
            data = data if isinstance(data, dict) else {}
            price = as_decimal(_first(data, "price", "cost"))
            count = _count(_first(data, "count", "quantity", "totalCount"))
            if count is None:
                known = self._counts.get(iso)
                count = known[1].get(opt, 0) if known else 0
            if price is not None:
                offer = Offer(service=service, price=price, count=count)
        elif answer.code in AUTH_CODES:
            raise self._activation_failure(answer, buying=False)
        self._single[(iso, opt)] = (self.clock(), offer)
        return offer

    async def lookup_purchases(self, order: Order, since: float) -> list[Purchase]:
        """Upstream orders for this service and country made since ``since``."""
        try:
            iso, opt = self._resolve(order.country, order.service)
        except UnknownService:
            return []  # nothing of this kind can have been bought here
        if self.api == "rent":
            return await self._lookup_rent(order, iso, opt, since)
        answer = await self._activation("GET", "orders")
        if answer.code != OK:
            raise self._activation_failure(answer, buying=False)
        found = []
        for item in _records(answer.data, "orders"):
            order_id = _id_text(_first(item, "orderId", "id"))
            number = _id_text(_first(item, "phoneNumber", "number", "phone"))
            if not order_id or not number:
                continue
            service = as_text(_first(item, "service", "serviceCode"))
            where = as_text(_first(item, "countryCode", "country")).upper()
            created = _timestamp(_first(item, "createdAt", "created", "date", "time"))
            if (service and service != opt) or (where and where != iso):
                continue
            if created is not None and created < since - LOOKUP_SLACK:
                continue
            found.append(
                Purchase(
                    upstream_id=order_id,
                    phone=self._dial(where or iso, order.country) + number,
                    price=self._known_price(iso, opt) or Decimal(0),
                    created_at=created,
                )
            )
        return found

    # ---- activation v2 --------------------------------------------------------------

    async def _activation(self, method: str, path: str) -> _Answer:
        """One activation v2 call; UpstreamUncertain unless the body is JSON."""
        status, body = await self._request_json(
            method,
            f"{self.activation_url}/activation/{path}",
            headers={"apikey": self.api_key},
        )
        if isinstance(body, list):
            return _Answer(status, body, "")
        if not isinstance(body, dict):
            raise UpstreamUncertain(self.name, f"HTTP {status}, body is not an object")
        code = as_int(body.get("statusCode"), status)
        data = body["data"] if "data" in body else body
        error = " ".join(
            _texts(body.get("error"), body.get("message"), body.get("msg"))
        )
        return _Answer(status if code is None else code, data, error.lower())

    def _activation_failure(self, answer: _Answer, *, buying: bool) -> ProviderError:
        """The exception for a non-success statusCode (nothing bought when buying)."""
        detail = f"statusCode {answer.code} {answer.error}".strip()
        if answer.code in AUTH_CODES or _has(answer.error, _AUTH_HINTS):
            return UpstreamAuth(self.name, detail)
        if not buying:
            return UpstreamUncertain(self.name, detail)
        if answer.code == LOW_BALANCE:
            return NoBalance(self.name, detail)
        if answer.code in (BAD_PARAMS, NOT_FOUND) and _has(
            answer.error, _SERVICE_HINTS
        ):
            return UnknownService(self.name, detail)
        # 405 without hints, 411 (karma/rate), 500-503, anything else with a body
        return NoNumbers(self.name, detail)

    async def _buy_activation(
        self, order: Order, iso: str, opt: str, price: Decimal | None
    ) -> Purchase:
        path = f"number/{iso}/{opt}"
        operator = "any"
        if len(order.operators) == 1 and order.operators[0] != "any":
            operator = order.operators[0]
            path += f"/{_segment(operator)}"
        answer = await self._activation("GET", path)
        if answer.code != OK:
            raise self._activation_failure(answer, buying=True)
        data = answer.data if isinstance(answer.data, dict) else {}
        order_id = _id_text(data.get("orderId"))
        number = _id_text(data.get("phoneNumber"))
        if not order_id or not number:
            raise UpstreamUncertain(self.name, "number answer without orderId or phone")
        where = as_text(data.get("countryCode")).upper() or iso
        return Purchase(
            upstream_id=order_id,
            phone=self._dial(where, order.country) + number,
            price=price or Decimal(0),
            operator=operator,
        )

    async def _activation_prices(self) -> dict[tuple[str, str], Decimal]:
        """(ISO, optNN) -> USD from ``servicesprices``, cached ``catalog_ttl``."""
        if self._prices and self.clock() - self._prices[0] < self.catalog_ttl:
            return self._prices[1]
        answer = await self._activation("GET", "servicesprices")
        if answer.code != OK:
            raise self._activation_failure(answer, buying=False)
        prices = _parse_prices(answer.data)
        self._prices = (self.clock(), prices)
        self._bulk_failed_at = None
        return prices

    async def _activation_counts(self, iso: str) -> dict[str, int]:
        """optNN -> numbers in stock from ``countnumbers/{ISO}``, cached."""
        cached = self._counts.get(iso)
        if cached and self.clock() - cached[0] < self.catalog_ttl:
            return cached[1]
        answer = await self._activation("GET", f"countnumbers/{iso}")
        if answer.code != OK:
            raise self._activation_failure(answer, buying=False)
        counts = _parse_counts(answer.data, iso)
        self._counts[iso] = (self.clock(), counts)
        return counts

    # ---- rental ---------------------------------------------------------------------

    async def _rent(self, method: str, **params: Any) -> _Answer:
        """One rent.php call; code 1 on success, 0 otherwise (msg in ``error``)."""
        status, body = await self._request_json(
            "GET",
            f"{self.base_url}/api/rent.php",
            params={"method": method, "apikey": self.api_key, **params},
        )
        if not isinstance(body, dict):
            raise UpstreamUncertain(self.name, f"HTTP {status}, body is not an object")
        code = 1 if as_int(body.get("status")) == 1 else 0
        error = " ".join(_texts(body.get("msg"), body.get("error")))
        return _Answer(code, body.get("data"), error.lower())

    async def _buy_rent(
        self,
        order: Order,
        iso: str,
        opt: str,
        price: Decimal | None,
        period: tuple[str, int] | None = None,
    ) -> Purchase:
        dtype, dcount = period or (self.dtype, self.dcount)
        created = await self._rent(
            "create", dtype=dtype, dcount=dcount, country=iso, service=opt
        )
        if created.code != 1:
            raise self._rent_refusal(created.error)
        data = created.data[0] if isinstance(created.data, list) else created.data
        data = data if isinstance(data, dict) else {}
        order_id = _id_text(data.get("id"))
        if not order_id:
            raise UpstreamUncertain(self.name, "create succeeded without an order id")
        # Paid from here on: whatever happens next, the Purchase is returned.
        ccode = digits(data.get("ccode")) or self._dial(iso, order.country)
        until = as_int(data.get("until"))
        if until is None:  # estimate, so that poll() can still close the order
            until = int(self.clock()) + RENT_DAYS[dtype] * dcount * 86400
        activated = "0"
        try:
            if (await self._rent("activate", id=order_id)).code == 1:
                activated = "1"
        except ProviderError:
            pass  # the number is bought; ready() activates it later
        return Purchase(
            upstream_id=order_id,
            phone=ccode + digits(data.get("pnumber")),
            price=price or Decimal(0),
            extra={"until": str(until), "activated": activated},
        )

    def _rent_refusal(self, message: str) -> ProviderError:
        """The exception for ``create`` with status 0: nothing was bought."""
        if _has(message, _AUTH_HINTS):
            return UpstreamAuth(self.name, message)
        if _has(message, _BALANCE_HINTS):
            return NoBalance(self.name, message)
        if _has(message, _SERVICE_HINTS):
            return UnknownService(self.name, message)
        return NoNumbers(self.name, message)

    async def _poll_rent(self, ref: ActivationRef) -> PollResult:
        until = as_int(ref.extra.get("until"))
        expired = until is not None and self.clock() >= until
        try:
            answer = await self._rent("sms", id=ref.upstream_id)
        except ProviderError:
            if expired:
                return PollResult(closed=True)
            raise
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)
        # status 0 with data has been seen in the docs: read data whatever the status
        data = answer.data
        if isinstance(data, dict):
            data = _first(data, "SmsList", "smsList", "sms")
        messages = []
        for item in data if isinstance(data, list) else []:
            if not isinstance(item, dict):
                continue
            text = as_text(item.get("text"))
            if not text:
                continue
            date = as_text(item.get("date"))
            stamp = _timestamp(item.get("date"))
            messages.append(
                Sms(
                    uid=f"{date}:{text}",
                    text=text,
                    code=_code_of(text),
                    received_at=self.clock() if stamp is None else stamp,
                )
            )
        return PollResult(messages=tuple(messages), closed=expired)

    async def _rent_catalog(self, iso: str) -> dict[str, tuple[Decimal, int]]:
        """optNN -> (price for the configured period, count) from ``getdata``."""
        cached = self._rent_offers.get(iso)
        if cached and self.clock() - cached[0] < self.catalog_ttl:
            return cached[1]
        answer = await self._rent(
            "getdata", country=iso, dtype=self.dtype, dcount=self.dcount
        )
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)
        offers: dict[str, tuple[Decimal, int]] = {}
        for item in _records(answer.data, "services"):
            opt = as_text(item.get("service"))
            per_day = as_decimal(item.get("price_day"))
            if not opt or per_day is None:
                continue
            count = _count(item.get("count"))
            if count is None:
                count = _count(item.get("totalCount")) or 0
            offers[opt] = (per_day * self.rent_days, count)
        self._rent_offers[iso] = (self.clock(), offers)
        return offers

    async def _lookup_rent(
        self, order: Order, iso: str, opt: str, since: float
    ) -> list[Purchase]:
        answer = await self._rent("orders")
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)
        found = []
        for item in _records(answer.data, "orders"):
            order_id = _id_text(item.get("id"))
            where = as_text(item.get("cname")).upper()
            if not order_id or as_text(item.get("scode")) != opt:
                continue
            if where and where != iso:
                continue
            until = as_int(item.get("until"))
            # orders carry no creation time: until minus the period estimates it
            if (
                until is not None
                and until - self.rent_days * 86400 < since - LOOKUP_SLACK
            ):
                continue
            ccode = digits(item.get("ccode")) or self._dial(iso, order.country)
            found.append(
                Purchase(
                    upstream_id=order_id,
                    phone=ccode + digits(item.get("pnumber")),
                    price=self._known_price(iso, opt) or Decimal(0),
                    extra={"until": "" if until is None else str(until)},
                    # orders carry no creation time: until minus the period, which
                    # the samples show rounded to the minute
                    created_at=None
                    if until is None
                    else until - self.rent_days * 86400.0,
                    created_skew=60.0,
                )
            )
        return found

    # ---- the dialect's rent family (api: rent) ---------------------------------------

    def rent_countries(self) -> list[int]:
        """Every rentable country when ``api`` is rent; [] otherwise."""
        return self.countries() if self.api == "rent" else []

    async def rent_offers(self, country: int, hours: int) -> list[RentOffer]:
        """``getdata`` for the weeks covering ``hours``: price_day x days, count."""
        iso = self._iso(country)
        if iso is None or self.api != "rent":
            return []
        weeks = _weeks(hours)
        cached = self._rent_weeks.get((iso, weeks))
        if cached and self.clock() - cached[0] < self.catalog_ttl:
            priced = cached[1]
        else:
            answer = await self._rent(
                "getdata", country=iso, dtype="week", dcount=weeks
            )
            if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
                raise UpstreamAuth(self.name, answer.error)
            priced = _parse_getdata(answer.data, weeks * 7)
            self._rent_weeks[(iso, weeks)] = (self.clock(), priced)
        return [
            RentOffer(service=code, price=priced[opt][0], count=priced[opt][1])
            for code, opt in sorted(self.services.items())
            if opt in priced
        ]

    async def _rent_price(self, country: int, service: str, hours: int) -> Decimal:
        for offer in await self.rent_offers(country, hours):
            if offer.service == service:
                return offer.price
        return Decimal(0)

    async def rent(self, order: RentOrder) -> RentPurchase:
        """``create`` for whole weeks, then ``activate``; paid at create."""
        if self.api != "rent":
            raise UnknownService(self.name, "this account sells activations")
        iso, opt = self._resolve(order.country, order.service)
        weeks = _weeks(order.hours)
        try:
            price = await self._rent_price(order.country, order.service, order.hours)
        except (UpstreamUncertain, UpstreamUnreachable) as exc:
            # only getdata failed: the paid create was never sent
            raise UpstreamUnreachable(
                self.name, f"price unknown: {exc.detail}"
            ) from exc
        bought = await self._buy_rent(
            Order(order.service, order.country), iso, opt, price, ("week", weeks)
        )
        return RentPurchase(
            upstream_id=bought.upstream_id,
            phone=bought.phone,
            price=bought.price,
            until=float(bought.extra["until"]),
            extra=bought.extra,
        )

    async def rent_poll(self, ref: RentRef) -> RentPoll:
        """``sms``: every SMS with its sender; closed once ``until`` has passed."""
        expired = self.clock() >= ref.until
        try:
            answer = await self._rent("sms", id=ref.upstream_id)
        except ProviderError:
            if expired:
                return RentPoll(closed=True)
            raise
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)
        messages = tuple(
            RentSms(uid, text, _code_of(text), at, sender)
            for uid, text, at, sender in self._rent_sms(answer.data)
        )
        return RentPoll(messages=messages, closed=expired)

    async def rent_release(self, ref: RentRef) -> None:
        """``delete``: a refund is not documented (and never reported)."""
        answer = await self._rent("delete", id=ref.upstream_id)
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)

    async def rent_lookup(
        self, country: int, service: str, since: float
    ) -> list[RentPurchase] | None:
        """rent.php ``orders`` of this service and country (see _lookup_rent)."""
        if self.api != "rent":
            return None
        try:
            iso, opt = self._resolve(country, service)
        except UnknownService:
            return []
        found = await self._lookup_rent(Order(service, country), iso, opt, since)
        return [
            RentPurchase(
                p.upstream_id,
                p.phone,
                p.price,
                float(p.extra.get("until") or self.clock()),
                p.extra,
            )
            for p in found
        ]

    async def prolong_price(self, ref: RentRef, hours: int) -> Decimal:
        """The price of the weeks covering ``hours`` (getdata)."""
        return await self._rent_price(ref.country, ref.service, hours)

    async def prolong(self, ref: RentRef, hours: int) -> float:
        """``prolong`` by whole weeks; status 0 means nothing was charged."""
        weeks = _weeks(hours)
        answer = await self._rent(
            "prolong", id=ref.upstream_id, dtype="week", dcount=weeks
        )
        if answer.code != 1:
            raise self._rent_refusal(answer.error)
        return ref.until + weeks * 7 * 86400

    def _rent_sms(self, data: Any) -> list[tuple[str, str, float, str]]:
        """(uid, text, date, sender) of an ``sms`` answer, in either documented shape."""
        if isinstance(data, dict):
            data = _first(data, "SmsList", "smsList", "sms")
        found = []
        for item in data if isinstance(data, list) else []:
            if not isinstance(item, dict):
                continue
            text = as_text(item.get("text"))
            if not text:
                continue
            stamp = _timestamp(item.get("date"))
            found.append(
                (
                    f"{as_text(item.get('date'))}:{text}",
                    text,
                    self.clock() if stamp is None else stamp,
                    as_text(item.get("sender")),
                )
            )
        return found

    # ---- tables ---------------------------------------------------------------------

    def _iso(self, country: int) -> str | None:
        """The ISO code for an sms-activate id this provider serves, else None."""
        iso = self.country_iso.get(country)
        if iso is None or (self.api == "rent" and iso in RENT_EXCLUDED):
            return None
        return iso

    def _resolve(self, country: int, service: str) -> tuple[str, str]:
        """(ISO, optNN) for an order; UnknownService without any network call."""
        iso = self._iso(country)
        if iso is None:
            raise UnknownService(self.name, f"country {country} not served")
        opt = self.services.get(service)
        if opt is None:
            raise UnknownService(self.name, f"service {service!r} not mapped")
        return iso, opt

    def _dial(self, iso: str, country: int) -> str:
        """The dial code for an answer's ISO, else for the ordered country."""
        return DIAL_CODES.get(iso) or DIAL_CODES.get(COUNTRIES.get(country, ""), "")

    def _known_price(self, iso: str, opt: str) -> Decimal | None:
        """The cached price of one number, if a catalog call has seen it."""
        if self.api == "rent":
            offers = self._rent_offers.get(iso)
            offer = offers[1].get(opt) if offers else None
            return offer[0] if offer else None
        price = self._prices[1].get((iso, opt)) if self._prices else None
        single = self._single.get((iso, opt))
        if price is None and single and single[1] is not None:
            price = single[1].price
        return price


# ---- option parsing ------------------------------------------------------------------


def _weeks(hours: int) -> int:
    """Whole weeks covering ``hours`` (rent.php rents by the week or month)."""
    return max(1, -(-hours // 168))


def _parse_getdata(data: Any, days: int) -> dict[str, tuple[Decimal, int]]:
    """optNN -> (price_day x days, count) of a ``getdata`` answer."""
    offers: dict[str, tuple[Decimal, int]] = {}
    for item in _records(data, "services"):
        opt = as_text(item.get("service"))
        per_day = as_decimal(item.get("price_day"))
        if not opt or per_day is None:
            continue
        count = _count(item.get("count"))
        if count is None:
            count = _count(item.get("totalCount")) or 0
        offers[opt] = (per_day * days, count)
    return offers


def _rent_period(name: str, value: Any) -> tuple[str, int]:
    """(dtype, dcount) from the ``rent`` option; week/1 when absent."""
    if value is None:
        return "week", 1
    if not isinstance(value, Mapping) or set(value) - {"dtype", "dcount"}:
        raise ConfigError(f"providers.{name}.rent: expected {{dtype, dcount}}")
    dtype = value.get("dtype", "week")
    dcount = value.get("dcount", 1)
    if dtype not in RENT_DAYS:
        raise ConfigError(
            f"providers.{name}.rent.dtype: {dtype!r} is not week or month"
        )
    if isinstance(dcount, bool) or not isinstance(dcount, int) or dcount < 1:
        raise ConfigError(
            f"providers.{name}.rent.dcount: {dcount!r} is not an int >= 1"
        )
    return dtype, dcount


def _service_overrides(name: str, value: Any) -> dict[str, str]:
    """sms-activate code -> optNN overrides, or ConfigError."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"providers.{name}.services: expected a mapping")
    result = {}
    for code, opt in value.items():
        if not isinstance(opt, str) or not _OPT.fullmatch(opt.strip()):
            raise ConfigError(f"providers.{name}.services.{code}: {opt!r} is not optNN")
        result[str(code)] = opt.strip()
    return result


def _country_overrides(name: str, value: Any) -> dict[int, str]:
    """sms-activate id -> ISO overrides (dial code must be known), or ConfigError."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"providers.{name}.countries: expected a mapping")
    result = {}
    for key, iso in value.items():
        country = as_int(key)
        where = f"providers.{name}.countries.{key}"
        if country is None or country < 0:
            raise ConfigError(f"{where}: not an sms-activate country id")
        if not isinstance(iso, str) or not _ISO.fullmatch(iso.strip().upper()):
            raise ConfigError(f"{where}: {iso!r} is not a two-letter country code")
        iso = iso.strip().upper()
        if iso not in DIAL_CODES and country not in COUNTRIES:
            raise ConfigError(f"{where}: no dial code known for {iso}")
        result[country] = iso
    return result


# ---- answer parsing ------------------------------------------------------------------


def _has(text: str, hints: Iterable[str]) -> bool:
    return any(hint in text for hint in hints)


def _texts(*values: Any) -> list[str]:
    """Every scalar text inside values (error may be a string or an object)."""
    found: list[str] = []
    for value in values:
        if isinstance(value, Mapping):
            found.extend(_texts(*value.values()))
        elif isinstance(value, list):
            found.extend(_texts(*value))
        elif as_text(value):
            found.append(as_text(value))
    return found


def _first(item: Mapping[str, Any], *keys: str) -> Any:
    """The value of the first key present (field names vary between sources)."""
    for key in keys:
        if key in item:
            return item[key]
    return None


def _id_text(value: Any) -> str:
    """An id or national number as digits text: 9876544321, "98765", 1.0 -> "1"."""
    number = as_int(value)
    return str(number) if number is not None else digits(value)


def _code_of(text: str) -> str:
    """The OTP in an SMS; the whole text when none is found (as smspva's own
    handler_api answers STATUS_OK with the full SMS)."""
    return extract_code(text) or text


def _timestamp(value: Any) -> float | None:
    """Unix seconds from a number, numeric string or ISO date (UTC when naive)."""
    number = as_decimal(value)
    if number is not None:
        return float(number)
    text = as_text(value)
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _count(value: Any) -> int | None:
    """A stock count: 12, "12", or {"MTS": 12, ...} summed."""
    if isinstance(value, Mapping):
        counts = [_count(v) for v in value.values()]
        return sum(c for c in counts if c is not None)
    return as_int(value)


def _records(data: Any, key: str) -> list[Mapping[str, Any]]:
    """The dicts of a list given bare or under ``data[key]``."""
    if isinstance(data, Mapping):
        data = data.get(key)
    if not isinstance(data, list):
        return []
    return [item for item in data if isinstance(item, Mapping)]


def _parse_prices(data: Any) -> dict[tuple[str, str], Decimal]:
    """``servicesprices`` as (ISO, optNN) -> price.

    Accepts a list of ``{"country", "service", "price"}`` (what clients read), the same
    list under ``services``/``prices``, or ``{ISO: {optNN: price | {"price": x}}}``.
    """
    prices: dict[tuple[str, str], Decimal] = {}
    items = data
    if isinstance(data, Mapping):
        items = _first(data, "services", "prices", "items")
    if isinstance(items, list):
        for item in items:
            if not isinstance(item, Mapping):
                continue
            iso = as_text(_first(item, "country", "countryCode")).upper()
            opt = as_text(item.get("service"))
            price = as_decimal(_first(item, "price", "cost"))
            if iso and opt and price is not None:
                prices[(iso, opt)] = price
        return prices
    if isinstance(data, Mapping):
        for iso, services in data.items():
            if not isinstance(services, Mapping):
                continue
            for opt, value in services.items():
                if isinstance(value, Mapping):
                    value = _first(value, "price", "cost")
                price = as_decimal(value)
                if price is not None:
                    prices[(str(iso).upper(), str(opt))] = price
    return prices


def _parse_counts(data: Any, iso: str) -> dict[str, int]:
    """``countnumbers/{ISO}`` as optNN -> count.

    Accepts ``{optNN: n}``, ``{optNN: {operator: n}}``, the same under the ISO key, or
    a list of ``{"service", "count"}``.
    """
    if isinstance(data, Mapping) and isinstance(data.get(iso), Mapping):
        data = data[iso]
    counts: dict[str, int] = {}
    if isinstance(data, list):
        for item in data:
            if isinstance(item, Mapping):
                opt = as_text(item.get("service"))
                count = _count(_first(item, "count", "total", "numbers"))
                if opt and count is not None:
                    counts[opt] = count
    elif isinstance(data, Mapping):
        for opt, value in data.items():
            count = _count(value)
            if _OPT.fullmatch(str(opt)) and count is not None:
                counts[str(opt)] = count
    return counts


def _segment(value: str) -> str:
    """A value made safe for one URL path segment."""
    return quote(value, safe="")
