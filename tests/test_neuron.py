"""LIF neuron: surrogate spike, soft reset, detached membrane, parameters."""

from __future__ import annotations

import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)

from ndot_core.engine.neuron import LIFParameters, LIFState, lif_step, spike

P = LIFParameters()


def run(currents: list[float], rule: str = "ndot", params: LIFParameters = P) -> dict[str, list[float]]:
    state = LIFState.zeros(1, (1,), "cpu", torch.float64)
    out: dict[str, list[float]] = {"u": [], "s": [], "v": []}
    for t, i in enumerate(currents):
        u = params.lam * state.v + i
        s, state = lif_step(
            torch.tensor([[i]], dtype=torch.float64), state, params, rule, torch.tensor([t == 0])
        )
        out["u"].append(float(u))
        out["s"].append(float(s))
        out["v"].append(float(state.v))
    return out


def test_surrogate_forward_is_heaviside_with_h0_equal_1() -> None:
    x = torch.tensor([-1.0, -1e-9, 0.0, 1e-9, 2.0])
    assert spike(x).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("alpha", [4.0, 2.0])
def test_surrogate_backward_is_sigmoid_derivative(alpha: float) -> None:
    x = torch.linspace(-2, 2, 9, dtype=torch.float64, requires_grad=True)
    spike(x, alpha).sum().backward()
    sig = torch.sigmoid(alpha * x.detach())
    torch.testing.assert_close(x.grad, alpha * sig * (1 - sig))
    assert x.grad[4] == pytest.approx(alpha / 4)  # peak at the threshold


def test_soft_reset_by_hand() -> None:
    # I = 0.6: u = 0.6, 0.9, 1.05 (spike, v = 0.05), 0.625, 0.9125, 1.05625 (spike)
    out = run([0.6] * 6)
    assert out["s"] == [0, 0, 1, 0, 0, 1]
    assert out["u"] == pytest.approx([0.6, 0.9, 1.05, 0.625, 0.9125, 1.05625])
    assert out["v"] == pytest.approx([0.6, 0.9, 0.05, 0.625, 0.9125, 0.05625])


def test_threshold_and_leak_are_configurable() -> None:
    # Vth 0.5, lam 0.25, I = 0.3, 0.6, 0.6: u = 0.3, 0.675 (spike), 0.64375 (spike)
    out = run([0.3, 0.6, 0.6], params=LIFParameters(v_threshold=0.5, lam=0.25))
    assert out["s"] == [0, 1, 1]
    assert out["v"] == pytest.approx([0.3, 0.175, 0.14375])


def test_online_rules_detach_the_membrane() -> None:
    current = torch.full((2, 3), 0.7, requires_grad=True)
    state = LIFState.zeros(2, (3,), "cpu", torch.float32)
    for rule in ("ndot", "ndot_reference", "ottt"):
        s, new = lif_step(current, state, P, rule, torch.tensor([True, True]))
        assert s.requires_grad
        assert all(not t.requires_grad for t in new), rule


def test_bptt_keeps_the_membrane_graph_with_reset_detached() -> None:
    i1 = torch.tensor([[1.5]], dtype=torch.float64, requires_grad=True)
    i2 = torch.tensor([[0.2]], dtype=torch.float64, requires_grad=True)
    state = LIFState.zeros(1, (1,), "cpu", torch.float64)
    s1, state = lif_step(i1, state, P, "bptt", torch.tensor([True]))
    assert float(s1.detach()) == 1.0
    _, state = lif_step(i2, state, P, "bptt", torch.tensor([False]))
    state.v.sum().backward()
    # v[2] = lam * (u[1] - Vth * sg(s[1])) + I[2]: dv2/dI1 = lam (reset detached), dv2/dI2 = 1
    assert float(i1.grad) == pytest.approx(P.lam)
    assert float(i2.grad) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [{"v_threshold": 0.0}, {"lam": 0.0}, {"lam": 1.5}, {"surrogate_alpha": -1.0}])
def test_bad_parameters_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        LIFParameters(**bad)


def test_unknown_rule_is_named() -> None:
    with pytest.raises(ValueError, match="'eprop'"):
        lif_step(
            torch.zeros(1, 1), LIFState.zeros(1, (1,), "cpu", torch.float32), P, "eprop", torch.tensor([True])
        )
