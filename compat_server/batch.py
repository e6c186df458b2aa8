"""Batch polling: one list call per poll interval per account, not one poll per number.

Where a provider lists many orders in one call (``Provider.can_poll_many``: thuecodesim's
``session/historyv2``, smspva's ``orders``, a clone's ``getActiveActivations``), the
:class:`BatchPoller` asks that list once per ``poll_interval`` while the provider has
open activations, and stores what changed: new messages (with their webhooks) and
orders the list says are over. getStatus then answers those activations from the store
(``Lifecycle.covered``) instead of polling each one.

What a list does not cover falls back to the per-activation path, never to a guess:

* an order the list leaves out, or a list call that fails, keeps its last known state
  and its cover lapses, so after ``COVERED_FOR`` intervals getStatus polls it alone
  again (``Lifecycle.refresh``);
* an order the list shows with news it does not carry (smspva: ``hasnewsms``, a status
  other than waiting) is polled alone at once (``Lifecycle.poll_now``) while it waits
  for a code (WAIT_CODE, WAIT_RETRY), and covered once that poll answered (one that
  failed is left to getStatus). One that already shows a code keeps it and is
  covered: its client has what it waited for, and a further SMS is asked for with
  setStatus 3 (WAIT_RETRY), which fetches it. Fetching those every interval would
  spend a paced upstream (smspva: 4.5 s a call) on numbers nobody waits for;
* an order the list leaves out, still waiting for a code, is also polled alone by the
  list's holder (at most ABSENT_MAX a batch), so that servers trusting the list
  (below) do not leave it unpolled;
* a list call that fails backs off (2, 4, ... intervals, at most BACKOFF_MAX s), so a
  backend whose list is broken keeps being polled number by number.

While the loop runs, an activation getStatus sees for the first time (just bought, or
loaded at a restart) waits for its provider's next batch rather than being polled alone:
10,000 numbers loaded at a restart would otherwise queue 10,000 polls on a paced
upstream (smspva: 4.5 s each) ahead of the one list call.

The call is taken under ``store.lease(f"batch:{provider}", ...)``, so servers sharing
one database make one list call per interval between them; a server refused the lease
covers its provider's open activations, since the holder stores what the list says and
its getStatus reads the shared store. Each batch is one log line
(provider, count, latency, what changed), without any secret.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from compat_server.lifecycle import Lifecycle
from compat_server.routing import Upstreams
from compat_server.store import CODE, Store
from providers.vocabulary import BUDGET, Budget, Clock, ProviderError

log = logging.getLogger("compat_server")

TICK = 0.25  # seconds between checks for a provider whose interval has passed
# the lease is a little shorter than the interval: a tick that lands a hair early on
# the next interval must not find the previous lease still held and skip a whole one
LEASE_SHARE = 0.9
# orders a list leaves out, polled alone per batch at most (the rest wait for the next)
ABSENT_MAX = 50
BACKOFF_MAX = 60.0  # seconds at most between list calls of a provider whose list fails


class BatchPoller:
    """Per batch-capable provider: one list call per poll interval, results stored."""

    def __init__(
        self, store: Store, upstreams: Upstreams, lifecycle: Lifecycle, clock: Clock
    ) -> None:
        self.store = store
        self.upstreams = upstreams
        self.lifecycle = lifecycle
        self.clock = clock
        self._due: dict[str, float] = {}  # provider -> clock time of its next batch
        self._running: dict[str, asyncio.Task[int]] = {}
        self._failures: dict[str, int] = {}  # provider -> list calls failed in a row

    def step(self) -> int:
        """Start a batch for every provider whose interval has passed; how many."""
        now = self.clock()
        started = 0
        for name, provider in list(self.upstreams.providers.items()):
            if not provider.can_poll_many or name in self._running:
                continue
            if now < self._due.get(name, -1e18):
                continue
            self._due[name] = now + provider.poll_interval
            task = asyncio.create_task(self.poll(name))
            self._running[name] = task
            task.add_done_callback(functools.partial(self._finished, name))
            started += 1
        return started

    async def wait(self) -> None:
        """Until the batches started by step() are done (tests step it by hand)."""
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    def _finished(self, name: str, _: object) -> None:
        self._running.pop(name, None)

    async def run_forever(self, tick: float = TICK) -> None:
        """Step every ``tick`` seconds until cancelled (the app's cleanup_ctx loop).

        While it runs, getStatus leaves an activation it has not seen polled to the
        next batch of its provider (``Lifecycle.batching``), unless that provider's
        list is failing.
        """
        try:
            while True:
                try:
                    self.lifecycle.batching = frozenset(
                        name
                        for name, provider in self.upstreams.providers.items()
                        if provider.can_poll_many and name not in self._failures
                    )
                    self.step()
                except Exception:
                    log.exception("background batch poller failed; continuing")
                await asyncio.sleep(tick)
        finally:
            self.lifecycle.batching = frozenset()
            running = list(self._running.values())
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def poll(self, name: str) -> int:
        """One batch for one provider (if it has open activations and the lease is
        free); how many activations it changed. Failures are logged, never raised."""
        provider = self.upstreams.providers.get(name)
        if provider is None or not provider.can_poll_many:
            return 0
        now = self.clock()
        open_ = [
            a
            for a in self.store.open_activations()
            if a.provider == name and a.expires_at > now
        ]
        if not open_:
            return 0
        lease = f"batch:{name}"
        if not await self.store.lease(lease, provider.poll_interval * LEASE_SHARE, now):
            # another server sharing the store holds this interval's list call: it
            # stores what the list says (and polls alone what the list leaves out),
            # so getStatus here answers from the store rather than polling each one
            for waiting in open_:
                self.lifecycle.covered(waiting.id, now)
            return 0
        by_upstream = {a.upstream_id: a for a in open_}
        refs = [a.ref() for a in open_]
        started = time.perf_counter()
        # a batch serves every waiting client at once: it is paced as a client call
        scope = BUDGET.set(Budget())
        try:
            batch = await self.upstreams.call(
                name, "poll_many", functools.partial(provider.poll_many, refs)
            )
        except ProviderError as exc:
            failures = self._failures[name] = self._failures.get(name, 0) + 1
            wait = min(provider.poll_interval * 2**failures, BACKOFF_MAX)
            self._due[name] = max(self._due.get(name, now), self.clock() + wait)
            log.info(
                "batch poll provider=%s count=%d failed: %s ms=%.1f (next in %.0f s)",
                name,
                len(refs),
                type(exc).__name__,
                (time.perf_counter() - started) * 1000,
                wait,
            )
            return 0
        finally:
            BUDGET.reset(scope)
        self._failures.pop(name, None)
        listed_ms = (time.perf_counter() - started) * 1000
        answered = self.clock()
        changed = 0
        for upstream_id, result in batch.results.items():
            activation = by_upstream.get(upstream_id)
            if activation is None:
                continue
            if await self.lifecycle.apply(activation, upstream_id, result):
                changed += 1
            # not re-rented meanwhile (setStatus 3 on thuecodesim): then the answer
            # was about its old order, and the new one waits for the next batch
            if activation.is_open and activation.upstream_id == upstream_id:
                self.lifecycle.covered(activation.id, answered)
        fetch = []
        for upstream_id in batch.fetch:
            activation = by_upstream.get(upstream_id)
            if activation is None or not activation.is_open:
                continue
            if activation.upstream_id != upstream_id:
                continue
            if activation.state == CODE:
                self.lifecycle.covered(activation.id, answered)
            else:
                fetch.append(activation)
        # orders the list left out, still waiting for a code: polled alone here, by
        # the list's holder (another server sharing the store trusts this list)
        listed = batch.results.keys() | set(batch.fetch)
        if provider.can_poll_many:  # (a clone without the list turns it off)
            fetch += [
                a
                for a in open_
                if a.upstream_id not in listed and a.is_open and a.state != CODE
            ][:ABSENT_MAX]
        before = [len(a.messages) for a in fetch]
        answers = await asyncio.gather(*(self.lifecycle.poll_now(a) for a in fetch))
        fetched = self.clock()
        for activation, answered_alone in zip(fetch, answers, strict=True):
            # a fetch that failed leaves getStatus its own poll; one that answered
            # covers it (else, on a paced upstream, its client's next getStatus
            # would queue a poll of its own ahead of the next list call)
            if answered_alone and activation.is_open:
                self.lifecycle.covered(activation.id, fetched)
        changed += sum(
            1 for a, n in zip(fetch, before, strict=True) if len(a.messages) != n
        )
        log.info(
            "batch poll provider=%s count=%d listed=%d fetched=%d changed=%d ms=%.1f",
            name,
            len(refs),
            len(batch.results),
            len(fetch),
            changed,
            listed_ms,
        )
        return changed
