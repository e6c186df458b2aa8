"""Load and validate ``config.yaml`` into frozen dataclasses.

Secrets appear in the file as ``${NAME}``; they are expanded inside string values after
``yaml.safe_load`` (never in the raw text), and an unset variable is an error naming the
place. Every error is a :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import yaml

from providers import get_provider_class, provider_type
from providers.base import Provider
from providers.http import UpstreamHttp
from providers.settings import ProviderSettings, mask, mask_userinfo, parse, shown
from providers.vocabulary import Clock, ConfigError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# ISO-4217 numeric codes sent in getNumberV2 and getActiveActivations.
CURRENCY_NUMBERS = {
    "RUB": 643,
    "USD": 840,
    "EUR": 978,
    "VND": 704,
    "CNY": 156,
    "LAK": 418,
    "INR": 356,
    "IDR": 360,
    "KZT": 398,
    "UAH": 980,
    "GBP": 826,
    "THB": 764,
}


# Options each section accepts; anything else is a typo and refused by name.
SECTION_OPTIONS: dict[str, tuple[str, ...]] = {
    "server": (
        "host",
        "port",
        "request_deadline",
        "tls",
        "body_timeout",
        "max_connections",
        "max_connections_per_client",
        "log_repeat_interval",
        "event_loop",
    ),
    "store": ("path", "busy_timeout", "url", "pool"),
    "activation": ("lifetime", "early_cancel"),
    "currency": ("display", "rates"),
    "upstream": ("connect_timeout", "read_timeout", "catalog_ttl", "max_connections"),
    "breaker": ("failures", "cooldown"),
    "workers": (
        "outbox_interval",
        "outbox_max_backoff",
        "sweep_interval",
        "reconcile_interval",
    ),
    "admin": ("token",),
}
KEY_OPTIONS = (
    "key",
    "alias",
    "providers",
    "routes",
    "default_country",
    "budget",
    "max_active",
    "show_upstream_balance",
    "webhook",
)
ROUTE_OPTIONS = ("providers", "service", "country", "strategy")


@dataclass(frozen=True)
class KeyConfig:
    """One api_key clients may send, and where its purchases go."""

    key: str = field(repr=False)
    alias: str
    providers: tuple[str, ...]
    routes: tuple[RouteConfig, ...] = ()
    default_country: int | None = None
    budget: Decimal | None = None  # display currency; None = no limit
    max_active: int | None = None  # open activations at once; None = no limit
    show_upstream_balance: bool = True
    webhook: str | None = field(default=None, repr=False)  # may carry credentials

    @functools.cached_property
    def key_id(self) -> str:
        """A stable, non-secret identity for the store (a hash of the key)."""
        return key_id(self.key)


@dataclass(frozen=True)
class RouteConfig:
    """Providers for a service and/or country, tried by ``strategy``."""

    providers: tuple[str, ...]
    service: str | None = None
    country: int | None = None
    strategy: str = "ordered"  # ordered | cheapest

    def matches(self, service: str, country: int) -> bool:
        """Whether a getNumber for (service, country) takes this route."""
        return (self.service in (None, service)) and (self.country in (None, country))


@dataclass(frozen=True)
class ProviderConfig:
    """One configured upstream account."""

    name: str
    type: str
    options: Mapping[str, Any] = field(repr=False)
    markup: Decimal = Decimal(1)
    # the options as validated by the provider's settings class (None: built by hand)
    settings: ProviderSettings | None = field(default=None, repr=False, compare=False)


def build_provider(
    name: str, p: ProviderConfig, http: UpstreamHttp, clock: Clock
) -> Provider:
    """One provider from its parsed settings (parsed here when built by hand)."""
    cls = get_provider_class(p.type)
    settings = p.settings or parse(cls.settings_class, name, p.options)
    return cls(name, settings, http, clock, options=p.options)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    host: str = "127.0.0.1"
    port: int = 8080
    tls_port: int = 443
    tls_dir: str | None = None  # server.tls.dir: https beside http when set
    store_path: str = "sms-compat.sqlite3"
    store_busy_timeout: float = 5.0  # s a store write waits for another process's lock
    # store.url: a PostgreSQL database shared by several servers (None: SQLite at
    # store_path); it may carry a password, so it is never shown as given
    store_url: str | None = field(default=None, repr=False)
    store_pool_min: int = 1  # store.pool.min: connections kept open
    store_pool_max: int = 10  # store.pool.max: connections at most
    lifetime: float = 1200.0
    early_cancel: float = 0.0
    keys: tuple[KeyConfig, ...] = ()
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    currency: str = "RUB"
    rates: Mapping[str, Decimal] = field(default_factory=dict)
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    upstream_connections: int = 100  # upstream.max_connections: the keep-alive pool
    # seconds a client request may wait for its upstream calls to start; a purchase
    # that cannot be sent by then answers NO_NUMBERS and buys nothing
    request_deadline: float = 20.0
    catalog_ttl: float = 60.0
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    outbox_interval: float = 2.0
    outbox_max_backoff: float = 300.0
    sweep_interval: float = 5.0
    reconcile_interval: float = 10.0
    admin_token: str | None = field(default=None, repr=False)
    body_timeout: float = 10.0
    max_connections: int = 1024  # 0: no cap (beyond the descriptor limit)
    max_connections_per_client: int = 256  # per client address; 0: no cap
    log_repeat_interval: float = 60.0  # a repeating failure is logged once per interval
    event_loop: str = "auto"  # auto (uvloop if installed), asyncio or uvloop
    source: str = ""

    def find_key(self, presented: str) -> KeyConfig | None:
        """The key config matching ``presented``, compared in constant time."""
        import hmac

        found = None
        for candidate in self.keys:
            # compare against every key so timing does not reveal which one matched
            if hmac.compare_digest(candidate.key.encode(), presented.encode()):
                found = candidate
        return found

    def rate(self, currency: str) -> Decimal:
        """Multiplier from ``currency`` to the display currency."""
        if currency == self.currency:
            return Decimal(1)
        return self.rates[currency]

    @property
    def currency_number(self) -> int:
        """ISO-4217 numeric code of the display currency."""
        return CURRENCY_NUMBERS.get(self.currency, 0)


def key_id(key: str) -> str:
    """A stable, non-secret identity for a client key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> Config:
    """Read, expand and validate a config file; ConfigError names the bad place."""
    env = os.environ if env is None else env
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return parse_config(_expand(raw, env, ""), source=str(path))


