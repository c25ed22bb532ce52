"""The worker on the embedded bus: one batch per tick, sequence starts in order, per-stream reset,
LRU cap and TTL, claims, dead letters, and no step applied twice across a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ndot_core.events.layout import WIRE_DTYPE
from service.bus import LocalBus, messages
from service.settings import Settings
from service.worker.loop import Worker


def wire(t_us: list[int], seed: int = 0, size: int = 34) -> bytes:
    """Events at the given times on pseudo-random pixels of a size x size sensor."""
    rng = np.random.default_rng(seed)
    events = np.zeros(len(t_us), dtype=WIRE_DTYPE)
    events["t"] = t_us
    events["x"], events["y"] = rng.integers(0, size, len(t_us)), rng.integers(0, size, len(t_us))
    events["p"] = rng.integers(0, 2, len(t_us))
    return events.tobytes()


#: 2 closed 10 ms windows (0-10 ms, 10-20 ms) and an open one: exactly 2 frames.
TWO_FRAMES = list(range(0, 25_000, 250))


def run(
    tmp_path: Path,
    scenario: Callable[[LocalBus, Callable[..., Awaitable[Worker]]], Awaitable[Any]],
    **overrides: Any,
) -> Any:
    """Run ``scenario(bus, new_worker)`` on a fresh embedded bus; ``new_worker(consumer)`` starts a worker."""
    knobs = {
        "max_streams": 4,
        "checkpoint_interval_s": 0,
        "read_block_ms": 1,
        "window_us": 10_000,
        "learn_at": "step",  # these tests count per-step learning (learn_at=sequence: test_prequential.py)
        **overrides,
    }
    settings = Settings(redis_url=None, checkpoint_dir=tmp_path / "ckpt", **knobs)

    async def main() -> Any:
        bus = LocalBus(max_lag=1000)
        await bus.start()

        async def new_worker(consumer: str = "w1") -> Worker:
            worker = Worker(settings, bus, consumer=consumer)
            await worker.start()
            return worker

        try:
            return await scenario(bus, new_worker)
        finally:
            await bus.close()

    return asyncio.run(main())


async def post(bus: LocalBus, stream_id: str, events: bytes, label: int | None = None, **flags: bool) -> str:
    packet = messages.EventsPacket(
        events, 34, 34, label=label, start=flags.get("start", False), end=flags.get("end", False)
    )
    return await bus.publish(messages.EVENTS, stream_id, packet.to_fields())


async def reply(bus: LocalBus, entry_id: str) -> dict[str, Any]:
    payload = await bus.wait_reply(entry_id, 5)
    assert payload is not None, f"no reply for {entry_id}"
    return json.loads(payload)


def ticks(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value("ndot_step_duration_seconds_count")


def test_ready_streams_share_one_batched_step_per_tick(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        ids = [await post(bus, f"s{i}", wire(TWO_FRAMES, seed=i), label=i) for i in range(3)]
        await worker.run_once(block_ms=0)
        assert ticks(worker) == 2  # 3 streams x 2 frames in 2 batched steps, not 6
        for entry_id in ids:
            answer = await reply(bus, entry_id)
            assert [s["step"] for s in answer["steps"]] == [0, 1]
            assert all(s["learned"] and len(s["probabilities"]) == 10 for s in answer["steps"])
        assert worker.batcher.learner.version == 2
        assert await bus.pending_count() == 0  # acked after the replies

    run(tmp_path, scenario)


def test_a_row_in_a_batch_predicts_as_it_would_alone(tmp_path: Path) -> None:
    async def alone(bus: LocalBus, new_worker) -> list[dict]:
        worker = await new_worker()
        entry_id = await post(bus, "a", wire(TWO_FRAMES, seed=1))
        await worker.run_once(block_ms=0)
        return (await reply(bus, entry_id))["steps"]

    async def batched(bus: LocalBus, new_worker) -> list[dict]:
        worker = await new_worker()
        await post(bus, "b", wire(TWO_FRAMES, seed=2))
        entry_id = await post(bus, "a", wire(TWO_FRAMES, seed=1))
        await post(bus, "c", wire(TWO_FRAMES, seed=3))
        await worker.run_once(block_ms=0)
        assert ticks(worker) == 2
        return (await reply(bus, entry_id))["steps"]

    single, together = run(tmp_path / "1", alone), run(tmp_path / "2", batched)
    for one, other in zip(single, together, strict=True):
        assert one["predicted"] == other["predicted"]
        np.testing.assert_allclose(one["probabilities"], other["probabilities"], rtol=1e-5, atol=1e-7)


def test_a_start_flag_resets_the_stream_at_its_position_in_the_queue(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        first = await post(bus, "a", wire(TWO_FRAMES), start=True)
        later = [t + 100_000 for t in TWO_FRAMES]
        second = await post(bus, "a", wire(later), start=True)  # same pixels, a fresh sequence
        await worker.run_once(block_ms=0)  # both packets in one read
        one, two = (await reply(bus, first))["steps"], (await reply(bus, second))["steps"]
        assert [s["step"] for s in two] == [0, 1]
        for a, b in zip(one, two, strict=True):
            assert a["probabilities"] == b["probabilities"]
        assert worker.batcher.registry.get("a").sequences == 2

    run(tmp_path, scenario)


def test_resetting_one_stream_leaves_the_others_bit_identical(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        for name, seed in (("a", 1), ("b", 2)):
            await post(bus, name, wire(TWO_FRAMES, seed=seed), label=seed)
        await worker.run_once(block_ms=0)
        rows = {name: worker.batcher.registry.get(name).row for name in "ab"}
        before = {k: v[rows["b"]].clone() for k, v in worker.batcher.state.state_dict().items()}
        assert worker.batcher.state.steps[rows["a"]] == 2
        entry_id = await bus.publish(messages.RESET, "a", {})
        await worker.run_once(block_ms=0)
        assert (await reply(bus, entry_id))["ok"]
        after = worker.batcher.state.state_dict()
        for name, tensor in after.items():
            assert torch.equal(tensor[rows["b"]], before[name]), name
            assert not tensor[rows["a"]].any(), name

    run(tmp_path, scenario)


def test_the_live_stream_cap_evicts_the_least_recently_used_and_counts_it(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        for i, name in enumerate(["old", "mid", "new"]):
            await post(bus, name, wire(TWO_FRAMES, seed=i))
            await worker.run_once(block_ms=0)
        assert sorted(s.stream_id for s in worker.batcher.registry) == ["mid", "new"]
        assert worker.metrics.registry.get_sample_value("ndot_streams_evicted_total") == 1
        assert await bus.get_value(messages.sensor_key("ndot:events", "old")) is None
        assert await bus.get_value(messages.sensor_key("ndot:events", "new")) == b"34x34"

    run(tmp_path, scenario, max_streams=2)


def test_idle_streams_expire_after_their_ttl(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        await post(bus, "idle", wire(TWO_FRAMES))
        await worker.run_once(block_ms=0)
        assert "idle" in worker.batcher.registry
        await asyncio.sleep(1.1)  # past the TTL and the housekeeping interval
        await worker.run_once(block_ms=0)
        assert "idle" not in worker.batcher.registry
        assert await bus.get_value(messages.sensor_key("ndot:events", "idle")) is None
        status = json.loads(await bus.get_value(messages.status_key("ndot:events")))
        assert status["streams"] == []

    run(tmp_path, scenario, stream_ttl_s=0.5)


def test_entries_left_pending_by_a_dead_consumer_are_claimed_and_applied(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        entry_id = await post(bus, "a", wire(TWO_FRAMES), label=1)
        assert [e.id for e in await bus.read("dead", 10, 0)] == [entry_id]
        worker = await new_worker("w2")
        await worker._claim_and_apply(min_idle_ms=0)
        assert len((await reply(bus, entry_id))["steps"]) == 2
        assert await bus.pending_count() == 0

    run(tmp_path, scenario)


def test_after_a_crash_entries_the_checkpoint_covers_are_not_applied_twice(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        first = await new_worker("w1")
        entry_id = await post(bus, "a", wire(TWO_FRAMES), label=1)
        entries = await bus.read("w1", 10, 0)
        first.applier.apply(entries, housekeeping=False)  # applied and checkpointed ...
        first.applier.save()  # ... then the process dies before its reply and ack
        version = first.batcher.learner.version

        second = await new_worker("w2")  # restores the newest checkpoint
        await second._claim_and_apply(min_idle_ms=0)
        answer = await reply(bus, entry_id)
        assert answer["skipped"] and answer["steps"] == []
        assert second.batcher.learner.version == version == 2
        assert second.batcher.registry.get("a").steps == 2
        assert await bus.pending_count() == 0

    run(tmp_path, scenario)


def test_a_malformed_entry_is_dead_lettered_and_the_rest_applied(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        bad = await bus.publish(messages.EVENTS, "a", {"events": b"\x00" * 13})  # no sensor size
        good = await post(bus, "a", wire(TWO_FRAMES))
        await worker.run_once(block_ms=0)
        refused = await reply(bus, bad)
        assert not refused["ok"] and refused["status"] == 422 and "width" in refused["detail"]
        assert len((await reply(bus, good))["steps"]) == 2
        assert [e.fields["original_id"].decode() for e in await bus.dead_letters()] == [bad]
        assert (
            worker.metrics.registry.get_sample_value("ndot_packets_total", {"outcome": "dead_lettered"}) == 1
        )

    run(tmp_path, scenario)


def test_model_reset_gives_fresh_weights_and_rests_every_stream(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        initial = {k: v.clone() for k, v in worker.batcher.learner.model.state_dict().items()}
        await post(bus, "a", wire(TWO_FRAMES), label=2)
        await worker.run_once(block_ms=0)
        assert worker.batcher.learner.version == 2
        entry_id = await bus.publish(messages.MODEL_RESET, messages.MODEL_STREAM, {})
        await worker.run_once(block_ms=0)
        assert (await reply(bus, entry_id))["model_version"] == 0
        for name, tensor in worker.batcher.learner.model.state_dict().items():
            assert torch.equal(tensor, initial[name]), name  # same seed: the initial weights again
        assert not worker.batcher.state.readout_sum.any()

    run(tmp_path, scenario)


def test_a_restart_says_which_checkpoint_it_continues_from_and_fresh_starts_anew(
    tmp_path: Path, caplog
) -> None:
    """A second worker on the same checkpoint folder continues the first's model and logs the checkpoint's
    name; with ``restore_on_start=False`` (``ndot serve --fresh``) it starts from fresh weights."""

    async def scenario(bus: LocalBus, new_worker) -> None:
        first = await new_worker("w1")
        await post(bus, "a", wire(TWO_FRAMES), label=1)
        await first.run_once(block_ms=0)
        saved = first.applier.save()["name"]
        with caplog.at_level("INFO", logger="ndot.worker"):
            second = await new_worker("w2")
        assert second.restored_from == saved and second.batcher.learner.version == 2
        assert any(f"continuing from checkpoint {saved}" in r.getMessage() for r in caplog.records)

    run(tmp_path, scenario)

    async def fresh(bus: LocalBus, new_worker) -> None:
        worker = await new_worker("w3")
        assert worker.restored_from is None and worker.batcher.learner.version == 0

    run(tmp_path, fresh, restore_on_start=False)


def test_the_fresh_flag_turns_restore_off() -> None:
    from service.cli import build_parser, settings_from_args

    assert settings_from_args(build_parser().parse_args(["serve", "--fresh"])).restore_on_start is False
    assert settings_from_args(build_parser().parse_args(["worker"])).restore_on_start is True


def test_a_checkpoint_comes_before_the_bus_may_trim_applied_history_for_bytes(tmp_path: Path) -> None:
    """The bus trims applied entries past NDOT_BUS_MAX_BYTES; the worker checkpoints every half of it,
    so a restart's replay never needs an entry the byte budget dropped."""

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        await post(bus, "a", wire(list(range(0, 10_000, 250))))  # 40 events: 520 bytes of events
        await worker.run_once(block_ms=0)
        assert worker.checkpoints == []  # 520 + fields < 1000: not yet
        await post(bus, "a", wire(list(range(10_000, 20_000, 250))))
        await worker.run_once(block_ms=0)
        assert len(worker.checkpoints) == 1  # past half of bus_max_bytes=2000

    run(tmp_path, scenario, max_body_bytes=1000, bus_max_bytes=2000)


