"""Per-stream keys do not grow without bound: removed on delete and expiry, a TTL tied to the stream TTL,
O(1) value operations on the embedded bus; ids strictly increasing when the wall clock steps back.
The contract tests run on both buses (LocalBus and RedisStreamBus on a real Redis)."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from pathlib import Path

import numpy as np
import redis
from bus_support import BusFactory

from ndot_core.events.layout import WIRE_DTYPE
from service.bus import Bus, LocalBus, RedisStreamBus, entry_id_key, messages
from service.settings import Settings
from service.worker.loop import Worker


def test_delete_value_removes_the_key(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        await bus.set_value("sensor:a", b"34x34", ttl_s=60)
        await bus.set_value("sensor:b", b"20x20")
        await bus.delete_value("sensor:a")
        await bus.delete_value("sensor:never-set")  # no error
        assert await bus.get_value("sensor:a") is None and await bus.get_value("sensor:b") == b"20x20"
        if isinstance(bus, LocalBus):
            assert "sensor:a" not in bus._values
        else:
            assert buses.raw.exists(f"{buses.stream}:value:sensor:a") == 0

    buses.run(scenario)


def test_newest_id_is_the_last_id_handed_out(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        assert await bus.newest_id() is None
        ids = [await bus.publish("events", "a", {}) for _ in range(3)]
        assert await bus.newest_id() == ids[-1]
        [entry] = await bus.read("c", 1, 0)
        await bus.ack([entry.id])
        assert await bus.newest_id() == ids[-1]  # reading and acking do not move it

    buses.run(scenario)


def test_local_values_are_o1_per_operation_and_expired_keys_go() -> None:
    async def scenario() -> None:
        bus = LocalBus()
        await bus.start()
        for i in range(10_000):  # 10k stream ids, each with a TTL
            await bus.set_value(f"sensor:{i}", b"34x34", ttl_s=60)
        started = time.perf_counter()
        for i in range(4_000):
            await bus.set_value(f"sensor:{i}", b"34x34", ttl_s=60)
            await bus.get_value(f"sensor:{i + 1}")
        took = time.perf_counter() - started
        print(f"took {took:.4f}")
        assert took < 0.4, f"{took:.3f} s for 4000 set+get at 10k keys: not O(1)"  # was ~0.4 ms per set
        for i in range(5_000):
            await bus.set_value(f"short:{i}", b"34x34", ttl_s=0.05)
        await asyncio.sleep(0.1)  # the short ones expired
        for i in range(3_000):  # each set sweeps a few expired keys away
            await bus.set_value(f"other:{i}", b"x")
        assert len(bus._values) == 10_000 + 3_000, len(bus._values)
        assert len(bus._value_expiry) <= 2 * len(bus._values) + 64  # no stale heap records piling up

    asyncio.run(scenario())


def test_local_ids_stay_strictly_increasing_when_the_clock_steps_back() -> None:
    now = 1_800_000_000_000
    readings = itertools.chain(
        [now, now + 5, now - 3_600_000, now - 3_600_000, now - 10], itertools.repeat(now + 6)
    )

    async def scenario() -> list[str]:
        bus = LocalBus(clock_ms=lambda: next(readings))
        await bus.start()
        return [await bus.publish("events", "a", {}) for _ in range(7)]

    ids = asyncio.run(scenario())
    keys = [entry_id_key(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), ids
    assert ids[:5] == [f"{now}-0", f"{now + 5}-0", f"{now + 5}-1", f"{now + 5}-2", f"{now + 5}-3"]
    assert ids[5] == f"{now + 6}-0"


def wire(count: int) -> bytes:
    events = np.zeros(count, dtype=WIRE_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = np.arange(count) * 250, 3, 4, 1
    return events.tobytes()


def test_the_worker_gives_sensor_keys_a_ttl_refreshes_them_and_removes_them(
    redis_url: str, tmp_path: Path
) -> None:
    """On Redis: a live stream's key has a TTL of 2 stream TTLs (+ slack) and outlives it while the stream
    is active; DELETE and expiry remove the key instead of writing an empty value."""
    stream = f"ndot-test:{uuid.uuid4().hex}"
    ttl_s = 0.5
    settings = Settings(
        redis_url=redis_url,
        bus_stream=stream,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_interval_s=0,
        read_block_ms=1,
        window_us=10_000,
        stream_ttl_s=ttl_s,
    )
    raw = redis.Redis.from_url(redis_url)

    def value_key(stream_id: str) -> str:
        return f"{stream}:value:{messages.sensor_key(stream, stream_id)}"

    async def post(bus: Bus, stream_id: str) -> None:
        packet = messages.EventsPacket(wire(20), 34, 34)
        await bus.publish(messages.EVENTS, stream_id, packet.to_fields())

    async def scenario() -> None:
        bus = RedisStreamBus(redis_url, stream=stream)
        await bus.start()
        try:
            worker = Worker(settings, bus, consumer="w1")
            await worker.start()
            for stream_id in ("gone", "kept", "idle"):
                await post(bus, stream_id)
            await worker.run_once(block_ms=0)
            limit_ms = messages.sensor_ttl_s(ttl_s) * 1000
            assert all(0 < raw.pttl(value_key(s)) <= limit_ms for s in ("gone", "kept", "idle"))
            await bus.publish(messages.DELETE, "gone", {})
            await worker.run_once(block_ms=0)
            assert raw.exists(value_key("gone")) == 0
            deadline = time.monotonic() + 2.5  # "kept" stays active, "idle" expires
            while time.monotonic() < deadline:
                await post(bus, "kept")
                await worker.run_once(block_ms=0)
                await asyncio.sleep(0.1)
            assert "idle" not in worker.batcher.registry and raw.exists(value_key("idle")) == 0  # expired
            assert "kept" in worker.batcher.registry and raw.get(value_key("kept")) == b"34x34"
            assert limit_ms - 1_500 < raw.pttl(value_key("kept")) <= limit_ms  # refreshed, not set once
        finally:
            await bus.close()

    try:
        asyncio.run(scenario())
    finally:
        keys = list(raw.scan_iter(match=f"{stream}*"))
        if keys:
            raw.delete(*keys)
        raw.close()
