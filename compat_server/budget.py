"""Per-key money: ``keys[].budget`` and ``keys[].max_active``.

Spend is derived from the store (the display-currency ``cost`` of every activation of the
key that is not cancelled or expired), so it survives a restart and a cancel or expiry
gives the money back by itself. A purchase first *reserves* its expected price in the
store (:meth:`Store.reserve`: the check and the hold in one step), before the paid call;
concurrent purchases, on this server or another sharing the store, see each other's
reservations, so together they cannot overshoot the budget. The reservation is also sent upstream as
the purchase's price cap, so a provider honouring ``maxPrice`` cannot charge more than
was reserved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from compat_server.config import KeyConfig
from compat_server.store import Reservation, Store, StoreError
from providers.vocabulary import Clock, NoBalance, NoNumbers, Order

if TYPE_CHECKING:
    from compat_server.routing import Prices

log = logging.getLogger("compat_server")

PriceOf = Callable[[str, Order], Awaitable[Decimal | None]]


@dataclass(frozen=True)
class Hold:
    """Money set aside for one paid call of a key."""

    id: int  # the store's reservation; 0 when nothing needed holding
    key_id: str
    amount: Decimal  # display currency (0 for a key without a budget)
    native_cap: Decimal | None  # most the upstream may charge, native; None: no cap

    def cap(self, max_price: Decimal | None) -> Decimal | None:
        """The order's native max_price, lowered to what the hold covers."""
        if self.native_cap is None:
            return max_price
        if max_price is None:
            return self.native_cap
        return min(max_price, self.native_cap)


class Budgets:
    """A key's money through the store: spend, and holds in flight (Store.reserve,
    which makes the check and the hold one step for every server sharing it)."""

    def __init__(self, store: Store, prices: Prices, clock: Clock = time.time) -> None:
        self.store = store
        self.prices = prices
        self.clock = clock
        self._unreleased: set[int] = set()  # holds the store failed to give back

    async def spent(self, key: KeyConfig) -> Decimal:
        """Money the key's activations hold now (cancelled and expired ones are free)."""
        return await self.store.spent(key.key_id)

    async def reserved(self, key: KeyConfig) -> Decimal:
        """Money set aside by purchases of the key still in flight."""
        return (await self.store.reserved(key.key_id))[1]

    async def left(self, key: KeyConfig) -> Decimal | None:
        """Budget minus spend minus holds (never below 0); None without a budget."""
        if key.budget is None:
            return None
        left = key.budget - await self.spent(key) - await self.reserved(key)
        return max(left, Decimal(0))

    async def reserve(
        self, key: KeyConfig, provider: str, order: Order, price_of: PriceOf
    ) -> Hold:
        """Hold the expected price of buying ``order`` from ``provider`` for ``key``.

        NoNumbers when the key has ``max_active`` numbers open or opening; NoBalance
        when the price does not fit what is left. With no known price, all that is
        left is held (the key's purchases then run one at a time). Release the hold
        only after the activation is stored, so its money is never counted as free.
        """
        if key.budget is None and key.max_active is None:
            return Hold(0, key.key_id, Decimal(0), None)  # nothing to hold or count
        amount: Decimal | None = Decimal(0)
        native: Decimal | None = None
        at_most: Decimal | None = None
        if key.budget is not None:
            native = await price_of(provider, order)
            if native is None:
                amount = None  # all that is left
                if order.max_price is not None:
                    at_most = self.prices.display(provider, order.max_price)
            else:
                amount = self.prices.display(provider, native)
                if order.max_price is not None and native > order.max_price:
                    amount = min(amount, self.prices.display(provider, order.max_price))
        got = await self._reserve(
            key.key_id,
            amount,
            budget=key.budget,
            max_open=key.max_active,
            at_most=at_most,
        )
        if got.refused == "max_active":
            raise NoNumbers("budget", f"max_active {key.max_active} reached")
        if got.refused:
            raise NoBalance("budget", f"key {key.alias}: {got.left} left")
        cap = None
        if key.budget is not None:
            if native is None:
                assert got.left is not None
                cap = got.left / self.prices.factor(provider)
            else:
                cap = native
            if order.max_price is not None and (
                native is None or native > order.max_price
            ):
                cap = min(cap, order.max_price)
        return Hold(got.id, key.key_id, got.amount, cap)

    async def hold(self, key: KeyConfig, amount: Decimal | None) -> Hold:
        """Hold ``amount`` (display currency; None: all that is left) of the key's
        budget for a paid call other than getNumber (a rent, a prolongation, an extra
        activation). NoBalance when it does not fit; a key without a budget holds 0.
        """
        if key.budget is None:
            return Hold(0, key.key_id, Decimal(0), None)  # nothing to hold
        got = await self._reserve(key.key_id, amount, budget=key.budget, max_open=None)
        if got.refused:
            raise NoBalance("budget", f"key {key.alias}: {got.left} left")
        return Hold(got.id, key.key_id, got.amount, None)

    async def _reserve(
        self,
        key_id: str,
        amount: Decimal | None,
        *,
        budget: Decimal | None,
        max_open: int | None,
        at_most: Decimal | None = None,
    ) -> Reservation:
        """Store.reserve; a store that cannot hold money buys nothing (NoNumbers)."""
        await self._release_left_over()
        try:
            return await self.store.reserve(
                key_id,
                amount,
                budget=budget,
                max_open=max_open,
                at_most=at_most,
                now=self.clock(),
            )
        except StoreError as exc:
            raise NoNumbers("store", str(exc)) from exc

    async def release(self, hold: Hold) -> None:
        """Give a hold back (the purchase is stored, refused, or failed).

        Never raises: it runs after the purchase, whose answer a store failure must
        not turn into an error. A hold the store could not drop is dropped by the
        next reserve or release that can.
        """
        if hold.id:  # 0: nothing was held in the store
            self._unreleased.add(hold.id)
        await self._release_left_over()

    async def step(self) -> int:
        """Give back the holds the store could not drop (the background loop, so a
        key's budget is whole again when the store is, not at its next purchase);
        how many are still left."""
        if self._unreleased:
            await self._release_left_over()
        return len(self._unreleased)

    async def _release_left_over(self) -> None:
        for hold_id in sorted(self._unreleased):
            try:
                await self.store.unreserve(hold_id)
            except StoreError as exc:
                log.warning(
                    "budget hold %d not given back yet (store: %s)", hold_id, exc
                )
                return
            self._unreleased.discard(hold_id)
