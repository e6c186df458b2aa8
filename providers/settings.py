"""Typed provider settings: each provider declares its options in one frozen dataclass.

As apprise's plugins declare their tokens, a provider's settings class lists every option
it reads, with its type, its reader (default, range, the one-line ConfigError naming the
place) and whether it is a secret. One validator, :func:`parse`, refuses unknown names
and bad values without building a provider; one masker, :func:`shown`, is what
``describe()``, ``check-config`` and the log redactor use.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar
from urllib.parse import urlsplit

from providers.vocabulary import ConfigError

# (provider name, its options, this option's name) -> the parsed value, or ConfigError
Reader = Callable[[str, Mapping[str, Any], str], Any]
S = TypeVar("S", bound="ProviderSettings")

MASK = "****"
ALWAYS_ALLOWED = ("type", "markup")  # read by the config itself


def option(read: Reader, *, secret: bool = False) -> Any:
    """A settings field read by ``read``; ``secret`` ones are masked everywhere."""
    return dataclasses.field(metadata={"read": read, "secret": secret})


# ---- readers (the messages are the config's contract; tests assert them) -------------


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


def number(default: float) -> Reader:
    """Reader of a number >= 0 with this default."""
    return lambda name, options, key: number_option(name, options, key, default)


def optional_number(name: str, options: Mapping[str, Any], key: str) -> float | None:
    """A number >= 0, or None when the option is absent (the class default applies)."""
    if key not in options:
        return None
    return number_option(name, options, key, 0.0)


def flag(default: bool) -> Reader:
    """Reader of true/false (also "yes"/"no", "on"/"off", "1"/"0" as text)."""

    def read(name: str, options: Mapping[str, Any], key: str) -> bool:
        value = options.get(key, default)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"true", "yes", "on", "1"}:
            return True
        if text in {"false", "no", "off", "0"}:
            return False
        raise ConfigError(
            f"providers.{name}.{key}: must be true or false, got {value!r}"
        )

    return read


def url(default: str) -> Reader:
    """Reader of an http(s) URL with this default."""
    return lambda name, options, key: url_option(name, options, key, default)


def required(name: str, options: Mapping[str, Any], key: str) -> str:
    """Reader of a required non-empty text (usually a ``${ENV}`` secret)."""
    return require_option(name, options, key)


def raw(name: str, options: Mapping[str, Any], key: str) -> Any:
    """The value as given (None when absent); the provider reads it further."""
    return options.get(key)


# ---- the settings classes' base, the validator and the masker -------------------------


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    """Options every provider reads; subclasses add their own fields."""

    min_interval: float | None = option(optional_number)  # None: the class default
    poll_interval: float | None = option(optional_number)


def names(cls: type[ProviderSettings]) -> tuple[str, ...]:
    """The option names a provider with these settings accepts, besides type, markup."""
    return tuple(f.name for f in dataclasses.fields(cls))


def secret_names(cls: type[ProviderSettings]) -> frozenset[str]:
    """The option names that hold secrets."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata["secret"])


def parse(cls: type[S], name: str, options: Mapping[str, Any]) -> S:
    """Validate ``options`` of provider ``name`` into ``cls``; ConfigError names the place.

    Unknown names first (a typo, usually), then each field in declaration order.
    """
    known = sorted({*ALWAYS_ALLOWED, *names(cls)})
    for key in options:
        if key not in known:
            raise ConfigError(
                f"providers.{name}.{key}: unknown option (known: {', '.join(known)})"
            )
    values = {
        f.name: f.metadata["read"](name, options, f.name)
        for f in dataclasses.fields(cls)
    }
    return cls(**values)


def mask(secret: str) -> str:
    """A secret as shown in logs and check-config: nothing of it."""
    return MASK


_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@?#]+@")


def mask_url(value: Any) -> Any:
    """A URL with its credentials (``user:password@``) masked; other values as given."""
    if isinstance(value, str) and "@" in value:
        return mask_userinfo(value)
    return value


def mask_userinfo(text: str) -> str:
    """``text`` with every URL's ``user:password@`` shown as ``****@``."""
    return _USERINFO.sub(rf"\1{MASK}@", text)


def shown(cls: type[ProviderSettings], key: str, value: Any) -> Any:
    """An option's value as describe() and check-config show it: secrets masked."""
    return mask(str(value)) if key in secret_names(cls) else mask_url(value)


def secret_values(cls: type[ProviderSettings], options: Mapping[str, Any]) -> set[str]:
    """Every secret in these options: secret fields and URL credentials (for logs)."""
    found: set[str] = set()
    secrets = secret_names(cls)
    for key, value in options.items():
        if key in secrets:
            found.add(str(value))
        elif isinstance(value, str) and "@" in value:
            parts = urlsplit(value)
            found |= {p for p in (parts.username, parts.password) if p}
    return found
