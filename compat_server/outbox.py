"""The outbox: cancels, finishes and readies the upstream has still to hear of.

Every such call is queued in the store first (with the state change that needs it),
then delivered at once where it can be, else by :meth:`Outbox.step` with backoff. It
resumes from the store after a restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from compat_server.config import Config
from compat_server.routing import Upstreams
from compat_server.store import CANCELLED, CODE, EXPIRED, Activation, OutboxOp, Store
from providers.base import Provider
from providers.vocabulary import (
    Clock,
    NotNow,
    ProviderError,
    UpstreamAuth,
    UpstreamUncertain,
    UpstreamUnreachable,
)

log = logging.getLogger("compat_server")

# Upstream failures after which a queued call is tried again; any other answer is final.
RETRYABLE = (UpstreamUnreachable, UpstreamUncertain, UpstreamAuth, NotNow)
INLINE_TIMEOUT = 5.0  # seconds a setStatus waits for the upstream before queueing


class Outbox:
    """Delivers queued upstream calls: inline first, then in the background."""

    def __init__(
        self, config: Config, store: Store, upstreams: Upstreams, clock: Clock
    ) -> None:
        self.config = config
        self.store = store
        self.upstreams = upstreams
        self.clock = clock
        self.wake = asyncio.Event()  # set when a call was queued: the loop runs now
        self._delivering: set[int] = set()  # outbox ops being delivered right now
        self._inline: set[asyncio.Future[int]] = set()  # drain_now deliveries running

    async def deliver_now(self, activation: Activation, op: str) -> None:
        """Queue ``op`` for the activation and try it at once."""
        await self.store.enqueue(activation.id, op, self.clock())
        await self.drain_now(activation.id)

    async def drain_now(self, activation_id: int) -> None:
        """Try the queued calls of one activation at once, waiting a bounded time.

        Past INLINE_TIMEOUT (or when the caller is cancelled) the delivery is not
        abandoned: the calls it claimed are its own until they are answered (bounded
        by the upstream timeouts), so the upstream hears each of them once.
        """
        task = asyncio.ensure_future(self.step(only=activation_id))
        self._inline.add(task)
        task.add_done_callback(self._inline_done)
        try:
            await asyncio.wait_for(asyncio.shield(task), INLINE_TIMEOUT)
        except asyncio.TimeoutError:
            log.info(
                "id=%d upstream slow: queued call left to finish in the background",
                activation_id,
            )

    def _inline_done(self, task: asyncio.Future[int]) -> None:
        self._inline.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("inline delivery failed: %s", type(task.exception()).__name__)

    # ---- background work ----------------------------------------------------------------

    async def step(self, only: int | None = None) -> int:
        """Deliver due queued calls once; returns how many were delivered."""
        delivered = 0
        # claimed: no other caller here, and no other server, gets these until each
        # is done or rescheduled (only=: nothing of another activation is claimed)
        for op in await self.store.due_ops(self.clock(), activation_id=only):
            if op.id in self._delivering:
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
            None
            if activation is None
            else self.upstreams.providers.get(activation.provider)
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

    async def run_forever(self, interval: float) -> None:
        """Deliver due calls every ``interval`` seconds, or at once when woken."""
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background outbox failed; continuing")
            try:
                await asyncio.wait_for(self.wake.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
