"""The one exception tree of sms-compat.

::

    CompatError
    ├── RequestError            the client's request cannot be served as asked
    │   ├── NoKey               api_key missing or empty
    │   ├── BadKey              api_key unknown
    │   ├── BadAction           action missing or unknown
    │   ├── BadStatus           setStatus value not allowed now
    │   ├── NoActivation        no such activation for this key
    │   ├── WrongActivationId   id missing or not a number
    │   ├── EarlyCancelDenied   cancel inside the configured early window
    │   ├── WrongExceptionPhone phoneException malformed
    │   ├── BadParameter        any other malformed parameter
    │   └── ClientGone          the client left before its answer (nobody reads it)
    └── ProviderError           raised only in providers/ (and the router)
        ├── NoNumbers           definite refusal: nothing in stock / limit reached
        ├── NoBalance           definite refusal: upstream balance too low
        ├── UnknownService      definite refusal: service or country not offered
        ├── UpstreamAuth        the upstream rejected *our* token (operator's fault)
        ├── NotNow              the upstream answered "not yet" (try again later)
        ├── Refused             the upstream answered "never" (a cancel after the SMS)
        ├── UpstreamUnreachable the request provably never reached the upstream
        │   └── NotSent         ... because its deadline passed or its client left
        └── UpstreamUncertain   the request may have reached the upstream

Each class maps to exactly one dialect token in ``compat_server.dialect.ERROR_TOKENS``.
"""

from __future__ import annotations


class CompatError(Exception):
    """Base of every error sms-compat raises on purpose."""


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
