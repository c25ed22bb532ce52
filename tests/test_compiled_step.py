"""The compiled local step (``ndot_core.engine.compiled_step``) against the eager local and autograd steps.

Float64 models and data from ``test_local_step`` (the same tolerances: gradients within 1e-6 of the
largest entry of each parameter's gradient, logits, states and weights within 1e-9). Batches of 3
rows run in the bucket of 4: every comparison also checks that the padding row leaks into nothing.
The rule x model matrix compiles with dynamo's "eager" backend (the same traced graph, run by
ATen: seconds); one test compiles with inductor, the service's compiler (tens of seconds cold, a few
with torch's on-disk cache). All compiling tests carry the ``compile`` marker.
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
from ndot_core.engine.compiled_step import BUCKETS, bucket_for, compile_unavailable

BATCH = 3  # padded to the bucket of 4


def compiled_learner(model: str, backend="eager", buckets=(4,), **options) -> OnlineLearner:
    """A local-backend learner compiling inline (no thread) with ``backend``, buckets ``buckets``."""
    learner = OnlineLearner(make_model(model), backend="local", compile="on", **options)
    assert learner.compiled is not None
    learner.compiled.backend, learner.compiled.background = backend, False
    learner.compiled.buckets = tuple(buckets)
    return learner


def run_against_references(model: str, compiled: OnlineLearner, steps: int = 6, **options) -> None:
    """Step ``compiled``, a local and an autograd learner on the same data; compare everything."""
    ref = OnlineLearner(make_model(model), backend="autograd", **options)
    local = OnlineLearner(make_model(model), backend="local", **options)
    learners = {"autograd": ref, "local": local, "compiled": compiled}
    grads = {name: capture_grads(learner) for name, learner in learners.items()}
    states = {name: learner.new_state(BATCH) for name, learner in learners.items()}
    frames, labels = make_data(model, steps=steps, batch=BATCH)
    for x, y in zip(frames, labels, strict=True):
        logits = {name: learner.step(x, y, states[name]) for name, learner in learners.items()}
        learns = y is not None and bool((y >= 0).any())
        assert compiled.last_backend == ("compiled" if learns else "local")
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
def test_inductor_compiled_step_matches_in_accumulate_mode() -> None:
    """The service's compiler (inductor) on stream_cnn, SGD, mode accumulate: one bucket of 4."""
    if compile_unavailable("cpu"):
        pytest.skip(compile_unavailable("cpu"))
    options = {"rule": "ndot", "mode": "accumulate", "optimizer": "sgd", "lr": 0.05, "steps_per_sample": 2}
    compiled = compiled_learner("stream_cnn", backend="inductor", **options)
    run_against_references("stream_cnn", compiled, steps=7, **options)
    assert set(compiled.compiled.compile_seconds()) == {4}


def test_bucket_choice() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert bucket_for(65) is None and bucket_for(3, (4, 2)) == 4
    assert tuple(sorted(BUCKETS)) == BUCKETS


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
