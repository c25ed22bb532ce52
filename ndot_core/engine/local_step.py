"""One online time-step with a hand-written local backward: no autograd graph, same numbers.

Under the online rules (``ndot``, ``ndot_reference``, ``ottt``) the membrane enters each step
detached, so the gradient of step t's loss ``L[t]`` runs through step t only: a fixed chain from
the logits back to the first layer. For block ``l`` (weighted op ``W^l``, LIF, mask ``m``, linear
post-ops ``P``; ``x^l`` its input, ``a_in^l`` the post-op'd trace it gets, ``x^1`` the data) and the
readout ``o = W_o x^{L+1} + b_o``::

    g_o      = dL/do                                  (ndot_core.engine.loss.ndot_loss_grad)
    dL/dW_o  = g_o^T a_in^{L+1},  dL/db_o = sum_rows g_o,  g^{L+1} = g_o W_o
    g_s^l    = m * P^T(g^{l+1})                        (pooling transposes, Scale factors)
    g_u^l    = g_s^l * alpha * sig(alpha (u^l - Vth)) * (1 - sig(alpha (u^l - Vth)))
    dL/dW^l  = weight_grad(a_in^l, g_u^l)               (x^1 for the first layer: no trace)
    dL/db^l  = sum g_u^l,         g^l = input_grad(W^l, g_u^l)   (not for l = 1)

A conv's ``weight_grad``/``input_grad`` is one ``convolution_backward`` with the trace where
autograd would put the input (as ``TraceDrivenConv2dFunction``); a linear's are two matmuls. Under
scaled weight standardization ``W^l`` is ``W_hat`` and the gradient goes on to ``W`` and ``gain``
by ``standardize_weight_backward``. Rows without a label have ``g_o = 0``: the backward leaves them
out. ``bptt`` needs the graph through time: not here.

The forward is ``SpikingNetwork.step`` op for op (the same state and logits, the same dropout
draws) under ``no_grad``, keeping what the backward needs: per block the surrogate factor
``sig(alpha (u - Vth))``, the weight-gradient input and the mask. 4-d tensors run in ``memory_format`` (channels-last by default: the CPU
convolution and pooling kernels are faster in it; a convolution may then sum in another order, so
states and logits match the autograd path to rounding rather than bit for bit). Temporaries live in
a ``Workspace``, reused from step to step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ndot_core.engine.layers import constant, standardize_weight_backward, standardize_weight_parts
from ndot_core.engine.local_plan import (
    BlockPlan,
    LayerPlan,
    LocalBackendUnsupported,
    hooked_modules,
    plan_network,
)
from ndot_core.engine.network import SpikingNetwork
from ndot_core.engine.neuron import LIFState
from ndot_core.engine.rules import ONLINE_RULES, advance_trace
from ndot_core.engine.state import NetworkState, index_rows
from ndot_core.engine.workspace import Workspace

# (W used by the op, the (c, r, a) of standardize_weight_parts under WS or None)
Weight = tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]
Grads = list[tuple[nn.Parameter, Tensor]]


@dataclass
class Tape:
    """What one step's forward keeps for the local backward (labelled rows only; valid until the next step).

    ``rows``: their indices, or None when every row is labelled. Per weighted layer (blocks, then the
    readout): ``weights`` and ``inputs`` (what the weight gradient multiplies: the data for the first
    layer, the post-op'd trace after). Per block: ``surrogates`` ``sig(alpha (u - Vth))`` of the
    pre-reset ``u`` (all the backward needs of it) and ``masks``.
    """

    rows: Tensor | None
    weights: list[Weight] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)
    surrogates: list[Tensor] = field(default_factory=list)
    masks: list[Tensor | None] = field(default_factory=list)


class LocalStep:
    """Forward and local backward of one online step of ``model``; see the module docstring.

    Raises ``LocalBackendUnsupported`` for a network the chain does not cover (``local_plan``);
    ``check`` raises it for a rule it does not cover or a model with forward hooks (the local forward
    does not call module forwards, so the hooks would silently not run).
    """

    def __init__(
        self, model: SpikingNetwork, rule: str, memory_format: torch.memory_format = torch.channels_last
    ) -> None:
        self.model = model
        self.plans: list[BlockPlan] = plan_network(model, rule)
        self.memory_format = memory_format
        self.readout = LayerPlan.of(model.readout)
        self.workspace = Workspace()
        self._modules = list(model.named_modules())

    def check(self, rule: str) -> None:
        """Raise ``LocalBackendUnsupported`` if ``rule`` or the model's hooks rule the local step out."""
        if rule not in ONLINE_RULES:
            raise LocalBackendUnsupported(
                f"the local backend runs the online rules {ONLINE_RULES}, not {rule!r}"
            )
        hooked = hooked_modules(self._modules)
        if hooked:
            raise LocalBackendUnsupported(f"the local backend does not run module hooks; hooked: {hooked}")

    def _buffer(self, name: str, rows: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return self.workspace.get(name, (rows, *shape), like, self.memory_format)

    def _weight(self, name: str, layer: LayerPlan) -> Weight:
        """The weight the op uses, as ``layer.effective_weight()`` (standardized under WS); a conv's
        in ``memory_format``. Call under no_grad."""
        weight = layer.weight
        out = None
        if layer.conv is not None and not weight.is_contiguous(memory_format=self.memory_format):
            out = self.workspace.get(name, tuple(weight.shape), weight, self.memory_format)
        if layer.gain is None:
            return (weight if out is None else out.copy_(weight)), None
        w_hat, *parts = standardize_weight_parts(weight, layer.gain, out=out)
        return w_hat, tuple(parts)

    # -- forward ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        frames: Tensor,
        state: NetworkState,
        rule: str,
        learn_rows: Tensor | None = None,
        all_rows: bool | None = None,
    ) -> tuple[Tensor, Tape | None]:
        """Advance ``state`` (in place) by one step on ``frames``; return (logits, tape or None).

        As ``SpikingNetwork.step(frames, state, rule, dropout_rows=learn_rows)``. With ``learn_rows``
        ([B] bool, at least one True) the tape for ``backward`` is kept for those rows; ``all_rows``:
        whether every row is one of them, when the caller knows (saves a reduction).
        """
        model, fmt = self.model, self.memory_format
        model._check_input(frames, state)
        batch = state.batch_size
        first = state.steps == 0
        first_any = bool(first.any())
        masks = model._dropout_masks(state, first, learn_rows)
        tape = None
        if learn_rows is not None:
            if all_rows is None:
                all_rows = bool(learn_rows.all())
            tape = Tape(None if all_rows else learn_rows.nonzero().flatten())
        h = frames.flatten(1) if model.flatten_input else frames.contiguous(memory_format=fmt)
        h_trace: Tensor | None = None
        neurons = []
        for i, (plan, neuron, mask) in enumerate(zip(self.plans, state.neurons, masks, strict=True)):
            layer, lif = plan.layer, plan.lif
            weight = self._weight(f"weight{i}", layer)
            if layer.conv is not None:
                current = F.conv2d(h, weight[0], layer.bias, *layer.conv)
                if not neuron.v.is_contiguous(memory_format=fmt):  # e.g. a state from new_state
                    neuron = LIFState(*(t.contiguous(memory_format=fmt) for t in neuron))
            else:
                current = F.linear(h, weight[0], layer.bias)
            u = current.add_(neuron.v, alpha=lif.lam)  # torch.add(current, v, alpha=lam), in place
            s = torch.ge(u, lif.v_threshold, out=torch.empty_like(u))
            if tape is not None:  # the backward needs u only through the surrogate: keep that
                tape.surrogates.append(self._surrogate(i, plan, self._take(tape, u)))
            v = u.sub_(s, alpha=lif.v_threshold)  # torch.sub(u, s, alpha=Vth), in place: u is spent
            e, trace = advance_trace(
                rule,
                v=v,
                s=s,
                v_prev=neuron.v,
                s_prev=neuron.s,
                e_prev=neuron.e,
                trace_prev=neuron.trace,
                first=first,
                lam=lif.lam,
                v_threshold=lif.v_threshold,
                first_any=first_any,
            )
            neurons.append(LIFState(v, s, e, trace))
            if tape is not None:
                tape.weights.append(weight)
                tape.inputs.append(self._take(tape, h if h_trace is None else h_trace))
                tape.masks.append(None if mask is None else self._take(tape, mask))
            # Only the next layer's weight gradient reads the post-op'd trace: without a tape, skip it.
            h = self._post(i, plan, s, mask, batch)
            h_trace = None if tape is None else self._post(i, plan, trace, mask, batch, "trace")
        weight = self._weight("readout", self.readout)
        logits = F.linear(h, weight[0], self.readout.bias)
        if tape is not None:
            tape.weights.append(weight)
            tape.inputs.append(self._take(tape, h if h_trace is None else h_trace))
        state.neurons = neurons
        state.readout_sum = state.readout_sum + logits
        state.steps = state.steps + 1
        return logits, tape

    def _post(
        self, i: int, plan: BlockPlan, x: Tensor, mask: Tensor | None, batch: int, name: str = "s"
    ) -> Tensor:
        """Mask and post-ops of block ``i`` on ``x`` (spikes or trace), op for op as the block's forward."""
        owned = mask is not None
        if owned:
            x = x * mask
        for j, op in enumerate(plan.post):
            out = (
                self._buffer(f"pool{i}.{j}.{name}", batch, op.out_shape, x) if op.kind == "avg_pool" else None
            )
            x, owned = op.forward(x, owned, out)
        return x

    def _surrogate(self, i: int, plan: BlockPlan, u: Tensor) -> Tensor:
        """``sig(alpha (u - Vth))`` into a workspace buffer; its argument in one op, ``offset + alpha u``."""
        sig = self._buffer(f"sig{i}", u.shape[0], tuple(u.shape[1:]), u)
        offset = constant(plan.offset, u.dtype, u.device)
        return torch.add(offset, u, alpha=plan.lif.surrogate_alpha, out=sig).sigmoid_()

    @staticmethod
    def _take(tape: Tape, tensor: Tensor) -> Tensor:
        return tensor if tape.rows is None else index_rows(tensor, tape.rows)

    # -- backward --------------------------------------------------------------------------------------
    @torch.no_grad()
    def backward(self, tape: Tape, grad_logits: Tensor) -> Grads:
        """``(parameter, dL/dparameter)`` for every parameter, from ``grad_logits`` = dL/do [rows, K].

        ``grad_logits`` holds the tape's rows only (all rows when ``tape.rows`` is None).
        """
        grads: Grads = []
        rows = grad_logits.shape[0]
        grad_in = self._linear_backward(
            self.readout, tape.weights[-1], tape.inputs[-1], grad_logits, grads, True
        )
        for i in reversed(range(len(self.plans))):
            plan, sig = self.plans[i], tape.surrogates[i]
            g = torch.mul(grad_in, plan.coef)  # a new tensor: the in-place ops below touch temporaries only
            for j in reversed(range(len(plan.post))):
                op = plan.post[j]
                if op.pools:
                    like = sig if op.in_shape == tuple(sig.shape[1:]) else None
                    g = op.backward(g, like, self._buffer(f"grad{i}.{j}", rows, op.in_shape, g))
                else:
                    g = op.backward(g)
            if tape.masks[i] is not None:
                g.mul_(tape.masks[i])
            grad_u = torch.ops.aten.sigmoid_backward.grad_input(g, sig, grad_input=g)  # g * sig * (1 - sig)
            if plan.layer.conv is None:
                grad_in = self._linear_backward(
                    plan.layer, tape.weights[i], tape.inputs[i], grad_u, grads, i > 0
                )
            else:
                grad_in = self._conv_backward(
                    plan.layer, tape.weights[i], tape.inputs[i], grad_u, grads, i > 0
                )
        grads.reverse()
        return grads

    @staticmethod
    def _weight_grads(
        layer: LayerPlan, weight: Weight, grad_weight: Tensor, grad_bias: Tensor | None, grads: Grads
    ) -> None:
        """Append (bias, gain, weight) gradients, undoing weight standardization when on."""
        if grad_bias is not None:
            grads.append((layer.bias, grad_bias))
        if weight[1] is None:
            grads.append((layer.weight, grad_weight))
            return
        grad_w, grad_gain = standardize_weight_backward(grad_weight, *weight[1])
        grads.append((layer.gain, grad_gain))
        grads.append((layer.weight, grad_w))

    def _linear_backward(self, layer: LayerPlan, weight: Weight, inputs, grad_out, grads: Grads, need_input):
        """``dW = g^T a``, ``db = sum g``; returns ``g W`` (the input gradient) when needed."""
        grad_bias = grad_out.sum(0) if layer.bias is not None else None
        self._weight_grads(layer, weight, grad_out.t() @ inputs, grad_bias, grads)
        return grad_out @ weight[0] if need_input else None

    def _conv_backward(self, layer: LayerPlan, weight: Weight, inputs, grad_out, grads: Grads, need_input):
        """One ``convolution_backward``: input gradient from W, weight gradient from the trace."""
        stride, padding, dilation, groups = layer.conv
        has_bias = layer.bias is not None
        grad_in, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out,
            inputs,
            weight[0],
            [layer.weight.shape[0]] if has_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [need_input, True, has_bias],
        )
        self._weight_grads(layer, weight, grad_weight.contiguous(), grad_bias, grads)
        return grad_in


def accumulate_grads(pairs: Grads, replace: bool = False) -> None:
    """``p.grad += g`` for each pair whose parameter requires grad (``p.grad = g`` where it is None).

    ``replace``: the caller knows no gradient is pending (the buffers hold zeros or nothing), so the
    first gradient of each parameter becomes its ``.grad`` instead of being added to zeros; later
    pairs of the same parameter still add.
    """
    assigned: set[int] = set()
    existing, new = [], []
    for param, grad in pairs:
        if not param.requires_grad:
            continue
        if param.grad is None or (replace and id(param) not in assigned):
            param.grad = grad.contiguous()
            assigned.add(id(param))
        else:
            existing.append(param.grad)
            new.append(grad)
    if existing:
        torch._foreach_add_(existing, new)
