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
from dataclasses import dataclass, field
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


@dataclass
class Serving:
    """A started app: its runner and, per listener in order, the URLs it accepts on."""

    runner: web.AppRunner
    urls: list[str] = field(default_factory=list)  # real ports, also for port 0


async def start(
    app: web.Application, listeners: Sequence[Listener], **runner_kwargs: Any
) -> Serving:
    """Start the app and every listener; on a bind failure undo it all, ListenError."""
    runner = web.AppRunner(app, **runner_kwargs)
    await runner.setup()
    serving = Serving(runner)
    try:
        for listener in listeners:
            before = set(runner.addresses)  # of the sites started so far
            site = web.TCPSite(
                runner, listener.host, listener.port, ssl_context=listener.ssl_context
            )
            try:
                await site.start()
            except OSError as exc:
                # asyncio's strerror repeats the address: keep the system's words
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(listener, reason) from None
            for address in runner.addresses:
                if address not in before:
                    host, port = address[:2]
                    host = f"[{host}]" if ":" in host else host
                    serving.urls.append(f"{listener.scheme}://{host}:{port}")
    except BaseException:
        await runner.cleanup()
        raise
    return serving


def run(
    app: web.Application,
    listeners: Sequence[Listener],
    *,
    started: Callable[[Serving], None] = lambda serving: None,
    **runner_kwargs: Any,
) -> None:
    """Serve until SIGINT/SIGTERM (``handle_signals=True``); ListenError if a bind fails."""

    async def serve() -> None:
        serving = await start(app, listeners, **runner_kwargs)
        try:
            started(serving)
            await asyncio.Event().wait()
        finally:
            await serving.runner.cleanup()

    try:
        asyncio.run(serve())
    except (web.GracefulExit, KeyboardInterrupt):
        pass
