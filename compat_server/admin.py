"""The operator's dashboard at ``/admin/``: server-rendered HTML, one small static script.

Enabled by ``admin: {token: T}``; without it every /admin path answers 404. A request is
let in with ``Authorization: Bearer T``, or with a session cookie obtained by opening
``/admin/?token=T`` once (answered with a redirect to ``/admin/`` that drops the token
from the address bar). The cookie is HttpOnly and SameSite=Strict, and holds an HMAC of
the token and its issue time, so it survives a restart and dies when the token changes.
Cancelling is a POST carrying a CSRF token derived from the session; nothing is fetched
from the internet (the script and style are package data).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from compat_server.app_keys import ADMIN_CACHE, ENGINE, METRICS
from compat_server.store import (
    CANCELLED,
    CODE,
    EXPIRED,
    FINISHED,
    PENDING,
    UNCERTAIN,
    WAIT_CODE,
    WAIT_RETRY,
    Activation,
)
from providers.base import Provider
from providers.vocabulary import CompatError

if TYPE_CHECKING:
    from compat_server.budget import Budgets
    from compat_server.config import Config
    from compat_server.engine import Engine
    from compat_server.lifecycle import Lifecycle
    from compat_server.routing import Upstreams
    from compat_server.store import Store

COOKIE = "sms_compat_admin"
SESSION_LIFETIME = 12 * 3600.0
STATES = (WAIT_CODE, CODE, WAIT_RETRY, FINISHED, CANCELLED, EXPIRED)
BALANCE_TTL = 30.0  # seconds a provider balance shown on the dashboard is reused
REFRESH_MS = 2000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    """Mount the dashboard under /admin/."""
    app.router.add_get("/admin", _redirect_to_root)
    app.router.add_get("/admin/", _guard(dashboard))
    app.router.add_get("/admin/fragment", _guard(fragment))
    app.router.add_post("/admin/cancel", _guard(cancel, csrf=True))
    app.router.add_get("/admin/static/{name}", _guard(static))


async def _redirect_to_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(
        "/admin/" + (f"?{request.query_string}" if request.query_string else "")
    )


# ---- authentication --------------------------------------------------------------------


@dataclass(frozen=True)
class Dashboard:
    """The rooms the dashboard reads and acts on, bound once per request (the config
    in force when it arrived), not the engine that built them."""

    config: Config
    store: Store
    lifecycle: Lifecycle
    upstreams: Upstreams
    budgets: Budgets

    @classmethod
    def of(cls, engine: Engine) -> Dashboard:
        """The dashboard's rooms of a running server."""
        return cls(
            engine.config,
            engine.store,
            engine.lifecycle,
            engine.upstreams,
            engine.router.budgets,
        )

    @property
    def providers(self) -> Mapping[str, Provider]:
        """Configured providers by name."""
        return self.upstreams.providers

    def health(self) -> dict[str, str]:
        """Circuit state per provider."""
        return {name: b.state for name, b in self.upstreams.breakers.items()}


def _rooms(request: web.Request) -> Dashboard:
    return Dashboard.of(request.app[ENGINE])


def _sign(token: str, text: str) -> str:
    return hmac.new(token.encode(), text.encode(), hashlib.sha256).hexdigest()


def session_value(token: str, issued: float) -> str:
    """The cookie for a session issued at ``issued``."""
    stamp = str(int(issued))
    return f"{stamp}.{_sign(token, 'session:' + stamp)}"


def _valid_session(token: str, value: str, now: float) -> bool:
    stamp, _, mac = value.partition(".")
    if not stamp.isdigit() or len(stamp) > 12:
        return False
    expected = _sign(token, "session:" + stamp)
    # bytes: a cookie with non-ASCII characters is simply wrong, never a traceback
    if not hmac.compare_digest(mac.encode("utf-8", "replace"), expected.encode()):
        return False
    return 0 <= now - int(stamp) <= SESSION_LIFETIME


def csrf_token(token: str, session: str) -> str:
    """The CSRF token forms of this session carry."""
    return _sign(token, "csrf:" + session)


