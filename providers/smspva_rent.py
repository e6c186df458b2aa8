"""smspva's rental API (``rent.php``): numbers held by the week, activations too.

Registered as ``smspva_rent``; ``type: smspva`` with ``api: rent`` in the config maps
here. The account, its tables and the balance (activation v2) are shared with
:mod:`providers.smspva` through :class:`~providers.smspva.SmspvaAccount`.

``apikey`` query parameter, ``{"status": 1|"1", "data": ...}`` or ``{"status": 0,
"msg": ...}``; charged at ``create``; a number must be ``activate``-d before SMS reach
it; SMS come as bare text, so the code is extracted. It also serves the dialect's rent
family: rent.php rents by whole weeks, so a rent of N hours buys ceil(N / 168) weeks
(and says so in its price and end date).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from providers.base import as_bool, as_int, as_text, digits
from providers.http import UpstreamHttp
from providers.rental import Rental
from providers.settings import ProviderSettings, as_decimal, option
from providers.smspva import (
    _AUTH_HINTS,
    _BALANCE_HINTS,
    _SERVICE_HINTS,
    LOOKUP_SLACK,
    RENT_DAYS,
    RENT_EXCLUDED,
    RENT_OFFERS_MEMO,
    SmspvaAccount,
    SmspvaSettings,
    _Answer,
    _api_option,
    _code_of,
    _count,
    _first,
    _has,
    _id_text,
    _records,
    _texts,
    _timestamp,
)
from providers.vocabulary import (
    ActivationRef,
    BatchPoll,
    Clock,
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


@dataclass(frozen=True)
class SmspvaRentSettings(SmspvaSettings):
    """The options of an smspva account renting through rent.php (``api: rent``)."""

    api: str = option(_api_option("rent"))


class SmspvaRentProvider(SmspvaAccount, Rental):
    """An smspva account selling through rent.php: getNumber and the rent family."""

    type_name: ClassVar[str] = "smspva_rent"
    api: ClassVar[str] = "rent"
    excluded: ClassVar[frozenset[str]] = RENT_EXCLUDED
    settings_class: ClassVar[type[ProviderSettings]] = SmspvaRentSettings
    settings: SmspvaRentSettings

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
        self._rent_weeks: dict[
            tuple[str, int], tuple[float, dict[str, tuple[Decimal, int]]]
        ] = {}
        # rental: getdata per country, priced for the configured period
        self._rent_offers: dict[str, tuple[float, dict[str, tuple[Decimal, int]]]] = {}

    async def buy(self, order: Order) -> Purchase:
        """One number; NoNumbers/NoBalance/UnknownService mean nothing was bought."""
        iso, opt = self._resolve(order.country, order.service)
        price = self._known_price(iso, opt)
        if order.max_price is not None and price and price > order.max_price:
            raise NoNumbers(self.name, f"price {price} above max_price")
        return await self._buy_rent(order, iso, opt, price)

    async def poll(self, ref: ActivationRef) -> PollResult:
        """Every SMS upstream holds for the number; closed once ``until`` has passed."""
        return await self._poll_rent(ref)

    async def poll_many(self, refs: Sequence[ActivationRef]) -> BatchPoll:
        """rent.php ``orders``: every rental of the account in one paced call.

        A row with ``hasnewsms`` is fetched through ``sms``; one without is nothing
        new, and over once its ``until`` has passed [doc]. A row whose ``state`` is
        -1 (number not in the system) is fetched too; an order not listed is not
        covered.
        """
        if not refs:
            return BatchPoll()
        answer = await self._rent("orders")
        if answer.code != 1:
            if _has(answer.error, _AUTH_HINTS):
                raise UpstreamAuth(self.name, answer.error)
            # status 0 from orders means "no news" [doc]: nothing is covered
            return BatchPoll()
        wanted = {ref.upstream_id for ref in refs}
        now = self.clock()
        results: dict[str, PollResult] = {}
        fetch = set()
        for item in _records(answer.data, "orders"):
            order_id = _id_text(item.get("id"))
            if order_id not in wanted or order_id in results:
                continue
            if as_bool(item.get("hasnewsms")) or as_int(item.get("state")) == -1:
                fetch.add(order_id)
                continue
            until = as_int(item.get("until"))
            results[order_id] = PollResult(closed=until is not None and now >= until)
        return BatchPoll(results=results, fetch=frozenset(fetch - results.keys()))

    async def ready(self, ref: ActivationRef) -> None:
        """Activate the number (needed before SMS arrive)."""
        answer = await self._rent("activate", id=ref.upstream_id)
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)

    async def retry(self, ref: ActivationRef) -> Purchase | None:
        """Nothing to ask: a rental keeps receiving; the next SMS has a new uid."""
        return None

    async def cancel(self, ref: ActivationRef) -> None:
        """Release the number (delete); an order already gone is fine."""
        answer = await self._rent("delete", id=ref.upstream_id)
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)

    async def quote(self, order: Order) -> Offer | None:
        """The price on sale now (``getdata`` fetched again).

        The count is the last catalogue's: a price limit needs only the price, and
        every extra call costs the pacing interval.
        """
        try:
            iso, opt = self._resolve(order.country, order.service)
        except UnknownService:
            return None
        offer = (await self._rent_catalog(iso)).get(opt)
        if offer is None:
            return None
        return Offer(service=order.service, price=offer[0], count=offer[1])

    async def catalog(self, country: int) -> list[Offer]:
        """Mapped services on sale in a country, USD price and stock; [] if none."""
        iso = self._iso(country)
        if iso is None:
            return []
        priced = await self._rent_catalog(iso)
        return [
            Offer(service=code, price=priced[opt][0], count=priced[opt][1])
            for code, opt in sorted(self.services.items())
            if opt in priced
        ]

    async def lookup_purchases(self, order: Order, since: float) -> list[Purchase]:
        """Upstream orders for this service and country made since ``since``."""
        try:
            iso, opt = self._resolve(order.country, order.service)
        except UnknownService:
            return []  # nothing of this kind can have been bought here
        return await self._lookup_rent(order, iso, opt, since)

    # ---- rent.php -------------------------------------------------------------------

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
        messages = [
            Sms(uid=uid, text=text, code=_code_of(text), received_at=at)
            for uid, text, at, _ in self._rent_sms(answer.data)
        ]
        return PollResult(messages=tuple(messages), closed=expired)

    async def _rent_catalog(self, iso: str) -> dict[str, tuple[Decimal, int]]:
        """optNN -> (price for the configured period, count) from ``getdata``."""
        answer = await self._rent(
            "getdata", country=iso, dtype=self.dtype, dcount=self.dcount
        )
        if answer.code != 1 and _has(answer.error, _AUTH_HINTS):
            raise UpstreamAuth(self.name, answer.error)
        offers = _parse_getdata(answer.data, self.rent_days)
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

    # ---- the dialect's rent family --------------------------------------------------

    def rent_countries(self) -> list[int]:
        """Every country rent.php rents in."""
        return self.countries()

    async def rent_offers(self, country: int, hours: int) -> list[RentOffer]:
        """``getdata`` for the weeks covering ``hours``: price_day x days, count."""
        iso = self._iso(country)
        if iso is None:
            return []
        weeks = _weeks(hours)
        cached = self._rent_weeks.get((iso, weeks))
        if cached and self.clock() - cached[0] < RENT_OFFERS_MEMO:
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

    def _known_price(self, iso: str, opt: str) -> Decimal | None:
        """The cached price of one number, if a catalog call has seen it."""
        offers = self._rent_offers.get(iso)
        offer = offers[1].get(opt) if offers else None
        return offer[0] if offer else None


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
