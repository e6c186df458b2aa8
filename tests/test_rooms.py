"""The rooms handlers receive: bound once by the Engine, config swapped by a reload."""

from __future__ import annotations

from compat_server import ops
from compat_server.actions import Call
from compat_server.config import parse_config
from tests.conftest import StartApp, engine_of, sandbox_raw


async def test_reload_reaches_every_room_and_the_next_call(
    start_app: StartApp, store_path: str
) -> None:
    client = await start_app(parse_config(sandbox_raw(store_path)))
    engine = engine_of(client)
    before = Call.of(engine, engine.config.keys[0], {})
    raw = sandbox_raw(store_path)
    raw["activation"]["lifetime"] = 600
    new = parse_config(raw)
    ops.apply(engine, new, None)
    rooms = {
        "engine": engine, "upstreams": engine.upstreams, "prices": engine.prices,
        "router": engine.router, "outbox": engine.outbox, "lifecycle": engine.lifecycle,
        "reactivation": engine.reactivation, "reconciler": engine.reconciler,
        "rentals": engine.rentals, "webhooks": engine.webhooks,
    }  # fmt: skip
    assert {name: room.config is new for name, room in rooms.items()} == dict.fromkeys(
        rooms, True
    )
    after = Call.of(engine, new.keys[0], {})
    assert (before.config.lifetime, after.config.lifetime) == (1200, 600)
    # the rooms themselves are the app's own, shared by every call
    assert (after.lifecycle, after.reactivation, after.catalog, after.store) == (
        engine.lifecycle, engine.reactivation, engine.catalog, engine.store,
    )  # fmt: skip
