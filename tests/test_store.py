"""The store under field conditions: file modes, a file replaced under the server, ids
across fresh stores, a read-only or locked or full store, two servers on one store.

Locks come from a real second sqlite3 connection, a full disk from a real tmpfs (root
only), read-only files from real modes (as ``nobody`` when the suite runs as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from compat_server.config import parse_config
from compat_server.store import (
    FIRST_ID,
    MAX_ID,
    WAIT_CODE,
    SqliteStore,
    StoreError,
    first_id,
)
from fakes import thuecodesim
from tests.conftest import KEY, T0, FakeClock, StartApp, call, engine_of, sandbox_raw

TEXT = "text/plain"
ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


def mode(path: str) -> str:
    try:
        return oct(stat.S_IMODE(os.stat(path).st_mode))
    except FileNotFoundError:
        return "missing"


def rows(path: str, query: str) -> list[tuple[Any, ...]]:
    """Read through an independent connection (WAL: works under another's write lock)."""
    with contextlib.closing(sqlite3.connect(path, timeout=0.1)) as db:
        return db.execute(query).fetchall()


def quick(store_path: str, **sections: Any) -> Any:
    """A sandbox config whose store waits 0.1 s for a lock (the default is 5 s)."""
    raw = sandbox_raw(store_path, **sections)
    raw["store"] = {"path": store_path, "busy_timeout": 0.1}
    return parse_config(raw)


def store_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "compat_server" and r.getMessage().startswith("store ")
    ]


