"""Temporal-dependency rules: how a layer's presynaptic trace a_hat follows its spikes.

With ``r[t] = u[t] - Vth * s[t]`` the post-reset membrane (``v[t]`` in ``ndot_core.engine.neuron``):

``ndot`` (the paper, Eq. 8 with its footnote and Eq. 12)::

    e[1] = r[1];   e[t] = r[t] / r[t-1]  (t >= 2)
    a_hat[t] = e[t-1] * a_hat[t-1] + s[t],   a_hat[1] = s[1]

``ndot_reference`` (the authors' public code; it subtracts Vth*s from the already post-reset v)::

    e_code[t] = (v[t] - Vth*s[t]) / (v[t-1] - Vth*s[t-1]),   v[0] = s[0] = 0
    a_hat[t]  = e_code[t] * a_hat[t-1] + s[t]               (the CURRENT step's e)

``ottt``: ``e = lam`` everywhere, ``a_hat[t] = lam * a_hat[t-1] + s[t]``.
``bptt``: no trace; the membrane keeps its graph and autograd unrolls time.

Stabilisation (both ndot variants): where the denominator is 0 or the ratio is NaN/Inf, ``e = lam``;
then ``e`` is clamped to ``[-lam, lam]``. Nothing here carries a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

RULES: tuple[str, ...] = ("ndot", "ndot_reference", "ottt", "bptt")
ONLINE_RULES: tuple[str, ...] = ("ndot", "ndot_reference", "ottt")


def check_rule(rule: str) -> str:
    """Return ``rule`` if it is one of ``RULES``; raise ``ValueError`` naming it otherwise."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    return rule


def stabilise(ratio: Tensor, lam: float) -> Tensor:
    """``lam`` where ``ratio`` is NaN or +-Inf, then clamp to ``[-lam, lam]`` (a new tensor).

    ``ratio`` comes from a division, so a zero denominator shows up here as NaN (0/0) or +-Inf (x/0):
    this one test covers both of the notes' cases.
    """
    return stabilise_(ratio.clone(), lam)


def stabilise_(ratio: Tensor, lam: float) -> Tensor:
    """``stabilise`` in place on ``ratio`` (a temporary of the caller's): the same kernels, no new tensor."""
    return ratio.nan_to_num_(nan=lam, posinf=lam, neginf=lam).clamp_(-lam, lam)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-row mask ``[B]`` against ``like`` ``[B, ...]``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def dependency_paper(
    v: Tensor, v_prev: Tensor, first: Tensor, lam: float, first_any: bool | None = None
) -> Tensor:
    """Paper rule: ``e[1] = r[1]``, ``e[t] = r[t] / r[t-1]``, stabilised (``r`` = post-reset ``v``).

    ``first_any``: ``bool(first.any())`` when the caller already knows it (saves a sync per layer).
    """
    ratio = v / v_prev
    if first_any if first_any is not None else bool(first.any()):
        ratio = torch.where(_rows(first, v), v, ratio)
    return stabilise_(ratio, lam)


def dependency_reference(
    v: Tensor, s: Tensor, v_prev: Tensor, s_prev: Tensor, v_threshold: float, lam: float
) -> Tensor:
    """Reference-code rule: ``(v[t] - Vth s[t]) / (v[t-1] - Vth s[t-1])``, stabilised."""
    numerator = torch.sub(v, s, alpha=v_threshold)
    return stabilise_(numerator.div_(torch.sub(v_prev, s_prev, alpha=v_threshold)), lam)


def advance_trace(
    rule: str,
    *,
    v: Tensor,
    s: Tensor,
    v_prev: Tensor,
    s_prev: Tensor,
    e_prev: Tensor,
    trace_prev: Tensor,
    first: Tensor,
    lam: float,
    v_threshold: float,
    first_any: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of ``(e, a_hat)`` for ``rule`` given this step's ``v, s`` and the previous state.

    ``first`` ([B] bool) marks rows at t = 1 (their previous state is the zero resting state); only
    the paper rule needs it, for ``e[1] = r[1]``; ``first_any`` is ``bool(first.any())`` if known.
    Returns ``(e[t], a_hat[t])``.
    """
    if rule == "ndot":
        trace = torch.addcmul(s, e_prev, trace_prev)
        e = dependency_paper(v, v_prev, first, lam, first_any)
    elif rule == "ndot_reference":
        e = dependency_reference(v, s, v_prev, s_prev, v_threshold, lam)
        trace = torch.addcmul(s, e, trace_prev)
    elif rule == "ottt":
        e = torch.full_like(v, lam)
        trace = torch.add(s, trace_prev, alpha=lam)
    else:
        raise ValueError(f"rule {rule!r} has no trace; expected one of {ONLINE_RULES}")
    return e, trace
