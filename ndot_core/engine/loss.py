"""The NDOT instantaneous loss (Eq. 13) and the FTRL-OTTT regulariser (Sect. 4.3).

    L[t] = ((1 - alpha) * CE(o[t], y) + alpha * MSE(o[t], onehot(y))) / T
    L_ftrl[t] = L[t] + rho * ||W - W_hat||_2^2     or     L[t] + rho * ||W - W_hat||_1

``o[t]`` are the readout logits at step t, MSE is mean-reduced over rows and classes on the raw
logits, CE is mean-reduced over rows; ``W_hat`` are fixed anchor weights (e.g. from a phase trained
at smaller T).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ndot_loss(logits: Tensor, labels: Tensor, alpha: float = 0.1, steps_per_sample: int = 1) -> Tensor:
    """Eq. 13 for logits [B, K] and labels [B] (all valid), divided by ``steps_per_sample`` (T)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if steps_per_sample < 1:
        raise ValueError(f"steps_per_sample must be >= 1, got {steps_per_sample}")
    num_classes = logits.shape[-1]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        at = int(bad.nonzero()[0])
        raise ValueError(f"label {int(labels[at])} at row {at} is outside [0, {num_classes})")
    ce = F.cross_entropy(logits, labels)
    mse = F.mse_loss(logits, F.one_hot(labels, num_classes).to(logits.dtype))
    return ((1 - alpha) * ce + alpha * mse) / steps_per_sample


def ndot_loss_grad(logits: Tensor, labels: Tensor, alpha: float = 0.1, steps_per_sample: int = 1) -> Tensor:
    """``dL/do`` of ``ndot_loss`` for logits [n, K] and labels [n] (all in ``[0, K)``; not re-checked).

    With ``Y = onehot(y)``, ``p = softmax(o)`` and T = ``steps_per_sample``::

        dL/do = ((1 - alpha) / n * (p - Y) + 2 * alpha / (n * K) * (o - Y)) / T
    """
    rows, num_classes = logits.shape
    c_ce = (1 - alpha) / (rows * steps_per_sample)
    c_mse = 2 * alpha / (rows * num_classes * steps_per_sample)
    grad = torch.softmax(logits, dim=1).mul_(c_ce).add_(logits, alpha=c_mse)
    return grad.scatter_add_(1, labels.view(-1, 1), grad.new_full((rows, 1), -(c_ce + c_mse)))


class FTRLRegulariser:
    """``rho * ||W - W_hat||`` summed over the anchored parameters (``norm`` "l2" = squared L2, or "l1")."""

    def __init__(self, anchor: Mapping[str, Tensor], rho: float, norm: str = "l2") -> None:
        if norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.anchor = {name: t.detach().clone() for name, t in anchor.items()}
        self.rho = float(rho)
        self.norm = norm

    @classmethod
    def around(cls, model: nn.Module, rho: float, norm: str = "l2") -> FTRLRegulariser:
        """Anchor at the model's current parameters (the end of phase 1)."""
        return cls(dict(model.named_parameters()), rho, norm)

    def gradients(self, model: nn.Module) -> dict[str, Tensor]:
        """``{name: d(rho ||W - W_hat||)/dW}`` per anchored parameter: ``2 rho (W - W_hat)`` for "l2",
        ``rho sign(W - W_hat)`` for "l1" (0 where equal, as autograd's ``abs``)."""
        params = dict(model.named_parameters())
        missing = self.anchor.keys() - params.keys()
        if missing:
            raise KeyError(f"anchor names parameters the model lacks: {sorted(missing)}")
        out = {}
        for name, w_hat in self.anchor.items():
            diff = params[name].detach() - w_hat.to(params[name].device, params[name].dtype)
            out[name] = diff.sign_().mul_(self.rho) if self.norm == "l1" else diff.mul_(2 * self.rho)
        return out

    def __call__(self, model: nn.Module) -> Tensor:
        params = dict(model.named_parameters())
        missing = self.anchor.keys() - params.keys()
        if missing:
            raise KeyError(f"anchor names parameters the model lacks: {sorted(missing)}")
        total = torch.zeros(
            (), dtype=next(iter(params.values())).dtype, device=next(iter(params.values())).device
        )
        for name, w_hat in self.anchor.items():
            diff = params[name] - w_hat.to(params[name].device, params[name].dtype)
            total = total + (diff.abs().sum() if self.norm == "l1" else diff.pow(2).sum())
        return self.rho * total
