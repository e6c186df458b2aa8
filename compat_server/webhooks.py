"""Webhooks: sms-activate's POST to a key's ``webhook`` URL when an SMS arrives.

The JSON is sms-activate's (protocol.md 3.22): ``activationId``, ``service``, ``text``,
``code``, ``country``, ``receivedAt`` (for a rent, ``activationId`` is the rent id).
Deliveries are queued in the store's ``webhooks`` table in the transaction that stores
the SMS, so a restart loses none, and sent by a background loop, so a client request never waits
for a receiver. A delivery is retried with backoff until the receiver answers 200, at
most MAX_ATTEMPTS times within MAX_AGE (sms-activate: 8 times within 2 hours), and
never again after a 200. The URL is the key's own, read from the config at delivery
time: a delivery never goes to another key's URL. URLs are never logged (they may
carry credentials).

SMS arrive when the server polls upstream, so :meth:`Webhooks.step` also polls the
open activations and rents of every key that has a webhook.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

from compat_server import dialect
from compat_server.config import Config, KeyConfig
from compat_server.store import Activation, Rent, Store, WebhookJob, WebhookRows
from providers.vocabulary import Clock

log = logging.getLogger("compat_server")

MAX_ATTEMPTS = 8
MAX_AGE = 7200.0  # seconds
BACKOFF = (10.0, 30.0, 60.0, 180.0, 420.0, 900.0, 1800.0)  # after attempt 1..7: ~56 min
TIMEOUT = 10.0  # seconds a receiver has to answer
DELIVERED, GAVE_UP = "delivered", "gave_up"


def _received_at(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def payload(
    ident: int, service: str, country: int, text: str, code: str, at: float
) -> dict[str, Any]:
    """The body sms-activate posts for one SMS."""
    return {
        "activationId": ident,
        "service": service,
        "text": text,
        "code": dialect.safe_code(code) if code else "",
        "country": country,
        "receivedAt": _received_at(at),
    }


class Webhooks:
    """Queue and deliver webhooks; poll what webhook keys hold."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self.config = config  # swapped by ops.apply on a reload
        self.store = store
        self.clock = clock
        self.http: httpx.AsyncClient | None = None  # set by the app at startup
        # set by the Engine: the rooms that poll an activation and a rent upstream
        self.refresh_activation: Callable[[Activation], Awaitable[object]] | None = None
        self.refresh_rent: Callable[[Rent], Awaitable[object]] | None = None
        self._keys = {k.key_id: k for k in config.keys}
        self._sending: set[int] = set()

    def key(self, key_id: str) -> KeyConfig | None:
        """The key config with a webhook for a stored key id, else None."""
        key = self._keys.get(key_id)
        return key if key is not None and key.webhook else None

    def activation_rows(self, activation: Activation) -> WebhookRows | None:
        """The store's hook turning an activation's new SMS into deliveries."""
        if self.key(activation.key_id) is None:
            return None

        def rows(messages: Sequence[Any]) -> list[tuple[str, str, dict[str, Any]]]:
            return [
                (
                    activation.key_id,
                    f"a:{activation.id}:{m.uid}",
                    payload(
                        activation.id,
                        activation.service,
                        activation.country,
                        m.text,
                        m.code,
                        m.received_at,
                    ),
                )  # fmt: skip
                for m in messages
            ]

        return rows

    def rent_rows(self, rent: Rent) -> WebhookRows | None:
        """The store's hook turning a rent's new SMS into deliveries."""
        if self.key(rent.key_id) is None:
            return None

        def rows(messages: Sequence[Any]) -> list[tuple[str, str, dict[str, Any]]]:
            return [
                (
                    rent.key_id,
                    f"r:{rent.id}:{m.uid}",
                    payload(
                        rent.id,
                        rent.service,
                        rent.country,
                        m.text,
                        m.code,
                        m.received_at,
                    ),
                )  # fmt: skip
                for m in messages
            ]

        return rows

    async def step(self) -> int:
        """Poll what webhook keys hold, then deliver what is due; returns deliveries."""
        await self.poll()
        return await self.deliver()

    async def poll(self) -> None:
        """Refresh open activations and active rents of every key with a webhook."""
        if not any(k.webhook for k in self.config.keys):
            return
        refresh, refresh_rent = self.refresh_activation, self.refresh_rent
        tasks: list[Awaitable[object]] = []
        if refresh is not None:
            tasks.extend(
                refresh(a)
                for a in self.store.open_activations()
                if self.key(a.key_id) is not None
            )
        if refresh_rent is not None:
            for rent in await self.store.active_rents():
                if self.key(rent.key_id) is not None:
                    tasks.append(refresh_rent(rent))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("webhook poll failed: %s", type(result).__name__)

    async def deliver(self) -> int:
        """Send every due delivery once (side by side); returns how many got a 200."""
        jobs = [
            j
            for j in await self.store.due_webhooks(self.clock())
            if j.id not in self._sending
        ]
        results = await asyncio.gather(*(self._send(j) for j in jobs))
        return sum(results)

    async def _send(self, job: WebhookJob) -> int:
        key = self.key(job.key_id)
        store = self.store
        if key is None or key.webhook is None or self.http is None:
            await store.webhook_done(job.id, GAVE_UP, "key has no webhook")
            return 0
        self._sending.add(job.id)
        attempt = job.attempts + 1
        try:
            try:
                response = await self.http.post(
                    key.webhook, json=job.payload, timeout=TIMEOUT
                )
                outcome = f"HTTP {response.status_code}"
                ok = response.status_code == 200
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
                outcome, ok = type(exc).__name__, False
            log.info(
                "webhook key=%s id=%s attempt=%d outcome=%s",
                key.alias,
                job.payload.get("activationId"),
                attempt,
                outcome,
            )
            if ok:
                await store.webhook_done(job.id, DELIVERED)
                return 1
            now = self.clock()
            delay = BACKOFF[min(attempt, len(BACKOFF)) - 1]
            if attempt >= MAX_ATTEMPTS or now + delay > job.created_at + MAX_AGE:
                log.warning(
                    "webhook key=%s id=%s given up after %d attempts (%s)",
                    key.alias,
                    job.payload.get("activationId"),
                    attempt,
                    outcome,
                )
                await store.webhook_done(job.id, GAVE_UP, outcome)
            else:
                await store.webhook_failed(job.id, now + delay, outcome)
            return 0
        finally:
            self._sending.discard(job.id)