def _guard(handler: Handler, csrf: bool = False) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        token = _rooms(request).config.admin_token
        if not token:
            raise web.HTTPNotFound()
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(
            header[7:].strip().encode("utf-8", "replace"), token.encode()
        ):
            return await handler(request)  # no ambient credential: no CSRF to fear
        presented = request.query.get("token")
        if presented is not None and request.method == "GET":
            if not hmac.compare_digest(
                presented.encode("utf-8", "replace"), token.encode()
            ):
                return _page_error(403, "Wrong token.")
            response = web.HTTPSeeOther("/admin/")
            response.set_cookie(
                COOKIE,
                session_value(token, time.time()),
                max_age=int(SESSION_LIFETIME),
                path="/admin",
                httponly=True,
                samesite="Strict",
                secure=request.secure,
            )
            raise response
        session = request.cookies.get(COOKIE, "")
        if not session or not _valid_session(token, session, time.time()):
            return _page_error(
                401, "Not signed in: open /admin/?token=&lt;admin token&gt; once."
            )
        if csrf:
            form = await request.post()
            sent = str(form.get("csrf", ""))
            if not hmac.compare_digest(
                sent.encode("utf-8", "replace"), csrf_token(token, session).encode()
            ):
                return _page_error(
                    403, "Stale form (CSRF token mismatch): reload the page."
                )
        return await handler(request)

    return guarded


def _page_error(status: int, text: str) -> web.Response:
    body = f"<!doctype html><title>sms-compat admin</title><p>{text}</p>"
    return web.Response(status=status, text=body, content_type="text/html")


def _csrf(request: web.Request) -> str:
    token = _rooms(request).config.admin_token or ""
    return csrf_token(token, request.cookies.get(COOKIE, ""))


# ---- pages -----------------------------------------------------------------------------


async def static(request: web.Request) -> web.StreamResponse:
    """The dashboard's script and style (package data)."""
    name = request.match_info["name"]
    types = {"admin.js": "application/javascript", "admin.css": "text/css"}
    if name not in types:
        raise web.HTTPNotFound()
    text = resources.files("compat_server").joinpath(f"data/{name}").read_text("utf-8")
    return web.Response(
        text=text, content_type=types[name], headers={"Cache-Control": "no-cache"}
    )


async def dashboard(request: web.Request) -> web.StreamResponse:
    """The whole page; the script refreshes its body from /admin/fragment."""
    engine = _rooms(request)
    filters = _filters(request)
    notice = _notice(request)
    body = await _body(request, engine, filters)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sms-compat admin</title>
<link rel="stylesheet" href="/admin/static/admin.css">
<script src="/admin/static/admin.js" defer></script>
</head><body data-refresh="{REFRESH_MS}">
<header><h1>sms-compat</h1><span id="updated">live</span></header>
{notice}
{_filter_form(engine, filters)}
<main id="live">{body}</main>
</body></html>"""
    return web.Response(
        text=page,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
            "X-Frame-Options": "DENY",
        },
    )


async def fragment(request: web.Request) -> web.StreamResponse:
    """The live part of the page, for the script's refresh."""
    engine = _rooms(request)
    body = await _body(request, engine, _filters(request))
    return web.Response(
        text=body, content_type="text/html", headers={"Cache-Control": "no-store"}
    )


async def cancel(request: web.Request) -> web.StreamResponse:
    """POST id (+ csrf): cancel a waiting activation as its client could."""
    engine = _rooms(request)
    form = await request.post()
    raw_id = str(form.get("id", ""))
    back = str(form.get("back", ""))
    wanted = int(raw_id) if raw_id.isdigit() and len(raw_id) <= 10 else None
    activation = None if wanted is None else await engine.store.get(wanted)
    if activation is None:
        raise web.HTTPSeeOther(f"/admin/{_join(back, 'error=unknown')}")
    try:
        await engine.lifecycle.cancel(activation)
    except CompatError as exc:
        reason = type(exc).__name__
        raise web.HTTPSeeOther(
            f"/admin/{_join(back, f'error={reason}&id={activation.id}')}"
        ) from None
    raise web.HTTPSeeOther(f"/admin/{_join(back, f'cancelled={activation.id}')}")


