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

from compat_server.config import Config, KeyConfig, RouteConfig
from compat_server.errors import (
    NoBalance,
    NoNumbers,
    ProviderError,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)
from compat_server.store import REFUSED, UNCERTAIN, Activation, Store, StoreError
from providers.base import Clock, Offer, Order, Provider, Purchase

log = logging.getLogger("compat_server")
T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


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
        try:
            result = await fn()
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
            log.debug(
                "upstream provider=%s op=%s outcome=%s ms=%.1f",
                name,
                op,
                outcome,
                (time.perf_counter() - started) * 1000,
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
        offers: Callable[[str, int], Awaitable[list[Offer]]],
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.upstreams = upstreams
        self.prices = prices
        self.offers = offers
        self.clock = clock
        self.in_flight: dict[int, str] = {}  # attempt id -> provider, while buy() runs

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
            try:
                attempt = await self.store.begin_purchase(
                    key.key_id, name, native, self.clock()
                )
            except StoreError as exc:  # nothing may be bought unrecorded
                raise NoNumbers("store", str(exc)) from exc
            # in flight until the activation is stored: the reconciler must never take
            # a number this buy is about to own for an orphan
            self.in_flight[attempt] = name
            try:
                purchase = await self._buy_once(
                    name, provider, native, attempt, refusals
                )
                if purchase is None:
                    continue
                return await self.store.complete_purchase(
                    attempt,
                    key.key_id,
                    name,
                    type(provider).native_currency(provider.options),
                    order,
                    purchase,
                    self.prices.display(name, purchase.price),
                    self.clock(),
                    self.config.lifetime,
                    hold=True,  # paid: if the store fails now, memory keeps it
                )
            finally:
                self.in_flight.pop(attempt, None)
        raise merge_refusals(refusals)

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


def merge_refusals(refusals: Sequence[ProviderError]) -> ProviderError:
    """One answer for a route where every provider said no."""
    kinds = {type(r) for r in refusals}
    if kinds and kinds <= {UnknownService}:
        return UnknownService("route", "no provider offers it")
    if NoBalance in kinds and NoNumbers not in kinds:
        return NoBalance("route", "no provider can pay")
    return NoNumbers("route", "no provider has numbers")
