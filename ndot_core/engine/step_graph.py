"""The local step as one pure function of tensors, for ``torch.compile`` (``compiled_step``).

``step_function(local, rule, alpha, steps_per_sample)`` returns ``fn`` with::

    fn(frames, steps, readout_sum, neurons, labels, active, params)
        -> (logits, steps + 1, readout_sum + logits, new neurons, grads)

and ``forward_function(local, rule)`` its prediction half (no labels, no tape, no backward)::

    fn(frames, steps, readout_sum, neurons, active, params) -> (logits, steps + 1, readout_sum + logits, new neurons)

``active`` [B] bool: a row where it is False is carried through unchanged (its state, steps and
readout sum are the inputs', its label counts as -1: no gradient), whatever its frame (zeroed before
use, so that not even a NaN there reaches the gradients); its logits mean nothing. So a batch can
step the rows that have a frame inside the whole table of rows, with no gather before nor scatter
after: the selection is one ``where`` fused into the kernels that write the state
(``compiled_step``: the dense live batch of the worker).

``neurons`` flattens each block's ``(v, s, e, trace)``; ``params`` are ``local.parameters`` (None for
an absent bias or gain) and ``grads`` their gradients, in the same order. The math is the local
backend's (``ndot_core.engine.local_step``, its docstring has the chain), written without Python
branches on data and without in-place ops or ``out=`` buffers, so that the compiler sees one graph:

* the loss gradient covers every row, weighted: ``g_o = w * ((1-alpha)(p - Y) + 2 alpha/K (o - Y)) / T``
  with ``w = 1/n`` on the n labelled rows and 0 on the others (label -1, padding), which is
  ``ndot_loss_grad`` on the labelled rows and exactly 0 elsewhere;
* the paper rule's first step ``e[1] = r[1]`` is a ``where`` on ``steps == 0`` for every row;
* ``stabilise`` (NaN/Inf -> lam, clamp to [-lam, lam]) is ``where(r - r == 0, clamp(r), lam)``
  (``r - r`` is 0 exactly for finite r), which the CPU compiler vectorizes (``nan_to_num`` it does not).

A row of zeros with ``steps == 0`` and label -1 stays finite and gives exactly zero gradient: padding
rows (``compiled_step``) are such rows. Networks with dropout are not covered (``unsupported_reason``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ndot_core.engine.layers import WS_EPS
from ndot_core.engine.local_plan import BlockPlan, LayerPlan
from ndot_core.engine.local_step import LocalStep

StepFunction = Callable[..., tuple]


def unsupported_reason(local: LocalStep) -> str | None:
    """Why the step graph cannot run ``local``'s network, or None when it can."""
    dropout = [i for i, block in enumerate(local.model.blocks) if block.dropout > 0]
    if dropout:
        return f"blocks {dropout} use dropout (masks drawn per sequence): the compiled step leaves them out"
    return None


def step_parameters(local: LocalStep) -> list[nn.Parameter | None]:
    """``(weight, bias, gain)`` of every block's weighted layer, then the readout's (None where absent)."""
    layers = [plan.layer for plan in local.plans] + [local.readout]
    return [p for layer in layers for p in (layer.weight, layer.bias, layer.gain)]


