"""The CUDA graph step (``ndot_core.engine.graph_step``) against the eager local and autograd steps.

Without a GPU, ``GraphStep(capture=False)`` runs the same static buffers, copies, padding rows and
moves between states, calling the pure step where the graph would replay: everything but the
recording. Tolerances as in ``test_local_step``. The tests marked ``cuda`` record real CUDA graphs
(skipped where torch sees no GPU: ``pytest -m cuda`` on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from test_compiled_step import assert_masked_steps_match, run_against_references
from test_local_step import ATOL, MODELS, ONLINE, assert_states_close, make_data, make_model

from ndot_core import OnlineLearner
from ndot_core.engine.graph_step import GraphStep, graphs_unavailable

BATCH = 3  # in the bucket of 4: one padding row


def graph_learner(model: str, buckets=(1, 2, 4), device: str = "cpu", **options) -> OnlineLearner:
    """A local-backend learner whose fast step is a ``GraphStep``: recorded CUDA graphs on ``"cuda"``
    (``cuda_graphs="on"``), else the buffers unrecorded (``capture=False``)."""
    if device == "cuda":
        learner = OnlineLearner(
            make_model(model), backend="local", device=device, cuda_graphs="on", **options
        )
        assert isinstance(learner.compiled, GraphStep)
        learner.compiled.buckets = tuple(buckets)
        return learner
    learner = OnlineLearner(make_model(model), backend="local", **options)
    learner.compiled = GraphStep(
        learner.local, learner.rule, learner.alpha, learner.steps_per_sample, buckets, capture=False
    )
    return learner


#: CPU (buffers unrecorded) everywhere; CUDA (recorded graphs) where torch sees a GPU: pytest -m cuda
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(graphs_unavailable("cuda") is not None, reason="no CUDA device"),
        ],
    ),
]


def bucket_of(learner: OnlineLearner, learn: bool, size: int):
    return learner.compiled._buckets[(learn, size)]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("rule", ONLINE)
def test_graph_step_matches_local_and_autograd(rule: str, model: str) -> None:
    """Learning and prediction steps of 3 rows in the bucket of 4, Adam, NDOT_A over 2 steps."""
    options = {"rule": rule, "optimizer": "adam", "lr": 0.05, "steps_per_sample": 2}
    learner = graph_learner(model, **options)
    run_against_references(model, learner, **options)
    assert sorted(learner.compiled.graphs()) == ["forward_4", "step_4"]


def test_a_state_stays_in_its_bucket_between_steps() -> None:
    """The state a replay advanced is the bucket's buffers: the next step copies nothing in."""
    learner = graph_learner("mlp", rule="ndot", optimizer="sgd", lr=0.05)
    state = learner.new_state(BATCH)
    frames, _ = make_data("mlp", steps=3, batch=BATCH)
    labels = torch.tensor([0, 1, 2])
    first = learner.step(frames[0], labels, state)
    kept = first.clone()
    bucket = bucket_of(learner, True, 4)
    pointers = {t.data_ptr() for t in state.tensors().values()}
    assert pointers == {t.data_ptr() for t in (bucket.steps, bucket.readout_sum, *bucket.neurons)}
    for x in frames[1:]:
        learner.step(x, labels, state)
        assert {t.data_ptr() for t in state.tensors().values()} == pointers
    assert state.steps.tolist() == [3, 3, 3]
    # no autograd history in the buffers (as under capture): the step's gradients are computed by hand
    assert not any(t.requires_grad for t in (first, *state.tensors().values(), *bucket.neurons))
    assert torch.equal(first, kept)  # the logits a step returned are the caller's, not the next replay's
    assert bucket.steps[BATCH:].tolist() == [0]  # the padding row never stepped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["mlp", "stream_cnn"])
