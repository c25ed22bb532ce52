"""A worker round on the real Redis (``RedisStreamBus.send_round``: one script call, ``redis_lua.ROUND_LUA``).

Writes in order, acks last, so an entry is never acked before its reply is out; a fenced group's round
writes nothing; acks past the script's chunk of ids all land; a group gone with a Redis restart is no
error. (``tests/test_bus.py`` checks the contract on both buses, ``test_bus_refusals.py`` a Redis that
refuses writes.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis

from service.bus import BusCommandError, BusFenced, RedisStreamBus

pytestmark = pytest.mark.redis


def run(
    redis_url: str, stream: str, scenario: Callable[[RedisStreamBus], Awaitable[None]], shards: int = 1
) -> None:
    async def main() -> None:
        bus = RedisStreamBus(redis_url, stream=stream, shards=shards, max_lag=5000)
        await bus.start()
        try:
            await scenario(bus)
        finally:
            await bus.close()

    asyncio.run(main())


def test_a_round_acks_every_entry_past_the_script_s_chunk_of_ids(redis_url: str, sharded_stream: str) -> None:
    """2,500 entries over 2 shards, acked in one round with its replies and values (1,000 ids a chunk)."""

    async def scenario(bus: RedisStreamBus) -> None:
        for i in range(2500):
            await bus.publish("events", f"cam-{i % 7}", {"n": b"%d" % i})
        entries = [e for _ in range(3) for e in await bus.read("w", 2000, 0)]
        assert len(entries) == 2500 and await bus.pending_count() == 2500
        replies = [(e.id, b"r" + e.fields["n"]) for e in entries[:3]]
        await bus.send_round(
            [("status", b"s", None), ("beat", b"b", 5.0)], replies, 5.0, [e.id for e in entries]
        )
        assert await bus.pending_count() == 0
        assert [await bus.wait_reply(e.id, 1) for e in entries[:3]] == [b"r0", b"r1", b"r2"]
        assert await bus.get_values(["status", "beat"]) == [b"s", b"b"]

    run(redis_url, sharded_stream, scenario, shards=2)


def test_a_refused_write_ends_the_round_before_any_ack(redis_url: str, sharded_stream: str) -> None:
    """A reply key holding a string (RPUSH answers WRONGTYPE): the error comes back, the values before it
    are written, and no entry is acked (the round is sent again whole)."""

    async def scenario(bus: RedisStreamBus) -> None:
        ids = [await bus.publish("events", "cam", {}) for _ in range(3)]
        await bus.read("w", 10, 0)
        raw = redis.Redis.from_url(redis_url)
        raw.set(bus._reply_key(ids[1]), b"not a list")
        with pytest.raises(BusCommandError, match="WRONGTYPE"):
            await bus.send_round([("v", b"1", None)], [(i, b"r") for i in ids], 5.0, ids)
        assert await bus.pending_count() == 3
        assert await bus.get_value("v") == b"1" and await bus.wait_reply(ids[0], 0) == b"r"
        raw.delete(bus._reply_key(ids[1]))
        raw.close()
        await bus.send_round([], [(ids[1], b"r")], 5.0, ids)
        assert await bus.pending_count() == 0

    run(redis_url, sharded_stream, scenario)


def test_a_fenced_round_writes_nothing(redis_url: str, sharded_stream: str) -> None:
    """A group whose shards a newer group took: its round is refused before any value, reply or ack."""

    async def scenario(old: RedisStreamBus) -> None:
        await old.claim_shards(1)
        ids = [await old.publish("events", f"cam-{i}", {}) for i in range(4)]
        await old.read("w", 10, 0)
        new = RedisStreamBus(redis_url, stream=sharded_stream, shards=2)
        await new.start()
        try:
            await new.claim_shards(2)
            with pytest.raises(BusFenced, match="FENCED"):
                await old.send_round([("v", b"1", None)], [(ids[0], b"r")], 5.0, ids)
            assert await new.get_value("v") is None and await new.wait_reply(ids[0], 0) is None
            assert await new.pending_count() == 4
            await old.send_round([("v", b"1", None)], [(ids[0], b"r")], 5.0, [])  # no acks: no shard to fence
            assert await new.get_value("v") == b"1"
        finally:
            await new.close()

    run(redis_url, sharded_stream, scenario, shards=2)


def test_a_round_whose_group_is_gone_still_answers(redis_url: str, sharded_stream: str) -> None:
    """Acks of a group that is gone (Redis restarted without it): nothing is pending, the replies go out."""

    async def scenario(bus: RedisStreamBus) -> None:
        ids = [await bus.publish("events", "cam", {}) for _ in range(2)]
        await bus.read("w", 10, 0)
        raw = redis.Redis.from_url(redis_url)
        raw.xgroup_destroy(bus.shard_keys[0], bus.group)
        raw.close()
        await bus.send_round([], [(ids[0], b"r")], 5.0, ids)
        assert await bus.wait_reply(ids[0], 0) == b"r"

    run(redis_url, sharded_stream, scenario)
