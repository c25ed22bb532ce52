"""Trace-driven weighted layers (Linear, Conv2d) computed in one pass, and weight standardization.

For a weighted layer fed by a neuron layer's spikes ``s`` with presynaptic trace ``a_hat``::

    forward:   I = op(s, W) + b
    backward:  dL/ds = op_input_grad(W, g)      (the usual input gradient)
               dL/dW = op_weight_grad(a_hat, g) (the trace replaces the input)
               dL/db = sum of g

One forward of ``op`` on the spikes; the backward calls the op's own backward kernel once with the
trace in place of the saved input. No doubled batch, no second forward. Without a trace (the first
layer, whose input is data, or under ``bptt``) the layer is the plain op.

Scaled weight standardization, per output channel (fan_in = weight[0].numel())::

    W_hat = gain * (W - mean(W)) / sqrt(var_unbiased(W) * fan_in + eps),   eps = 1e-4, gain init 1

computed from the raw weight inside autograd, so gradients reach ``W`` and ``gain`` through it;
``standardize_weight_parts`` and ``standardize_weight_backward`` are the same map and its gradient
written out, for the local backend (``ndot_core.engine.local_step``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WS_EPS = 1e-4


@functools.lru_cache(maxsize=64)
def constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-d tensor holding ``value`` (cached: never modify it; a normal tensor even if first asked for
    under ``inference_mode``, so that autograd may use it)."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype, device=device)


def standardize_weight(weight: Tensor, gain: Tensor, eps: float = WS_EPS) -> Tensor:
    """Scaled weight standardization of ``weight`` [out, ...] with per-output ``gain`` [out, 1, ...]."""
    return standardize_weight_parts(weight, gain, eps)[0]


def standardize_weight_parts(
    weight: Tensor, gain: Tensor, eps: float = WS_EPS, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W_hat, c, r, a)``: ``c = W - mean(W)``, ``r = 1 / sqrt(var_unbiased(W) * fan_in + eps)``,
    ``a = gain * r`` and ``W_hat = c * a`` (per output channel).

    ``standardize_weight`` calls this, so autograd and the local backend get the same bits; ``c``,
    ``r`` and ``a`` are what ``standardize_weight_backward`` needs. ``var * fan_in`` is computed as
    ``k * |c|^2`` with ``k = fan_in / (fan_in - 1)`` (``Tensor.var``'s Welford reduction is ~10x
    slower on these small weights). ``out``: where to write ``W_hat`` (not under autograd).
    """
    dims = tuple(range(1, weight.dim()))
    fan_in = math.prod(weight.shape[1:])
    centred = torch.sub(weight, weight.sum(dim=dims, keepdim=True), alpha=1 / fan_in)  # W - mean(W)
    norm = torch.linalg.vector_norm(centred, dim=dims, keepdim=True)
    inv_std = torch.addcmul(
        constant(eps, norm.dtype, norm.device), norm, norm, value=fan_in / (fan_in - 1)
    ).rsqrt()
    scale = gain * inv_std
    w_hat = torch.mul(centred, scale) if out is None else torch.mul(centred, scale, out=out)
    return w_hat, centred, inv_std, scale


def standardize_weight_backward(
    grad_w_hat: Tensor, centred: Tensor, inv_std: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """``(dL/dW, dL/dgain)`` from ``G = dL/dW_hat`` for ``W_hat = gain * c * r`` (per output channel).

    With ``n = fan_in``, ``k = n / (n-1)``, ``c = W - mean(W)``, ``r = (k |c|^2 + eps)^(-1/2)``,
    ``a = gain * r`` (``standardize_weight_parts``) and ``q = sum(G * c)`` over the fan-in::

        dL/dgain = q * r
        dL/dc    = G * a - k * (q * r) * a * r * c       (the second term: r depends on c)
        dL/dW    = dL/dc - mean(dL/dc)                   (c = W - mean(W) is centring)
    """
    dims = tuple(range(1, grad_w_hat.dim()))
    fan_in = math.prod(grad_w_hat.shape[1:])
    grad_gain = (grad_w_hat * centred).sum(dim=dims, keepdim=True).mul_(inv_std)
    coef = torch.mul(grad_gain, scale).mul_(inv_std)
    grad_c = torch.mul(grad_w_hat, scale).addcmul_(centred, coef, value=-fan_in / (fan_in - 1))
    return grad_c.sub_(grad_c.sum(dim=dims, keepdim=True), alpha=1 / fan_in), grad_gain  # minus the mean


class TraceDrivenLinearFunction(torch.autograd.Function):
    """``spikes @ W.T + b`` forward; weight gradient from ``trace`` (``g.T @ trace``)."""

    @staticmethod
    def forward(ctx, spikes: Tensor, trace: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(trace, weight)
        ctx.has_bias = bias is not None
        return F.linear(spikes, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        trace, weight = ctx.saved_tensors
        grad_input = grad_output @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_output.t() @ trace if ctx.needs_input_grad[2] else None
        grad_bias = grad_output.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_input, None, grad_weight, grad_bias


class TraceDrivenConv2dFunction(torch.autograd.Function):
    """``conv2d(spikes, W) + b`` forward; one ``convolution_backward`` with ``trace`` as the input.

    The input gradient of a convolution does not depend on the input's values, so the op's own
    backward kernel, handed the trace where autograd would hand the input, returns exactly
    ``(conv2d_input(W, g), conv2d_weight(trace, g), sum g)`` in one call.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        spikes: Tensor,
        trace: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> Tensor:
        ctx.save_for_backward(trace, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return F.conv2d(spikes, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        trace, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_bias = ctx.bias_sizes is not None and ctx.needs_input_grad[3]
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output.contiguous(),
            trace,
            weight,
            ctx.bias_sizes,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [need_input, need_weight, need_bias],
        )
        return grad_input, None, grad_weight, grad_bias, None, None, None, None


class _StandardizedWeight:
    """Shared by the trace-driven layers: an optional per-output ``gain`` and the weight the op uses."""

    weight: Tensor
    gain: nn.Parameter | None

    def reset_parameters(self) -> None:
        """PyTorch's default init for weight and bias; gain back to 1."""
        super().reset_parameters()  # type: ignore[misc]
        if getattr(self, "gain", None) is not None:
            nn.init.ones_(self.gain)

    def effective_weight(self) -> Tensor:
        """The weight the op uses: standardized when WS is on, else the raw weight."""
        return self.weight if self.gain is None else standardize_weight(self.weight, self.gain)


class TraceLinear(_StandardizedWeight, nn.Linear):
    """``nn.Linear`` whose weight gradient comes from a presynaptic trace; optional scaled WS."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, weight_standardization: bool = False
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.gain = nn.Parameter(torch.ones(out_features, 1)) if weight_standardization else None

    def forward(self, x: Tensor, trace: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``x @ W.T + b``; with ``trace`` the weight gradient is ``g.T @ trace``."""
        weight = self.effective_weight()
        if trace is None:
            return F.linear(x, weight, self.bias)
        return TraceDrivenLinearFunction.apply(x, trace, weight, self.bias)


class TraceConv2d(_StandardizedWeight, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) whose weight gradient comes from a trace; optional scaled WS."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        weight_standardization: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1)) if weight_standardization else None

    def forward(self, x: Tensor, trace: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``conv2d(x, W) + b``; with ``trace`` the weight gradient is ``conv2d_weight(trace, g)``."""
        weight = self.effective_weight()
        if trace is None:
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return TraceDrivenConv2dFunction.apply(
            x, trace, weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class Scale(nn.Module):
    """Multiply by a constant (the reference VGG's ``Scale(2.74)`` after every LIF)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
