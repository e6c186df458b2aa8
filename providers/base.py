"""The provider interface every backend implements, and the HTTP plumbing they share.

A provider adapts one upstream account to a handful of async operations. It speaks only in
the dataclasses below: it never renders dialect text, and no ``httpx``, ``json`` or
``KeyError`` exception leaves it (see :func:`upstream_errors`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

import httpx

from compat_server.errors import (
    ConfigError,
    UpstreamUncertain,
    UpstreamUnreachable,
)

Clock = Callable[[], float]


@dataclass(frozen=True)
class Order:
    """What the client asked getNumber for, in sms-activate terms."""

    service: str  # sms-activate service code, e.g. "tg"
    country: int  # sms-activate country id, e.g. 10
    operators: tuple[str, ...] = ()  # lower-case sms-activate operator names; () = any
    exclude_prefixes: tuple[
        str, ...
    ] = ()  # phoneException: international digit prefixes
    max_price: Decimal | None = None  # in the provider's native currency


@dataclass(frozen=True)
class Purchase:
    """A number bought upstream. ``extra`` is provider state persisted with it."""

    upstream_id: str
    phone: str  # full international form, digits only
    price: Decimal  # native currency
    operator: str = "any"
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ActivationRef:
    """What a provider needs to act on a stored activation."""

    upstream_id: str
    phone: str
    service: str
    country: int
    created_at: float
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sms:
    """One message (or voice OTP). ``uid`` identifies it stably across polls."""

    uid: str
    text: str
    code: str
    received_at: float


@dataclass(frozen=True)
class PollResult:
    """The upstream's view of an order: every message it reports, and whether it is over."""

    messages: tuple[Sms, ...] = ()
    closed: bool = False  # expired, cancelled or otherwise final upstream


@dataclass(frozen=True)
class Offer:
    """A service on sale in one country: native price and stock."""

    service: str  # sms-activate code
    price: Decimal
    count: int


