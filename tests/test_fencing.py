"""Fencing tokens on the real Redis: a zombie worker group can neither ack nor commit a checkpoint.

Every worker group takes a token higher than any before (``INCR <stream>:epoch``) and writes it into
its shards' owner keys; a shard's acks (plain, in a round, with a dead letter) run only while the owner
key holds the acking group's token, and rank 0 commits a round only while its token is the newest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch.distributed as dist
from service_support import free_port

from service.bus import BusFenced, RedisStreamBus
from service.settings import Settings
from service.worker.checkpoints import CheckpointError
from service.worker.cluster import ClusterConfig
from service.worker.cluster_checkpoints import COMMITTED, committed_rounds, round_dir, save_round
from service.worker.cluster_member import ClusterMember

pytestmark = pytest.mark.redis
SHARDS = 4


@pytest.fixture
def stream(sharded_stream: str) -> str:
    return sharded_stream


def test_a_zombie_group_cannot_ack_what_a_newer_group_owns(redis_url: str, stream: str) -> None:
    async def scenario() -> None:
        old, new = (RedisStreamBus(redis_url, stream=stream, shards=SHARDS) for _ in range(2))
        for bus in (old, new):
            await bus.start()
        try:
            await old.claim_shards(1)
            ids = [await old.publish("events", f"cam-{i}", {"n": b"0"}) for i in range(8)]
            entries = await old.read("old", 100, 0)
            await old.ack([entries[0].id])  # still its shards: taken
            assert await old.pending_count() == 7
            await new.claim_shards(2)  # a newer group (after a restart) takes every shard over
            with pytest.raises(BusFenced, match="FENCED"):
                await old.ack([entries[1].id])
            with pytest.raises(BusFenced):
                await old.send_round([], [], 1.0, [entries[1].id])
            with pytest.raises(BusFenced, match="owned by token"):
                await old.dead_letter(entries[1], "zombie")
            assert await new.pending_count() == 7 and await new.dead_letters() == []  # nothing settled
            with pytest.raises(BusFenced, match="newer worker group"):
                await old.claim_shards(1)  # and it cannot take them back
            claimed = await new.claim_stale("new", 0, 100)
            await new.ack([e.id for e in claimed])
            assert await new.lag() == 0 and len(ids) == 8
        finally:
            for bus in (old, new):
                await bus.close()

    asyncio.run(scenario())


@pytest.fixture
def one_rank_group() -> Iterator[ClusterConfig]:
    config = ClusterConfig(0, 1, 0, "127.0.0.1", free_port(), agent_store=False)
    yield config
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_round_commit_with_a_stale_fencing_token_is_refused(
    redis_url: str, stream: str, tmp_path: Path, one_rank_group: ClusterConfig
) -> None:
    settings = Settings(redis_url=redis_url, bus_stream=stream, shards=SHARDS, checkpoint_dir=tmp_path)
    member = ClusterMember(one_rank_group, settings)
    owned, token = member.join(SHARDS)
    assert owned == list(range(SHARDS)) and token == 1 and member.fence_holds()
    tree = {"model_version": 3, "registry": {"streams": []}}
    base = member.checkpoint_dir()
    assert save_round(base, 1, 0, 1, SHARDS, tree, member.fence_holds) == "round-000000000001"
    assert [r for r, _ in committed_rounds(base)] == [1]

    raw = redis.Redis.from_url(redis_url)
    assert raw.incr(f"{stream}:epoch") == 2  # a newer group joined meanwhile
    raw.close()
    assert not member.fence_holds()
    with pytest.raises(CheckpointError, match="newer worker group holds the fencing token"):
        save_round(base, 2, 0, 1, SHARDS, tree, member.fence_holds)
    assert not (round_dir(base, 2) / COMMITTED).exists()
    assert [r for r, _ in committed_rounds(base)] == [1]  # a restart still finds round 1
