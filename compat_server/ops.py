"""Running the server: config reload on SIGHUP, JSON logs, the request log fields.

A reload re-reads the file the server was started with and swaps in its keys, budgets,
routes, markups and providers while requests keep flowing: open activations stay in the
store and in memory, a provider whose options did not change keeps its instance (and its
pacing and circuit), and a provider removed from the file keeps serving the activations
it already sold (it is simply no longer routed to). Settings fixed at startup (listen
address, store path, timeouts, worker intervals) are reported as needing a restart. An
invalid new file changes nothing and is reported in one log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from compat_server.app_keys import ENGINE, UPSTREAM
from compat_server.config import Config, build_provider, load_config
from compat_server.engine import Engine
from compat_server.routing import Breaker
from providers.base import Provider
from providers.vocabulary import ConfigError

if TYPE_CHECKING:
    from compat_server.actions import Call

log = logging.getLogger("compat_server")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Config fields read once at startup: a reload reports their change instead of using it.
RESTART_FIELDS = (
    "host",
    "port",
    "store_path",
    "store_url",
    "store_pool_min",
    "store_pool_max",
    "connect_timeout",
    "read_timeout",
    "upstream_connections",
    "outbox_interval",
    "sweep_interval",
    "reconcile_interval",
)


def unrefunded(providers: Mapping[str, Provider]) -> frozenset[str]:
    """Providers whose cancels give no money back (their spend stays spent)."""
    return frozenset(n for n, p in providers.items() if not type(p).can_cancel)


def reload(engine: Engine, path: str, http: Any) -> bool:
    """Re-read ``path`` into ``engine``; False (and one log line) if it is invalid."""
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("reload: config error, keeping the running config: %s", exc)
        return False
    apply(engine, new, http)
    return True


def apply(engine: Engine, new: Config, http: Any) -> None:
    """Swap ``new`` into a running engine (see the module docstring)."""
    old = engine.config
    providers = engine.upstreams.providers
    built: dict[str, Provider] = {}
    for name, wanted in new.providers.items():
        before = old.providers.get(name)
        if (
            name in providers
            and before is not None
            and before.type == wanted.type
            and dict(before.options) == dict(wanted.options)
        ):
            built[name] = providers[name]
        else:
            built[name] = build_provider(name, wanted, http, engine.clock)
    retired = [n for n in providers if n not in new.providers]
    for name in retired:  # still polls, cancels and finishes what it sold
        built[name] = providers[name]
    kept = {n for n in built if providers.get(n) is built[n]}
    breakers = engine.upstreams.breakers
    for name in built:
        if name not in kept or name not in breakers:  # a new account: a fresh circuit
            breakers[name] = Breaker(
                name,
                new.breaker_failures,
                new.breaker_cooldown,
                engine.clock,
                engine._breaker_changed,
            )
        breakers[name].threshold = max(1, new.breaker_failures)
        breakers[name].cooldown = new.breaker_cooldown
    providers.clear()
    providers.update(built)
    engine.store.set_unrefunded(unrefunded(providers))
    engine.config = new
    engine.upstreams.config = new
    engine.prices.config = new
    engine.prices.providers = providers
    engine.router.config = new
    engine.catalog.reset(new)
    engine.outbox.config = new
    engine.lifecycle.config = new
    engine.reactivation.config = new
    engine.rentals.config = new
    engine.webhooks.config = new
    engine.reconciler.config = new
    fixed = [f for f in RESTART_FIELDS if getattr(old, f) != getattr(new, f)]
    log.warning(
        "reload: %d keys; providers %s%s%s",
        len(new.keys),
        ", ".join(f"{n} ({'kept' if n in kept else 'new'})" for n in new.providers),
        f"; retired, kept for their activations: {', '.join(retired)}"
        if retired
        else "",
        f"; needs a restart to change: {', '.join(fixed)}" if fixed else "",
    )


async def reload_on_sighup(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: SIGHUP re-reads the config file (the serve command installs it)."""

    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        engine = app[ENGINE]
        if not engine.config.source:
            log.error("reload: the config was not read from a file; nothing to reload")
            return
        reload(engine, engine.config.source, app[UPSTREAM])

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    yield
    loop.remove_signal_handler(signal.SIGHUP)


# ---- logs -------------------------------------------------------------------------------


def request_fields(request: web.Request, call: Call | None) -> dict[str, Any]:
    """What an operator needs about a request besides its action and outcome."""
    fields: dict[str, Any] = {"client": request.remote or "-"}
    if call is None:
        return fields
    activation = call.activation
    if activation is not None:
        fields.update(
            id=activation.id,
            service=activation.service,
            country=activation.country,
            price=str(activation.cost),
        )
    else:
        service = call.params.get("service", "")
        country = call.params.get("country", "")
        if service:
            fields["service"] = _printable(service[:16])
        if country:
            fields["country"] = _printable(country[:8])
    return fields


def fields_text(fields: dict[str, Any]) -> str:
    """`` id=100000 service=tg ...`` for the text log format."""
    order = ("id", "service", "country", "price", "client")
    return "".join(f" {k}={fields[k]}" for k in order if k in fields)


def _printable(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "?" for ch in text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str) -> None:
    """Root logging for ``serve``: ``text`` (default) or ``json`` lines on stderr."""
    number = getattr(logging, level.upper(), logging.INFO)
    # no format of ours shows them; each costs a system call or a lookup per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if fmt != "json":
        logging.basicConfig(level=number, format=TEXT_FORMAT)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(number)
