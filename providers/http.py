"""The one upstream HTTP client: aiohttp's, with every failure split by what was sent.

Every provider sends through one :class:`UpstreamHttp` (the app opens one per process).
It answers ``(status, body bytes)`` whatever the status, and raises only our errors:

* :class:`UpstreamUnreachable` when the request provably never left: the connection was
  refused, the name did not resolve, the TLS handshake failed, or no connection could
  be had within the connect timeout (pool wait included). aiohttp raises these from its
  connector, before a byte of the request is written.
* :class:`UpstreamUncertain` for everything after a connection was in hand: a reset or
  a disconnect (a pooled keep-alive connection the upstream closed included: whether
  it read our request cannot be told), a read timeout, a malformed answer.

Why aiohttp's client and not httpx: a forwarded getStatus spent most of its CPU in
httpx/httpcore/anyio (connection-pool scans, cookie extraction; bench figure (e)),
and httpx with an aiohttp transport maps a disconnect after sending to ConnectTimeout,
which would make a paid call look unsent. Here the split is aiohttp's own: connector
errors against the rest.

Two rules keep a paid call from being sent twice or lost for nothing:

* aiohttp re-sends an idempotent request (GET) once by itself when a connection drops
  (RFC 9112 9.3.1). Our GETs buy numbers, so :func:`_never_resend` turns those
  failures into one aiohttp does not retry: every request is sent at most once.
* A call with priority ``PAID`` (buy, cancel, the quote before a buy; see
  :data:`providers.vocabulary.BUDGET`) goes over a connection of its own, never a
  pooled one: on a reused connection the upstream's idle close racing our write is
  indistinguishable from a purchase lost in flight, so it would turn "nothing bought"
  into "uncertain" (NO_NUMBERS for the client, work for the reconciler), and a refused
  fresh connection is a clean "unreachable" that lets the router try the next provider.
  It costs a TCP (and TLS) handshake per paid call; polls, balances and prices reuse
  the pool.

Cookies are neither stored nor sent (the upstreams authenticate by token; a cookie jar
costs CPU on every call). ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and
``NO_PROXY`` are honoured as httpx honoured them, read once when the client is made
(aiohttp's ``trust_env`` would read them, and ``.netrc``, in a thread on every call).
TLS is verified against the system's CA store (``SSL_CERT_FILE`` / ``SSL_CERT_DIR``
replace it). Nothing here logs; the exceptions chained to ours may quote
URLs with tokens, which the log filters mask (``compat_server.logs``).
"""

from __future__ import annotations

import asyncio
import urllib.request
from base64 import b64encode
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import ClientRequest, ClientResponse
from aiohttp.client_middlewares import ClientHandlerType
from yarl import URL

from providers.vocabulary import (
    BUDGET,
    PAID,
    UpstreamUncertain,
    UpstreamUnreachable,
)

USER_AGENT = "sms-compat/0.1"
# an idle pooled connection is closed after this (httpx's keepalive_expiry): the
# shorter it is, the less often an upstream's own idle close races our next request
KEEPALIVE = 5.0

Params = Mapping[str, Any]


class _SentOnce(aiohttp.ClientError):
    """A connection failed after the request was handed to it (never re-sent)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


async def _never_resend(
    req: ClientRequest, handler: ClientHandlerType
) -> ClientResponse:
    """Client middleware: a failure after connecting is raised as one aiohttp does not
    retry (it re-sends a GET after ClientOSError or ServerDisconnectedError)."""
    try:
        return await handler(req)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
        raise  # nothing was sent (and aiohttp does not retry these)
    except aiohttp.ServerDisconnectedError as exc:
        raise _SentOnce("ServerDisconnected") from exc
    except aiohttp.ClientOSError as exc:
        raise _SentOnce("ReadError") from exc


def _text(value: Any) -> str:
    """A query or form value as httpx wrote it: true/false, "" for None."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    return str(value)


def _fields(values: Params | None) -> Params | None:
    if not values:
        return None
    for value in values.values():
        if type(value) is not str:
            return {key: _text(v) for key, v in values.items()}
    return values if type(values) is dict else dict(values)  # usually: already text


Proxy = tuple[URL, Mapping[str, str] | None]  # the proxy, its headers (credentials)


