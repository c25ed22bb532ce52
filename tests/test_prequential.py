"""Test-then-train in the worker (learn_at=sequence), on the embedded bus with real workers and learners:
a sequence is scored before anything of it is learned, learned afterwards exactly as the learner learns
its frames from its start state, the stream's own row is never touched by the replay, memory is bounded,
late labels apply in bus order, bad labels are refused with a reason, and a checkpoint taken mid-sequence
still learns the whole sequence after a restart."""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from test_worker import run as run_worker

from ndot_core import NetworkState, OnlineLearner
from ndot_core.events.framing import StreamFramer
from ndot_core.events.layout import WIRE_DTYPE, events_from_bytes
from service.bus import LocalBus, messages
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker.loop import Worker
from service.worker.model import build_batcher

WINDOW_US = 10_000


def wire(t_us: list[int], seed: int = 0) -> bytes:
    """Events at the given times on pseudo-random pixels of a 34 x 34 sensor."""
    rng = np.random.default_rng(seed)
    events = np.zeros(len(t_us), dtype=WIRE_DTYPE)
    events["t"] = t_us
    events["x"], events["y"] = rng.integers(0, 34, len(t_us)), rng.integers(0, 34, len(t_us))
    events["p"] = rng.integers(0, 2, len(t_us))
    return events.tobytes()


def packets_of(first_ms: int, count: int, seed: int) -> list[bytes]:
    """``count`` packets of 25 ms of dense events each, from ``first_ms``."""
    return [
        wire(list(range((first_ms + 25 * k) * 1000, (first_ms + 25 * (k + 1)) * 1000, 200)), seed + k)
        for k in range(count)
    ]


def frames_of(bodies: list[bytes]) -> list[np.ndarray]:
    """The frames the worker makes of a sequence's packets (push each, flush at the end)."""
    framer = StreamFramer((34, 34), window_us=WINDOW_US, output_size=(34, 34))
    frames = []
    for body in bodies:
        frames += framer.push(events_from_bytes(body, (34, 34)))
    return frames + framer.flush()


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    knobs = {
        "learn_at": "sequence",
        "replay_recent": 0,  # the oracles: each sequence learned once (re-learns: test_replay_recent.py)
        "max_streams": 4,
        "checkpoint_interval_s": 0,
        "read_block_ms": 1,
        "window_us": WINDOW_US,
        **overrides,
    }
    return Settings(redis_url=None, checkpoint_dir=tmp_path / "ckpt", **knobs)


def run(
    tmp_path: Path,
    scenario: Callable[[LocalBus, Callable[..., Awaitable[Worker]]], Awaitable[Any]],
    **overrides: Any,
) -> Any:
    """``test_worker.run`` with ``learn_at=sequence`` (test-then-train) and no replay of recent sequences
    (the oracles here: each sequence learned once) unless overridden."""
    return run_worker(tmp_path, scenario, **{"learn_at": "sequence", "replay_recent": 0, **overrides})


async def post(bus: LocalBus, stream_id: str, body: bytes, label: int | None = None, **flags: bool) -> str:
    packet = messages.EventsPacket(
        body, 34, 34, label=label, start=flags.get("start", False), end=flags.get("end", False)
    )
    return await bus.publish(messages.EVENTS, stream_id, packet.to_fields())


async def post_sequence(
    bus: LocalBus, stream_id: str, bodies: list[bytes], label: int | None = None
) -> list[str]:
    """A whole sequence: start on the first packet, end on the last, ``label`` on every packet."""
    return [
        await post(bus, stream_id, body, label, start=i == 0, end=i == len(bodies) - 1)
        for i, body in enumerate(bodies)
    ]


async def label(bus: LocalBus, stream_id: str, value: int, sequence: int | str = "last") -> str:
    return await bus.publish(messages.LABEL, stream_id, messages.LabelRequest(value, sequence).to_fields())


async def reply(bus: LocalBus, entry_id: str) -> dict[str, Any]:
    payload = await bus.wait_reply(entry_id, 5)
    assert payload is not None, f"no reply for {entry_id}"
    return json.loads(payload)


async def settle(worker: Worker) -> None:
    """Apply what the bus holds and run every queued tick (replays included)."""
    await worker.run_once(block_ms=0)
    await worker._handle([], drain=True)


