"""The aiohttp application: resources in cleanup contexts, one handler for the dialect."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import httpx
from aiohttp import web

from compat_server import dialect, logs
from compat_server.actions import ACTIONS, Call
from compat_server.config import Config
from compat_server.engine import Engine
from compat_server.errors import BadAction, BadKey, CompatError, NoKey
from compat_server.store import Store
from providers import get_provider_class
from providers.base import Clock, Provider

log = logging.getLogger("compat_server")

CONFIG = web.AppKey("config", Config)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
HTTP = web.AppKey("http", httpx.AsyncClient)
STORE = web.AppKey("store", Store)
ENGINE = web.AppKey("engine", Engine)
BACKGROUND = web.AppKey("background", bool)

PATHS = ("/stubs/handler_api.php", "/stubs/handler_api")
METHODS = ("GET", "POST")


def create_app(
    config: Config,
    *,
    clock: Clock = time.time,
    http: httpx.AsyncClient | None = None,
    background: bool = True,
) -> web.Application:
    """Build the server; nothing touches the network or disk before startup.

    ``http`` lets tests and the benchmark share a client; ``background=False`` leaves
    the outbox, sweeper and reconciler to be stepped by hand.
    """
    quiet_secret_loggers()
    logs.install(config)
    app = web.Application(
        middlewares=[dialect.render_errors], client_max_size=dialect.MAX_BODY
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    app[BACKGROUND] = background
    app.cleanup_ctx.extend([_http_client(http), _database, _engine, _background_tasks])
    app.cleanup_ctx.append(_log_summaries)
    for path in PATHS:
        for method in METHODS:  # never "*": HEAD or OPTIONS must not buy a number
            app.router.add_route(method, path, handle_api)
        app.router.add_route("*", path, method_not_allowed)
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


def make_http_client(config: Config) -> httpx.AsyncClient:
    """The one upstream client: explicit timeouts and connection limits."""
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


async def _database(app: web.Application) -> AsyncIterator[None]:
    store = await Store.open(app[CONFIG].store_path)
    app[STORE] = store
    try:
        yield
    finally:
        await store.close()


def build_providers(
    config: Config, http: httpx.AsyncClient, clock: Clock
) -> dict[str, Provider]:
    """One provider instance per configured account."""
    return {
        name: get_provider_class(p.type)(name, p.options, http, clock)
        for name, p in config.providers.items()
    }


async def _engine(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    providers = build_providers(config, app[HTTP], app[CLOCK])
    app[ENGINE] = Engine(config, app[STORE], providers, app[CLOCK])
    for name, provider in providers.items():
        log.info("provider %s: %s", name, provider.describe())
    yield


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    if not app[BACKGROUND]:
        yield
        return
    engine = app[ENGINE]
    config = app[CONFIG]
    tasks = [
        asyncio.create_task(
            engine.run_forever("outbox", config.outbox_interval, engine.run_outbox)
        ),
        asyncio.create_task(
            engine.run_forever("sweeper", config.sweep_interval, engine.sweep)
        ),
        asyncio.create_task(
            engine.run_forever(
                "reconciler", config.reconcile_interval, engine.reconcile
            )
        ),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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
        call = Call(engine, key, params)
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
        if log.isEnabledFor(logging.INFO):
            log.info(
                "action=%s key=%s provider=%s outcome=%s ms=%.1f",
                _printable(action),
                alias,
                call.provider if call else "-",
                outcome,
                (time.perf_counter() - started) * 1000,
            )


def _printable(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "?" for ch in text)
