"""The activation lifecycle: states, transitions and the view, in one place.

States live in the store (WAIT_CODE, CODE, WAIT_RETRY, then FINISHED, CANCELLED or
EXPIRED); this room moves an activation between them: polling the upstream for its
messages, expiry (and the sweeper that applies it), a client that left before its
number was sent, and setStatus' ready, retry, finish and cancel. The upstream hears of
a closing transition through the outbox. :meth:`Lifecycle.look` is the one "refresh,
then view" every getStatus-like action starts from.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from compat_server.catalog import Catalog
from compat_server.config import Config
from compat_server.errors import BadStatus, EarlyCancelDenied
from compat_server.outbox import Outbox
from compat_server.routing import Prices, Router, Upstreams
from compat_server.store import (
    CANCELLED,
    CODE,
    EXPIRED,
    FINISHED,
    RECONCILED,
    REFUSED,
    UNCERTAIN,
    WAIT_CODE,
    WAIT_RETRY,
    Activation,
    Store,
    StoreError,
)
from compat_server.webhooks import Webhooks
from providers.base import Provider
from providers.vocabulary import (
    Clock,
    Order,
    PollResult,
    ProviderError,
    Purchase,
    UpstreamUncertain,
)

log = logging.getLogger("compat_server")

POLL_WAIT = 2.0  # seconds a getStatus waits for an upstream poll before answering
# a batch list's answer stands for this many poll intervals: one late batch does not
# send every getStatus upstream, two missed ones do (state staleness <= 2 intervals)
COVERED_FOR = 2.0
# in_flight keys of paid retries: below every rent attempt's (negative) and every
# purchase attempt's key, so they never collide
RETRY_FLIGHT = -(2**40)
PRUNE_AFTER = 7 * 86400.0  # seconds refused attempts and delivered calls are kept


@dataclass(frozen=True)
class StatusView:
    """What getStatus-like actions report for an activation."""

    state: str
    code: str = ""
    previous_code: str = ""
    text: str = ""
    received_at: float = 0.0


class Lifecycle:
    """Moves activations between states; tells the upstream through the outbox."""

    def __init__(
        self,
        config: Config,
        store: Store,
        upstreams: Upstreams,
        router: Router,
        catalog: Catalog,
        prices: Prices,
        outbox: Outbox,
        webhooks: Webhooks,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.upstreams = upstreams
        self.router = router
        self.catalog = catalog
        self.prices = prices
        self.outbox = outbox
        self.webhooks = webhooks
        self.clock = clock
        self._polls: dict[int, asyncio.Future[bool]] = {}
        # activation id -> when to ask the store for its poll lease again: this
        # process took it (until it runs out) or was refused it (another server
        # polls: asked again half an interval later). No store call in between.
        self._quiet_until: dict[int, float] = {}
        # activation id -> when a batch list last answered for it (compat_server.batch):
        # while that is recent, getStatus answers from the store
        self._covered: dict[int, float] = {}
        # providers whose batch list runs in the background and answers: an activation
        # first seen there waits for the next batch instead of being polled alone
        self.batching: frozenset[str] = frozenset()
        self._pruned_at = 0.0
        self.abandoned_count = 0  # purchases whose client left before the answer

    @property
    def providers(self) -> Mapping[str, Provider]:
        """Configured providers by name."""
        return self.upstreams.providers

    async def look(self, activation: Activation) -> StatusView:
        """The activation brought up to date, as its client sees it."""
        await self.refresh(activation)
        return self.view(activation)

    async def refresh(self, activation: Activation) -> None:
        """Bring an open activation up to date: expiry, then at most one poll per interval.

        The interval is the store's lease ``poll:<id>``: with a shared store it is
        one poll per interval across every server, and a server that does not get
        the lease answers from the store as it stands. Concurrent callers here
        share one lease and one upstream request, and the store is not asked again
        while the lease is known to be taken; an upstream failure leaves the last
        known state in place. An activation a batch list answered for within
        COVERED_FOR poll intervals, or first seen while its provider's batch runs, is
        not polled on its own.
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
            interval = provider.poll_interval
            if (
                activation.provider in self.batching
                and activation.id not in self._covered
                and activation.id not in self._quiet_until
            ):
                # new, or loaded at a restart: the next batch lists it. A paced
                # upstream (smspva) must not queue one poll per number before that
                self._covered[activation.id] = now
                return
            if now - self._covered.get(activation.id, -1e18) < COVERED_FOR * interval:
                return
            if now < self._quiet_until.get(activation.id, -1e18):
                return
            future = self._start_poll(activation, provider, now, leased=True)
        try:
            # a slow upstream must not make getStatus slow: past POLL_WAIT the client
            # gets the stored state, and the poll finishes in the background
            await asyncio.wait_for(asyncio.shield(future), POLL_WAIT)
        except asyncio.TimeoutError:
            log.info("poll id=%d slow upstream: answered from the store", activation.id)

    async def poll_now(self, activation: Activation) -> bool:
        """Poll one open activation now (a batch list said it has news), or join the
        poll already in flight; whether the upstream answered (a failure leaves the
        last known state)."""
        if not activation.is_open or self.clock() >= activation.expires_at:
            return False
        future = self._polls.get(activation.id)
        if future is None:
            provider = self.providers.get(activation.provider)
            if provider is None:
                return False
            # the batch that said so ran under its own lease: no poll lease needed
            future = self._start_poll(activation, provider, self.clock(), leased=False)
        return await asyncio.shield(future)

    def _start_poll(
        self, activation: Activation, provider: Provider, now: float, *, leased: bool
    ) -> asyncio.Future[bool]:
        self._quiet_until[activation.id] = now + provider.poll_interval
        poll = (
            self._leased_poll(activation, provider, now)
            if leased
            else self._poll(activation, provider)
        )
        future = asyncio.ensure_future(poll)
        self._polls[activation.id] = future
        future.add_done_callback(lambda _: self._polls.pop(activation.id, None))
        return future

    async def _leased_poll(
        self, activation: Activation, provider: Provider, now: float
    ) -> bool:
        try:
            taken = await self.store.lease(
                f"poll:{activation.id}", provider.poll_interval, now
            )
        except StoreError as exc:  # nothing could be stored anyway
            log.info("poll id=%d not made, store: %s", activation.id, exc)
            taken = False
        if not taken:  # another server holds it (or the store is down)
            self._quiet_until[activation.id] = now + provider.poll_interval / 2
            return False
        return await self._poll(activation, provider)

    def covered(self, activation_id: int, now: float) -> None:
        """A batch list answered for this activation at ``now``."""
        self._covered[activation_id] = now

    async def _poll(self, activation: Activation, provider: Provider) -> bool:
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
            return False
        await self.apply(activation, ref.upstream_id, result)
        return True

    async def apply(
        self, activation: Activation, upstream_id: str, result: PollResult
    ) -> bool:
        """Store what a poll of ``upstream_id`` found; whether anything changed.

        Nothing is written (and no lock taken) when it brings nothing new, so a batch
        list of thousands of quiet orders costs no store work.
        """
        known = {m.uid for m in activation.messages}
        news = any(m.uid not in known for m in result.messages)
        if not news and not (result.closed and activation.state == WAIT_CODE):
            return False
        async with self.store.lock(activation.id):
            if not activation.is_open or activation.upstream_id != upstream_id:
                return False
            changed = await self.store.add_messages(
                activation, result.messages, self.webhooks.activation_rows(activation)
            )
            if result.closed and activation.state == WAIT_CODE:
                # the upstream ended the order without a code: nothing to cancel there
                await self.store.set_state(activation, EXPIRED, self.clock())
                self._quiet_until.pop(activation.id, None)
                self._covered.pop(activation.id, None)
                changed = True
        return changed

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
        self._quiet_until.pop(activation.id, None)
        self._covered.pop(activation.id, None)
        self.outbox.wake.set()

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
        self._quiet_until.pop(activation.id, None)
        self._covered.pop(activation.id, None)
        log.warning(
            "id=%d provider=%s client left before its number was delivered:"
            " cancel queued upstream (abandoned so far: %d)",
            activation.id,
            activation.provider,
            self.abandoned_count,
        )
        self.outbox.wake.set()

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
            await self.outbox.deliver_now(activation, "ready")

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
            # a new wait for a code: the next getStatus (on any server) polls at once
            self._quiet_until.pop(activation.id, None)
            self._covered.pop(activation.id, None)
            with contextlib.suppress(StoreError):  # the lease then simply runs out
                await self.store.end_lease(f"poll:{activation.id}")

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
        for offer in await self.catalog.offers(name, activation.country):
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
                await self.router.budgets.release(hold)

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
        self._quiet_until.pop(activation.id, None)
        self._covered.pop(activation.id, None)
        await self.outbox.drain_now(activation.id)

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
        self._quiet_until.pop(activation.id, None)
        self._covered.pop(activation.id, None)
        await self.outbox.drain_now(activation.id)

    async def sweep(self) -> int:
        """Expire every open activation past its lifetime; returns how many.

        Once an hour it also prunes bookkeeping older than PRUNE_AFTER (attempts that
        bought nothing, delivered outbox calls), so a client hammering getNumber on
        NO_NUMBERS does not grow the store forever.
        """
        now = self.clock()
        # lease memos of activations closed elsewhere (another server) are dropped
        self._quiet_until = {i: t for i, t in self._quiet_until.items() if t > now}
        due = [a for a in self.store.open_activations() if a.expires_at <= now]
        for activation in due:
            await self.expire(activation)
        if now - self._pruned_at >= 3600:
            self._pruned_at = now
            await self.store.prune(now - PRUNE_AFTER)
        return len(due)