def _expand(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):
        # in store.url a password from ${ENV} goes into the URL's user:password part
        # as itself: percent-encoded there, so a generated one with / # ? @ : works
        credentials_end = (
            value.rfind("@") if where == "store.url" and "://" in value else -1
        )

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env or env[name] == "":
                raise ConfigError(
                    f"{where or 'config'}: environment variable {name} is not set"
                )
            if match.start() < credentials_end:
                return quote(env[name], safe="")
            return env[name]

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _expand(v, env, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def parse_config(raw: Mapping[str, Any], source: str = "") -> Config:
    """Validate an already-loaded mapping (used by tests and load_config)."""
    allowed = {
        "server",
        "store",
        "activation",
        "keys",
        "providers",
        "routes",
        "currency",
        "upstream",
        "breaker",
        "workers",
        "admin",
    }
    for name in raw:
        if name not in allowed:
            raise ConfigError(
                f"{name}: unknown section (known: {', '.join(sorted(allowed))})"
            )
    server = _section(raw, "server")
    store = _section(raw, "store")
    activation = _section(raw, "activation")
    currency = _section(raw, "currency")
    upstream = _section(raw, "upstream")
    breaker = _section(raw, "breaker")
    workers = _section(raw, "workers")
    admin = _section(raw, "admin")
    for section, names in SECTION_OPTIONS.items():
        _known(_section(raw, section), names, section)

    providers: dict[str, ProviderConfig] = {}
    raw_providers = raw.get("providers") or {}
    if not isinstance(raw_providers, dict) or not raw_providers:
        raise ConfigError("providers: define at least one provider")
    for name, options in raw_providers.items():
        where = f"providers.{name}"
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: must be a mapping")
        type_name = options.get("type")
        if not isinstance(type_name, str):
            raise ConfigError(f"{where}.type: missing")
        type_name = provider_type(type_name, options)  # smspva + api: rent
        try:
            cls = get_provider_class(type_name)
        except ConfigError as exc:
            raise ConfigError(f"{where}.type: {exc}") from None
        settings = parse(cls.settings_class, str(name), options)  # no provider built
        markup = _decimal(options.get("markup", 1), f"{where}.markup")
        if markup <= 0:
            raise ConfigError(f"{where}.markup: must be positive")
        clean = {k: v for k, v in options.items() if k != "markup"}
        providers[str(name)] = ProviderConfig(
            str(name), type_name, clean, markup, settings
        )

    display = str(currency.get("display", "RUB")).upper()
    rates = {
        str(k).upper(): _decimal(v, f"currency.rates.{k}")
        for k, v in (currency.get("rates") or {}).items()
    }
    for provider in providers.values():
        native = get_provider_class(provider.type).native_currency(provider.options)
        if native != display and native not in rates:
            raise ConfigError(
                f"currency.rates.{native}: missing (provider {provider.name} is priced in "
                f"{native}, clients see {display})"
            )

    keys: list[KeyConfig] = []
    raw_keys = raw.get("keys") or []
    if not isinstance(raw_keys, list) or not raw_keys:
        raise ConfigError("keys: define at least one client key")
    for index, entry in enumerate(raw_keys):
        where = f"keys[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping")
        _known(entry, KEY_OPTIONS, where)
        key = entry.get("key")
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{where}.key: missing")
        names = _provider_list(entry.get("providers"), providers, f"{where}.providers")
        routes = _routes(entry.get("routes") or [], providers, f"{where}.routes")
        default_country = entry.get("default_country")
        if default_country is not None:
            default_country = _int(default_country, f"{where}.default_country")
        alias = str(entry.get("alias") or f"key{index + 1}")
        budget = None
        if entry.get("budget") is not None:
            budget = _decimal(entry["budget"], f"{where}.budget")
            if budget < 0:
                raise ConfigError(f"{where}.budget: must not be negative")
        max_active = None
        if entry.get("max_active") is not None:
            max_active = _int(entry["max_active"], f"{where}.max_active", low=1)
        show = entry.get("show_upstream_balance", True)
        if not isinstance(show, bool):
            raise ConfigError(f"{where}.show_upstream_balance: must be true or false")
        webhook = entry.get("webhook")
        if webhook is not None and (
            not isinstance(webhook, str)
            or not re.fullmatch(r"https?://[^/\s?#]+\S*", webhook.strip())
        ):
            raise ConfigError(f"{where}.webhook: must be an http(s) URL")
        keys.append(
            KeyConfig(
                key.strip(),
                alias,
                names,
                routes,
                default_country,
                budget=budget,
                max_active=max_active,
                show_upstream_balance=show,
                webhook=webhook.strip() if webhook else None,
            )
        )
    if len({k.key for k in keys}) != len(keys):
        raise ConfigError("keys: the same key is listed twice")
    if len({k.alias for k in keys}) != len(keys):
        raise ConfigError(
            "keys: the same alias is used twice (aliases name keys in logs and metrics)"
        )
    admin_token = admin.get("token")
    if admin_token is not None and (
        not isinstance(admin_token, str) or len(admin_token.strip()) < 16
    ):
        raise ConfigError("admin.token: must be a string of at least 16 characters")

    tls = server.get("tls") or {}
    if not isinstance(tls, dict):
        raise ConfigError("server.tls: must be a mapping (port, dir)")
    for name in tls:
        if name not in ("port", "dir"):
            raise ConfigError(f"server.tls.{name}: unknown (known: dir, port)")
    if tls and not tls.get("dir"):
        raise ConfigError(
            "server.tls.dir: missing (the directory of `sms-compat tls init`)"
        )

    store_url, pool_min, pool_max = _store_url(store)

    return Config(
        host=str(server.get("host", "127.0.0.1")),
        port=_int(server.get("port", 8080), "server.port", low=0, high=65535),
        tls_port=_int(tls.get("port", 443), "server.tls.port"),
        tls_dir=str(tls["dir"]) if tls else None,
        store_path=str(store.get("path", "sms-compat.sqlite3")),
        store_busy_timeout=_float(store.get("busy_timeout", 5.0), "store.busy_timeout"),
        store_url=store_url,
        store_pool_min=pool_min,
        store_pool_max=pool_max,
        lifetime=_float(
            activation.get("lifetime", 1200), "activation.lifetime", positive=True
        ),
        early_cancel=_float(
            activation.get("early_cancel", 0), "activation.early_cancel"
        ),
        keys=tuple(keys),
        providers=providers,
        routes=_routes(raw.get("routes") or [], providers, "routes"),
        currency=display,
        rates=rates,
        connect_timeout=_float(
            upstream.get("connect_timeout", 5),
            "upstream.connect_timeout",
            positive=True,
        ),
        read_timeout=_float(
            upstream.get("read_timeout", 20), "upstream.read_timeout", positive=True
        ),
        upstream_connections=_int(
            upstream.get("max_connections", 100),
            "upstream.max_connections",
            low=1,
            high=10_000,
        ),
        request_deadline=_positive(
            server.get("request_deadline", 20), "server.request_deadline"
        ),
        catalog_ttl=_float(upstream.get("catalog_ttl", 60), "upstream.catalog_ttl"),
        breaker_failures=_int(breaker.get("failures", 5), "breaker.failures", low=1),
        breaker_cooldown=_float(breaker.get("cooldown", 30), "breaker.cooldown"),
        outbox_interval=_float(
            workers.get("outbox_interval", 2), "workers.outbox_interval", positive=True
        ),
        outbox_max_backoff=_float(
            workers.get("outbox_max_backoff", 300), "workers.outbox_max_backoff"
        ),
        sweep_interval=_float(
            workers.get("sweep_interval", 5), "workers.sweep_interval", positive=True
        ),
        reconcile_interval=_float(
            workers.get("reconcile_interval", 10),
            "workers.reconcile_interval",
            positive=True,
        ),
        admin_token=None if admin_token is None else admin_token.strip(),
        body_timeout=_float(server.get("body_timeout", 10), "server.body_timeout"),
        max_connections=_count(
            server.get("max_connections", 1024), "server.max_connections"
        ),
        max_connections_per_client=_count(
            server.get("max_connections_per_client", 256),
            "server.max_connections_per_client",
        ),
        log_repeat_interval=_float(
            server.get("log_repeat_interval", 60), "server.log_repeat_interval"
        ),
        event_loop=_choice(
            server.get("event_loop", "auto"),
            "server.event_loop",
            ("auto", "asyncio", "uvloop"),
        ),
        source=source,
    )


