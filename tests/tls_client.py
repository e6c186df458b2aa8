"""Run one published client, unchanged, the way a user's tool runs it (tests/test_tls.py).

``python tests/tls_client.py CLIENT KEY`` calls the library with its default URL
(``https://api.sms-activate.org/...``, ``https://hero-sms.com/...``, ...). What a hosts
file would do is done here, before the library is imported, by wrapping
``socket.getaddrinfo``: every name in ``TLS_TEST_NAMES`` resolves to 127.0.0.1 (any
other name fails, so nothing reaches the real network); and what ``--hosts-trick``'s
ports 443/80 would be is done by redirecting connections to 127.0.0.1:443/80 to the
ports in ``TLS_TEST_PORTS`` (``443:40001,80:40002``). Certificates are verified as the
library does by default; trust comes from the environment (REQUESTS_CA_BUNDLE,
SSL_CERT_FILE) or from the interpreter's certifi bundle.

Each step prints one JSON line ``[name, value]``. At ``["wait", "sms"]`` the script
reads a line from stdin: the test moves the server's clock so the SMS arrives. A
failure prints ``["error", "ExceptionType: message"]`` and exits 3.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import sys
from typing import Any

NAMES = {n for n in os.environ.get("TLS_TEST_NAMES", "").split(",") if n}
PORTS = {
    int(a): int(b)
    for a, b in (p.split(":") for p in os.environ.get("TLS_TEST_PORTS", "").split(","))
    if a
}
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    """The hosts file: the redirected names are 127.0.0.1 (IPv4 only)."""
    name = host.decode() if isinstance(host, bytes) else host
    name = (name or "").lower().rstrip(".")
    if name in NAMES:
        kwargs.pop("family", None)
        return _real_getaddrinfo("127.0.0.1", port, socket.AF_INET, *args[1:], **kwargs)
    if name in ("127.0.0.1", "localhost", "::1", ""):
        return _real_getaddrinfo(host, port, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, f"test: no real network ({name})")


def _redirect(address: Any) -> Any:
    """The port redirect (as iptables REDIRECT would): 127.0.0.1:443 -> the TLS port."""
    if isinstance(address, tuple) and address[:1] == ("127.0.0.1",):
        return ("127.0.0.1", PORTS.get(address[1], address[1]))
    return address


def _connect(self: socket.socket, address: Any) -> None:
    return _real_connect(self, _redirect(address))


def _connect_ex(self: socket.socket, address: Any) -> int:
    return _real_connect_ex(self, _redirect(address))


socket.getaddrinfo = _getaddrinfo
socket.socket.connect = _connect  # type: ignore[method-assign]
socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]


def out(step: str, value: Any) -> None:
    print(json.dumps([step, plain(value)], default=str), flush=True)


def plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def wait_for_sms() -> None:
    out("wait", "sms")
    sys.stdin.readline()


def smsactivate(key: str, module: str) -> None:
    api = __import__(f"{module}.api", fromlist=["SMSActivateAPI"]).SMSActivateAPI(key)
    out("getBalance", api.getBalance())
    bought = api.getNumber(service="tg", country=10)
    out("getNumber", bought)
    out("getStatus", api.getStatus(id=bought["activation_id"]))
    wait_for_sms()
    out("getStatus", api.getStatus(id=bought["activation_id"]))
    out("setStatus", api.setStatus(id=bought["activation_id"], status=6))
    out("getBalance", api.getBalance())


async def aiosmsactivate(key: str) -> None:
    from aiosmsactivate import SmsActivate

    client = SmsActivate(key)
    out("getBalance", await client.get_balance())
    number = await client.purchase("tg", country=10)
    out("getNumberV2", number)
    status = await client.get_activation_status_v1(number.activation_id)
    out("getStatus", [status[0].name, status[1]])
    wait_for_sms()
    status = await client.get_activation_status_v1(number.activation_id)
    out("getStatus", [status[0].name, status[1]])
    done = await client.set_activation_status(number.activation_id, 6)
    out("setStatus", done.name)
    out("getBalance", await client.get_balance())


async def async_sms_activate(key: str) -> None:
    from async_sms_activate.client import SmsActivateClient

    client = SmsActivateClient(key)
    try:
        out("getBalance", await client.get_balance())
        activation = await client.buy_number_by_country("tg", 10)
        out("getNumberV2", activation.data)
        out("getStatus", await client.get_activation_status(activation.activation_id))
        wait_for_sms()
        out("getStatus", await client.get_activation_status(activation.activation_id))
        out("setStatus", await activation.complete_activation())
        out("getBalance", await client.get_balance())
    finally:
        await client.close()


async def herosms(key: str) -> None:
    from herosms import HeroSMSClient

    async with HeroSMSClient(key, retry_attempts=1) as client:
        out("getBalance", await client.get_balance())
        activation = await client.activations.create(service="tg", country=10)
        out("getNumberV2", activation.info)
        out("getStatus", await client.get_status_v1(activation.id))
        wait_for_sms()
        out("getStatus", await client.get_status_v1(activation.id))
        out("setStatus", await activation.complete())
        out("getBalance", await client.get_balance())


def grizzly(key: str) -> None:
    from grizzly_sms import GrizzlySms

    with GrizzlySms(key, timeout_ms=5000) as sms:
        out("getBalance", sms.get_balance())
        number = sms.get_number("tg", country=10)
        out("getNumber", number)
        out("getStatus", sms.get_status(number.activation_id))
        wait_for_sms()
        out("getStatus", sms.get_status(number.activation_id))
        out("setStatus", sms.complete(number.activation_id))
        out("getBalance", sms.get_balance())


def smsbower(key: str) -> None:
    from smsbower import SmsBowerClient

    with SmsBowerClient(key, timeout=5.0) as client:
        out("getBalance", client.get_balance())
        number = client.get_number("tg", country=10)
        out("getNumber", number)
        out("getStatus", client.get_status(number.id))
        wait_for_sms()
        out("getStatus", client.get_status(number.id))
        out("setStatus", client.set_status(number.id, 6))
        out("getBalance", client.get_balance())


def smsactivateru(key: str) -> None:
    """http://sms-activate.ru: the hosts trick's plain-http side."""
    import smsactivateru as sar

    wrapper = sar.Sms(key)
    out("getBalance", sar.GetBalance().request(wrapper))
    number = sar.GetNumber(
        service=sar.SmsService().Telegram, country=sar.SmsTypes.Country.VN
    ).request(wrapper)
    out("getNumber", [number.id, number.phone_number])
    out("getStatus", sar.GetStatus(id=number.id).request(wrapper))
    wait_for_sms()
    out("getStatus", sar.GetStatus(id=number.id).request(wrapper))
    out("setStatus", sar.SetStatus(id=number.id, status=6).request(wrapper))
    out("getBalance", sar.GetBalance().request(wrapper))


def main() -> int:
    client, key = sys.argv[1], sys.argv[2]
    flows: dict[str, Any] = {
        "smsactivate": lambda: smsactivate(key, "smsactivate"),
        "smsactivatepy": lambda: smsactivate(key, "smsactivatepy"),
        "aiosmsactivate": lambda: asyncio.run(aiosmsactivate(key)),
        "async-sms-activate": lambda: asyncio.run(async_sms_activate(key)),
        "herosms": lambda: asyncio.run(herosms(key)),
        "grizzly-sms-client": lambda: grizzly(key),
        "smsbower": lambda: smsbower(key),
        "smsactivateru": lambda: smsactivateru(key),
    }
    try:
        flows[client]()
    except Exception as exc:  # the test reads the failure from stdout
        out("error", f"{type(exc).__name__}: {exc}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
