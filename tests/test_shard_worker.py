"""A worker on a sharded Redis bus: per-shard watermarks in checkpoints, recovery shard by shard.

Streams spread over 8 shards; a worker applies, checkpoints and dies; a second worker restores the
checkpoint and replays every shard's history after its mark: each stream's steps equal the frames
its packets make (nothing lost, nothing applied twice), and a tampered shard mark is refused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_checkpoint_integrity import tampered
from test_worker import TWO_FRAMES, post, wire

from service.bus import RedisStreamBus
from service.bus.shards import shard_of, split_entry_id
from service.settings import Settings
from service.worker.checkpoint_due import CheckpointDue
from service.worker.checkpoint_tree import validate_tree
from service.worker.checkpoints import CheckpointError, CheckpointStore
from service.worker.loop import Worker

SHARDS = 8
STREAMS = [f"cam-{i}" for i in range(6)]


@pytest.fixture
def stream(sharded_stream: str) -> str:
    return sharded_stream


def settings_for(redis_url: str, stream: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        bus_stream=stream,
        shards=SHARDS,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_interval_s=0,
        read_block_ms=1,
        window_us=10_000,
        max_streams=8,
    )


def new_bus(settings: Settings) -> RedisStreamBus:
    return RedisStreamBus(str(settings.redis_url), stream=settings.bus_stream, shards=settings.shards)


async def started(settings: Settings, consumer: str) -> tuple[RedisStreamBus, Worker]:
    bus = new_bus(settings)
    await bus.start()
    worker = Worker(settings, bus, consumer=consumer)
    await worker.start()
    return bus, worker


def test_streams_spread_over_shards(redis_url: str) -> None:
    assert len({shard_of(s, SHARDS) for s in STREAMS}) >= 3, "the test needs streams in several shards"


def test_a_restarted_worker_replays_every_shard_after_its_mark(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    settings = settings_for(redis_url, stream, tmp_path)

    async def scenario() -> None:
        bus, first = await started(settings, "w1")
        for i, name in enumerate(STREAMS):  # 2 frames each, checkpointed
            await post(bus, name, wire(TWO_FRAMES, seed=i), label=i % 10, start=True)
        while await first.run_once(block_ms=0):
            pass
        saved = first.applier.save()
        tree = CheckpointStore(settings.checkpoint_dir).load(saved["name"])
        assert tree["shards"] == SHARDS and tree["last_entry_id"] is None
        assert sorted(int(s) for s in tree["watermark"]) == sorted({shard_of(s, SHARDS) for s in STREAMS})
        # more packets: applied by the first worker (not checkpointed) or not read at all, then it dies
        later = [t + 20_000 for t in TWO_FRAMES]
        for i, name in enumerate(STREAMS):
            await post(bus, name, wire(later, seed=10 + i), label=i % 10)
        entries = await bus.read("w1", 3, 0)  # read, applied, never acked: the process dies
        first.applier.apply(entries, housekeeping=False, drain=True)
        await bus.close()

        bus, second = await started(settings, "w2")
        assert second.restored_from == saved["name"]
        assert second.applier.watermark.as_dict() == tree["watermark"]
        await second.recover()
        while await second.run_once(block_ms=0):
            pass
        steps = {slot.stream_id: slot.steps for slot in second.batcher.registry}
        assert steps == dict.fromkeys(STREAMS, 4), steps  # 2 + 2 frames each: none lost, none twice
        assert await bus.lag() == 0
        marks = second.applier.watermark
        newest = {shard: await bus.newest_id(shard) for shard in range(SHARDS)}
        for shard, entry_id in newest.items():
            if entry_id is not None:
                assert marks.get(shard) == split_entry_id(entry_id)[1]
        await bus.close()

    asyncio.run(scenario())


def test_a_sharded_checkpoint_tree_is_checked(redis_url: str, stream: str, tmp_path: Path) -> None:
    settings = settings_for(redis_url, stream, tmp_path)

    async def scenario() -> None:
        bus, worker = await started(settings, "w1")
        await post(bus, STREAMS[0], wire(TWO_FRAMES), label=1)
        await worker.run_once(block_ms=0)
        tree = CheckpointStore(settings.checkpoint_dir).load(worker.applier.save()["name"])
        learner, classes = worker.batcher.learner, settings.num_classes
        validate_tree(tree, learner, classes)
        shard = next(iter(tree["watermark"]))
        for path, value, message in [
            (f"watermark.{shard}", "12x", "entry id"),
            ("watermark", {str(SHARDS): "1-0"}, "below shards"),
            ("last_entry_id", "1-0", "expected null"),
            ("registry.streams.0.meta.last_entry_id", f"{shard}/99999999999999-0", "covered"),
        ]:
            with pytest.raises(CheckpointError, match=message):
                validate_tree(tampered(tree, path, value), learner, classes)
        await bus.close()

    asyncio.run(scenario())


def test_a_checkpoint_is_due_before_any_shard_could_trim_what_it_does_not_cover() -> None:
    settings = Settings(
        redis_url="redis://unused",
        bus_maxlen=800,
        bus_max_lag=50,
        checkpoint_max_entries=20_000,
        checkpoint_interval_s=0,
        bus_max_bytes=64 * 1024 * 1024,
        max_body_bytes=1024 * 1024,
    )
    due = CheckpointDue(settings, SHARDS)  # a shard keeps max(800 // 8, 2 * 50) = 100 entries
    assert due.max_entries == 50 and due.max_bytes == 4 * 1024 * 1024  # half of each shard's bound
    for n in range(49):
        due.count(f"3/{n + 1}-0", 10)
        due.count(f"{n % 3}/{n + 1}-1", 10)  # spread over shards 0-2: none near its bound
    assert not due.due() and due.applied == 98
    due.count("3/99-0", 10)  # shard 3's 50th entry since the last checkpoint
    assert due.due()
    due.saved()
    assert not due.due() and due.applied == 0
    due.count("5/1-0", 4 * 1024 * 1024)  # one shard's bytes: half its byte bound
    assert due.due()
