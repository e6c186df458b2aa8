"""Per-key money: ``keys[].budget`` and ``keys[].max_active``.

Spend is derived from the store (the display-currency ``cost`` of every activation of the
key that is not cancelled or expired), so it survives a restart and a cancel or expiry
gives the money back by itself. A purchase first *reserves* its expected price under a
per-key lock, before the paid call; concurrent purchases see each other's reservations,
so together they cannot overshoot the budget. The reservation is also sent upstream as
the purchase's price cap, so a provider honouring ``maxPrice`` cannot charge more than
was reserved.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from compat_server.config import KeyConfig
from compat_server.store import Store
from providers.vocabulary import NoBalance, NoNumbers, Order

if TYPE_CHECKING:
    from compat_server.routing import Prices

PriceOf = Callable[[str, Order], Awaitable[Decimal | None]]


@dataclass(frozen=True)
class Hold:
    """Money set aside for one paid call of a key."""

    id: int
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
    """Holds in flight per key; spend itself is read from the store."""

    def __init__(self, store: Store, prices: Prices) -> None:
        self.store = store
        self.prices = prices
        self._held: dict[str, dict[int, Decimal]] = {}  # key_id -> hold id -> amount
        self._locks: dict[str, asyncio.Lock] = {}
        self._ids = itertools.count(1)

    async def spent(self, key: KeyConfig) -> Decimal:
        """Money the key's activations hold now (cancelled and expired ones are free)."""
        return await self.store.spent(key.key_id)

    def reserved(self, key: KeyConfig) -> Decimal:
        """Money set aside by purchases of the key still in flight."""
        return sum(self._held.get(key.key_id, {}).values(), Decimal(0))

    async def left(self, key: KeyConfig) -> Decimal | None:
        """Budget minus spend minus holds (never below 0); None without a budget."""
        if key.budget is None:
            return None
        left = key.budget - await self.spent(key) - self.reserved(key)
        return max(left, Decimal(0))

    def open_count(self, key: KeyConfig) -> int:
        """Open activations of the key, plus purchases of it in flight."""
        stored = sum(1 for a in self.store.open_activations() if a.key_id == key.key_id)
        return stored + len(self._held.get(key.key_id, {}))

    async def reserve(
        self, key: KeyConfig, provider: str, order: Order, price_of: PriceOf
    ) -> Hold:
        """Hold the expected price of buying ``order`` from ``provider`` for ``key``.

        NoNumbers when the key has ``max_active`` numbers open or opening; NoBalance
        when the price does not fit what is left. With no known price, all that is
        left is held (the key's purchases then run one at a time). Release the hold
        only after the activation is stored, so its money is never counted as free.
        """
        lock = self._locks.setdefault(key.key_id, asyncio.Lock())
        async with lock:
            if key.max_active is not None and self.open_count(key) >= key.max_active:
                raise NoNumbers("budget", f"max_active {key.max_active} reached")
            amount, cap = Decimal(0), None
            if key.budget is not None:
                left = await self.left(key)
                assert left is not None
                native = await price_of(provider, order)
                if native is None:
                    amount = left
                    cap = left / self.prices.factor(provider)
                else:
                    amount = self.prices.display(provider, native)
                    cap = native
                if order.max_price is not None and (
                    native is None or native > order.max_price
                ):
                    cap = min(cap, order.max_price)
                    amount = min(amount, self.prices.display(provider, order.max_price))
                if left <= 0 or amount > left:
                    raise NoBalance("budget", f"key {key.alias}: {left} left")
            hold = Hold(next(self._ids), key.key_id, amount, cap)
            self._held.setdefault(key.key_id, {})[hold.id] = amount
        return hold

    async def hold(self, key: KeyConfig, amount: Decimal | None) -> Hold:
        """Hold ``amount`` (display currency; None: all that is left) of the key's
        budget for a paid call other than getNumber (a rent, a prolongation, an extra
        activation). NoBalance when it does not fit; a key without a budget holds 0.
        """
        lock = self._locks.setdefault(key.key_id, asyncio.Lock())
        async with lock:
            held = Decimal(0)
            if key.budget is not None:
                left = await self.left(key)
                assert left is not None
                held = left if amount is None else amount
                if left <= 0 or held > left:
                    raise NoBalance("budget", f"key {key.alias}: {left} left")
            hold = Hold(next(self._ids), key.key_id, held, None)
            self._held.setdefault(key.key_id, {})[hold.id] = held
        return hold

    def release(self, hold: Hold) -> None:
        """Give a hold back (the purchase is stored, refused, or failed)."""
        held = self._held.get(hold.key_id, {})
        held.pop(hold.id, None)
        if not held:
            self._held.pop(hold.key_id, None)
