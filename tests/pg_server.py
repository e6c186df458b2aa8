"""A real PostgreSQL server for tests, from the machine's binaries (Debian's package).

:class:`PgServer` runs ``initdb`` into a temporary directory and ``pg_ctl`` on a free
loopback port (as the ``postgres`` user when the tests run as root: PostgreSQL refuses
root). :func:`find_bin` says where the binaries are, or None: tests then skip, naming
what is missing. Each test gets a database of its own (:meth:`PgServer.database`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable

WHY_MISSING = (
    "PostgreSQL binaries not found (apt-get install postgresql): the several-servers"
    " tests need a real server"
)


def find_bin() -> str | None:
    """The directory holding initdb, pg_ctl and psql, or None."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all(os.access(f"{folder}/{n}", os.X_OK) for n in ("initdb", "pg_ctl")):
            return folder
    found = shutil.which("pg_ctl")
    return os.path.dirname(os.path.realpath(found)) if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster on 127.0.0.1; :meth:`start`, :meth:`stop`, :meth:`remove`."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="sms-compat-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self.user = "postgres"
        self.password = "pg-test-" + uuid.uuid4().hex[:12]
        self._demote: Callable[[], None] | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

            def demote() -> None:
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)

            self._demote = demote
        pwfile = os.path.join(self.root, "pw")
        with open(pwfile, "w", encoding="utf-8") as handle:
            handle.write(self.password)
        if self._demote is not None:
            entry = pwd.getpwnam("postgres")
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", self.data, "-U", self.user, "--pwfile", pwfile,
            "-A", "scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        os.unlink(pwfile)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
            )

    def _run(self, tool: str, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [f"{self.bindir}/{tool}", *args],
            capture_output=True, text=True, preexec_fn=self._demote, timeout=120,
            cwd=self.root,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        log = os.path.join(self.root, "log")
        self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        return (
            f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [f"{self.bindir}/psql", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.user, "-d", database, "-At", "-c", sql],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PGPASSWORD": self.password},
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout.strip()

    def database(self) -> str:
        """A new empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def wait_ready(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.psql("SELECT 1")
                return
            except RuntimeError:
                time.sleep(0.2)
        raise AssertionError("PostgreSQL did not come back")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