def _standardize(weight: Tensor, gain: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """``standardize_weight_parts`` without ``out=``: ``(W_hat, (c, r, a))``, or ``(W, None)`` without WS."""
    if gain is None:
        return weight, None
    dims = tuple(range(1, weight.dim()))
    fan_in = math.prod(weight.shape[1:])
    centred = weight - weight.sum(dim=dims, keepdim=True) / fan_in
    norm = torch.linalg.vector_norm(centred, dim=dims, keepdim=True)
    inv_std = torch.rsqrt(norm * norm * (fan_in / (fan_in - 1)) + WS_EPS)
    scale = gain * inv_std
    return centred * scale, (centred, inv_std, scale)


def _standardize_backward(grad: Tensor, parts: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``standardize_weight_backward`` without in-place ops: ``(dL/dW, dL/dgain)``."""
    centred, inv_std, scale = parts
    dims = tuple(range(1, grad.dim()))
    fan_in = math.prod(grad.shape[1:])
    grad_gain = (grad * centred).sum(dim=dims, keepdim=True) * inv_std
    grad_c = grad * scale - (fan_in / (fan_in - 1)) * centred * (grad_gain * scale * inv_std)
    return grad_c - grad_c.sum(dim=dims, keepdim=True) / fan_in, grad_gain


def _stabilise(ratio: Tensor, lam: float) -> Tensor:
    return torch.where((ratio - ratio) == 0, ratio.clamp(-lam, lam), lam)


def _advance(rule: str, plan: BlockPlan, v, s, v0, s0, e0, t0, first: Tensor) -> tuple[Tensor, Tensor]:
    """``advance_trace`` of ``ndot_core.engine.rules`` for one block: ``(e, trace)``."""
    lam, vth = plan.lif.lam, plan.lif.v_threshold
    if rule == "ndot":
        rows = first.view(-1, *([1] * (v.dim() - 1)))
        return _stabilise(torch.where(rows, v, v / v0), lam), s + e0 * t0
    if rule == "ndot_reference":
        e = _stabilise((v - vth * s) / (v0 - vth * s0), lam)
        return e, s + e * t0
    return torch.full_like(v, lam), s + lam * t0


def _post(plan: BlockPlan, x: Tensor) -> Tensor:
    for op in plan.post:
        if op.kind == "avg_pool":
            x = F.avg_pool2d(x, *op.args)
        elif op.kind == "adaptive_avg_pool":
            x = F.adaptive_avg_pool2d(x, op.args[0])
        elif op.kind == "flatten":
            x = x.flatten(1)
        elif op.kind == "scale":
            x = x * op.args[0]
    return x


def _post_backward(plan: BlockPlan, grad: Tensor, sig: Tensor) -> Tensor:
    """Transposes of the post-ops, last first, without their Scale factors (``plan.coef`` has them)."""
    for op in reversed(plan.post):
        if op.kind == "flatten":
            grad = grad.reshape(grad.shape[0], *op.in_shape)
        elif op.pools:
            shape = (grad.shape[0], *op.in_shape)
            like = sig if tuple(sig.shape) == shape else grad.new_empty(shape)
            if op.kind == "avg_pool":
                grad = torch.ops.aten.avg_pool2d_backward(grad, like, *op.args)
            else:
                grad = torch.ops.aten._adaptive_avg_pool2d_backward(grad, like)
    return grad


def _layer_backward(layer: LayerPlan, weight, inputs, grad_u, need_input: bool) -> tuple[Tensor | None, ...]:
    """``(grad_input, grad_weight, grad_bias)`` of a conv or linear layer (weight gradient from ``inputs``)."""
    has_bias = layer.bias is not None
    if layer.conv is None:
        grad_bias = grad_u.sum(0) if has_bias else None
        return (grad_u @ weight if need_input else None), grad_u.t() @ inputs, grad_bias
    stride, padding, dilation, groups = layer.conv
    return torch.ops.aten.convolution_backward(
        grad_u,
        inputs,
        weight,
        [weight.shape[0]] if has_bias else None,
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        groups,
        [need_input, True, has_bias],
    )


def _forward(local: LocalStep, rule: str, keep_tape: bool) -> StepFunction:
    """The forward of ``local``'s network: ``(frames, steps, readout_sum, neurons, active, params) ->
    (logits, steps + 1, readout_sum + logits, new neurons, tape)`` (rows not ``active``: as they came
    in); the tape (per weighted layer: weight, WS parts, weight-gradient input, surrogate) only with
    ``keep_tape``."""
    plans, fmt = local.plans, local.memory_format
    flatten_input = local.model.flatten_input

    def layout(t: Tensor) -> Tensor:
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t

    def forward(frames, steps, readout_sum, neurons, active, params):
        first = steps == 0
        # (an inactive row is computed, then dropped, its gradient weighted 0: its frame is zeroed first,
        # as 0 * NaN would carry a NaN there into the weights' gradients)
        frames = torch.where(active.view(-1, *([1] * (frames.dim() - 1))), frames, 0)
        h = frames.flatten(1) if flatten_input else layout(frames)
        h_trace = None
        tape, new = [], []
        for i, plan in enumerate(plans):
            layer = plan.layer
            weight, parts = _standardize(params[3 * i], params[3 * i + 2])
            weight = layout(weight)
            if layer.conv is not None:
                current = F.conv2d(h, weight, params[3 * i + 1], *layer.conv)
            else:
                current = F.linear(h, weight, params[3 * i + 1])
            v0, s0, e0, t0 = neurons[4 * i : 4 * i + 4]
            u = current + plan.lif.lam * v0
            s = (u >= plan.lif.v_threshold).to(u.dtype)
            v = u - plan.lif.v_threshold * s
            e, trace = _advance(rule, plan, v, s, v0, s0, e0, t0, first)
            keep = active.view(-1, *([1] * (v.dim() - 1)))
            new += [layout(torch.where(keep, t, old)) for t, old in ((v, v0), (s, s0), (e, e0), (trace, t0))]
            if keep_tape:
                sig = torch.sigmoid(u * plan.lif.surrogate_alpha + plan.offset)
                tape.append((weight, parts, h if h_trace is None else h_trace, sig))
                h_trace = _post(plan, trace)
            h = _post(plan, s)
        w_out, parts_out = _standardize(params[-3], params[-1])
        logits = F.linear(h, w_out, params[-2])
        if keep_tape:
            tape.append((w_out, parts_out, h_trace, None))
        steps = torch.where(active, steps + 1, steps)
        readout_sum = torch.where(active[:, None], readout_sum + logits, readout_sum)
        return logits, steps, readout_sum, new, tape

    return forward


def forward_function(local: LocalStep, rule: str) -> StepFunction:
    """The pure prediction step of ``local``'s network under ``rule``; see the module docstring."""
    forward = _forward(local, rule, keep_tape=False)

    def predict(frames, steps, readout_sum, neurons, active, params):
        return forward(frames, steps, readout_sum, neurons, active, params)[:4]

    return predict


def step_function(local: LocalStep, rule: str, alpha: float, steps_per_sample: int) -> StepFunction:
    """The pure step function of ``local``'s network under ``rule``; see the module docstring."""
    plans, readout = local.plans, local.readout
    layers = [plan.layer for plan in plans] + [readout]
    c_ce, classes = (1 - alpha) / steps_per_sample, local.model.num_classes
    c_mse = 2 * alpha / (classes * steps_per_sample)
    forward = _forward(local, rule, keep_tape=True)

    def step(frames, steps, readout_sum, neurons, labels, active, params):
        logits, steps, readout_sum, new, tape = forward(frames, steps, readout_sum, neurons, active, params)
        labelled = (labels >= 0) & active
        row_weight = labelled.to(logits.dtype) / labelled.sum().clamp(min=1).to(logits.dtype)
        onehot = F.one_hot(labels.clamp(min=0), classes).to(logits.dtype)  # (rows not labelled: weight 0)
        grad_o = torch.softmax(logits, 1) * c_ce + logits * c_mse - onehot * (c_ce + c_mse)
        grad_o = grad_o * row_weight[:, None]

        grads: list[Tensor | None] = [None] * len(params)
        grad_in = grad_o
        for i in reversed(range(len(layers))):
            weight, parts, inputs, sig = tape[i]
            if i < len(plans):
                grad = _post_backward(plans[i], grad_in * plans[i].coef, sig)
                grad_u = grad * sig * (1 - sig)
            else:
                grad_u = grad_in
            grad_in, grad_w, grad_b = _layer_backward(layers[i], weight, inputs, grad_u, i > 0)
            if parts is not None:
                grad_w, grads[3 * i + 2] = _standardize_backward(grad_w, parts)
            grads[3 * i], grads[3 * i + 1] = grad_w, grad_b
        return logits, steps, readout_sum, new, grads

    return step