def describe(config: Config) -> str:
    """The configuration as text with every secret masked (for check-config)."""
    lines = [
        f"config: {config.source or '(in memory)'}",
        f"server: {config.host}:{config.port}"
        + (f" https:{config.tls_port} tls={config.tls_dir}" if config.tls_dir else ""),
        f"store: {store_text(config)}",
        f"activation: lifetime={config.lifetime:g}s early_cancel={config.early_cancel:g}s",
        f"currency: {config.currency} rates="
        + (", ".join(f"{k}={v}" for k, v in sorted(config.rates.items())) or "-"),
    ]
    if config.admin_token:
        lines.append(f"admin: /admin/ token={mask(config.admin_token)}")
    for key in config.keys:
        limits = "".join(
            f" {name}={value}"
            for name, value in (
                ("budget", key.budget),
                ("max_active", key.max_active),
                (
                    "show_upstream_balance",
                    None if key.show_upstream_balance else "false",
                ),
            )
            if value is not None
        )
        lines.append(
            f"key {key.alias}: {mask(key.key)} -> {', '.join(key.providers)}{limits}"
        )
        for route in key.routes:
            lines.append(f"  route {_route_text(route)}")
    for route in config.routes:
        lines.append(f"route {_route_text(route)}")
    for provider in config.providers.values():
        cls = get_provider_class(provider.type)
        options = [
            f"{name}={shown(cls.settings_class, name, value)}"
            for name, value in sorted(provider.options.items())
        ]
        lines.append(
            f"provider {provider.name}: markup={provider.markup} " + " ".join(options)
        )
    return "\n".join(lines)


