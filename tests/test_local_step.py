"""The local backend (hand-written backward of the online step) against the autograd reference.

Tolerances, all in float64: weight gradients within 1e-6 *relative to the largest gradient entry of
the same parameter* (they agree to ~1e-13 in practice); logits, states and weights within 1e-9
absolute; bit-identical where both paths run the same ops (the first step with NCHW tensors, the
inference path).
"""

from __future__ import annotations

import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from torch import nn

from ndot_core import FTRLRegulariser, OnlineLearner, build_model
from ndot_core.engine.layers import Scale
from ndot_core.engine.local_plan import LocalBackendUnsupported, unsupported_reason
from ndot_core.engine.local_step import LocalStep
from ndot_core.engine.loss import ndot_loss, ndot_loss_grad
from ndot_core.engine.network import SpikingBlock, SpikingNetwork
from ndot_core.engine.neuron import LIFParameters
from ndot_core.engine.state import NetworkState

ONLINE = ("ndot", "ndot_reference", "ottt")
GRAD_RTOL = 1e-6  # relative to the largest entry of each parameter's gradient
ATOL = 1e-9  # logits, states, weights
MODELS = {  # name: (build_model arguments, frame shape)
    "stream_cnn": (("stream_cnn", 2, 4, (12, 12)), {"channels": (4, 6), "hidden": 8}, (2, 12, 12)),
    "mlp": (("mlp", 2, 4, (5, 5)), {"hidden": (12, 10)}, (2, 5, 5)),
    "vgg11_ws": (("vgg11_ws", 2, 4, (8, 8)), {"width": 1 / 16}, (2, 8, 8)),
}


def make_model(name: str, seed: int = 0, **options) -> SpikingNetwork:
    """A float64 model whose weights are large enough that every layer spikes."""
    args, defaults, _ = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(*args, **{**defaults, **options}).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model


def make_data(name: str, steps: int, batch: int, seed: int = 1) -> tuple[torch.Tensor, list]:
    """Frames [T, B, C, H, W] (2-valued events) and per-step labels mixing -1, all -1 and None."""
    gen = torch.Generator().manual_seed(seed)
    frames = (
        torch.rand(steps, batch, *MODELS[name][2], generator=gen, dtype=torch.float64) < 0.4
    ).double() * 2
    labels: list = []
    for _ in range(steps):
        y = torch.randint(0, 4, (batch,), generator=gen)
        y[torch.rand(batch, generator=gen) < 0.3] = -1
        labels.append(y)
    for t in (0, *range(3, steps)):
        labels[t][0] = t % 4  # at least one labelled row
    labels[1] = torch.full((batch,), -1)  # a step with no labelled row
    labels[2] = None  # pure inference
    return frames, labels


def learner_pair(
    name: str, backend_options: dict | None = None, **options
) -> tuple[OnlineLearner, OnlineLearner]:
    """The same model and settings on the autograd and the local backend."""

    def make(backend: str) -> OnlineLearner:
        return OnlineLearner(make_model(name, **(backend_options or {})), backend=backend, **options)

    return make("autograd"), make("local")


def capture_grads(learner: OnlineLearner) -> list[dict[str, torch.Tensor]]:
    """The gradients each optimizer step sees (an optimizer pre-hook records them)."""
    seen: list[dict[str, torch.Tensor]] = []
    names = {p: n for n, p in learner.model.named_parameters()}
    learner.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append({names[p]: p.grad.clone() for p in names if p.grad is not None})
    )
    return seen