@contextlib.contextmanager
def write_lock(path: str, how: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """Another process's write transaction on the store, until the block ends."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"BEGIN {how}")
    try:
        yield db
    finally:
        db.execute("ROLLBACK")
        db.close()


# ---- file modes -----------------------------------------------------------------------


async def test_a_new_store_is_private_whatever_the_umask(
    start_app: StartApp, store_path: str
) -> None:
    old = os.umask(0o022)
    try:
        client = await start_app(quick(store_path))
        _, _, body = await call(client, action="getNumber", service="tg", country=10)
        assert body.startswith("ACCESS_NUMBER:")
    finally:
        os.umask(old)
    names = [store_path, f"{store_path}-wal", f"{store_path}-shm", f"{store_path}.lock"]
    assert [(Path(n).name, mode(n)) for n in names] == [
        (Path(n).name, "0o600") for n in names
    ]


async def test_an_existing_store_is_made_private_at_open(
    store_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with contextlib.closing(sqlite3.connect(store_path)) as db:
        db.execute("CREATE TABLE scratch (x)")
    os.chmod(store_path, 0o644)
    caplog.set_level(logging.WARNING, "compat_server")
    store = await SqliteStore.open(store_path)
    await store.close()
    assert mode(store_path) == "0o600"
    assert store_lines(caplog) == [
        (
            "WARNING",
            f"store {store_path} was mode 0644 (readable by other users), now 0600",
        )
    ]


# ---- a store deleted or replaced under the server -------------------------------------


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_store_replaced_under_the_server_stops_purchases(
    start_app: StartApp,
    store_path: str,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    client = await start_app(quick(store_path))
    _, _, first = await call(client, action="getNumber", service="tg", country=10)
    assert first.startswith("ACCESS_NUMBER:")
    balance = await call(client, action="getBalance")
    caplog.set_level(logging.INFO, "compat_server")
    if how == "deleted":
        os.unlink(store_path)
    else:  # a restore from backup, or a second deployment's fresh store
        shutil.copy(store_path, f"{store_path}.new")
        os.replace(f"{store_path}.new", store_path)
    for _ in range(3):
        assert await call(client, action="getNumber", service="tg", country=10) == (
            200,
            TEXT,
            "NO_NUMBERS",
        )
    assert await call(client, action="getBalance") == balance  # nothing bought
    assert store_lines(caplog) == [
        (
            "ERROR",
            f"store {store_path} was {'deleted' if how == 'deleted' else 'replaced by'}"
            f"{'' if how == 'deleted' else ' another file'} while the server runs:"
            " purchases stopped (getNumber answers NO_NUMBERS); restore the file or"
            " restart the server",
        )
    ]
    # what was sold before goes on being served
    assert await call(client, action="getStatus", id=first.split(":")[1]) == (
        200,
        TEXT,
        "STATUS_WAIT_CODE",
    )


async def test_a_store_moved_back_in_place_resumes_purchases(
    start_app: StartApp, store_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_app(quick(store_path))
    caplog.set_level(logging.INFO, "compat_server")
    os.rename(store_path, f"{store_path}.moved")
    assert await call(client, action="getNumber", service="tg", country=10) == (
        200,
        TEXT,
        "NO_NUMBERS",
    )
    os.rename(f"{store_path}.moved", store_path)  # the same file (inode) again
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith(f"ACCESS_NUMBER:{FIRST_ID}:")
    assert [level for level, _ in store_lines(caplog)] == ["ERROR", "WARNING"]
    assert store_lines(caplog)[1] == (
        "WARNING",
        f"store {store_path} is back: purchases resume",
    )


async def test_the_store_file_is_watched_without_any_request(
    store_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "compat_server")
    store = await SqliteStore.open(store_path)
    watch = asyncio.create_task(store.watch(0.01))
    try:
        os.unlink(store_path)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if store_lines(caplog):
                break
        await asyncio.sleep(0.05)  # further rounds do not log again
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await store.close()
    assert [level for level, _ in store_lines(caplog)] == ["ERROR"]
    assert store.problem == "replaced"


# ---- ids ------------------------------------------------------------------------------


async def test_a_fresh_store_never_hands_out_an_earlier_stores_ids(
    start_app: StartApp, store_path: str, clock: FakeClock
) -> None:
    clock.now = T0 + 86_400  # a store created a day after the id epoch
    first = await start_app(quick(store_path))
    sold = []
    for _ in range(3):
        _, _, body = await call(first, action="getNumber", service="tg", country=10)
        sold.append(int(body.split(":")[1]))
    assert sold == [FIRST_ID + 172_800, FIRST_ID + 172_801, FIRST_ID + 172_802]
    await first.close()
    for name in (store_path, f"{store_path}-wal", f"{store_path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    clock.advance(2)  # the operator starts again on an empty store two seconds later
    again = await start_app(quick(store_path))
    _, _, body = await call(again, action="getNumber", service="tg", country=10)
    assert int(body.split(":")[1]) == FIRST_ID + 172_804 > max(sold)


def test_ids_stay_below_2_31() -> None:
    assert first_id(T0) == FIRST_ID == 100_000
    assert first_id(T0 - 10**6) == FIRST_ID  # a clock before the epoch
    # created in 2058, a store still has 10**8 ids before 2**31; later ones too
    assert MAX_ID - first_id(time.mktime((2058, 1, 1, 0, 0, 0, 0, 0, 0))) > 10**8
    assert first_id(10**12) == MAX_ID - 10**8


async def test_a_refused_attempt_gives_its_id_back(
    start_app: StartApp, store_path: str
) -> None:
    providers = {
        "empty": {
            "type": "sandbox",
            "countries": [10],
            "services": {"tg": {"price": 5, "count": 0}},
        },
        "full": {"type": "sandbox", "countries": [10]},
    }
    keys = [{"key": KEY, "alias": "tester", "providers": ["empty", "full"]}]
    client = await start_app(quick(store_path, providers=providers, keys=keys))
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith(f"ACCESS_NUMBER:{FIRST_ID}:")
    assert rows(store_path, "SELECT provider, state, activation_id FROM purchases") == [
        ("empty", "refused", None),
        ("full", "confirmed", FIRST_ID),
    ]


# ---- one server per store ------------------------------------------------------------


async def test_a_second_store_on_the_same_file_is_refused(store_path: str) -> None:
    store = await SqliteStore.open(store_path)
    try:
        with pytest.raises(StoreError) as caught:
            await SqliteStore.open(store_path)
        assert str(caught.value) == (
            f"store {store_path} is in use by another sms-compat server"
            f" (pid {os.getpid()})"
        )
    finally:
        await store.close()
    again = await SqliteStore.open(store_path)  # released on close
    await again.close()


CLI_CONFIG = """
server: {{host: 127.0.0.1, port: {port}}}
store: {{path: {store}}}
keys: [{{key: {key}, alias: t, providers: [sandbox]}}]
providers: {{sandbox: {{type: sandbox}}}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, made writable again after a test took write permissions away."""
    yield tmp_path
    for sub in (tmp_path, *tmp_path.rglob("*")):
        with contextlib.suppress(OSError):
            sub.chmod(0o700 if sub.is_dir() else 0o600)


def cli(config: Path, unprivileged: bool = False) -> subprocess.Popen[str]:
    """``python -m compat_server serve``; ``unprivileged``: file modes bind it.

    Root ignores file modes, so under root the server runs without capabilities
    (``setpriv``), as an ordinary owner of the files would.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "compat_server", "serve", "--config", str(config)]
    if unprivileged and IS_ROOT:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file modes cannot bind")
        command = [setpriv, "--bounding-set=-all", "--inh-caps=-all", *command]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], seconds: float = 15) -> tuple[int, str]:
    """Exit status and stderr of a server expected to stop by itself."""
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the server kept running:\n{err}") from None
    return proc.returncode, err


