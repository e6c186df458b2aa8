"""Command line: ``sms-compat serve``, ``check-config [--ping]`` and ``tls ...``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from compat_server.config import Config, describe, load_config
from compat_server.tls import TlsError
from providers.vocabulary import ConfigError, ProviderError, UpstreamAuth

if TYPE_CHECKING:
    from compat_server.serving import Listener

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sms-compat`` console script."""
    parser = argparse.ArgumentParser(prog="sms-compat", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the handler_api.php server")
    serve.add_argument("--config", default="config.yaml")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one object per line, with activation id, price, client address",
    )
    serve.add_argument("--tls-dir", help="https beside http (overrides server.tls.dir)")
    serve.add_argument(
        "--hosts-trick",
        action="store_true",
        help="http on port 80 and https on 443 (instead of --port and server ports)",
    )
    check = sub.add_parser("check-config", help="validate the config, print it masked")
    check.add_argument("--config", default="config.yaml")
    check.add_argument(
        "--ping", action="store_true", help="call every provider's balance"
    )
    add_tls_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "tls":
        return tls_command(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"sms-compat: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(describe(config))
        if args.ping:
            return asyncio.run(ping(config))
        return 0
    return serve_forever(
        config,
        args.host,
        args.port,
        args.log_level,
        args.log_format,
        tls_dir=args.tls_dir,
        hosts_trick=args.hosts_trick,
    )


def version() -> str:
    """The installed package version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sms-compat")
    except PackageNotFoundError:
        return "unknown"


def serve_forever(
    config: Config,
    host: str | None,
    port: int | None,
    level: str,
    log_format: str = "text",
    *,
    tls_dir: str | None = None,
    hosts_trick: bool = False,
) -> int:
    """Run the server until interrupted; https beside http when a TLS dir is set.

    SIGHUP re-reads the config file. Connections are capped per client address and
    in total (server.max_connections*), so one client cannot take every descriptor.
    """
    from compat_server import connections, logs, serving
    from compat_server.app import create_app
    from compat_server.ops import setup_logging
    from compat_server.store import StoreError

    setup_logging(level, log_format)
    logging.raiseExceptions = False  # a full disk: no traceback per unwritten line
    try:
        listeners = plan_listeners(config, host, port, tls_dir, hosts_trick)
    except TlsError as exc:
        print(f"sms-compat: tls: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    try:
        loop_name, event_loop = serving.loop_factory(config.event_loop)
    except serving.LoopError as exc:
        print(f"sms-compat: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def started(serve: serving.Serving) -> None:
        logging.getLogger("compat_server").info("event loop: %s", loop_name)
        for url in serve.urls:
            print(f"sms-compat: serving {url}/stubs/handler_api.php", flush=True)

    try:
        app = create_app(config, sighup=True)
        logs.install(config, logging.getLogger().handlers)
        gate, batch = connections.gate_for(
            config.max_connections, config.max_connections_per_client
        )
        serving.run(
            app,
            listeners,
            started=started,
            gate=gate,
            batch=batch,
            event_loop=event_loop,
            access_log=None,  # its lines carry the full URL, api_key included
            handle_signals=True,
            keepalive_timeout=75.0,  # web.run_app's; aiohttp's own default is an hour
            shutdown_timeout=60.0,
        )
    except StoreError as exc:  # a locked or unusable store: one line
        print(f"sms-compat: {exc}", file=sys.stderr)
        return 1
    except serving.ListenError as exc:
        print(f"sms-compat: {exc}", file=sys.stderr)
        return 1
    return 0


def plan_listeners(
    config: Config,
    host: str | None,
    port: int | None,
    tls_dir: str | None,
    hosts_trick: bool,
) -> list[Listener]:
    """http from the config (``--hosts-trick``: port 80), https beside it when a TLS
    dir is set (``--hosts-trick``: port 443, and the dir is required)."""
    from compat_server.serving import Listener
    from compat_server.tls import server_context

    host = host or config.host
    tls_dir = tls_dir or config.tls_dir
    if hosts_trick and tls_dir is None:
        raise TlsError(
            "--hosts-trick needs a certificate: run `sms-compat tls init --dir DIR`,"
            " then pass --tls-dir DIR (or set server.tls.dir)"
        )
    listeners = [Listener(host, 80 if hosts_trick else (port or config.port))]
    if tls_dir is not None:
        listeners.append(
            Listener(
                host, 443 if hosts_trick else config.tls_port, server_context(tls_dir)
            )
        )
    return listeners


def add_tls_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tls init`` and ``tls trust-python``."""
    tls = sub.add_parser("tls", help="certificates for the hosts trick over https")
    commands = tls.add_subparsers(dest="tls_command", required=True)
    init = commands.add_parser("init", help="make a local CA and a server certificate")
    init.add_argument("--dir", required=True, help="where the files go")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name (or IP) the certificate must cover; repeatable",
    )
    trust = commands.add_parser(
        "trust-python", help="add ca.pem to a Python interpreter's certifi bundle"
    )
    trust.add_argument("python", metavar="PYTHON", help="path of the interpreter")
    trust.add_argument("--dir", help="the directory of `tls init`")
    trust.add_argument("--undo", action="store_true", help="remove what was added")


