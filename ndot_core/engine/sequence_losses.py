"""Losses and gradients of whole sequences: the reference the online step is checked against.

``unrolled_losses`` runs frames ``[T, B, ...]`` from a fresh state and yields each step's loss
``L[t]`` (Eq. 13 of the paper, scaled by 1/T); ``accumulated_gradients`` sums their gradients under a
rule::

    online rules (ndot, ottt, ...):  g = sum_t dL[t]/dW   (each L[t]'s graph covers its own step)
    bptt:                           g = d(sum_t L[t])/dW  (the graph chains through the membranes)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ndot_core.engine.loss import FTRLRegulariser, ndot_loss
from ndot_core.engine.models import SpikingNetwork
from ndot_core.engine.rules import check_rule


def check_labels(
    labels: Tensor, batch_size: int, num_classes: int, allow_unlabelled: bool = True
) -> tuple[int, int]:
    """Raise ``ValueError`` naming the first bad label; return the (smallest, largest) label."""
    if labels.shape != (batch_size,):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({batch_size},)")
    if batch_size == 0:
        return 0, -1
    smallest, largest = (int(v) for v in torch.aminmax(labels))  # one reduction for the checks and rows
    low = -1 if allow_unlabelled else 0
    if smallest < low or largest >= num_classes:
        bad = (labels < low) | (labels >= num_classes)
        at = int(bad.nonzero()[0])
        raise ValueError(f"label {int(labels[at])} at row {at} is outside [{low}, {num_classes})")
    return smallest, largest


def unrolled_losses(
    model: SpikingNetwork,
    frames: Tensor,
    labels: Tensor,
    rule: str,
    alpha: float,
    regulariser: FTRLRegulariser | None = None,
) -> Iterator[Tensor]:
    """Run ``frames`` [T, B, ...] from a fresh state; yield each step's loss ``L[t]`` (Eq. 13, /T).

    Under the online rules each loss's graph covers its own step only; under ``bptt`` the graphs
    chain through the membranes.
    """
    check_rule(rule)
    if frames.dim() < 2:
        raise ValueError(f"frames must be [T, B, ...], got shape {tuple(frames.shape)}")
    steps, batch = frames.shape[:2]
    check_labels(labels, batch, model.num_classes)
    rows = labels >= 0
    if not bool(rows.any()):
        raise ValueError("no labelled row: every label is -1")
    state = model.new_state(batch)
    for t in range(steps):
        logits = model.step(frames[t], state, rule, dropout_rows=rows)
        loss = ndot_loss(logits[rows], labels[rows], alpha, steps)
        yield loss if regulariser is None else loss + regulariser(model)


def accumulated_gradients(
    model: SpikingNetwork, frames: Tensor, labels: Tensor, rule: str, alpha: float = 0.1
) -> dict[str, Tensor]:
    """``{name: dL/dparam}`` of ``L = sum_t L[t]`` over ``frames`` [T, B, ...] under ``rule``.

    The model's weights and ``.grad`` are left untouched (gradients come from ``torch.autograd.grad``).
    Online rules: the sum of each step's instantaneous gradient; ``bptt``: one backward through the
    unrolled sequence. Parameters that get no gradient map to zeros.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    total = [torch.zeros_like(p) for p in params]
    losses = unrolled_losses(model, frames, labels, rule, alpha)
    if rule == "bptt":
        losses = iter([torch.stack(list(losses)).sum()])
    for loss in losses:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        total = [acc if g is None else acc + g for acc, g in zip(total, grads, strict=True)]
    return {name: g for (name, _), g in zip(named, total, strict=True)}
