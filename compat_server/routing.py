"""Provider health (circuit breakers), guarded upstream calls, and getNumber routing.

A purchase is paid, so :class:`Router` follows one rule: move to the next provider only
on a definite refusal or when the request provably never left; once a buy may have
reached an upstream, stop, record the attempt as uncertain for the reconciler, and answer
NO_NUMBERS.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from typing import TypeVar

from compat_server.budget import Budgets
from compat_server.config import Config, KeyConfig, RouteConfig
from compat_server.store import (
    CANCELLED,
    REFUSED,
    UNCERTAIN,
    Activation,
    NewActivation,
    Store,
    StoreError,
)
from providers.base import Provider
from providers.vocabulary import (
    BACKGROUND,
    BUDGET,
    CLIENT,
    PAID,
    ChannelsLimit,
    Clock,
    NoBalance,
    NoNumbers,
    NotSent,
    Offer,
    Order,
    ProviderError,
    Purchase,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

log = logging.getLogger("compat_server")
T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

# Upstream operations that spend or give back money, and the fresh price check right
# before a paid call: paced ahead of everything else.
PAID_OPS = frozenset(
    {"quote", "buy", "cancel", "finish", "retry", "reactivate", "rent", "prolong",
     "rent_release"}
)  # fmt: skip


def priority_of(op: str, current: int) -> int:
    """The pacing priority of one upstream operation started with ``current``."""
    if op in PAID_OPS:
        return PAID
    if op == "lookup":
        return BACKGROUND
    return max(current, CLIENT)


class Breaker:
    """Circuit breaker: ``failures`` in a row open it for ``cooldown`` s; one probe decides."""

    def __init__(
        self,
        name: str,
        failures: int,
        cooldown: float,
        clock: Clock,
        on_change: Callable[[Breaker], None] | None = None,
    ) -> None:
        self.name = name
        self.on_change = on_change
        self.threshold = max(1, failures)
        self.cooldown = cooldown
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open, only the single probe may)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() - self.opened_at >= self.cooldown:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        """The upstream answered (even with a refusal)."""
        self.failures = 0
        self._probing = False
        if self.state != CLOSED:
            self._set(CLOSED)

    def release(self) -> None:
        """The call allowed by :meth:`allow` was never sent: nothing learned."""
        self._probing = False

    def failure(self) -> None:
        """The upstream did not answer usefully."""
        self.failures += 1
        self._probing = False
        if self.state == HALF_OPEN or (
            self.state == CLOSED and self.failures >= self.threshold
        ):
            self.opened_at = self.clock()
            self._set(OPEN)

    def _set(self, state: str) -> None:
        log.warning("provider=%s circuit %s -> %s", self.name, self.state, state)
        self.state = state
        if self.on_change is not None:
            self.on_change(self)


class Upstreams:
    """The providers, each behind its breaker; every call is timed and logged."""

    def __init__(
        self,
        config: Config,
        providers: Mapping[str, Provider],
        clock: Clock,
        on_change: Callable[[Breaker], None] | None = None,
    ) -> None:
        self.config = config
        self.providers = dict(providers)
        self.breakers = {
            name: Breaker(
                name, config.breaker_failures, config.breaker_cooldown, clock, on_change
            )
            for name in providers
        }
        # (provider, op, outcome, seconds) of every call, for /metrics
        self.observe: Callable[[str, str, str, float], None] | None = None

    async def call(self, name: str, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one provider operation; the breaker sees the outcome.

        Raises ProviderError only: an unexpected exception inside a provider is logged
        and becomes UpstreamUncertain (so a buy that crashed is never retried).
        """
        breaker = self.breakers[name]
        if not breaker.allow():
            raise UpstreamUnreachable(name, "circuit open")
        started = time.perf_counter()
        outcome = "ok"
        budget = BUDGET.get()
        priority = priority_of(op, budget.priority)
        if priority != budget.priority:  # replace() costs more than the rest of this
            budget = replace(budget, priority=priority)
        scope = BUDGET.set(budget)
        try:
            result = await fn()
        except NotSent as exc:
            # nothing was sent: not the upstream's fault, the breaker is not told
            # (a half-open probe that never went out leaves the probe to the next call)
            breaker.release()
            outcome = f"NotSent({exc.detail})"
            raise
        except (UpstreamUnreachable, UpstreamUncertain) as exc:
            breaker.failure()
            outcome = type(exc).__name__
            raise
        except UpstreamAuth:
            breaker.failure()
            outcome = "UpstreamAuth"
            log.error(
                "provider=%s rejected our credentials: fix providers.%s in the config",
                name,
                name,
            )
            raise
        except ProviderError as exc:
            breaker.success()
            outcome = type(exc).__name__
            raise
        except Exception as exc:
            breaker.failure()
            outcome = "bug"
            log.exception("provider=%s op=%s raised unexpectedly", name, op)
            raise UpstreamUncertain(name, type(exc).__name__) from exc
        else:
            breaker.success()
            return result
        finally:
            BUDGET.reset(scope)
            elapsed = time.perf_counter() - started
            if self.observe is not None:
                self.observe(name, op, outcome, elapsed)
            log.debug(
                "upstream provider=%s op=%s outcome=%s ms=%.1f",
                name,
                op,
                outcome,
                elapsed * 1000,
            )


