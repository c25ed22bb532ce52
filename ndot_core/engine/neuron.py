"""Leaky integrate-and-fire neuron with soft reset and a sigmoid surrogate gradient.

One time-step of a layer of LIF neurons driven by the input current ``I[t]``::

    u[t] = lam * v[t-1] + I[t]          pre-reset membrane
    s[t] = H(u[t] - Vth)                H(0) = 1; backward: alpha * sig(alpha x) * (1 - sig(alpha x))
    v[t] = u[t] - Vth * s[t]            post-reset membrane (= the residual r[t]); reset term detached

with ``v[0] = s[0] = 0``. Under the online rules ``v[t-1]`` enters detached (no graph through time);
under ``bptt`` it keeps its graph through the leak. Alongside the membrane, each layer carries the
temporal dependency ``e`` and the presynaptic trace ``a_hat`` of its own output spikes (see
``ndot_core.engine.rules``); both are data without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ndot_core.engine.rules import advance_trace, check_rule


@dataclass(frozen=True)
class LIFParameters:
    """Neuron constants: threshold ``v_threshold`` (Vth), leak ``lam`` (= 1 - 1/tau), surrogate slope."""

    v_threshold: float = 1.0
    lam: float = 0.5
    surrogate_alpha: float = 4.0

    def __post_init__(self) -> None:
        if not self.v_threshold > 0:
            raise ValueError(f"v_threshold must be > 0, got {self.v_threshold}")
        if not 0 < self.lam <= 1:
            raise ValueError(f"lam must be in (0, 1], got {self.lam}")
        if not self.surrogate_alpha > 0:
            raise ValueError(f"surrogate_alpha must be > 0, got {self.surrogate_alpha}")


class LIFState(NamedTuple):
    """State of one layer of LIF neurons for a batch of independent streams (row = stream).

    ``v``: post-reset membrane v[t-1]; ``s``: last spikes s[t-1]; ``e``: temporal dependency e[t-1];
    ``trace``: presynaptic trace a_hat[t-1] of this layer's spikes. All shaped ``[B, *neuron_shape]``.
    """

    v: Tensor
    s: Tensor
    e: Tensor
    trace: Tensor

    @staticmethod
    def zeros(
        batch_size: int, neuron_shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype
    ) -> LIFState:
        """Resting state: every tensor zero."""
        z = torch.zeros((batch_size, *neuron_shape), device=device, dtype=dtype)
        return LIFState(z, z.clone(), z.clone(), z.clone())

    def detach(self) -> LIFState:
        """The same values without autograd history."""
        return LIFState(*(t.detach() for t in self))


class SigmoidSurrogateSpike(torch.autograd.Function):
    """``H(u - Vth)`` with ``H(x) = [x >= 0]``; backward ``alpha * sig(alpha x) * (1 - sig(alpha x))``.

    Written here rather than imported: spikingjelly's ``surrogate.Sigmoid`` is the same function but
    not a dependency we otherwise need, and norse / snntorch use ``H(0) = 0`` or other surrogates,
    while the notes' test vectors need ``H(0) = 1``.
    """

    @staticmethod
    def forward(ctx, u: Tensor, threshold: float, alpha: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(u)
        ctx.threshold, ctx.alpha = threshold, alpha
        return (u >= threshold).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (u,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * (u - ctx.threshold))
        return grad_output * ctx.alpha * sig * (1 - sig), None, None


def spike(u: Tensor, alpha: float = 4.0, threshold: float = 0.0) -> Tensor:
    """``H(u - threshold)`` with the sigmoid surrogate gradient of slope ``alpha``."""
    return SigmoidSurrogateSpike.apply(u, threshold, alpha)


def lif_step(
    current: Tensor, state: LIFState, params: LIFParameters, rule: str, first: Tensor
) -> tuple[Tensor, LIFState]:
    """Advance one layer by one time-step; returns the spikes ``s[t]`` and the new state.

    ``first`` is a bool tensor ``[B]`` marking rows at their first step (t = 1). Under ``bptt`` the
    new membrane keeps its graph and e/trace are left untouched; under the online rules the state is
    detached and e/trace advance by ``ndot_core.rules.advance_trace``.
    """
    check_rule(rule)
    u = torch.add(current, state.v, alpha=params.lam)
    s = spike(u, params.surrogate_alpha, params.v_threshold)
    v = torch.sub(u, s.detach(), alpha=params.v_threshold)
    if rule == "bptt":
        return s, LIFState(v, s, state.e, state.trace)
    v_now, s_now = v.detach(), s.detach()
    with torch.no_grad():
        e, trace = advance_trace(
            rule,
            v=v_now,
            s=s_now,
            v_prev=state.v,
            s_prev=state.s,
            e_prev=state.e,
            trace_prev=state.trace,
            first=first,
            lam=params.lam,
            v_threshold=params.v_threshold,
        )
    return s, LIFState(v_now, s_now, e, trace)
