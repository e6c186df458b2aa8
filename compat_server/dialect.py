"""The sms-activate ``handler_api.php`` dialect: parsing, tokens, rendering, errors.

This is the only module that knows dialect text. Every answer has HTTP status 200, errors
included, and no trailing newline; tokens go out as ``text/plain``, JSON as
``application/json`` (protocol.md section 8).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from compat_server import errors
from compat_server.store.records import StoreError
from providers import vocabulary

log = logging.getLogger("compat_server")

MAX_BODY = 64 * 1024  # bytes of form body read at most
BODY_TIMEOUT = 10.0  # seconds a client may take to send its whole body
MAX_VALUE = 1024  # characters per parameter value
MAX_PARAMS = 64
MAX_MONEY = (
    Decimal(10) ** 9
)  # a maxPrice above this is nonsense, and its arithmetic overflows

TEXT = "text/plain"
JSON = "application/json"


class Token(enum.Enum):
    """Dialect tokens, verbatim."""

    ACCESS_BALANCE = "ACCESS_BALANCE"
    ACCESS_NUMBER = "ACCESS_NUMBER"
    ACCESS_READY = "ACCESS_READY"
    ACCESS_RETRY_GET = "ACCESS_RETRY_GET"
    ACCESS_ACTIVATION = "ACCESS_ACTIVATION"
    ACCESS_CANCEL = "ACCESS_CANCEL"
    STATUS_WAIT_CODE = "STATUS_WAIT_CODE"
    STATUS_WAIT_RETRY = "STATUS_WAIT_RETRY"
    STATUS_WAIT_RESEND = "STATUS_WAIT_RESEND"
    STATUS_CANCEL = "STATUS_CANCEL"
    STATUS_OK = "STATUS_OK"
    FULL_SMS = "FULL_SMS"
    NO_KEY = "NO_KEY"
    BAD_KEY = "BAD_KEY"
    BAD_ACTION = "BAD_ACTION"
    BAD_SERVICE = "BAD_SERVICE"
    BAD_STATUS = "BAD_STATUS"
    NO_ACTIVATION = "NO_ACTIVATION"
    WRONG_ACTIVATION_ID = "WRONG_ACTIVATION_ID"
    EARLY_CANCEL_DENIED = "EARLY_CANCEL_DENIED"
    WRONG_EXCEPTION_PHONE = "WRONG_EXCEPTION_PHONE"
    NO_NUMBERS = "NO_NUMBERS"
    NO_BALANCE = "NO_BALANCE"
    ERROR_SQL = "ERROR_SQL"
    NO_ACTIVATIONS = "NO_ACTIVATIONS"
    OPERATORS_NOT_FOUND = "OPERATORS_NOT_FOUND"
    CHANNELS_LIMIT = "CHANNELS_LIMIT"
    NOT_AVAILABLE = "NOT_AVAILABLE"
    NOT_INCOMING = "NOT_INCOMING"
    INVALID_ACTIVATION_ID = "INVALID_ACTIVATION_ID"
    WRONG_SECURITY = "WRONG_SECURITY"
    RENEW_ACTIVATION_NOT_AVAILABLE = "RENEW_ACTIVATION_NOT_AVAILABLE"
    NEW_ACTIVATION_IMPOSSIBLE = "NEW_ACTIVATION_IMPOSSIBLE"
    # rent: sent inside {"status":"error","message":...}
    OUT_OF_STOCK = "OUT_OF_STOCK"
    NO_ID_RENT = "NO_ID_RENT"
    INCORECT_STATUS = "INCORECT_STATUS"  # sic: spelt so on the wire
    CANT_CANCEL = "CANT_CANCEL"
    ALREADY_FINISH = "ALREADY_FINISH"
    ALREADY_CANCEL = "ALREADY_CANCEL"
    INVALID_TIME = "INVALID_TIME"
    RENT_DIE = "RENT_DIE"
    SERVER_ERROR = "SERVER_ERROR"
    STATUS_FINISH = "STATUS_FINISH"


# One token per concrete error class. Upstream trouble that reaches a non-purchase action
# is ERROR_SQL, the classic "server-side problem" token; getNumber turns it into
# NO_NUMBERS before it gets here (a client retries NO_NUMBERS later, which is right).
ERROR_TOKENS: Mapping[type[vocabulary.CompatError], Token] = {
    errors.NoKey: Token.NO_KEY,
    errors.BadKey: Token.BAD_KEY,
    errors.BadAction: Token.BAD_ACTION,
    errors.BadStatus: Token.BAD_STATUS,
    errors.NoActivation: Token.NO_ACTIVATION,
    errors.WrongActivationId: Token.WRONG_ACTIVATION_ID,
    errors.EarlyCancelDenied: Token.EARLY_CANCEL_DENIED,
    errors.WrongExceptionPhone: Token.WRONG_EXCEPTION_PHONE,
    errors.BadParameter: Token.ERROR_SQL,
    errors.ClientGone: Token.NO_NUMBERS,  # never read; logged as the outcome
    vocabulary.NoNumbers: Token.NO_NUMBERS,
    vocabulary.ChannelsLimit: Token.CHANNELS_LIMIT,
    vocabulary.NoBalance: Token.NO_BALANCE,
    vocabulary.UnknownService: Token.BAD_SERVICE,
    vocabulary.UpstreamAuth: Token.ERROR_SQL,
    vocabulary.NotNow: Token.ERROR_SQL,
    vocabulary.Refused: Token.ERROR_SQL,
    vocabulary.UpstreamUnreachable: Token.ERROR_SQL,
    vocabulary.NotSent: Token.ERROR_SQL,
    vocabulary.UpstreamUncertain: Token.ERROR_SQL,
}

# The 39 keys smsactivateru.GetFreeSlots indexes (it raises KeyError on a missing one).
LEGACY_STOCK_KEYS = (
    "av_0 av_1 bd_0 dt_0 fb_0 fd_0 go_0 gt_0 ig_0 kp_0 kt_0 ma_0 mb_0 me_0 mm_0 mt_0 oi_0"
    " ok_0 ot_0 ot_1 pm_0 qw_0 sn_0 ss_0 tg_0 tn_0 tw_0 ub_0 uk_0 vi_0 vk_0 wa_0 wb_0"
    " we_0 ya_0 ya_1 ym_0 ym_1 zz_0"
).split()


@dataclass(frozen=True)
class Rendered:
    """An answer already rendered: its body as sent, and its content type."""

    body: bytes
    content_type: str


Reply = str | dict[str, Any] | list[Any] | Rendered


# ---- parsing -------------------------------------------------------------------------


async def read_params(
    request: web.Request, body_timeout: float = BODY_TIMEOUT
) -> dict[str, str]:
    """Merge query-string and body parameters; the body wins on a clash.

    Lenient like the original: unknown parameters are kept (and ignored later),
    values are stripped, a form body that is not valid UTF-8 is read as latin-1, and
    a JSON object body is accepted too. The whole body is read, however it was
    segmented or chunked. Oversized input, a broken body, or one not complete within
    ``body_timeout`` seconds raises BadParameter.
    """
    params: dict[str, str] = {}
    for name, value in request.query.items():
        params.setdefault(name.strip(), value)
    if request.method == "POST" and request.can_read_body:
        declared = request.content_length
        if declared is not None and declared > MAX_BODY:
            raise errors.BadParameter("body too large")  # refused before reading it
        try:
            async with asyncio.timeout(body_timeout):
                params.update(await _read_body(request))
        except TimeoutError:
            # a body that never ends (aiohttp also leaves a read waiting forever
            # when a chunk header is malformed) must not hold the connection
            raise errors.BadParameter("body incomplete") from None
    if len(params) > MAX_PARAMS:
        raise errors.BadParameter("too many parameters")
    for name, value in params.items():
        if not _encodable(name) or not _encodable(value):
            # lone surrogates (a JSON "\ud800") cannot be stored or compared as UTF-8
            raise errors.BadParameter("parameter is not valid text")
    return {k: v.strip() for k, v in params.items()}


async def _read_body(request: web.Request) -> dict[str, str]:
    """The body's parameters; BadParameter past MAX_BODY (the app's client_max_size)
    or on a body that breaks off or is malformed."""
    if request.content_type == "multipart/form-data":
        try:
            form = await request.post()  # bounded by the app's client_max_size
        except Exception:  # aiohttp raises several kinds on a broken multipart body
            raise errors.BadParameter("malformed or oversized multipart") from None
        return {k.strip(): v for k, v in form.items() if isinstance(v, str)}
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.BadParameter("body too large") from None
    except (HttpProcessingError, ConnectionError):
        raise errors.BadParameter("body broken off or malformed") from None
    return _parse_body(raw, request.content_type)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_body(raw: bytes, content_type: str) -> dict[str, str]:
    if not raw.strip():
        return {}
    if "json" in content_type:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise errors.BadParameter("body is not JSON (or nested too deep)") from None
        if not isinstance(data, dict):
            raise errors.BadParameter("JSON body is not an object")
        return {str(k): _scalar(v) for k, v in data.items()}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return {k.strip(): v for k, v in parse_qsl(text, keep_blank_values=True)}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def param(params: Mapping[str, str], *names: str) -> str:
    """The first non-empty value among ``names`` ("" if none); long values are refused."""
    for name in names:
        value = params.get(name, "")
        if len(value) > MAX_VALUE:
            raise errors.BadParameter(f"{name} too long")
        if value:
            return value
    return ""


def activation_id(params: Mapping[str, str]) -> int:
    """The ``id`` (or ``activationId``) parameter as an int; WrongActivationId if bad."""
    raw = param(params, "id", "activationId")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise errors.WrongActivationId(raw[:32])
    return int(raw)


def country_param(params: Mapping[str, str]) -> int | None:
    """The ``country`` parameter; None when absent or "any"; BadParameter if malformed."""
    raw = param(params, "country")
    if raw in ("", "any"):
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise errors.BadParameter("country")
    return int(raw)


def count_param(params: Mapping[str, str], name: str) -> int | None:
    """A non-negative integer parameter (``start``, ``limit``); None when absent."""
    raw = param(params, name)
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise errors.BadParameter(name)
    return int(raw)


def money_param(params: Mapping[str, str], *names: str) -> Decimal | None:
    """A dot (or comma) decimal such as maxPrice; None when absent."""
    raw = param(params, *names).replace(",", ".")
    if not raw:
        return None
    try:
        value = Decimal(raw)
    except ArithmeticError:
        raise errors.BadParameter(names[0]) from None
    if not value.is_finite() or value < 0 or value > MAX_MONEY:
        raise errors.BadParameter(names[0])
    return value


def list_param(params: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma list (``operator=mts,beeline``), lower-cased, blanks dropped."""
    return tuple(p.strip().lower() for p in param(params, name).split(",") if p.strip())


