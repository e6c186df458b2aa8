"""Property-based fuzzing of the HTTP front: whatever arrives, a dialect answer leaves.

The property, on both dialect paths and for every method: status 200 and a body that is
one dialect token (with a ``:payload`` only where the token takes one) or a JSON object.
HEAD gets 200 and no body. OPTIONS is answered like any other method: the dialect has
no preflight (its clients are scripts, not browsers) and a 405 would break the "always
200" promise. Nothing from our code or aiohttp is logged at ERROR, and no traceback is
logged at all.

One app per test, with activations pre-created in every state so that ``id`` values hit
real rows. Hypothesis drives the examples through pytest-asyncio on the test's event
loop; ``derandomize=True`` makes every run send the same requests.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from compat_server.actions import ACTIONS
from compat_server.app import PATHS
from compat_server.config import parse_config
from compat_server.dialect import MAX_BODY, Token
from tests.conftest import API, KEY, OTHER_KEY, FakeClock, StartApp, call, sandbox_raw

TEXT = "text/plain"
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"

TOKENS = {token.value for token in Token}
# Tokens that always carry a payload, and one that may (FULL_SMS of an empty text).
WITH_PAYLOAD = {"ACCESS_BALANCE", "ACCESS_NUMBER", "STATUS_OK", "STATUS_WAIT_RETRY"}
MAY_HAVE_PAYLOAD = {"FULL_SMS"}

FIRST_ID = 100_000  # the store's first activation id
BALANCE = "ACCESS_BALANCE:910.00"  # 1000 less five tg at 18 (the cancel refunded one)
# aiohttp itself answers 400 to a request line over 8190 bytes, before any handler.
MAX_QUERY = 8000


# ---- the app under fuzz ---------------------------------------------------------------


@dataclass(frozen=True)
class Shop:
    """The app and the ids of its pre-created activations, by state."""

    client: TestClient
    ids: dict[str, int]


async def _buy(client: TestClient, key: str = KEY) -> int:
    status, ctype, body = await call(
        client, api_key=key, action="getNumber", service="tg", country=0
    )
    assert (status, ctype) == (200, TEXT) and body.startswith("ACCESS_NUMBER:"), body
    return int(body.split(":")[1])


async def _expect(client: TestClient, pattern: str, **params: Any) -> None:
    status, ctype, body = await call(client, **params)
    assert (status, ctype) == (200, TEXT) and re.fullmatch(pattern, body), body


@pytest.fixture
async def shop(start_app: StartApp, store_path: str, clock: FakeClock) -> Shop:
    """Sandbox with activations finished, with a code, retrying, cancelled, waiting."""
    client = await start_app(parse_config(sandbox_raw(store_path)))
    finished = await _buy(client)
    clock.advance(6)  # the sandbox's sms_delay is 5
    await _expect(client, r"STATUS_OK:\d+", action="getStatus", id=finished)
    await _expect(
        client, "ACCESS_ACTIVATION", action="setStatus", id=finished, status=6
    )
    with_code, retrying = await _buy(client), await _buy(client)
    clock.advance(6)
    await _expect(client, r"STATUS_OK:\d+", action="getStatus", id=with_code)
    await _expect(client, r"STATUS_OK:\d+", action="getStatus", id=retrying)
    await _expect(client, "ACCESS_RETRY_GET", action="setStatus", id=retrying, status=3)
    cancelled, waiting = await _buy(client), await _buy(client)
    await _expect(client, "ACCESS_CANCEL", action="setStatus", id=cancelled, status=8)
    await _expect(client, "STATUS_WAIT_CODE", action="getStatus", id=waiting)
    other = await _buy(client, OTHER_KEY)
    ids = {
        "finished": finished,
        "code": with_code,
        "retry": retrying,
        "cancelled": cancelled,
        "waiting": waiting,
        "other_key": other,
    }
    assert sorted(ids.values()) == list(range(FIRST_ID, FIRST_ID + 6))
    return Shop(client, ids)


# ---- strategies: values -----------------------------------------------------------------


def _repeat(chars: list[str], low: int, high: int) -> st.SearchStrategy[str]:
    """One character repeated ``low`` to ``high`` times (cheap long values)."""
    return st.builds(
        lambda ch, n: ch * n, st.sampled_from(chars), st.integers(low, high)
    )


EXTREME_NUMBERS = st.sampled_from(
    ["0", "-0", "-1", "9" * 18, "9" * 19, "9" * 5000, "1e999999999", "-1e999999999",
     "1E+999999", "1e-999999999"]
)  # fmt: skip
MALFORMED_NUMBERS = st.sampled_from(
    ["NaN", "sNaN", "Infinity", "-Infinity", "0.005", "1,5", "1.5.5", "0x10", "1_000",
     " 7 ", "+7", "\u0663", "\uff11\uff10", "\u00b2", "1e3", "0e0", "." + "9" * 3000]
)  # fmt: skip
NUMBERS = st.one_of(
    st.integers(-(10**40), 10**40).map(str), EXTREME_NUMBERS, MALFORMED_NUMBERS
)
GARBAGE = st.sampled_from(
    ["%", "%zz", "%%41", "%FF%FE", "%00", "%E2%82", "%ED%A0%80", "%C3(", "%u0041",
     "a=b&c", "&&&", "=", "+", "%2B%2", "\x00", "a\x00b", "tg\x00", "\r\n", "\t",
     "\u202e", "\ufeff", "\U0001f4f1", "\x01\x1f\x7f", "null", "[]", "{}", ":", "::",
     "'; DROP TABLE activations; --", "<script>", "${HOME}", "%s%s%n", "\\"]
)  # fmt: skip
LONG = _repeat(["a", "9", "\u00e9", "\x00", "%", "\U0001d11e", ",", ":"], 200, 5000)
VALUES: st.SearchStrategy[str] = st.one_of(
    st.just(""), NUMBERS, GARBAGE, st.text(max_size=20), LONG, st.just(KEY)
)

# Plausible values per parameter: mostly these, so handlers get past validation.
GOOD: dict[str, list[str]] = {
    "service": ["tg", "wa", "go", "TG", "ot", "xx", "any"],
    "country": ["0", "10", "25", "187", "any", "6"],
    "operator": ["any", "mts", "mts,beeline", "any,", ",,"],
    "maxPrice": ["18", "18.00", "17.99", "100", "0", "0.01", "18,5"],
    "max_price": ["18", "5"],
    "phoneException": ["7999", "7999,8495", "79", "7"],
    "forward": ["0", "0", "1"],
    "status": ["1", "3", "6", "8", "-1"],
    "id": [str(FIRST_ID + n) for n in range(-1, 8)] + ["5000", "5001"],  # rents too
    "activationId": [str(FIRST_ID + n) for n in range(6)],
    "ref": ["x"],
    "freePrice": ["true", "1"],
    "verification": ["true"],
    "activationType": ["0", "1"],
    "lang": ["en", "ru"],
    "multiService": ["tg,wa", "tg"],
    "rent_time": ["4", "24", "2", "1", "1344"],
    "time": ["4", "8"],
    "hours": ["4", "2"],
    "page": ["1", "2", "0"],
    "size": ["10", "1"],
    "length": ["10", "1"],
    "needHistory": ["true", "false"],
}
ID_PARAMS = ["id", "activationId"]
NUMBER_PARAMS = {"id", "activationId", "status", "country", "maxPrice", "max_price",
                 "rent_time", "time", "hours", "page", "size", "length"}  # fmt: skip
BUY_PARAMS = ["service", "country", "operator", "maxPrice", "max_price",
              "phoneException", "forward", "ref", "freePrice", "verification"]  # fmt: skip
ACTION_PARAMS: dict[str, list[str]] = {
    "getBalance": [],
    "getBalanceAndCashBack": [],
    "getNumber": BUY_PARAMS,
    "getNumberV2": BUY_PARAMS + ["activationType"],
    "getStatus": ID_PARAMS,
    "getStatusV2": ID_PARAMS,
    "getFullSms": ID_PARAMS,
    "setStatus": ID_PARAMS + ["status"],
    "getActiveActivations": [],
    "getPrices": ["country", "service"],
    "getNumbersStatus": ["country", "operator"],
    "getCountries": [],
    "getOperators": ["country"],
    "getServicesList": ["country", "lang"],
    "getTopCountriesByService": ["service", "freePrice"],
    "getTopCountriesByServiceRank": ["service", "freePrice"],
    "getCountryAndOperators": ["lang"],
    "getServicesAndCost": ["country", "operator", "lang"],
    "getIncomingCallStatus": ID_PARAMS,
    "getMultiServiceNumber": ["multiService", "country", "operator"],
    "getAdditionalService": ID_PARAMS + ["service"],
    "getExtraActivation": ID_PARAMS,
    "checkExtraActivation": ID_PARAMS,
    "getRentServicesAndCountries": ["rent_time", "time", "country", "operator"],
    "getRentNumber": ["service", "rent_time", "time", "country", "operator"],
    "getRentStatus": ["id", "page", "size"],
    "setRentStatus": ["id", "status"],
    "getRentList": ["page", "length"],
    "continueRentNumber": ["id", "rent_time"],
    "getContinueRentPriceNumber": ["id", "rent_time"],
    "continueRentInfo": ["id", "hours", "needHistory"],
}
assert set(ACTION_PARAMS) == set(ACTIONS), "a new action: list its parameters here"
PARAM_NAMES = sorted({"api_key", "action", *GOOD})

ACTION_NAMES = sorted(ACTIONS)
# buying and setStatus have the most code behind them: draw them more often
WEIGHTED_ACTIONS = ACTION_NAMES + ["getNumber", "getNumberV2", "setStatus"] * 2
ACTION_VALUES: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(ACTION_NAMES).map(str.lower),
    st.sampled_from(ACTION_NAMES).map(str.upper),
    st.sampled_from(ACTION_NAMES).map(str.swapcase),
    st.sampled_from(ACTION_NAMES).map(lambda a: f" {a}\t"),
    st.sampled_from(ACTION_NAMES).map(lambda a: a + "\x00"),
    st.sampled_from(["", "getrentnumber", "getNumber,getBalance", "getBalance "]),
    st.text(max_size=30),
    _repeat(["a", "getNumber", "\u00e9"], 100, 5000),
)
KEYS: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(["", "wrong", KEY.upper(), KEY + "x", f" {KEY} ", KEY[:-1]]),
    st.just(OTHER_KEY),
    _repeat(["k"], 250, 300),
    VALUES,
)
NAMES = st.one_of(
    st.sampled_from(PARAM_NAMES),
    st.sampled_from(PARAM_NAMES).map(lambda n: f" {n} "),
    st.sampled_from(PARAM_NAMES).map(str.upper),
    st.text(max_size=12),
    st.just(""),
)
SURROGATES = st.sampled_from(["\ud800", "\udfff", "tg\udc80", "\ud83d1", "7\udc00"])


def chance(draw: st.DrawFn, odds: int) -> bool:
    """True ``odds`` times in ``odds + 1`` (st.integers favours its bounds: not here)."""
    return draw(st.sampled_from([True] * odds + [False]))


REQUIRED = {"service", "id"}  # without these the handlers stop at the first check


def _wild(draw: st.DrawFn, name: str) -> str:
    """Any value, numbers-heavy for numeric parameters."""
    if name == "api_key":
        return draw(KEYS)
    if name == "action":
        return draw(ACTION_VALUES)
    if name in NUMBER_PARAMS and chance(draw, 3):
        return draw(NUMBERS)
    return draw(VALUES)


@st.composite
def near_valid(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A well-formed call of one action, then one or two parameters made wild."""
    action = draw(st.sampled_from(WEIGHTED_ACTIONS))
    found = [("api_key", KEY), ("action", action)]
    boundary = not chance(draw, 3)  # numbers at their extremes, here and there
    for name in ACTION_PARAMS[action]:
        if boundary and name in NUMBER_PARAMS and draw(st.booleans()):
            found.append((name, draw(EXTREME_NUMBERS)))
        elif name in REQUIRED or chance(draw, 2):
            found.append((name, draw(st.sampled_from(GOOD[name]))))
    for _ in range(draw(st.integers(0 if boundary else 1, 2))):
        # mostly the action's own parameters: chaos() takes care of key and action
        targets = list(range(2, len(found))) * 4 + [0, 1, len(found)]
        index = draw(st.sampled_from(targets))
        if index == len(found):  # a parameter the action does not take
            name = draw(NAMES)
            found.append((name, _wild(draw, name)))
        else:
            name = found[index][0]
            found[index] = (name, _wild(draw, name))
    return found


