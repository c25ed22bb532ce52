"""Replay of recent sequences (``SequenceLimits.replay_recent``, service.worker.recent_replay) on a real
Batcher and learner: a learned sequence is kept, a later one queues a re-learn of it that learns its
frames again exactly as the learner would (batched with the new sequence's replay), the memory keeps
the newest sequences within its bytes, a busy lane skips its re-learn, the service's defaults turn it
on (2 lanes, 64 MiB), and with the setting off nothing is kept or learned twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from test_prequential import (
    WINDOW_US,
    assert_same_weights,
    frames_of,
    learn,
    packets_of,
    post_sequence,
    settings_for,
    settle,
    twin,
)
from test_worker import run as run_worker

from ndot_core import OnlineLearner
from service.bus import messages
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker.batcher import Batcher
from service.worker.model import build_batcher
from service.worker.recent_replay import RecentSequences, lane
from service.worker.sequences import SequenceLimits


def batcher_with(tmp_path: Path, **limits: int) -> Batcher:
    """The service's learner (its settings, seed and backend) behind a batcher with these limits."""
    learner = build_batcher(settings_for(tmp_path, max_stream_speed=0), ServiceMetrics()).learner
    return Batcher(
        learner, 4, WINDOW_US, ServiceMetrics(), learn_at="sequence", sequence_limits=SequenceLimits(**limits)
    )


def fresh_twin(tmp_path: Path) -> OnlineLearner:
    """A second learner with the same initial weights: the oracle."""
    return build_batcher(settings_for(tmp_path, max_stream_speed=0), ServiceMetrics()).learner


def push_sequence(batcher: Batcher, stream_id: str, bodies: list[bytes], label: int, tag: str) -> None:
    for i, body in enumerate(bodies):
        packet = messages.EventsPacket(body, 34, 34, label=label, start=i == 0, end=i == len(bodies) - 1)
        batcher.push_packet(f"{tag}{i}-0", stream_id, packet)


def learned_rows(batcher: Batcher) -> float:
    return batcher.metrics.registry.get_sample_value("ndot_steps_total", {"kind": "learn"}) or 0.0


def test_a_later_sequence_relearns_a_kept_one_exactly_as_the_learner_learns_its_frames(
    tmp_path: Path,
) -> None:
    batcher = batcher_with(tmp_path, replay_recent=1)
    first, second = packets_of(0, 2, seed=1), packets_of(0, 2, seed=7)
    frames_first, frames_second = frames_of(first), frames_of(second)
    assert len(frames_first) == len(frames_second)
    push_sequence(batcher, "a", first, label=3, tag="a")
    batcher.drain()  # live frames, then its replay: learned once, then kept
    recent = batcher.sequences.recent
    assert len(recent) == 1 and recent.relearned == 0  # nothing to re-learn before anything was kept
    push_sequence(batcher, "a", second, label=5, tag="b")
    while not batcher.sequences.replaying:  # up to the second sequence's end: its replay and a re-learn
        assert batcher.tick() > 0
    rows = batcher.sequences.rows()
    assert [(r.stream_id, r.label, r.again) for r in rows] == [("a", 5, False), (lane(0), 3, True)]
    batcher.drain()
    assert recent.relearned == 1 and len(recent) == 2 and not batcher.sequences.replaying
    assert learned_rows(batcher) == len(frames_first) * 3

    oracle = fresh_twin(tmp_path)
    learn(oracle, frames_first, 3)
    state = oracle.new_state(2)  # the new sequence's replay and the re-learn: one step, two rows
    for new, kept in zip(frames_second, frames_first, strict=True):
        oracle.step(torch.from_numpy(np.stack([new, kept])), torch.tensor([5, 3]), state)
    assert_same_weights(batcher.learner, oracle)
    assert batcher.learner.version == oracle.version


def test_the_service_replays_two_recent_sequences_from_64_mib_by_default(tmp_path: Path) -> None:
    settings, limits = Settings(redis_url=None, checkpoint_dir=tmp_path / "ckpt"), SequenceLimits()
    assert (settings.replay_recent, settings.replay_memory_bytes) == (2, 64 * 2**20)  # docs/accuracy.md
    assert (limits.replay_recent, limits.replay_memory_bytes) == (2, 64 * 2**20)
    recent = build_batcher(settings, ServiceMetrics()).sequences.recent
    assert recent is not None and recent.max_bytes == 64 * 2**20


