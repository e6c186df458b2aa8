"""The aiohttp application: resources in cleanup contexts, one handler for the dialect."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
from aiohttp import web

from compat_server import admin, dialect, logs, ops
from compat_server.actions import ACTIONS, Call
from compat_server.app_keys import (  # noqa: F401 - re-exported for tests and cli
    ADMIN_CACHE,
    BACKGROUND,
    CLOCK,
    CONFIG,
    ENGINE,
    HTTP,
    METRICS,
    STORE,
    UPSTREAM,
)
from compat_server.background import every, loop_ctx
from compat_server.catalog import TtlCache
from compat_server.config import Config, build_provider
from compat_server.engine import Engine
from compat_server.errors import BadAction, BadKey, NoKey
from compat_server.metrics import Metrics, healthz, metrics_handler, readyz
from compat_server.rentals import reconcile as reconcile_rents
from compat_server.store import SqliteStore, Store
from providers.base import Provider
from providers.http import UpstreamHttp
from providers.vocabulary import BUDGET, Budget, Clock, CompatError

log = logging.getLogger("compat_server")


PATHS = ("/stubs/handler_api.php", "/stubs/handler_api")
METHODS = ("GET", "POST")


def create_app(
    config: Config,
    *,
    clock: Clock = time.time,
    http: httpx.AsyncClient | None = None,
    upstream: UpstreamHttp | None = None,
    background: bool = True,
    sighup: bool = False,
) -> web.Application:
    """Build the server; nothing touches the network or disk before startup.

    ``http`` (the webhooks' client) and ``upstream`` (the providers') let tests and
    the benchmark share a client; ``background=False`` leaves
    the outbox, sweeper and reconciler to be stepped by hand; ``sighup=True`` (the
    ``serve`` command) re-reads the config file on SIGHUP.
    """
    quiet_secret_loggers()
    logs.install(config)
    app = web.Application(
        middlewares=[dialect.render_errors], client_max_size=dialect.MAX_BODY
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    app[BACKGROUND] = background
    app[METRICS] = Metrics(ACTIONS)
    app[ADMIN_CACHE] = TtlCache(admin.BALANCE_TTL, clock)
    app.cleanup_ctx.extend(
        [_http_client(http), _upstream_client(upstream), _database, _engine]
    )
    app.cleanup_ctx.extend(BACKGROUND_LOOPS)
    app.cleanup_ctx.append(_log_summaries)
    if sighup:
        app.cleanup_ctx.append(ops.reload_on_sighup)
    for path in PATHS:
        for method in METHODS:  # never "*": HEAD or OPTIONS must not buy a number
            app.router.add_route(method, path, handle_api)
        app.router.add_route("*", path, method_not_allowed)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    admin.add_routes(app)
    return app


async def method_not_allowed(request: web.Request) -> web.StreamResponse:
    """405 for every method but GET and POST; nothing runs, nothing is bought.

    A CORS preflight (OPTIONS) gets no grant either: sms-activate clients are
    server-side programs, and a browser page holding an api_key would hand the key's
    money to anyone who reads the page.
    """
    log.info("method=%s outcome=405", _printable(request.method[:16]))
    return web.Response(
        status=405,
        text="405: Method Not Allowed",
        headers={"Allow": ", ".join(METHODS)},
    )


def quiet_secret_loggers() -> None:
    """httpx/httpcore log full URLs (with upstream tokens) at INFO/DEBUG: keep them quiet."""
    # aiosqlite logs every SQL parameter at DEBUG: phone numbers and SMS texts
    for name in ("httpx", "httpcore", "hpack", "aiosqlite"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_upstream_client(config: Config) -> UpstreamHttp:
    """The one upstream client of the providers (see providers/http.py for why aiohttp)."""
    return UpstreamHttp(
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        max_connections=config.upstream_connections,
    )


def _upstream_client(shared: UpstreamHttp | None):  # type: ignore[no-untyped-def]
    async def upstream_client(app: web.Application) -> AsyncIterator[None]:
        if shared is not None:
            app[UPSTREAM] = shared
            yield
            return
        async with make_upstream_client(app[CONFIG]) as client:
            app[UPSTREAM] = client
            yield

    return upstream_client


def make_http_client(config: Config) -> httpx.AsyncClient:
    """The webhooks' client: explicit timeouts and connection limits."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        follow_redirects=False,
        headers={"User-Agent": "sms-compat/0.1"},
    )


def _http_client(shared: httpx.AsyncClient | None):  # type: ignore[no-untyped-def]
    async def http_client(app: web.Application) -> AsyncIterator[None]:
        if shared is not None:
            app[HTTP] = shared
            yield
            return
        async with make_http_client(app[CONFIG]) as client:
            app[HTTP] = client
            yield

    return http_client


