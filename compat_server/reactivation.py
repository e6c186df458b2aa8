"""getExtraActivation / checkExtraActivation: a new order on a number that already
worked, where the backend offers it (thuecodesim re-rents with ``number=``).

Paid like getNumber: the attempt is stored before the call, a definite refusal buys
nothing, an unknown outcome is left to the reconciler and never retried.
"""

from __future__ import annotations

import functools
import logging
from decimal import Decimal
from typing import TYPE_CHECKING

from compat_server.config import KeyConfig
from compat_server.store import (
    CODE,
    FINISHED,
    REFUSED,
    UNCERTAIN,
    Activation,
    NewActivation,
)
from providers.vocabulary import (
    NoBalance,
    NoNumbers,
    Order,
    UnknownService,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

if TYPE_CHECKING:
    from compat_server.engine import Engine

log = logging.getLogger("compat_server")


class NotReactivatable(Exception):
    """The parent cannot be re-activated (backend, or its state)."""


def can_reactivate(engine: Engine, parent: Activation) -> bool:
    """The parent's backend offers it, and the number did receive a code."""
    provider = engine.providers.get(parent.provider)
    got_code = bool(parent.messages) and parent.state in (FINISHED, CODE)
    return provider is not None and provider.can_reactivate and got_code


async def price(engine: Engine, parent: Activation) -> Decimal:
    """The display price of a new order for the parent's service and country."""
    for offer in await engine.catalog.offers(parent.provider, parent.country):
        if offer.service == parent.service:
            return engine.prices.display(parent.provider, offer.price)
    return parent.cost


async def reactivate(engine: Engine, key: KeyConfig, parent: Activation) -> Activation:
    """Buy a new order on the parent's number; stored before this returns.

    Raises NotReactivatable, NoBalance or NoNumbers (also for an unknown outcome).
    """
    if not can_reactivate(engine, parent):
        raise NotReactivatable()
    order = Order(service=parent.service, country=parent.country)
    # one paid re-rent of a number at a time: concurrent calls on one parent queue
    async with engine.store.lock(parent.id):
        # a key's budget holds for extra activations too: money set aside first
        hold = await engine.router.budgets.hold(
            key, await price(engine, parent) if key.budget is not None else None
        )
        try:
            return await _reactivate(engine, key, parent, order)
        finally:
            engine.router.budgets.release(hold)


async def _reactivate(
    engine: Engine, key: KeyConfig, parent: Activation, order: Order
) -> Activation:
    name = parent.provider
    provider = engine.providers[name]
    attempt = await engine.store.begin_purchase(key.key_id, name, order, engine.clock())
    engine.router.in_flight[attempt] = name
    try:
        try:
            purchase = await engine.upstreams.call(
                name, "reactivate", functools.partial(provider.reactivate, parent.ref())
            )
        except (NoNumbers, NoBalance, UnknownService, UpstreamUnreachable,
                UpstreamAuth) as exc:  # fmt: skip
            await engine.store.end_purchase(
                attempt, REFUSED, type(exc).__name__, engine.clock()
            )
            raise
        except UpstreamUncertain as exc:
            await engine.store.end_purchase(
                attempt, UNCERTAIN, exc.detail, engine.clock()
            )
            log.warning(
                "reactivate id=%d provider=%s outcome unknown: not retried, attempt %d"
                " left to the reconciler",
                parent.id, name, attempt,
            )  # fmt: skip
            raise NoNumbers(name, "reactivation outcome unknown") from exc
        bought = NewActivation(
            key.key_id, name, type(provider).native_currency(provider.options), order,
            purchase, engine.prices.display(name, purchase.price), engine.clock(),
            engine.config.lifetime,
        )  # fmt: skip
        activation = await engine.store.complete_purchase(
            attempt,
            bought,
            hold=True,  # paid: memory keeps it if the store fails
        )
    finally:
        engine.router.in_flight.pop(attempt, None)
    log.info("reactivate id=%d -> id=%d provider=%s", parent.id, activation.id, name)
    return activation