def _denormals_flushed() -> bool:
    """Whether this thread flushes denormal floats to zero (FTZ/DAZ): 1e-39 is a denormal float32."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0


def test_the_model_runs_in_threads_whose_denormals_follow_the_setting(tmp_path: Path) -> None:
    """``NDOT_FLUSH_DENORMALS``: every round's apply (framing, the learner's steps) runs in a thread with
    denormals flushed to zero (the default) or kept, whatever thread of the pool it lands on."""
    for flush in (True, False):

        async def scenario(bus: LocalBus, new_worker, flush: bool = flush) -> list[bool]:
            worker = await new_worker()
            apply, modes = worker.applier.apply, []

            def recording_apply(*args: Any, **kwargs: Any) -> Any:
                modes.append(_denormals_flushed())
                return apply(*args, **kwargs)

            worker.applier.apply = recording_apply
            for round_ in range(3):
                entry_id = await post(bus, f"s{round_}", wire(TWO_FRAMES, seed=round_), label=1)
                await worker.run_once(block_ms=0)
                assert len((await reply(bus, entry_id))["steps"]) == 2
            assert worker.batcher.learner.version == 6  # the steps ran, and learned, in those threads
            return modes

        modes = run(tmp_path / str(flush), scenario, flush_denormals=flush)
        assert modes == [flush] * 3
    assert not _denormals_flushed()  # the test's own thread was never touched
