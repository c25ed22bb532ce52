"""Shards on the real Redis: streams spread by crc32, ids that name their shard, owned subsets, watermarks."""

from __future__ import annotations

import asyncio
import zlib

import pytest
import redis

from service.bus import BusEntry, BusInputError, LocalBus, RedisStreamBus
from service.bus.redis_lua import bytes_key
from service.bus.shards import (
    Watermark,
    qualify,
    shard_of,
    shard_stream_key,
    split_entry_id,
)

SHARDS = 8
STREAM_IDS = [f"cam-{i}" for i in range(12)]


def test_shard_of_is_crc32_mod_shards() -> None:
    assert shard_of("cam-1", 64) == zlib.crc32(b"cam-1") % 64 == 0  # 2865850432 = 64 * 44778913
    assert {shard_of(s, 1) for s in STREAM_IDS} == {0}
    assert len({shard_of(s, SHARDS) for s in STREAM_IDS}) > 3  # spread, not all in one


def test_shard_keys_carry_one_hash_tag() -> None:
    key = shard_stream_key("ndot:events", 17)
    assert key == "ndot:{17}:events"
    assert f"{key}:dead".count("{17}") == bytes_key(key).count("{17}") == 1  # one Redis Cluster slot


def test_ids_name_their_shard() -> None:
    assert qualify(3, "5-1", 1) == "5-1" and qualify(3, "5-1", 8) == "3/5-1"
    assert split_entry_id("3/5-1") == (3, "5-1") and split_entry_id("5-1") == (0, "5-1")
    for bad in ("x/5-1", "3/5", "3-1/5-1", "", "-1/5-1"):
        with pytest.raises(BusInputError):
            split_entry_id(bad)


def test_watermark_is_per_shard() -> None:
    mark = Watermark.of_ids(["1/10-0", "2/5-0", "1/7-3"])
    assert mark.covers("1/10-0") and mark.covers("1/9-9") and not mark.covers("1/10-1")
    assert mark.covers("2/5-0") and not mark.covers("2/6-0")
    assert not mark.covers("3/1-0"), "a shard never applied covers nothing"
    assert mark.as_dict() == {"1": "10-0", "2": "5-0"}
    assert Watermark.from_dict(mark.as_dict()) == mark
    unsharded = Watermark.of_ids(["4-0"])
    assert unsharded.covers("3-9") and unsharded.get(0) == "4-0"


@pytest.fixture
def stream(sharded_stream: str) -> str:
    return sharded_stream


def sharded(redis_url: str, stream: str, owned: list[int] | None = None) -> RedisStreamBus:
    return RedisStreamBus(redis_url, stream=stream, shards=SHARDS, owned=owned, max_lag=100)


async def publish_all(bus: RedisStreamBus) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {s: [] for s in STREAM_IDS}
    for n in range(3):
        for stream_id in STREAM_IDS:
            ids[stream_id].append(await bus.publish("events", stream_id, {"n": str(n).encode()}))
    return ids


def test_entries_go_to_their_shard_and_come_back_qualified(redis_url: str, stream: str) -> None:
    async def scenario() -> None:
        bus = sharded(redis_url, stream)
        await bus.start()
        try:
            ids = await publish_all(bus)
            raw = redis.Redis.from_url(redis_url)
            for stream_id, entry_ids in ids.items():
                shard = shard_of(stream_id, SHARDS)
                assert all(split_entry_id(e)[0] == shard for e in entry_ids)
                assert raw.xlen(shard_stream_key(stream, shard)) >= 3
            raw.close()
            read: list[BusEntry] = []
            while batch := await bus.read("w", 7, 0):
                read += batch
            assert sorted(e.id for e in read) == sorted(e for v in ids.values() for e in v)
            for stream_id in STREAM_IDS:  # each stream's entries in publish order
                mine = [e for e in read if e.stream_id == stream_id]
                assert [e.fields["n"] for e in mine] == [b"0", b"1", b"2"]
                assert [e.id for e in mine] == ids[stream_id]
            assert await bus.lag() == len(read) and await bus.pending_count() == len(read)
            await bus.send_round([], [], 1.0, [e.id for e in read[:5]])
            await bus.ack([e.id for e in read[5:]])
            assert await bus.lag() == 0
            with pytest.raises(BusInputError, match="names no shard"):
                await bus.ack(["5-0"])  # an unqualified id on a sharded bus
        finally:
            await bus.close()

    asyncio.run(scenario())