def _join(back: str, extra: str) -> str:
    """``?`` + the page's filters (from ``back``, re-encoded) + ``extra``."""
    kept = urlencode(
        [
            (k, v[:64])
            for k, v in parse_qsl(back.lstrip("?"))
            if k in ("key", "state", "provider")
        ]
    )
    return "?" + "&".join(p for p in (kept, extra) if p)


def _notice(request: web.Request) -> str:
    query = request.query
    if query.get("cancelled", "").isdigit():
        return f'<p class="notice ok" id="notice">Activation {query["cancelled"]} cancelled.</p>'
    if "error" in query:
        error = html.escape(query["error"][:40])
        which = query.get("id", "")
        which = f" activation {which}" if which.isdigit() else ""
        return (
            f'<p class="notice bad" id="notice">Could not cancel{which}: {error}.</p>'
        )
    return ""


def _filters(request: web.Request) -> dict[str, str]:
    return {
        name: request.query.get(name, "")[:64] for name in ("key", "state", "provider")
    }


def _filter_form(engine: Dashboard, filters: dict[str, str]) -> str:
    def select(name: str, label: str, options: list[str]) -> str:
        items = ['<option value="">all</option>'] + [
            f'<option value="{html.escape(o)}"'
            + (" selected" if filters[name] == o else "")
            + f">{html.escape(o)}</option>"
            for o in options
        ]
        return f'<label>{label} <select name="{name}">{"".join(items)}</select></label>'

    return (
        '<form id="filters" method="get" action="/admin/">'
        + select("key", "key", [k.alias for k in engine.config.keys])
        + select("state", "state", list(STATES))
        + select("provider", "provider", list(engine.providers))
        + '<button type="submit">filter</button></form>'
    )


async def _body(
    request: web.Request, engine: Dashboard, filters: dict[str, str]
) -> str:
    parts = [
        await _activations(request, engine, filters),
        await _providers(request, engine),
        await _keys(engine),
        await _outbox(engine),
        await _reconciler(engine),
    ]
    return "\n".join(parts)


def _table(
    title: str, ident: str, head: list[str], rows: list[list[str]], empty: str
) -> str:
    header = "".join(f"<th>{h}</th>" for h in head)
    if rows:
        body = "".join(
            "<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
            for row in rows
        )
    else:
        body = f'<tr><td colspan="{len(head)}" class="empty">{empty}</td></tr>'
    return (
        f'<section id="{ident}"><h2>{title}</h2><table><thead><tr>{header}</tr>'
        f"</thead><tbody>{body}</tbody></table></section>"
    )


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _money(amount: Decimal) -> str:
    return str(amount.quantize(Decimal("0.01")))


def _e(value: Any) -> str:
    return html.escape(str(value))


async def _activations(
    request: web.Request, engine: Dashboard, filters: dict[str, str]
) -> str:
    aliases = {k.key_id: k.alias for k in engine.config.keys}
    by_alias = {k.alias: k.key_id for k in engine.config.keys}
    where = {"state": filters["state"], "provider": filters["provider"]}
    if filters["key"]:
        where["key_id"] = by_alias.get(filters["key"], "-")
    found = await engine.store.recent(100, where)
    back = "?" + "&".join(f"{k}={_e(v)}" for k, v in filters.items() if v)
    csrf = _csrf(request)
    rows = []
    for a in found:
        action = ""
        if a.state == WAIT_CODE:
            action = (
                '<form method="post" action="/admin/cancel" class="cancel">'
                f'<input type="hidden" name="id" value="{a.id}">'
                f'<input type="hidden" name="csrf" value="{csrf}">'
                f'<input type="hidden" name="back" value="{back}">'
                f'<button type="submit" id="cancel-{a.id}">cancel</button></form>'
            )
        rows.append(
            [
                str(a.id),
                _e(aliases.get(a.key_id, "unknown")),
                _e(a.provider),
                _e(a.service),
                str(a.country),
                _e(a.phone),
                f'<span class="state {a.state}">{_e(a.state)}</span>',
                _e(_code(a)),
                _e(a.cost),
                _when(a.created_at),
                action,
            ]
        )
    return _table(
        "Activations (newest 100)",
        "activations",
        [
            "id",
            "key",
            "provider",
            "service",
            "country",
            "phone",
            "state",
            "code",
            f"price ({_e(engine.config.currency)})",
            "bought",
            "",
        ],
        rows,
        "no activations",
    )


