"""The catalog: what each provider sells, and what a key can spend.

One cache (:class:`TtlCache`, one TTL: ``catalog_ttl``) holds every provider's offers
(and rentals' offers), served stale while a background refresh fetches the next. The
providers' own ``catalog()`` always asks upstream; ``quote()`` stays fresh.

:class:`Answers` keeps catalogue answers already rendered (opaque bytes the dialect
made) with the :class:`Reads` of the cache they were built from: an answer is reused
while every entry it read is still the one in the cache and still fresh, so it is
rendered again exactly when the catalog changes (a refresh lands, an entry expires, a
country that was missing comes in).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from decimal import Decimal
from typing import Any, Generic, TypeVar

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


class Reads:
    """The cache entries one answer was built from (see :class:`Answers`)."""

    __slots__ = ("entries", "volatile")

    def __init__(self) -> None:
        # (the cache's values, key, stamp of the entry read (None: there was none
        # yet), fresh until): stamps, not the values, so nothing old is kept alive
        self.entries: list[tuple[dict[Any, Any], Any, int | None, float]] = []
        self.volatile = False  # built from something outside the cache: never reused

    def note(self, values: dict[Any, Any], key: Any, at: int = -1) -> None:
        """Note the entry ``values`` holds for ``key`` (at index ``at``: replace)."""
        entry = values.get(key)
        noted = (
            (values, key, None, math.inf)
            if entry is None
            else (values, key, entry[2], entry[0])
        )
        if at < 0:
            self.entries.append(noted)
        else:
            self.entries[at] = noted

    def fresh(self, now: float) -> bool:
        """Whether every entry read is still the cache's, and none has expired."""
        if self.volatile:
            return False
        for values, key, stamp, until in self.entries:
            entry = values.get(key)
            if (None if entry is None else entry[2]) != stamp or until <= now:
                return False
        return True


# the Reads of the answer being built in this task (and the tasks it starts)
READS: contextvars.ContextVar[Reads | None] = contextvars.ContextVar(
    "catalog_reads", default=None
)


def volatile() -> None:
    """The answer being built uses data the cache does not hold: never reuse it."""
    reads = READS.get()
    if reads is not None:
        reads.volatile = True


A = TypeVar("A")

ANSWERS_MAX = 512  # rendered answers kept at most (least recently used go first)
ANSWERS_MAX_BYTES = 64 * 1024 * 1024


class Answers(Generic[A]):
    """Rendered answers by request key, reused while their :class:`Reads` are fresh.

    The key must hold everything the answer depends on besides the catalog (the
    action, the parameters that matter, the api key): nothing leaks across keys.
    """

    def __init__(
        self, max_entries: int = ANSWERS_MAX, max_bytes: int = ANSWERS_MAX_BYTES
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._kept: OrderedDict[Hashable, tuple[A, int, Reads]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.renders = 0

    def get(self, key: Hashable, now: float) -> A | None:
        """The answer kept for ``key`` if the catalog has not changed since."""
        kept = self._kept.get(key)
        if kept is None:
            return None
        if not kept[2].fresh(now):
            self._drop(key)
            return None
        self._kept.move_to_end(key)
        self.hits += 1
        return kept[0]

    def put(self, key: Hashable, answer: A, size: int, reads: Reads) -> None:
        """Keep ``answer`` (``size`` bytes) built from ``reads``."""
        self.renders += 1
        if reads.volatile or size > self.max_bytes:
            return
        self._drop(key)
        self._kept[key] = (answer, size, reads)
        self._bytes += size
        while len(self._kept) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._kept)))

    def _drop(self, key: Hashable) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self._bytes -= kept[1]

    def __len__(self) -> int:
        return len(self._kept)


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
        # key -> (fresh until, value, stamp: which load stored it)
        self._values: dict[Any, tuple[float, Any, int]] = {}
        self._stamps = 0
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
        """The cached value (fresh or stale), or the first ``load()``; else ``default``.

        An answer being built (:data:`READS`) notes the entry it got, or that there
        was none yet: either changing makes that answer stale.
        """
        hit = self._values.get(key)
        reads = READS.get()
        noted = -1
        if reads is not None:
            noted = len(reads.entries)  # entries are only ever appended
            reads.note(self._values, key)
        if hit is not None:
            if hit[0] <= self.clock():
                self._start(key, load, default, BACKGROUND)
            return hit[1]
        task = self._start(key, load, default, priority)
        timeout = min(wait, BUDGET.get().deadline - time.monotonic())
        try:
            value = await asyncio.wait_for(
                asyncio.shield(task), None if math.isinf(timeout) else max(0, timeout)
            )
        except TimeoutError:
            return default  # the load goes on and fills the cache for the next caller
        if reads is not None:  # the answer holds what was loaded, not the gap
            reads.note(self._values, key, noted)
        return value

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
            context.run(READS.set, None)  # a load belongs to no answer
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
            self._stamps += 1
            self._values[key] = (self.clock() + self.failure_ttl, kept, self._stamps)
            return kept
        self._stamps += 1
        self._values[key] = (self.clock() + self.ttl, value, self._stamps)
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
        self.answers: Answers[Any] = Answers()  # rendered catalogue answers

    @property
    def providers(self) -> Mapping[str, Provider]:
        """Configured providers by name."""
        return self.upstreams.providers

    def reset(self, config: Config) -> None:
        """A reloaded config: a new TTL, and nothing cached under the old accounts."""
        self.config = config
        self.cache = TtlCache(config.catalog_ttl, self.clock)
        self.answers = Answers()  # keys, markups and rates may all have changed

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
