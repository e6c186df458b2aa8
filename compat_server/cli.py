"""Command line: ``sms-compat serve`` and ``sms-compat check-config [--ping]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from decimal import Decimal

from compat_server.config import Config, describe, load_config
from compat_server.errors import ConfigError, ProviderError, UpstreamAuth

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sms-compat`` console script."""
    parser = argparse.ArgumentParser(prog="sms-compat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the handler_api.php server")
    serve.add_argument("--config", default="config.yaml")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check-config", help="validate the config, print it masked")
    check.add_argument("--config", default="config.yaml")
    check.add_argument(
        "--ping", action="store_true", help="call every provider's balance"
    )
    args = parser.parse_args(argv)
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
    return serve_forever(config, args.host, args.port, args.log_level)


def serve_forever(
    config: Config, host: str | None, port: int | None, level: str
) -> int:
    """Run the server until interrupted."""
    from compat_server import connections, logs
    from compat_server.app import create_app

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.raiseExceptions = False  # a full disk: no traceback per unwritten line
    host = host or config.host
    port = port or config.port
    print(f"sms-compat: serving http://{host}:{port}/stubs/handler_api.php", flush=True)
    try:
        app = create_app(config)
        logs.install(config, logging.getLogger().handlers)
        gate, batch = connections.gate_for(
            config.max_connections, config.max_connections_per_client
        )
        connections.run(app, host, port, gate, batch)
    except OSError as exc:
        print(
            f"sms-compat: cannot listen on {host}:{port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0


async def ping(config: Config) -> int:
    """One line per provider: reachable, token accepted, balance; exit 1 if any fails.

    The circuit state shown is the one the server last recorded in its store.
    """
    from compat_server import logs
    from compat_server.app import (
        build_providers,
        make_http_client,
        quiet_secret_loggers,
    )
    from compat_server.routing import Prices

    quiet_secret_loggers()
    logs.install(config)
    circuits = recorded_circuits(config.store_path)
    failed = 0
    async with make_http_client(config) as http:
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
    result = {}
    for provider, state, failures, changed_at in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(changed_at))
        result[provider] = f"{state} since {since}" + (
            f" after {failures} failures" if state != "closed" else ""
        )
    return result


if __name__ == "__main__":
    sys.exit(main())
