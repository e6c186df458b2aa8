"""Rents: numbers held for hours, for any sender's SMS (the dialect's rent family).

Rents are their own id space (the store's ``rents`` table). Money follows the purchase
rules: a rent attempt is stored before each paid call (rent, prolong), a definite
refusal moves on to the next renting provider, and an unknown outcome stops there, is
recorded as uncertain and is never retried blindly.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from decimal import Decimal

from compat_server.catalog import Catalog, key_providers
from compat_server.config import Config, KeyConfig
from compat_server.routing import Prices, Router, Upstreams, merge_refusals
from compat_server.store import (
    CONFIRMED,
    PENDING,
    RECONCILED,
    REFUSED,
    RENT_ACTIVE,
    RENT_CANCELLED,
    RENT_EXPIRED,
    RENT_FINISHED,
    UNCERTAIN,
    Rent,
    RentMessage,
    Store,
    StoreError,
)
from compat_server.webhooks import Webhooks
from providers.base import Provider
from providers.rental import Rental
from providers.vocabulary import (
    Clock,
    NoBalance,
    NoNumbers,
    ProviderError,
    RentOffer,
    RentOrder,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

log = logging.getLogger("compat_server")

CANCEL_WINDOW = 1200.0  # seconds after the start in which a rent may be cancelled
RECONCILE_WINDOW = 900.0  # seconds an uncertain rent is looked for upstream
RENT_RECONCILE_LEASE = 300.0  # s a round may hold the rent reconciler's lease (a dead
# server's round blocks the others at most this long; a finished one gives it up)
RECONCILE_WINDOW = 900.0  # seconds an uncertain rent is looked for upstream
REFUSALS = (NoNumbers, NoBalance, UnknownService, UpstreamUnreachable, UpstreamAuth)


class RentClosed(Exception):
    """The rent is over (its state says how)."""


class CantCancel(Exception):
    """A cancel came after CANCEL_WINDOW."""


@dataclass(frozen=True)
class RentStock:
    """A service rentable for some hours: lowest display price, total stock."""

    cost: Decimal
    count: int


class Rentals:
    """Every rent operation: stock, rent, poll, prolong, release, reconcile."""

    def __init__(
        self,
        config: Config,
        store: Store,
        upstreams: Upstreams,
        prices: Prices,
        catalog: Catalog,
        router: Router,
        clock: Clock,
    ) -> None:
        self.config = config  # swapped by ops.apply on a reload
        self.store = store
        self.upstreams = upstreams
        self.prices = prices
        self.catalog = catalog
        self.router = router
        self.clock = clock
        self.webhooks: Webhooks | None = None  # set by the Engine (they refresh rents)
        self._in_flight: set[int] = set()  # rent attempts whose call is running

    def renters(self, key: KeyConfig, country: int | None = None) -> list[str]:
        """The key's providers that rent (in ``country``, if given), in order."""
        names = []
        for name in key_providers(self.config, key):
            provider = self.upstreams.providers[name]
            if not isinstance(provider, Rental):
                continue
            countries = provider.rent_countries()
            if countries and (country is None or country in countries):
                names.append(name)
        return names

    def countries(self, key: KeyConfig) -> list[int]:
        """Countries where the key can rent."""
        found: set[int] = set()
        for name in self.renters(key):
            found.update(_renter(self.upstreams.providers[name]).rent_countries())
        return sorted(found)

    async def stock(
        self, key: KeyConfig, country: int, hours: int
    ) -> dict[str, RentStock]:
        """service -> lowest display price and total count for ``hours`` in a country."""
        merged: dict[str, RentStock] = {}
        for name in self.renters(key, country):
            for offer in await self._offers(name, country, hours):
                cost = self.prices.display(name, offer.price)
                old = merged.get(offer.service)
                if old is None:
                    merged[offer.service] = RentStock(cost, offer.count)
                else:
                    merged[offer.service] = RentStock(
                        min(old.cost, cost), old.count + offer.count
                    )
        return merged

    async def _offers(self, name: str, country: int, hours: int) -> list[RentOffer]:
        """One provider's rent offers for ``hours`` in a country (cached)."""
        provider = _renter(self.upstreams.providers[name])
        offers: list[RentOffer] = await self.catalog.cache.get(
            ("rent", name, country, hours),
            functools.partial(
                self.upstreams.call,
                name,
                "rent_offers",
                functools.partial(provider.rent_offers, country, hours),
            ),
            [],
        )
        return offers

    async def rent(self, key: KeyConfig, order: RentOrder) -> Rent:
        """Rent one number; stored before this returns. Raises ProviderError."""
        refusals: list[ProviderError] = []
        for name in self.renters(key, order.country):
            provider = _renter(self.upstreams.providers[name])
            native = type(self.upstreams.providers[name]).native_currency(
                self.upstreams.providers[name].options
            )
            try:  # a key's budget holds for rents too: money set aside first
                hold = await self.router.budgets.hold(
                    key, await self._rent_price(key, name, order)
                )
            except NoBalance as exc:
                refusals.append(exc)
                continue
            try:
                attempt = await self.store.begin_rent_attempt(
                    key.key_id,
                    name,
                    "rent",
                    _order_json(order),
                    order.hours,
                    self.clock(),
                )
            except BaseException:
                await self.router.budgets.release(hold)
                raise
            # in flight until stored: no reconciler may take this number for an orphan
            self.router.in_flight[-attempt] = name
            self._in_flight.add(attempt)
            try:
                try:
                    purchase = await self.upstreams.call(
                        name, "rent", functools.partial(provider.rent, order)
                    )
                except REFUSALS as exc:
                    await self.store.end_rent_attempt(
                        attempt, REFUSED, type(exc).__name__, self.clock()
                    )
                    refusals.append(exc)
                    continue
                except UpstreamUncertain as exc:
                    await self.store.end_rent_attempt(
                        attempt, UNCERTAIN, exc.detail, self.clock()
                    )
                    log.error(
                        "rent provider=%s outcome unknown (%s): not retried; rent attempt"
                        " %d needs checking on the account by hand",
                        name,
                        exc.detail,
                        attempt,
                    )
                    raise NoNumbers(name, "rent outcome unknown") from exc
                cost = self.prices.display(name, purchase.price)
                rent = await self.store.complete_rent(
                    attempt, key.key_id, name, native, order.service, order.country,
                    purchase, cost, self.clock(),
                )  # fmt: skip
                log.info(
                    "rent id=%d provider=%s service=%s country=%d hours=%d",
                    rent.id, name, order.service, order.country, order.hours,
                )  # fmt: skip
                return rent
            finally:
                self.router.in_flight.pop(-attempt, None)
                self._in_flight.discard(attempt)
                await self.router.budgets.release(hold)
        raise merge_refusals(refusals)

    async def _rent_price(
        self, key: KeyConfig, name: str, order: RentOrder
    ) -> Decimal | None:
        """The display price of this rent from ``name`` (None when unknown)."""
        if key.budget is None:
            return None
        for offer in await self._offers(name, order.country, order.hours):
            if offer.service == order.service:
                return self.prices.display(name, offer.price)
        return None  # unknown: all that is left is held

    async def refresh(self, rent: Rent) -> list[RentMessage]:
        """Poll an active rent (at most once per poll interval); the new messages."""
        if rent.state != RENT_ACTIVE:
            return []
        if self.clock() >= rent.until:
            await self._poll(rent)  # the SMS of its last minutes still count
            if rent.state == RENT_ACTIVE:
                await self.store.set_rent_state(rent, RENT_EXPIRED, self.clock())
            return []
        return await self._poll(rent)

    async def _poll(self, rent: Rent) -> list[RentMessage]:
        base = self.upstreams.providers.get(rent.provider)
        if base is None:
            return []
        # one poll per interval across every server sharing the store
        try:
            taken = await self.store.lease(
                f"rent-poll:{rent.id}", base.poll_interval, self.clock()
            )
        except StoreError as exc:  # nothing could be stored anyway
            log.info("rent poll id=%d not made, store: %s", rent.id, exc)
            return []
        if not taken:
            return []
        provider = _renter(base)
        ref = rent.ref()
        try:
            result = await self.upstreams.call(
                rent.provider, "rent_poll", lambda: provider.rent_poll(ref)
            )
        except ProviderError as exc:
            log.info(
                "rent poll id=%d provider=%s failed: %s",
                rent.id, rent.provider, type(exc).__name__,
            )  # fmt: skip
            return []
        new = await self.store.add_rent_messages(
            rent,
            result.messages,
            None if self.webhooks is None else self.webhooks.rent_rows(rent),
        )
        if result.closed and rent.state == RENT_ACTIVE:
            await self.store.set_rent_state(rent, RENT_EXPIRED, self.clock())
        return new

    async def abandoned(self, rent: Rent) -> None:
        """The client that rented ``rent`` left before its answer: cancel it upstream
        (its money comes back); if that fails, it stays in the key's getRentList and
        the operator is warned with its id."""
        try:
            await self.release(rent, cancel=True)
        except (ProviderError, RentClosed, CantCancel) as exc:
            log.warning(
                "rent id=%d provider=%s client left before its number was delivered:"
                " kept (cancel failed: %s), see getRentList",
                rent.id, rent.provider, type(exc).__name__,
            )  # fmt: skip
            return
        log.warning(
            "rent id=%d provider=%s client left before its number was delivered:"
            " cancelled upstream",
            rent.id, rent.provider,
        )  # fmt: skip

    async def release(self, rent: Rent, cancel: bool) -> None:
        """setRentStatus 1 (finish) or 2 (cancel). Raises RentClosed, CantCancel or
        ProviderError (the rent then stays as it was)."""
        if rent.state == RENT_ACTIVE and self.clock() >= rent.until:
            await self.store.set_rent_state(rent, RENT_EXPIRED, self.clock())
        if rent.state != RENT_ACTIVE:
            raise RentClosed(rent.state)
        if cancel and self.clock() - rent.created_at > CANCEL_WINDOW:
            raise CantCancel()
        provider = _renter(self.upstreams.providers[rent.provider])
        ref = rent.ref()
        await self.upstreams.call(
            rent.provider, "rent_release", lambda: provider.rent_release(ref)
        )
        state = RENT_CANCELLED if cancel else RENT_FINISHED
        await self.store.set_rent_state(rent, state, self.clock())

    async def prolong_price(self, rent: Rent, hours: int) -> Decimal:
        """What prolonging costs, display currency."""
        provider = _renter(self.upstreams.providers[rent.provider])
        ref = rent.ref()
        native = await self.upstreams.call(
            rent.provider, "prolong_price", lambda: provider.prolong_price(ref, hours)
        )
        return self.prices.display(rent.provider, native)

    async def prolong(self, key: KeyConfig, rent: Rent, hours: int) -> None:
        """Pay for ``hours`` more (attempt stored first, never retried blindly)."""
        if rent.state == RENT_ACTIVE and self.clock() >= rent.until:
            await self.store.set_rent_state(rent, RENT_EXPIRED, self.clock())
        if rent.state != RENT_ACTIVE:
            raise RentClosed(rent.state)
        price = await self.prolong_price(rent, hours)
        hold = await self.router.budgets.hold(key, price)  # NoBalance if it won't fit
        try:
            await self._prolong(key, rent, hours, price)
        finally:
            await self.router.budgets.release(hold)

    async def _prolong(
        self, key: KeyConfig, rent: Rent, hours: int, price: Decimal
    ) -> None:
        provider = _renter(self.upstreams.providers[rent.provider])
        ref = rent.ref()
        attempt = await self.store.begin_rent_attempt(
            key.key_id, rent.provider, "prolong", {"rent": rent.id}, hours,
            self.clock(), rent_id=rent.id,
        )  # fmt: skip
        try:
            until = await self.upstreams.call(
                rent.provider, "prolong", lambda: provider.prolong(ref, hours)
            )
        except UpstreamUncertain as exc:
            await self.store.end_rent_attempt(
                attempt, UNCERTAIN, exc.detail, self.clock()
            )
            log.error(
                "prolong rent id=%d provider=%s outcome unknown: not retried",
                rent.id, rent.provider,
            )  # fmt: skip
            raise
        except ProviderError as exc:
            await self.store.end_rent_attempt(
                attempt, REFUSED, type(exc).__name__, self.clock()
            )
            raise
        await self.store.end_rent_attempt(
            attempt, CONFIRMED, "", self.clock(), cost=price
        )
        await self.store.set_rent_state(rent, RENT_ACTIVE, self.clock(), until)