class Provider(abc.ABC):
    """One upstream account, reached through the app's shared httpx client."""

    type_name: ClassVar[str]  # registry key, e.g. "smsman"
    currency: ClassVar[str]  # native currency: "VND", "RUB", "USD"
    secret_fields: ClassVar[tuple[str, ...]] = ()  # option names that hold secrets
    min_interval: float = 0.0  # seconds between two upstream calls (per instance)
    default_poll_interval: ClassVar[float] = 3.0
    can_lookup: ClassVar[bool] = False  # lookup_purchases() is implemented

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        http: httpx.AsyncClient,
        clock: Clock = time.time,
    ) -> None:
        self.name = name
        self.options = options
        self.http = http
        self.clock = clock
        # instance values shadow the class defaults; tests set min_interval: 0
        self.min_interval = number_option(
            name, options, "min_interval", type(self).min_interval
        )
        self.poll_interval = number_option(
            name, options, "poll_interval", self.default_poll_interval
        )
        self._pace_lock = asyncio.Lock()
        self._last_call = 0.0

    @classmethod
    def validate_options(cls, name: str, options: Mapping[str, Any]) -> None:
        """Raise ConfigError if ``options`` cannot build this provider (no network)."""
        cls(name, options, _offline_client())

    @classmethod
    def native_currency(cls, options: Mapping[str, Any]) -> str:
        """The currency this provider's balance and prices are in."""
        return cls.currency

    # ---- operations -------------------------------------------------------------------

    @abc.abstractmethod
    async def balance(self) -> Decimal:
        """Money left upstream, in the native currency."""

    @abc.abstractmethod
    async def buy(self, order: Order) -> Purchase:
        """Rent one number. Paid: never call it twice for one order.

        Raises NoNumbers, NoBalance or UnknownService on a definite refusal,
        UpstreamUnreachable when nothing was sent, UpstreamUncertain otherwise.
        """

    @abc.abstractmethod
    async def poll(self, ref: ActivationRef) -> PollResult:
        """Every message the upstream holds for this order, and whether it is over."""

    async def ready(self, ref: ActivationRef) -> None:  # noqa: B027 - optional hook
        """setStatus 1: the client sent the SMS; tell the upstream where it matters."""

    async def retry(self, ref: ActivationRef) -> Purchase | None:
        """setStatus 3: ask for another SMS. A Purchase means a new upstream order."""
        return None

    @abc.abstractmethod
    async def finish(self, ref: ActivationRef) -> None:
        """setStatus 6: the code worked; close the order upstream (idempotent)."""

    @abc.abstractmethod
    async def cancel(self, ref: ActivationRef) -> None:
        """setStatus 8, or expiry: release the number upstream (idempotent)."""

    @abc.abstractmethod
    async def catalog(self, country: int) -> list[Offer]:
        """Services on sale in an sms-activate country, native prices; [] if none."""

    @abc.abstractmethod
    def countries(self) -> list[int]:
        """sms-activate country ids this provider can serve."""

    def operators(self, country: int) -> list[str]:
        """sms-activate operator names selectable for a country."""
        return []

    async def lookup_purchases(self, order: Order, since: float) -> list[Purchase]:
        """Orders made upstream for this order since ``since`` (for reconciliation)."""
        return []

    def describe(self) -> str:
        """One line for logs and check-config, secrets masked."""
        parts = [f"type={self.type_name}"]
        for key, value in sorted(self.options.items()):
            if key == "type":
                continue
            shown = mask(str(value)) if key in self.secret_fields else mask_url(value)
            parts.append(f"{key}={shown}")
        return " ".join(parts)

    # ---- shared HTTP helper ---------------------------------------------------------

    async def _pace(self) -> None:
        """Keep at least ``min_interval`` seconds between two calls to this upstream."""
        if self.min_interval <= 0:
            return
        async with self._pace_lock:
            wait = self._last_call + self.min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_call = time.monotonic()

    async def _request_json(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> tuple[int, Any]:
        """Send one request; return (HTTP status, decoded JSON body).

        The body is decoded whatever the status. Transport failures become
        UpstreamUnreachable or UpstreamUncertain; a body that is not JSON becomes
        UpstreamUncertain.
        """
        await self._pace()
        with upstream_errors(self.name):
            response = await self.http.request(
                method, url, params=params, headers=headers, data=data
            )
            body = response.content
        try:
            return response.status_code, json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UpstreamUncertain(
                self.name, f"HTTP {response.status_code}, body is not JSON"
            ) from exc


_OFFLINE: httpx.AsyncClient | None = None


def _offline_client() -> httpx.AsyncClient:
    """A client that is never used to send: lets validation build a provider."""
    global _OFFLINE
    if _OFFLINE is None:
        _OFFLINE = httpx.AsyncClient()
    return _OFFLINE


@contextlib.contextmanager
def upstream_errors(provider: str) -> Iterator[None]:
    """Re-raise transport failures as our ProviderError subclasses."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise UpstreamUnreachable(provider, type(exc).__name__) from exc
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        raise UpstreamUncertain(provider, type(exc).__name__) from exc


def mask(secret: str) -> str:
    """A secret as shown in logs and check-config: nothing of it."""
    return "****"


def mask_url(value: Any) -> Any:
    """A URL with its credentials (``user:password@``) masked; other values as given."""
    if isinstance(value, str) and "@" in value:
        return _USERINFO.sub(r"\1****@", value)
    return value


_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@?#]+@")


# ---- defensive parsing (the seeds contradict themselves on types) ----------------------


def as_decimal(value: Any, default: Decimal | None = None) -> Decimal | None:
    """800, "800", "799.70", 799.7 -> Decimal; anything else -> default."""
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, str)):
        try:
            result = Decimal(str(value).strip())
        except InvalidOperation:
            return default
        return result if result.is_finite() else default
    if isinstance(value, float):
        return Decimal(repr(value))
    return default


def as_int(value: Any, default: int | None = None) -> int | None:
    """1, "1", 1.0 -> 1; anything else -> default."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    number = as_decimal(value)
    if number is None or number != number.to_integral_value():
        return default
    return int(number)


def as_bool(value: Any) -> bool:
    """true, "true", "1", 1 -> True; false, "false", "0", "", None -> False."""
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes"}
    return bool(value)


def as_text(value: Any) -> str:
    """None -> ""; numbers and strings -> stripped text; other shapes -> ""."""
    if value is None or isinstance(value, (dict, list, bool)):
        return ""
    return str(value).strip()


def digits(value: Any) -> str:
    """Only the decimal digits of a value ("+84 98-7" -> "84987")."""
    return "".join(ch for ch in as_text(value) if ch.isdigit())


def number_option(
    name: str, options: Mapping[str, Any], key: str, default: float
) -> float:
    """A non-negative number option (YAML number or numeric text), or ConfigError."""
    value = options.get(key, default)
    number = as_decimal(value)
    if number is None or number < 0:
        raise ConfigError(
            f"providers.{name}.{key}: must be a number >= 0, got {value!r}"
        )
    return float(number)


def url_option(name: str, options: Mapping[str, Any], key: str, default: str) -> str:
    """An http(s) URL without its trailing slash, or ConfigError naming the place."""
    value = options.get(key, default)
    if not isinstance(value, str) or not re.match(
        r"^https?://[^/\s]+\S*$", value.strip()
    ):
        raise ConfigError(f"providers.{name}.{key}: must be an http(s) URL")
    return value.strip().rstrip("/")


def require_option(name: str, options: Mapping[str, Any], key: str) -> str:
    """A non-empty string option, or ConfigError naming the place."""
    value = options.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"providers.{name}.{key}: missing (set it, e.g. ${{ENV_VAR}})"
        )
    return value.strip()