def twin(worker: Worker) -> OnlineLearner:
    """A learner like the worker's (same settings, backend, weights and optimizer state): the oracle."""
    learner = build_batcher(worker.settings, ServiceMetrics()).learner
    learner.load_state_dict(copy.deepcopy(worker.batcher.learner.state_dict()))
    return learner


def predict(learner: OnlineLearner, frames: list[np.ndarray], state=None):
    """Step ``frames`` unlabelled from ``state`` (rest by default): (prediction, probabilities, state)."""
    state = learner.new_state(1) if state is None else state
    for frame in frames:
        learner.step(torch.from_numpy(frame)[None], None, state)
    probabilities = torch.softmax(state.readout_sum[0] / state.steps[0], dim=0)
    return int(state.readout_sum[0].argmax()), probabilities.tolist(), state


def learn(learner: OnlineLearner, frames: list[np.ndarray], value: int) -> None:
    """What a replay must amount to: the frames from the resting state, each step learning ``value``."""
    state = learner.new_state(1)
    for frame in frames:
        learner.step(torch.from_numpy(frame)[None], torch.tensor([value]), state)


def assert_same_weights(learner: OnlineLearner, other: OnlineLearner) -> None:
    for (name, mine), theirs in zip(
        learner.model.state_dict().items(), other.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)


def sample(worker: Worker, name: str, labels: dict[str, str] | None = None) -> float | None:
    return worker.metrics.registry.get_sample_value(name, labels or {})


