"""A complete in-memory provider that needs no account (like libcloud's Dummy driver).

Balance, stock and prices come from the config. After a purchase, a realistic SMS with a
random code arrives ``sms_delay`` seconds later, and another one ``sms_delay`` seconds
after each retry. Cancel refunds. Orders unknown after a restart are rebuilt from the
stored activation, so a restart loses nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

from providers.base import Provider
from providers.rental import Rental
from providers.settings import ProviderSettings, as_decimal, option
from providers.vocabulary import (
    ActivationRef,
    ConfigError,
    NoBalance,
    NoNumbers,
    Offer,
    Order,
    PollResult,
    Purchase,
    RentOffer,
    RentOrder,
    RentPoll,
    RentPurchase,
    RentRef,
    RentSms,
    Sms,
    UnknownService,
)

RENT_FULL = ("Full rent", Decimal("30.00"))  # "full": any sender, per RENT_BLOCK hours
RENT_BLOCK = 4  # hours a service's price rents for; longer rents pay pro rata
RENT_REFUND = 1200.0  # seconds in which a cancelled rent is refunded

DEFAULT_SERVICES: dict[str, tuple[str, str, int]] = {
    # code: (name, price in the sandbox currency, stock)
    "tg": ("Telegram", "18.00", 420),
    "wa": ("WhatsApp", "25.00", 310),
    "go": ("Google", "12.50", 880),
    "fb": ("Facebook", "9.00", 640),
    "ig": ("Instagram", "8.00", 515),
    "vk": ("VK", "14.00", 120),
    "ok": ("OK", "6.00", 95),
    "mj": ("Zalo", "7.00", 230),
    "ka": ("Shopee", "5.50", 190),
    "lf": ("TikTok", "6.50", 270),
    "tw": ("Twitter", "4.00", 150),
    "ds": ("Discord", "5.00", 205),
    "am": ("Amazon", "4.50", 160),
    "mm": ("Microsoft", "3.00", 330),
    "ot": ("Any other", "10.00", 999),
}
DIAL_CODES = {
    0: "7",
    1: "380",
    2: "7",
    6: "62",
    10: "84",
    12: "1",
    16: "44",
    22: "91",
    25: "856",
    43: "49",
    187: "1",
}
LOCAL_DIGITS = {0: 10, 2: 10, 10: 9, 25: 10, 12: 10, 187: 10, 16: 10, 22: 10}
TEMPLATES = {
    "tg": "Telegram code: {code}\n\nYou can also tap on this link to log in: t.me/login/{code}",
    "wa": "Your WhatsApp code: {dash}\nDon't share this code with others",
    "go": "G-{code} is your Google verification code.",
    "fb": "{code} is your Facebook confirmation code",
    "mj": "Ma xac thuc Zalo cua ban la {code}. Khong chia se ma nay voi bat ky ai.",
    "ka": "[Shopee] Ma xac minh cua ban la {code}. Co hieu luc trong 15 phut.",
}


@dataclass
class _Order:
    upstream_id: str
    service: str
    price: Decimal
    created: float
    waits_from: float  # when the current wait for an SMS started
    delivered: int = 0  # how many SMS have "arrived"
    wanted: int = 1  # how many SMS the client has asked for so far
    closed: bool = False
    sms: list[Sms] = field(default_factory=list)


@dataclass
class _Rent:
    upstream_id: str
    service: str
    price: Decimal
    created: float
    until: float
    closed: bool = False
    got_sms: bool = False


DEFAULT_COUNTRIES = [0, 10, 25, 187]


@dataclass(frozen=True)
class SandboxSettings(ProviderSettings):
    """The options of the in-memory sandbox: its whole world comes from config."""

    currency: str = option(lambda n, o, k: SandboxProvider.native_currency(o))
    sms_delay: float = option(lambda n, o, k: _number(n, o, k, 5.0))
    balance: float = option(lambda n, o, k: _number(n, o, k, 1000.0))
    countries: list[int] = option(lambda n, o, k: _country_list(n, o, k))
    services: dict[str, tuple[str, Decimal, int]] = option(
        lambda n, o, k: _services(n, o.get(k))
    )
    price_drift: Decimal = option(lambda n, o, k: _drift(n, o, k))
    operators: list[str] = option(lambda n, o, k: _operator_list(n, o, k))
    rent_countries: list[int] = option(lambda n, o, k: _country_list(n, o, k))


class SandboxProvider(Provider, Rental):
    """Everything from config, nothing from the network; it rents numbers too."""

    type_name = "sandbox"
    currency = "RUB"
    default_poll_interval = 1.0
    can_lookup = True
    settings_class: ClassVar[type[ProviderSettings]] = SandboxSettings
    settings: SandboxSettings

    def __init__(
        self, name: str, settings: ProviderSettings, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(name, settings, *args, **kwargs)
        given = self.settings
        self._currency = given.currency
        self.sms_delay = given.sms_delay
        self._balance = Decimal(str(given.balance))
        self._countries = given.countries
        self._services = given.services
        self.price_drift = given.price_drift
        self._operators = given.operators  # [] = any operator
        self._orders: dict[str, _Order] = {}
        self._rent_countries = given.rent_countries
        self._rents: dict[str, _Rent] = {}

    @classmethod
    def native_currency(cls, options: Mapping[str, Any]) -> str:
        """The sandbox is priced in its ``currency`` option (RUB by default)."""
        return str(options.get("currency", "RUB")).upper()

    async def balance(self) -> Decimal:
        """The configured balance, minus purchases, plus refunds."""
        return self._balance

    async def buy(self, order: Order) -> Purchase:
        """Sell a random number when the service exists, is in stock and affordable."""
        if order.country not in self._countries or order.service not in self._services:
            raise UnknownService(self.name, order.service)
        _, price, stock = self._services[order.service]
        if stock <= 0:
            raise NoNumbers(self.name, order.service)
        if order.max_price is not None and price > order.max_price:
            raise NoNumbers(self.name, "price above maxPrice")
        price += self.price_drift
        wanted = [o for o in order.operators if o != "any"]
        if wanted and self._operators and not set(wanted) & set(self._operators):
            raise NoNumbers(self.name, "no number of the requested operators")
        if self._balance < price:
            raise NoBalance(self.name, "sandbox balance")
        self._balance -= price
        upstream_id = str(100_000_000 + secrets.randbelow(899_999_999))
        now = self.clock()
        self._orders[upstream_id] = _Order(upstream_id, order.service, price, now, now)
        phone = self._phone(order)
        operator = next(
            (o for o in wanted if not self._operators or o in self._operators), "any"
        )
        return Purchase(upstream_id, phone, price, operator)

    def _phone(self, order: Order) -> str:
        prefix = DIAL_CODES.get(order.country, "1")
        length = LOCAL_DIGITS.get(order.country, 9)
        for _ in range(50):
            phone = prefix + "".join(str(secrets.randbelow(10)) for _ in range(length))
            if not any(phone.startswith(p) for p in order.exclude_prefixes):
                return phone
        raise NoNumbers(self.name, "every number excluded by phoneException")

    def _order(self, ref: ActivationRef) -> _Order:
        known = self._orders.get(ref.upstream_id)
        if known is None:  # after a restart: rebuild from what the store kept
            _, price, _ = self._services.get(ref.service, ("", Decimal(0), 0))
            known = _Order(
                ref.upstream_id, ref.service, price, ref.created_at, ref.created_at
            )
            self._orders[ref.upstream_id] = known
        return known

    async def poll(self, ref: ActivationRef) -> PollResult:
        """SMS number n arrives ``sms_delay`` seconds after the n-th request for one."""
        order = self._order(ref)
        if not order.closed and order.delivered < order.wanted:
            if self.clock() >= order.waits_from + self.sms_delay:
                order.delivered += 1
                order.sms.append(self._message(order))
        return PollResult(tuple(order.sms), closed=order.closed)

    def _message(self, order: _Order) -> Sms:
        seed = hashlib.sha256(
            f"{order.upstream_id}:{order.delivered}".encode()
        ).hexdigest()
        code = str(100_000 + int(seed[:8], 16) % 900_000)
        name = self._services.get(order.service, ("the service",))[0]
        template = TEMPLATES.get(
            order.service, "Your {name} verification code is {code}"
        )
        text = template.format(code=code, dash=f"{code[:3]}-{code[3:]}", name=name)
        return Sms(f"{order.upstream_id}:{order.delivered}", text, code, self.clock())

    async def retry(self, ref: ActivationRef) -> Purchase | None:
        """Another SMS will come ``sms_delay`` seconds from now."""
        order = self._order(ref)
        order.wanted = order.delivered + 1
        order.waits_from = self.clock()
        return None

    async def finish(self, ref: ActivationRef) -> None:
        """Close the order (idempotent)."""
        self._order(ref).closed = True

    async def cancel(self, ref: ActivationRef) -> None:
        """Close the order and refund it if no SMS came (idempotent)."""
        order = self._order(ref)
        if not order.closed and not order.delivered:
            self._balance += order.price
        order.closed = True

    async def catalog(self, country: int) -> list[Offer]:
        """The configured services, in every configured country."""
        if country not in self._countries:
            return []
        return [
            Offer(code, price, stock)
            for code, (_, price, stock) in self._services.items()
        ]

    def countries(self) -> list[int]:
        """The configured countries."""
        return list(self._countries)

    def operators(self, country: int) -> list[str]:
        """The configured operators ([] = numbers of any operator)."""
        return list(self._operators) if country in self._countries else []

    async def lookup_purchases(self, order: Order, since: float) -> list[Purchase]:
        """Open sandbox orders for the service made since ``since``."""
        return [
            Purchase(o.upstream_id, "", o.price, created_at=o.created)
            for o in self._orders.values()
            if o.service == order.service and o.created >= since and not o.closed
        ]

    # ---- rent ---------------------------------------------------------------------

    def rent_countries(self) -> list[int]:
        """The configured ``rent_countries`` (default: every served country)."""
        return list(self._rent_countries)

    def _rent_table(self) -> dict[str, tuple[str, Decimal, int]]:
        name, price = RENT_FULL
        return {"full": (name, price, 50), **self._services}

    async def rent_offers(self, country: int, hours: int) -> list[RentOffer]:
        """Every configured service plus ``full``, priced pro rata for ``hours``."""
        if country not in self._rent_countries:
            return []
        return [
            RentOffer(code, _rent_price(price, hours), stock)
            for code, (_, price, stock) in self._rent_table().items()
        ]

    async def rent(self, order: RentOrder) -> RentPurchase:
        """A random number until now + hours; one SMS comes ``sms_delay`` s later."""
        table = self._rent_table()
        if order.country not in self._rent_countries or order.service not in table:
            raise UnknownService(self.name, order.service)
        _, per_block, stock = table[order.service]
        if stock <= 0:
            raise NoNumbers(self.name, order.service)
        price = _rent_price(per_block, order.hours)
        if self._balance < price:
            raise NoBalance(self.name, "sandbox balance")
        self._balance -= price
        upstream_id = str(100_000_000 + secrets.randbelow(899_999_999))
        now = self.clock()
        until = now + order.hours * 3600
        self._rents[upstream_id] = _Rent(upstream_id, order.service, price, now, until)
        phone = self._phone(Order(order.service, order.country))
        return RentPurchase(upstream_id, phone, price, until)

    def _rent_of(self, ref: RentRef) -> _Rent:
        known = self._rents.get(ref.upstream_id)
        if known is None:  # after a restart: rebuild from what the store kept
            known = _Rent(
                ref.upstream_id, ref.service, Decimal(0), ref.created_at, ref.until
            )
            self._rents[ref.upstream_id] = known
        known.until = max(known.until, ref.until)
        return known

    async def rent_poll(self, ref: RentRef) -> RentPoll:
        """The one SMS, ``sms_delay`` seconds after the rent began (if still held)."""
        rent = self._rent_of(ref)
        now = self.clock()
        at = rent.created + self.sms_delay
        messages: tuple[RentSms, ...] = ()
        if now >= at and at <= rent.until and not (rent.closed and not rent.got_sms):
            rent.got_sms = True
            seed = hashlib.sha256(f"rent:{rent.upstream_id}".encode()).hexdigest()
            code = str(100_000 + int(seed[:8], 16) % 900_000)
            name = self._rent_table().get(rent.service, ("the service",))[0]
            text = f"Your {name} verification code is {code}"
            messages = (RentSms(f"{rent.upstream_id}:1", text, code, at, "Sandbox"),)
        return RentPoll(messages, closed=rent.closed or now >= rent.until)

    async def rent_release(self, ref: RentRef) -> None:
        """Close the rent (idempotent); refunded if no SMS had come yet."""
        rent = self._rent_of(ref)
        if (
            not rent.closed
            and not rent.got_sms
            and self.clock() < rent.created + self.sms_delay
        ):
            self._balance += rent.price
        rent.closed = True

    async def rent_lookup(
        self, country: int, service: str, since: float
    ) -> list[RentPurchase] | None:
        """Open sandbox rents of the service made since ``since``."""
        return [
            RentPurchase(r.upstream_id, "", r.price, r.until)
            for r in self._rents.values()
            if r.service == service and r.created >= since and not r.closed
        ]

    async def prolong_price(self, ref: RentRef, hours: int) -> Decimal:
        """Pro rata, like the rent itself."""
        _, per_block, _ = self._rent_table().get(ref.service, ("", Decimal(0), 0))
        return _rent_price(per_block, hours)

    async def prolong(self, ref: RentRef, hours: int) -> float:
        """Pay and move ``until`` by ``hours``."""
        rent = self._rent_of(ref)
        price = await self.prolong_price(ref, hours)
        if self._balance < price:
            raise NoBalance(self.name, "sandbox balance")
        self._balance -= price
        rent.until += hours * 3600
        return rent.until


def _rent_price(per_block: Decimal, hours: int) -> Decimal:
    return (per_block * hours / RENT_BLOCK).quantize(Decimal("0.01"))


def _country_list(name: str, options: Mapping[str, Any], key: str) -> list[int]:
    default = DEFAULT_COUNTRIES
    if key != "countries":  # rent_countries default to the countries
        default = options.get("countries", DEFAULT_COUNTRIES)
    value = options.get(key, default)
    if not isinstance(value, list) or not all(isinstance(c, int) for c in value):
        raise ConfigError(f"providers.{name}.{key}: must be a list of country ids")
    return value


def _drift(name: str, options: Mapping[str, Any], key: str) -> Decimal:
    # charged on top of the listed price: rehearses a price that moved between
    # the quote and the purchase
    # may be negative: rehearses an upstream reporting a nonsense charge
    drift = as_decimal(options.get(key, 0))
    if drift is None:
        raise ConfigError(f"providers.{name}.{key}: must be a number")
    return drift


def _operator_list(name: str, options: Mapping[str, Any], key: str) -> list[str]:
    operators = options.get(key, [])
    if not isinstance(operators, list) or not all(
        isinstance(o, str) for o in operators
    ):
        raise ConfigError(f"providers.{name}.{key}: must be a list of names")
    return [o.lower() for o in operators]


def _number(name: str, options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"providers.{name}.{key}: must be a non-negative number")
    return float(value)


def _services(name: str, raw: Any) -> dict[str, tuple[str, Decimal, int]]:
    if raw is None:
        return {c: (n, Decimal(p), s) for c, (n, p, s) in DEFAULT_SERVICES.items()}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"providers.{name}.services: must map codes to {{price, count}}"
        )
    result = {}
    for code, spec in raw.items():
        where = f"providers.{name}.services.{code}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a mapping with price and count")
        try:
            price = Decimal(str(spec.get("price", 10)))
            count = int(spec.get("count", 100))
        except (ArithmeticError, ValueError, TypeError):
            raise ConfigError(f"{where}: price and count must be numbers") from None
        default_name = DEFAULT_SERVICES.get(str(code), (str(code),))[0]
        result[str(code)] = (str(spec.get("name", default_name)), price, count)
    return result
