"""Background loops: each its own aiohttp cleanup_ctx task, each resuming from the store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

log = logging.getLogger("compat_server")


async def every(name: str, interval: float, step: Callable[[], Awaitable[int]]) -> None:
    """Run ``step`` every ``interval`` seconds until cancelled; errors are logged."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background %s failed; continuing", name)
        await asyncio.sleep(interval)


def loop_ctx(
    start: Callable[[web.Application], Coroutine[Any, Any, None] | None],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx running the loop ``start(app)`` returns (none: nothing runs)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loop = start(app)
        task = None if loop is None else asyncio.create_task(loop)
        yield
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return ctx
