"""The catalog: what each provider sells, and what a key can spend.

One cache (:class:`TtlCache`, one TTL: ``catalog_ttl``) holds every provider's offers
(and rentals' offers), served stale while a background refresh fetches the next. The
providers' own ``catalog()`` always asks upstream; ``quote()`` stays fresh.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from compat_server.budget import Budgets
from compat_server.config import Config, KeyConfig
from compat_server.routing import Prices, Upstreams
from providers.base import Provider
from providers.vocabulary import (
    BACKGROUND,
    BUDGET,
    CLIENT,
    Budget,
    Clock,
    Offer,
    ProviderError,
    UpstreamUnreachable,
)


def key_providers(config: Config, key: KeyConfig) -> list[str]:
    """Every provider a key can reach (its list, then its routes'), no repeats."""
    names = list(key.providers)
    for route in (*key.routes, *config.routes):
        names.extend(route.providers)
    return list(dict.fromkeys(names))


class TtlCache:
    """Async results cached per key for ``ttl`` seconds, served stale while refreshed.

    A fresh value is returned as is. An expired one is returned at once while a
    background refresh (lowest priority, no client deadline) fetches the next; only a
    key never loaded makes its caller wait, and never past ``wait`` seconds or the
    caller's deadline. Concurrent misses share one load, which runs detached from the
    request that started it, so a client that leaves wastes no upstream call. A failed
    load keeps the last good value (retried after ``failure_ttl``), else ``default``.
    """

    def __init__(self, ttl: float, clock: Clock, failure_ttl: float = 5.0) -> None:
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.clock = clock
        self._values: dict[Any, tuple[float, Any]] = {}  # key -> (fresh until, value)
        self._inflight: dict[Any, asyncio.Task[Any]] = {}

    async def get(
        self,
        key: Any,
        load: Callable[[], Awaitable[Any]],
        default: Any,
        *,
        priority: int = CLIENT,
        wait: float = math.inf,
    ) -> Any:
        """The cached value (fresh or stale), or the first ``load()``; else ``default``."""
        hit = self._values.get(key)
        if hit is not None:
            if hit[0] <= self.clock():
                self._start(key, load, default, BACKGROUND)
            return hit[1]
        task = self._start(key, load, default, priority)
        timeout = min(wait, BUDGET.get().deadline - time.monotonic())
        try:
            return await asyncio.wait_for(
                asyncio.shield(task), None if math.isinf(timeout) else max(0, timeout)
            )
        except TimeoutError:
            return default  # the load goes on and fills the cache for the next caller

    def _start(
        self,
        key: Any,
        load: Callable[[], Awaitable[Any]],
        default: Any,
        priority: int,
    ) -> asyncio.Task[Any]:
        task = self._inflight.get(key)
        if task is None:
            context = contextvars.copy_context()
            context.run(BUDGET.set, Budget(priority=priority))  # no client's deadline
            task = asyncio.get_running_loop().create_task(
                self._load(key, load, default), context=context
            )
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return task

    async def _load(
        self, key: Any, load: Callable[[], Awaitable[Any]], default: Any
    ) -> Any:
        try:
            value = await load()
        except ProviderError:
            previous = self._values.get(key)
            kept = default if previous is None else previous[1]
            self._values[key] = (self.clock() + self.failure_ttl, kept)
            return kept
        self._values[key] = (self.clock() + self.ttl, value)
        return value


class Catalog:
    """Offers per provider and country (cached), and balances per key."""

    def __init__(
        self,
        config: Config,
        upstreams: Upstreams,
        prices: Prices,
        budgets: Budgets,
        clock: Clock,
    ) -> None:
        self.config = config
        self.upstreams = upstreams
        self.prices = prices
        self.budgets = budgets
        self.clock = clock
        self.cache = TtlCache(config.catalog_ttl, clock)

    @property
    def providers(self) -> Mapping[str, Provider]:
        """Configured providers by name."""
        return self.upstreams.providers

    def reset(self, config: Config) -> None:
        """A reloaded config: a new TTL, and nothing cached under the old accounts."""
        self.config = config
        self.cache = TtlCache(config.catalog_ttl, self.clock)

    async def offers(
        self, name: str, country: int, priority: int = CLIENT
    ) -> list[Offer]:
        """A provider's offers in a country (cached, stale while refreshed; [] if none).

        ``priority`` BACKGROUND is for sweeps no client waits on (getPrices without a
        country), so they never hold up purchases, polls or balances.
        """
        provider = self.providers[name]
        if country not in provider.countries():
            return []
        result: list[Offer] = await self.cache.get(
            (name, country),
            lambda: self.upstreams.call(
                name, "catalog", lambda: provider.catalog(country)
            ),
            [],
            priority=priority,
        )
        return result

    async def balance(self, key: KeyConfig) -> Decimal:
        """Money the key can spend, in the display currency (sum over its providers).

        Raises the last ProviderError when no provider answers.
        """
        left = await self.budgets.left(key)
        if left is not None:
            return left  # a key with a budget sees what is left of it
        if not key.show_upstream_balance:
            return Decimal(0)
        names = key_providers(self.config, key)
        answers = await asyncio.gather(
            *(
                self.upstreams.call(n, "balance", self.providers[n].balance)
                for n in names
            ),
            return_exceptions=True,
        )
        total = Decimal(0)
        failure: BaseException | None = None
        answered = False
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                failure = answer
                continue
            answered = True
            total += answer * self.prices.balance_factor(name)
        if not answered:
            if isinstance(failure, ProviderError):
                raise failure
            raise UpstreamUnreachable("route", "no provider answered")
        return total