def tls_command(args: argparse.Namespace) -> int:
    """Run a ``tls`` subcommand: one line per outcome; errors exit 2, no traceback."""
    from compat_server import tls

    try:
        if args.tls_command == "init":
            issued = tls.init(args.dir, args.host)
            folder = issued.directory
            ca = "created" if issued.ca_created else "kept"
            print(f"sms-compat: CA {ca}: {folder / tls.CA_CERT} (install this file;"
                  f" {folder / tls.CA_KEY} stays private)")  # fmt: skip
            print(f"sms-compat: server certificate {folder / tls.SERVER_CERT} for"
                  f" {len(issued.names)} names, valid until"
                  f" {issued.not_after:%Y-%m-%d}")  # fmt: skip
            if issued.bundle:
                print(f"sms-compat: for Python tools: {folder / tls.BUNDLE}"
                      " (certifi's roots + this CA)")  # fmt: skip
        else:
            done = tls.trust_python(args.python, args.dir, undo=args.undo)
            print(f"sms-compat: {done}")
    except tls.TlsError as exc:
        print(f"sms-compat: tls: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


async def ping(config: Config) -> int:
    """One line per provider: reachable, token accepted, balance; exit 1 if any fails.

    The circuit state shown is the one the server last recorded in its store.
    """
    from compat_server import logs
    from compat_server.app import (
        build_providers,
        make_upstream_client,
        quiet_secret_loggers,
    )
    from compat_server.routing import Prices

    quiet_secret_loggers()
    logs.install(config)
    if config.store_url is not None:
        circuits = await recorded_circuits_pg(config.store_url)
    else:
        circuits = recorded_circuits(config.store_path)
    failed = 0
    async with make_upstream_client(config) as http:
        providers = build_providers(config, http, time.time)
        prices = Prices(config, providers)
        for name, provider in providers.items():
            native = type(provider).native_currency(provider.options)
            circuit = circuits.get(name, "closed")
            try:
                amount: Decimal = await provider.balance()
            except UpstreamAuth:
                failed += 1
                print(
                    f"{name}: reachable, TOKEN REJECTED (fix providers.{name}),"
                    f" circuit {circuit}"
                )
                continue
            except ProviderError as exc:
                failed += 1
                print(
                    f"{name}: UNREACHABLE ({type(exc).__name__}: {exc.detail}),"
                    f" circuit {circuit}"
                )
                continue
            shown = (amount * prices.balance_factor(name)).quantize(Decimal("0.01"))
            print(
                f"{name}: reachable, token accepted, balance {amount} {native}"
                f" = {shown} {config.currency}, circuit {circuit}"
            )
    return 1 if failed else 0


def recorded_circuits(store_path: str) -> dict[str, str]:
    """provider -> "open since 12:00:00 after 5 failures" as the server last saw it."""
    import sqlite3
    from pathlib import Path

    if not Path(store_path).exists():
        return {}
    try:
        with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=2) as db:
            rows = db.execute(
                "SELECT provider, state, failures, changed_at FROM health"
            ).fetchall()
    except sqlite3.Error:
        return {}
    return _circuit_texts(rows)


async def recorded_circuits_pg(url: str) -> dict[str, str]:
    """recorded_circuits from a PostgreSQL store ({} when it cannot be read)."""
    from compat_server.store import StoreError
    from compat_server.store.postgres import UNUSABLE, Target

    try:
        target = Target.parse(url)
        import asyncpg

        conn = await asyncpg.connect(**target.connect_args(), timeout=2)
        try:
            rows = await conn.fetch(
                "SELECT provider, state, failures, changed_at FROM health"
            )
        finally:
            await conn.close()
    except StoreError:
        return {}
    except UNUSABLE:
        return {}
    return _circuit_texts([tuple(r) for r in rows])


def _circuit_texts(rows: Iterable[tuple[Any, ...]]) -> dict[str, str]:
    result = {}
    for provider, state, failures, changed_at in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(changed_at))
        result[provider] = f"{state} since {since}" + (
            f" after {failures} failures" if state != "closed" else ""
        )
    return result


if __name__ == "__main__":
    sys.exit(main())
