"""The provider interface every backend implements, and the HTTP plumbing they share.

A provider adapts one upstream account to a handful of async operations. It speaks only in
the dataclasses below: it never renders dialect text, and no ``aiohttp``, ``json`` or
``KeyError`` exception leaves it (the transport's are mapped in :mod:`providers.http`).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import heapq
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, ClassVar, Self

from providers.http import UpstreamHttp
from providers.settings import ProviderSettings, as_decimal, parse, shown
from providers.vocabulary import (
    BUDGET,
    ActivationRef,
    BatchPoll,
    Budget,
    Clock,
    NotSent,
    Offer,
    Order,
    PollResult,
    Purchase,
    UnknownService,
    UpstreamUncertain,
)


class Pacer:
    """Spaces the calls to one upstream ``interval`` seconds apart, most urgent first.

    Waiters start by (priority, arrival). One whose deadline passes, or whose client
    leaves, while it waits gets NotSent and sends nothing; it never takes a slot.
    """

    def __init__(self, provider: str, interval: float) -> None:
        self.provider = provider
        self.interval = interval
        self._waiting: list[tuple[int, int, asyncio.Future[None], Budget]] = []
        self._arrival = itertools.count()
        self._next = 0.0  # monotonic instant the next call may start
        self._timer: asyncio.TimerHandle | None = None

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return sum(1 for _, _, f, _ in self._waiting if not f.done())

    async def slot(self, budget: Budget) -> None:
        """Return when this call may be sent; NotSent if it may not be sent any more."""
        budget.check(self.provider)
        if self.interval <= 0:
            return
        now = time.monotonic()
        if not self.queued and now >= self._next:
            self._next = now + self.interval
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(
            self._waiting, (budget.priority, next(self._arrival), future, budget)
        )
        self._arm()
        timeout = budget.deadline - now
        try:
            await asyncio.wait_for(future, None if math.isinf(timeout) else timeout)
        except TimeoutError:
            raise NotSent(
                self.provider, "deadline passed waiting to be paced"
            ) from None
        finally:
            if not future.done():
                future.cancel()  # left while waiting: the dispatcher skips it
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None or not self._waiting:
            return
        delay = max(0.0, self._next - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._dispatch)

    def _dispatch(self) -> None:
        self._timer = None
        now = time.monotonic()
        if now < self._next:
            self._arm()
            return
        while self._waiting:
            _, _, future, budget = heapq.heappop(self._waiting)
            if future.done():
                continue
            try:
                budget.check(self.provider)
            except NotSent as exc:
                future.set_exception(exc)
                continue
            future.set_result(None)
            self._next = now + self.interval
            break
        self._arm()


class Provider(abc.ABC):
    """One upstream account, reached through the app's shared UpstreamHttp."""

    type_name: ClassVar[str]  # registry key, e.g. "smsman"
    currency: ClassVar[str]  # native currency: "VND", "RUB", "USD"
    # every option it reads (besides type and markup), their types, secrets, readers
    settings_class: ClassVar[type[ProviderSettings]] = ProviderSettings
    min_interval: float = 0.0  # seconds between two upstream calls (per instance)
    default_poll_interval: ClassVar[float] = 3.0
    can_lookup: ClassVar[bool] = False  # lookup_purchases() is implemented
    can_cancel: ClassVar[bool] = True  # cancel() releases the number (and its money)
    can_reactivate: ClassVar[bool] = False  # reactivate() is implemented
    # poll_many() lists many orders in one upstream call (per instance: a clone may
    # turn out not to have its list action)
    can_poll_many: bool = False

    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        http: UpstreamHttp,
        clock: Clock = time.time,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """``settings`` as the config parsed them (one parse, in config.py).

        ``options`` are the raw options they came from, shown by describe() and read by
        native_currency(); without them, the settings' set fields stand in.
        """
        wanted = type(self).settings_class
        if not isinstance(settings, wanted):
            raise TypeError(
                f"{type(self).__name__} takes {wanted.__name__}, "
                f"got {type(settings).__name__}"
            )
        self.name = name
        self.settings = settings
        self.options: Mapping[str, Any] = (
            dict(options)
            if options is not None
            else {
                f.name: getattr(settings, f.name)
                for f in dataclasses.fields(settings)
                if getattr(settings, f.name) is not None
            }
        )
        self.http = http
        self.clock = clock
        # instance values shadow the class defaults; tests set min_interval: 0
        given = self.settings
        self.min_interval = (
            type(self).min_interval
            if given.min_interval is None
            else given.min_interval
        )
        self.poll_interval = (
            self.default_poll_interval
            if given.poll_interval is None
            else given.poll_interval
        )
        self.pacer = Pacer(name, self.min_interval)

    @classmethod
    def from_options(
        cls,
        name: str,
        options: Mapping[str, Any],
        http: UpstreamHttp,
        clock: Clock = time.time,
    ) -> Self:
        """Parse raw ``options`` (ConfigError names the place) and build: for tests, tools."""
        settings = parse(cls.settings_class, name, options)
        return cls(name, settings, http, clock, options=options)

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

    async def poll_many(self, refs: Sequence[ActivationRef]) -> BatchPoll:
        """Many orders' state from one list call (where ``can_poll_many``).

        What the list does not cover is left out of the answer, never guessed: an
        order absent from the list is not closed unless the backend documents it.
        """
        return BatchPoll()

    async def ready(self, ref: ActivationRef) -> None:  # noqa: B027 - optional hook
        """setStatus 1: the client sent the SMS; tell the upstream where it matters."""

    @property
    def retry_is_paid(self) -> bool:
        """Whether retry() buys a new order (money rules apply to it, as to buy)."""
        return False

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

    async def quote(self, order: Order) -> Offer | None:
        """The order's service and country as sold upstream right now; None if not.

        Read-only, asked before a paid call with a price limit, so it must not answer
        from a cache older than the call. This default reads ``catalog()``: a
        provider that caches its catalogue overrides it.
        """
        for offer in await self.catalog(order.country):
            if offer.service == order.service:
                return offer
        return None

    @abc.abstractmethod
    def countries(self) -> list[int]:
        """sms-activate country ids this provider can serve."""

    def operators(self, country: int) -> list[str]:
        """sms-activate operator names selectable for a country."""
        return []

    async def reactivate(self, ref: ActivationRef) -> Purchase:
        """getExtraActivation: a new paid order on a used number (if can_reactivate).

        Paid: never call it twice for one request; raises like buy().
        """
        raise UnknownService(self.name, "reactivation not offered")

    async def service_offer(self, country: int, service: str) -> Offer | None:
        """One service's offer when the bulk catalog lacks it (None: not on sale)."""
        return None

    async def lookup_purchases(self, order: Order, since: float) -> list[Purchase]:
        """Orders made upstream for this order since ``since`` (for reconciliation)."""
        return []

    def note_orders(self, created: Mapping[str, float]) -> None:  # noqa: B027
        """Orders of ours (upstream id -> when we bought them), told before a lookup.

        A provider whose upstream clock is uncertain may calibrate on them.
        """

    def describe(self) -> str:
        """One line for logs and check-config, secrets masked."""
        parts = [f"type={self.type_name}"]
        for key, value in sorted(self.options.items()):
            if key == "type":
                continue
            parts.append(f"{key}={shown(self.settings_class, key, value)}")
        return " ".join(parts)

    # ---- shared HTTP helper ---------------------------------------------------------

    async def _pace(self) -> None:
        """Wait for this call's slot (``min_interval`` apart, most urgent first).

        Raises NotSent, before anything is sent, when the caller's deadline passes or
        its client leaves while it waits.
        """
        await self.pacer.slot(BUDGET.get())

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
        status, body = await self.http.request(
            self.name, method, url, params=params, headers=headers, data=data
        )
        try:
            return status, json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UpstreamUncertain(
                self.name, f"HTTP {status}, body is not JSON"
            ) from exc


# ---- defensive parsing (the seeds contradict themselves on types) ----------------------


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
