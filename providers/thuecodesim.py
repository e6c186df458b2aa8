"""thuecodesim.com: Vietnamese and Lao SIMs, one paid request per SMS session.

The API (``seeds/thuecodesim-api.vi.txt``) answers every GET with the envelope
``{"status_code", "success", "message", "data"}``. The numeric ``status_code`` values
were lost from the documentation, so this adapter branches only on ``success`` and
classifies failures by the meaning of ``message`` (Vietnamese or English), with a
default branch. There is no cancel and no "next SMS" endpoint: finish and cancel are
local, and a retry is either a new paid re-rent of the same number or nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from typing import Any, ClassVar

from providers.base import Provider, as_bool, as_int, as_text, digits
from providers.http import UpstreamHttp
from providers.otp import extract_code
from providers.settings import (
    ProviderSettings,
    as_decimal,
    flag,
    number,
    number_option,
    option,
    required,
    url,
)
from providers.vocabulary import (
    ActivationRef,
    BatchPoll,
    ChannelsLimit,
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

log = logging.getLogger(__name__)
SERVICE_LIST_MEMO = 60.0  # seconds buy/reactivate/lookup reuse a fetched service list

VIETNAM_TZ = timezone(timedelta(hours=7))
DEFAULT_BASE_URL = "https://api.thuecodesim.com"
LOOKUP_SLACK = 120.0  # seconds of clock skew tolerated when matching history items
HISTORY_LIMIT = 50
BATCH_SLACK_ROWS = 100  # history rows asked beyond the open orders (other tools)
LEARN_ROWS = 8  # waiting history rows per batch that may teach the upstream's zone
# CreatedTime carries no zone. Vietnam time is what the seed's samples suggest, but the
# upstream clock has been seen in UTC: until the offset is learned from a live answer
# (an order whose creation time we know), any offset from UTC-12 to UTC+14 is possible.
EARLIEST_OFFSET, LATEST_OFFSET = -12 * 3600.0, 14 * 3600.0
OFFSET_STEP = 900.0  # zones are whole quarter hours
OFFSET_FIT = 300.0  # a sample further than this from a quarter hour teaches nothing
CHARGE_WAIT = 2.0  # seconds a purchase waits to read what it was charged

_TIME = re.compile(
    r"^\s*(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2})?)(?:\.(\d+))?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?\s*$"
)

# Failure meanings documented for the envelope, as hints over the folded (lower-case,
# diacritic-free) message. Checked in this order; anything else takes the default.
_AUTH_HINTS = re.compile(r"xac thuc|\btoken\b|\bauth|unauthori[sz]ed|\bjwt\b")
_BALANCE_HINTS = re.compile(
    r"\bso du\b|\bbalance\b|\bkhong du tien\b|\bnap (?:them )?tien|\bfunds?\b"
    r"|\bmoney\b"
)
_LIMIT_HINTS = re.compile(r"\blimit\b|\btoi da\b")  # "at most $ numbers waiting"
_STOCK_HINTS = re.compile(r"\bhet\b|\bkho so\b|\bstock\b|\bout of\b|\bno numbers?\b")
_SERVICE_HINTS = re.compile(
    r"\bung dung\b|\bkhong ton tai\b|\btam ngung\b|\bservice\b|\bdich vu\b"
)


def fold(text: str) -> str:
    """Lower-case ``text`` and drop Vietnamese diacritics ("Số dư" -> "so du")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold().replace("đ", "d"))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def name_key(name: str) -> str:
    """The matching key of a service name: folded, letters and digits only."""
    return "".join(ch for ch in fold(name) if ch.isalnum())


def parse_wall_time(value: Any) -> tuple[float, bool] | None:
    """A thuecodesim timestamp -> (seconds, zoned); a naive one is read as UTC."""
    match = _TIME.match(as_text(value))
    if match is None:
        return None
    day, clock, fraction, zone = match.groups()
    text = f"{day}T{clock}"
    if fraction:
        text += "." + fraction[:6].ljust(6, "0")
    if zone:
        text += "+00:00" if zone == "Z" else zone
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    zoned = moment.tzinfo is not None
    if not zoned:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp(), zoned


def parse_created_time(value: Any) -> float | None:
    """A thuecodesim timestamp (Vietnam time unless zoned) -> epoch seconds, or None."""
    parsed = parse_wall_time(value)
    if parsed is None:
        return None
    seconds, zoned = parsed
    return seconds if zoned else seconds - VIETNAM_TZ.utcoffset(None).total_seconds()