class Prices:
    """Converts native prices to what clients see (rate to the display currency, markup)."""

    def __init__(self, config: Config, providers: Mapping[str, Provider]) -> None:
        self.config = config
        self.providers = providers

    def factor(self, name: str) -> Decimal:
        """Native amount x factor = display amount, markup included."""
        provider = self.providers[name]
        native = type(provider).native_currency(provider.options)
        return self.config.rate(native) * self.config.providers[name].markup

    def balance_factor(self, name: str) -> Decimal:
        """Native balance x factor = display balance (no markup on money held)."""
        provider = self.providers[name]
        return self.config.rate(type(provider).native_currency(provider.options))

    def display(self, name: str, native: Decimal) -> Decimal:
        """A native price as clients see it, rounded to cents."""
        return (native * self.factor(name)).quantize(Decimal("0.01"))


class Router:
    """getNumber: pick the route, try its providers safely, store the purchase."""

    def __init__(
        self,
        config: Config,
        store: Store,
        upstreams: Upstreams,
        prices: Prices,
        budgets: Budgets,
        offers: Callable[[str, int], Awaitable[list[Offer]]],
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.upstreams = upstreams
        self.prices = prices
        self.offers = offers
        self.clock = clock
        self.budgets = budgets
        self.in_flight: dict[int, str] = {}  # attempt id -> provider, while buy() runs
        self.wake_outbox: Callable[[], None] = lambda: None  # a cancel was queued

    def route(self, key: KeyConfig, service: str, country: int) -> RouteConfig:
        """The first matching route of the key, then the global ones, else the key's list."""
        for route in (*key.routes, *self.config.routes):
            if route.matches(service, country):
                return route
        return RouteConfig(providers=key.providers)

    async def candidates(self, route: RouteConfig, order: Order) -> list[str]:
        """Providers to try, in order (``cheapest`` sorts by display price)."""
        names = [
            n
            for n in route.providers
            if order.country in self.upstreams.providers[n].countries()
        ]
        if route.strategy != "cheapest" and order.max_price is None:
            return names
        priced: list[tuple[Decimal, int, str]] = []
        for index, name in enumerate(names):
            price = await self._display_price(name, order)
            if (
                order.max_price is not None
                and price is not None
                and price > order.max_price
            ):
                continue  # dearer than the client accepts: a definite "no" without a call
            sort_key = (
                price
                if (price is not None and route.strategy == "cheapest")
                else Decimal("Infinity")
            )
            priced.append((sort_key, index, name))
        return [name for _, _, name in sorted(priced)]

    async def _display_price(self, name: str, order: Order) -> Decimal | None:
        for offer in await self.offers(name, order.country):
            if offer.service == order.service:
                return self.prices.display(name, offer.price)
        return None

    async def buy(self, key: KeyConfig, order: Order) -> Activation:
        """Buy one number for ``key``; the activation is durable when this returns."""
        route = self.route(key, order.service, order.country)
        refusals: list[ProviderError] = []
        for name in await self.candidates(route, order):
            provider = self.upstreams.providers[name]
            native = order
            if order.max_price is not None:
                native = replace(
                    order, max_price=order.max_price / self.prices.factor(name)
                )
            quoted: Decimal | None = None  # native price asked right before buying
            if order.max_price is not None or key.budget is not None:
                refusal, quoted = await self._quote(name, provider, order, native)
                if refusal is not None:
                    refusals.append(refusal)
                    continue
            price_of = self._native_price
            if quoted is not None:
                price_of = functools.partial(_known_price, quoted)
            try:  # a key's budget and max_active: money is held before the paid call
                hold = await self.budgets.reserve(key, name, native, price_of)
            except NoBalance as exc:
                refusals.append(exc)
                continue
            native = replace(native, max_price=hold.cap(native.max_price))
            try:
                attempt = await self.store.begin_purchase(
                    key.key_id, name, native, self.clock()
                )
            except StoreError as exc:  # nothing may be bought unrecorded
                await self.budgets.release(hold)
                raise NoNumbers("store", str(exc)) from exc
            except BaseException:
                await self.budgets.release(hold)
                raise
            # in flight until the activation is stored: the reconciler must never take
            # a number this buy is about to own for an orphan
            self.in_flight[attempt] = name
            try:
                purchase = await self._buy_once(
                    name, provider, native, attempt, refusals
                )
                if purchase is None:
                    continue
                purchase = self._sane_price(name, purchase, quoted)
                limit = order.max_price  # what the client, and its budget, allow
                if key.budget is not None:
                    limit = hold.amount if limit is None else min(limit, hold.amount)
                if await self._cancelled_over_limit(
                    key, name, provider, order, purchase, attempt, refusals, limit
                ):
                    continue
                bought = NewActivation(
                    key.key_id,
                    name,
                    type(provider).native_currency(provider.options),
                    order,
                    purchase,
                    self.prices.display(name, purchase.price),
                    self.clock(),
                    self.config.lifetime,
                )
                stored = await self.store.complete_purchase(
                    attempt,
                    bought,
                    hold=True,  # paid: if the store fails, memory keeps it
                )
                if not stored.is_open:
                    # another server sharing the store took this one for dead while
                    # the call ran, and closed the number (its cancel is queued):
                    # nothing to hand out from it
                    refusals.append(
                        NoNumbers(name, f"closed meanwhile as id={stored.id}")
                    )
                    continue
                return stored
            finally:
                self.in_flight.pop(attempt, None)
                await self.budgets.release(hold)
        raise merge_refusals(refusals)

    async def _quote(
        self, name: str, provider: Provider, order: Order, native: Order
    ) -> tuple[ProviderError | None, Decimal | None]:
        """Ask the upstream for the price now, right before buying (a limit or a
        budget needs it: a catalogue cached minutes ago says nothing about what the
        next paid call costs).

        Returns (refusal, None) when nothing may be bought: the price is above the
        client's limit, the service is no longer sold, or the quote failed; else
        (None, the native price).
        """
        try:
            offer = await self.upstreams.call(
                name, "quote", functools.partial(provider.quote, native)
            )
        except ProviderError as exc:
            log.info("buy provider=%s quote failed (%s)", name, type(exc).__name__)
            if isinstance(exc, UpstreamUncertain):  # read-only: nothing was bought
                return UpstreamUnreachable(name, f"quote: {exc.detail}"), None
            return exc, None
        if offer is None:
            return NoNumbers(name, "no longer on sale"), None
        price = self.prices.display(name, offer.price)
        if order.max_price is not None and price > order.max_price:
            log.info(
                "buy provider=%s price now %s above maxPrice %s: not bought",
                name,
                price,
                order.max_price,
            )
            return NoNumbers(name, f"price {price} above {order.max_price}"), None
        return None, offer.price

    def _sane_price(
        self, name: str, purchase: Purchase, quoted: Decimal | None
    ) -> Purchase:
        """A purchase whose reported price is negative keeps the quoted one (or 0):
        no upstream pays us for a number, and a negative cost would grow a budget."""
        if purchase.price >= 0:
            return purchase
        log.warning(
            "buy provider=%s upstream_id=%s reported a negative price %s: %s stored",
            name,
            purchase.upstream_id,
            purchase.price,
            quoted if quoted is not None else 0,
        )
        return replace(purchase, price=quoted if quoted is not None else Decimal(0))

    async def _cancelled_over_limit(
        self,
        key: KeyConfig,
        name: str,
        provider: Provider,
        order: Order,
        purchase: Purchase,
        attempt: int,
        refusals: list[ProviderError],
        limit: Decimal | None,
    ) -> bool:
        """A number that cost more than ``limit`` (the client's maxPrice, or what its
        key's budget held): cancelled if the upstream can.

        True when it was stored as cancelled (its upstream cancel queued) and the
        route goes on. A number that cannot be cancelled is paid for whatever we do,
        so it goes to the client (who at least gets what was paid for) with a
        warning; the cost stored is what was charged.
        """
        if limit is None:
            return False
        cost = self.prices.display(name, purchase.price)
        if cost <= limit:
            return False
        if not type(provider).can_cancel:
            log.warning(
                "buy provider=%s upstream_id=%s charged %s above the limit %s after"
                " its quote; it cannot be cancelled, so the client gets it",
                name,
                purchase.upstream_id,
                cost,
                limit,
            )
            return False
        bought = NewActivation(
            key.key_id,
            name,
            type(provider).native_currency(provider.options),
            order,
            purchase,
            cost,
            self.clock(),
            self.config.lifetime,
            state=CANCELLED,
        )
        activation = await self.store.complete_purchase(attempt, bought)
        await self.store.enqueue(activation.id, "cancel", self.clock())
        self.wake_outbox()
        log.warning(
            "buy provider=%s charged %s above the limit %s: stored as id=%d, cancel"
            " queued",
            name,
            cost,
            limit,
            activation.id,
        )
        refusals.append(NoNumbers(name, f"charged {cost} above {limit}"))
        return True

    async def _native_price(self, name: str, order: Order) -> Decimal | None:
        for offer in await self.offers(name, order.country):
            if offer.service == order.service:
                return offer.price
        return None

    async def _buy_once(
        self,
        name: str,
        provider: Provider,
        order: Order,
        attempt: int,
        refusals: list[ProviderError],
    ) -> Purchase | None:
        """One paid call: the Purchase, or None after a definite refusal (recorded).

        Raises NoNumbers when the outcome is unknown: the route stops there.
        """
        try:
            return await self.upstreams.call(
                name, "buy", functools.partial(provider.buy, order)
            )
        except (
            NoNumbers,
            NoBalance,
            UnknownService,
            UpstreamUnreachable,
            UpstreamAuth,
        ) as exc:
            await self._end_purchase(attempt, REFUSED, type(exc).__name__, self.clock())
            refusals.append(exc)
            log.info(
                "buy provider=%s refused=%s, trying next", name, type(exc).__name__
            )
            return None
        except UpstreamUncertain as exc:
            await self._end_purchase(attempt, UNCERTAIN, exc.detail, self.clock())
            log.warning(
                "buy provider=%s outcome unknown (%s): not retried, queued for"
                " reconciliation as attempt %d",
                name,
                exc.detail,
                attempt,
            )
            raise NoNumbers(name, "purchase outcome unknown") from exc

    async def _end_purchase(
        self, attempt: int, state: str, detail: str, now: float
    ) -> None:
        # nothing was bought or the attempt stays open for the reconciler either way:
        # a store that cannot record it must not turn the answer into ERROR_SQL
        try:
            await self.store.end_purchase(attempt, state, detail, now)
        except StoreError:
            pass


async def _known_price(price: Decimal, name: str, order: Order) -> Decimal | None:
    """A price_of for Budgets.reserve that answers the price just quoted."""
    return price


def merge_refusals(refusals: Sequence[ProviderError]) -> ProviderError:
    """One answer for a route where every provider said no."""
    kinds = {type(r) for r in refusals}
    if kinds == {ChannelsLimit}:
        return ChannelsLimit("route", "waiting-numbers limit reached")
    if kinds and kinds <= {UnknownService}:
        return UnknownService("route", "no provider offers it")
    if NoBalance in kinds and NoNumbers not in kinds:
        return NoBalance("route", "no provider can pay")
    return NoNumbers("route", "no provider has numbers")
