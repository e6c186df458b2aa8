"""smspva: activation v2 (``api.smspva.com/activation``); rental is in smspva_rent.

Both APIs share one account and one USD balance: :class:`SmspvaAccount` holds what they
share (the balance always comes from activation v2, since rent.php has none), and
:class:`SmspvaProvider` sells through activation v2. ``providers.smspva_rent`` sells
through rent.php (config ``type: smspva_rent``, or ``type: smspva`` with ``api: rent``).

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
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any, ClassVar
from urllib.parse import quote

from providers.base import Provider, as_int, as_text, digits
from providers.http import UpstreamHttp
from providers.otp import extract_code
from providers.settings import (
    ProviderSettings,
    Reader,
    as_decimal,
    flag,
    number,
    option,
    required,
    url,
)
from providers.vocabulary import (
    ActivationRef,
    BatchPoll,
    Clock,
    ConfigError,
    NoBalance,
    NoNumbers,
    Offer,
    Order,
    PollResult,
    ProviderError,
    Purchase,
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
log = logging.getLogger(__name__)

# internal memos, not catalog TTLs (the catalog cache is the engine's, upstream.catalog_ttl)
PRICE_LIST_MEMO = 60.0  # servicesprices: one list for every country's catalog
SINGLE_MEMO = 300.0  # serviceprice/{country}/{service} answers (paced calls)
RENT_OFFERS_MEMO = 60.0  # rent getdata per (country, weeks) for rent_offers()
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
# activation ``orders`` row statuses read as "no SMS yet" (any other is fetched)
WAITING_STATUSES = frozenset({"waiting", "wait", "pending", "0"})


@dataclass(frozen=True)
class _Answer:
    """One decoded upstream answer: its status code, payload and error text."""

    code: int  # activation: statusCode (HTTP status if absent); rent: 1 or 0
    data: Any
    error: str  # lower-cased free text from error/msg, for hints only


def _api_option(served: str) -> Reader:
    """Reader of ``api``: one of APIS, and the one this settings class serves."""

    def read(name: str, options: Mapping[str, Any], key: str) -> str:
        api = options.get(key, served)
        if api not in APIS:
            raise ConfigError(
                f"providers.{name}.{key}: {api!r} is not one of {', '.join(APIS)}"
            )
        if api != served:  # the registry maps ``api`` to the class (provider_type)
            raise ConfigError(f"providers.{name}.{key}: {api!r} is not served here")
        return str(api)

    return read


@dataclass(frozen=True)
class SmspvaSettings(ProviderSettings):
    """The options of an smspva account (activation v2; SmspvaRentSettings: rent)."""

    api_key: str = option(required, secret=True)
    api: str = option(_api_option("activation"))
    activation_url: str = option(url("https://api.smspva.com"))
    base_url: str = option(url("https://smspva.com"))
    rent: tuple[str, int] = option(lambda n, o, k: _rent_period(n, o.get(k)))
    # deprecated, accepted for old configs and ignored (one warning line): the catalog
    # cache is the engine's, upstream.catalog_ttl
    catalog_ttl: float = option(number(60.0))
    services: dict[str, str] = option(lambda n, o, k: _service_overrides(n, o.get(k)))
    countries: dict[int, str] = option(lambda n, o, k: _country_overrides(n, o.get(k)))
    batch_poll: bool = option(flag(True))  # false: poll number by number


class SmspvaAccount(Provider):
    """What both smspva APIs share: the account, its tables, activation v2's balance.

    Not registered itself: ``smspva`` is :class:`SmspvaProvider` (activation v2) and
    ``smspva_rent`` (or ``smspva`` with ``api: rent``) is
    :class:`providers.smspva_rent.SmspvaRentProvider`.
    """

    type_name: ClassVar[str] = "smspva"
    currency: ClassVar[str] = "USD"
    settings_class: ClassVar[type[ProviderSettings]] = SmspvaSettings
    settings: SmspvaSettings
    min_interval: float = 4.5  # [doc] keep 4-5 s between queries
    default_poll_interval: ClassVar[float] = POLL_FLOOR
    can_lookup: ClassVar[bool] = True
    can_poll_many = True  # activation ``orders`` / rent.php ``orders``: one paced call

    api: ClassVar[str] = "activation"  # the option ``api`` this class serves
    excluded: ClassVar[frozenset[str]] = frozenset()  # ISO codes this API lacks

    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        http: UpstreamHttp,
        clock: Clock = time.time,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name, settings, http, clock, options=options)
        self.poll_interval = max(self.poll_interval, POLL_FLOOR)
        self.can_poll_many = self.settings.batch_poll
        given = self.settings
        self.api_key = given.api_key
        self.activation_url = given.activation_url
        self.base_url = given.base_url
        self.dtype, self.dcount = given.rent
        self.rent_days = RENT_DAYS[self.dtype] * self.dcount
        if options is not None and "catalog_ttl" in options:
            log.warning(
                "providers.%s.catalog_ttl is deprecated and ignored: the catalog is "
                "cached once, upstream.catalog_ttl",
                name,
            )
        self.services = {**SERVICES, **given.services}
        self.country_iso = {**COUNTRIES, **given.countries}

    # ---- facts ----------------------------------------------------------------------

    def countries(self) -> list[int]:
        """sms-activate ids in the country table this API sells (rental: no VN, LA)."""
        return sorted(
            country
            for country, iso in self.country_iso.items()
            if iso not in self.excluded
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

    async def finish(self, ref: ActivationRef) -> None:
        """Local only: nothing upstream needs closing once the code worked.

        Activation v2 charges per delivered SMS and delivers no further SMS to an
        order until clearsms, so stopsms would only add a paced call to an endpoint
        whose effect is undocumented; a rental runs on until ``until``.
        """

    # ---- activation v2 (the balance; the activation provider's purchases) -----------

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

    # ---- tables ---------------------------------------------------------------------

    def _iso(self, country: int) -> str | None:
        """The ISO code for an sms-activate id this provider serves, else None."""
        iso = self.country_iso.get(country)
        if iso is None or iso in self.excluded:
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


class SmspvaProvider(SmspvaAccount):
    """An smspva account selling through activation v2 (charged when the SMS arrives)."""

    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        http: UpstreamHttp,
        clock: Clock = time.time,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name, settings, http, clock, options=options)
        # activation v2: one price list for every country; counts per country
        self._prices: tuple[float, dict[tuple[str, str], Decimal]] | None = None
        self._counts: dict[str, tuple[float, dict[str, int]]] = {}
        self._single: dict[tuple[str, str], tuple[float, Offer | None]] = {}
        self._bulk_failed_at: float | None = None  # servicesprices/countnumbers failed

    async def buy(self, order: Order) -> Purchase:
        """One number; NoNumbers/NoBalance/UnknownService mean nothing was bought."""
        iso, opt = self._resolve(order.country, order.service)
        price = self._known_price(iso, opt)
        if order.max_price is not None and price and price > order.max_price:
            raise NoNumbers(self.name, f"price {price} above max_price")
        return await self._buy_activation(order, iso, opt, price)

    async def poll(self, ref: ActivationRef) -> PollResult:
        """Every SMS upstream holds for the order, and whether the order is over."""
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

    async def poll_many(self, refs: Sequence[ActivationRef]) -> BatchPoll:
        """``orders``: one paced call for every open order of the account.

        Its rows carry no SMS text and their shape is not in our sources, so a row
        only ever says "nothing new" when its status reads as waiting; any other
        status is fetched through ``sms/{id}``, and an order not listed is not
        covered (``sms/{id}`` is what says an order is over).
        """
        if not refs:
            return BatchPoll()
        answer = await self._activation("GET", "orders")
        if answer.code != OK:
            raise self._activation_failure(answer, buying=False)
        wanted = {ref.upstream_id for ref in refs}
        results: dict[str, PollResult] = {}
        fetch = set()
        for item in _records(answer.data, "orders"):
            order_id = _id_text(_first(item, "orderId", "id"))
            if order_id not in wanted:
                continue
            status = as_text(_first(item, "status", "state")).lower()
            if status in WAITING_STATUSES:
                results[order_id] = PollResult()
            else:
                fetch.add(order_id)
        return BatchPoll(results=results, fetch=frozenset(fetch - results.keys()))

    async def retry(self, ref: ActivationRef) -> Purchase | None:
        """Ask for the next SMS (activation: clearsms); never a new purchase."""
        answer = await self._activation("PUT", f"clearsms/{_segment(ref.upstream_id)}")
        if answer.code not in (OK, NO_SMS, NOT_FOUND, CLOSED):
            raise self._activation_failure(answer, buying=False)
        return None

    async def cancel(self, ref: ActivationRef) -> None:
        """Release the number (cancelorder); an order already gone is fine."""
        path = f"cancelorder/{_segment(ref.upstream_id)}"
        answer = await self._activation("PUT", path)
        if answer.code not in (OK, NOT_FOUND, CLOSED):
            raise self._activation_failure(answer, buying=False)

    async def quote(self, order: Order) -> Offer | None:
        """The price on sale now (``servicesprices`` fetched again).

        The count is the last catalogue's: a price limit needs only the price, and
        every extra call costs the pacing interval.
        """
        try:
            iso, opt = self._resolve(order.country, order.service)
        except UnknownService:
            return None
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
        """The documented ``serviceprice/{country}/{service}``, cached.

        Asked for a service the bulk ``servicesprices``/``countnumbers`` did not
        deliver, only while those failed lately (when they work, a service they do not
        list is not on sale): paced calls are not spent on it otherwise. The count
        comes from the answer, else from a cached countnumbers, else 0 (unknown).
        Answers are kept SINGLE_MEMO seconds.
        """
        if self._bulk_failed_at is None:
            return None
        try:
            iso, opt = self._resolve(country, service)
        except UnknownService:
            return None
        cached = self._single.get((iso, opt))
        if cached and self.clock() - cached[0] < SINGLE_MEMO:
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
        """(ISO, optNN) -> USD from ``servicesprices``, kept PRICE_LIST_MEMO seconds.

        One list serves every country: the engine's per-country catalog fills read it
        once instead of one paced call each; quote() drops it to ask again.
        """
        if self._prices and self.clock() - self._prices[0] < PRICE_LIST_MEMO:
            return self._prices[1]
        answer = await self._activation("GET", "servicesprices")
        if answer.code != OK:
            raise self._activation_failure(answer, buying=False)
        prices = _parse_prices(answer.data)
        self._prices = (self.clock(), prices)
        self._bulk_failed_at = None
        return prices

    async def _activation_counts(self, iso: str) -> dict[str, int]:
        """optNN -> numbers in stock from ``countnumbers/{ISO}``, asked now.

        The answer is kept as the last known counts (quote, service_offer read it).
        """
        answer = await self._activation("GET", f"countnumbers/{iso}")
        if answer.code != OK:
            raise self._activation_failure(answer, buying=False)
        counts = _parse_counts(answer.data, iso)
        self._counts[iso] = (self.clock(), counts)
        return counts

    def _known_price(self, iso: str, opt: str) -> Decimal | None:
        """The cached price of one number, if a catalog call has seen it."""
        price = self._prices[1].get((iso, opt)) if self._prices else None
        single = self._single.get((iso, opt))
        if price is None and single and single[1] is not None:
            price = single[1].price
        return price


# ---- option parsing ------------------------------------------------------------------


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