@dataclass(frozen=True)
class CountrySpec:
    """How one sms-activate country is spelled upstream."""

    key: str  # "vn" | "la"
    iso: str  # "VN" | "LA"
    dial: str  # "84" | "856"
    prefix_filter: bool  # exceptPrefix is honoured (Vietnam only)
    operators: Mapping[str, str]  # sms-activate name -> upstream network


@dataclass(frozen=True)
class Entry:
    """One service of the upstream catalogue of a country."""

    id: str
    name: str
    price: Decimal


def load_tables() -> tuple[dict[int, CountrySpec], dict[str, tuple[str, ...]]]:
    """The shipped countries and service-alias tables (``data/thuecodesim.json``)."""
    raw = json.loads(
        resources.files("providers")
        .joinpath("data/thuecodesim.json")
        .read_text("utf-8")
    )
    countries = {
        int(country): CountrySpec(
            key=spec["key"],
            iso=spec["iso"],
            dial=spec["dial"],
            prefix_filter=bool(spec["prefix_filter"]),
            operators=dict(spec["operators"]),
        )
        for country, spec in raw["countries"].items()
    }
    services = {code: tuple(names) for code, names in raw["services"].items()}
    return countries, services


COUNTRIES, SERVICES = load_tables()


@dataclass(frozen=True)
class ThuecodesimSettings(ProviderSettings):
    """The options of a thuecodesim account."""

    token: str = option(required, secret=True)
    base_url: str = option(url(DEFAULT_BASE_URL))
    rerent_on_retry: bool = option(lambda n, o, k: _bool_option(n, o, k, False))
    batch_poll: bool = option(flag(True))  # false: poll number by number
    # deprecated, accepted for old configs and ignored (one warning line): the catalog
    # cache is the engine's, upstream.catalog_ttl
    catalog_ttl: float = option(number(60.0))
    nominal_stock: int = option(lambda n, o, k: _stock_option(n, o, k))
    services: dict[str, str] = option(lambda n, o, k: _alias_table(n, o.get(k)))


