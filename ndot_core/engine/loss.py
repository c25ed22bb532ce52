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
