"""Accumulated gradients of each rule checked against BPTT, against each other and by hand."""

from __future__ import annotations

import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)

from ndot_core import RULES, accumulated_gradients, build_model
from ndot_core.engine.network import SpikingNetwork
from ndot_core.engine.state import NetworkState

W2 = "blocks.1.weighted.weight"


def random_mlp(seed: int) -> SpikingNetwork:
    """A float64 mlp 1x4x4 -> 16 -> 12 -> 3 with weights large enough that both layers fire."""
    torch.manual_seed(seed)
    model = build_model("mlp", 1, 3, (4, 4), hidden=(16, 12)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.8)
    return model


def random_inputs(seed: int, steps: int, batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    frames = torch.rand(steps, batch, 1, 4, 4, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 3, (batch,), generator=gen)
    return frames, labels


@pytest.mark.parametrize("steps", [2, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_ottt_equals_bptt_for_the_second_hidden_weight(steps: int, seed: int) -> None:
    model = random_mlp(seed)
    frames, labels = random_inputs(seed, steps)
    ottt = accumulated_gradients(model, frames, labels, "ottt", alpha=0.3)
    bptt = accumulated_gradients(model, frames, labels, "bptt", alpha=0.3)
    assert ottt[W2].abs().sum() > 1e-3  # spikes flow: the check is not 0 == 0
    torch.testing.assert_close(ottt[W2], bptt[W2], rtol=1e-10, atol=1e-12)
    # ... and it is a property of that layer, not of the test: the first layer differs
    assert not torch.allclose(ottt["blocks.0.weighted.weight"], bptt["blocks.0.weighted.weight"])


@pytest.mark.parametrize("name", ["mlp", "stream_cnn"])
def test_single_step_gradients_are_identical_for_every_rule(name: str) -> None:
    if name == "mlp":
        model = random_mlp(3)
        frames, labels = random_inputs(3, steps=1)
    else:
        torch.manual_seed(3)
        model = build_model("stream_cnn", 2, 4, (12, 12), channels=(4, 6), hidden=8).double()
        frames = torch.rand(1, 3, 2, 12, 12, dtype=torch.float64) * 3
        labels = torch.tensor([0, 3, 1])
    grads = {rule: accumulated_gradients(model, frames, labels, rule) for rule in RULES}
    assert sum(g.abs().sum() for g in grads["ndot"].values()) > 0
    for rule in RULES[1:]:
        for name_, g in grads[rule].items():
            torch.testing.assert_close(g, grads["ndot"][name_], rtol=1e-10, atol=1e-12, msg=f"{rule} {name_}")


@pytest.mark.parametrize("steps", [3, 6])
def test_rules_differ_when_time_matters(steps: int) -> None:
    model = random_mlp(4)
    frames, labels = random_inputs(4, steps)
    grads = {rule: accumulated_gradients(model, frames, labels, rule)[W2] for rule in RULES}
    assert not torch.allclose(grads["ndot"], grads["ottt"])
    assert not torch.allclose(grads["ndot"], grads["ndot_reference"])


def test_ndot_weight_gradient_is_spatial_gradient_times_trace() -> None:
    """sum_t g_u2[t] (x) a_hat1[t], assembled by hand from hooks, equals accumulated_gradients."""
    model = random_mlp(5)
    frames, labels = random_inputs(5, steps=6)
    captured: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        captured["trace_in"] = inputs[1].detach()
        captured["current"] = output

    handle = model.blocks[1].weighted.register_forward_hook(hook)
    try:
        state: NetworkState = model.new_state(frames.shape[1])
        by_hand = torch.zeros_like(model.blocks[1].weighted.weight)
        for t in range(frames.shape[0]):
            logits = model.step(frames[t], state, "ndot")
            loss = torch.nn.functional.cross_entropy(
                logits, labels
            ) * 0.9 + 0.1 * torch.nn.functional.mse_loss(
                logits, torch.nn.functional.one_hot(labels, 3).double()
            )
            (g_u,) = torch.autograd.grad(loss / frames.shape[0], captured["current"])
            by_hand += g_u.t() @ captured["trace_in"]
            # the trace handed to layer 2 is layer 1's a_hat after this step
            torch.testing.assert_close(captured["trace_in"], state.neurons[0].trace)
    finally:
        handle.remove()
    engine = accumulated_gradients(model, frames, labels, "ndot", alpha=0.1)[W2]
    assert by_hand.abs().sum() > 0
    torch.testing.assert_close(engine, by_hand)


def test_accumulated_gradients_leave_the_model_untouched() -> None:
    model = random_mlp(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frames, labels = random_inputs(6, steps=4)
    for rule in RULES:
        accumulated_gradients(model, frames, labels, rule)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_accumulated_gradients_reject_all_unlabelled() -> None:
    model = random_mlp(7)
    frames, _ = random_inputs(7, steps=2)
    with pytest.raises(ValueError, match="no labelled row"):
        accumulated_gradients(model, frames, torch.full((5,), -1), "ndot")
    with pytest.raises(ValueError, match="label 7 at row 1"):
        accumulated_gradients(model, frames, torch.tensor([0, 7, 1, 1, 1]), "ndot")