def exception_prefixes(params: Mapping[str, str]) -> tuple[str, ...]:
    """phoneException: comma list of digit prefixes; WrongExceptionPhone if malformed."""
    prefixes = list_param(params, "phoneException")
    for prefix in prefixes:
        if not (prefix.isascii() and prefix.isdigit() and 2 <= len(prefix) <= 15):
            raise errors.WrongExceptionPhone(prefix[:20])
    return prefixes


# ---- rendering -----------------------------------------------------------------------


def money(value: Decimal) -> str:
    """Money with two decimals and a dot, always (pysmshub needs the point)."""
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def money_number(value: Decimal) -> float:
    """Money as a JSON number with at most two decimals."""
    return float(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def token(kind: Token, *payload: object) -> str:
    """``KIND`` or ``KIND:a:b`` as sent on the wire."""
    return ":".join([kind.value, *map(str, payload)])


def rent_error(kind: Token, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """A rent action's error: ``{"status":"error","message":KIND}`` (+ ``info``)."""
    body: dict[str, Any] = {"status": "error", "message": kind.value}
    if info is not None:
        body["info"] = info
    return body


def rent_token(exc: vocabulary.CompatError) -> Token:
    """The rent ``message`` for a provider failure (upstream trouble: SERVER_ERROR)."""
    found = error_token(exc)
    if found in (Token.NO_NUMBERS, Token.NO_BALANCE, Token.BAD_SERVICE,
                 Token.CHANNELS_LIMIT):  # fmt: skip
        return found
    return Token.SERVER_ERROR


def safe_code(code: str) -> str:
    """A code fit for ``STATUS_OK:<code>``: no colons, no line breaks, never empty."""
    cleaned = " ".join(code.replace(":", " ").split())
    return cleaned or "0"


def rendered(reply: Reply) -> Rendered:
    """The reply as it goes on the wire: text for tokens, compact JSON otherwise."""
    if isinstance(reply, Rendered):
        return reply
    if isinstance(reply, str):
        return Rendered(reply.encode("utf-8"), TEXT)
    body = json.dumps(reply, ensure_ascii=False, separators=(",", ":"))
    return Rendered(body.encode("utf-8"), JSON)


def render(reply: Reply) -> web.Response:
    """A 200 response: text for tokens, compact JSON otherwise."""
    if isinstance(reply, str):
        return web.Response(text=reply, content_type=TEXT, charset="utf-8")
    if isinstance(reply, Rendered):
        return web.Response(
            body=reply.body, content_type=reply.content_type, charset="utf-8"
        )
    body = json.dumps(reply, ensure_ascii=False, separators=(",", ":"))
    return web.Response(text=body, content_type=JSON, charset="utf-8")


def error_token(exc: vocabulary.CompatError) -> Token:
    """The token for an error (ERROR_SQL for anything unmapped)."""
    for cls in type(exc).__mro__:
        found = ERROR_TOKENS.get(cls)
        if found is not None:
            return found
    return Token.ERROR_SQL


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every CompatError with its token and anything unexpected with ERROR_SQL.

    Always status 200; a traceback goes to the log, never to the client.
    """
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except vocabulary.CompatError as exc:
        response = render(error_token(exc).value)
    except StoreError as exc:  # the database is down or full: a state, not a bug
        log.warning("store unavailable on %s: %s", request.path, exc)
        response = render(Token.ERROR_SQL.value)
    except Exception:
        log.exception("unexpected error on %s", request.path)
        response = render(Token.ERROR_SQL.value)
    if not request.content.is_eof():
        # a body refused unread (too large, too slow): close rather than drain it
        response.force_close()
    return response
