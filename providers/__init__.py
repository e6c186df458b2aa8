"""Registry of provider types: the config's ``type:`` -> Provider class."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from providers.base import Provider
from providers.vocabulary import ConfigError

# type name -> "module:Class"; imported on first use so one broken adapter cannot stop
# the others from loading.
PROVIDERS: dict[str, str] = {
    "sandbox": "providers.sandbox:SandboxProvider",
    "thuecodesim": "providers.thuecodesim:ThuecodesimProvider",
    "smsman": "providers.smsman:SmsmanProvider",
    "smspva": "providers.smspva:SmspvaProvider",
    "smspva_rent": "providers.smspva_rent:SmspvaRentProvider",
    "handler_api": "providers.handler_api:HandlerApiProvider",
}


# (type, option api) -> the type that serves it: configs written before smspva's rental
# API got its own provider keep working
API_TYPES: dict[tuple[str, str], str] = {("smspva", "rent"): "smspva_rent"}


def provider_type(type_name: str, options: Mapping[str, Any]) -> str:
    """The registry key for a config entry (``smspva`` + ``api: rent`` = smspva_rent)."""
    api = options.get("api")
    return (
        API_TYPES.get((type_name, api), type_name)
        if isinstance(api, str)
        else type_name
    )


def get_provider_class(type_name: str) -> type[Provider]:
    """The class registered for a config ``type:``; ConfigError lists the valid ones."""
    try:
        target = PROVIDERS[type_name]
    except KeyError:
        valid = ", ".join(sorted(PROVIDERS))
        raise ConfigError(
            f"unknown provider type {type_name!r} (valid: {valid})"
        ) from None
    module_name, _, class_name = target.partition(":")
    cls: type[Provider] = getattr(importlib.import_module(module_name), class_name)
    return cls