class ThuecodesimProvider(Provider):
    """thuecodesim.com through its v2 GET API; VND prices, charged at request time."""

    type_name: ClassVar[str] = "thuecodesim"
    currency: ClassVar[str] = "VND"
    settings_class: ClassVar[type[ProviderSettings]] = ThuecodesimSettings
    settings: ThuecodesimSettings
    can_lookup: ClassVar[bool] = True
    can_cancel: ClassVar[bool] = False  # no cancel endpoint: a number bought is spent
    can_reactivate: ClassVar[bool] = True  # request/getv2 with number= re-rents it
    can_poll_many = True  # session/historyv2 lists every order with its SMS

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
        self.rerent_on_retry = given.rerent_on_retry
        if options is not None and "catalog_ttl" in options:
            log.warning(
                "providers.%s.catalog_ttl is deprecated and ignored: the catalog is "
                "cached once, upstream.catalog_ttl",
                name,
            )
        self.nominal_stock = given.nominal_stock
        self._aliases = given.services
        # the service-list memo: ids and prices buy, reactivate and lookup resolve a
        # service with; not a catalog cache (catalog() and quote() always refresh it)
        self._service_lists: dict[str, tuple[float, list[Entry]]] = {}
        # seconds east of UTC of the upstream's CreatedTime, once a live answer told
        self.utc_offset: float | None = None
        self.can_poll_many = self.settings.batch_poll
        self._bought: dict[str, float] = {}  # recent request ids -> when we bought them

    # ---- facts ---------------------------------------------------------------------

    def countries(self) -> list[int]:
        """Vietnam (10) and Laos (25)."""
        return sorted(COUNTRIES)

    def operators(self, country: int) -> list[str]:
        """The sms-activate operator names selectable in Vietnam or Laos."""
        spec = COUNTRIES.get(country)
        return list(spec.operators) if spec else []

    # ---- operations ----------------------------------------------------------------

    async def balance(self) -> Decimal:
        """``/users/balance``; UpstreamAuth on a rejected token."""
        data = await self._call("/users/balance", {})
        value = as_decimal(data.get("balance") if isinstance(data, dict) else None)
        if value is None:
            raise UpstreamUncertain(self.name, "balance missing from the answer")
        return value

    async def buy(self, order: Order) -> Purchase:
        """One paid ``/request/getv2``; failures are classified as Provider.buy says."""
        spec = self._country(order.country)
        entry = await self._entry_before_buying(spec, order.service)
        if order.max_price is not None and entry.price > order.max_price:
            raise NoNumbers(self.name, f"price {entry.price} above {order.max_price}")
        params = {"serviceId": entry.id, "country": spec.key}
        networks = self._networks(spec, order.operators)
        if networks:
            params["network"] = (
                networks[0] if len(networks) == 1 else "|".join(networks) + "|"
            )
        except_prefix = self._except_prefix(spec, order.exclude_prefixes)
        if except_prefix:
            params["exceptPrefix"] = except_prefix
        operator = "any"
        if len(networks) == 1:
            operator = next(k for k, v in spec.operators.items() if v == networks[0])
        return await self._request(spec, entry, params, operator)

    async def poll(self, ref: ActivationRef) -> PollResult:
        """``/session/getv2``; a failure raises UpstreamUncertain (state unchanged)."""
        try:
            data = await self._call("/session/getv2", {"requestId": ref.upstream_id})
        except UpstreamAuth as exc:
            # Even a refused token says nothing about the order: keep its state.
            raise UpstreamUncertain(self.name, exc.detail) from exc
        if not isinstance(data, dict):
            raise UpstreamUncertain(self.name, "session answer has no data")
        result = self._session_result(ref, data)
        if result is None:
            raise UpstreamUncertain(
                self.name, f"unknown session Status {data.get('Status')!r}"
            )
        return result

    async def poll_many(self, refs: Sequence[ActivationRef]) -> BatchPoll:
        """``/session/historyv2``: every order in one list, each read like a session.

        The dates are the upstream's calendar days (``yyyy-MM-dd``, its clock's zone):
        until the zone is learned the window spans every zone from UTC-12 to UTC+14.
        An order the list leaves out, or lists with an unknown Status, is not covered.
        """
        if not refs:
            return BatchPoll()
        start = min(ref.created_at for ref in refs) - LOOKUP_SLACK
        now = max(self.clock(), start)
        if self.utc_offset is None:
            first, last = _day(start, EARLIEST_OFFSET), _day(now, LATEST_OFFSET)
        else:
            first, last = _day(start, self.utc_offset), _day(now, self.utc_offset)
        params = {
            # newest first: room for orders made since by other tools on the account
            "limit": str(len(refs) + BATCH_SLACK_ROWS),
            "fromDate": first.isoformat(),
            "toDate": last.isoformat(),
        }
        data = await self._call("/session/historyv2", params)
        items = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise UpstreamUncertain(self.name, "history answer is not a list")
        wanted = {ref.upstream_id: ref for ref in refs}
        results: dict[str, PollResult] = {}
        teachers = LEARN_ROWS  # a few waiting rows teach the zone; 10,000 need not
        for item in items:
            if not isinstance(item, dict):
                continue
            ref = wanted.get(as_text(item.get("ID")))
            if ref is None or not _same_phone(ref.phone, item):
                # ``ID`` is documented as the request id, but the seed's sample shows
                # another number: a row is ours only if its phone is ours too (else
                # another order's SMS could reach this activation); an order left
                # out is polled alone
                continue
            learn = teachers > 0 and as_int(item.get("Status")) == 0
            teachers -= learn
            result = self._session_result(ref, item, learn=learn)
            if result is not None:
                results[ref.upstream_id] = result
        return BatchPoll(results=results)

    def _session_result(
        self, ref: ActivationRef, data: Mapping[str, Any], *, learn: bool = True
    ) -> PollResult | None:
        """A session (or history item) as a poll result; None for an unknown Status.

        ``learn``: a waiting one teaches the zone of CreatedTime (see _learn_offset).
        """
        # ``ID`` is documented as the request id, but the seed's sample shows another
        # number: it is not compared, so a wrong guess cannot stall every poll.
        status = as_int(data.get("Status"))
        if status == 0:
            # still waiting: CreatedTime is the order's, whose creation we know,
            # unless it is a re-rent (a later order under the same activation)
            if learn and not ref.previous_ids:
                self._learn_offset(data.get("CreatedTime"), ref.created_at)
            return PollResult()
        if status == 2:
            return PollResult(closed=True)
        if status != 1:
            return None
        text = as_text(data.get("SmsContent"))
        code = as_text(data.get("Code"))
        if not code and text and not as_bool(data.get("IsSound")):
            code = extract_code(text) or ""
        if not code:
            # Done upstream but nothing usable: let the local deadline decide.
            return PollResult()
        received_at = self._received_at(data.get("CreatedTime"), ref.created_at)
        sms = Sms(
            uid=f"{ref.upstream_id}:{code}",
            text=text,
            code=code,
            received_at=received_at,
        )
        return PollResult(messages=(sms,))

    @property
    def retry_is_paid(self) -> bool:
        """With ``rerent_on_retry``, setStatus 3 re-rents the number: a new charge."""
        return self.rerent_on_retry

    async def retry(self, ref: ActivationRef) -> Purchase | None:
        """A new paid re-rent of the same number when ``rerent_on_retry``; else None."""
        if not self.rerent_on_retry:
            return None
        return await self.reactivate(ref)

    async def reactivate(self, ref: ActivationRef) -> Purchase:
        """A new paid order on the same number (``number=``): getExtraActivation."""
        spec = self._country(ref.country)
        service_id = ref.extra.get("service_id", "")
        entries = await self._catalog_before_buying(spec)
        entry = next((e for e in entries if e.id == service_id), None)
        if entry is None:
            entry = self._pick(entries, ref.service)
        number = ref.extra.get("rerent") or ref.phone
        params = {"serviceId": entry.id, "country": spec.key, "number": number}
        return await self._request(spec, entry, params, "any")

    async def finish(self, ref: ActivationRef) -> None:
        """Nothing to tell upstream: a session ends by itself."""

    async def cancel(self, ref: ActivationRef) -> None:
        """Nothing to tell upstream: there is no cancel endpoint, nor a known refund."""

    async def quote(self, order: Order) -> Offer | None:
        """The price on sale now: the service list is fetched again, never cached.

        The refreshed list is also what ``buy`` then reads, so its own price check
        and the cost it reports see the same fresh price.
        """
        spec = COUNTRIES.get(order.country)
        if spec is None or order.service not in self._aliases.values():
            return None
        try:
            entry = self._pick(await self._entries(spec, fresh=True), order.service)
        except UnknownService:
            return None
        return Offer(service=order.service, price=entry.price, count=self.nominal_stock)

    async def catalog(self, country: int) -> list[Offer]:
        """Every upstream service with an sms-activate code, at a nominal stock."""
        spec = COUNTRIES.get(country)
        if spec is None:
            return []
        entries = await self._entries(spec, fresh=True)  # the engine caches it
        chosen: dict[str, Entry] = {}
        for entry in entries:
            code = self._aliases.get(name_key(entry.name))
            if code is not None and code not in chosen:
                chosen[code] = self._pick(entries, code)
        return [
            Offer(service=code, price=entry.price, count=self.nominal_stock)
            for code, entry in chosen.items()
        ]

    def note_orders(self, created: Mapping[str, float]) -> None:
        """Our orders teach the offset when a history answer lists them."""
        if self.utc_offset is None:
            self._bought.update(created)

    async def lookup_purchases(self, order: Order, since: float) -> list[Purchase]:
        """History sessions of this service and country made since ``since``.

        CreatedTime has no zone: until a live answer taught the offset, an item counts
        if it could be that recent under any offset, and its ``created_skew`` says how
        far its ``created_at`` may be off.
        """
        spec = COUNTRIES.get(order.country)
        if spec is None:
            return []
        entries = await self._entries(spec)
        try:
            entry = self._pick(entries, order.service)
        except UnknownService:
            return []
        start = since - LOOKUP_SLACK
        now = max(self.clock(), since)
        if self.utc_offset is None:
            first, last = _day(start, EARLIEST_OFFSET), _day(now, LATEST_OFFSET)
        else:
            first, last = _day(start, self.utc_offset), _day(now, self.utc_offset)
        params = {
            "service": entry.id,
            "limit": str(HISTORY_LIMIT),
            "fromDate": first.isoformat(),
            "toDate": last.isoformat(),
        }
        data = await self._call("/session/historyv2", params)
        items = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise UpstreamUncertain(self.name, "history answer is not a list")
        for item in items:  # orders bought here whose time we know teach the offset
            if isinstance(item, dict) and as_text(item.get("ID")) in self._bought:
                bought = self._bought[as_text(item.get("ID"))]
                self._learn_offset(item.get("CreatedTime"), bought)
        found: list[Purchase] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            created, skew = self._instant(item.get("CreatedTime"))
            upstream_id = as_text(item.get("ID"))
            if created is None or created + skew < start or not upstream_id:
                continue
            if as_text(item.get("ServiceID")) not in ("", entry.id):
                continue
            if as_text(item.get("CountryISO")).upper() not in ("", spec.iso):
                continue
            original = as_text(item.get("PhoneOriginal"))
            phone = self._international(
                spec, original or item.get("Phone"), item.get("CountryCode")
            )
            if not phone:
                continue
            found.append(
                Purchase(
                    upstream_id=upstream_id,
                    phone=phone,
                    price=as_decimal(item.get("Price")) or entry.price,
                    extra={
                        "rerent": original or phone,
                        "country": spec.key,
                        "service_id": entry.id,
                    },
                    created_at=created,
                    created_skew=skew,
                )
            )
        return found

    # ---- helpers -------------------------------------------------------------------

    def _learn_offset(self, value: Any, created_at: float) -> None:
        """Learn the zone of CreatedTime from an order created at a known time."""
        parsed = parse_wall_time(value)
        if parsed is None or parsed[1]:
            return
        diff = parsed[0] - created_at
        offset = round(diff / OFFSET_STEP) * OFFSET_STEP
        if abs(diff - offset) > OFFSET_FIT:
            return
        if not EARLIEST_OFFSET <= offset <= LATEST_OFFSET:
            return
        if offset != self.utc_offset:
            log.info("%s: upstream CreatedTime is UTC%+.2gh", self.name, offset / 3600)
            self.utc_offset = offset

    def _instant(self, value: Any) -> tuple[float | None, float]:
        """CreatedTime -> (epoch seconds, how far off they may be), (None, 0) if bad."""
        parsed = parse_wall_time(value)
        if parsed is None:
            return None, 0.0
        seconds, zoned = parsed
        if zoned:
            return seconds, 0.0
        if self.utc_offset is not None:
            return seconds - self.utc_offset, 0.0
        # any offset: the true time lies in [wall - LATEST, wall - EARLIEST]
        middle = (EARLIEST_OFFSET + LATEST_OFFSET) / 2
        return seconds - middle, (LATEST_OFFSET - EARLIEST_OFFSET) / 2

    def _received_at(self, value: Any, created_at: float) -> float:
        """When an SMS came: CreatedTime in the learned (else Vietnam) zone, if it fits."""
        now = self.clock()
        if self.utc_offset is not None:
            moment = self._instant(value)[0]
        else:
            moment = parse_created_time(value)
        plausible = moment is not None and (
            created_at - LOOKUP_SLACK <= moment <= now + LOOKUP_SLACK
        )
        return moment if plausible and moment is not None else now

    def _country(self, country: int) -> CountrySpec:
        """The upstream spelling of a country, or UnknownService."""
        spec = COUNTRIES.get(country)
        if spec is None:
            raise UnknownService(self.name, f"country {country} not served")
        return spec

    async def _call(
        self, path: str, params: Mapping[str, str], *, purchase: bool = False
    ) -> Any:
        """GET one endpoint; the envelope's ``data`` on success, else a ProviderError.

        A failure envelope raises UpstreamAuth when the token was refused; otherwise
        the class its message suggests (NoNumbers by default) for a purchase, and
        UpstreamUncertain for any other call. A body that is not an envelope raises
        UpstreamUncertain, whatever the HTTP status.
        """
        _, body = await self._request_json(
            "GET", self.base_url + path, params={**params, "token": self.token}
        )
        if not isinstance(body, dict) or "success" not in body:
            raise UpstreamUncertain(self.name, f"{path}: answer is not an envelope")
        if as_bool(body["success"]):
            return body.get("data")
        message = as_text(body.get("message")) or "no message"
        error = classify_failure(message)
        if error is not UpstreamAuth and not purchase:
            error = UpstreamUncertain
        raise error(self.name, f"{path}: {message}")

    async def _entries(self, spec: CountrySpec, *, fresh: bool = False) -> list[Entry]:
        """The service list of a country; ``fresh`` asks upstream, else the memo serves.

        The memo lives SERVICE_LIST_MEMO seconds: a buy right after a quote or a
        catalog() reads their answer instead of asking again (one paced call saved).
        """
        now = self.clock()
        cached = self._service_lists.get(spec.key)
        if not fresh and cached is not None and now - cached[0] < SERVICE_LIST_MEMO:
            return cached[1]
        data = await self._call("/service/getv2", {"country": spec.key})
        rows = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise UpstreamUncertain(self.name, "service list is not a list")
        entries = []
        for row in rows:
            if not isinstance(row, dict):
                continue
            service_id, price = as_text(row.get("id")), as_decimal(row.get("price"))
            if service_id and price is not None:
                entries.append(Entry(service_id, as_text(row.get("name")), price))
        self._service_lists[spec.key] = (now, entries)
        return entries

    async def _catalog_before_buying(self, spec: CountrySpec) -> list[Entry]:
        """The catalogue, where any failure means nothing was bought yet."""
        try:
            return await self._entries(spec)
        except (UpstreamAuth, UpstreamUnreachable):
            raise
        except UpstreamUncertain as exc:
            # Only the read-only service list failed: the purchase was never sent.
            raise UpstreamUnreachable(self.name, f"service list: {exc.detail}") from exc

    async def _entry_before_buying(self, spec: CountrySpec, code: str) -> Entry:
        """The upstream service to buy for a code; UnknownService if not sold."""
        if code not in self._aliases.values():
            raise UnknownService(self.name, f"service {code!r} has no thuecodesim name")
        return self._pick(await self._catalog_before_buying(spec), code)

    def _pick(self, entries: list[Entry], code: str) -> Entry:
        """The entry for a code, earliest alias first; UnknownService if none."""
        keys = [key for key, owner in self._aliases.items() if owner == code]
        ranks = {key: rank for rank, key in enumerate(keys)}
        best: tuple[int, Entry] | None = None
        for entry in entries:
            rank = ranks.get(name_key(entry.name))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, entry)
        if best is None:
            raise UnknownService(self.name, f"service {code!r} not on sale")
        return best[1]

    async def _request(
        self, spec: CountrySpec, entry: Entry, params: dict[str, str], operator: str
    ) -> Purchase:
        """Send one paid ``/request/getv2`` and read the number it sold."""
        try:
            data = await self._call("/request/getv2", params, purchase=True)
        except UnknownService:
            self._service_lists.pop(spec.key, None)  # the id may be stale
            raise
        if not isinstance(data, dict):
            raise UpstreamUncertain(self.name, "success without data")
        request_id = as_text(data.get("request_id"))
        rerent = as_text(data.get("re_phone_number"))
        phone = self._international(spec, rerent, data.get("countryCode"))
        if not phone:
            phone = self._international(
                spec, data.get("phone_number"), data.get("countryCode")
            )
        if not request_id or not phone:
            raise UpstreamUncertain(self.name, "success without request_id or number")
        self._bought[request_id] = self.clock()
        while len(self._bought) > HISTORY_LIMIT:
            del self._bought[next(iter(self._bought))]
        return Purchase(
            upstream_id=request_id,
            phone=phone,
            price=await self._charged(request_id, entry.price),
            operator=operator,
            extra={
                "rerent": rerent or phone,
                "country": spec.key,
                "service_id": entry.id,
            },
        )

    async def _charged(self, request_id: str, listed: Decimal) -> Decimal:
        """What a purchase cost: the session's ``Price``, else the listed price.

        The purchase answer carries no price, and the list may have moved since it
        was read; the session tells. Bounded in time, and any failure keeps the
        listed price: the number is bought whatever this read says.
        """
        try:
            data = await asyncio.wait_for(
                self._call("/session/getv2", {"requestId": request_id}), CHARGE_WAIT
            )
        except (ProviderError, asyncio.TimeoutError):
            return listed
        if not isinstance(data, dict):
            return listed
        self._learn_offset(data.get("CreatedTime"), self._bought[request_id])
        price = as_decimal(data.get("Price"))
        return listed if price is None or price <= 0 else price

    def _networks(self, spec: CountrySpec, operators: tuple[str, ...]) -> list[str]:
        """Upstream networks to ask for ([] = any); NoNumbers for one not sold here."""
        names: list[str] = []
        for operator in operators:
            wanted = operator.strip().lower()
            if wanted in ("", "any"):
                return []
            network = spec.operators.get(wanted)
            if network is None and wanted.upper() in spec.operators.values():
                network = wanted.upper()
            if network is None:
                raise NoNumbers(self.name, f"no {operator!r} numbers in {spec.iso}")
            if network not in names:
                names.append(network)
        return names

    def _except_prefix(self, spec: CountrySpec, prefixes: tuple[str, ...]) -> str:
        """International prefixes ("8490") -> local ``exceptPrefix`` ("90|")."""
        if not spec.prefix_filter:
            return ""
        local: list[str] = []
        for prefix in prefixes:
            number = digits(prefix)
            if number.startswith(spec.dial):
                number = number[len(spec.dial) :]
            elif number.startswith("0"):
                number = number[1:]
            else:
                continue  # another country's prefix never matches this number
            if number and number not in local:
                local.append(number)
        return "".join(f"{number}|" for number in local)

    def _international(self, spec: CountrySpec, raw: Any, dial_hint: Any) -> str:
        """Any upstream form of a number (9 digits, 0…, 84…) -> international digits."""
        number = digits(raw)
        if not number:
            return ""
        dial = digits(dial_hint) or spec.dial
        if number.startswith(dial) and len(number) >= len(dial) + 8:
            return number
        if number.startswith("0"):
            number = number[1:]
        return dial + number


