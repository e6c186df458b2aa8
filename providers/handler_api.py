"""Any sms-activate clone (``.../stubs/handler_api[.php]``, ``api_key`` parameter).

The clones speak the dialect sms-compat itself serves (``protocol.md``), each with its own
deviations (section 5 there, and the sms3t / sms-service-online seeds). What this adapter
relies on, and what it tolerates:

* one endpoint, ``action`` selects the call; GET with the query string or POST with a
  form body (``method``); ``lang`` goes on every call when set (sms-service-online answers
  ``BAD_LANG`` without it);
* answers are read as text whatever the content type and the HTTP status: surrounding
  whitespace and a BOM are dropped, a JSON-quoted token is unquoted, tokens compare
  case-insensitively and may carry a detail after ``:`` (``BANNED:<date>``,
  ``WRONG_MAX_PRICE:<min>``). Hero-style ``{"title": TOKEN}`` and classic
  ``{"status": "error", "error": TOKEN}`` envelopes count as tokens too. An HTTP 5xx, or
  a body that is no dialect answer, leaves the outcome unknown;
* ``getNumber`` (or ``getNumberV2`` with ``number_v2``) is sent once: a known refusal
  token is a definite "no" (``NO_MEANS`` = NO_BALANCE, ``NO_NUMBER`` = NO_NUMBERS,
  ``WRONG_MAX_PRICE`` = NoNumbers), anything else is UpstreamUncertain. ``BAD_ACTION`` to
  getNumberV2 (nothing bought) switches the provider to getNumber for good;
* ``getStatus`` (or ``getStatusV2`` with ``status_v2``): ``STATUS_OK`` carries a code or,
  on some clones, the whole SMS text, from which the code is taken with
  :func:`providers.otp.extract_code`;
* prices come from ``getPrices``; a clone without it (sms-service-online) is asked
  ``getServicesAndCost``; counts missing from the price rows come from
  ``getNumbersStatus``;
* ``getActiveActivations`` finds a purchase whose answer was lost (``can_lookup``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import re
import time
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any, ClassVar, NoReturn

from providers.base import Provider, as_bool, as_int, as_text, digits
from providers.http import UpstreamHttp
from providers.otp import extract_code
from providers.settings import (
    ProviderSettings,
    as_decimal,
    flag,
    number,
    option,
    require_option,
    required,
    url_option,
)
from providers.vocabulary import (
    ActivationRef,
    BatchPoll,
    Clock,
    ConfigError,
    NoBalance,
    NoNumbers,
    NotNow,
    Offer,
    Order,
    PollResult,
    Purchase,
    Refused,
    Sms,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

log = logging.getLogger(__name__)

# sms-activate's id space (protocol.md 6.1), which the clones reuse
DEFAULT_COUNTRIES = tuple(range(200))
# Without a ``countries`` option one getPrices call fetches every country; the answer is
# shared this long, so a getPrices of ours without a country makes one call, not 200.
DEFAULT_TABLE_TTL = 10.0

PriceRows = dict[str, tuple[Decimal, int | None]]  # their service -> (price, count)

# tokens meaning "your account or our configuration", never the client's fault
AUTH_TOKENS = frozenset(
    {"BAD_KEY", "NO_KEY", "API_KEY_NOT_VALID", "BANNED", "ACCOUNT_INACTIVE", "BAD_LANG"}
)
# getNumber refusals: nothing was bought
NO_BALANCE_TOKENS = frozenset({"NO_BALANCE", "NO_MEANS", "NO_BALANCE_FORWARD"})
UNKNOWN_SERVICE_TOKENS = frozenset(
    {
        "BAD_SERVICE",
        "WRONG_SERVICE",
        "BAD_COUNTRY",
        "SERVICE_UNAVAILABLE_REGION",
        "NOT_AVAILABLE",
    }
)
NO_NUMBERS_TOKENS = frozenset(
    {
        "NO_NUMBERS",
        "NO_NUMBER",
        "WRONG_MAX_PRICE",
        "CHANNELS_LIMIT",
        "WRONG_EXCEPTION_PHONE",
        "NO_YULA_MAIL",
        "WHATSAPP_NOT_AVAILABLE",
        "BAD_ACTION",
        "RATE_LIMIT",
        "UNPROCESSABLE_ENTITY",
    }
)
WAITING_TOKENS = frozenset(
    {"STATUS_WAIT_CODE", "STATUS_WAIT_RETRY", "STATUS_WAIT_RESEND"}
)
# getStatus answers meaning the order is over upstream (ACCESS_CANCEL: Tiger's quirk)
CLOSED_TOKENS = frozenset(
    {"STATUS_CANCEL", "ACCESS_CANCEL", "NO_ACTIVATION", "STATUS_FINISH"}
)
SET_STATUS_OK = frozenset(
    {"ACCESS_READY", "ACCESS_RETRY_GET", "ACCESS_ACTIVATION", "ACCESS_CANCEL"}
)

# ISO 4217 numeric codes clones put in getNumberV2's ``currency``
ISO_NUMERIC = {"643": "RUB", "840": "USD", "978": "EUR", "156": "CNY", "704": "VND"}

_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_CODE_LIKE = re.compile(r"[0-9A-Za-z-]{1,16}")
ACTIVE_PAGE = 100  # getActiveActivations rows per page (Hero/Tiger: limit <= 100)
_MAX_PRICE_STEP = Decimal("0.0001")


@dataclass(frozen=True)
class Answer:
    """One upstream answer: HTTP status, the text, and the JSON value if it is JSON."""

    status: int
    text: str
    data: Any = None  # decoded JSON object or array, else None

    @property
    def token(self) -> str:
        """The upper-case token of a text answer or of an error envelope; "" if none."""
        if isinstance(self.data, dict):
            for key in ("title", "error", "message", "msg"):
                value = self.data.get(key)
                if isinstance(value, str) and _TOKEN.fullmatch(value.strip()):
                    if key == "title" or as_text(self.data.get("status")) in (
                        "error",
                        "false",
                        "0",
                    ):
                        return value.strip().upper()
            return ""
        if self.data is not None:
            return ""
        head = self.text.partition(":")[0].strip()
        return head.upper() if _TOKEN.fullmatch(head) else ""

    @property
    def detail(self) -> str:
        """What follows the token's first ``:`` (case kept)."""
        return self.text.partition(":")[2].strip() if self.data is None else ""

    def describe(self) -> str:
        """A short, secret-free account of the answer for logs and errors."""
        shown = self.token or (self.text[:40] + ("..." if len(self.text) > 40 else ""))
        return f"HTTP {self.status} {shown!r}"


