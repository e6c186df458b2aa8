"""The reconciler: purchases whose outcome was unknown, looked for upstream.

A paid call that timed out may have bought a number. Its attempt stays UNCERTAIN (or
PENDING after a crash) until :meth:`Reconciler.step` has looked upstream: an order that
fits the attempt is stored as a cancelled activation and its cancel queued, so nothing
bought is lost; past RECONCILE_WINDOW the attempt is closed. Rents are reconciled in
rentals.py, next to the rest of the rent lifecycle.
"""

from __future__ import annotations

import functools
import logging
from decimal import Decimal

from compat_server.config import Config
from compat_server.outbox import Outbox
from compat_server.routing import Router, Upstreams
from compat_server.store import (
    CANCELLED,
    PENDING,
    RECONCILED,
    UNCERTAIN,
    Attempt,
    NewActivation,
    Store,
)
from providers.base import Provider
from providers.vocabulary import Clock, ProviderError, Purchase

log = logging.getLogger("compat_server")

RECONCILE_WINDOW = 900.0  # seconds an unknown purchase is looked for upstream
CLAIM_SLACK = 120.0  # seconds of clock difference between us and an upstream
# seconds one server holds a group (provider, service, country) while it reconciles
# it; given up when done, so this only bounds how long a dead server's round blocks
RECONCILE_LEASE = 300.0