def classify_failure(message: str) -> type[ProviderError]:
    """The error class a failure envelope's message means; NoNumbers when unclear."""
    folded = fold(message)
    if _AUTH_HINTS.search(folded):
        return UpstreamAuth
    if _BALANCE_HINTS.search(folded):
        return NoBalance
    if _LIMIT_HINTS.search(folded):
        return ChannelsLimit
    if _STOCK_HINTS.search(folded):
        return NoNumbers
    if _SERVICE_HINTS.search(folded):
        return UnknownService
    return NoNumbers


def _day(moment: float, offset: float) -> date:
    """The calendar day at an epoch time in the zone ``offset`` seconds east of UTC."""
    return datetime.fromtimestamp(moment, timezone(timedelta(seconds=offset))).date()


def _stock_option(name: str, options: Mapping[str, Any], key: str) -> int:
    """The stock shown for an offer the upstream does not count: a whole number."""
    stock = number_option(name, options, key, 100)
    if stock != int(stock):
        raise ConfigError(f"providers.{name}.{key}: must be an integer")
    return int(stock)


def _bool_option(
    name: str, options: Mapping[str, Any], key: str, default: bool
) -> bool:
    """A boolean option (true/false, also as text), or ConfigError naming the place."""
    value = options.get(key, default)
    if isinstance(value, bool):
        return value
    text = as_text(value).lower()
    if text in {"true", "yes", "on", "1"}:
        return True
    if text in {"false", "no", "off", "0"}:
        return False
    raise ConfigError(f"providers.{name}.{key}: must be true or false, got {value!r}")


