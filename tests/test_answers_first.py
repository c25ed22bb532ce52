"""Answers before learning (``answer_before_learning``): a round's replies are made before its learning
runs, the learning follows (in the worker: while the replies travel), and it is the same learning, in
the same order, as when each tick learns before the next. learn_at=sequence: the round's replay step
(more while a stream's replays back up);
learn_at=step: the backward and optimizer step of the round's last tick (``OnlineLearner.step``
with ``defer_learning``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
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

from ndot_core import OnlineLearner, build_model
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

    learned = batcher.learn_deferred()  # one replay step for the round: a's replay is not backed up
    assert learned == 1 and batcher.learner.version == 1 and not batcher.learning_deferred
    assert replay.position == 1
    state = oracle.new_state(1)  # the replay's first row, from the rest state a's sequence started from
    oracle.step(torch.from_numpy(frames_of(first)[0])[None], torch.tensor([3]), state)
    assert_same_weights(batcher.learner, oracle)


def test_a_round_runs_its_owed_replay_steps_while_a_stream_s_replays_back_up(tmp_path: Path) -> None:
    batcher = build_batcher(settings_for(tmp_path, max_stream_speed=0), ServiceMetrics())
    for k in range(2):  # two sequences of a scored: the second replay waits behind the first
        push_sequence(batcher, "a", packets_of(10 * k, 2, seed=4 + k), label=3, first_id=10 * k)
        batcher.drain(8, answer_early=True)
        batcher.replay_ticks_owed = 0  # (those rounds owe nothing here: a's replays stay queued)
    assert batcher.sequences.backed_up() and batcher.learner.version == 0
    first, second = batcher.sequences.replays["a"]
    for i, body in enumerate(packets_of(100, 3, seed=9)):  # b's sequence goes on: several ticks owed
        batcher.push_packet(f"{100 + i}-0", "b", messages.EventsPacket(body, 34, 34, start=i == 0))
    ticks = batcher.drain(8, answer_early=True)
    assert ticks > 1 and batcher.replay_ticks_owed == ticks
    learned = batcher.learn_deferred()  # a's first replay steps once per owed tick while a's second waits
    steps = min(ticks, len(first.frames))  # (once the first is learned, a's replays no longer back up)
    assert learned == steps and batcher.learner.version == steps and second.position == 0
    assert first.position == steps


def test_anything_that_touches_the_model_runs_the_owed_learning_first(tmp_path: Path) -> None:
    batcher = build_batcher(settings_for(tmp_path, max_stream_speed=0), ServiceMetrics())
    push_sequence(batcher, "a", packets_of(0, 2, seed=4), label=3, first_id=0)
    batcher.drain(8)
    push_sequence(batcher, "b", packets_of(100, 1, seed=9), label=5, first_id=10)
    owed = batcher.drain(8, answer_early=True)
    assert owed and batcher.learner.version == 0
    batcher.tick()  # a tick of its own (not deferred): the round's owed replay step runs before its rows
    assert not batcher.learning_deferred and batcher.learner.version == 2  # (the owed step, then its own)

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


@pytest.mark.parametrize("backend", ["autograd", "local"])
def test_a_deferred_step_learns_exactly_what_a_step_learns_at_once(backend: str) -> None:
    """``step(defer_learning=True)``: the same logits now, no update until ``learn_pending`` (or the next
    step, or a read of the weights), then bit-identical weights, optimizer state and states."""

    def learner() -> OnlineLearner:
        torch.manual_seed(0)
        model = build_model("stream_cnn", in_channels=2, num_classes=10, input_size=(34, 34))
        return OnlineLearner(model, optimizer="adam", lr=1e-3, backend=backend)

    at_once, deferred = learner(), learner()
    states = at_once.new_state(3), deferred.new_state(3)
    generator = torch.Generator().manual_seed(1)
    for t in range(6):
        frames = (torch.rand(3, 2, 34, 34, generator=generator) < 0.2).float()
        labels = torch.tensor([t % 10, -1, 4])
        expected = at_once.step(frames, labels, states[0])
        got = deferred.step(frames, labels, states[1], defer_learning=True)
        assert deferred.last_backend == backend
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert deferred.learning_pending and deferred.version == at_once.version - 1
        if t % 2:  # else the next step runs it first
            assert deferred.learn_pending() and not deferred.learning_pending
    deferred.state_dict()  # reading the weights runs the pending learning
    assert deferred.version == at_once.version == 6
    for (name, mine), theirs in zip(
        deferred.model.state_dict().items(), at_once.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    for mine, theirs in zip(states[1].neurons, states[0].neurons, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(states[1].readout_sum, states[0].readout_sum, rtol=0, atol=0)


def test_learn_at_step_answers_a_round_before_its_last_learning_and_learns_the_same(tmp_path: Path) -> None:
    bodies = packets_of(0, 3, seed=5)

    def run_round(answer_early: bool):
        batcher = build_batcher(settings_for(tmp_path, learn_at="step", max_stream_speed=0), ServiceMetrics())
        ids = push_sequence(batcher, "a", bodies, label=7, first_id=0)
        ticks = batcher.drain(64, answer_early=answer_early)
        results = [batcher.take(entry_id) for entry_id in ids]
        assert all(result is not None for result in results)  # every packet answered
        steps = [step for result, _ in results for step in result]
        assert len(steps) == ticks and all(step["learned"] for step in steps)
        version_at_answer = batcher.learner.version
        if answer_early:  # the last tick's backward and optimizer step wait for learn_deferred
            assert batcher.learning_deferred and version_at_answer == ticks - 1
            assert steps[-1]["model_version"] == ticks - 1  # the version that made the prediction
            batcher.learn_deferred()
        assert not batcher.learning_deferred and batcher.learner.version == ticks
        return steps, batcher.learner.model.state_dict()

    (early_steps, early), (late_steps, late) = run_round(True), run_round(False)
    assert [s["predicted"] for s in early_steps] == [s["predicted"] for s in late_steps]
    for name, value in early.items():
        torch.testing.assert_close(value, late[name], rtol=0, atol=0, msg=name)


def test_learning_that_fails_after_the_answers_is_dropped_and_counted(tmp_path: Path) -> None:
    batcher = build_batcher(settings_for(tmp_path, learn_at="step", max_stream_speed=0), ServiceMetrics())
    ids = push_sequence(batcher, "a", packets_of(0, 2, seed=6), label=2, first_id=0)
    ticks = batcher.drain(64, answer_early=True)
    assert all(batcher.take(entry_id) is not None for entry_id in ids) and batcher.learning_deferred
    weights = copy.deepcopy(batcher.learner.model.state_dict())
    pending = batcher.learner._deferred

    def failing() -> None:  # the pending learning meets an error (e.g. out of memory on a device)
        raise RuntimeError("out of memory")

    batcher.learner._deferred = failing
    batcher.learn_deferred()  # logged and counted, never raised into the worker's round
    assert not batcher.learning_deferred and pending is not None
    assert batcher.metrics.registry.get_sample_value("ndot_learning_failures_total") == 1
    assert batcher.learner.version == ticks - 1
    for name, value in batcher.learner.model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=name)
