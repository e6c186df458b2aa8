"""The composition of the rooms behind the dialect.

:class:`Engine` builds the rooms (catalog, routing, lifecycle, outbox, reconciler,
rentals, webhooks, reactivation) over one store and one set of providers, each
given its collaborators; handlers receive the rooms (``actions.Call.of``), not the
Engine. Each room lives in its own module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from compat_server.batch import BatchPoller
from compat_server.budget import Budgets
from compat_server.catalog import Catalog, TtlCache, key_providers
from compat_server.config import Config, KeyConfig
from compat_server.lifecycle import (
    POLL_WAIT,
    PRUNE_AFTER,
    RETRY_FLIGHT,
    Lifecycle,
    StatusView,
)
from compat_server.outbox import INLINE_TIMEOUT, RETRYABLE, Outbox
from compat_server.reactivation import Reactivation
from compat_server.reconciler import CLAIM_SLACK, RECONCILE_WINDOW, Reconciler
from compat_server.rentals import Rentals
from compat_server.routing import Breaker, Prices, Router, Upstreams
from compat_server.store import Activation, Store
from compat_server.webhooks import Webhooks
from providers.base import Provider
from providers.vocabulary import Clock, Order

__all__ = [
    "CLAIM_SLACK",
    "INLINE_TIMEOUT",
    "POLL_WAIT",
    "PRUNE_AFTER",
    "RECONCILE_WINDOW",
    "RETRYABLE",
    "RETRY_FLIGHT",
    "Engine",
    "StatusView",
    "TtlCache",
]

log = logging.getLogger("compat_server")


class Engine:
    """Everything behind the dialect: purchases, lifecycle, catalog, background work."""

    def __init__(
        self,
        config: Config,
        store: Store,
        providers: Mapping[str, Provider],
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.upstreams = Upstreams(config, providers, clock, self._breaker_changed)
        # thuecodesim cannot cancel: what its cancelled numbers cost stays spent
        store.set_unrefunded(
            frozenset(n for n, p in providers.items() if not type(p).can_cancel)
        )
        self._background: set[asyncio.Future[None]] = set()
        self.prices = Prices(config, providers)
        budgets = Budgets(store, self.prices, clock)
        self.catalog = Catalog(config, self.upstreams, self.prices, budgets, clock)
        self.router = Router(
            config,
            store,
            self.upstreams,
            self.prices,
            budgets,
            self.catalog.offers,
            clock,
        )
        self.outbox = Outbox(config, store, self.upstreams, clock)
        self.router.wake_outbox = self.outbox.wake.set  # an over-limit buy's cancel
        self.on_purchase: Callable[[KeyConfig, Activation], None] | None = None
        self.rentals = Rentals(
            config, store, self.upstreams, self.prices, self.catalog, self.router, clock
        )
        self.webhooks = Webhooks(config, store, clock)
        self.rentals.webhooks = self.webhooks  # a rent's new SMS become deliveries
        self.lifecycle = Lifecycle(
            config,
            store,
            self.upstreams,
            self.router,
            self.catalog,
            self.prices,
            self.outbox,
            self.webhooks,
            clock,
        )
        self.webhooks.refresh_activation = self.lifecycle.refresh
        self.batch = BatchPoller(store, self.upstreams, self.lifecycle, clock)
        self.webhooks.refresh_rent = self.rentals.refresh
        self.reactivation = Reactivation(
            config, store, self.upstreams, self.prices, self.catalog, self.router, clock
        )
        self.reconciler = Reconciler(
            config, store, self.upstreams, self.router, self.outbox, clock
        )

    @property
    def providers(self) -> Mapping[str, Provider]:
        """Configured providers by name."""
        return self.upstreams.providers

    def key_providers(self, key: KeyConfig) -> list[str]:
        """Every provider a key can reach (its list, then its routes'), no repeats."""
        return key_providers(self.config, key)

    async def buy(self, key: KeyConfig, order: Order) -> Activation:
        """Buy a number for the key (see Router.buy)."""
        activation = await self.router.buy(key, order)
        if self.on_purchase is not None:
            try:  # bookkeeping: a number bought and stored is answered whatever it does
                self.on_purchase(key, activation)
            except Exception:
                log.exception("id=%d purchase hook failed", activation.id)
        return activation

    def _breaker_changed(self, breaker: Breaker) -> None:
        """Persist a circuit change so ``check-config --ping`` can show it."""
        future = asyncio.ensure_future(
            self.store.save_health(
                breaker.name, breaker.state, breaker.failures, self.clock()
            )
        )
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def health(self) -> dict[str, str]:
        """Circuit state per provider."""
        return {name: b.state for name, b in self.upstreams.breakers.items()}
