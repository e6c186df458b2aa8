"""The dialect's request errors: what is wrong with the client's own request.

::

    CompatError
    └── RequestError            the client's request cannot be served as asked
        ├── NoKey               api_key missing or empty
        ├── BadKey              api_key unknown
        ├── BadAction           action missing or unknown
        ├── BadStatus           setStatus value not allowed now
        ├── NoActivation        no such activation for this key
        ├── WrongActivationId   id missing or not a number
        ├── EarlyCancelDenied   cancel inside the configured early window
        ├── WrongExceptionPhone phoneException malformed
        ├── BadParameter        any other malformed parameter
        └── ClientGone          the client left before its answer (nobody reads it)
    (ProviderError, its subclasses and ConfigError: providers.vocabulary)

Each class maps to exactly one dialect token in ``compat_server.dialect.ERROR_TOKENS``.
"""

from __future__ import annotations

from providers.vocabulary import CompatError


class RequestError(CompatError):
    """The client's request cannot be served as asked."""


class NoKey(RequestError):
    """The api_key parameter is missing or empty."""


class BadKey(RequestError):
    """The api_key is not one of the configured keys."""


class BadAction(RequestError):
    """The action is missing or not supported."""


class BadStatus(RequestError):
    """The setStatus value is unknown or not allowed in the current state."""


class NoActivation(RequestError):
    """No activation with this id belongs to this key."""


class WrongActivationId(RequestError):
    """The activation id is missing or not a decimal number."""


class EarlyCancelDenied(RequestError):
    """A cancel came inside the configured early-cancel window."""


class WrongExceptionPhone(RequestError):
    """phoneException is not a comma list of digit prefixes."""


class BadParameter(RequestError):
    """A parameter has a malformed value (answered as ERROR_SQL, like the original)."""


class ClientGone(RequestError):
    """The client disconnected before its answer was ready; nobody will read it."""

    def __init__(self, provider: str = "", detail: str = "") -> None:
        super().__init__(f"{provider}: {detail}" if detail else provider)
        self.provider = provider
        self.detail = detail