async def open_store(config: Config, clock: Clock) -> Store:
    """The store the config names: PostgreSQL at ``store.url``, else SQLite at
    ``store.path``. StoreError (one line, no password) when it cannot be used."""
    if config.store_url is not None:
        from compat_server.store.postgres import PostgresStore  # asyncpg only then

        return await PostgresStore.open(
            config.store_url,
            clock,
            pool_min=config.store_pool_min,
            pool_max=config.store_pool_max,
            busy_timeout=config.store_busy_timeout,
        )
    return await SqliteStore.open(config.store_path, clock, config.store_busy_timeout)


async def _database(app: web.Application) -> AsyncIterator[None]:
    store = await open_store(app[CONFIG], app[CLOCK])
    app[STORE] = store
    watch = asyncio.create_task(store.watch()) if app[BACKGROUND] else None
    try:
        yield
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await store.close()


def build_providers(
    config: Config, http: UpstreamHttp, clock: Clock
) -> dict[str, Provider]:
    """One provider instance per configured account."""
    return {
        name: build_provider(name, p, http, clock)
        for name, p in config.providers.items()
    }


async def _engine(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    providers = build_providers(config, app[UPSTREAM], app[CLOCK])
    engine = app[ENGINE] = Engine(config, app[STORE], providers, app[CLOCK])
    metrics = app[METRICS]
    engine.upstreams.observe = metrics.upstream
    engine.on_purchase = lambda key, a: metrics.purchase(key, a, engine.config.currency)
    engine.webhooks.http = app[HTTP]
    for name, provider in providers.items():
        log.info("provider %s: %s", name, provider.describe())
    yield


def _background(
    loop: Callable[[Engine, Config], Coroutine[Any, Any, None]],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """One background loop as its own cleanup_ctx (none when ``background=False``)."""
    return loop_ctx(
        lambda app: loop(app[ENGINE], app[CONFIG]) if app[BACKGROUND] else None
    )


BACKGROUND_LOOPS = [
    _background(lambda e, c: e.outbox.run_forever(c.outbox_interval)),
    _background(lambda e, c: every("sweeper", c.sweep_interval, e.lifecycle.sweep)),
    _background(
        lambda e, c: every("reconciler", c.reconcile_interval, e.reconciler.step)
    ),
    _background(lambda e, c: every("webhooks", c.outbox_interval, e.webhooks.step)),
    _background(
        lambda e, c: every("budget holds", c.outbox_interval, e.router.budgets.step)
    ),
    _background(lambda e, c: e.batch.run_forever()),
    _background(
        lambda e, c: every(
            "rent reconciler",
            c.reconcile_interval,
            functools.partial(reconcile_rents, e.rentals),
        )
    ),
]


async def _log_summaries(app: web.Application) -> AsyncIterator[None]:
    """Every log_repeat_interval: how often each repeating failure was held back."""

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(max(app[CONFIG].log_repeat_interval, 0.05))
            logs.THROTTLE.flush()

    task = asyncio.create_task(flush_forever())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    logs.THROTTLE.flush(everything=True)


async def handle_api(request: web.Request) -> web.StreamResponse:
    """Authenticate, dispatch on ``action``, render; one log line per request."""
    started = time.perf_counter()
    action = "-"
    alias = "-"
    call: Call | None = None
    outcome = "?"
    # every upstream call made for this request must start before the deadline, and
    # none starts once the client has gone (see providers.base.Budget)
    scope = BUDGET.set(
        Budget(
            deadline=time.monotonic() + request.app[CONFIG].request_deadline,
            alive=functools.partial(_connected, request),
        )
    )
    try:
        params = await dialect.read_params(request, request.app[CONFIG].body_timeout)
        action = dialect.param(params, "action")[:40] or "-"
        presented = params.get("api_key", "")
        if not presented:
            raise NoKey()
        if len(presented) > 256:
            raise BadKey()
        engine = request.app[ENGINE]
        key = engine.config.find_key(presented)
        if key is None:
            raise BadKey()
        alias = key.alias
        handler = ACTIONS.get(action)
        if handler is None:
            raise BadAction()
        call = Call.of(engine, key, params)
        reply = await handler(call)
        outcome = reply.split(":", 1)[0] if isinstance(reply, str) else "json"
        return dialect.render(reply)
    except CompatError as exc:
        outcome = dialect.error_token(exc).value
        raise
    except Exception:
        outcome = "ERROR_SQL"
        raise
    finally:
        BUDGET.reset(scope)
        elapsed = time.perf_counter() - started
        request.app[METRICS].request(action, outcome, elapsed)
        if log.isEnabledFor(logging.INFO):
            fields = ops.request_fields(request, call)
            log.info(
                "action=%s key=%s provider=%s outcome=%s ms=%.1f%s",
                _printable(action),
                alias,
                call.provider if call else "-",
                outcome,
                elapsed * 1000,
                ops.fields_text(fields),
                extra={
                    "fields": {
                        "action": _printable(action),
                        "key": alias,
                        "provider": call.provider if call else "-",
                        "outcome": outcome,
                        "ms": round(elapsed * 1000, 1),
                        **fields,
                    }
                },
            )


def _connected(request: web.Request) -> bool:
    """Whether the client of ``request`` is still connected."""
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _printable(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "?" for ch in text)
