"""getExtraActivation / checkExtraActivation: a new order on a number that already
worked, where the backend offers it (thuecodesim re-rents with ``number=``).

Paid like getNumber: the attempt is stored before the call, a definite refusal buys
nothing, an unknown outcome is left to the reconciler and never retried.
"""

from __future__ import annotations

import functools
import logging
from decimal import Decimal

from compat_server.catalog import Catalog
from compat_server.config import Config, KeyConfig
from compat_server.routing import Prices, Router, Upstreams
from compat_server.store import (
    CODE,
    FINISHED,
    REFUSED,
    UNCERTAIN,
    Activation,
    NewActivation,
    Store,
)
from providers.vocabulary import (
    Clock,
    NoBalance,
    NoNumbers,
    Order,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

log = logging.getLogger("compat_server")


class NotReactivatable(Exception):
    """The parent cannot be re-activated (backend, or its state)."""


class Reactivation:
    """Extra activations on a parent's number, paid like getNumber."""

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

    def can_reactivate(self, parent: Activation) -> bool:
        """The parent's backend offers it, and the number did receive a code."""
        provider = self.upstreams.providers.get(parent.provider)
        got_code = bool(parent.messages) and parent.state in (FINISHED, CODE)
        return provider is not None and provider.can_reactivate and got_code

    async def price(self, parent: Activation) -> Decimal:
        """The display price of a new order for the parent's service and country."""
        for offer in await self.catalog.offers(parent.provider, parent.country):
            if offer.service == parent.service:
                return self.prices.display(parent.provider, offer.price)
        return parent.cost

    async def reactivate(self, key: KeyConfig, parent: Activation) -> Activation:
        """Buy a new order on the parent's number; stored before this returns.

        Raises NotReactivatable, NoBalance or NoNumbers (also for an unknown outcome).
        """
        if not self.can_reactivate(parent):
            raise NotReactivatable()
        order = Order(service=parent.service, country=parent.country)
        # one paid re-rent of a number at a time: concurrent calls on one parent queue
        async with self.store.lock(parent.id):
            # a key's budget holds for extra activations too: money set aside first
            hold = await self.router.budgets.hold(
                key, await self.price(parent) if key.budget is not None else None
            )
            try:
                return await self._reactivate(key, parent, order)
            finally:
                await self.router.budgets.release(hold)

    async def _reactivate(
        self, key: KeyConfig, parent: Activation, order: Order
    ) -> Activation:
        name = parent.provider
        provider = self.upstreams.providers[name]
        attempt = await self.store.begin_purchase(key.key_id, name, order, self.clock())
        self.router.in_flight[attempt] = name
        try:
            try:
                purchase = await self.upstreams.call(
                    name,
                    "reactivate",
                    functools.partial(provider.reactivate, parent.ref()),
                )
            except (NoNumbers, NoBalance, UnknownService, UpstreamUnreachable,
                    UpstreamAuth) as exc:  # fmt: skip
                await self.store.end_purchase(
                    attempt, REFUSED, type(exc).__name__, self.clock()
                )
                raise
            except UpstreamUncertain as exc:
                await self.store.end_purchase(
                    attempt, UNCERTAIN, exc.detail, self.clock()
                )
                log.warning(
                    "reactivate id=%d provider=%s outcome unknown: not retried, attempt %d"
                    " left to the reconciler",
                    parent.id, name, attempt,
                )  # fmt: skip
                raise NoNumbers(name, "reactivation outcome unknown") from exc
            bought = NewActivation(
                key.key_id, name, type(provider).native_currency(provider.options), order,
                purchase, self.prices.display(name, purchase.price), self.clock(),
                self.config.lifetime,
            )  # fmt: skip
            activation = await self.store.complete_purchase(
                attempt,
                bought,
                hold=True,  # paid: memory keeps it if the store fails
            )
        finally:
            self.router.in_flight.pop(attempt, None)
        log.info(
            "reactivate id=%d -> id=%d provider=%s", parent.id, activation.id, name
        )
        return activation