def test_a_worker_with_the_defaults_counts_first_replays_and_relearns_apart_and_restarts_empty(
    tmp_path: Path,
) -> None:
    """``ndot_steps_total{kind="learn"}`` counts first replays and re-learns together; the stream's
    ``learned_sequences`` counts first replays only. The memory is not checkpointed: a worker restored
    from a checkpoint has the weights and an empty memory, so its first scored sequence re-learns none."""
    bodies = [packets_of(100 * k, 2, seed=40 + k) for k in range(4)]
    frames = len(frames_of(bodies[0]))
    assert all(len(frames_of(b)) == frames for b in bodies)

    async def scenario(bus, new_worker) -> None:
        first = await new_worker("w1")
        assert first.settings.replay_recent == 2  # the service's default
        for k in range(3):
            await post_sequence(bus, "a", bodies[k], label=k)
            await settle(first)
        recent = first.batcher.sequences.recent
        assert len(recent) == 3 and recent.relearned == 4  # sequence 1 had none to draw; 2 and 3: one a lane
        firsts, again = 3 * frames, recent.relearned * frames
        assert learned_rows(first.batcher) == firsts + again  # rows of first replays + rows of re-learns
        assert first.batcher.registry.get("a").info()["learned_sequences"] == 3  # re-learns not counted
        first.applier.save()

        second = await new_worker("w2")  # restores the checkpoint
        assert second.restored_from is not None and len(second.batcher.sequences.recent) == 0
        assert_same_weights(second.batcher.learner, twin(first))
        await post_sequence(bus, "a", bodies[3], label=3)
        await settle(second)
        assert second.batcher.sequences.recent.relearned == 0 and len(second.batcher.sequences.recent) == 1
        assert learned_rows(second.batcher) == frames  # its first replay only

    run_worker(tmp_path, scenario, learn_at="sequence")  # the service's other defaults: replay on


def test_without_replay_recent_nothing_is_kept_and_each_sequence_is_learned_once(tmp_path: Path) -> None:
    batcher = batcher_with(tmp_path, replay_recent=0)  # the setting off (the default is 2)
    assert batcher.sequences.recent is None
    frames = 0
    for k in range(3):
        bodies = packets_of(0, 2, seed=10 + k)
        frames += len(frames_of(bodies))
        push_sequence(batcher, "a", bodies, label=k, tag=f"s{k}-")
        batcher.drain()
    assert learned_rows(batcher) == frames


def test_the_memory_keeps_the_newest_sequences_within_its_bytes(tmp_path: Path) -> None:
    frame_bytes = 2 * 34 * 34 * 4
    bodies = [packets_of(0, 2, seed=20 + k) for k in range(4)]
    sequence_bytes = len(frames_of(bodies[0])) * frame_bytes
    bound = int(2.5 * sequence_bytes)
    batcher = batcher_with(tmp_path, replay_recent=1, replay_memory_bytes=bound)
    for k, sequence in enumerate(bodies):
        push_sequence(batcher, "a", sequence, label=k, tag=f"s{k}-")
        batcher.drain()
    recent = batcher.sequences.recent
    assert [kept.label for kept in recent.kept] == [2, 3]  # the two newest fit, older ones left
    assert recent.held_bytes == 2 * sequence_bytes <= bound

    memory = RecentSequences(max_bytes=sequence_bytes - 1)  # a sequence larger than the whole memory
    memory.keep(frames_of(bodies[0]), 0, None)
    assert len(memory) == 0 and memory.held_bytes == 0 and memory.draw() is None


def test_a_busy_lane_skips_its_relearn_so_the_extra_work_stays_bounded(tmp_path: Path) -> None:
    batcher = batcher_with(tmp_path, replay_recent=1)
    push_sequence(batcher, "a", packets_of(0, 2, seed=30), label=1, tag="k")
    batcher.drain()
    for stream_id, seed in (("a", 31), ("b", 32)):  # two sequences that end at the same tick
        push_sequence(batcher, stream_id, packets_of(0, 2, seed=seed), label=2, tag=stream_id)
    while not batcher.sequences.replaying:
        batcher.tick()
    recent = batcher.sequences.recent
    assert recent.relearned == 1 and recent.skipped == 1  # one lane: the second re-learn found it busy
    assert len(batcher.sequences.rows()) == 3  # the two new replays and one re-learn, one row each
    batcher.drain()
    assert len(recent) == 3


def test_a_model_reset_forgets_the_kept_sequences_and_their_queued_relearns(tmp_path: Path) -> None:
    batcher = batcher_with(tmp_path, replay_recent=2)
    push_sequence(batcher, "a", packets_of(0, 2, seed=1), label=3, tag="a")
    batcher.drain()
    push_sequence(batcher, "a", packets_of(0, 2, seed=7), label=5, tag="b")
    while not batcher.sequences.replaying:  # the second sequence ended: its replay and re-learns queued
        assert batcher.tick() > 0
    assert len(batcher.sequences.recent) == 1 and any(r.again for r in batcher.sequences.rows())
    batcher.reset_model(seed=0)
    assert len(batcher.sequences.recent) == 0 and batcher.sequences.recent.held_bytes == 0
    assert not any(r.again for r in batcher.sequences.rows())  # no re-learn of a pre-reset digit waits
    push_sequence(batcher, "a", packets_of(0, 2, seed=9), label=1, tag="c")
    batcher.drain()
    # b, scored before the reset, is still learned (by the fresh weights) and kept; a, learned by the
    # weights the reset dropped, is never drawn again
    assert [kept.label for kept in batcher.sequences.recent.kept] == [5, 1]
