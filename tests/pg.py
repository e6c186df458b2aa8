"""A real PostgreSQL server for the tests: Debian's binaries, a cluster in a temp dir.

:func:`server` starts one per session (``initdb`` into a fresh directory, ``pg_ctl
start`` on a free loopback port, durability off: these databases are thrown away);
each test gets a database of its own (:meth:`PgServer.create`). As root the binaries
run as the ``postgres`` user (PostgreSQL refuses root). ``SMS_COMPAT_TEST_PG_URL``
names an existing server instead (a superuser URL; it is never stopped). Without
binaries the tests skip, unless ``SMS_COMPAT_REQUIRE_POSTGRES=1`` (CI): then they fail.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

MISSING = "PostgreSQL not installed: apt-get install postgresql"
_names = itertools.count(1)


def binaries() -> Path | None:
    """The directory holding initdb and pg_ctl (the newest Debian version first)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: (
            int(Path(p).parent.parent.name)
            if Path(p).parent.parent.name.isdigit()
            else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgServer:
    """One PostgreSQL server: ``url(db)`` reaches a database on it."""

    def __init__(self, admin_url: str, home: Path | None = None) -> None:
        self.admin_url = admin_url  # a superuser on the ``postgres`` database
        self.home = home  # the cluster's directory when this session runs it
        self.bin = binaries()

    @property
    def owned(self) -> bool:
        """Whether this session started it (and may stop and start it)."""
        return self.home is not None

    def url(self, database: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path=f"/{database}"))

    def _run(self, *command: str) -> None:
        args = [str(self.bin / command[0]), *command[1:]] if self.bin else [*command]
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--", *args]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}")

    def stop(self) -> None:
        """Stop it at once (``pg_ctl stop -m fast``): clients are cut off."""
        assert self.home is not None
        self._run("pg_ctl", "-D", str(self.home / "data"), "-m", "fast", "-w", "stop")

    def start(self) -> None:
        assert self.home is not None
        port = urlsplit(self.admin_url).port
        options = (
            f"-h 127.0.0.1 -p {port} -k {self.home} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.home / "data"), "-o", options,
            "-l", str(self.home / "log"), "-w", "start",
        )  # fmt: skip

    async def create(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t{os.getpid()}_{next(_names)}"
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        return self.url(name)

    async def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()

    def close(self) -> None:
        if self.home is None:
            return
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped by a test that failed half-way
        shutil.rmtree(self.home, ignore_errors=True)


def start_server() -> PgServer:
    """The server the tests use: SMS_COMPAT_TEST_PG_URL, else a new local cluster."""
    given = os.environ.get("SMS_COMPAT_TEST_PG_URL")
    if given:
        return PgServer(given)
    if binaries() is None:
        if os.environ.get("SMS_COMPAT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{MISSING} (SMS_COMPAT_REQUIRE_POSTGRES=1)")
        pytest.skip(MISSING)
    home = Path(tempfile.mkdtemp(prefix="sms-compat-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(home, user.pw_uid, user.pw_gid)
    server = PgServer(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", home)
    server._run(
        "initdb", "-D", str(home / "data"), "-A", "trust", "-U", "postgres",
        "-E", "UTF8", "--no-sync",
    )  # fmt: skip
    server.start()
    return server
