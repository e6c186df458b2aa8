"""The vocabulary both sides speak: upstream errors, orders, purchases, messages, time.

Providers speak only in these types; ``compat_server`` imports them from here (never the
other way round), like httpx's ``_exceptions.py`` and ``_models.py`` leaves.

::

    CompatError
    ├── RequestError            (compat_server.errors: the client's request)
    └── ProviderError           raised only in providers/ (and the router)
        ├── NoNumbers           definite refusal: nothing in stock / limit reached
        │   └── ChannelsLimit   as many numbers waiting as the upstream allows
        ├── NoBalance           definite refusal: upstream balance too low
        ├── UnknownService      definite refusal: service or country not offered
        ├── UpstreamAuth        the upstream rejected *our* token (operator's fault)
        ├── NotNow              the upstream answered "not yet" (try again later)
        ├── Refused             the upstream answered "never" (a cancel after the SMS)
        ├── UpstreamUnreachable the request provably never reached the upstream
        │   └── NotSent         ... because its deadline passed or its client left
        └── UpstreamUncertain   the request may have reached the upstream

    ConfigError                 the configuration is unusable (startup, check-config)

Each error class maps to exactly one dialect token in ``compat_server.dialect``.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal


class CompatError(Exception):
    """Base of every error sms-compat raises on purpose."""


class ProviderError(CompatError):
    """A failure reported by, or on the way to, an upstream provider."""

    def __init__(self, provider: str = "", detail: str = "") -> None:
        super().__init__(f"{provider}: {detail}" if detail else provider)
        self.provider = provider
        self.detail = detail


class NoNumbers(ProviderError):
    """Definite refusal: no number in stock, or the waiting-numbers limit is reached."""


class ChannelsLimit(NoNumbers):
    """Definite refusal: the account has as many numbers waiting as the upstream allows."""


class NoBalance(ProviderError):
    """Definite refusal: the upstream account cannot pay."""


class UnknownService(ProviderError):
    """Definite refusal: the service (or country) is not offered by this provider."""


class UpstreamAuth(ProviderError):
    """The upstream rejected our own token: a configuration fault, never the client's."""


class NotNow(ProviderError):
    """The upstream answered and refused for now (a cancel inside its early window).

    Not a fault: the breaker counts it as an answer; a queued call is tried later.
    """


class Refused(ProviderError):
    """The upstream answered and refused the call for good (a cancel of an order
    whose SMS already arrived); sending it again cannot succeed."""


class UpstreamUnreachable(ProviderError):
    """The request never reached the upstream (refused, DNS, circuit open)."""


class NotSent(UpstreamUnreachable):
    """The call was never sent: its deadline passed or its client left (not a fault)."""


class UpstreamUncertain(ProviderError):
    """The request may have reached the upstream; its outcome is unknown."""


class ConfigError(Exception):
    """The configuration file is unusable; the message names the place."""


Clock = Callable[[], float]

# Scheduling priorities of upstream calls, most urgent first: calls that spend or give
# back money, then what a waiting client asked for, then background refreshes.
PAID, CLIENT, BACKGROUND = 0, 1, 2


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Budget:
    """What the caller of an upstream call can afford: a start deadline and a pulse.

    ``deadline`` is a ``time.monotonic()`` instant by which the call must have been sent;
    ``alive`` says whether anybody still wants the answer (the client is connected).
    The app sets one per request (see :data:`BUDGET`); background work has none.
    """

    deadline: float = math.inf
    alive: Callable[[], bool] = _always
    priority: int = CLIENT

    def check(self, provider: str) -> None:
        """Raise NotSent if the call should not start any more."""
        if not self.alive():
            raise NotSent(provider, "client gone")
        if time.monotonic() >= self.deadline:
            raise NotSent(provider, "deadline passed")


# The budget of the work running now; contextvars follow it into the tasks it starts.
BUDGET: contextvars.ContextVar[Budget] = contextvars.ContextVar(
    "sms_compat_budget",
    default=Budget(),  # noqa: B039 - frozen, so immutable
)


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
    # lookups only: when the upstream says the order was made (epoch seconds, None if
    # it does not say), and how far off that may be (an upstream clock of unknown zone)
    created_at: float | None = None
    created_skew: float = 0.0


@dataclass(frozen=True)
class ActivationRef:
    """What a provider needs to act on a stored activation."""

    upstream_id: str
    phone: str
    service: str
    country: int
    created_at: float
    extra: Mapping[str, str] = field(default_factory=dict)
    # upstream orders this activation replaced (re-rents), oldest first
    previous_ids: tuple[str, ...] = ()


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
class BatchPoll:
    """One list call's view of many orders, keyed by upstream id.

    ``results``: orders the list answers for in full (every message, and closure);
    ``fetch``: orders it lists as having news it does not carry (poll each one).
    An order in neither was not covered: its state stays as last known.
    """

    results: Mapping[str, PollResult] = field(default_factory=dict)
    fetch: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Offer:
    """A service on sale in one country: native price and stock."""

    service: str  # sms-activate code
    price: Decimal
    count: int


@dataclass(frozen=True)
class RentOffer:
    """A service rentable in one country for a number of hours: native price, stock."""

    service: str  # sms-activate code; "full" = every sender
    price: Decimal
    count: int


@dataclass(frozen=True)
class RentOrder:
    """What getRentNumber asked for."""

    service: str
    country: int
    hours: int
    operators: tuple[str, ...] = ()


@dataclass(frozen=True)
class RentPurchase:
    """A number rented upstream until ``until`` (UNIX seconds)."""

    upstream_id: str
    phone: str
    price: Decimal
    until: float
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RentSms:
    """One SMS on a rented number; ``uid`` is stable across polls."""

    uid: str
    text: str
    code: str
    received_at: float
    sender: str = ""


@dataclass(frozen=True)
class RentPoll:
    """Every SMS the number holds, and whether the rent is over upstream."""

    messages: tuple[RentSms, ...] = ()
    closed: bool = False


@dataclass(frozen=True)
class RentRef:
    """What a provider needs to act on a stored rent."""

    upstream_id: str
    phone: str
    service: str
    country: int
    created_at: float
    until: float
    extra: Mapping[str, str] = field(default_factory=dict)
