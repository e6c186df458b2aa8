"""What reaches the log: no secret in any line, and a repeating failure once per interval.

Three logging filters, installed on every logger the process writes through (ours,
aiohttp's, asyncio's, httpx's) by :func:`install`, and by ``serve`` on its handler too:

* :class:`ParseErrors` turns aiohttp's report of a request its parser rejected (an
  ERROR with a traceback whose message quotes the request line, api_key included) into
  one short WARNING without the line.
* :class:`Throttle` lets the first WARNING-or-worse record of a kind through per
  interval and counts the rest (tracebacks, asyncio's and aiohttp's records, and
  those marked ``throttle``; our one-line warnings, each naming an activation, stay); the count goes out with the next one let through, or
  from :meth:`Throttle.flush` (run every interval by the app). Out of descriptors or
  with the disk full, a failure per accept or per request becomes two lines a minute.
* :class:`Redactor` masks every configured secret (client keys, upstream tokens, URL
  credentials) and any ``api_key=``/``token=`` value in the message, its arguments and
  its traceback text, whatever logger it came from.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp.http_exceptions import HttpProcessingError

from compat_server.config import Config, store_secrets
from providers import get_provider_class
from providers.settings import MASK, mask_userinfo, secret_values

LOGGERS = (
    "",  # the root: records logged on it directly
    "compat_server",
    "providers",
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
    "asyncio",
    "httpx",
    "httpcore",
    "aiosqlite",
)
# a value after one of these names in a query string or a form
_NAMED = re.compile(
    r"(?i)\b((?:api_?key|apikey|token|access_token|password|secret)=)([^\s&;,'\"<>]+)"
)
_NAMES = ("api_key=", "apikey=", "token=", "password=", "secret=")  # _NAMED's, quick


def _mask_named(match: re.Match[str]) -> str:
    return match.group(1) + MASK


_FORMATTER = logging.Formatter()
_MARK = "_compat_logs"  # set on a record once the filters have seen it


class Redactor(logging.Filter):
    """Masks known secrets and secret-looking values in a record, traceback included."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these from now on too (values under 4 characters are not masked)."""
        new = {s for s in secrets if len(s) >= 4} - self._secrets
        if new:
            self._secrets |= new
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, ordered)))

    def scrub(self, text: str) -> str:
        """``text`` with every secret masked."""
        # substring tests first: this runs for every request's log line
        if self._pattern is not None and any(s in text for s in self._secrets):
            text = self._pattern.sub(MASK, text)
        if "=" in text:
            lowered = text.lower()
            if any(name in lowered for name in _NAMES):
                text = _NAMED.sub(_mask_named, text)
        if "@" in text and "://" in text:
            text = mask_userinfo(text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the message
            message = f"{record.msg} {record.args!r}"
        clean = self.scrub(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
            record.exc_info = None  # the text above is what any formatter prints
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


class ParseErrors(logging.Filter):
    """aiohttp's "Error handling request" for a request its parser rejected: one
    short line, without the request line, at WARNING (DEBUG stays DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name != "aiohttp.server" or not isinstance(exc, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        remote = str(args[0]) if args else "?"
        # the kind in the template: the throttle counts each kind apart
        record.msg = (
            f"bad HTTP request from %s refused: {type(exc).__name__} ({exc.code})"
        )
        record.args = (remote,)
        record.exc_info = record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


@dataclass
class _Seen:
    started: float
    first: str  # the first line of the record let through
    suppressed: int = 0


class Throttle(logging.Filter):
    """The first WARNING-or-worse record of a kind (logger, level, message template,
    exception type) per ``interval`` seconds goes through; the others are counted.

    Only records that can repeat without end are held back: those with a traceback,
    those of asyncio and aiohttp, and those logged with ``extra={"throttle": True}``.
    """

    MAX_KINDS = 1000

    def __init__(
        self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._seen: dict[tuple[str, int, str, str], _Seen] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "summary", False):
            return True
        if not (
            record.exc_info
            or getattr(record, "throttle", False)
            or record.name == "asyncio"
            or record.name.startswith("aiohttp.")
        ):
            return True  # our own one-line warnings (an activation id each) stay whole
        exc = (
            record.exc_info[0].__name__
            if record.exc_info and record.exc_info[0]
            else ""
        )
        kind = (record.name, record.levelno, str(record.msg)[:200], exc)
        now = self.clock()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen.started < self.interval:
                seen.suppressed += 1
                return False
            if seen is None and len(self._seen) >= self.MAX_KINDS:
                self._forget(now)
                if len(self._seen) >= self.MAX_KINDS:
                    return True  # too many kinds to track: let it through
            self._seen[kind] = _Seen(now, _first_line(record))
        if seen is not None and seen.suppressed:
            record.msg = f"{record.msg} [and {seen.suppressed} more like it in the last {self.interval:g} s]"
        return True

    def _forget(self, now: float) -> None:
        for kind, seen in list(self._seen.items()):
            if now - seen.started >= self.interval and not seen.suppressed:
                del self._seen[kind]

    def reset(self) -> None:
        """Forget every kind (a new app starts counting afresh)."""
        with self._lock:
            self._seen.clear()

    def flush(self, everything: bool = False) -> int:
        """Log how often each kind was held back in an interval that has ended (or in
        any, with ``everything``); returns the number of summary lines written."""
        now = self.clock()
        due = []
        with self._lock:
            for kind, seen in list(self._seen.items()):
                if everything or now - seen.started >= self.interval:
                    del self._seen[kind]
                    if seen.suppressed:
                        due.append((kind, seen))
        for (name, level, _, exc), seen in due:
            what = seen.first + (f" ({exc})" if exc else "")
            logging.getLogger(name).log(
                level,
                "repeated %d more times in the last %g s: %s",
                seen.suppressed,
                self.interval,
                what,
                extra={"summary": True},
            )
        return len(due)


def _first_line(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # a record whose arguments do not fit its message
        text = str(record.msg)
    return text.split("\n", 1)[0][:160]


class _Once(logging.Filter):
    """Runs the filters once per record, however many loggers and handlers it meets."""

    def __init__(self, *filters: logging.Filter) -> None:
        super().__init__()
        self.filters = filters

    def filter(self, record: logging.LogRecord) -> bool:
        decided = getattr(record, _MARK, None)
        if decided is not None:
            return bool(decided)
        try:
            keep = all(f.filter(record) for f in self.filters)
        except Exception as exc:  # never raise into the code that logs, never leak
            record.msg = (
                f"(a {record.name} record could not be masked: {type(exc).__name__})"
            )
            record.args = record.exc_info = record.exc_text = record.stack_info = None
            keep = True
        setattr(record, _MARK, keep)
        return keep


REDACTOR = Redactor()
THROTTLE = Throttle()
FILTER = _Once(ParseErrors(), THROTTLE, REDACTOR)


def secrets_of(config: Config) -> set[str]:
    """Every secret the config holds: client keys, provider secrets, URL credentials."""
    found = {key.key for key in config.keys} | store_secrets(config)
    for provider in config.providers.values():
        settings_class = get_provider_class(provider.type).settings_class
        found |= secret_values(settings_class, provider.options)
    return found


def install(config: Config, handlers: Iterable[logging.Handler] = ()) -> None:
    """Put the filters on every logger of :data:`LOGGERS` (and their children that
    exist) and on ``handlers``; mask ``config``'s secrets from now on. Idempotent."""
    REDACTOR.add(secrets_of(config))
    THROTTLE.interval = config.log_repeat_interval
    THROTTLE.reset()
    names = set(LOGGERS)
    for name in list(logging.root.manager.loggerDict):
        if any(name.startswith(prefix + ".") for prefix in LOGGERS if prefix):
            names.add(name)
    for name in names:
        target = logging.getLogger(name)
        if FILTER not in target.filters:
            target.addFilter(FILTER)
    for handler in handlers:
        if FILTER not in handler.filters:
            handler.addFilter(FILTER)