def test_owned_shards_partition_the_entries(redis_url: str, stream: str) -> None:
    async def scenario() -> None:
        producer = sharded(redis_url, stream)
        even, odd = (
            sharded(redis_url, stream, owned=[0, 2, 4, 6]),
            sharded(redis_url, stream, owned=[1, 3, 5, 7]),
        )
        for bus in (producer, even, odd):
            await bus.start()
        try:
            ids = await publish_all(producer)
            got_even = await even.read("rank0", 100, 0)
            got_odd = await odd.read("rank1", 100, 0)
            assert {split_entry_id(e.id)[0] % 2 for e in got_even} == {0}
            assert {split_entry_id(e.id)[0] % 2 for e in got_odd} == {1}
            assert len(got_even) + len(got_odd) == sum(len(v) for v in ids.values())
            assert await even.lag() == len(got_even) and await odd.lag() == len(got_odd)
            # replay one shard after an id; the newest id of a shard
            first = got_even[0]
            shard, _ = split_entry_id(first.id)
            history = await even.replay(None, 100, shard=shard)
            assert history[0].id == first.id and all(split_entry_id(e.id)[0] == shard for e in history)
            assert [e.id for e in await even.replay(first.id, 100)] == [e.id for e in history[1:]]
            assert await even.newest_id(shard) == history[-1].id
            # a dead worker's pending entries are claimed by whoever owns their shards
            claimed = await even.claim_stale("rank0-restarted", 0, 100)
            assert sorted(e.id for e in claimed) == sorted(e.id for e in got_even)
            assert all(e.deliveries == 2 for e in claimed)
            await even.dead_letter(claimed[0], "poisoned")
            letters = await producer.dead_letters()
            assert [e.fields["original_id"].decode() for e in letters] == [claimed[0].id]
            assert letters[0].id.startswith(f"{split_entry_id(claimed[0].id)[0]}/")
        finally:
            for bus in (producer, even, odd):
                await bus.close()

    asyncio.run(scenario())


def test_owned_must_be_shards_of_the_bus(redis_url: str, stream: str) -> None:
    with pytest.raises(ValueError, match="subset"):
        sharded(redis_url, stream, owned=[SHARDS])
    with pytest.raises(ValueError, match="shards must be"):
        RedisStreamBus(redis_url, stream=stream, shards=0)


def test_unsharded_buses_keep_plain_ids(redis_url: str, stream: str) -> None:
    async def scenario() -> None:
        bus = RedisStreamBus(redis_url, stream=stream)
        local = LocalBus()
        for each in (bus, local):
            await each.start()
            entry_id = await each.publish("events", "cam-1", {"n": b"0"})
            assert "/" not in entry_id and split_entry_id(entry_id) == (0, entry_id)
            assert await each.newest_id() == entry_id
            with pytest.raises(BusInputError):
                await each.replay(None, 10, shard=1)
            await each.close()

    asyncio.run(scenario())


def test_the_shard_count_is_recorded_and_a_mismatch_refused(redis_url: str, stream: str) -> None:
    async def scenario() -> None:
        first = sharded(redis_url, stream)
        await first.start()
        entry_id = await first.publish("events", "cam-1", {"n": b"0"})
        other = RedisStreamBus(redis_url, stream=stream, shards=4)
        with pytest.raises(ValueError, match=f"laid out in {SHARDS} shards.*NDOT_SHARDS={SHARDS}"):
            await other.start()
        tool = RedisStreamBus(redis_url, stream=stream, shards=None)  # takes the recorded layout
        await tool.start()
        assert tool.shards == SHARDS and await tool.lag() == 1
        assert [e.id for e in await tool.read("w", 10, 0)] == [entry_id]
        for bus in (first, other, tool):
            await bus.close()

    asyncio.run(scenario())