@dataclass(frozen=True)
class HandlerApiSettings(ProviderSettings):
    """The options of an sms-activate clone (its handler_api endpoint)."""

    base_url: str = option(lambda n, o, k: _base_url_option(n, o, k))
    api_key: str = option(required, secret=True)
    lang: str | None = option(lambda n, o, k: _optional_text(n, o, k))
    currency: str = option(lambda n, o, k: _currency_option(n, o, k))
    method: str = option(lambda n, o, k: _method_option(n, o, k))
    number_v2: bool = option(lambda n, o, k: as_bool(o.get(k, False)))
    status_v2: bool = option(lambda n, o, k: as_bool(o.get(k, False)))
    services: dict[str, str] = option(lambda n, o, k: _code_map(n, o, k))
    operators: dict[str, str] = option(lambda n, o, k: _code_map(n, o, k))
    countries: dict[int, str] = option(lambda n, o, k: _country_option(n, o))
    timezone: dt.tzinfo | None = option(lambda n, o, k: _timezone_option(n, o))
    table_ttl: float = option(number(DEFAULT_TABLE_TTL))
    batch_poll: bool = option(flag(True))  # false: poll number by number


class HandlerApiProvider(Provider):
    """An sms-activate clone reached through its handler_api endpoint."""

    type_name = "handler_api"
    currency = "RUB"
    settings_class: ClassVar[type[ProviderSettings]] = HandlerApiSettings
    settings: HandlerApiSettings
    can_lookup = True
    can_poll_many = True  # getActiveActivations, until the clone answers BAD_ACTION

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
        self.base_url = given.base_url
        self.api_key = given.api_key
        self.lang = given.lang
        self.native = given.currency
        self.method = given.method
        self.number_v2 = given.number_v2
        self.status_v2 = given.status_v2
        self.services = given.services
        self.operator_map = given.operators
        self.country_map = given.countries
        self.timezone = given.timezone
        self._service_of = {theirs: ours for ours, theirs in self.services.items()}
        self.table_ttl = given.table_ttl
        self.can_poll_many = given.batch_poll
        self._has_get_prices = True
        self._whole_table = not self.country_map  # False once the clone shows it can't
        self._table: tuple[float, dict[str, PriceRows]] | None = None
        self._table_lock = asyncio.Lock()
        self._prices: dict[tuple[int, str], Decimal] = {}  # last seen, even stale
        self._lookup_warned: set[tuple[str, int, float]] = set()

    @classmethod
    def native_currency(cls, options: Mapping[str, Any]) -> str:
        """The clone's balance currency (``currency`` option, RUB by default)."""
        return str(options.get("currency") or cls.currency).strip().upper()

    # ---- operations --------------------------------------------------------------

    async def balance(self) -> Decimal:
        """``ACCESS_BALANCE:x``, a bare amount (sms-service-online) or ``{"balance"}``."""
        answer = await self._call("getBalance")
        amount: Decimal | None = None
        if answer.token == "ACCESS_BALANCE":
            amount = as_decimal(answer.detail)
        elif isinstance(answer.data, dict):
            amount = as_decimal(answer.data.get("balance"))
        elif answer.data is None and not answer.token:
            amount = as_decimal(answer.text)
        if amount is None:
            self._raise_unexpected("getBalance", answer)
        return amount

    async def buy(self, order: Order) -> Purchase:
        """One getNumber(V2) call, never repeated after an unclear answer."""
        country = self._their_country(order.country)
        if country is None:
            raise UnknownService(self.name, f"country {order.country} not served")
        service = self.services.get(order.service, order.service)
        params = {"service": service, "country": country}
        operators = [self.operator_map.get(o, o) for o in order.operators]
        if operators:
            params["operator"] = ",".join(operators)
        if order.max_price is not None:
            ceiling = order.max_price.quantize(_MAX_PRICE_STEP, rounding=ROUND_DOWN)
            params["maxPrice"] = format(ceiling.normalize(), "f")
        if order.exclude_prefixes:
            params["phoneException"] = ",".join(order.exclude_prefixes)
        if self.number_v2:
            answer = await self._call("getNumberV2", params)
            if answer.token != "BAD_ACTION":
                return self._purchase_v2(order, answer)
            log.info("%s: no getNumberV2 (BAD_ACTION): using getNumber", self.name)
            self.number_v2 = False  # nothing was bought: the v1 call is the one buy
        await self._learn_price(order)
        answer = await self._call("getNumber", params)
        if isinstance(answer.data, dict) and "activationId" in answer.data:
            return self._purchase_v2(order, answer)  # a clone answering V2's JSON
        if answer.token != "ACCESS_NUMBER":
            self._raise_refusal("getNumber", answer)
        return self._purchase_v1(order, answer)

    async def poll(self, ref: ActivationRef) -> PollResult:
        """The code the clone holds for the order, or that it is over."""
        if self.status_v2:
            answer = await self._call("getStatusV2", {"id": ref.upstream_id})
            if answer.token != "BAD_ACTION":
                return self._status_v2(ref, answer)
            log.info("%s: no getStatusV2 (BAD_ACTION): using getStatus", self.name)
            self.status_v2 = False
        answer = await self._call("getStatus", {"id": ref.upstream_id})
        return self._status_v1(ref, answer)

    async def poll_many(self, refs: Sequence[ActivationRef]) -> BatchPoll:
        """``getActiveActivations``, page by page (Hero-style ``start``/``limit``).

        A listed order's ``smsCode`` (array, string or null) and ``smsText`` are its
        messages; an order the list leaves out (finished, cancelled, past the pages)
        is not covered. A clone answering BAD_ACTION is not asked again.
        """
        if not refs:
            return BatchPoll()
        wanted = {ref.upstream_id for ref in refs}
        rows: dict[str, dict[str, Any]] = {}
        for page in range(math.ceil(len(refs) / ACTIVE_PAGE) + 1):
            answer = await self._call(
                "getActiveActivations",
                {"start": str(page * ACTIVE_PAGE), "limit": str(ACTIVE_PAGE)},
            )
            if answer.token == "BAD_ACTION":
                log.info(
                    "%s: no getActiveActivations (BAD_ACTION): polling one by one",
                    self.name,
                )
                self.can_poll_many = False
                return BatchPoll()
            if answer.token == "NO_ACTIVATIONS":
                break
            found = _activation_rows(answer.data)
            if found is None:
                self._raise_unexpected("getActiveActivations", answer)
            fresh = 0
            for row in found:
                upstream_id = as_text(row.get("activationId") or row.get("id"))
                if upstream_id and upstream_id not in rows:
                    rows[upstream_id] = row
                    fresh += 1
            # a page short of the limit is the last; a clone that ignores ``start``
            # repeats its rows
            if len(found) < ACTIVE_PAGE or not fresh or wanted <= rows.keys():
                break
        results = {}
        for upstream_id in wanted & rows.keys():
            row = rows[upstream_id]
            codes = row.get("smsCode")
            listed = codes if isinstance(codes, list) else [codes]
            texts = [as_text(c) for c in listed if as_text(c)]
            text = as_text(row.get("smsText"))
            messages: list[Sms] = []
            for index, code in enumerate(texts):
                last = index == len(texts) - 1
                messages.extend(self._message(code, text if last else "").messages)
            results[upstream_id] = PollResult(messages=tuple(messages))
        return BatchPoll(results=results)

    async def ready(self, ref: ActivationRef) -> None:
        """setStatus 1."""
        await self._set_status(ref, "1")

    async def retry(self, ref: ActivationRef) -> Purchase | None:
        """setStatus 3: the same order waits for another SMS."""
        await self._set_status(ref, "3")
        return None

    async def finish(self, ref: ActivationRef) -> None:
        """setStatus 6."""
        await self._set_status(ref, "6")

    async def cancel(self, ref: ActivationRef) -> None:
        """setStatus 8; EARLY_CANCEL_DENIED leaves it to be sent again later."""
        await self._set_status(ref, "8")

    async def quote(self, order: Order) -> Offer | None:
        """The price on sale now: the shared price table is read again, not reused."""
        self._table = None
        return await super().quote(order)

    async def catalog(self, country: int) -> list[Offer]:
        """Services on sale in a country, the clone's codes turned into ours."""
        theirs = self._their_country(country)
        if theirs is None:
            return []
        rows = await self._price_rows(theirs)
        if any(count is None for _, count in rows.values()):
            counts = await self._stock_counts(theirs)
            rows = {
                code: (price, counts.get(code, 0) if count is None else count)
                for code, (price, count) in rows.items()
            }
        offers = []
        for code, (price, count) in rows.items():
            ours = self._service_of.get(code, code)
            self._prices[(country, ours)] = price
            offers.append(Offer(service=ours, price=price, count=max(count or 0, 0)))
        return sorted(offers, key=lambda offer: offer.service)

    def countries(self) -> list[int]:
        """The ``countries`` option's ids; else those in the clone's last price table,
        or every sms-activate id 0-199 before one was read."""
        if self.country_map:
            return sorted(self.country_map)
        if self._table is not None and self._table[1]:
            return sorted(
                int(c) for c in self._table[1] if c.isdigit() and int(c) < 10_000
            )
        return list(DEFAULT_COUNTRIES)

    async def lookup_purchases(self, order: Order, since: float) -> list[Purchase]:
        """Active activations of this service and country, from getActiveActivations.

        Rows are kept unless they show another service or country, or (with the
        ``timezone`` option) an activationTime before ``since``: without knowing the
        clone's clock, leaving a row out could leave a bought number uncancelled.
        """
        answer = await self._call("getActiveActivations")
        if answer.token == "NO_ACTIVATIONS":
            return []
        if answer.token == "BAD_ACTION":
            lost = (order.service, order.country, since)
            if lost not in self._lookup_warned:  # once per lost purchase, not per round
                self._lookup_warned.add(lost)
                log.error(
                    "%s: the clone has no getActiveActivations: a %s/%d purchase whose"
                    " answer was lost cannot be found, check the account by hand",
                    self.name,
                    order.service,
                    order.country,
                )
            return []
        rows = _activation_rows(answer.data)
        if rows is None:
            self._raise_unexpected("getActiveActivations", answer)
        service = self.services.get(order.service, order.service)
        country = self._their_country(order.country)
        found = []
        for row in rows:
            upstream_id = as_text(row.get("activationId") or row.get("id"))
            if not upstream_id:
                continue
            row_service = as_text(row.get("serviceCode") or row.get("service"))
            if row_service and row_service.lower() != service.lower():
                continue
            row_country = as_text(row.get("countryCode") or row.get("country"))
            if row_country and country is not None and row_country != country:
                continue
            created, skew = self._instant(row.get("activationTime"))
            if created is not None and created + skew < since:
                continue
            price = as_decimal(row.get("activationCost"))
            found.append(
                Purchase(
                    upstream_id=upstream_id,
                    phone=digits(row.get("phoneNumber") or row.get("phone")),
                    price=price if price is not None else self._price(order),
                    created_at=created,
                    created_skew=skew,
                )
            )
        return found

    # ---- answers -------------------------------------------------------------------

    def _purchase_v1(self, order: Order, answer: Answer) -> Purchase:
        """``ACCESS_NUMBER:<id>:<phone>``; anything short of both is Uncertain."""
        upstream_id, _, rest = answer.detail.partition(":")
        phone = digits(rest)
        if not upstream_id.strip() or not phone:
            raise UpstreamUncertain(
                self.name, f"getNumber: incomplete answer {answer.describe()}"
            )
        return Purchase(
            upstream_id=upstream_id.strip(), phone=phone, price=self._price(order)
        )

    def _purchase_v2(self, order: Order, answer: Answer) -> Purchase:
        """The getNumberV2 JSON (a v1 token is accepted too)."""
        if answer.token == "ACCESS_NUMBER":
            return self._purchase_v1(order, answer)
        data = answer.data
        if not isinstance(data, dict) or "activationId" not in data:
            self._raise_refusal("getNumberV2", answer)
        upstream_id = as_text(data.get("activationId"))
        phone = digits(data.get("phoneNumber"))
        if not upstream_id or not phone:
            raise UpstreamUncertain(
                self.name, f"getNumberV2: activation {upstream_id!r} without a number"
            )
        cost = as_decimal(data.get("activationCost"))
        currency = as_text(data.get("currency"))
        if currency and ISO_NUMERIC.get(currency, currency.upper()) != self.native:
            log.warning(
                "%s: getNumberV2 priced in currency %s, but providers.%s.currency is"
                " %s: check the config",
                self.name,
                currency,
                self.name,
                self.native,
            )
        operator = as_text(data.get("activationOperator")).lower() or "any"
        return Purchase(
            upstream_id=upstream_id,
            phone=phone,
            price=cost if cost is not None else self._price(order),
            operator=operator,
        )

    def _status_v1(self, ref: ActivationRef, answer: Answer) -> PollResult:
        token = answer.token
        if token == "STATUS_OK":
            return self._message(answer.detail, "")
        if token in WAITING_TOKENS:
            return PollResult()
        if token in CLOSED_TOKENS:
            return PollResult(closed=True)
        self._raise_unexpected("getStatus", answer)

    def _status_v2(self, ref: ActivationRef, answer: Answer) -> PollResult:
        data = answer.data
        if not isinstance(data, dict) or answer.token:
            return self._status_v1(ref, answer)  # plain STATUS_CANCEL and friends
        for key in ("sms", "call"):
            item = data.get(key)
            if isinstance(item, list):
                item = item[-1] if item else None
            if isinstance(item, dict):
                result = self._message(
                    as_text(item.get("code")), as_text(item.get("text"))
                )
                if result.messages:
                    return result
        return PollResult()

    def _message(self, code: str, text: str) -> PollResult:
        """One message from a code, or from a whole SMS text sent in its place."""
        if code and not _CODE_LIKE.fullmatch(code):
            text, code = text or code, ""
        if not code and text:
            code = extract_code(text) or ""
        if not code:
            log.info(
                "%s: an SMS without a code: %d chars, ignored", self.name, len(text)
            )
            return PollResult()
        sms = Sms(uid=code, text=text or code, code=code, received_at=self.clock())
        return PollResult(messages=(sms,))

    async def _set_status(self, ref: ActivationRef, status: str) -> None:
        """setStatus; a refusal for a known order means it is already final upstream."""
        answer = await self._call(
            "setStatus", {"id": ref.upstream_id, "status": status}
        )
        token = answer.token
        if token in SET_STATUS_OK:
            return
        if token == "EARLY_CANCEL_DENIED":
            # the clone refuses cancels in its first minutes: the outbox sends it again
            raise NotNow(self.name, "setStatus: EARLY_CANCEL_DENIED")
        if token in AUTH_TOKENS:
            raise UpstreamAuth(self.name, f"setStatus: {token}")
        if token and token not in ("ERROR_SQL", "SQL_ERROR", "SERVER_ERROR", "ERROR"):
            # BAD_STATUS, NO_ACTIVATION, ...: sending it again could never succeed
            if status == "8":  # the caller must know: the SMS may have come meanwhile
                raise Refused(self.name, f"setStatus 8: {token}")
            log.info(
                "%s: setStatus %s for %s answered %s: taken as final",
                self.name,
                status,
                ref.upstream_id,
                token,
            )
            return
        raise UpstreamUncertain(self.name, f"setStatus: {answer.describe()}")

    def _raise_refusal(self, action: str, answer: Answer) -> NoReturn:
        """A definite refusal for a known token; UpstreamUncertain for anything else."""
        token = answer.token
        detail = f"{action}: {token}"
        if answer.status >= 500 or not token:
            raise UpstreamUncertain(self.name, f"{action}: {answer.describe()}")
        if token in AUTH_TOKENS:
            raise UpstreamAuth(self.name, detail)
        if token in NO_BALANCE_TOKENS:
            raise NoBalance(self.name, detail)
        if token in UNKNOWN_SERVICE_TOKENS or (
            token == "UNPROCESSABLE_ENTITY" and "service" in answer.text.lower()
        ):
            raise UnknownService(self.name, detail)
        if token in NO_NUMBERS_TOKENS:
            raise NoNumbers(self.name, f"{detail} {answer.detail}".rstrip())
        # ERROR_SQL, SERVER_ERROR, tokens never seen: the purchase may have happened
        raise UpstreamUncertain(self.name, f"{action}: {answer.describe()}")

    def _raise_unexpected(self, action: str, answer: Answer) -> NoReturn:
        """Read-only calls: auth tokens -> UpstreamAuth, the rest -> Uncertain."""
        if answer.token in AUTH_TOKENS:
            raise UpstreamAuth(self.name, f"{action}: {answer.token}")
        raise UpstreamUncertain(self.name, f"{action}: {answer.describe()}")

    # ---- catalogue -----------------------------------------------------------------

    async def _price_rows(self, country: str) -> PriceRows:
        """{their service: (price, count or None)} from getPrices or getServicesAndCost."""
        if self._has_get_prices and self._whole_table:
            table = await self._price_table()
            if table is not None:
                return table.get(country, {})
        if self._has_get_prices:
            answer = await self._call("getPrices", {"country": country})
            if answer.token != "BAD_ACTION":
                if answer.token or not isinstance(answer.data, (dict, list)):
                    self._raise_unexpected("getPrices", answer)
                return _parse_prices(answer.data, country)
            log.info(
                "%s: no getPrices (BAD_ACTION): using getServicesAndCost", self.name
            )
            self._has_get_prices = False
        answer = await self._call(
            "getServicesAndCost", {"country": country, "operator": "any"}
        )
        if answer.token or not isinstance(answer.data, (dict, list)):
            self._raise_unexpected("getServicesAndCost", answer)
        return _parse_prices(answer.data, country)

    async def _price_table(self) -> dict[str, PriceRows] | None:
        """Every country's rows from one getPrices call, shared for ``table_ttl``.

        None when the clone cannot give it (no getPrices, or rows without countries).
        """
        async with self._table_lock:
            if (
                self._table is not None
                and self.clock() - self._table[0] < self.table_ttl
            ):
                return self._table[1]
            answer = await self._call("getPrices")
            if answer.token == "BAD_ACTION":
                log.info(
                    "%s: no getPrices (BAD_ACTION): using getServicesAndCost", self.name
                )
                self._has_get_prices = False
                return None
            if answer.token or not isinstance(answer.data, (dict, list)):
                self._raise_unexpected("getPrices", answer)
            body = answer.data
            if (
                not isinstance(body, dict)
                or not body
                or any(_is_row(v) for v in body.values())
            ):
                log.info(
                    "%s: getPrices has no country level: asking per country", self.name
                )
                self._whole_table = False
                return None
            table = {
                str(country): _parse_prices({str(country): rows}, str(country))
                for country, rows in body.items()
                if isinstance(rows, dict)
            }
            self._table = (self.clock(), table)
            return table

    async def _stock_counts(self, country: str) -> dict[str, int]:
        """{their service: count} from getNumbersStatus; {} when it is unavailable."""
        answer = await self._call("getNumbersStatus", {"country": country})
        if not isinstance(answer.data, dict) or answer.token:
            if answer.token in AUTH_TOKENS:
                raise UpstreamAuth(self.name, f"getNumbersStatus: {answer.token}")
            return {}
        counts: dict[str, int] = {}
        for key, value in answer.data.items():
            code, _, forward = str(key).partition("_")
            count = as_int(value)
            if forward in ("", "0") and code and count is not None:
                counts[code.lower()] = count
        return counts

    async def _learn_price(self, order: Order) -> None:
        """getNumber tells no price: read the catalogue first if it was never seen."""
        if (order.country, order.service) in self._prices:
            return
        try:
            await self.catalog(order.country)
        except (UpstreamUncertain, UpstreamUnreachable) as exc:
            # only the free look-up failed: nothing paid was sent, the route may go on
            raise UpstreamUnreachable(
                self.name, f"price look-up before buying failed: {exc.detail}"
            ) from exc

    def _price(self, order: Order) -> Decimal:
        """The last known price (even stale); Decimal(0) when never seen."""
        return self._prices.get((order.country, order.service), Decimal(0))

    def _their_country(self, country: int) -> str | None:
        if self.country_map:
            return self.country_map.get(country)
        return str(country)  # the clones share sms-activate's ids

    def _instant(self, value: Any) -> tuple[float | None, float]:
        """(epoch seconds, how far off they may be) of a clone's activationTime.

        With ``timezone`` the time is exact; without it, it is read as UTC and may be
        off by any real offset (UTC-12 .. UTC+14), so the reconciler's window holds
        whatever the clone's clock; (None, 0) when there is no readable time.
        """
        exact = self._parse_time(value)
        if exact is not None:
            return exact, 0.0
        try:
            naive = dt.datetime.fromisoformat(as_text(value))
        except ValueError:
            return None, 0.0
        if naive.tzinfo is not None:
            return naive.timestamp(), 0.0
        # the middle of the range, +-13 h around it
        utc = naive.replace(tzinfo=dt.timezone.utc).timestamp()
        return utc - 3600.0, 13 * 3600.0

    def _parse_time(self, value: Any) -> float | None:
        """A clone's ``YYYY-MM-DD HH:MM:SS`` in its ``timezone``; None if unknown."""
        if self.timezone is None:
            return None
        try:
            naive = dt.datetime.fromisoformat(as_text(value))
        except ValueError:
            return None
        if naive.tzinfo is None:
            naive = naive.replace(tzinfo=self.timezone)
        return naive.timestamp()

    # ---- wire ----------------------------------------------------------------------

    async def _call(
        self, action: str, params: Mapping[str, str] | None = None
    ) -> Answer:
        """One request to the endpoint; the answer decoded (never raises on its body)."""
        fields = {"api_key": self.api_key, "action": action, **(params or {})}
        if self.lang:
            fields["lang"] = self.lang
        await self._pace()
        if self.method == "POST":
            status, body = await self.http.request(
                self.name, "POST", self.base_url, data=fields
            )
        else:
            status, body = await self.http.request(
                self.name, "GET", self.base_url, params=fields
            )
        answer = decode(status, body)
        if answer.status >= 500:
            raise UpstreamUncertain(self.name, f"{action}: HTTP {answer.status}")
        if not answer.text:
            raise UpstreamUncertain(self.name, f"{action}: HTTP {answer.status}, empty")
        return answer


