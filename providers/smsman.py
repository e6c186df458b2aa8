"""sms-man API v2 (``https://api.sms-man.com/control/<endpoint>``, ``token`` parameter).

Source of truth: ``seeds/sms-man-api.vi.txt``; ``backends.md`` section 2 adds the quirks
seen in client code. What this adapter relies on:

* every answer is JSON, parsed whatever the HTTP status; an error is ``success: false``
  with an ``error_code`` (``error_msg`` is free text: a string or an object, never read
  for decisions). A body that is not JSON means the outcome is unknown;
* ``applications`` carries the sms-activate service code in ``code``; ``countries`` uses
  sms-man's own ids, so they are found by title through ``providers/data/smsman.json``.
  Both lists come as a JSON list or as an object keyed by id, ids as strings or ints;
* ``get-sms`` answers ``error_code: wait_sms`` while waiting; any other code means the
  order is over upstream (what sms-man answers for a closed order is not documented);
* sms-man documents no order listing, so ``lookup_purchases`` keeps the base default
  (``can_lookup`` stays False): a purchase lost to an uncertain answer is reconciled by
  hand from the sms-man dashboard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from functools import lru_cache
from importlib import resources
from typing import Any, ClassVar, Generic, TypeVar

from providers.base import Provider, as_bool, as_int, as_text, digits
from providers.http import UpstreamHttp
from providers.otp import extract_code
from providers.settings import (
    ProviderSettings,
    as_decimal,
    number,
    option,
    required,
    url,
)
from providers.vocabulary import (
    ActivationRef,
    Clock,
    ConfigError,
    NoBalance,
    NoNumbers,
    Offer,
    Order,
    PollResult,
    Purchase,
    Sms,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.sms-man.com/control"
DEFAULT_CATALOG_TTL = 60.0  # the deprecated, ignored catalog_ttl option's default
ID_TABLES_TTL = 60.0  # seconds the applications and countries id tables are reused

WAIT_SMS = "wait_sms"
WRONG_TOKEN = "wrong_token"

# Fields that might carry the whole message next to ``sms_code``; the seed shows none,
# so they are read only if present.
_TEXT_FIELDS = ("sms_text", "text", "full_sms", "sms")

_NON_ALNUM = re.compile(r"[^0-9a-z]")


def _norm_title(title: str) -> str:
    """Country titles compare case-insensitively, ignoring spaces and punctuation."""
    return _NON_ALNUM.sub("", title.casefold())


T = TypeVar("T")
CountryEntry = tuple[str, ...] | int  # titles in order of preference, or a fixed id


@lru_cache(maxsize=1)
def country_table() -> dict[int, CountryEntry]:
    """The shipped sms-activate id -> sms-man titles (or fixed id) table."""
    raw = json.loads(
        resources.files("providers").joinpath("data/smsman.json").read_text("utf-8")
    )
    table: dict[int, CountryEntry] = {}
    for key, value in raw["countries"].items():
        if isinstance(value, int) and not isinstance(value, bool):
            table[int(key)] = value
        elif isinstance(value, str):
            table[int(key)] = (value,)
        else:
            table[int(key)] = tuple(str(title) for title in value)
    return table


@dataclass(frozen=True)
class _Cached(Generic[T]):
    """A decoded upstream list and the clock time it was fetched at."""

    fetched_at: float
    value: T


@dataclass(frozen=True)
class SmsmanSettings(ProviderSettings):
    """The options of an sms-man account."""

    token: str = option(required, secret=True)
    base_url: str = option(url(DEFAULT_BASE_URL))
    # deprecated, accepted for old configs and ignored (one warning line): the catalog
    # cache is the engine's, upstream.catalog_ttl
    catalog_ttl: float = option(number(DEFAULT_CATALOG_TTL))
    services: dict[str, str] = option(lambda n, o, k: _service_option(n, o))
    countries: dict[int, str] = option(lambda n, o, k: _country_option(n, o))


class SmsmanProvider(Provider):
    """sms-man: numbers by sms-man application and country id, prices in RUB."""

    type_name = "smsman"
    currency = "RUB"
    settings_class: ClassVar[type[ProviderSettings]] = SmsmanSettings
    settings: SmsmanSettings

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
        given = self.settings
        self.token = given.token
        self.base_url = given.base_url
        if options is not None and "catalog_ttl" in options:
            log.warning(
                "providers.%s.catalog_ttl is deprecated and ignored: the catalog is "
                "cached once, upstream.catalog_ttl",
                name,
            )
        self.service_ids = given.services
        self.country_ids = given.countries
        try:
            self.country_titles = country_table()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"providers.{name}: providers/data/smsman.json is unusable: {exc}"
            ) from exc
        self._applications: _Cached[dict[str, str]] | None = None  # {code: app id}
        self._countries: _Cached[dict[str, str]] | None = None  # {title: country id}
        # the last get-prices answer per country: the cost buy reports; never served
        # to catalog() or quote(), which always ask again (no provider catalog cache)
        self._last_prices: dict[str, _Cached[dict[str, tuple[Decimal, int]]]] = {}
        self._lists_lock = asyncio.Lock()

    # ---- operations --------------------------------------------------------------

    async def balance(self) -> Decimal:
        """The account balance in RUB; UpstreamAuth if sms-man rejects the token."""
        body = await self._get("get-balance")
        self._raise_for_error(body, "get-balance")
        amount = as_decimal(body.get("balance")) if isinstance(body, dict) else None
        if amount is None:
            raise UpstreamUncertain(self.name, "get-balance: no balance in the answer")
        return amount

    async def buy(self, order: Order) -> Purchase:
        """One ``get-number`` call, never retried; raises as Provider.buy says."""
        try:
            application_id = await self._application_id(order.service)
            country_id = await self._country_id(order.country)
        except UpstreamUncertain as exc:
            # only the free look-ups failed: get-number was never sent
            raise UpstreamUnreachable(
                self.name, f"catalogue look-up before buying failed: {exc.detail}"
            ) from exc
        if country_id is None:
            raise UnknownService(self.name, f"country {order.country} not served")
        params = {"country_id": country_id, "application_id": application_id}
        if order.max_price is not None:
            # the limit in our currency, rounded down so that it still holds (a
            # converted limit has many digits); currency is on the newer API page
            limit = order.max_price.quantize(Decimal("0.01"), rounding=ROUND_DOWN)
            params["maxPrice"] = str(limit)
            params["currency"] = self.currency
        body = await self._get("get-number", params)
        if not isinstance(body, dict):
            raise UpstreamUncertain(self.name, "get-number: answer is not an object")
        request_id = as_text(body.get("request_id"))
        if not request_id:
            self._raise_buy_refusal(body)
            raise UpstreamUncertain(self.name, "get-number: no request_id, no error")
        phone = digits(body.get("number"))
        if not phone:
            raise UpstreamUncertain(
                self.name, f"get-number: request {request_id} came without a number"
            )
        return Purchase(
            upstream_id=request_id,
            phone=phone,
            price=self._cached_price(country_id, application_id),
            extra={"country_id": country_id, "application_id": application_id},
        )

    async def poll(self, ref: ActivationRef) -> PollResult:
        """``get-sms``: the current code if any; closed on any error but wait_sms."""
        body = await self._get("get-sms", {"request_id": ref.upstream_id})
        if not isinstance(body, dict):
            raise UpstreamUncertain(self.name, "get-sms: answer is not an object")
        code = as_text(body.get("sms_code"))
        text = next(
            (as_text(body.get(key)) for key in _TEXT_FIELDS if as_text(body.get(key))),
            "",
        )
        if not code and text:
            code = extract_code(text) or ""
        if code:
            sms = Sms(uid=code, text=text or code, code=code, received_at=self.clock())
            return PollResult(messages=(sms,))
        error = _error_code(body)
        if error is None or error == WAIT_SMS:
            return PollResult()
        if error == WRONG_TOKEN:
            raise UpstreamAuth(self.name, "get-sms: wrong_token")
        log.info(
            "%s: get-sms %s answered %s: order over", self.name, ref.upstream_id, error
        )
        return PollResult(closed=True)

    async def ready(self, ref: ActivationRef) -> None:
        """``set-status ready``."""
        await self._set_status(ref, "ready")

    async def retry(self, ref: ActivationRef) -> Purchase | None:
        """``set-status ready``: the same order waits for a new code."""
        await self._set_status(ref, "ready")
        return None

    async def finish(self, ref: ActivationRef) -> None:
        """``set-status close``; an order already final upstream counts as done."""
        await self._set_status(ref, "close")

    async def cancel(self, ref: ActivationRef) -> None:
        """``set-status reject`` (refunded upstream if no SMS came); idempotent."""
        await self._set_status(ref, "reject")

    async def quote(self, order: Order) -> Offer | None:
        """The cost on sale now: ``get-prices`` of the order's country, fetched again.

        The refreshed list is also what ``buy`` then reports as the cost.
        """
        try:
            application_id = await self._application_id(order.service)
        except UnknownService:
            return None
        country_id = await self._country_id(order.country)
        if country_id is None:
            return None
        found = (await self._prices_for(country_id)).get(application_id)
        if found is None:
            return None
        return Offer(service=order.service, price=found[0], count=found[1])

    async def catalog(self, country: int) -> list[Offer]:
        """``get-prices`` for one country, ids turned into codes (the engine caches it)."""
        country_id = await self._country_id(country)
        if country_id is None:
            return []
        prices = await self._prices_for(country_id)
        codes: dict[str, str] = {}
        for table in (await self._upstream_apps(), self.service_ids):  # override last
            codes.update({app_id: code for code, app_id in table.items()})
        offers = [
            Offer(service=codes[app_id], price=price, count=count)
            for app_id, (price, count) in prices.items()
            if app_id in codes
        ]
        return sorted(offers, key=lambda offer: offer.service)

    def countries(self) -> list[int]:
        """Every sms-activate id in the shipped table or the ``countries`` option."""
        return sorted(set(self.country_titles) | set(self.country_ids))

    # ---- look-ups ----------------------------------------------------------------

    async def _application_id(self, code: str) -> str:
        """The sms-man application id for an sms-activate code, or UnknownService."""
        key = code.strip().lower()
        if key in self.service_ids:
            return self.service_ids[key]
        app_id = (await self._upstream_apps()).get(key)
        if app_id is None:
            raise UnknownService(self.name, f"service {code!r} not offered")
        return app_id

    async def _upstream_apps(self) -> dict[str, str]:
        """{sms-activate code: application id} from ``applications``, cached."""
        async with self._lists_lock:
            cached = self._applications
            if cached is None or not self._fresh(cached):
                body = await self._get("applications")
                self._raise_for_error(body, "applications")
                cached = _Cached(self.clock(), _parse_applications(body))
                self._applications = cached
            return cached.value

    async def _country_id(self, country: int) -> str | None:
        """The sms-man country id for an sms-activate id; None if not served."""
        if country in self.country_ids:
            return self.country_ids[country]
        entry = self.country_titles.get(country)
        if entry is None:
            return None
        if isinstance(entry, int):
            return str(entry)
        async with self._lists_lock:
            cached = self._countries
            if cached is None or not self._fresh(cached):
                body = await self._get("countries")
                self._raise_for_error(body, "countries")
                cached = _Cached(self.clock(), _parse_countries(body))
                self._countries = cached
        for title in entry:
            found = cached.value.get(_norm_title(title))
            if found is not None:
                return found
        return None

    async def _prices_for(self, country_id: str) -> dict[str, tuple[Decimal, int]]:
        """{application id: (cost, count)} for one sms-man country, asked now."""
        body = await self._get("get-prices", {"country_id": country_id})
        self._raise_for_error(body, "get-prices")
        prices = _parse_prices(body, country_id)
        self._last_prices[country_id] = _Cached(self.clock(), prices)
        return prices

    def _cached_price(self, country_id: str, application_id: str) -> Decimal:
        """The last known cost (even stale) of a number; Decimal(0) when never seen."""
        cached = self._last_prices.get(country_id)
        if cached is None or application_id not in cached.value:
            return Decimal(0)
        return cached.value[application_id][0]

    def _fresh(self, cached: _Cached[Any]) -> bool:
        """An id table fetched less than ID_TABLES_TTL ago."""
        return self.clock() - cached.fetched_at < ID_TABLES_TTL

    # ---- wire --------------------------------------------------------------------

    async def _get(self, endpoint: str, params: Mapping[str, str] | None = None) -> Any:
        """GET ``<base_url>/<endpoint>`` with the token; the decoded JSON body."""
        query = {"token": self.token, **(params or {})}
        _, body = await self._request_json(
            "GET", f"{self.base_url}/{endpoint}", params=query
        )
        return body

    def _raise_for_error(self, body: Any, endpoint: str) -> None:
        """Read-only calls: wrong_token -> UpstreamAuth, other errors -> Uncertain."""
        error = _error_code(body)
        if error is None:
            return
        if error == WRONG_TOKEN:
            raise UpstreamAuth(self.name, f"{endpoint}: wrong_token")
        raise UpstreamUncertain(self.name, f"{endpoint}: {error}")

    def _raise_buy_refusal(self, body: Mapping[str, Any]) -> None:
        """Turn a get-number error envelope into a definite refusal; no-op otherwise."""
        error = _error_code(body)
        if error is None:
            return
        detail = f"get-number: {error} {_message(body)}".rstrip()
        if error == WRONG_TOKEN or "token" in error:
            raise UpstreamAuth(self.name, detail)
        if "balance" in error or "fund" in error or "money" in error:
            raise NoBalance(self.name, detail)
        if "application" in error or "service" in error or "country" in error:
            raise UnknownService(self.name, detail)
        # "no_numbers" and every undocumented code: an error envelope buys nothing
        raise NoNumbers(self.name, detail)

    async def _set_status(self, ref: ActivationRef, status: str) -> None:
        """``set-status``; an error for a known order means it is already final."""
        body = await self._get(
            "set-status", {"request_id": ref.upstream_id, "status": status}
        )
        if not isinstance(body, dict):
            raise UpstreamUncertain(self.name, "set-status: answer is not an object")
        error = _error_code(body)
        if error == WRONG_TOKEN:
            raise UpstreamAuth(self.name, "set-status: wrong_token")
        if error is not None:
            # Not documented: a rejected/closed/expired order answers some error code.
            # Retrying could never succeed, so the local transition stands.
            log.info(
                "%s: set-status %s %s answered %s (%s); taken as already final",
                self.name,
                ref.upstream_id,
                status,
                error,
                _message(body),
            )
            return
        if as_bool(body.get("success")) or as_text(body.get("request_id")):
            return
        raise UpstreamUncertain(self.name, "set-status: neither success nor error")


# ---- answer parsing: lists or objects by id, numbers as strings or ints ---


def _error_code(body: Any) -> str | None:
    """The lower-cased ``error_code`` of an error envelope, "unknown" if it has none."""
    if not isinstance(body, dict):
        return None
    code = as_text(body.get("error_code")).lower()
    if code:
        return code
    if "success" in body and not as_bool(body.get("success")):
        return "unknown"
    return None


def _message(body: Mapping[str, Any]) -> str:
    """``error_msg`` as one line of text, whether a string or an object."""
    message = body.get("error_msg")
    if isinstance(message, dict):
        return "; ".join(f"{key}: {as_text(value)}" for key, value in message.items())
    return as_text(message)


def _entries(body: Any) -> list[tuple[str, Any]]:
    """(key, item) pairs of a JSON list (key "") or of an object keyed by id."""
    if isinstance(body, list):
        return [("", item) for item in body]
    if isinstance(body, dict):
        return [(str(key), item) for key, item in body.items()]
    return []


def _parse_applications(body: Any) -> dict[str, str]:
    """{sms-activate code: application id} from the ``applications`` answer."""
    result: dict[str, str] = {}
    for key, item in _entries(body):
        if not isinstance(item, dict):
            continue
        code = as_text(item.get("code")).lower()
        app_id = as_text(item.get("id")) or key
        if code and app_id and as_int(app_id) is not None:
            result.setdefault(code, str(as_int(app_id)))
    return result


def _parse_countries(body: Any) -> dict[str, str]:
    """{normalised title: country id} from the ``countries`` answer."""
    result: dict[str, str] = {}
    for key, item in _entries(body):
        if isinstance(item, dict):
            title = as_text(item.get("title") or item.get("name"))
            country_id = as_text(item.get("id")) or key
        else:
            title, country_id = as_text(item), key
        if title and as_int(country_id) is not None:
            result.setdefault(_norm_title(title), str(as_int(country_id)))
    return result


def _parse_prices(body: Any, country_id: str) -> dict[str, tuple[Decimal, int]]:
    """{application id: (cost, count)} for one country from any ``get-prices`` shape.

    Shapes: ``{country: {app: {cost, count}}}`` (the seed), ``{app: {cost, count}}``,
    and lists or objects of ``{application_id, country_id, cost, count}`` rows.
    """
    entries = _entries(body)
    if isinstance(body, dict) and not any(_is_offer(item) for _, item in entries):
        entries = _entries(body.get(country_id))
    result: dict[str, tuple[Decimal, int]] = {}
    for key, item in entries:
        if not _is_offer(item):
            continue
        row_country = as_int(item.get("country_id"))
        if row_country is not None and str(row_country) != country_id:
            continue
        app_id = as_int(item.get("application_id", key))
        price = as_decimal(item.get("cost", item.get("price")))
        if app_id is None or price is None:
            continue
        count = as_int(item.get("count", item.get("numbers")), 0) or 0
        result[str(app_id)] = (price, max(count, 0))
    return result


def _is_offer(item: Any) -> bool:
    return isinstance(item, dict) and ("cost" in item or "price" in item)


# ---- options ---------------------------------------------------------------------


def _service_option(name: str, options: Mapping[str, Any]) -> dict[str, str]:
    """``services``: {sms-activate code: sms-man application id}, or ConfigError."""
    raw = options.get("services") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"providers.{name}.services: expected a mapping code -> id")
    result: dict[str, str] = {}
    for code, app_id in raw.items():
        number = as_int(app_id)
        if not isinstance(code, str) or not code.strip() or number is None:
            raise ConfigError(
                f"providers.{name}.services.{code}: expected an application id, "
                f"got {app_id!r}"
            )
        result[code.strip().lower()] = str(number)
    return result


def _country_option(name: str, options: Mapping[str, Any]) -> dict[int, str]:
    """``countries``: {sms-activate id: sms-man country id}, or ConfigError."""
    raw = options.get("countries") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"providers.{name}.countries: expected a mapping id -> id")
    result: dict[int, str] = {}
    for country, country_id in raw.items():
        key, number = as_int(country), as_int(country_id)
        if key is None or number is None:
            raise ConfigError(
                f"providers.{name}.countries.{country}: expected sms-activate id -> "
                f"sms-man country id, got {country_id!r}"
            )
        result[key] = str(number)
    return result