async def reconcile(rentals: Rentals) -> int:
    """Look upstream for rents whose purchase outcome was unknown; returns orphans.

    An unowned upstream rent is stored (cancelled) under the attempt's key and given
    back; one rent per attempt, so rents bought elsewhere on the account are spared.
    One server at a time runs a round (the store's ``rent-reconcile`` lease): two
    must never both take one upstream rent.
    """
    store = rentals.store
    if not await store.lease("rent-reconcile", RENT_RECONCILE_LEASE, rentals.clock()):
        return 0
    try:
        return await _reconcile_rents(rentals)
    finally:
        await store.end_lease("rent-reconcile")


async def _reconcile_rents(rentals: Rentals) -> int:
    store = rentals.store
    now = rentals.clock()
    orphans = 0
    for attempt in await store.rent_attempts([UNCERTAIN, PENDING]):
        if attempt.id in rentals._in_flight:
            continue
        if attempt.state == PENDING and now - attempt.created_at < 60:
            continue  # maybe a rent of this process between its record and its call
        base = rentals.upstreams.providers.get(attempt.provider)
        if base is None or not isinstance(base, Rental):
            continue
        service, country = attempt.order["service"], attempt.order["country"]
        try:
            found = await rentals.upstreams.call(
                attempt.provider,
                "rent_lookup",
                functools.partial(
                    base.rent_lookup, country, service, attempt.created_at - 60
                ),
            )
        except ProviderError as exc:
            log.info("rent reconcile lookup failed: %s", type(exc).__name__)
            continue
        if rentals.router.in_flight or rentals._in_flight:
            return orphans  # a concurrent buy could look like an orphan: next round
        known = await store.known_upstream_ids(attempt.provider)
        unknown = [p for p in found or [] if p.upstream_id not in known]
        if unknown:
            purchase = unknown[0]
            native = type(base).native_currency(base.options)
            rent = await store.complete_rent(
                attempt.id, attempt.key_id, attempt.provider, native, service,
                country, purchase, rentals.prices.display(attempt.provider, purchase.price),
                now,
            )  # fmt: skip
            await store.set_rent_state(rent, RENT_CANCELLED, now)
            await store.end_rent_attempt(
                attempt.id, RECONCILED, "orphan given back", now, purchase.price
            )
            log.warning(
                "rent reconcile provider=%s found an unowned rent: stored as rent"
                " id=%d (cancelled), giving it back",
                attempt.provider,
                rent.id,
            )
            orphans += 1
            try:
                await rentals.upstreams.call(
                    attempt.provider,
                    "rent_release",
                    functools.partial(base.rent_release, rent.ref()),
                )
            except ProviderError as exc:
                log.error(
                    "rent id=%d provider=%s could not be given back (%s): release it"
                    " on the account by hand",
                    rent.id,
                    attempt.provider,
                    type(exc).__name__,
                )
        elif found is None or now - attempt.created_at > RECONCILE_WINDOW:
            if found is None:
                log.error(
                    "provider=%s cannot list rents: rent attempt %d left unresolved,"
                    " check the account by hand",
                    attempt.provider,
                    attempt.id,
                )
            await store.end_rent_attempt(attempt.id, RECONCILED, "nothing found", now)
    return orphans


def _renter(provider: Provider) -> Rental:
    assert isinstance(provider, Rental)
    return provider


def _order_json(order: RentOrder) -> dict[str, object]:
    return {
        "service": order.service,
        "country": order.country,
        "hours": order.hours,
        "operators": list(order.operators),
    }