@st.composite
def chaos(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Anything goes: key and action often missing or wrong, names made up."""
    found: list[tuple[str, str]] = []
    if chance(draw, 3):
        found.append(("api_key", KEY if draw(st.booleans()) else draw(KEYS)))
    action = draw(st.sampled_from(WEIGHTED_ACTIONS))
    if chance(draw, 3):
        found.append(("action", action if draw(st.booleans()) else draw(ACTION_VALUES)))
    for name in ACTION_PARAMS[action]:
        if draw(st.booleans()):
            good = draw(st.booleans())
            value = draw(st.sampled_from(GOOD[name])) if good else _wild(draw, name)
            found.append((name, value))
    found += draw(st.lists(st.tuples(NAMES, VALUES), max_size=4))
    return found


@st.composite
def pairs(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Query/form pairs, near-valid or chaotic, sometimes a name twice, any order."""
    found = draw(near_valid() if chance(draw, 2) else chaos())
    if found and not chance(draw, 4):  # the same name twice
        name, _ = draw(st.sampled_from(found))
        found.append((name, _wild(draw, name)))
    return draw(st.permutations(found))


# ---- strategies: requests ---------------------------------------------------------------


@dataclass
class Request:
    """One raw HTTP request; the repr is what Hypothesis prints for a failure."""

    method: str
    target: str  # the path and the already encoded query
    headers: dict[str, str]
    body: bytes | None

    def __repr__(self) -> str:
        body = None if self.body is None else self.body[:400]
        size = "" if self.body is None else f" ({len(self.body)} B)"
        return f"Request({self.method} {self.target[:400]!r} {self.headers} {body!r}{size})"


RAW_SAFE = re.compile(r"[!-~]*")  # printable ASCII without a space


def _urlencode(items: list[tuple[str, str]], raw: bool = False) -> str:
    """``a=b&c=d``; ``raw`` leaves URL-safe values unquoted (so ``%zz`` goes as is)."""
    parts = []
    for name, value in items:
        if raw and RAW_SAFE.fullmatch(name + value) and "#" not in name + value:
            parts.append(f"{name}={value}")
        else:
            parts.append(f"{quote(name, safe='')}={quote(value, safe='')}")
    return "&".join(parts)


def _multipart(items: list[tuple[str, str]]) -> tuple[str, bytes]:
    boundary = "fuzzBOUNDARY7MA4YWxkTrZu0gW"
    chunks = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        f"{value}\r\n".encode()
        for name, value in items
    ]
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


