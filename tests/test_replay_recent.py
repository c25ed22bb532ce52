"""Replay of recent sequences (``SequenceLimits.replay_recent``, service.worker.recent_replay) on a real
Batcher and learner: a learned sequence is kept, a later one queues a re-learn of it that learns its
frames again exactly as the learner would (batched with the new sequence's replay), the memory keeps
the newest sequences within its bytes, a busy lane skips its re-learn, and with the setting off
nothing is kept or learned twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from test_prequential import WINDOW_US, assert_same_weights, frames_of, learn, packets_of, settings_for

from ndot_core import OnlineLearner
from service.bus import messages
from service.metrics import ServiceMetrics
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


def twin(tmp_path: Path) -> OnlineLearner:
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

    oracle = twin(tmp_path)
    learn(oracle, frames_first, 3)
    state = oracle.new_state(2)  # the new sequence's replay and the re-learn: one step, two rows
    for new, kept in zip(frames_second, frames_first, strict=True):
        oracle.step(torch.from_numpy(np.stack([new, kept])), torch.tensor([5, 3]), state)
    assert_same_weights(batcher.learner, oracle)
    assert batcher.learner.version == oracle.version


def test_without_replay_recent_nothing_is_kept_and_each_sequence_is_learned_once(tmp_path: Path) -> None:
    batcher = batcher_with(tmp_path)
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
