"""Which networks the local backward covers, and the stages it runs for them.

The local backend (``ndot_core.engine.local_step``) advances a ``SpikingNetwork`` by one step
without autograd and forms the gradient of that step's loss by a fixed chain of transposes. That is
only correct for the stages it knows, so ``unsupported_reason`` names the first thing it does not
know (the learner then uses autograd, or raises), and ``plan_network`` lists the stages.

Post-ops are linear maps applied to spikes and trace alike; each has a transpose::

    AvgPool2d            y = avg_pool2d(x)             dx = avg_pool2d_backward(dy)
    AdaptiveAvgPool2d    y = adaptive_avg_pool2d(x)    dx = adaptive_avg_pool2d_backward(dy)
    Flatten(1, -1)       y = x.flatten(1)              dx = dy.view(x.shape)
    Scale(f)             y = x * f                     dx = f * dy
    Identity             y = x                         dx = dy

The forward applies each op exactly as its module does (the same bits). The backward folds every
``Scale`` factor of a block, and the surrogate slope, into one coefficient applied to the smallest
tensor of the chain: the maps are linear, so the result is the same up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ndot_core.engine.layers import Scale, TraceConv2d, TraceLinear
from ndot_core.engine.network import SpikingBlock, SpikingNetwork
from ndot_core.engine.neuron import LIFParameters
from ndot_core.engine.rules import ONLINE_RULES


class LocalBackendUnsupported(ValueError):
    """The local backward does not cover this network, rule or setting (the message says what)."""


@dataclass(frozen=True)
class PostOp:
    """One post-op of a block: ``kind``, its arguments, its per-row input and output shapes."""

    kind: str  # "avg_pool" | "adaptive_avg_pool" | "flatten" | "scale" | "identity"
    args: tuple
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def pools(self) -> bool:
        """Whether the op writes a new tensor of ``out_shape`` (forward) / ``in_shape`` (transpose)."""
        return self.kind in ("avg_pool", "adaptive_avg_pool")

    def forward(self, x: Tensor, owned: bool, out: Tensor | None = None) -> tuple[Tensor, bool]:
        """The module's own forward, op for op (the same bits); returns (y, whether y may be overwritten).

        ``owned``: ``x`` is a temporary of the caller's, so ``Scale`` multiplies it in place (the same
        kernel); ``out``: a buffer of ``(rows, *out_shape)`` for a pooling op to write into.
        """
        if self.kind == "avg_pool":
            if out is None:
                return F.avg_pool2d(x, *self.args), True
            return torch.ops.aten.avg_pool2d.out(x, *self.args, out=out), True
        if self.kind == "adaptive_avg_pool":
            return F.adaptive_avg_pool2d(x, self.args[0]), True
        if self.kind == "flatten":
            return x.flatten(1), owned  # a view of x when x is contiguous
        if self.kind == "scale":
            return (x.mul_(self.args[0]) if owned else x * self.args[0]), True
        return x, owned

    def backward(self, grad: Tensor, like: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """Transpose of the op without its ``Scale`` factor (the caller folds those in).

        For a pooling op: ``like`` is a tensor shaped and laid out as the op's input (the transpose
        reads nothing else of it; None: an empty one is made), ``out`` a buffer of that shape to write
        the result into (None: a new tensor).
        """
        if self.kind in ("scale", "identity"):
            return grad
        shape = (grad.shape[0], *self.in_shape)
        if self.kind == "flatten":
            return grad.reshape(shape)
        if like is None:
            like = torch.empty(shape, dtype=grad.dtype, device=grad.device)
        if self.kind == "avg_pool":
            if out is None:
                return torch.ops.aten.avg_pool2d_backward(grad, like, *self.args)
            return torch.ops.aten.avg_pool2d_backward.grad_input(grad, like, *self.args, grad_input=out)
        if out is None:
            return torch.ops.aten._adaptive_avg_pool2d_backward(grad, like)
        return torch.ops.aten._adaptive_avg_pool2d_backward.out(grad, like, out=out)


@dataclass(frozen=True)
class LayerPlan:
    """A weighted layer and its parameters (bound at planning, as an optimizer binds them).

    ``conv`` is ``(stride, padding, dilation, groups)`` for a convolution, None for a linear layer;
    ``gain`` is None without weight standardization.
    """

    module: TraceConv2d | TraceLinear
    weight: nn.Parameter
    bias: nn.Parameter | None
    gain: nn.Parameter | None
    conv: tuple | None

    @staticmethod
    def of(layer: TraceConv2d | TraceLinear) -> LayerPlan:
        conv = (
            (layer.stride, layer.padding, layer.dilation, layer.groups)
            if type(layer) is TraceConv2d
            else None
        )
        return LayerPlan(layer, layer.weight, layer.bias, layer.gain, conv)


@dataclass(frozen=True)
class BlockPlan:
    """A spiking block: weighted layer, LIF constants, post-ops, and the backward's folded constants.

    ``coef = surrogate_alpha * prod(Scale factors)``; the surrogate's argument is
    ``surrogate_alpha * u + offset`` with ``offset = -surrogate_alpha * v_threshold``.
    """

    layer: LayerPlan
    lif: LIFParameters
    post: tuple[PostOp, ...]
    coef: float
    offset: float


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _post_op(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> PostOp | None:
    """The ``PostOp`` of one module (exact types only: a subclass may compute something else)."""
    kind = type(module)
    if kind is nn.AvgPool2d:
        stride = module.stride if module.stride is not None else module.kernel_size
        args = (_pair(module.kernel_size), _pair(stride), _pair(module.padding), module.ceil_mode)
        args += (module.count_include_pad, module.divisor_override)
        return PostOp("avg_pool", args, in_shape, out_shape)
    if kind is nn.AdaptiveAvgPool2d:
        return PostOp("adaptive_avg_pool", (module.output_size,), in_shape, out_shape)
    if kind is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
        return PostOp("flatten", (), in_shape, out_shape)
    if kind is Scale:
        return PostOp("scale", (module.factor,), in_shape, out_shape)
    if kind is nn.Identity:
        return PostOp("identity", (), in_shape, out_shape)
    return None


def _weighted_reason(layer: nn.Module, where: str) -> str | None:
    if type(layer) is TraceLinear:
        return None
    if type(layer) is TraceConv2d:
        return None if layer.padding_mode == "zeros" else f"{where} pads with {layer.padding_mode!r}"
    return f"{where} is a {type(layer).__name__}, not a TraceConv2d or TraceLinear"


def unsupported_reason(model: nn.Module, rule: str) -> str | None:
    """Why the local backward cannot run ``model`` under ``rule``, or None when it can."""
    if rule not in ONLINE_RULES:
        return f"rule {rule!r} is not an online rule {ONLINE_RULES}: it needs autograd through time"
    if type(model) is not SpikingNetwork:
        return f"model is a {type(model).__name__}, not a SpikingNetwork"
    for i, block in enumerate(model.blocks):
        if type(block) is not SpikingBlock:
            return f"block {i} is a {type(block).__name__}, not a SpikingBlock"
        reason = _weighted_reason(block.weighted, f"block {i}'s weighted layer")
        if reason:
            return reason
        for module in block.post:
            if _post_op(module, (), ()) is None:
                return f"block {i} has a post-op {module!r} with no transpose in the local backward"
    return _weighted_reason(model.readout, "the readout")


def hooked_modules(modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of ``(name, module)`` pairs with forward hooks (or "global" for hooks on every module).

    The local backend does not call module forwards, so such hooks would not run.
    """
    names = [name or "model" for name, m in modules if m._forward_hooks or m._forward_pre_hooks]
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        names.append("global")
    return names


def plan_network(model: SpikingNetwork, rule: str) -> list[BlockPlan]:
    """The stages of ``model`` for the local backward; raises ``LocalBackendUnsupported`` if not covered."""
    reason = unsupported_reason(model, rule)
    if reason:
        raise LocalBackendUnsupported(f"the local backend cannot run this: {reason}")
    plans = []
    for block, shape in zip(model.blocks, model.neuron_shapes, strict=True):
        post = []
        with torch.no_grad():
            probe = torch.zeros(1, *shape)
            for module in block.post:
                out = module(probe)
                post.append(_post_op(module, tuple(probe.shape[1:]), tuple(out.shape[1:])))
                probe = out
        factors = [op.args[0] for op in post if op.kind == "scale"]
        alpha = block.lif.surrogate_alpha
        offset = -alpha * block.lif.v_threshold
        plans.append(
            BlockPlan(LayerPlan.of(block.weighted), block.lif, tuple(post), alpha * prod(factors), offset)
        )
    return plans
