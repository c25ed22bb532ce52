"""One-pass trace-driven layers, weight standardization, post-ops on spikes and trace alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from torch import nn

from ndot_core.engine.layers import Scale, TraceConv2d, TraceLinear, standardize_weight
from ndot_core.engine.network import SpikingBlock
from ndot_core.engine.neuron import LIFParameters, LIFState

torch.manual_seed(0)


def two_op_reference(layer: TraceLinear | TraceConv2d, x: torch.Tensor, trace: torch.Tensor, g: torch.Tensor):
    """Autograd on op(x) for the input gradient, on op(trace) for the weight/gain/bias gradients."""
    params = [p for p in layer.parameters()]
    x = x.detach().requires_grad_(True)
    op = (
        F.linear
        if isinstance(layer, TraceLinear)
        else lambda a, w, b: F.conv2d(a, w, b, layer.stride, layer.padding)
    )
    (grad_x,) = torch.autograd.grad(op(x, layer.effective_weight(), layer.bias), x, g)
    grads = torch.autograd.grad(op(trace, layer.effective_weight(), layer.bias), params, g)
    return grad_x, grads


def make(kind: str, ws: bool, bias: bool, stride: int = 1):
    if kind == "linear":
        layer = TraceLinear(12, 5, bias=bias, weight_standardization=ws).double()
        shape = (4, 12)
    else:
        layer = TraceConv2d(3, 4, 3, stride=stride, padding=1, bias=bias, weight_standardization=ws).double()
        shape = (2, 3, 7, 7)
    x = (torch.rand(shape, dtype=torch.float64) < 0.4).double()
    trace = torch.rand(shape, dtype=torch.float64) * 2 - 0.5
    return layer, x, trace


def assert_one_pass_matches_reference(layer, x: torch.Tensor, trace: torch.Tensor) -> None:
    """One backward through ``layer(x, trace)`` gives the two-op reference's input and parameter grads."""
    x.requires_grad_(True)
    out = layer(x, trace)
    g = torch.randn_like(out)
    out.backward(g)
    ref_x, ref_params = two_op_reference(layer, x, trace, g)
    torch.testing.assert_close(x.grad, ref_x)
    for p, ref in zip(layer.parameters(), ref_params, strict=True):
        torch.testing.assert_close(p.grad, ref)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_one_pass_gradients_match_two_op_reference(kind: str, ws: bool, bias: bool) -> None:
    layer, x, trace = make(kind, ws, bias)
    assert_one_pass_matches_reference(layer, x, trace)
    assert layer.weight.grad.abs().sum() > 0
    if ws:
        assert layer.gain.grad.abs().sum() > 0


def test_strided_conv_one_pass_matches_reference() -> None:
    layer, x, trace = make("conv2d", ws=True, bias=True, stride=2)
    assert_one_pass_matches_reference(layer, x, trace)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_weight_gradient_really_comes_from_the_trace(kind: str) -> None:
    layer, x, trace = make(kind, ws=False, bias=False)
    layer(x, trace).sum().backward()
    from_trace = layer.weight.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()  # no trace: the plain op, weight gradient from the input
    assert not torch.allclose(from_trace, layer.weight.grad)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_forward_is_the_plain_op_on_spikes(kind: str) -> None:
    layer, x, trace = make(kind, ws=True, bias=True)
    torch.testing.assert_close(layer(x, trace), layer(x))
    w = layer.effective_weight()
    plain = F.linear(x, w, layer.bias) if kind == "linear" else F.conv2d(x, w, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), plain)


def test_scaled_weight_standardization() -> None:
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64) * 5 + 2
    gain = torch.full((6, 1, 1, 1), 2.0, dtype=torch.float64)
    w_hat = standardize_weight(w, gain)
    fan_in = 27
    torch.testing.assert_close(w_hat.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=torch.float64))
    # var * fan_in = gain^2 up to eps: (var*fan_in) / (var*fan_in + 1e-4) * 4
    ratio = w_hat.var(dim=(1, 2, 3)) * fan_in / 4
    assert ((ratio > 0.9999) & (ratio <= 1)).all()


def test_reset_parameters_restores_gain() -> None:
    layer = TraceConv2d(2, 3, 3, weight_standardization=True)
    with torch.no_grad():
        layer.gain.fill_(5.0)
    layer.reset_parameters()
    assert (layer.gain == 1).all()


def test_block_applies_mask_and_post_ops_to_spikes_and_trace_alike() -> None:
    lif = LIFParameters()
    block = SpikingBlock(
        TraceConv2d(2, 3, 3, padding=1), lif, [Scale(2.74), nn.AvgPool2d(2)], dropout=0.5
    ).double()
    state = LIFState.zeros(2, (3, 4, 4), "cpu", torch.float64)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64) * 4
    mask = (torch.rand(2, 3, 4, 4, dtype=torch.float64) < 0.5).double() * 2
    first = torch.tensor([True, True])
    out, out_trace, new = block(x, None, state, first, "ndot", mask)
    assert new.s.sum() > 0
    torch.testing.assert_close(out, F.avg_pool2d(new.s * mask * 2.74, 2))
    torch.testing.assert_close(out_trace, F.avg_pool2d(new.trace * mask * 2.74, 2))
    _, no_trace, _ = block(x, None, state, first, "bptt", mask)
    assert no_trace is None
