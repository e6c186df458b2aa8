"""``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz``.

Each app has its own :class:`prometheus_client.CollectorRegistry` (never the global one),
so two apps in one process (the tests) do not share figures. Counters and histograms are
fed as things happen (requests, upstream calls, purchases); the figures that live in the
store (open activations, outbox depth, purchase attempts and reconciler findings) and the
circuit states are read when scraped. Labels carry key aliases and provider names only,
never a key or a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from compat_server.app_keys import ENGINE, METRICS
from compat_server.config import Config, KeyConfig
from compat_server.routing import CLOSED, HALF_OPEN, OPEN, Upstreams
from compat_server.store import RECONCILED, Activation, Store

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CIRCUIT_STATES = (CLOSED, HALF_OPEN, OPEN)
# Upstream call outcomes that mean the provider failed (a refusal is an answer)
UPSTREAM_FAILURES = frozenset(
    {"UpstreamUnreachable", "UpstreamUncertain", "UpstreamAuth", "bug"}
)
# detail of a reconciled attempt -> finding (any other detail: an orphan was claimed)
FINDINGS = {"nothing found": "nothing_found", "unresolved": "unresolved"}
MAX_ACTION = 32  # longer (unknown) action names are folded into "other"


class Metrics:
    """Every metric of one app."""

    def __init__(self, actions: Mapping[str, object]) -> None:
        self.known_actions = frozenset(actions)
        self._per_provider: dict[str, tuple[int, int, float]] = {}
        self._request_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._upstream_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sms_compat_requests",
            "handler_api requests by action and answer token",
            ["action", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "sms_compat_request_seconds",
            "handler_api request latency by action",
            ["action"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_calls = Counter(
            "sms_compat_upstream_calls",
            "upstream calls by provider, operation and outcome",
            ["provider", "op", "outcome"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "sms_compat_upstream_seconds",
            "upstream call latency by provider and operation",
            ["provider", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.purchases = Counter(
            "sms_compat_purchases",
            "numbers sold to clients by provider and key alias",
            ["provider", "key"],
            registry=r,
        )
        self.spend = Counter(
            "sms_compat_spend",
            "what clients were charged (display currency) by provider and key alias",
            ["provider", "key", "currency"],
            registry=r,
        )
        self.open_activations = Gauge(
            "sms_compat_open_activations",
            "activations whose upstream order is alive",
            ["provider", "key"],
            registry=r,
        )
        self.circuit = Gauge(
            "sms_compat_circuit_state",
            "circuit breaker state per provider (1 for the current state)",
            ["provider", "state"],
            registry=r,
        )
        self.outbox = Gauge(
            "sms_compat_outbox_depth",
            "queued upstream calls (cancel, finish, ready) not yet delivered",
            ["op"],
            registry=r,
        )
        self.attempts = Gauge(
            "sms_compat_purchase_attempts",
            "purchase attempts in the store by state",
            ["state"],
            registry=r,
        )
        self.findings = Gauge(
            "sms_compat_reconciler_findings",
            "purchases of unknown outcome the reconciler settled, by finding",
            ["finding"],
            registry=r,
        )

    # ---- fed as things happen -----------------------------------------------------------

    def request(self, action: str, outcome: str, seconds: float) -> None:
        """One handler_api request."""
        if action not in self.known_actions:
            action = "other" if action != "-" else "-"
        outcome = outcome[:MAX_ACTION]
        # labels() validates and locks on every call: the children are kept instead
        # (these two families are never cleared)
        children = self._request_children.get((action, outcome))
        if children is None:
            children = self._request_children[(action, outcome)] = (
                self.requests.labels(action, outcome),
                self.request_seconds.labels(action),
            )
        children[0].inc()
        children[1].observe(seconds)

    def upstream(self, provider: str, op: str, outcome: str, seconds: float) -> None:
        """One upstream call (fed by Upstreams.call)."""
        children = self._upstream_children.get((provider, op, outcome))
        if children is None:
            children = self._upstream_children[(provider, op, outcome)] = (
                self.upstream_calls.labels(provider, op, outcome),
                self.upstream_seconds.labels(provider, op),
            )
        children[0].inc()
        children[1].observe(seconds)
        calls, errors, total = self._per_provider.get(provider, (0, 0, 0.0))
        failed = outcome in UPSTREAM_FAILURES
        self._per_provider[provider] = (calls + 1, errors + failed, total + seconds)

    def provider_stats(self) -> dict[str, tuple[int, int, float]]:
        """provider -> (calls, failed calls, mean seconds) since the start."""
        return {
            name: (calls, errors, total / calls)
            for name, (calls, errors, total) in self._per_provider.items()
        }

    def purchase(self, key: KeyConfig, activation: Activation, currency: str) -> None:
        """A number sold (fed by Engine.buy)."""
        self.purchases.labels(activation.provider, key.alias).inc()
        self.spend.labels(activation.provider, key.alias, currency).inc(
            max(float(activation.cost), 0.0)  # a counter never goes down
        )

    # ---- read when scraped --------------------------------------------------------------

    async def refresh(self, config: Config, upstreams: Upstreams, store: Store) -> None:
        """Set the gauges from the config, the circuits and the store."""
        aliases = {k.key_id: k.alias for k in config.keys}
        self.open_activations.clear()
        for name in upstreams.providers:
            for key in config.keys:
                self.open_activations.labels(name, key.alias).set(0)
        for activation in store.open_activations():
            alias = aliases.get(activation.key_id, "unknown")
            self.open_activations.labels(activation.provider, alias).inc()
        for name, breaker in upstreams.breakers.items():
            for candidate in CIRCUIT_STATES:
                self.circuit.labels(name, candidate).set(
                    int(breaker.state == candidate)
                )
        figures = await store.figures()
        self.outbox.clear()
        for op in ("cancel", "finish", "ready"):
            self.outbox.labels(op).set(0)
        for op, count in figures["outbox"]:
            self.outbox.labels(op).set(count)
        self.attempts.clear()
        self.findings.clear()
        states: dict[str, int] = {}
        findings = {"orphan_cancelled": 0, "nothing_found": 0, "unresolved": 0}
        for state, detail, count in figures["attempts"]:
            states[state] = states.get(state, 0) + count
            if state == RECONCILED:
                found = FINDINGS.get(detail, "orphan_cancelled")
                findings[found] += count
        for state, count in states.items():
            self.attempts.labels(state).set(count)
        for finding, count in findings.items():
            self.findings.labels(finding).set(count)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics."""

    metrics = request.app[METRICS]
    engine = request.app[ENGINE]
    await metrics.refresh(engine.config, engine.upstreams, engine.store)
    content_type, _, charset = CONTENT_TYPE_LATEST.partition("; charset=")
    return web.Response(
        body=metrics.render(), content_type=content_type, charset=charset or "utf-8"
    )


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: the store takes writes and at least one circuit is not open.

    503 with the same JSON when not ready, so a load balancer can read the status code.
    """

    engine = request.app[ENGINE]
    store, upstreams = engine.store, engine.upstreams  # the two rooms it reads
    writable = await store.writable()
    circuits = {name: b.state for name, b in upstreams.breakers.items()}
    usable = any(state != OPEN for state in circuits.values())
    ready = writable and usable
    body = {
        "status": "ready" if ready else "not ready",
        "store": "writable" if writable else "not writable",
        "circuits": circuits,
    }
    return web.json_response(body, status=200 if ready else 503)
