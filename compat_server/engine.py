"""The activation lifecycle and the work that outlives a request.

:class:`Engine` owns the store, the providers (behind :class:`Upstreams`), the router,
the catalog cache and the poller. The dialect layer calls it with sms-activate terms and
gets back store objects or our exceptions; it never sees a provider's JSON.

Background loops (started by the app): the outbox delivers cancels/finishes that failed
upstream, with backoff; the sweeper closes activations past their lifetime (and cancels
them upstream); the reconciler looks upstream for purchases whose outcome was unknown and
cancels what nobody owns. All three resume from the store after a restart.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from compat_server.config import Config, KeyConfig
from compat_server.errors import BadStatus, EarlyCancelDenied
from compat_server.rentals import Rentals
from compat_server.routing import Breaker, Prices, Router, Upstreams
from compat_server.store import (
    CANCELLED,
    CODE,
    EXPIRED,
    FINISHED,
    PENDING,
    RECONCILED,
    REFUSED,
    UNCERTAIN,
    WAIT_CODE,
    WAIT_RETRY,
    Activation,
    Attempt,
    NewActivation,
    OutboxOp,
    Store,
)
from compat_server.webhooks import Webhooks
from providers.base import Provider
from providers.vocabulary import (
    BACKGROUND,
    BUDGET,
    CLIENT,
    Budget,
    Clock,
    NotNow,
    Offer,
    Order,
    ProviderError,
    Purchase,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

log = logging.getLogger("compat_server")

# Upstream failures after which a queued call is tried again; any other answer is final.
RETRYABLE = (UpstreamUnreachable, UpstreamUncertain, UpstreamAuth, NotNow)
RECONCILE_WINDOW = 900.0  # seconds an unknown purchase is looked for upstream
CLAIM_SLACK = 120.0  # seconds of clock difference between us and an upstream
INLINE_TIMEOUT = 5.0  # seconds a setStatus waits for the upstream before queueing
POLL_WAIT = 2.0  # seconds a getStatus waits for an upstream poll before answering
# in_flight keys of paid retries: below every rent attempt's (negative) and every
# purchase attempt's key, so they never collide
RETRY_FLIGHT = -(2**40)
PRUNE_AFTER = 7 * 86400.0  # seconds refused attempts and delivered calls are kept


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


@dataclass(frozen=True)
class StatusView:
    """What getStatus-like actions report for an activation."""

    state: str
    code: str = ""
    previous_code: str = ""
    text: str = ""
    received_at: float = 0.0


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
        self.catalog = TtlCache(config.catalog_ttl, clock)
        self.router = Router(
            config, store, self.upstreams, self.prices, self.offers, clock
        )
        self._polls: dict[int, asyncio.Future[None]] = {}
        self._last_poll: dict[int, float] = {}
        self._outbox_wake = asyncio.Event()
        self.router.wake_outbox = self._outbox_wake.set  # an over-limit buy's cancel
        self._delivering: set[int] = set()  # outbox ops being delivered right now
        self._pruned_at = 0.0
        self.abandoned_count = 0  # purchases whose client left before the answer
        self._timeless: set[tuple[str, str]] = set()  # orders logged as unclaimable
        self.on_purchase: Callable[[KeyConfig, Activation], None] | None = None
        self.rentals = Rentals(self)
        self.webhooks = Webhooks(self)

    @property
    def providers(self) -> Mapping[str, Provider]:
        """Configured providers by name."""
        return self.upstreams.providers

    def key_providers(self, key: KeyConfig) -> list[str]:
        """Every provider a key can reach (its list, then its routes'), no repeats."""
        names = list(key.providers)
        for route in (*key.routes, *self.config.routes):
            names.extend(route.providers)
        return list(dict.fromkeys(names))

    # ---- catalog and money --------------------------------------------------------------

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
        result: list[Offer] = await self.catalog.get(
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
        left = await self.router.budgets.left(key)
        if left is not None:
            return left  # a key with a budget sees what is left of it
        if not key.show_upstream_balance:
            return Decimal(0)
        names = self.key_providers(key)
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

    # ---- purchase and status ------------------------------------------------------------

    async def buy(self, key: KeyConfig, order: Order) -> Activation:
        """Buy a number for the key (see Router.buy)."""
        activation = await self.router.buy(key, order)
        if self.on_purchase is not None:
            try:  # bookkeeping: a number bought and stored is answered whatever it does
                self.on_purchase(key, activation)
            except Exception:
                log.exception("id=%d purchase hook failed", activation.id)
        return activation

    async def refresh(self, activation: Activation) -> None:
        """Bring an open activation up to date: expiry, then at most one poll per interval.

        Concurrent callers share one upstream request; an upstream failure leaves the
        last known state in place.
        """
        if not activation.is_open:
            return
        if self.clock() >= activation.expires_at:
            await self.expire(activation)
            return
        future = self._polls.get(activation.id)
        if future is None:
            provider = self.providers.get(activation.provider)
            if provider is None:
                return
            now = self.clock()
            if now - self._last_poll.get(activation.id, -1e18) < provider.poll_interval:
                return
            self._last_poll[activation.id] = now
            future = asyncio.ensure_future(self._poll(activation, provider))
            self._polls[activation.id] = future
            future.add_done_callback(lambda _: self._polls.pop(activation.id, None))
        try:
            # a slow upstream must not make getStatus slow: past POLL_WAIT the client
            # gets the stored state, and the poll finishes in the background
            await asyncio.wait_for(asyncio.shield(future), POLL_WAIT)
        except asyncio.TimeoutError:
            log.info("poll id=%d slow upstream: answered from the store", activation.id)

    async def _poll(self, activation: Activation, provider: Provider) -> None:
        ref = activation.ref()
        try:
            result = await self.upstreams.call(
                activation.provider, "poll", lambda: provider.poll(ref)
            )
        except ProviderError as exc:
            log.info(
                "poll id=%d provider=%s failed: %s",
                activation.id,
                activation.provider,
                type(exc).__name__,
            )
            return
        async with self.store.lock(activation.id):
            if not activation.is_open or activation.upstream_id != ref.upstream_id:
                return
            await self.store.add_messages(
                activation, result.messages, self.webhooks.activation_rows(activation)
            )
            if result.closed and activation.state == WAIT_CODE:
                # the upstream ended the order without a code: nothing to cancel there
                await self.store.set_state(activation, EXPIRED, self.clock())
                self._last_poll.pop(activation.id, None)

    async def expire(self, activation: Activation) -> None:
        """Close an activation past its lifetime; cancel upstream unless a code came."""
        async with self.store.lock(activation.id):
            if not activation.is_open:
                return
            if activation.state == WAIT_CODE:
                await self.store.set_state(
                    activation, EXPIRED, self.clock(), outbox="cancel"
                )
            else:  # a code was delivered: the number was used, close it as finished
                await self.store.set_state(
                    activation, FINISHED, self.clock(), outbox="finish"
                )
        self._last_poll.pop(activation.id, None)
        self._outbox_wake.set()

    async def abandoned(self, activation: Activation) -> None:
        """The client that bought ``activation`` left before its answer was sent.

        Where the upstream can cancel, the number is cancelled there (its money comes
        back); where it cannot, it stays open for the key's getActiveActivations and
        the operator is warned with its id. Either way it is counted in the log.
        """
        self.abandoned_count += 1
        provider = self.providers[activation.provider]
        if not type(provider).can_cancel:
            log.warning(
                "id=%d provider=%s client left before its number was delivered:"
                " kept open (this provider cannot cancel), see getActiveActivations"
                " (abandoned so far: %d)",
                activation.id,
                activation.provider,
                self.abandoned_count,
            )
            return
        async with self.store.lock(activation.id):
            if activation.state != WAIT_CODE:
                return
            await self.store.set_state(
                activation, CANCELLED, self.clock(), outbox="cancel"
            )
        self._last_poll.pop(activation.id, None)
        log.warning(
            "id=%d provider=%s client left before its number was delivered:"
            " cancel queued upstream (abandoned so far: %d)",
            activation.id,
            activation.provider,
            self.abandoned_count,
        )
        self._outbox_wake.set()

    def view(self, activation: Activation) -> StatusView:
        """The client-visible state (messages and retry mark folded in)."""
        if not activation.is_open:
            return StatusView(activation.state)
        messages = activation.messages
        if activation.state == WAIT_RETRY:
            # the code the client turned down: the newest one when it asked again
            previous = messages[activation.retry_mark - 1].code
            return StatusView(WAIT_RETRY, previous_code=previous)
        if activation.state == CODE and messages:
            last = messages[-1]
            return StatusView(
                CODE, last.code, text=last.text, received_at=last.received_at
            )
        return StatusView(WAIT_CODE)

    # ---- setStatus ----------------------------------------------------------------------

    async def ready(self, activation: Activation) -> None:
        """setStatus 1: allowed while open; the upstream hears of it where it matters."""
        if not activation.is_open:
            raise BadStatus("activation is closed")
        if activation.state == WAIT_CODE:
            await self._deliver_now(activation, "ready")

    async def retry(self, activation: Activation) -> None:
        """setStatus 3: only after a code; waits for the next SMS (maybe a re-rent)."""
        async with self.store.lock(activation.id):
            if activation.state == WAIT_RETRY:
                return
            if activation.state != CODE:
                raise BadStatus(f"retry in state {activation.state}")
            provider = self.providers[activation.provider]
            ref = activation.ref()
            purchase = None
            try:
                if provider.retry_is_paid:
                    purchase = await self._paid_retry(activation, provider)
                    # stored below: until then no reconciler may take its order
                else:
                    purchase = await self.upstreams.call(
                        activation.provider, "retry", lambda: provider.retry(ref)
                    )
            except ProviderError as exc:
                # the order stays as it is; the client simply waits for a further SMS
                log.warning(
                    "retry id=%d provider=%s failed: %s",
                    activation.id,
                    activation.provider,
                    type(exc).__name__,
                )
            try:
                await self.store.set_state(
                    activation, WAIT_RETRY, self.clock(), purchase=purchase, retry=True
                )
            finally:
                self.router.in_flight.pop(RETRY_FLIGHT - activation.id, None)
            self._last_poll.pop(activation.id, None)

    async def _paid_retry(
        self, activation: Activation, provider: Provider
    ) -> Purchase | None:
        """A retry that buys a new order, under the rules of a purchase: the key's
        budget holds its price first, an attempt is stored before the paid call (an
        unknown outcome is left to the reconciler, never retried), and what it cost
        is added to the activation's cost."""
        key = next((k for k in self.config.keys if k.key_id == activation.key_id), None)
        name = activation.provider
        price = None
        for offer in await self.offers(name, activation.country):
            if offer.service == activation.service:
                price = self.prices.display(name, offer.price)
        hold = None
        if key is not None:
            hold = await self.router.budgets.hold(
                key, price if key.budget is not None else None
            )
        order = Order(service=activation.service, country=activation.country)
        try:
            attempt = await self.store.begin_purchase(
                activation.key_id, name, order, self.clock()
            )
            # in flight (under the activation's id) until retry() has stored the new
            # order: the reconciler skips a provider with a buy in flight
            self.router.in_flight[RETRY_FLIGHT - activation.id] = name
            try:
                purchase = await self.upstreams.call(
                    name, "retry", functools.partial(provider.retry, activation.ref())
                )
            except UpstreamUncertain as exc:
                self.router.in_flight.pop(RETRY_FLIGHT - activation.id, None)
                await self.store.end_purchase(
                    attempt, UNCERTAIN, exc.detail, self.clock()
                )
                raise
            except ProviderError as exc:
                self.router.in_flight.pop(RETRY_FLIGHT - activation.id, None)
                await self.store.end_purchase(
                    attempt, REFUSED, type(exc).__name__, self.clock()
                )
                raise
            if purchase is not None:
                # the old order is the activation's: this attempt bought nothing new
                # to store, its order becomes the activation's upstream id
                await self.store.end_purchase(
                    attempt, RECONCILED, "re-rent on retry", self.clock()
                )
                await self.store.add_cost(
                    activation, self.prices.display(name, purchase.price)
                )
            return purchase
        finally:
            if hold is not None:
                self.router.budgets.release(hold)

    async def finish(self, activation: Activation) -> None:
        """setStatus 6: after a code (or during a retry); repeated 6 is harmless."""
        async with self.store.lock(activation.id):
            if activation.state == FINISHED:
                return
            if activation.state not in (CODE, WAIT_RETRY):
                raise BadStatus(f"finish in state {activation.state}")
            await self.store.set_state(
                activation, FINISHED, self.clock(), outbox="finish"
            )
        self._last_poll.pop(activation.id, None)
        await self._drain_now(activation.id)

    async def cancel(self, activation: Activation) -> None:
        """setStatus 8/-1: only before a code and outside the early window."""
        async with self.store.lock(activation.id):
            if activation.state in (CANCELLED, EXPIRED):
                return
            if activation.state != WAIT_CODE:
                raise BadStatus(f"cancel in state {activation.state}")
            age = self.clock() - activation.created_at
            if self.config.early_cancel and age < self.config.early_cancel:
                raise EarlyCancelDenied(f"{age:.0f}s old")
            await self.store.set_state(
                activation, CANCELLED, self.clock(), outbox="cancel"
            )
        self._last_poll.pop(activation.id, None)
        await self._drain_now(activation.id)

    async def _deliver_now(self, activation: Activation, op: str) -> None:
        await self.store.enqueue(activation.id, op, self.clock())
        await self._drain_now(activation.id)

    async def _drain_now(self, activation_id: int) -> None:
        """Try the queued calls of one activation at once, bounded in time."""
        try:
            await asyncio.wait_for(self.run_outbox(only=activation_id), INLINE_TIMEOUT)
        except asyncio.TimeoutError:
            log.info(
                "id=%d upstream slow: queued call left to the outbox", activation_id
            )

    # ---- background work ----------------------------------------------------------------

    async def run_outbox(self, only: int | None = None) -> int:
        """Deliver due queued calls once; returns how many were delivered."""
        delivered = 0
        for op in await self.store.due_ops(self.clock()):
            if (
                only is not None and op.activation_id != only
            ) or op.id in self._delivering:
                continue
            self._delivering.add(op.id)
            try:
                delivered += await self._deliver(op)
            finally:
                self._delivering.discard(op.id)
        return delivered

    async def _deliver(self, op: OutboxOp) -> int:
        """Make one queued upstream call; 1 if it is done, 0 if it was rescheduled."""
        activation = await self.store.get(op.activation_id)
        provider = (
            None if activation is None else self.providers.get(activation.provider)
        )
        if activation is None or provider is None:
            await self.store.op_done(op.id)
            return 0
        call = {
            "cancel": provider.cancel,
            "finish": provider.finish,
            "ready": provider.ready,
        }[op.op]
        try:
            await self.upstreams.call(
                activation.provider, op.op, functools.partial(call, activation.ref())
            )
        except RETRYABLE as exc:
            delay = min(
                self.config.outbox_interval * 2**op.attempts,
                self.config.outbox_max_backoff,
            )
            await self.store.op_failed(op.id, self.clock() + delay, type(exc).__name__)
            log.info(
                "outbox id=%d op=%s failed (%s), retry in %.0fs",
                activation.id,
                op.op,
                type(exc).__name__,
                delay,
            )
            return 0
        except ProviderError as exc:
            log.warning(
                "outbox id=%d op=%s answered %s: treated as final",
                activation.id,
                op.op,
                type(exc).__name__,
            )
            if op.op == "cancel":
                await self._cancel_refused(activation, provider)
        await self.store.op_done(op.id)
        return 1

    async def _cancel_refused(self, activation: Activation, provider: Provider) -> None:
        """The upstream refused a cancel for good: if that is because the SMS had
        already arrived there, the number was paid for. Reopen it with its code, so
        the key's spend counts it and its client can still read the code."""
        try:
            result = await self.upstreams.call(
                activation.provider,
                "poll",
                functools.partial(provider.poll, activation.ref()),
            )
        except ProviderError:
            return
        if not result.messages:
            return
        async with self.store.lock(activation.id):
            if activation.state not in (CANCELLED, EXPIRED):
                return
            await self.store.set_state(activation, CODE, self.clock())
            await self.store.add_messages(activation, result.messages)
        log.warning(
            "id=%d provider=%s cancel refused: the SMS had arrived upstream, so the"
            " number was paid for; reopened with its code",
            activation.id,
            activation.provider,
        )

    async def sweep(self) -> int:
        """Expire every open activation past its lifetime; returns how many.

        Once an hour it also prunes bookkeeping older than PRUNE_AFTER (attempts that
        bought nothing, delivered outbox calls), so a client hammering getNumber on
        NO_NUMBERS does not grow the store forever.
        """
        now = self.clock()
        due = [a for a in self.store.open_activations() if a.expires_at <= now]
        for activation in due:
            await self.expire(activation)
        if now - self._pruned_at >= 3600:
            self._pruned_at = now
            await self.store.prune(now - PRUNE_AFTER)
        return len(due)

    def _buying(self, provider: str) -> bool:
        """A buy of this process is running on ``provider`` right now."""
        return provider in self.router.in_flight.values()

    async def reconcile(self) -> int:
        """Look upstream for purchases of unknown outcome; returns orphans cancelled."""
        attempts = await self.store.attempts([UNCERTAIN, PENDING])
        groups: dict[tuple[str, str, int], list[Attempt]] = {}
        for attempt in attempts:
            if attempt.id in self.router.in_flight:
                continue  # a buy of this process is still running
            key = (attempt.provider, attempt.order.service, attempt.order.country)
            groups.setdefault(key, []).append(attempt)
        orphans = 0
        for (name, _, _), group in groups.items():
            orphans += await self._reconcile_group(name, group)
        if orphans:
            self._outbox_wake.set()
        return orphans

    async def _reconcile_group(self, name: str, group: list[Attempt]) -> int:
        """One upstream lookup for attempts of one provider, service and country."""
        provider = self.providers.get(name)
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
        if self._buying(name):
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
        # Checked again after the lookup, with no await before the claims are decided:
        # any order in `found` was sold before the lookup answered, so its buy is either
        # still in flight now (skip the round) or already stored (in `known` below).
        if self._buying(name):
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

    async def run_forever(
        self, name: str, interval: float, step: Callable[[], Awaitable[int]]
    ) -> None:
        """Run ``step`` every ``interval`` seconds until cancelled; errors are logged."""
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background %s failed; continuing", name)
            if name == "outbox":
                try:
                    await asyncio.wait_for(self._outbox_wake.wait(), interval)
                except asyncio.TimeoutError:
                    pass
                self._outbox_wake.clear()
            else:
                await asyncio.sleep(interval)

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
