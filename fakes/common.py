"""Shared machinery for the fake upstreams: fault injection and a record of calls.

Every fake backend is a real aiohttp app served on a loopback port. Tests steer it with:

* ``scenario``: a business answer the backend documents ("ok", "no_numbers",
  "no_balance", "bad_service", "bad_token"), applied by each fake's own handlers;
* ``fault``: a transport-level failure applied here, to every path or only to the paths
  in ``fault_paths``:

  ========== ===========================================================================
  html500    HTTP 500 with an HTML error page (before the handler runs)
  empty      HTTP 200 with an empty body (before)
  malformed  HTTP 200 with truncated JSON (before)
  hang       sleeps ``hang_seconds`` before answering (before)
  reset      closes the connection without an answer (before)
  after_500  the handler runs (a purchase is made), then HTTP 500 HTML is sent instead
  after_hang the handler runs, then the answer is held for ``hang_seconds``
  after_reset the handler runs, then the connection is closed
  ========== ===========================================================================

``calls`` lists (path, params) of every request, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTML_500 = (
    "<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head>"
    "<body><h1>Internal Server Error</h1><p>nginx</p></body></html>"
)


@dataclass
class FakeOrder:
    """One number sold by a fake backend."""

    id: str
    service: str  # the backend's own service key
    country: str  # the backend's own country key
    phone: str  # as the backend reports it
    price: Any
    state: str = "waiting"  # waiting | received | finished | cancelled | expired
    sms: list[tuple[str, str | None]] = field(default_factory=list)  # (text, code)
    created: float = 0.0
    calls: list[str] = field(default_factory=list)  # lifecycle calls seen


class FakeUpstream:
    """Base class: owns the aiohttp app, the fault switch and the call log."""

    def __init__(self) -> None:
        self.scenario = "ok"
        self.fault: str | None = None
        self.fault_paths: set[str] | None = None  # None = every path
        self.hang_seconds = 30.0
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.orders: dict[str, FakeOrder] = {}
        self.app = web.Application(middlewares=[self._middleware])
        self.setup_routes(self.app)

    def setup_routes(self, app: web.Application) -> None:
        """Add the backend's routes (overridden by each fake)."""
        raise NotImplementedError

    def call_key(self, path: str, params: dict[str, str]) -> str:
        """What ``calls`` and ``fault_paths`` name a request by: its path by default."""
        return path

    def paths_called(self) -> list[str]:
        """Only the paths of the recorded calls."""
        return [path for path, _ in self.calls]

    def deliver(self, order_id: str, text: str, code: str | None = None) -> None:
        """An SMS reaches the number of an order."""
        order = self.orders[order_id]
        order.sms.append((text, code))
        if order.state == "waiting":
            order.state = "received"

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        params = dict(request.query)
        if request.method == "POST" and request.can_read_body:
            params.update({k: str(v) for k, v in (await request.post()).items()})
        where = self.call_key(request.path, params)
        self.calls.append((where, params))
        fault = self.fault
        if fault and (self.fault_paths is None or where in self.fault_paths):
            if fault == "html500":
                return web.Response(status=500, text=HTML_500, content_type="text/html")
            if fault == "empty":
                return web.Response(status=200, body=b"")
            if fault == "malformed":
                return web.Response(
                    status=200,
                    text='{"success": true, "data": {',
                    content_type="application/json",
                )
            if fault == "hang":
                await asyncio.sleep(self.hang_seconds)
            if fault == "reset":
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            response = await handler(request)
            if fault == "after_500":
                return web.Response(status=500, text=HTML_500, content_type="text/html")
            if fault == "after_hang":
                await asyncio.sleep(self.hang_seconds)
            if fault == "after_reset":
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            return response
        return await handler(request)
