"""One app on several listeners (http, and https beside it), run until a signal.

``web.run_app`` serves every site with the same ``ssl_context``; the hosts trick needs
plain http on one port and TLS on another for the same app, so this is run_app's loop
with an explicit list of :class:`Listener`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from compat_server.connections import MAX_BATCH, ConnectionGate


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
    """A started app: its runner, its listening servers and, per listener in order,
    the URLs it accepts on."""

    runner: web.AppRunner
    urls: list[str] = field(default_factory=list)  # real ports, also for port 0
    servers: list[asyncio.Server] = field(default_factory=list)

    async def stop(self) -> None:
        """Stop accepting, then finish the app (its connections and cleanups)."""
        for server in self.servers:
            server.close()
        await self.runner.cleanup()


async def start(
    app: web.Application,
    listeners: Sequence[Listener],
    *,
    gate: ConnectionGate | None = None,
    batch: int = MAX_BATCH,
    **runner_kwargs: Any,
) -> Serving:
    """Start the app and every listener; on a bind failure undo it all, ListenError.

    Every listener admits connections through ``gate`` (the connection caps), with
    ``batch`` as its listen backlog.
    """
    runner = web.AppRunner(app, **runner_kwargs)
    await runner.setup()
    serving = Serving(runner)
    loop = asyncio.get_running_loop()
    handler: Any = runner.server
    try:
        for listener in listeners:
            # behind the gate a TLS listener accepts plain TCP and the gate runs the
            # handshake after admission, so half-open handshakes count against the caps
            factory = handler
            ssl_context = listener.ssl_context
            if gate is not None:
                factory, ssl_context = gate.protocol(handler, ssl_context), None
            try:
                server = await loop.create_server(
                    factory,
                    listener.host,
                    listener.port,
                    backlog=batch,
                    reuse_address=True,
                    ssl=ssl_context,
                )
            except OSError as exc:
                # asyncio's strerror repeats the address: keep the system's words
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(listener, reason) from None
            serving.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                serving.urls.append(f"{listener.scheme}://{host}:{port}")
    except BaseException:
        await serving.stop()
        raise
    return serving


LoopFactory = Callable[[], asyncio.AbstractEventLoop]
UVLOOP = "uvloop"  # the module of the optional extra (a test names a missing one)


class LoopError(Exception):
    """``server.event_loop`` asks for a loop that cannot run here (one line)."""


def loop_factory(choice: str) -> tuple[str, LoopFactory | None]:
    """(name, factory) of the event loop for ``server.event_loop``; factory None:
    asyncio's own. ``auto`` takes uvloop when it is installed (the ``uvloop`` extra);
    LoopError for ``uvloop`` when it is not."""
    installed = importlib.util.find_spec(UVLOOP) is not None
    if choice == "uvloop" and not installed:
        raise LoopError(
            "server.event_loop is uvloop, but uvloop is not installed"
            " (pip install 'sms-compat[uvloop]')"
        )
    if choice == "asyncio" or not installed:
        return "asyncio", None
    uvloop = importlib.import_module(UVLOOP)  # an optional extra: not typed here
    factory: LoopFactory = uvloop.new_event_loop
    return f"uvloop {importlib.metadata.version(UVLOOP)}", factory


def run(
    app: web.Application,
    listeners: Sequence[Listener],
    *,
    started: Callable[[Serving], None] = lambda serving: None,
    gate: ConnectionGate | None = None,
    batch: int = MAX_BATCH,
    event_loop: LoopFactory | None = None,
    **runner_kwargs: Any,
) -> None:
    """Serve until SIGINT/SIGTERM (``handle_signals=True``); ListenError if a bind fails.

    ``event_loop`` makes the loop (uvloop's, see :func:`loop_factory`); None: asyncio's.
    """

    async def serve() -> None:
        serving = await start(app, listeners, gate=gate, batch=batch, **runner_kwargs)
        try:
            started(serving)
            await asyncio.Event().wait()
        finally:
            await serving.stop()

    try:
        with asyncio.Runner(loop_factory=event_loop) as runner:
            runner.run(serve())
    except (web.GracefulExit, KeyboardInterrupt):
        pass