def decode(status: int, body: bytes) -> Answer:
    """The text of an answer (BOM, whitespace and JSON quotes dropped) and its JSON."""
    text = body.decode("utf-8", errors="replace").strip().lstrip("\ufeff").strip()
    data: Any = None
    if text[:1] in ("{", "[", '"'):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, str):
            text, data = data.strip(), None
        elif not isinstance(data, (dict, list)):
            data = None
    return Answer(status=status, text=text, data=data)


def _parse_prices(body: Any, country: str) -> PriceRows:
    """Price rows from ``{country: {svc: {cost, count}}}``, ``{svc: {...}}`` or a list.

    The list is sms-service-online's ``[{"id", "price", "quantity"}]``.
    """
    if isinstance(body, dict) and not any(_is_row(v) for v in body.values()):
        body = body.get(country, {})
    rows: list[tuple[str, Any]] = []
    if isinstance(body, dict):
        rows = [(str(key), item) for key, item in body.items()]
    elif isinstance(body, list):
        rows = [
            (as_text(item.get("id")), item) for item in body if isinstance(item, dict)
        ]
    result: PriceRows = {}
    for code, item in rows:
        if not code or not _is_row(item):
            continue
        price = as_decimal(item.get("cost", item.get("price")))
        if price is None:
            continue
        raw = next((item[k] for k in ("count", "quant", "quantity") if k in item), None)
        count = as_int(raw) if raw is not None else None
        result[code.lower()] = (price, count)
    return result