class Reconciler:
    """Finds the upstream orders of purchases of unknown outcome."""

    def __init__(
        self,
        config: Config,
        store: Store,
        upstreams: Upstreams,
        router: Router,
        outbox: Outbox,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.upstreams = upstreams
        self.router = router
        self.outbox = outbox
        self.clock = clock
        self._timeless: set[tuple[str, str]] = set()  # orders logged as unclaimable

    def _buying(self, provider: str) -> bool:
        """A buy of this process is running on ``provider`` right now."""
        return provider in self.router.in_flight.values()

    async def step(self) -> int:
        """Look upstream for purchases of unknown outcome; returns orphans cancelled."""
        attempts = await self.store.attempts([UNCERTAIN, PENDING])
        groups: dict[tuple[str, str, int], list[Attempt]] = {}
        for attempt in attempts:
            if attempt.id in self.router.in_flight:
                continue  # a buy of this process is still running
            key = (attempt.provider, attempt.order.service, attempt.order.country)
            groups.setdefault(key, []).append(attempt)
        orphans = 0
        for (name, service, country), group in groups.items():
            # one server at a time per group: two must never both claim one order
            lease = f"reconcile:{name}:{service}:{country}"
            if not await self.store.lease(lease, RECONCILE_LEASE, self.clock()):
                continue
            try:
                orphans += await self._reconcile_group(name, group)
            finally:
                await self.store.end_lease(lease)
        if orphans:
            self.outbox.wake.set()
        return orphans

    async def _reconcile_group(self, name: str, group: list[Attempt]) -> int:
        """One upstream lookup for attempts of one provider, service and country."""
        provider = self.upstreams.providers.get(name)
        now = self.clock()
        if provider is None or not provider.can_lookup:
            for attempt in group:
                if now - attempt.created_at > RECONCILE_WINDOW:
                    log.error(
                        "provider=%s cannot list orders: purchase attempt %d left"
                        " unresolved, check the account by hand",
                        name,
                        attempt.id,
                    )
                    await self.store.end_purchase(
                        attempt.id, RECONCILED, "unresolved", now
                    )
            return 0
        if self._buying(name) or await self.store.buying(name, now):
            return 0  # a concurrent buy could look like an orphan until it is stored
        since = min(a.created_at for a in group) - 60
        provider.note_orders(
            {
                a.upstream_id: a.created_at
                for a in self.store.open_activations()
                if a.provider == name
            }
        )
        try:
            found = await self.upstreams.call(
                name,
                "lookup",
                functools.partial(provider.lookup_purchases, group[0].order, since),
            )
        except ProviderError as exc:
            log.info(
                "reconcile provider=%s lookup failed: %s", name, type(exc).__name__
            )
            return 0
        # Checked again after the lookup, before the stored ids are read: any order in
        # `found` was sold before the lookup answered, so its buy is either still in
        # flight now (skip the round) or already stored (in `known` below). This
        # process's buys are checked with no await in between; another server's
        # pending attempts are read from the store before `known`.
        if self._buying(name) or await self.store.buying(name, self.clock()):
            return 0
        known = await self.store.known_upstream_ids(name)
        unknown = [p for p in found if p.upstream_id not in known]
        claims = self._match_claims(provider, group, unknown)
        orphans = 0
        for attempt in group:
            claimed = claims.get(attempt.id)
            if claimed is not None:
                await self._claim_orphan(name, provider, attempt, claimed, now)
                orphans += 1
            elif now - attempt.created_at > RECONCILE_WINDOW:
                await self.store.end_purchase(
                    attempt.id, RECONCILED, "nothing found", now
                )
            elif attempt.state == PENDING:
                # a buy interrupted by a crash: from now on it is simply uncertain
                await self.store.end_purchase(attempt.id, UNCERTAIN, "interrupted", now)
        return orphans

    def _match_claims(
        self, provider: Provider, group: list[Attempt], unknown: list[Purchase]
    ) -> dict[int, Purchase]:
        """Attempt id -> the one unknown order it may have made, if any.

        One attempt bought at most one number, and only one that fits it: sold
        within the time its paid call could have taken, at no more than its price
        limit, on no number prefix it excluded. Anything else (a number bought by
        another tool on the same account, or by a later attempt) is never taken.
        Among fitting orders an attempt takes the one made closest to its start.
        """
        taken: set[str] = set()
        claims: dict[int, Purchase] = {}
        for attempt in sorted(group, key=lambda a: a.created_at):
            fitting = [
                p
                for p in unknown
                if p.upstream_id not in taken and self._may_claim(provider, attempt, p)
            ]
            if fitting:
                best = min(
                    fitting,
                    key=lambda p: abs((p.created_at or 0.0) - attempt.created_at),
                )
                taken.add(best.upstream_id)
                claims[attempt.id] = best
        return claims

    def _may_claim(
        self, provider: Provider, attempt: Attempt, purchase: Purchase
    ) -> bool:
        """Whether an upstream order could be the one this attempt bought."""
        if purchase.created_at is None:
            # no time: it cannot be told from a number bought elsewhere
            seen = (provider.name, purchase.upstream_id)
            if seen not in self._timeless:  # once, not every round
                self._timeless.add(seen)
                log.warning(
                    "reconcile provider=%s upstream_id=%s has no creation time: not"
                    " claimed for attempt %d, check it by hand",
                    provider.name,
                    purchase.upstream_id,
                    attempt.id,
                )
            return False
        # the paid call started after the attempt was written, no later than the
        # request's deadline (the pacer refuses it after that), and ended within the
        # upstream timeouts (a smspva rental is two calls, each paced)
        timeouts = self.config.connect_timeout + self.config.read_timeout
        longest = self.config.request_deadline + 2 * (timeouts + provider.min_interval)
        earliest = attempt.created_at - CLAIM_SLACK
        latest = attempt.created_at + longest + CLAIM_SLACK
        if purchase.created_at + purchase.created_skew < earliest:
            return False
        if purchase.created_at - purchase.created_skew > latest:
            return False
        limit = attempt.order.max_price
        if limit is not None and purchase.price > limit:
            return False
        phone = purchase.phone
        return not (
            phone and any(phone.startswith(p) for p in attempt.order.exclude_prefixes)
        )

    async def _claim_orphan(
        self,
        name: str,
        provider: Provider,
        attempt: Attempt,
        purchase: Purchase,
        now: float,
    ) -> None:
        """Store an unowned upstream order as a cancelled activation; queue its cancel."""
        bought = NewActivation(
            attempt.key_id,
            name,
            type(provider).native_currency(provider.options),
            attempt.order,
            purchase,
            Decimal(0),
            now,
            self.config.lifetime,
            state=CANCELLED,
        )
        activation = await self.store.complete_purchase(attempt.id, bought)
        await self.store.enqueue(activation.id, "cancel", now)
        log.warning(
            "reconcile provider=%s found an unowned purchase: stored as id=%d,"
            " cancel queued",
            name,
            activation.id,
        )