def make_store(path: Path) -> None:
    async def create() -> None:
        store = await SqliteStore.open(str(path))
        await store.close()

    asyncio.run(create())
    Path(f"{path}.lock").unlink(missing_ok=True)


def test_a_read_only_store_file_is_a_startup_error(shared_dir: Path) -> None:
    store = shared_dir / "store.sqlite3"
    make_store(store)
    store.chmod(0o400)  # its owner may read it, not write it
    config = shared_dir / "config.yaml"
    config.write_text(CLI_CONFIG.format(port=free_port(), store=store, key=KEY))
    assert finish(cli(config, unprivileged=True)) == (
        1,
        f"sms-compat: store {store} is read-only: the server must be able to write"
        " it\n",
    )


def test_a_store_in_a_read_only_directory_is_a_startup_error(
    shared_dir: Path,
) -> None:
    store = shared_dir / "data" / "store.sqlite3"
    store.parent.mkdir()
    make_store(store)
    config = shared_dir / "config.yaml"
    config.write_text(CLI_CONFIG.format(port=free_port(), store=store, key=KEY))
    store.parent.chmod(0o555)  # no -wal, -shm or lock file can be created
    assert finish(cli(config, unprivileged=True)) == (
        1,
        f"sms-compat: store {store}: cannot create its lock file {store}.lock:"
        " Permission denied\n",
    )
    store.parent.chmod(0o755)
    Path(f"{store}.lock").touch()
    store.parent.chmod(0o555)  # the lock file is there; SQLite's files cannot be
    assert finish(cli(config, unprivileged=True)) == (
        1,
        f"sms-compat: store {store}: its directory is read-only (SQLite keeps"
        " store.sqlite3-wal and -shm next to it)\n",
    )