def _is_row(item: Any) -> bool:
    return isinstance(item, dict) and ("cost" in item or "price" in item)


def _activation_rows(data: Any) -> list[dict[str, Any]] | None:
    """Rows from the classic object, Hero's ``data`` list, or grizzly's bare array."""
    if isinstance(data, list):
        return [row for row in data if isinstance(row, dict)]
    if isinstance(data, dict):
        for key in ("activeActivations", "data"):
            rows = data.get(key)
            if isinstance(rows, dict):
                rows = rows.get("rows")
            if isinstance(rows, list):
                return [row for row in rows if isinstance(row, dict)]
        if as_text(data.get("status")) == "success":
            return []
    return None


# ---- options ---------------------------------------------------------------------


def _base_url_option(name: str, options: Mapping[str, Any], key: str) -> str:
    """The clone's endpoint: required, http(s), and without the key in its query."""
    require_option(name, options, key)
    value = url_option(name, options, key, "").rstrip("?&")
    if re.search(r"[?&]api_key=", value, re.IGNORECASE):
        # it would show in check-config and logs: the key has its own masked option
        raise ConfigError(
            f"providers.{name}.{key}: holds an api_key; move it to"
            f" providers.{name}.api_key"
        )
    return value


def _currency_option(name: str, options: Mapping[str, Any], key: str) -> str:
    """The clone's balance currency, a three-letter code (RUB by default)."""
    value = HandlerApiProvider.native_currency(options)
    if not re.fullmatch(r"[A-Z]{3}", value):
        raise ConfigError(
            f"providers.{name}.{key}: expected a currency code such as RUB"
        )
    return value


