"""The listening socket: connection caps per client address and in total.

One client must not take every file descriptor: past the cap, a new connection is closed
at once, before a byte of it is read. Closing (rather than answering 503) costs nothing
when descriptors are short, and tells the client for certain that nothing ran: an
sms-activate client sees a connection error, which every library already treats as
"retry later", while a 503 body would be misread by the many that parse the body and
ignore the status, and could not be written reliably before the request was read.

The total cap is kept below the process's descriptor limit (raising the soft limit
toward the hard one when the config asks for more), leaving room for the store and
the upstream connections.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
from collections.abc import Callable
from typing import cast

log = logging.getLogger("compat_server")

RESERVE = 128  # descriptors kept for the store, upstream connections, logs
MAX_BATCH = 128  # connections asyncio accepts in one go (the listen backlog)


class ConnectionGate:
    """Counts open client connections per address and in total; refuses past a cap.

    A cap of 0 means none.
    """

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.refused = 0

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address`` in, or refuse it (False)."""
        held = self.per_client.get(address, 0)
        if self.max_total and self.total >= self.max_total:
            self._refuse(
                address,
                "the server holds %d connections (cap %d)",
                self.total,
                self.max_total,
            )
            return False
        if self.max_per_client and held >= self.max_per_client:
            self._refuse(
                address,
                "it holds %d connections (cap %d per client)",
                held,
                self.max_per_client,
            )
            return False
        self.total += 1
        self.per_client[address] = held + 1
        return True

    def release(self, address: str) -> None:
        """A connection admitted from ``address`` has closed."""
        self.total -= 1
        held = self.per_client.get(address, 0) - 1
        if held > 0:
            self.per_client[address] = held
        else:
            self.per_client.pop(address, None)

    def _refuse(self, address: str, why: str, *args: int) -> None:
        self.refused += 1
        # one line per log_repeat_interval with a count (compat_server.logs.Throttle)
        log.warning(
            "connection from %s closed at once: " + why,
            address,
            *args,
            extra={"throttle": True},
        )

    def protocol(
        self,
        factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext | None = None,
    ) -> Callable[[], asyncio.Protocol]:
        """A protocol factory that admits each connection before ``factory``'s
        protocol sees it.

        With ``ssl_context`` the listener accepts plain TCP and the TLS handshake
        runs only after admission (bounded by HANDSHAKE_TIMEOUT): a connection that
        never finishes its handshake counts against the caps from its first moment.
        """
        return lambda: _Gated(self, factory, ssl_context)


HANDSHAKE_TIMEOUT = 10.0  # s a TLS client has to finish its handshake


class _Gated(asyncio.Protocol):
    """Admits or closes a connection (then upgrades it to TLS, if asked), and hands
    every event to the real protocol."""

    def __init__(
        self,
        gate: ConnectionGate,
        factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._gate = gate
        self._factory = factory
        self._ssl = ssl_context
        self._inner: asyncio.Protocol | None = None
        self._address = ""
        self._admitted = False
        self._early: list[bytes] = []  # data decrypted before the real protocol starts
        # TLS: the plain transport, and what it delivered before start_tls took it over
        self._plain: asyncio.Transport | None = None
        self._raw: list[bytes] | None = None
        self._handshake: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._address = (
            str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
        )
        if not self._gate.admit(self._address):
            transport.close()
            return
        self._admitted = True
        if self._ssl is None:
            self._start(transport)
        else:
            # a stream transport (uvloop's does not subclass asyncio.Transport)
            self._plain = cast(asyncio.Transport, transport)
            self._raw = []
            self._handshake = asyncio.ensure_future(self._upgrade(self._plain))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        assert self._ssl is not None
        loop = asyncio.get_running_loop()
        # uvloop starts reading before this task runs, so the ClientHello may reach
        # data_received first: it is handed to the TLS protocol once start_tls has put
        # it on the transport (start_tls queues its connection_made before this
        # callback's second turn). On asyncio's loop nothing arrives that early.
        loop.call_soon(loop.call_soon, self._replay)
        try:
            secure = await loop.start_tls(
                transport,
                self,
                self._ssl,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            transport.close()
            self._release()
            return
        if secure is None:  # closed during the handshake
            self._release()
            return
        self._start(secure)

    def _start(self, transport: asyncio.BaseTransport) -> None:
        self._inner = self._factory()
        self._inner.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self._inner.data_received(data)

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self._gate.release(self._address)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._handshake is not None and not self._handshake.done():
            self._handshake.cancel()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def _replay(self) -> None:
        raw, self._raw = self._raw, None
        transport = self._plain
        if not raw or transport is None or transport.is_closing():
            return
        tls = transport.get_protocol()
        if tls is self:  # start_tls did not take the transport: nothing can read it
            transport.close()
            return
        for data in raw:
            _feed(tls, data)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
        elif (
            self._raw is not None
            and self._plain is not None
            and (self._plain.get_protocol() is self)
        ):
            self._raw.append(data)  # TLS bytes, before start_tls took the transport
        elif self._admitted:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand ``data`` to a protocol as its transport would (buffered or not)."""
    get_buffer = getattr(protocol, "get_buffer", None)
    if get_buffer is None:
        cast(asyncio.Protocol, protocol).data_received(data)
        return
    view = memoryview(data)
    while view:
        buffer = memoryview(get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        cast(asyncio.BufferedProtocol, protocol).buffer_updated(size)
        view = view[size:]


def descriptor_plan(wanted: int) -> tuple[int, int]:
    """(connection cap, accept batch) that fit the descriptor limit, after raising the
    soft limit toward the hard one if ``wanted`` (0: as many as fit) needs it.

    asyncio accepts up to a batch of connections before any of them can be refused,
    and a refused one holds its descriptor for a few loop turns: room for three
    batches is kept on top of RESERVE, so a burst of connections cannot exhaust the
    descriptors either.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + RESERVE + 3 * MAX_BATCH if wanted else hard
    if soft != resource.RLIM_INFINITY and need > soft:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted, MAX_BATCH
    free = max(4, soft - min(RESERVE, soft // 2))
    batch = max(1, min(MAX_BATCH, free // 8))
    fits = max(1, free - 3 * batch)
    return (min(wanted, fits) if wanted else fits), batch


def gate_for(max_connections: int, max_per_client: int) -> tuple[ConnectionGate, int]:
    """The gate ``serve`` uses and its accept batch: the configured caps, the total
    kept within the descriptor limit."""
    total, batch = descriptor_plan(max_connections)
    if max_connections and total < max_connections:
        # the per-client cap shrinks alike, so one client still cannot take them all
        scaled = max(1, max_per_client * total // max_connections)
        log.warning(
            "server.max_connections %d lowered to %d and max_connections_per_client"
            " %d to %d: the descriptor limit allows no more",
            max_connections,
            total,
            max_per_client,
            scaled,
        )
        max_per_client = min(max_per_client, scaled) if max_per_client else scaled
    return ConnectionGate(total, max_per_client), batch
