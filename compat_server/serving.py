"""One app on several listeners (http, and https beside it), run until a signal.

``web.run_app`` serves every site with the same ``ssl_context``; the hosts trick needs
plain http on one port and TLS on another for the same app, so this is run_app's loop
with an explicit list of :class:`Listener`.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Listener:
    """An address to accept connections on; TLS when ``ssl_context`` is set."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None

    @property
    def scheme(self) -> str:
        """``https`` for a TLS listener, else ``http``."""
        return "http" if self.ssl_context is None else "https"


class ListenError(Exception):
    """A listener could not bind; carries the address and the system's reason."""

    def __init__(self, listener: Listener, reason: str) -> None:
        super().__init__(f"cannot listen on {listener.host}:{listener.port}: {reason}")
        self.listener = listener
        self.reason = reason


async def start(
    app: web.Application, listeners: Sequence[Listener], **runner_kwargs: Any
) -> web.AppRunner:
    """Start the app and every listener; on a bind failure undo it all, ListenError."""
    runner = web.AppRunner(app, **runner_kwargs)
    await runner.setup()
    try:
        for listener in listeners:
            site = web.TCPSite(
                runner, listener.host, listener.port, ssl_context=listener.ssl_context
            )
            try:
                await site.start()
            except OSError as exc:
                # asyncio's strerror repeats the address: keep the system's words
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(listener, reason) from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_urls(runner: web.AppRunner, path: str = "/") -> list[str]:
    """``scheme://host:port`` + path of each started site, with the real port."""
    urls = []
    for site in runner.sites:
        scheme = "https" if getattr(site, "_ssl_context", None) else "http"
        server = getattr(site, "_server", None)
        for sock in getattr(server, "sockets", None) or ():
            host, port = sock.getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            urls.append(f"{scheme}://{host}:{port}{path}")
    return sorted(urls, key=lambda url: url.startswith("https"))  # http first


def run(
    app: web.Application,
    listeners: Sequence[Listener],
    *,
    started: Callable[[web.AppRunner], None] = lambda runner: None,
    **runner_kwargs: Any,
) -> None:
    """Serve until SIGINT/SIGTERM (``handle_signals=True``); ListenError if a bind fails."""

    async def serve() -> None:
        runner = await start(app, listeners, **runner_kwargs)
        try:
            started(runner)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except (web.GracefulExit, KeyboardInterrupt):
        pass
