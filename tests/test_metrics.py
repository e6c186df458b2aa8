"""/metrics (Prometheus text), /healthz and /readyz."""

from __future__ import annotations

import re

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from compat_server.config import parse_config
from compat_server.store import UNCERTAIN
from providers.vocabulary import Order
from tests.conftest import (
    KEY,
    OTHER_KEY,
    FakeClock,
    StartApp,
    call,
    engine_of,
    sandbox_raw,
)


async def scrape(
    client: TestClient,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as (name, sorted labels) -> value."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    assert KEY not in text and OTHER_KEY not in text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_upstream_calls_and_purchases(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    client = await start_app(parse_config(sandbox_raw(store_path)))
    _, _, first = await call(client, action="getNumber", service="tg", country=10)
    _, _, second = await call(client, action="getNumber", service="wa", country=10)
    assert await call(client, action="getNumber", service="zz", country=10) == (
        200, "text/plain", "BAD_SERVICE",
    )  # fmt: skip
    await call(client, action="getBalance")
    await call(client, action="noSuchAction")
    await call(client, api_key="wrong-key", action="getBalance")
    assert (await call(client, action="setStatus", id=first.split(":")[1], status=8))[
        2
    ] == "ACCESS_CANCEL"

    samples = await scrape(client)
    total = "sms_compat_requests_total"
    assert value(samples, total, action="getNumber", outcome="ACCESS_NUMBER") == 2
    assert value(samples, total, action="getNumber", outcome="BAD_SERVICE") == 1
    assert value(samples, total, action="getBalance", outcome="ACCESS_BALANCE") == 1
    assert value(samples, total, action="getBalance", outcome="BAD_KEY") == 1
    assert value(samples, total, action="other", outcome="BAD_ACTION") == 1
    assert value(samples, total, action="setStatus", outcome="ACCESS_CANCEL") == 1
    assert value(samples, "sms_compat_request_seconds_count", action="getNumber") == 3
    up = "sms_compat_upstream_calls_total"
    assert value(samples, up, provider="sandbox", op="buy", outcome="ok") == 2
    assert (
        value(samples, up, provider="sandbox", op="buy", outcome="UnknownService") == 1
    )
    assert value(samples, up, provider="sandbox", op="balance", outcome="ok") == 1
    assert value(samples, up, provider="sandbox", op="cancel", outcome="ok") == 1
    assert (
        value(
            samples, "sms_compat_upstream_seconds_count", provider="sandbox", op="buy"
        )
        == 3
    )
    bought = "sms_compat_purchases_total"
    assert value(samples, bought, provider="sandbox", key="tester") == 2
    spend = "sms_compat_spend_total"
    assert value(samples, spend, provider="sandbox", key="tester", currency="RUB") == 43
    opened = "sms_compat_open_activations"
    assert value(samples, opened, provider="sandbox", key="tester") == 1
    assert value(samples, opened, provider="sandbox", key="other") == 0
    circuit = "sms_compat_circuit_state"
    assert value(samples, circuit, provider="sandbox", state="closed") == 1
    assert value(samples, circuit, provider="sandbox", state="open") == 0
    assert value(samples, "sms_compat_outbox_depth", op="cancel") == 0
    assert value(samples, "sms_compat_purchase_attempts", state="confirmed") == 2
    assert value(samples, "sms_compat_purchase_attempts", state="refused") == 1
    assert second.startswith("ACCESS_NUMBER:")


async def test_metrics_show_circuits_outbox_and_reconciler(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    raw = sandbox_raw(store_path, breaker={"failures": 1, "cooldown": 30})
    client = await start_app(parse_config(raw))
    engine = engine_of(client)
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    # an attempt of unknown outcome that bought nothing: the reconciler settles it
    attempt = await engine.store.begin_purchase(
        engine.config.keys[0].key_id, "sandbox", Order("wa", 10), clock()
    )
    await engine.store.end_purchase(attempt, UNCERTAIN, "read timeout", clock())
    clock.advance(901)
    assert await engine.reconciler.step() == 0
    # an outbox call the upstream does not take yet, and a circuit that opens
    activation = await engine.store.get(int(body.split(":")[1]))
    assert activation is not None
    await engine.store.enqueue(activation.id, "finish", clock())
    engine.upstreams.breakers["sandbox"].failure()

    samples = await scrape(client)
    assert (
        value(samples, "sms_compat_circuit_state", provider="sandbox", state="open")
        == 1
    )
    assert (
        value(samples, "sms_compat_circuit_state", provider="sandbox", state="closed")
        == 0
    )
    assert value(samples, "sms_compat_outbox_depth", op="finish") == 1
    assert (
        value(samples, "sms_compat_reconciler_findings", finding="nothing_found") == 1
    )
    assert (
        value(samples, "sms_compat_reconciler_findings", finding="orphan_cancelled")
        == 0
    )
    assert value(samples, "sms_compat_purchase_attempts", state="reconciled") == 1


async def test_each_app_has_its_own_registry(
    start_app: StartApp, store_path: str, tmp_path: object
) -> None:
    one = await start_app(parse_config(sandbox_raw(store_path)))
    other = await start_app(parse_config(sandbox_raw(str(tmp_path) + "/other.sqlite3")))
    await call(one, action="getBalance")
    samples = await scrape(other)
    total = "sms_compat_requests_total"
    assert value(samples, total, action="getBalance", outcome="ACCESS_BALANCE") == 0
    text = await (await one.get("/metrics")).text()
    assert re.search(
        r'^sms_compat_requests_total\{action="getBalance",outcome="ACCESS_BALANCE"\} 1\.0$',
        text,
        re.M,
    )


async def test_healthz_and_readyz(start_app: StartApp, store_path: str) -> None:
    raw = sandbox_raw(store_path, breaker={"failures": 1, "cooldown": 30})
    client = await start_app(parse_config(raw))
    resp = await client.get("/healthz")
    assert (resp.status, resp.content_type, await resp.json()) == (
        200, "application/json", {"status": "ok"},
    )  # fmt: skip
    resp = await client.get("/readyz")
    assert (resp.status, await resp.json()) == (
        200, {"status": "ready", "store": "writable", "circuits": {"sandbox": "closed"}},
    )  # fmt: skip
    engine_of(client).upstreams.breakers["sandbox"].failure()
    resp = await client.get("/readyz")
    assert (resp.status, await resp.json()) == (
        503, {"status": "not ready", "store": "writable", "circuits": {"sandbox": "open"}},
    )  # fmt: skip