def test_two_states_on_one_bucket_each_step_as_alone(model: str, device: str) -> None:
    """Two tables alternate on the same graph (live rows, replays): the one in the buffers is moved out
    before the other comes in; both, the weights and the gradients follow the eager step exactly."""
    options = {"rule": "ndot", "optimizer": "adam", "lr": 0.05, "device": device}
    fast, eager = (
        graph_learner(model, **options),
        OnlineLearner(make_model(model), backend="local", **options),
    )
    sizes = {"a": 3, "b": 4}
    states = {name: (fast.new_state(n), eager.new_state(n)) for name, n in sizes.items()}
    data = {name: make_data(model, steps=4, batch=n, seed=2 + i) for i, (name, n) in enumerate(sizes.items())}
    for t in range(4):
        for name in ("a", "b"):
            x = data[name][0][t].to(device)
            y = torch.arange(sizes[name]) % 2
            got = fast.step(x, y, states[name][0])
            want = eager.step(x, y, states[name][1])
            assert fast.last_backend == "compiled"
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
            for other in states.values():  # the state moved out kept its values
                assert_states_close(other[1], other[0])
    bucket = bucket_of(fast, True, 4)
    assert states["b"][0].readout_sum.data_ptr() == bucket.readout_sum.data_ptr()
    assert states["a"][0].readout_sum.untyped_storage().data_ptr() != bucket.readout_sum.data_ptr()
    for p, q in zip(eager.model.parameters(), fast.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", list(MODELS))
def test_a_masked_graph_step_leaves_inactive_rows_exactly(model: str, device: str) -> None:
    """``step(active=)`` on the graph (``assert_masked_steps_match``)."""
    options = {"rule": "ndot", "optimizer": "adam", "lr": 0.05, "steps_per_sample": 2}
    assert_masked_steps_match(graph_learner(model, device=device, **options), model, options)


def test_held_gradients_survive_the_next_replay() -> None:
    """Gradients held across steps (``hold_updates``: ranks reduce them first) are the learner's own,
    not the graph's output buffers that the next replay overwrites."""
    options = {"rule": "ndot", "optimizer": "sgd", "lr": 0.05}
    fast, eager = (
        graph_learner("mlp", **options),
        OnlineLearner(make_model("mlp"), backend="local", **options),
    )
    fast.hold_updates = eager.hold_updates = True
    states = fast.new_state(BATCH), eager.new_state(BATCH)
    frames, _ = make_data("mlp", steps=3, batch=BATCH)
    for x in frames:
        fast.step(x, torch.tensor([0, 1, 2]), states[0])
        eager.step(x, torch.tensor([0, 1, 2]), states[1])
    for got, want in zip(fast.held_gradients(), eager.held_gradients(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_batches_past_the_largest_bucket_run_eagerly() -> None:
    learner = graph_learner("mlp", rule="ndot", optimizer="sgd", lr=0.05, buckets=(2,))
    state = learner.new_state(BATCH)
    frames, _ = make_data("mlp", steps=3, batch=BATCH)
    assert not learner.steps_in_place(BATCH, learn=True)
    learner.step(frames[0], torch.tensor([0, 1, 2]), state)
    assert learner.last_backend == "local" and learner.compiled.graphs() == []


def test_cuda_graph_modes() -> None:
    with pytest.raises(ValueError, match="unknown cuda_graphs"):
        OnlineLearner(make_model("mlp"), backend="local", cuda_graphs="yes")
    if graphs_unavailable("cpu") is not None:
        with pytest.raises(ValueError, match="need a CUDA device"):
            OnlineLearner(make_model("mlp"), backend="local", cuda_graphs="on")
    with pytest.raises(ValueError, match="needs the local backend"):
        OnlineLearner(make_model("mlp"), backend="autograd", device="cpu", cuda_graphs="on")
    assert OnlineLearner(make_model("mlp"), backend="local", cuda_graphs="auto").compiled is None  # (CPU)


def test_a_replay_writes_only_the_state_it_steps() -> None:
    """A ``narrow`` of a state held in the buffers, stepped: the state it came from keeps its values
    (moved out first), as on the eager step, which never writes into another state's tensors; then a
    third state on the same bucket leaves both as they were."""
    options = {"rule": "ndot", "optimizer": "sgd", "lr": 0.05}
    fast, eager = (
        graph_learner("mlp", **options),
        OnlineLearner(make_model("mlp"), backend="local", **options),
    )
    frames, _ = make_data("mlp", steps=3, batch=4, seed=5)
    tables = fast.new_state(4), eager.new_state(4)
    for learner, table in zip((fast, eager), tables, strict=True):
        learner.step(frames[0], torch.tensor([0, 1, 2, 3]), table)
    subs = [table.narrow(0, 3) for table in tables]
    others = fast.new_state(4), eager.new_state(4)
    for learner, sub, other in zip((fast, eager), subs, others, strict=True):
        learner.step(frames[1][:3], torch.tensor([1, 2, 3]), sub)
        learner.step(frames[2], torch.tensor([3, 2, 1, 0]), other)
    assert fast.last_backend == "compiled"
    for got, want in ((tables[0], tables[1]), (subs[0], subs[1]), (others[0], others[1])):
        assert_states_close(want, got)
    assert tables[0].steps.tolist() == [1, 1, 1, 1] and subs[0].steps.tolist() == [2, 2, 2]


def load_bench_gpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_gpu_benchmark_runs_its_cpu_check(tmp_path) -> None:
    """``benchmarks/bench_gpu.py --device cpu`` (the script ``device_check.sh`` runs on a GPU machine) runs
    through and writes its figures: a session lent a GPU finds it working."""
    import json

    bench = load_bench_gpu()
    out = tmp_path / "bench_gpu.json"
    args = ["--device", "cpu", "--batches", "1", "2", "--rounds", "1", "--iters", "2", "--out", str(out)]
    assert bench.main(args) == 0
    figures = json.loads(out.read_text())
    assert [row["batch"] for row in figures["rows"]] == [1, 2]
    assert all(row["graphs learn"] > 0 and row["eager predict"] > 0 for row in figures["rows"])
    assert figures["device"] == "cpu" and figures["goal"] == 1000
    assert set(figures["disagreement"]) == {"1", "2"}
    assert all(0 <= d <= bench.AGREEMENT_ATOL for d in figures["disagreement"].values())


def test_the_gpu_benchmark_times_nothing_for_graphs_that_do_not_step(tmp_path, monkeypatch) -> None:
    """A graph that replays nothing (e.g. captured on the wrong stream: empty) would time as a speed-up;
    the benchmark compares the graphs with the eager step first and stops (exit 1)."""
    bench = load_bench_gpu()
    recorded = GraphStep._new_bucket

    def stale_bucket(self, *args, **kwargs):  # the first call computes (the capture), replays do nothing
        bucket = recorded(self, *args, **kwargs)
        first = bucket.replay
        bucket.replay = lambda: None if bucket.outputs else first()
        return bucket

    monkeypatch.setattr(GraphStep, "_new_bucket", stale_bucket)
    args = [
        "--device",
        "cpu",
        "--batches",
        "2",
        "--rounds",
        "1",
        "--iters",
        "2",
        "--out",
        str(tmp_path / "b.json"),
    ]
    assert bench.main(args) == 1
    assert not (tmp_path / "b.json").exists()
