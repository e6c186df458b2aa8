"""Secrets in what ``serve`` prints about its store URL (found by the attack pass).

The README's template is ``postgresql://sms:${PG_PASSWORD}@db.internal:5432/sms``: a
generated password (base64: ``/``, ``+``; or ``#``, ``?``) used to land in the URL
unescaped, and serve printed it. It is percent-encoded there now; a literal one with
those characters is one config line, masked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """\
server: {host: 127.0.0.1, port: 18933}
store: {url: "postgresql://sms:${PG_PASSWORD}@127.0.0.1:1/sms"}
keys:
  - key: attack2-demo-key-123456
    providers: [sandbox]
providers:
  sandbox: {type: sandbox, sms_delay: 5}
"""


def serve(tmp_path: Path, password: str) -> tuple[int, str]:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "compat_server", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PG_PASSWORD": password},
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(
    "password",
    ["k7/Qx9Zr2mW0aBcD", "k7#Qx9Zr2mW0aBcD", "k7?Qx9Zr2mW0aBcD", "k7Qx9Zr2mW0aBcD"],
    ids=["slash", "hash", "question", "plain"],
)
def test_a_password_never_reaches_the_output(tmp_path: Path, password: str) -> None:
    code, out = serve(tmp_path, password)
    # was (slash): "sms-compat: store postgresql://sms:k7/Qx9Zr2mW0aBcD@127.0.0.1:1/
    # sms: the port is not a number"; (hash, question): "...postgresql://sms:k7: ..."
    assert (code, out) == (
        1,
        "sms-compat: store postgresql://****@127.0.0.1:1/sms cannot be used:"
        " [Errno 111] Connection refused\n",
    )


@pytest.mark.parametrize("password", ["k7/Qx9+Zr2", "k7#Qx9", "k7?Q", "a@b:c%d"])
def test_a_password_from_the_environment_reaches_the_database_as_itself(
    password: str,
) -> None:
    from compat_server.config import _expand, parse_config
    from compat_server.store.postgres import Target

    raw = _expand(
        {"store": {"url": "postgresql://sms:${PG_PASSWORD}@db:5432/sms"},
         "keys": [{"key": "k" * 20, "providers": ["sandbox"]}],
         "providers": {"sandbox": {"type": "sandbox"}}},
        {"PG_PASSWORD": password}, "",
    )  # fmt: skip
    config = parse_config(raw)
    assert config.store_url is not None
    target = Target.parse(config.store_url)
    assert (target.user, target.password, target.host, target.port) == (
        "sms", password, "db", 5432,
    )  # fmt: skip


def test_a_literal_password_with_a_slash_is_one_masked_config_line() -> None:
    from compat_server.config import parse_config
    from providers.vocabulary import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({"store": {"url": "postgresql://sms:k7/Qx9Z@db:5432/sms"},
                      "keys": [{"key": "k" * 20, "providers": ["sandbox"]}],
                      "providers": {"sandbox": {"type": "sandbox"}}})  # fmt: skip
    assert str(caught.value) == (
        "store.url: percent-encode the user and password (/ ? # @ as %2F %3F %23 %40;"
        " from ${ENV} that is done for you), got postgresql://****@db:5432/sms"
    )


def test_a_malformed_url_is_one_config_line(tmp_path: Path) -> None:
    """``[::1`` (an IPv6 host without its bracket) was a traceback (ValueError:
    Invalid IPv6 URL from config.py)."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace("127.0.0.1:1", "[::1"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "compat_server", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PG_PASSWORD": "plainpassword"},
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in out, out
    assert "plainpassword" not in out