def _json_value(value: str, kind: int) -> Any:
    """The value as a JSON string mostly, else as a number, list, object or literal."""
    if kind == 0 and value.lstrip("-").isdigit() and len(value) < 4000:
        return int(value)
    return {1: [value, value], 2: {"v": value}, 3: None, 4: True}.get(kind, value)


@st.composite
def _json_body(draw: st.DrawFn, items: list[tuple[str, str]]) -> bytes:
    data: dict[str, Any] = {}
    for name, value in items:
        data[name] = _json_value(value, draw(st.integers(0, 12)))
    surrogate: bool = draw(st.booleans())
    if items and surrogate:
        # JSON escapes can carry lone surrogates (\ud800), which UTF-8 cannot encode
        name = draw(st.sampled_from([name for name, _ in items]))
        data[name] = draw(SURROGATES)
    ascii_only: bool = draw(st.booleans())
    return json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


JSON_GARBAGE = [
    b"{", b"[1, 2]", b'"api_key"', b"null", b"1e999", b"\xff\xfe{}", b"{}", b"[]",
    b'{"api_key": ' + b"9" * 5000 + b"}", b'{"a": NaN}', b"[" * 5000, b"{" * 5000,
    b'{"api_key": "' + KEY.encode() + b'", "action": {"x": [1, {"y": null}]}}',
    b'{"api_key": "' + KEY.encode() + b'", "action": "getBalance", "api_key": 1}',
    b"\xef\xbb\xbf{}",
]  # fmt: skip
ENCODINGS = ["query", "query_raw", "form", "form", "form_raw", "multipart", "json",
             "json", "json_garbage", "bad_utf8", "wrong_type", "no_type", "huge",
             "mixed"]  # fmt: skip
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """A request to a dialect path: any method, any parameters, any body encoding."""
    path = draw(st.sampled_from(PATHS))
    items = draw(pairs())
    encoding = draw(st.sampled_from(ENCODINGS))
    # only a POST body is read: body encodings go mostly by POST, queries by anything
    if encoding.startswith("query") or not chance(draw, 3):
        method = draw(st.sampled_from(METHODS))
    else:
        method = "POST"
    headers: dict[str, str] = {}
    body: bytes | None = None
    query = ""
    if encoding in ("query", "query_raw"):
        query = _urlencode(items, raw=encoding == "query_raw")
    elif encoding == "mixed":  # some in the query, the rest (which wins) in the body
        cut = draw(st.integers(0, len(items)))
        query = _urlencode(items[:cut])
        headers["Content-Type"] = FORM
        body = _urlencode(items[cut:]).encode()
    elif encoding in ("form", "form_raw"):
        headers["Content-Type"] = draw(
            st.sampled_from([FORM, FORM + "; charset=utf-8", FORM.upper()])
        )
        body = _urlencode(items, raw=encoding == "form_raw").encode()
    elif encoding == "multipart":
        headers["Content-Type"], body = _multipart(items)
    elif encoding == "json":
        headers["Content-Type"] = draw(
            st.sampled_from([JSON, JSON + "; charset=utf-8", "text/json", "x+json"])
        )
        body = draw(_json_body(items))
    elif encoding == "json_garbage":
        headers["Content-Type"] = JSON
        body = draw(st.sampled_from(JSON_GARBAGE))
    elif encoding == "bad_utf8":  # form body with bytes that are not UTF-8
        headers["Content-Type"] = FORM
        bad = draw(
            st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x80", b"\xfe"])
        )
        body = (
            bad
            + b"="
            + bad
            + b"&"
            + _urlencode(items, raw=True).encode()
            + b"&x="
            + bad
        )
    elif encoding in ("wrong_type", "no_type"):
        if encoding == "wrong_type":
            headers["Content-Type"] = draw(
                st.sampled_from(
                    [
                        "text/xml",
                        "application/octet-stream",
                        "image/png",
                        "text/plain",
                        "multipart/form-data",
                        "garbage;;;=",
                        "application/json-seq",
                    ]
                )  # fmt: skip
            )
        body = _urlencode(items).encode()
    elif encoding == "huge":  # around the 64 KiB limit, either side
        headers["Content-Type"] = FORM
        size = draw(st.integers(MAX_BODY - 10, MAX_BODY + 5000))
        prefix = _urlencode(items).encode() + b"&pad="
        body = prefix + b"x" * max(0, size - len(prefix))
    if len(query) > MAX_QUERY:  # too long for a request line: send it as a form
        headers, query, body = {"Content-Type": FORM}, "", query.encode()
    target = f"{path}?{query}" if query else path
    return Request(method, target, headers, body)