def _method_option(name: str, options: Mapping[str, Any], key: str) -> str:
    """GET or POST."""
    value = str(options.get(key, "GET")).strip().upper()
    if value not in ("GET", "POST"):
        raise ConfigError(f"providers.{name}.{key}: must be GET or POST")
    return value


def _optional_text(name: str, options: Mapping[str, Any], key: str) -> str | None:
    value = options.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ConfigError(f"providers.{name}.{key}: expected text, got {value!r}")
    return str(value).strip() or None


def _code_map(name: str, options: Mapping[str, Any], key: str) -> dict[str, str]:
    """``services`` / ``operators``: {our code: the clone's code}, or ConfigError."""
    raw = options.get(key) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"providers.{name}.{key}: expected a mapping ours -> theirs")
    result: dict[str, str] = {}
    for ours, theirs in raw.items():
        if not isinstance(ours, str) or not ours.strip() or not as_text(theirs):
            raise ConfigError(
                f"providers.{name}.{key}.{ours}: expected a code, got {theirs!r}"
            )
        result[ours.strip().lower()] = as_text(theirs)
    return result


def _country_option(name: str, options: Mapping[str, Any]) -> dict[int, str]:
    """``countries``: a list of sms-activate ids, or {our id: the clone's id}."""
    raw = options.get("countries") or {}
    pairs: list[tuple[Any, Any]]
    if isinstance(raw, list):
        pairs = [(item, item) for item in raw]
    elif isinstance(raw, Mapping):
        pairs = list(raw.items())
    else:
        raise ConfigError(
            f"providers.{name}.countries: expected a list of ids or a mapping id -> id"
        )
    result: dict[int, str] = {}
    for ours, theirs in pairs:
        key = as_int(ours)
        if key is None or key < 0 or not as_text(theirs):
            raise ConfigError(
                f"providers.{name}.countries.{ours}: expected sms-activate id -> the"
                f" clone's id, got {theirs!r}"
            )
        result[key] = as_text(theirs)
    return result


def _timezone_option(name: str, options: Mapping[str, Any]) -> dt.tzinfo | None:
    """``timezone``: the IANA zone the clone writes activation times in."""
    value = options.get("timezone")
    if value is None or value == "":
        return None
    try:
        return zoneinfo.ZoneInfo(str(value))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"providers.{name}.timezone: unknown time zone {value!r}"
        ) from exc