def test_a_sequence_is_scored_before_it_is_learned_then_learned_as_the_learner_learns_its_frames(
    tmp_path: Path,
) -> None:
    bodies = packets_of(0, 3, seed=1)
    frames = frames_of(bodies)

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        oracle, before = twin(worker), twin(worker)
        expected, probabilities, _ = predict(before, frames)

        ids = [await post(bus, "a", bodies[0], 7, start=True), await post(bus, "a", bodies[1], 7)]
        await worker.run_once(block_ms=0)
        assert worker.batcher.learner.version == 0  # the label is held: nothing learned mid-sequence
        assert_same_weights(worker.batcher.learner, before)
        steps = (await reply(bus, ids[0]))["steps"]
        assert steps and all(step["label"] == 7 and not step["learned"] for step in steps)

        end = await post(bus, "a", bodies[2], 7, end=True)
        await worker.run_once(block_ms=0)
        answer = await reply(bus, end)
        scored = answer["sequence"]
        assert scored["sequence"] == 1 and scored["label"] == 7 and scored["learning"] == "queued"
        assert scored["model_version"] == 0  # predicted by weights that learned nothing of it
        assert scored["predicted"] == expected and scored["correct"] == (expected == 7)
        np.testing.assert_allclose(scored["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
        assert answer["steps"][-1]["predicted"] == expected  # the last step's prediction is the one scored

        await worker._handle([], drain=True)  # the replay's ticks
        assert worker.batcher.learner.version == len(frames)
        learn(oracle, frames, 7)
        assert_same_weights(worker.batcher.learner, oracle)
        info = worker.batcher.registry.get("a").info()
        assert (info["scored_sequences"], info["learned_sequences"]) == (1, 1)
        assert info["prequential_accuracy"] == float(expected == 7)
        assert sample(worker, "ndot_prequential_accuracy") == float(expected == 7)
        assert sample(worker, "ndot_sequences_total", {"outcome": "learned"}) == 1
        assert sample(worker, "ndot_steps_total", {"kind": "learn"}) == len(frames)  # the replayed steps
        assert sample(worker, "ndot_steps_total", {"kind": "infer"}) == len(frames)  # the live ones

    run(tmp_path, scenario)


def test_a_late_label_scores_the_prediction_made_before_it_and_then_learns(tmp_path: Path) -> None:
    bodies = packets_of(0, 2, seed=3)
    frames = frames_of(bodies)

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        oracle = twin(worker)
        ids = await post_sequence(bus, "a", bodies)  # unlabelled
        await settle(worker)
        waiting = (await reply(bus, ids[-1]))["sequence"]
        assert waiting["label"] is None and waiting["learning"] == "awaiting_label"
        assert worker.batcher.learner.version == 0

        entry = await label(bus, "a", 2)
        await settle(worker)
        scored = (await reply(bus, entry))["sequence"]
        assert (
            scored["predicted"] == waiting["predicted"]
            and scored["probabilities"] == waiting["probabilities"]
        )
        assert (scored["label"], scored["correct"], scored["learning"]) == (
            2,
            waiting["predicted"] == 2,
            "queued",
        )
        await worker._handle([], drain=True)
        learn(oracle, frames, 2)
        assert_same_weights(worker.batcher.learner, oracle)

    async def before_the_end(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        first = await post(bus, "a", bodies[0], start=True)
        entry = await label(bus, "a", 5, sequence=1)  # the running sequence: held until it ends
        await worker.run_once(block_ms=0)
        assert worker.batcher.learner.version == 0 and await bus.wait_reply(entry, 0.05) is None
        end = await post(bus, "a", bodies[1], end=True)
        await settle(worker)
        assert (await reply(bus, first))["steps"]
        assert (await reply(bus, end))["sequence"]["label"] == 5
        assert (await reply(bus, entry))["sequence"]["label"] == 5
        assert worker.batcher.learner.version == len(frames)

    run(tmp_path / "1", scenario)
    run(tmp_path / "2", before_the_end)


def test_a_stream_carries_on_from_its_own_state_while_its_last_sequence_is_replayed(tmp_path: Path) -> None:
    first, second = packets_of(0, 2, seed=5), packets_of(100, 3, seed=9)
    second_frames = frames_of(second)

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        await post_sequence(bus, "a", first)
        opened = await post(bus, "a", second[0], start=True)  # sequence 2 begins, unlabelled
        await settle(worker)
        before_steps = (await reply(bus, opened))["steps"]
        batcher = worker.batcher
        row = batcher.registry.get("a").row
        held = {k: v[row].clone() for k, v in batcher.state.state_dict().items()}

        entry = await label(bus, "a", 4, sequence=1)  # learns sequence 1 ...
        await settle(worker)
        assert (await reply(bus, entry))["sequence"]["learning"] == "queued"
        assert batcher.learner.version == len(frames_of(first))
        row = batcher.registry.get("a").row
        for name, tensor in batcher.state.state_dict().items():  # ... on a row of its own
            assert torch.equal(tensor[row], held[name]), name

        oracle = twin(worker)  # the new weights, from the state the stream reached
        state = oracle.new_state(1)
        state.assign([0], batcher.state.select([row]))
        rest = [await post(bus, "a", second[1]), await post(bus, "a", second[2], end=True)]
        await settle(worker)
        steps = [s for entry in rest for s in (await reply(bus, entry))["steps"]]
        assert [s["step"] for s in steps] == list(range(len(before_steps), len(second_frames)))
        expected, probabilities, _ = predict(oracle, second_frames[len(before_steps) :], state)
        assert steps[-1]["predicted"] == expected
        np.testing.assert_allclose(steps[-1]["probabilities"], probabilities, rtol=1e-5, atol=1e-6)

    run(tmp_path, scenario)


@pytest.mark.parametrize("bound", ["frames", "bytes"])
def test_a_sequence_over_the_bound_is_scored_not_learned_and_counted(tmp_path: Path, bound: str) -> None:
    bodies = packets_of(0, 3, seed=2)  # 7 frames of 9248 bytes
    limit = {"frames": {"sequence_max_frames": 4}, "bytes": {"sequence_max_bytes": 5 * 9248}}[bound]

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        ids = await post_sequence(bus, "a", bodies, label=1)
        await settle(worker)
        scored = (await reply(bus, ids[-1]))["sequence"]
        assert scored["learning"] == "too_long" and scored["correct"] is not None
        assert worker.batcher.learner.version == 0 and not worker.batcher.replaying
        assert sample(worker, "ndot_sequences_total", {"outcome": "too_long"}) == 1
        assert sample(worker, "ndot_sequences_total", {"outcome": "scored"}) == 1
        book = worker.batcher.registry.get("a").book
        assert book.running.frames == [] and not book.ended  # nothing of it is held any more

    run(tmp_path, scenario, **limit)


def test_a_stream_holds_few_unlabelled_sequences_and_refuses_labels_that_cannot_apply(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        refused = {"no stream": await label(bus, "nobody", 1)}
        await post(bus, "a", wire([0, 5000]), start=True)  # sequence 1 runs; none ended yet
        refused["none ended"] = await label(bus, "a", 1)
        await worker.run_once(block_ms=0)
        for k in range(3):  # sequences 1..3, unlabelled: one is held (sequences_held=1) ...
            await post_sequence(bus, "a", packets_of(10 + 100 * k, 1, seed=k))
        await settle(worker)
        assert sample(worker, "ndot_sequences_total", {"outcome": "unlabelled"}) == 2  # ... and 1, 2 dropped
        refused |= {
            "out of range": await label(bus, "a", 10),
            "dropped": await label(bus, "a", 1, sequence=2),
            "not begun": await label(bus, "a", 1, sequence=9),
        }
        taken = await label(bus, "a", 3)  # the held one (sequence 4: the first packet made sequence 1)
        refused["twice"] = await label(bus, "a", 3, sequence=4)
        refused["malformed"] = await bus.publish(messages.LABEL, "a", {"label": b"x"})
        await settle(worker)
        assert (await reply(bus, taken))["sequence"]["sequence"] == 4
        answers = {name: await reply(bus, entry) for name, entry in refused.items()}
        assert {name: a.get("status") for name, a in answers.items()} == {
            "no stream": 404,
            "none ended": 409,
            "out of range": 422,
            "dropped": 409,
            "not begun": 409,
            "twice": 409,
            "malformed": 422,
        }
        assert (
            "no longer held" in answers["dropped"]["detail"]
            and "NDOT_SEQUENCES_HELD" in answers["dropped"]["detail"]
        )
        assert "has not begun" in answers["not begun"]["detail"]
        assert "labelled and scored already" in answers["twice"]["detail"]
        assert await bus.pending_count() == 0
        assert [e.fields["original_id"].decode() for e in await bus.dead_letters()] == [refused["malformed"]]

    run(tmp_path, scenario, sequences_held=1)


def test_a_label_needs_learn_at_sequence(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        ids = await post_sequence(bus, "a", packets_of(0, 1, seed=0), label=3)
        entry = await label(bus, "a", 3)
        await settle(worker)
        assert "sequence" not in await reply(bus, ids[-1])
        refused = await reply(bus, entry)
        assert refused["status"] == 409 and "NDOT_LEARN_AT=sequence" in refused["detail"]
        assert worker.batcher.learner.version > 0  # learned at each labelled step

    run(tmp_path, scenario, learn_at="step")


def test_a_sequence_running_at_a_checkpoint_is_learned_whole_after_a_restart(tmp_path: Path) -> None:
    bodies = packets_of(0, 4, seed=7)
    frames = frames_of(bodies)

    async def scenario(bus: LocalBus, new_worker) -> None:
        first = await new_worker("w1")
        oracle = twin(first)
        await post(bus, "a", bodies[0], 6, start=True)
        await post(bus, "a", bodies[1], 6)
        await settle(first)
        first.applier.save()  # mid-sequence: the checkpoint carries its frames and its label
        held = first.batcher.registry.get("a").book.running.frame_count

        second = await new_worker("w2")  # restores the checkpoint; the first worker is gone
        book = second.batcher.registry.get("a").book
        assert book.running.frame_count == held and book.running.label == 6
        await post(bus, "a", bodies[2], 6)
        end = await post(bus, "a", bodies[3], 6, end=True)
        await settle(second)
        assert (await reply(bus, end))["sequence"]["learning"] == "queued"
        await second._handle([], drain=True)
        assert second.batcher.learner.version == len(frames)
        learn(oracle, frames, 6)
        assert_same_weights(second.batcher.learner, oracle)

    run(tmp_path, scenario)


def test_the_prequential_gauge_averages_the_last_scored_sequences(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        assert np.isnan(sample(worker, "ndot_prequential_accuracy"))  # nothing scored yet
        outcomes = []
        for k in range(4):
            ids = await post_sequence(bus, f"s{k % 2}", packets_of(100 * k, 1, seed=k), label=k % 10)
            await settle(worker)
            outcomes.append((await reply(bus, ids[-1]))["sequence"]["correct"])
        assert sample(worker, "ndot_prequential_accuracy") == np.mean(outcomes[-3:])  # window of 3
        infos = {slot.stream_id: slot.info() for slot in worker.batcher.registry}
        assert infos["s0"]["prequential_accuracy"] == np.mean(outcomes[0::2])
        assert sum(info["scored_sequences"] for info in infos.values()) == 4

    run(tmp_path, scenario, prequential_window=3)


def test_replays_ride_along_with_live_ticks_and_run_alone_only_in_idle_rounds(tmp_path: Path) -> None:
    batcher = build_batcher(settings_for(tmp_path, max_stream_speed=0), ServiceMetrics())
    bodies = packets_of(0, 2, seed=4)
    for i, body in enumerate(bodies):
        packet = messages.EventsPacket(body, 34, 34, label=1, start=i == 0, end=i == len(bodies) - 1)
        batcher.push_packet(f"{i}-0", "a", packet)
    assert batcher.drain(8) == len(frames_of(bodies))  # the live frames; the replay is queued at the end
    (replay,) = batcher.sequences.rows()
    assert replay.position == 0 and batcher.wait_s() > 0  # the loop waits a little for packets first
    assert batcher.drain(8) == 0 and replay.position == 0  # a round with packets: no tick for replays alone
    assert batcher.drain(2, idle=True) == 2 and replay.position == 2  # an idle round runs them
    batcher.push_packet("9-0", "b", messages.EventsPacket(packets_of(0, 1, seed=8)[0], 34, 34, start=True))
    live = batcher.drain(8)
    assert live >= 1 and replay.position == 2 + live  # one replay row with every live tick
    assert batcher.learner.version == 2 + live


def test_replay_rows_stay_in_one_batch_and_a_failing_replay_is_dropped_while_the_others_learn_on(
    tmp_path: Path,
) -> None:
    batcher = build_batcher(settings_for(tmp_path, max_stream_speed=0, max_failures=2), ServiceMetrics())
    oracle = copy.deepcopy(batcher.learner)
    labels = {"a": 1, "b": 2, "c": 3}
    frames = {}
    for k, name in enumerate(labels):
        bodies = packets_of(100 * k, 2, seed=20 + k)
        frames[name] = frames_of(bodies)
        for i, body in enumerate(bodies):
            end = i == len(bodies) - 1
            packet = messages.EventsPacket(body, 34, 34, label=labels[name], start=i == 0, end=end)
            batcher.push_packet(f"{10 * k + i}-0", name, packet)
    batcher.drain(64)  # the live frames (a round with packets: replays ride along, none runs alone)
    while {r.stream_id for r in batcher.sequences.rows()} != set(labels):  # every replay queued, none begun
        assert batcher.learner.version == 0
        batcher.drain(64)
    assert all(r.position == 0 for r in batcher.sequences.rows()) and batcher.learner.version == 0
    (bad,) = [r for r in batcher.sequences.rows() if r.stream_id == "b"]
    bad.label = 99  # its learning step raises (a class the network does not have)

    batcher.drain()  # the first replay step fails: each row alone; b's fails twice and is dropped
    assert not batcher.replaying
    assert batcher.metrics.registry.get_sample_value("ndot_sequences_total", {"outcome": "failed"}) == 1
    # the oracle: a and c alone (the failed step changed nothing), then together, each from its own row
    states = {name: oracle.new_state(1) for name in ("a", "c")}
    for name in ("a", "c"):
        oracle.step(torch.from_numpy(frames[name][0])[None], torch.tensor([labels[name]]), states[name])
    for t in range(1, max(len(frames["a"]), len(frames["c"]))):
        going = [name for name in ("a", "c") if t < len(frames[name])]
        both = NetworkState.cat([states[name] for name in going])
        x = torch.stack([torch.from_numpy(frames[name][t]) for name in going])
        oracle.step(x, torch.tensor([labels[name] for name in going]), both)
        for i, name in enumerate(going):
            states[name] = both.narrow(i, 1)
    assert_same_weights(batcher.learner, oracle)
    assert batcher.metrics.registry.get_sample_value("ndot_sequences_total", {"outcome": "learned"}) == 2


def test_a_packet_with_a_label_outside_the_classes_is_refused_at_once(tmp_path: Path) -> None:
    """The API refuses it; one that bypasses the API is dead-lettered (422) before it is framed."""

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        bad = await post(bus, "a", packets_of(0, 1, seed=0)[0], 99, start=True, end=True)
        good = await post_sequence(bus, "a", packets_of(100, 1, seed=1), label=2)
        await settle(worker)
        refused = await reply(bus, bad)
        assert refused["status"] == 422 and "label 99 outside [0, 10)" in refused["detail"]
        assert (await reply(bus, good[-1]))["sequence"]["label"] == 2
        assert [e.fields["original_id"].decode() for e in await bus.dead_letters()] == [bad]

    run(tmp_path, scenario)


@pytest.mark.parametrize("fast", [pytest.param("compiled", marks=pytest.mark.compile), "graphs"])
def test_replays_on_the_fast_step_fill_the_holes_finished_ones_leave_and_learn_the_same(
    tmp_path: Path, fast: str
) -> None:
    """A sequence of 5 packets on "a" and of 8 on "b" .. "e", then a second one on "a": on the compiled
    step a's finished replay leaves an inactive hole in the replay rows (the others go on in place) that
    its next replay fills; the weights and scores come out as on the eager step, which gathers the rows.
    The same on the CUDA graph step (its buffers without a recording: ``GraphStep(capture=False)``),
    where the live table and the replay rows share buckets and the rows written into holes are its
    static buffers."""
    from ndot_core.engine.compiled_step import compile_unavailable
    from ndot_core.engine.graph_step import GraphStep

    if fast == "compiled" and compile_unavailable("cpu"):
        pytest.skip(compile_unavailable("cpu"))
    batchers = [
        build_batcher(
            settings_for(tmp_path / name, max_stream_speed=0, max_streams=8, **extra), ServiceMetrics()
        )
        for name, extra in (("fast", {"compile": "on"} if fast == "compiled" else {}), ("eager", {}))
    ]
    learner = batchers[0].learner
    if fast == "compiled":
        learner.compiled.backend, learner.compiled.background = "eager", False
    else:
        learner.compiled = GraphStep(
            learner.local, learner.rule, learner.alpha, learner.steps_per_sample, capture=False
        )
    batchers[1].learner.load_state_dict(batchers[0].learner.state_dict())
    layouts: list[list[str | None]] = []
    batch = batchers[0].sequences.batch

    def recording_batch(*args):
        layout, state = batch(*args)
        layouts.append([None if replay is None else replay.stream_id for replay in layout])
        return layout, state

    batchers[0].sequences.batch = recording_batch
    plan = [("a", 5, 1), ("b", 8, 2), ("c", 8, 3), ("d", 8, 0), ("e", 8, 1)]
    for batcher in batchers:
        for k, (name, count, label) in enumerate(plan):
            bodies = packets_of(100 * k, count, seed=30 + k)
            for i, body in enumerate(bodies):
                packet = messages.EventsPacket(body, 34, 34, label=label, start=i == 0, end=i == count - 1)
                batcher.push_packet(f"{10 * k + i}-0", name, packet)
        batcher.drain(64)  # the live frames: a's replay rides along, the others are queued at the end
        while any(replay.stream_id == "a" for replay in batcher.sequences.rows()):
            batcher.drain(1, idle=True)  # until a's replay finished, the others going on
        body = packets_of(500, 1, seed=40)[0]  # a second sequence on "a"
        batcher.push_packet("90-0", "a", messages.EventsPacket(body, 34, 34, label=0, start=True, end=True))
        while batcher.replaying or any(slot.pending for slot in batcher.registry):
            batcher.drain(64, idle=True)
    assert batchers[0].learner.last_backend == "compiled"
    changes = [layout for i, layout in enumerate(layouts) if i == 0 or layout != layouts[i - 1]]
    assert any(None in layout for layout in layouts), changes  # a hole stepped inactive
    assert any(
        None in before and "a" in after and after.index("a") == before.index(None)
        for before, after in zip(layouts, layouts[1:], strict=False)
    ), changes  # the second "a" replay took a hole
    assert batchers[0].learner.version == batchers[1].learner.version > 20
    for p, q in zip(
        batchers[1].learner.model.parameters(), batchers[0].learner.model.parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5)
    learned = [
        b.metrics.registry.get_sample_value("ndot_sequences_total", {"outcome": "learned"}) for b in batchers
    ]
    assert learned == [6, 6]
