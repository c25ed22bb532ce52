"""The compiled local step (``ndot_core.engine.compiled_step``) against the eager local and autograd steps.

Float64 models and data from ``test_local_step`` (the same tolerances: gradients within 1e-6 of the
largest entry of each parameter's gradient, logits, states and weights within 1e-9). Both kinds of
graphs run each comparison: ``shapes="buckets"`` (batches of 3 rows in the bucket of 4: the padding
row must leak into nothing) and ``shapes="dynamic"`` (a graph traced at 8 rows runs 3, then 5, as
they are). Steps with no labelled row run the compiled prediction graph. The rule x model matrix
compiles with dynamo's "eager" backend (the same traced graph, run by ATen: seconds); one test
compiles with inductor, the service's compiler (tens of seconds cold, a few with torch's on-disk
cache). All compiling tests carry the ``compile`` marker.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from test_local_step import (
    ATOL,
    MODELS,
    ONLINE,
    assert_grads_close,
    assert_states_close,
    capture_grads,
    make_data,
    make_model,
)

from ndot_core import OnlineLearner
from ndot_core.engine.compiled_step import BUCKETS, MAX_DYNAMIC_ROWS, bucket_for, compile_unavailable

BATCH = 3  # padded to the bucket of 4


def compiled_learner(
    model: str, backend="eager", buckets=(4,), shapes: str = "buckets", **options
) -> OnlineLearner:
    """A local-backend learner compiling inline (no thread) with ``backend``, ``shapes`` (``buckets``)."""
    learner = OnlineLearner(make_model(model), backend="local", compile="on", **options)
    assert learner.compiled is not None
    learner.compiled.backend, learner.compiled.background = backend, False
    learner.compiled.buckets, learner.compiled.shapes = tuple(buckets), shapes
    return learner


def run_against_references(
    model: str, compiled: OnlineLearner, steps: int = 6, batch: int = BATCH, **options
) -> None:
    """Step ``compiled``, a local and an autograd learner on the same data; compare everything."""
    ref = OnlineLearner(make_model(model), backend="autograd", **options)
    local = OnlineLearner(make_model(model), backend="local", **options)
    learners = {"autograd": ref, "local": local, "compiled": compiled}
    grads = {name: capture_grads(learner) for name, learner in learners.items()}
    states = {name: learner.new_state(batch) for name, learner in learners.items()}
    frames, labels = make_data(model, steps=steps, batch=batch)
    for x, y in zip(frames, labels, strict=True):
        logits = {name: learner.step(x, y, states[name]) for name, learner in learners.items()}
        learns = y is not None and bool((y >= 0).any())
        assert compiled.last_backend == "compiled"  # the learning graph, or the prediction graph
        for name in ("local", "compiled"):
            torch.testing.assert_close(logits[name], logits["autograd"], rtol=0, atol=ATOL)
            assert_states_close(states["autograd"], states[name])
            assert (learners[name].version, learners[name].pending_steps) == (ref.version, ref.pending_steps)
            if learns:
                torch.testing.assert_close(learners[name].last_loss, ref.last_loss, rtol=0, atol=ATOL)
    assert compiled.compiled.failure is None
    assert len(grads["compiled"]) == len(grads["autograd"]) == ref.version >= 2
    for got, want in zip(grads["compiled"], grads["autograd"], strict=True):
        assert_grads_close(got, want)
    silent = [n for n in grads["autograd"][0] if all(not g[n].any() for g in grads["autograd"])]
    assert not silent, f"no gradient ever reached {silent}: the comparison would be 0 == 0"
    for (name, p), q in zip(ref.model.named_parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=ATOL, msg=name)


@pytest.mark.compile
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("rule", ONLINE)
def test_compiled_graph_matches_local_and_autograd(rule: str, model: str) -> None:
    options = {"rule": rule, "optimizer": "adam", "lr": 0.05, "steps_per_sample": 2}
    run_against_references(model, compiled_learner(model, **options), **options)


@pytest.mark.compile
@pytest.mark.parametrize("model", list(MODELS))
def test_dynamic_graph_runs_every_batch_size_unpadded(model: str) -> None:
    """One graph per range of batch sizes runs each batch as it is: 3 and 5 rows (2-15), 17 (16-1024);
    one row has a graph of its own."""
    options = {"rule": "ndot", "optimizer": "adam", "lr": 0.05, "steps_per_sample": 2}
    compiled = compiled_learner(model, shapes="dynamic", **options)
    untrained = copy.deepcopy(compiled.state_dict())
    for batch in (3, 5, 17, 1):
        compiled.load_state_dict(untrained)  # the references start untrained: so does it (same graphs)
        run_against_references(model, compiled, batch=batch, **options)
    assert set(compiled.compiled.compile_seconds()) == {
        f"ndot_{kind}_{span}" for kind in ("step", "forward") for span in ("1", "2to15", "16to1024")
    }


@pytest.mark.compile
def test_inductor_compiled_step_matches_in_accumulate_mode() -> None:
    """The service's compiler (inductor) on stream_cnn, SGD, mode accumulate: its dynamic graphs."""
    if compile_unavailable("cpu"):
        pytest.skip(compile_unavailable("cpu"))
    options = {"rule": "ndot", "mode": "accumulate", "optimizer": "sgd", "lr": 0.05, "steps_per_sample": 2}
    compiled = compiled_learner("stream_cnn", backend="inductor", shapes="dynamic", **options)
    run_against_references("stream_cnn", compiled, steps=7, **options)
    assert set(compiled.compiled.compile_seconds()) == {"ndot_step_2to15", "ndot_forward_2to15"}


