"""The store's named leases: taken once per interval, free again after it."""

from __future__ import annotations

from pathlib import Path

from compat_server.store import SqliteStore


async def test_a_lease_is_taken_once_until_it_runs_out(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    try:
        assert await store.lease("poll:7", 3.0, 1000.0) is True
        assert await store.lease("poll:7", 3.0, 1001.0) is False
        assert await store.lease("poll:8", 3.0, 1001.0) is True
        assert await store.lease("poll:7", 3.0, 1003.0) is True
        assert await store.lease("poll:7", 3.0, 1004.0) is False
    finally:
        await store.close()
