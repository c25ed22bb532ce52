"""Answers before learning (learn_at=sequence, ``answer_before_learning``): a round's replies are made
before any of its learning runs, the learning follows (in the worker: while the replies travel), and
it is the same learning, in the same order, as when each tick learns before the next."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from test_prequential import (
    assert_same_weights,
    frames_of,
    learn,
    packets_of,
    post_sequence,
    reply,
    run,
    settings_for,
    twin,
)

from service.bus import LocalBus, messages
from service.metrics import ServiceMetrics
from service.worker.model import build_batcher


def push_sequence(batcher, stream: str, bodies: list[bytes], label: int, first_id: int) -> list[str]:
    ids = []
    for i, body in enumerate(bodies):
        entry_id = f"{first_id + i}-0"
        packet = messages.EventsPacket(body, 34, 34, label=label, start=i == 0, end=i == len(bodies) - 1)
        batcher.push_packet(entry_id, stream, packet)
        ids.append(entry_id)
    return ids


def test_a_round_owes_its_replay_steps_until_its_answers_are_made(tmp_path: Path) -> None:
    batcher = build_batcher(settings_for(tmp_path, max_stream_speed=0), ServiceMetrics())
    first = packets_of(0, 2, seed=4)
    push_sequence(batcher, "a", first, label=3, first_id=0)
    batcher.drain(8)  # a sequence scored: its replay is queued
    assert batcher.replaying and batcher.learner.version == 0
    oracle = copy.deepcopy(batcher.learner)

    live = messages.EventsPacket(packets_of(100, 1, seed=9)[0], 34, 34, start=True)  # b's sequence goes on
    batcher.push_packet("10-0", "b", live)
    ids = ["10-0"]
    ticks = batcher.drain(8, answer_early=True)
    assert ticks >= 1 and batcher.take(ids[0]) is not None  # b's packet is done: its answer can go
    assert batcher.learner.version == 0 and batcher.replay_ticks_owed == ticks  # nothing learned yet
    (replay,) = [r for r in batcher.sequences.rows() if r.stream_id == "a"]
    assert replay.position == 0

    learned = batcher.learn_deferred()
    assert learned == ticks and batcher.learner.version == ticks and not batcher.learning_deferred
    assert replay.position == ticks
    state = oracle.new_state(1)  # the replay's rows, from the rest state a's sequence started from
    for frame in frames_of(first)[:ticks]:
        oracle.step(torch.from_numpy(frame)[None], torch.tensor([3]), state)
    assert_same_weights(batcher.learner, oracle)


def test_anything_that_touches_the_model_runs_the_owed_learning_first(tmp_path: Path) -> None:
    batcher = build_batcher(settings_for(tmp_path, max_stream_speed=0), ServiceMetrics())
    push_sequence(batcher, "a", packets_of(0, 2, seed=4), label=3, first_id=0)
    batcher.drain(8)
    push_sequence(batcher, "b", packets_of(100, 1, seed=9), label=5, first_id=10)
    owed = batcher.drain(8, answer_early=True)
    assert owed and batcher.learner.version == 0
    batcher.tick()  # a tick of its own (not deferred): the owed replay ticks run before its rows
    assert not batcher.learning_deferred and batcher.learner.version >= owed

    push_sequence(batcher, "b", packets_of(200, 1, seed=10), label=5, first_id=20)
    assert batcher.drain(8, answer_early=True) and batcher.learning_deferred
    version = batcher.learner.version
    batcher.snapshot()  # a checkpoint holds the learning its rounds answered for
    assert not batcher.learning_deferred and batcher.learner.version > version


def test_the_worker_answers_then_learns_and_learns_what_a_tick_by_tick_worker_learns(tmp_path: Path) -> None:
    sequences = [(packets_of(100 * k, 2, seed=k), k % 10) for k in range(3)]

    def final_weights(answer_first: bool):
        async def scenario(bus: LocalBus, new_worker):
            worker = await new_worker()
            start = twin(worker)
            for k, (bodies, label) in enumerate(sequences):
                ids = await post_sequence(bus, "a", bodies, label)
                entries = await bus.read(worker.consumer, 64, 0)
                applied = worker.applier.apply(entries, housekeeping=False)  # the round's thread half
                answered = {entry_id for entry_id, _ in applied.replies}
                assert set(ids) <= answered  # every packet of the round is answered...
                if answer_first and k:  # the previous sequence's replay rode along with this round's ticks
                    assert worker.batcher.learning_deferred  # ...before the round's replay steps ran
                assert not (not answer_first and worker.batcher.learning_deferred)
                await bus.send_round([], applied.replies, 60, applied.acks)
                assert (await reply(bus, ids[-1]))["sequence"]["label"] == label
                worker.applier.learn_deferred()
            await worker._handle([], drain=True)  # the last replays
            oracle = start  # every sequence learned from rest, in order, one row per step
            for bodies, label in sequences:
                learn(oracle, frames_of(bodies), label)
            assert_same_weights(worker.batcher.learner, oracle)
            return copy.deepcopy(worker.batcher.learner.model.state_dict())

        return run(
            tmp_path / str(answer_first), scenario, answer_before_learning=answer_first, max_stream_speed=0
        )

    first, tick_by_tick = final_weights(True), final_weights(False)
    for name, value in first.items():
        torch.testing.assert_close(value, tick_by_tick[name], rtol=0, atol=0, msg=name)