def assert_grads_close(local: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert local.keys() == ref.keys()
    for name, g in ref.items():
        scale = float(g.abs().max())
        err = float((local[name] - g).abs().max())
        assert err <= GRAD_RTOL * scale + 1e-15, f"{name}: |diff| {err:.3e} vs max |grad| {scale:.3e}"


def assert_states_close(a: NetworkState, b: NetworkState, exact: bool = False) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        if exact or not ta[key].is_floating_point():
            assert torch.equal(ta[key], tb[key]), key
        else:
            torch.testing.assert_close(tb[key], ta[key], rtol=0, atol=ATOL, msg=key)


@pytest.mark.parametrize("mode", ["online", "accumulate"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("rule", ONLINE)
def test_local_backend_matches_autograd(rule: str, model: str, optimizer: str, mode: str) -> None:
    ref, local = learner_pair(model, rule=rule, mode=mode, optimizer=optimizer, lr=0.05, steps_per_sample=2)
    assert local.local is not None and ref.local is None
    ref_grads, local_grads = capture_grads(ref), capture_grads(local)
    frames, labels = make_data(model, steps=6, batch=3)
    ref_state, local_state = ref.new_state(3), local.new_state(3)
    for t, (x, y) in enumerate(zip(frames, labels, strict=True)):
        ref_logits = ref.step(x, y, ref_state)
        local_logits = local.step(x, y, local_state)
        assert local.last_backend == "local"
        if t == 0:  # same weights, same inputs: the same logits (the convolutions may sum in another order)
            torch.testing.assert_close(local_logits, ref_logits, rtol=0, atol=1e-13)
        torch.testing.assert_close(local_logits, ref_logits, rtol=0, atol=ATOL)
        assert not local_logits.requires_grad
        assert_states_close(ref_state, local_state)
        assert (local.version, local.pending_steps) == (ref.version, ref.pending_steps)
        torch.testing.assert_close(local.last_loss, ref.last_loss, rtol=0, atol=ATOL)
    assert ref.version >= 2 and len(ref_grads) == len(local_grads) == ref.version
    for local_g, ref_g in zip(local_grads, ref_grads, strict=True):
        assert_grads_close(local_g, ref_g)
    silent = [n for n in ref_grads[0] if all(not g[n].any() for g in ref_grads)]
    assert not silent, f"no gradient ever reached {silent}: the comparison would be 0 == 0"
    for (name, p), q in zip(ref.model.named_parameters(), local.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=ATOL, msg=name)
        assert not p.grad.any() if mode == "online" else True


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("rule", ONLINE)
def test_one_step_gradient_equals_autograd(rule: str, model: str) -> None:
    """LocalStep.backward vs autograd on the same weights and the same mid-sequence state, rows subset."""
    net = make_model(model, seed=3)
    frames, _ = make_data(model, steps=4, batch=4, seed=4)
    state = net.new_state(4)
    with torch.no_grad():
        for x in frames[:3]:
            net.step(x, state, rule)
    labels = torch.tensor([1, -1, 3, 0])
    rows = labels >= 0
    # autograd: model.step + loss.backward
    ref_state = state.clone()
    logits = net.step(frames[3], ref_state, rule, dropout_rows=rows)
    params = list(net.parameters())
    ref = torch.autograd.grad(ndot_loss(logits[rows], labels[rows], 0.2, 5), params)
    # local, NCHW: the forward runs the very same ops
    step = LocalStep(net, rule, memory_format=torch.contiguous_format)
    local_state = state.clone()
    local_logits, tape = step.forward(frames[3], local_state, rule, rows)
    assert torch.equal(local_logits, logits.detach())
    assert_states_close(ref_state.detach(), local_state, exact=True)
    grads = dict(step.backward(tape, ndot_loss_grad(local_logits[rows], labels[rows], 0.2, 5)))
    assert sum(float(g.abs().sum()) for g in ref) > 0
    for p, g in zip(params, ref, strict=True):
        assert_grads_close({"p": grads[p]}, {"p": g})


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_inference_steps_match_bit_for_bit_where_the_ops_are_the_same(memory_format) -> None:
    ref, local = learner_pair("stream_cnn")
    local.local = LocalStep(local.model, local.rule, memory_format=memory_format)
    frames, _ = make_data("stream_cnn", steps=5, batch=2)
    ref_state, local_state = ref.new_state(2), local.model.new_state(2)  # NCHW: converted on the way
    for x in frames:
        ref_logits = ref.step(x, None, ref_state)
        local_logits = local.step(x, torch.tensor([-1, -1]), local_state)
        exact = memory_format == torch.contiguous_format
        assert torch.equal(local_logits, ref_logits) if exact else torch.allclose(local_logits, ref_logits)
        assert_states_close(ref_state, local_state, exact=exact)
    assert local.version == 0 and all(p.grad is None for p in local.model.parameters())
    assert local_state.neurons[0].v.is_contiguous(memory_format=memory_format)


def test_dropout_regulariser_and_changing_batches_match_autograd() -> None:
    """Dropout masks (same RNG draws), the FTRL term, and rows selected/assigned as the service does."""
    ref, local = learner_pair("stream_cnn", {"dropout": 0.3}, optimizer="adam", lr=0.01, steps_per_sample=3)
    for learner in (ref, local):
        anchor = {k: v.detach() * 0.5 for k, v in learner.model.named_parameters()}
        learner.regulariser = FTRLRegulariser(anchor, rho=0.01, norm="l1")
    ref_grads, local_grads = capture_grads(ref), capture_grads(local)
    frames, _ = make_data("stream_cnn", steps=6, batch=4)
    states = {"ref": ref.new_state(4), "local": local.new_state(4)}
    for t, x in enumerate(frames):
        rows = torch.tensor([0, 2, 3]) if t % 2 else torch.tensor([1, 3])
        y = torch.tensor([1, -1, 2, 0])[rows]
        for name, learner in (("ref", ref), ("local", local)):
            torch.manual_seed(100 + t)  # the same dropout draws for both
            sub = states[name].select(rows)
            learner.step(x[rows], y, sub)
            states[name].assign(rows, sub)
        if t == 2:
            states["ref"].reset_rows([1])
            states["local"].reset_rows([1])
        assert_states_close(states["ref"], states["local"])
        torch.testing.assert_close(local.last_loss, ref.last_loss, rtol=0, atol=ATOL)
    assert states["local"].neurons[0].v.is_contiguous(memory_format=torch.channels_last)
    assert len(ref_grads) == len(local_grads) == 6
    for local_g, ref_g in zip(local_grads, ref_grads, strict=True):
        assert_grads_close(local_g, ref_g)


def test_learner_state_moves_between_backends() -> None:
    ref, local = learner_pair("stream_cnn", optimizer="adam", mode="accumulate", steps_per_sample=4)
    frames, labels = make_data("stream_cnn", steps=6, batch=2)
    state = local.new_state(2)
    for x, y in zip(frames[:4], labels[:4], strict=True):
        local.step(x, y, state)
    ref.load_state_dict(local.state_dict())
    assert ref.optimizer.param_groups[0]["fused"] is None and local.optimizer.param_groups[0]["fused"]
    plain = NetworkState.from_state_dict(state.state_dict())  # contiguous tensors
    for x, y in zip(frames[4:], labels[4:], strict=True):
        local.step(x, y, state)
        ref.step(x, y, plain)
    assert_states_close(plain, state)
    assert ref.version == local.version == 1
    for p, q in zip(ref.model.parameters(), local.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=ATOL)


def test_bptt_and_unsupported_models_fall_back_or_raise() -> None:
    with pytest.raises(LocalBackendUnsupported, match="bptt"):
        OnlineLearner(make_model("mlp"), rule="bptt", backend="local")
    assert OnlineLearner(make_model("mlp"), rule="bptt", backend="auto").local is None
    with pytest.raises(ValueError, match="unknown backend 'jit'"):
        OnlineLearner(make_model("mlp"), backend="jit")
    lif = LIFParameters()
    odd = SpikingNetwork(
        [SpikingBlock(nn.Linear(4, 5), lif, [Scale(2.0)])],  # a plain Linear, not a TraceLinear
        build_model("mlp", 1, 2, (2, 2)).readout.__class__(5, 2),
        name="odd",
        in_channels=1,
        num_classes=2,
        input_size=(2, 2),
        flatten_input=True,
    )
    assert "not a TraceConv2d or TraceLinear" in unsupported_reason(odd, "ndot")
    with pytest.raises(LocalBackendUnsupported, match="not a TraceConv2d"):
        OnlineLearner(odd, backend="local")
    assert OnlineLearner(odd, backend="auto").local is None
    pooled = make_model("stream_cnn")
    pooled.blocks[0].post[0] = nn.MaxPool2d(2)
    assert "MaxPool2d" in unsupported_reason(pooled, "ndot")


def test_forward_hooks_make_local_raise_and_auto_fall_back() -> None:
    frames, labels = make_data("stream_cnn", steps=4, batch=2)
    seen = []
    for backend in ("local", "auto"):
        learner = OnlineLearner(make_model("stream_cnn"), backend=backend)
        handle = learner.model.readout.register_forward_hook(lambda m, i, o: seen.append(o))
        state = learner.new_state(2)
        if backend == "local":
            with pytest.raises(LocalBackendUnsupported, match="readout"):
                learner.step(frames[0], labels[0], state)
            assert state.steps.tolist() == [0, 0]
        else:
            learner.step(frames[0], labels[0], state)
            assert learner.last_backend == "autograd" and len(seen) == 1
            handle.remove()
            learner.step(frames[1], labels[3], state)
            assert learner.last_backend == "local" and len(seen) == 1


def test_learn_sequence_runs_on_autograd_with_the_fused_optimizer() -> None:
    ref, local = learner_pair("mlp", optimizer="adam", lr=0.01, mode="online")
    frames, _ = make_data("mlp", steps=4, batch=3)
    labels = torch.tensor([0, -1, 3])
    assert local.learn_sequence(frames, labels) == pytest.approx(
        ref.learn_sequence(frames, labels), abs=1e-12
    )
    assert local.version == ref.version == 4
    for p, q in zip(ref.model.parameters(), local.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=ATOL)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_workspace_hands_out_the_first_rows_of_a_larger_buffer_and_replaces_a_smaller_one(
    memory_format,
) -> None:
    from ndot_core.engine.workspace import Workspace

    workspace, like = Workspace(), torch.zeros(1)
    large = workspace.get("pooled", (8, 4, 6, 6), like, memory_format)
    small = workspace.get("pooled", (3, 4, 6, 6), like, memory_format)
    assert small.shape == (3, 4, 6, 6) and small.data_ptr() == large.data_ptr()  # a view, no allocation
    assert small.is_contiguous(memory_format=memory_format)
    again = workspace.get("pooled", (8, 4, 6, 6), like, memory_format)
    assert again.data_ptr() == large.data_ptr()
    larger = workspace.get("pooled", (9, 4, 6, 6), like, memory_format)  # more rows: a new buffer
    other = workspace.get("pooled", (9, 4, 5, 5), like, memory_format)  # other trailing dims: a new buffer
    assert larger.shape == (9, 4, 6, 6) and other.shape == (9, 4, 5, 5)
    assert len({large.data_ptr(), larger.data_ptr(), other.data_ptr()}) == 3
    assert workspace.get("scalar", (), like, memory_format).shape == ()