def test_a_second_server_on_the_same_store_exits_naming_it(shared_dir: Path) -> None:
    store = shared_dir / "store.sqlite3"
    port = free_port()
    first_config = shared_dir / "first.yaml"
    first_config.write_text(CLI_CONFIG.format(port=port, store=store, key=KEY))
    second_config = shared_dir / "second.yaml"
    second_config.write_text(CLI_CONFIG.format(port=free_port(), store=store, key=KEY))
    first = cli(first_config)
    try:
        url = f"http://127.0.0.1:{port}/stubs/handler_api.php?api_key={KEY}&action=getBalance"
        deadline = time.monotonic() + 10
        while True:
            assert first.poll() is None, first.communicate()[1]
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.read().startswith(b"ACCESS_BALANCE:"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "first server not ready"
            time.sleep(0.05)
        status, err = finish(cli(second_config))
        assert (status, err) == (
            1,
            f"sms-compat: store {store} is in use by another sms-compat server"
            f" (pid {first.pid})\n",
        )
        assert first.poll() is None  # the first one is untouched
    finally:
        first.terminate()
        first.communicate(timeout=10)


# ---- a locked store -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["IMMEDIATE", "EXCLUSIVE"])
async def test_a_locked_store_before_the_paid_call_buys_nothing(
    start_app: StartApp, store_path: str, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    client = await start_app(quick(store_path))
    balance = await call(client, action="getBalance")
    caplog.set_level(logging.INFO, "compat_server")
    with write_lock(store_path, how):
        for _ in range(2):
            assert await call(client, action="getNumber", service="tg", country=10) == (
                200,
                TEXT,
                "NO_NUMBERS",
            )
        assert await call(client, action="getBalance") == balance
    assert store_lines(caplog) == [
        ("ERROR", f"store {store_path} cannot be written: database is locked")
    ]
    assert rows(store_path, "SELECT COUNT(*) FROM purchases") == [(0,)]
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith(f"ACCESS_NUMBER:{FIRST_ID}:")
    assert store_lines(caplog)[-1] == (
        "WARNING",
        f"store {store_path} is writable again",
    )


class LockingThuecodesim(thuecodesim.FakeThuecodesim):
    """Sells the number, then another process locks the store before the answer."""

    def __init__(self, store_path: str) -> None:
        super().__init__()
        self.store_path = store_path
        self.locker: sqlite3.Connection | None = None
        self.app.middlewares.append(self._lock_after_sale)

    @web.middleware
    async def _lock_after_sale(self, request: web.Request, handler: Any) -> Any:
        response = await handler(request)
        if request.path == "/request/getv2" and self.locker is None:
            self.locker = sqlite3.connect(self.store_path, isolation_level=None)
            self.locker.execute("BEGIN IMMEDIATE")
        return response

    def release(self) -> None:
        assert self.locker is not None
        self.locker.execute("ROLLBACK")
        self.locker.close()


async def test_a_store_locked_after_the_paid_call_keeps_the_number(
    start_app: StartApp,
    store_path: str,
    aiohttp_server: Any,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = LockingThuecodesim(store_path)
    server: TestServer = await aiohttp_server(fake.app)
    options = thuecodesim.provider_options(str(server.make_url("")).rstrip("/"))
    config = parse_config(
        {
            "store": {"path": store_path, "busy_timeout": 0.1},
            "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
            "keys": [{"key": KEY, "alias": "t", "providers": ["tcs"]}],
            "providers": {"tcs": options},
        }
    )
    client = await start_app(config)
    engine = engine_of(client)
    clock.now = fake.clock()  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, "compat_server")
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    [request_id] = list(fake.orders)
    ident = FIRST_ID
    assert body == f"ACCESS_NUMBER:{ident}:84{fake.orders[request_id].phone}"
    # not on disk yet: the attempt is, pending, with the id set aside for it
    assert rows(store_path, "SELECT id FROM activations") == []
    assert rows(store_path, "SELECT state, activation_id FROM purchases") == [
        ("pending", ident)
    ]
    assert await call(client, action="getStatus", id=ident) == (
        200,
        TEXT,
        "STATUS_WAIT_CODE",
    )
    # the reconciler must not take the held number for an orphan
    assert await engine.reconciler.step() == 0
    assert await engine.store.flush() == 1  # still locked: still held
    fake.release()
    assert await engine.store.flush() == 0
    assert rows(store_path, "SELECT id, upstream_id, state FROM activations") == [
        (ident, request_id, WAIT_CODE)
    ]
    assert rows(store_path, "SELECT state, activation_id FROM purchases") == [
        ("confirmed", ident)
    ]
    assert store_lines(caplog) == [
        ("ERROR", f"store {store_path} cannot be written: database is locked"),
        (
            "WARNING",
            f"store {store_path}: id={ident} provider=tcs bought but not stored"
            " (database is locked): held in memory until the store takes it",
        ),
        ("WARNING", f"store {store_path} is writable again"),
        ("WARNING", f"store {store_path}: id={ident} held in memory is now stored"),
    ]
    assert await engine.reconciler.step() == 0
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith(f"ACCESS_NUMBER:{ident + 1}:")


async def test_a_number_held_at_shutdown_is_reconciled_under_its_id(
    start_app: StartApp,
    store_path: str,
    aiohttp_server: Any,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = LockingThuecodesim(store_path)
    server: TestServer = await aiohttp_server(fake.app)
    options = thuecodesim.provider_options(str(server.make_url("")).rstrip("/"))
    raw = {
        "store": {"path": store_path, "busy_timeout": 0.1},
        "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
        "keys": [{"key": KEY, "alias": "t", "providers": ["tcs"]}],
        "providers": {"tcs": options},
    }
    client = await start_app(parse_config(raw))
    clock.now = fake.clock()  # type: ignore[attr-defined]
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    [request_id] = list(fake.orders)
    assert body.startswith(f"ACCESS_NUMBER:{FIRST_ID}:")
    caplog.clear()
    await client.close()  # still locked: the number never reached the disk
    assert store_lines(caplog) == [
        (
            "ERROR",
            f"store {store_path}: id={FIRST_ID} provider=tcs upstream={request_id}"
            " bought but never stored (its attempt is on disk for the reconciler)",
        )
    ]
    fake.release()
    again = await start_app(parse_config(raw))
    engine = engine_of(again)
    assert await engine.reconciler.step() == 1
    # the client that holds the id learns the number is gone
    assert await call(again, action="getStatus", id=FIRST_ID) == (
        200,
        TEXT,
        "STATUS_CANCEL",
    )


# ---- a full disk ----------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A real 2 MiB tmpfs (needs root and mount); skipped where it cannot be had."""
    path = Path(tempfile.mkdtemp(prefix="sms-compat-full-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        path.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


def fill(disk: Path) -> Path:
    """Take every free byte of the disk."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 4096)
    return filler


async def test_a_full_disk_before_the_paid_call_buys_nothing(
    small_disk: Path, start_app: StartApp
) -> None:
    store_path = str(small_disk / "store.sqlite3")
    client = await start_app(quick(store_path))
    balance = await call(client, action="getBalance")
    filler = fill(small_disk)
    for _ in range(2):
        assert await call(client, action="getNumber", service="tg", country=10) == (
            200,
            TEXT,
            "NO_NUMBERS",
        )
    assert await call(client, action="getBalance") == balance
    filler.unlink()
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    assert body.startswith(f"ACCESS_NUMBER:{FIRST_ID}:")


class FillingThuecodesim(thuecodesim.FakeThuecodesim):
    """Sells the number, then the disk under the store fills up before the answer."""

    def __init__(self, disk: Path) -> None:
        super().__init__()
        self.disk = disk
        self.filler: Path | None = None
        self.app.middlewares.append(self._fill_after_sale)

    @web.middleware
    async def _fill_after_sale(self, request: web.Request, handler: Any) -> Any:
        response = await handler(request)
        if request.path == "/request/getv2" and self.filler is None:
            self.filler = fill(self.disk)
        return response


async def test_a_disk_full_after_the_paid_call_keeps_the_number(
    small_disk: Path, start_app: StartApp, aiohttp_server: Any
) -> None:
    store_path = str(small_disk / "store.sqlite3")
    fake = FillingThuecodesim(small_disk)
    server: TestServer = await aiohttp_server(fake.app)
    options = thuecodesim.provider_options(str(server.make_url("")).rstrip("/"))
    config = parse_config(
        {
            "store": {"path": store_path},
            "currency": {"display": "RUB", "rates": {"VND": "0.004"}},
            "keys": [{"key": KEY, "alias": "t", "providers": ["tcs"]}],
            "providers": {"tcs": options},
        }
    )
    client = await start_app(config)
    engine = engine_of(client)
    _, _, body = await call(client, action="getNumber", service="tg", country=10)
    [request_id] = list(fake.orders)
    assert body == f"ACCESS_NUMBER:{FIRST_ID}:84{fake.orders[request_id].phone}"
    assert engine.store.problem == "database or disk is full"
    assert await engine.store.flush() == 1
    assert fake.filler is not None
    fake.filler.unlink()
    assert await engine.store.flush() == 0
    assert rows(store_path, "SELECT id, upstream_id FROM activations") == [
        (FIRST_ID, request_id)
    ]


def test_the_rooms_see_the_store_through_its_protocol() -> None:
    """SqliteStore implements every method of the Store protocol, signature for
    signature, so a second implementation has one list to follow."""
    import inspect

    from compat_server.store import Store

    wanted = {
        name: inspect.signature(member)
        for name, member in vars(Store).items()
        if callable(member) and not name.startswith("_")
    }
    assert wanted and "complete_purchase" in wanted
    for name, signature in wanted.items():
        assert inspect.signature(getattr(SqliteStore, name)) == signature, name