def store_text(config: Config) -> str:
    """Where the store is, credentials masked: a path, or the database and its pool."""
    if config.store_url is None:
        return config.store_path
    return (
        f"{mask_userinfo(config.store_url)}"
        f" pool={config.store_pool_min}..{config.store_pool_max}"
    )


def store_secrets(config: Config) -> set[str]:
    """The password in ``store.url``, as written and decoded (for the log redactor);
    the user name is not a secret (and "postgres" would mask every such word)."""
    if config.store_url is None:
        return set()
    password = urlsplit(config.store_url).password
    return {password, unquote(password)} if password else set()


def _store_url(store: Mapping[str, Any]) -> tuple[str | None, int, int]:
    """(url, pool min, pool max) of the store section; ConfigError naming the option."""
    url = store.get("url")
    pool = store.get("pool")
    if url is None:
        if pool is not None:
            raise ConfigError("store.pool: only with store.url (a PostgreSQL store)")
        return None, 1, 10
    if "path" in store:
        raise ConfigError(
            "store: url and path are both set (url: PostgreSQL, path: SQLite); keep one"
        )
    if not isinstance(url, str) or not re.match(
        r"(?i)postgres(ql)?://[^/\s]+", url.strip()
    ):
        # credentials masked, the query left out (it might carry one)
        shown = mask_userinfo(url.split("?")[0]) if isinstance(url, str) else repr(url)
        raise ConfigError(
            f"store.url: must be postgresql://user:password@host:port/database,"
            f" got {shown}"
        )
    url = url.strip()
    scheme, _, rest = url.partition("://")
    credentials, at, _ = rest.rpartition("@")
    shown = f"{scheme}://{'****@' if at else ''}{rest.rpartition('@')[2].split('?')[0]}"
    if any(ch in credentials for ch in "/?#@"):
        raise ConfigError(
            "store.url: percent-encode the user and password (/ ? # @ as %2F %3F %23"
            f" %40; from ${{ENV}} that is done for you), got {shown}"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError as exc:
        raise ConfigError(f"store.url: not a valid URL ({exc}): {shown}") from None
    known = ("host", "sslmode")  # the URL's query (store.postgres.URL_PARAMETERS)
    for name in sorted({k for k, _ in parse_qsl(parts.query)}):
        if name not in known:
            raise ConfigError(
                f"store.url: unknown parameter {name} (known: {', '.join(known)})"
            )
    if pool is None:
        pool = {}
    if not isinstance(pool, dict):
        raise ConfigError("store.pool: must be a mapping (min, max)")
    _known(pool, ("min", "max"), "store.pool")
    low = _int(pool.get("min", 1), "store.pool.min", low=0)
    high = _int(pool.get("max", 10), "store.pool.max", low=1)
    if low > high:
        raise ConfigError(f"store.pool: min {low} is more than max {high}")
    return url, low, high


def _route_text(route: RouteConfig) -> str:
    service = route.service or "*"
    country = "*" if route.country is None else str(route.country)
    return f"service={service} country={country} {route.strategy}: {', '.join(route.providers)}"


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a mapping")
    return value


def _provider_list(
    value: Any, providers: Mapping[str, ProviderConfig], where: str
) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: list at least one provider")
    for name in value:
        if name not in providers:
            known = ", ".join(sorted(providers))
            raise ConfigError(f"{where}: unknown provider {name!r} (known: {known})")
    return tuple(str(v) for v in value)


def _routes(
    value: Any, providers: Mapping[str, ProviderConfig], where: str
) -> tuple[RouteConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: must be a list")
    routes = []
    for index, entry in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{here}: must be a mapping")
        _known(entry, ROUTE_OPTIONS, here)
        strategy = str(entry.get("strategy", "ordered"))
        if strategy not in ("ordered", "cheapest"):
            raise ConfigError(f"{here}.strategy: must be ordered or cheapest")
        service = entry.get("service")
        country = entry.get("country")
        routes.append(
            RouteConfig(
                providers=_provider_list(
                    entry.get("providers"), providers, f"{here}.providers"
                ),
                service=None if service is None else str(service),
                country=None if country is None else _int(country, f"{here}.country"),
                strategy=strategy,
            )
        )
    return tuple(routes)


def _known(options: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """ConfigError naming the first option not in ``known`` (a typo, usually)."""
    names = sorted(set(known))
    for name in options:
        if name not in names:
            raise ConfigError(
                f"{where}.{name}: unknown option (known: {', '.join(names)})"
            )


def _int(
    value: Any, where: str, low: int | None = None, high: int | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: must be a whole number")
    try:
        result = int(value)
    except ValueError:
        raise ConfigError(f"{where}: must be a whole number") from None
    if (low is not None and result < low) or (high is not None and result > high):
        if high is None:
            raise ConfigError(f"{where}: must be at least {low}, got {result}")
        raise ConfigError(f"{where}: must be between {low} and {high}, got {result}")
    return result


def _count(value: Any, where: str) -> int:
    result = _int(value, where)
    if result < 0:
        raise ConfigError(f"{where}: must not be negative (0 means no cap)")
    return result


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(
            f"{where}: must be one of {', '.join(choices)}, got {value!r}"
        )
    return str(value)


def _float(value: Any, where: str, positive: bool = False) -> float:

    if isinstance(value, bool):
        raise ConfigError(f"{where}: must be a number")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: must be a number") from None
    if not math.isfinite(result):
        raise ConfigError(f"{where}: must be a finite number")
    if result < 0:
        raise ConfigError(f"{where}: must not be negative")
    if positive and result == 0:
        raise ConfigError(f"{where}: must be greater than 0")
    return result


def _positive(value: Any, where: str) -> float:
    result = _float(value, where)
    if result <= 0:
        raise ConfigError(f"{where}: must be more than 0")
    return result


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: must be a number")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{where}: must be a number") from None
    if not result.is_finite():
        raise ConfigError(f"{where}: must be a number")
    return result