def _env_proxies() -> dict[str, str]:
    """scheme -> proxy URL from the environment ("no": the NO_PROXY list)."""
    found = urllib.request.getproxies_environment()
    every = found.get("all")
    proxies = {s: found[s] for s in ("http", "https") if found.get(s)}
    if every:
        for scheme in ("http", "https"):
            proxies.setdefault(scheme, every)
    if proxies and found.get("no"):
        proxies["no"] = found["no"]
    return proxies


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether NO_PROXY (``*``, or names matched with their subdomains) spares ``host``."""
    host = host.lower()
    for entry in no_proxy.lower().split(","):
        name = entry.strip().lstrip(".")
        base, _, port = name.rpartition(":")
        if port.isdigit() and base and not base.endswith(":"):  # "name:8080"
            name = base
        if name == "*" or (name and (host == name or host.endswith("." + name))):
            return True
    return False


class UpstreamHttp:
    """One process's upstream client: a keep-alive pool, and fresh connections for
    paid calls. Open it inside the event loop that uses it; close it there."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        max_connections: int = 100,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        # connect: waiting for a pooled connection and making one (like httpx's pool
        # and connect timeouts); sock_connect: TCP and TLS of a new one; sock_read:
        # the longest silence while an answer is read
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout + read_timeout,
            sock_connect=connect_timeout,
            sock_read=read_timeout,
        )
        self._pooled: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self.closed = False
        self._proxies = _env_proxies()
        self._proxy_of: dict[tuple[str, str], Proxy | None] = {}

    def _proxy(self, url: str) -> Proxy | None:
        """The proxy for ``url`` (credentials in the proxy's URL sent as its auth)."""
        parsed = URL(url)
        key = (parsed.scheme, parsed.host or "")
        if key not in self._proxy_of:
            chosen: Proxy | None = None
            address = self._proxies.get(parsed.scheme)
            if address and not _bypassed(key[1], self._proxies.get("no", "")):
                proxy = URL(address if "://" in address else f"http://{address}")
                auth = None
                if proxy.user is not None:
                    pair = f"{proxy.user}:{proxy.password or ''}".encode()
                    auth = {"Proxy-Authorization": "Basic " + b64encode(pair).decode()}
                    proxy = proxy.with_user(None)
                chosen = (proxy, auth)
            self._proxy_of[key] = chosen
        return self._proxy_of[key]

    def _session(self, fresh: bool) -> aiohttp.ClientSession:
        session = self._fresh if fresh else self._pooled
        if session is None:
            if self.closed:
                raise RuntimeError("UpstreamHttp is closed")
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                force_close=fresh,
                keepalive_timeout=None if fresh else KEEPALIVE,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={"User-Agent": USER_AGENT},
                cookie_jar=aiohttp.DummyCookieJar(),
                middlewares=(_never_resend,),
                raise_for_status=False,
                trust_env=False,
            )
            if fresh:
                self._fresh = session
            else:
                self._pooled = session
        return session

    async def request(
        self,
        provider: str,
        method: str,
        url: str,
        *,
        params: Params | None = None,
        data: Params | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send once; (HTTP status, body) whatever the status.

        Raises UpstreamUnreachable only when nothing was sent, UpstreamUncertain on
        any other transport failure (``provider`` names the upstream in both).
        """
        session = self._session(BUDGET.get().priority == PAID)
        proxy = self._proxy(url) if self._proxies else None
        tunnel = None
        if proxy is not None and proxy[1] is not None:
            if url.startswith("https:"):
                tunnel = proxy[1]  # said to the proxy in CONNECT
            else:  # a plain request goes to the proxy itself
                headers = {**(headers or {}), **proxy[1]}
        try:
            async with session.request(
                method,
                url,
                params=_fields(params),
                data=_fields(data),
                headers=headers,
                allow_redirects=False,
                proxy=None if proxy is None else proxy[0],
                proxy_headers=tunnel,
            ) as response:
                return response.status, await response.read()
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamUnreachable(provider, "ConnectTimeout") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(provider, "ConnectError") from exc
        except _SentOnce as exc:
            raise UpstreamUncertain(provider, exc.kind) from exc
        except aiohttp.ServerDisconnectedError as exc:  # while reading the body
            raise UpstreamUncertain(provider, "ServerDisconnected") from exc
        except asyncio.TimeoutError as exc:  # SocketTimeoutError: sock_read
            raise UpstreamUncertain(provider, "ReadTimeout") from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamUncertain(provider, "PayloadError") from exc
        except aiohttp.ClientResponseError as exc:  # a malformed status line/headers
            raise UpstreamUncertain(provider, "RemoteProtocolError") from exc
        except aiohttp.InvalidURL as exc:
            raise UpstreamUncertain(provider, "InvalidURL") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUncertain(provider, type(exc).__name__) from exc

    async def close(self) -> None:
        """Close both pools (idempotent); no request may start afterwards."""
        self.closed = True
        sessions = [s for s in (self._pooled, self._fresh) if s is not None]
        self._pooled = self._fresh = None
        for session in sessions:
            await session.close()

    async def __aenter__(self) -> UpstreamHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
