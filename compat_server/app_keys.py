"""The typed keys of the app's state (``app[ENGINE]``, ...), importable from anywhere.

They live apart from app.py so that the handlers app.py mounts (admin, metrics, ops) can
import them at the top instead of reaching back into app.py inside functions. The
value types are named for the type checker only: at run time this module imports only
libraries and the leaf ``providers.http``, so it never closes an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
from aiohttp import web

from providers.http import UpstreamHttp

if TYPE_CHECKING:
    from compat_server.catalog import TtlCache
    from compat_server.config import Config
    from compat_server.engine import Engine
    from compat_server.metrics import Metrics
    from compat_server.store import Store
    from providers.vocabulary import Clock

CONFIG: web.AppKey[Config] = web.AppKey("config")
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
HTTP = web.AppKey("http", httpx.AsyncClient)  # webhooks' client
UPSTREAM = web.AppKey("upstream", UpstreamHttp)  # every provider's client
STORE: web.AppKey[Store] = web.AppKey("store")
ENGINE: web.AppKey[Engine] = web.AppKey("engine")
BACKGROUND = web.AppKey("background", bool)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
ADMIN_CACHE: web.AppKey[TtlCache] = web.AppKey("admin_cache")  # /admin/ balances