# ---- the property -----------------------------------------------------------------------


def assert_dialect_answer(
    method: str, status: int, content_type: str, body: bytes
) -> None:
    """Status 200 and one token or one JSON object; other methods than GET and POST
    get 405 (HEAD without a body)."""
    if method not in ("GET", "POST"):
        assert status == 405, (status, body[:300])
        assert body == (b"" if method == "HEAD" else b"405: Method Not Allowed")
        return
    assert status == 200, (status, body[:300])
    text = body.decode("utf-8")
    if content_type == JSON:  # an object, or the sms-service-online lists
        assert isinstance(json.loads(text), (dict, list)), text[:300]
        return
    assert content_type == TEXT, content_type
    name, colon, _ = text.partition(":")
    if colon:
        assert name in WITH_PAYLOAD | MAY_HAVE_PAYLOAD, text[:300]
    else:
        assert name in TOKENS - WITH_PAYLOAD, text[:300]


def assert_quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR from our code or aiohttp, and no traceback anywhere."""
    errors = [
        f"{r.name} {r.levelname}: {r.getMessage()}\n{r.exc_text or ''}"
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and r.name.split(".")[0] in ("compat_server", "providers", "aiohttp")
    ]
    assert not errors, "\n".join(errors)[-3000:]
    assert "Traceback" not in caplog.text, caplog.text[-3000:]
    assert not [r for r in caplog.records if r.exc_info], caplog.text[-3000:]


async def send(client: TestClient, request: Request) -> tuple[int, str, bytes]:
    """Send the request verbatim: the query is not re-quoted, no header is added."""
    async with client.request(
        request.method,
        URL(request.target, encoded=True),
        headers=request.headers,
        data=request.body,
        skip_auto_headers=["Content-Type"],
    ) as resp:
        return resp.status, resp.content_type, await resp.read()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Everything our code and aiohttp log, down to DEBUG."""
    for name in ("compat_server", "providers", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@settings(
    max_examples=1200,
    deadline=None,
    derandomize=True,
    database=None,
    # one app for every example, on purpose: state left by one example is more input
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(req=requests())
async def test_any_request_gets_a_dialect_answer(
    shop: Shop, logs: pytest.LogCaptureFixture, req: Request
) -> None:
    logs.clear()
    status, content_type, body = await send(shop.client, req)
    assert_dialect_answer(req.method, status, content_type, body)
    assert_quiet_logs(logs)


# ---- explicit cases ---------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", METHODS)
async def test_only_get_and_post_run_actions(
    shop: Shop, logs: pytest.LogCaptureFixture, method: str, path: str
) -> None:
    resp = await shop.client.request(
        method, path, params={"api_key": KEY, "action": "getBalance"}
    )
    body = await resp.read()
    if method in ("GET", "POST"):
        assert (resp.status, resp.content_type, body) == (200, TEXT, BALANCE.encode())
        assert "Allow" not in resp.headers
    else:
        expected = b"" if method == "HEAD" else b"405: Method Not Allowed"
        assert (resp.status, resp.headers["Allow"], body) == (405, "GET, POST", expected)
    assert_quiet_logs(logs)


def _get(query: str) -> Request:
    return Request("GET", f"{API}?{query}", {}, None)


def _post(content_type: str, body: bytes) -> Request:
    return Request("POST", API, {"Content-Type": content_type}, body)


GOOD_KEY = f"api_key={KEY}"
PADDED = f"{GOOD_KEY}&action=getBalance&pad=".encode()


@pytest.mark.parametrize(
    ("req", "body"),
    [
        (_post(FORM, PADDED + b"x" * (MAX_BODY - len(PADDED))), BALANCE),
        (_post(FORM, PADDED + b"x" * (MAX_BODY + 1 - len(PADDED))), "ERROR_SQL"),
        (_post(FORM, PADDED + b"\xff\xfe"), BALANCE),  # read as latin-1
        (_post("text/xml", PADDED), BALANCE),  # the content type is not checked
        (_post(JSON, b"[1, 2]"), "ERROR_SQL"),
        (_post(JSON, b"{"), "ERROR_SQL"),
        (_post(JSON, b'{"api_key": ' + b"9" * 5000 + b"}"), "ERROR_SQL"),
        (
            _post(JSON, json.dumps({"api_key": KEY, "action": "getBalance"}).encode()),
            BALANCE,
        ),
        (_get(f"{GOOD_KEY}&action=getBalance&%zz=%FF%00"), BALANCE),
        (_get(f"{GOOD_KEY}&action=getBalance&action=nope"), BALANCE),  # first one wins
        (_get(f"{GOOD_KEY}&action=" + "a" * 1025), "ERROR_SQL"),
        (_get(f"{GOOD_KEY}&action=getStatus&id=" + "9" * 19), "WRONG_ACTIVATION_ID"),
        (_get(f"{GOOD_KEY}&action=getStatus&id=-1"), "WRONG_ACTIVATION_ID"),
        (_get(f"{GOOD_KEY}&action=getStatus&id=%D9%A3"), "WRONG_ACTIVATION_ID"),
        (_get(f"{GOOD_KEY}&action=getStatus&id={FIRST_ID + 5}"), "NO_ACTIVATION"),
        (_get(f"{GOOD_KEY}&action=getPrices&country=%EF%BC%91"), "ERROR_SQL"),
        (_get(f"{GOOD_KEY}&action=getNumber&service=tg&maxPrice=NaN"), "ERROR_SQL"),
        (_get(f"{GOOD_KEY}&action=getNumber&service=tg&maxPrice=-1"), "ERROR_SQL"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.method,
)
async def test_edge_encodings(
    shop: Shop, logs: pytest.LogCaptureFixture, req: Request, body: str
) -> None:
    assert await send(shop.client, req) == (200, TEXT, body.encode())
    assert_quiet_logs(logs)


# ---- regressions: what the fuzzer found -------------------------------------------------
# Each of these currently logs "unexpected error" with a traceback (render_errors'
# catch-all) and answers ERROR_SQL. Where more than one answer would be a fair fix, the
# test accepts each; the traceback is what must go.


@pytest.mark.parametrize("body", [b"[" * 5000, b'{"a":' * 5000])
async def test_deeply_nested_json_is_a_bad_parameter(
    shop: Shop, logs: pytest.LogCaptureFixture, body: bytes
) -> None:
    # json.loads raises RecursionError, which _parse_body does not catch (ValueError only)
    assert await send(shop.client, _post(JSON, body)) == (200, TEXT, b"ERROR_SQL")
    assert_quiet_logs(logs)


@pytest.mark.parametrize(
    ("data", "answers"),
    [
        # Config.find_key: presented.encode() raises UnicodeEncodeError
        ({"api_key": "\ud800", "action": "getBalance"}, {"BAD_KEY", "ERROR_SQL"}),
        (
            {"api_key": KEY[:5] + "\udc80", "action": "getBalance"},
            {"BAD_KEY", "ERROR_SQL"},
        ),
        # Store.begin_purchase: sqlite cannot store the service text
        (
            {"api_key": KEY, "action": "getNumber", "service": "tg\udc80"},
            {"BAD_SERVICE", "ERROR_SQL"},
        ),
    ],
    ids=["key", "key-suffix", "service"],
)
async def test_lone_surrogates_in_json_are_answered_quietly(
    shop: Shop, logs: pytest.LogCaptureFixture, data: dict[str, str], answers: set[str]
) -> None:
    body = json.dumps(data).encode()  # ASCII escapes: json.loads gives back "\ud800"
    status, content_type, answer = await send(shop.client, _post(JSON, body))
    assert (status, content_type) == (200, TEXT) and answer.decode() in answers, answer
    assert_quiet_logs(logs)


async def test_lone_surrogate_operator_does_not_lose_a_paid_number(
    shop: Shop, logs: pytest.LogCaptureFixture
) -> None:
    # The sandbox sells (and charges) first, then Store.complete_purchase cannot insert
    # the operator text: the client gets ERROR_SQL for a number it paid for.
    data = {
        "api_key": KEY,
        "action": "getNumber",
        "service": "tg",
        "operator": "m\udc80",
    }
    _, _, answer = await send(shop.client, _post(JSON, json.dumps(data).encode()))
    _, _, balance = await call(shop.client, action="getBalance")
    if answer == b"ERROR_SQL":  # refused: then before paying
        assert balance == BALANCE
    else:
        assert re.fullmatch(rb"ACCESS_NUMBER:\d+:\d+", answer), answer
    assert_quiet_logs(logs)


@pytest.mark.parametrize(
    "query",
    [
        "action=getNumber&service=tg&maxPrice=1e999999999",
        "action=getNumber&service=tg&country=0&max_price=1E%2B1000000",
        "action=getNumberV2&service=tg&maxPrice=1e999999999",
    ],
)
async def test_an_astronomic_max_price_is_answered_quietly(
    shop: Shop, logs: pytest.LogCaptureFixture, query: str
) -> None:
    # Router.buy: order.max_price / factor overflows the decimal context (Emax 999999)
    status, content_type, answer = await send(shop.client, _get(f"{GOOD_KEY}&{query}"))
    assert status == 200
    if content_type == TEXT:  # no limit at all, or a malformed parameter
        assert re.fullmatch(rb"ACCESS_NUMBER:\d+:\d+|ERROR_SQL", answer), answer
    else:
        assert json.loads(answer)["activationId"] > FIRST_ID
    assert_quiet_logs(logs)