def _code(activation: Activation) -> str:
    return activation.messages[-1].code if activation.messages else ""


async def _providers(request: web.Request, engine: Dashboard) -> str:

    stats = request.app[METRICS].provider_stats()
    rows = []
    for name, provider in engine.providers.items():
        balance = await _balance(request, engine, name)
        calls, errors, mean = stats.get(name, (0, 0, 0.0))
        rows.append(
            [
                _e(name),
                _e(provider.type_name),
                _e(balance),
                f'<span class="circuit {engine.health().get(name, "")}">'
                f"{_e(engine.health().get(name, '-'))}</span>",
                str(calls),
                str(errors),
                f"{mean * 1000:.0f} ms" if calls else "-",
            ]
        )
    return _table(
        "Providers",
        "providers",
        [
            "name",
            "type",
            f"balance (up to {BALANCE_TTL:.0f} s old)",
            "circuit",
            "calls",
            "errors",
            "mean latency",
        ],
        rows,
        "no providers",
    )


async def _balance(request: web.Request, engine: Dashboard, name: str) -> str:

    provider = engine.providers[name]
    native = type(provider).native_currency(provider.options)
    amount: Decimal | None = await request.app[ADMIN_CACHE].get(
        ("balance", name),
        lambda: engine.upstreams.call(name, "balance", provider.balance),
        None,
    )
    return "unavailable" if amount is None else f"{amount} {native}"


async def _keys(engine: Dashboard) -> str:
    budgets = engine.budgets
    rows = []
    for key in engine.config.keys:
        spent = await budgets.spent(key)
        left = await budgets.left(key)
        open_now = sum(
            1 for a in engine.store.open_activations() if a.key_id == key.key_id
        )
        rows.append(
            [
                _e(key.alias),
                _money(spent),
                "-" if key.budget is None else _money(key.budget),
                "-" if left is None else _money(left),
                str(open_now),
                "-" if key.max_active is None else str(key.max_active),
            ]
        )
    return _table(
        f"Keys ({_e(engine.config.currency)})",
        "keys",
        ["alias", "spent", "budget", "left", "open", "max active"],
        rows,
        "no keys",
    )


async def _outbox(engine: Dashboard) -> str:
    rows = [
        [str(activation_id), _e(op), str(attempts), _e(error or "-")]
        for activation_id, op, attempts, error in await engine.store.pending_ops()
    ]
    return _table(
        "Outbox (queued upstream calls)",
        "outbox",
        ["activation", "op", "attempts", "last error"],
        rows,
        "nothing queued",
    )


async def _reconciler(engine: Dashboard) -> str:
    rows = [
        [
            str(a.id),
            _e(a.provider),
            _e(a.order.service),
            str(a.order.country),
            _e(a.state),
            _when(a.created_at),
        ]
        for a in await engine.store.attempts([UNCERTAIN, PENDING])
    ]
    figures = await engine.store.figures()
    summary = ", ".join(
        f"{_e(state)} {count}"
        for state, count in sorted(_sum_states(figures["attempts"]).items())
    )
    table = _table(
        "Reconciler (purchases of unknown outcome)",
        "reconciler",
        ["attempt", "provider", "service", "country", "state", "since"],
        rows,
        "nothing to reconcile",
    )
    return table.replace(
        "</h2>", f'</h2><p class="summary">attempts: {summary or "none"}</p>', 1
    )


def _sum_states(rows: list[tuple[Any, ...]]) -> dict[str, int]:
    result: dict[str, int] = {}
    for state, _detail, count in rows:
        result[state] = result.get(state, 0) + count
    return result
