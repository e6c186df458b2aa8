"""Typed provider settings: one validator, one masker, no provider built to validate."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest

import providers.base
from compat_server.config import describe, parse_config
from compat_server.logs import secrets_of
from providers import PROVIDERS, get_provider_class
from providers.base import Provider
from providers.handler_api import HandlerApiSettings
from providers.sandbox import SandboxSettings
from providers.settings import (
    ProviderSettings,
    mask_url,
    names,
    parse,
    secret_names,
    secret_values,
    shown,
)
from providers.smsman import SmsmanSettings
from providers.smspva import SmspvaSettings
from providers.smspva_rent import SmspvaRentSettings
from providers.thuecodesim import ThuecodesimSettings
from providers.vocabulary import ConfigError
from tests.conftest import sandbox_raw

TOKEN = "t0ken-secret-1234"


def test_parse_gives_typed_values_and_defaults() -> None:
    settings = parse(ThuecodesimSettings, "tcs", {"type": "thuecodesim", "token": TOKEN})
    assert settings == ThuecodesimSettings(
        min_interval=None,
        poll_interval=None,
        token=TOKEN,
        base_url="https://api.thuecodesim.com",
        rerent_on_retry=False,
        batch_poll=True,
        catalog_ttl=60.0,
        nominal_stock=100,
        services=settings.services,  # the shipped alias table
    )
    assert settings.services["telegram"] == "tg"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.token = "other"  # type: ignore[misc]


def test_parse_reads_text_numbers_and_booleans() -> None:
    settings = parse(
        ThuecodesimSettings,
        "tcs",
        {
            "token": f" {TOKEN} ",
            "base_url": "http://127.0.0.1:9/",
            "rerent_on_retry": "yes",
            "catalog_ttl": "2.5",
            "min_interval": "0.25",
        },
    )
    assert (
        settings.token,
        settings.base_url,
        settings.rerent_on_retry,
        settings.catalog_ttl,
        settings.min_interval,
        settings.poll_interval,
    ) == (TOKEN, "http://127.0.0.1:9", True, 2.5, 0.25, None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"token": TOKEN, "tokn": "x"},
            "providers.tcs.tokn: unknown option (known: base_url, batch_poll,"
            " catalog_ttl, markup, min_interval, nominal_stock, poll_interval,"
            " rerent_on_retry,"
            " services, token, type)",
        ),
        ({}, "providers.tcs.token: missing (set it, e.g. ${ENV_VAR})"),
        ({"token": "  "}, "providers.tcs.token: missing (set it, e.g. ${ENV_VAR})"),
        (
            {"token": TOKEN, "min_interval": -1},
            "providers.tcs.min_interval: must be a number >= 0, got -1",
        ),
        (
            {"token": TOKEN, "poll_interval": "soon"},
            "providers.tcs.poll_interval: must be a number >= 0, got 'soon'",
        ),
        (
            {"token": TOKEN, "base_url": "ftp://x"},
            "providers.tcs.base_url: must be an http(s) URL",
        ),
        (
            {"token": TOKEN, "nominal_stock": 2.5},
            "providers.tcs.nominal_stock: must be an integer",
        ),
        (
            {"token": TOKEN, "rerent_on_retry": "maybe"},
            "providers.tcs.rerent_on_retry: must be true or false, got 'maybe'",
        ),
    ],
)
def test_parse_refuses_with_one_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(ThuecodesimSettings, "tcs", options)
    assert str(raised.value) == message


def test_each_provider_declares_its_secrets() -> None:
    declared = {
        name: (get_provider_class(name).settings_class, secret_names(get_provider_class(name).settings_class))
        for name in PROVIDERS
    }  # fmt: skip
    assert declared == {
        "sandbox": (SandboxSettings, frozenset()),
        "thuecodesim": (ThuecodesimSettings, frozenset({"token"})),
        "smsman": (SmsmanSettings, frozenset({"token"})),
        "smspva": (SmspvaSettings, frozenset({"api_key"})),
        "smspva_rent": (SmspvaRentSettings, frozenset({"api_key"})),
        "handler_api": (HandlerApiSettings, frozenset({"api_key"})),
    }
    for name in PROVIDERS:  # every option a provider reads, min_interval included
        assert {"min_interval", "poll_interval"} <= set(
            names(get_provider_class(name).settings_class)
        ), name


def test_one_masker() -> None:
    assert shown(SmsmanSettings, "token", TOKEN) == "****"
    assert shown(SmsmanSettings, "base_url", "http://u:p@h/x") == "http://****@h/x"
    assert shown(SmsmanSettings, "catalog_ttl", 5) == 5
    assert mask_url("https://user:pw@h:1/p?q=1") == "https://****@h:1/p?q=1"
    assert secret_values(
        SmsmanSettings,
        {"token": TOKEN, "base_url": "http://bob:hunter22@h/x", "catalog_ttl": 5},
    ) == {TOKEN, "bob", "hunter22"}


def test_smspva_api_rent_maps_to_the_rental_settings(store_path: str) -> None:
    raw = sandbox_raw(store_path)
    raw["providers"]["pva"] = {"type": "smspva", "api": "rent", "api_key": TOKEN}
    raw["currency"] = {"rates": {"USD": 90}}
    config = parse_config(raw)
    pva = config.providers["pva"]
    assert pva.type == "smspva_rent"
    assert isinstance(pva.settings, SmspvaRentSettings)
    assert (pva.settings.api, pva.settings.api_key, pva.settings.rent) == (
        "rent",
        TOKEN,
        ("week", 1),
    )
    assert "provider pva: markup=1 api=rent api_key=**** type=smspva" in describe(
        config
    )
    assert TOKEN in secrets_of(config)
    with pytest.raises(ConfigError) as raised:
        parse(SmspvaSettings, "pva", {"api_key": TOKEN, "api": "rent"})
    assert str(raised.value) == "providers.pva.api: 'rent' is not served here"


def test_config_keeps_the_parsed_settings(store_path: str) -> None:
    config = parse_config(sandbox_raw(store_path))
    settings = config.providers["sandbox"].settings
    assert isinstance(settings, SandboxSettings)
    assert (
        settings.sms_delay,
        settings.balance,
        settings.poll_interval,
        settings.currency,
        settings.countries,
        settings.rent_countries,
        settings.price_drift,
    ) == (5.0, 1000.0, 1.0, "RUB", [0, 10, 25, 187], [0, 10, 25, 187], Decimal(0))


def test_no_provider_is_built_to_validate() -> None:
    assert not hasattr(Provider, "validate_options")
    assert not hasattr(providers.base, "_offline_client")
    assert ProviderSettings is get_provider_class("sandbox").settings_class.__mro__[1]