def test_bucket_choice() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert bucket_for(65) is None and bucket_for(3, (4, 2)) == 4
    assert tuple(sorted(BUCKETS)) == BUCKETS
    learner = OnlineLearner(make_model("mlp"), backend="local", compile="on")
    assert learner.compiled.shapes == "dynamic"  # the CPU default
    sizes = (1, 2, 3, 15, 16, 64, MAX_DYNAMIC_ROWS, MAX_DYNAMIC_ROWS + 1)
    assert [learner.compiled.graph_size(n) for n in sizes] == [
        (1, 1),
        (2, 2),
        (2, 3),
        (2, 15),
        (16, 16),
        (16, 64),
        (16, MAX_DYNAMIC_ROWS),
        None,
    ]
    learner.compiled.shapes = "buckets"
    assert [learner.compiled.graph_size(n) for n in (1, 3, 64, 65)] == [(1, 1), (4, 4), (64, 64), None]


def failing_backend(graph, example_inputs):
    raise RuntimeError("forced compiler failure")


@pytest.mark.compile
def test_a_compile_failure_warns_once_and_the_eager_step_serves(caplog) -> None:
    options = {"rule": "ndot", "optimizer": "adam", "lr": 0.05, "steps_per_sample": 2}
    compiled = compiled_learner("mlp", backend=failing_backend, **options)
    local = OnlineLearner(make_model("mlp"), backend="local", **options)
    states = (compiled.new_state(BATCH), local.new_state(BATCH))
    frames, labels = make_data("mlp", steps=5, batch=BATCH)
    with caplog.at_level(logging.WARNING, logger="ndot_core.engine.compiled_step"):
        for x, y in zip(frames, labels, strict=True):
            got, want = compiled.step(x, y, states[0]), local.step(x, y, states[1])
            assert compiled.last_backend == "local"
            assert torch.equal(got, want)
            assert_states_close(states[1], states[0], exact=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "forced compiler failure" in warnings[0].getMessage()
    assert "forced compiler failure" in compiled.compiled.failure
    for p, q in zip(local.model.parameters(), compiled.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.compile
def test_inputs_outside_the_guards_run_eagerly_instead_of_recompiling(caplog) -> None:
    options = {"rule": "ottt", "optimizer": "sgd", "lr": 0.05, "momentum": 0.0}
    compiled = compiled_learner("mlp", **options)
    state = compiled.new_state(BATCH)
    frames, _ = make_data("mlp", steps=3, batch=BATCH)
    labels = torch.tensor([0, 1, -1])
    compiled.step(frames[0], labels, state)
    assert compiled.last_backend == "compiled"
    compiled.model.readout.bias.requires_grad_(False)  # the graph's guards checked it: no longer hold
    local = OnlineLearner(make_model("mlp"), backend="local", **options)
    local.load_state_dict(compiled.state_dict())
    local.model.readout.bias.requires_grad_(False)
    local_state = state.clone()
    with caplog.at_level(logging.WARNING, logger="ndot_core.engine.compiled_step"):
        for x in frames[1:]:
            got = compiled.step(x, labels, state)
            assert compiled.last_backend == "local"
            assert torch.equal(got, local.step(x, labels, local_state))
    assert sum("outside its compiled graph" in r.getMessage() for r in caplog.records) == 1
    assert compiled.compiled.failure is None  # still on: other inputs may fit


@pytest.mark.compile
def test_background_compilation_serves_eagerly_until_its_bucket_is_ready() -> None:
    compiled = compiled_learner("mlp", rule="ndot")
    compiled.compiled.background = True
    state = compiled.new_state(BATCH)
    frames, _ = make_data("mlp", steps=3, batch=BATCH)
    labels = torch.tensor([2, -1, 0])
    compiled.step(frames[0], labels, state)
    assert compiled.last_backend == "local"  # the bucket compiles in a thread meanwhile
    compiled.compiled.wait(timeout=120)
    twin = copy.deepcopy(compiled)  # e.g. an oracle in the worker's tests: its own compiled step
    assert twin.compiled.local.model is twin.model and not twin.compiled.compile_seconds()
    twin_state = state.clone()
    compiled.step(frames[1], labels, state)
    assert compiled.last_backend == "compiled"
    twin.step(frames[1], labels, twin_state)
    assert twin.last_backend == "local"  # its bucket compiles now, in the background
    assert_states_close(state, twin_state)
    twin.compiled.wait(timeout=120)
    big = compiled.new_state(5)  # larger than every bucket (4): eager
    compiled.step(torch.zeros(5, *MODELS["mlp"][2], dtype=torch.float64), torch.zeros(5).long(), big)
    assert compiled.last_backend == "local"


def test_compile_modes() -> None:
    with pytest.raises(ValueError, match="unknown compile"):
        OnlineLearner(make_model("mlp"), backend="local", compile="yes")
    with pytest.raises(ValueError, match="needs the local backend"):
        OnlineLearner(make_model("mlp"), backend="autograd", compile="on")
    assert OnlineLearner(make_model("mlp"), backend="autograd", compile="auto").compiled is None
    assert OnlineLearner(make_model("mlp"), backend="local").compiled is None  # "off" by default
    auto = OnlineLearner(make_model("mlp"), backend="auto", compile="auto")
    assert (auto.compiled is None) == (compile_unavailable("cpu") is not None)


ACTIVE = [[1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]]


def step_active_by_hand(learner: OnlineLearner, x, y, state, active: torch.Tensor) -> torch.Tensor:
    """The reference of ``step(active=)``: the active rows selected, stepped, written back."""
    rows = active.nonzero().flatten()
    sub = state.select(rows)
    logits = learner.step(x[rows], None if y is None else y[rows], sub)
    state.assign(rows, sub)
    return logits


def assert_masked_steps_match(fast: OnlineLearner, model: str, options: dict) -> None:
    """``fast.step(active=)`` (one graph over the whole state) over ``ACTIVE``: inactive rows bit for bit
    as before (state, steps, readout sum); active rows, logits, losses and weights as the eager step of
    the active rows alone (a local learner with ``options``). The inactive rows' frames are NaN: the
    graph computes those rows too (then drops them), and not even a NaN there may reach the weights."""
    local = OnlineLearner(make_model(model), backend="local", device=fast.device, **options)
    states = fast.new_state(BATCH), local.new_state(BATCH)
    frames, labels = make_data(model, steps=len(ACTIVE), batch=BATCH)
    for x, y, mask in zip(frames, labels, ACTIVE, strict=True):
        x, y = x.to(fast.device), None if y is None else y.to(fast.device)
        active = torch.tensor(mask, dtype=torch.bool, device=fast.device)
        x = x.masked_fill(~active.view(-1, *[1] * (x.dim() - 1)), float("nan"))
        assert fast.steps_in_place(BATCH, learn=y is not None)
        before = states[0].clone()
        got = fast.step(x, y, states[0], active=active)
        assert fast.last_backend == "compiled"
        want = step_active_by_hand(local, x, y, states[1], active)
        torch.testing.assert_close(got[active], want, rtol=0, atol=ATOL)
        assert_states_close(states[1], states[0])
        inactive = (~active).nonzero().flatten()
        assert_states_close(before.select(inactive), states[0].select(inactive), exact=True)
        assert (fast.version, fast.pending_steps) == (local.version, local.pending_steps)
    assert fast.version >= 3
    for p, q in zip(local.model.parameters(), fast.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=ATOL)


@pytest.mark.compile
@pytest.mark.parametrize("shapes", ["buckets", "dynamic"])
@pytest.mark.parametrize("model", list(MODELS))
def test_a_masked_compiled_step_leaves_inactive_rows_exactly_and_learns_as_the_active_rows(
    model: str, shapes: str
) -> None:
    """``step(active=)`` in one compiled graph (``assert_masked_steps_match``)."""
    options = {"rule": "ndot", "optimizer": "adam", "lr": 0.05, "steps_per_sample": 2}
    assert_masked_steps_match(compiled_learner(model, shapes=shapes, **options), model, options)


@pytest.mark.parametrize("backend", ["autograd", "local"])
def test_a_masked_step_without_its_graph_selects_the_active_rows(backend: str) -> None:
    """No compiled graph: ``step(active=)`` is exactly the active rows selected, stepped, written back."""
    options = {"rule": "ndot", "optimizer": "adam", "lr": 0.05, "steps_per_sample": 2}
    learners = [OnlineLearner(make_model("mlp"), backend=backend, **options) for _ in range(2)]
    states = [learner.new_state(BATCH) for learner in learners]
    frames, labels = make_data("mlp", steps=len(ACTIVE), batch=BATCH)
    for x, y, mask in zip(frames, labels, ACTIVE, strict=True):
        active = torch.tensor(mask, dtype=torch.bool)
        assert not learners[0].steps_in_place(BATCH, learn=True)
        got = learners[0].step(x, y, states[0], active=active)
        want = step_active_by_hand(learners[1], x, y, states[1], active)
        assert torch.equal(got[active], want)
        assert_states_close(states[1], states[0], exact=True)
    for p, q in zip(learners[1].model.parameters(), learners[0].model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="active has shape"):
        learners[0].step(frames[0], None, states[0], active=torch.ones(BATCH + 1, dtype=torch.bool))