def _alias_table(name: str, overrides: Any) -> dict[str, str]:
    """Name key -> sms-activate code: the shipped table, then the ``services`` option.

    An override replaces every name of its code and wins over other codes' names; a
    null or empty override removes the code.
    """
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"providers.{name}.services: must be a mapping code -> name")
    replaced: dict[str, tuple[str, ...]] = {}
    for code, names in overrides.items():
        if not isinstance(code, str) or not re.fullmatch(r"[a-z0-9_]+", code):
            raise ConfigError(f"providers.{name}.services: bad service code {code!r}")
        listed = [] if names is None else [names] if isinstance(names, str) else names
        if not isinstance(listed, list) or not all(
            isinstance(n, str) and name_key(n) for n in listed
        ):
            raise ConfigError(
                f"providers.{name}.services.{code}: must be a name or a list of names"
            )
        replaced[code] = tuple(listed)
    aliases: dict[str, str] = {}
    for code, names in SERVICES.items():
        if code not in replaced:
            for alias in names:
                aliases.setdefault(name_key(alias), code)
    for code, names in replaced.items():
        for alias in names:
            aliases.pop(name_key(alias), None)  # re-insert: keeps the listed order
            aliases[name_key(alias)] = code
    return aliases


def _same_phone(ours: str, item: Mapping[str, Any]) -> bool:
    """Whether a history row's number (``Phone``, ``PhoneOriginal`` or
    ``re_phone_number``, written with or without the dial code or a leading 0) is the
    order's; a row that names no number is not trusted."""
    mine = digits(ours)[-8:]
    if len(mine) < 8:
        return False
    for name in ("Phone", "PhoneOriginal", "re_phone_number"):
        theirs = digits(item.get(name))
        if len(theirs) >= 8 and theirs[-8:] == mine:
            return True
    return False
