"""OnlineLearner: one persistent spiking network that learns while a batch of streams advances.

Per labelled step t (Algorithm 1 of the paper; labels -1 mark rows that only infer)::

    o[t] = model.step(frames[t], state)          forward; the state advances and is detached
    L[t] = ndot_loss(o[t][labelled], y) (+ rho ||W - W_hat||)
    L[t].backward()                              gradients of step t only (trace-driven weights)
    mode "online" (NDOT_O):     optimizer.step() now
    mode "accumulate" (NDOT_A): optimizer.step() every ``steps_per_sample`` labelled steps

With no labelled row the step runs under ``torch.no_grad``. Nothing of a step's graph survives it,
so memory is constant however many steps run. Prediction = argmax of the logits summed so far.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ndot_core.engine.loss import FTRLRegulariser, ndot_loss
from ndot_core.engine.models import SpikingNetwork
from ndot_core.engine.rules import check_rule
from ndot_core.engine.state import NetworkState

MODES = ("online", "accumulate")
OPTIMIZERS = ("sgd", "adam")


def _check_labels(labels: Tensor, batch_size: int, num_classes: int, allow_unlabelled: bool = True) -> None:
    if labels.shape != (batch_size,):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({batch_size},)")
    low = -1 if allow_unlabelled else 0
    bad = (labels < low) | (labels >= num_classes)
    if bad.any():
        at = int(bad.nonzero()[0])
        raise ValueError(f"label {int(labels[at])} at row {at} is outside [{low}, {num_classes})")


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
    _check_labels(labels, batch, model.num_classes)
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


class OnlineLearner:
    """Model, optimizer, rule and mode; advances a batch of independent streams one step at a time.

    ``rule`` in ``RULES`` (``bptt`` only through ``learn_sequence``); ``mode`` "online" (NDOT_O) or
    "accumulate" (NDOT_A); ``optimizer`` "sgd" (with ``momentum``) or "adam"; ``lr`` defaults to 0.1
    for SGD and 1e-3 for Adam; ``alpha`` weighs MSE against CE (Eq. 13); ``steps_per_sample`` is the
    T of the loss and of the accumulate mode; ``regulariser`` adds the FTRL-OTTT term to every step.
    """

    def __init__(
        self,
        model: SpikingNetwork,
        rule: str = "ndot",
        mode: str = "online",
        optimizer: str = "sgd",
        lr: float | None = None,
        momentum: float = 0.9,
        alpha: float = 0.1,
        steps_per_sample: int = 10,
        device: torch.device | str = "cpu",
        weight_decay: float = 0.0,
        regulariser: FTRLRegulariser | None = None,
    ) -> None:
        self.rule = check_rule(rule)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
        if steps_per_sample < 1:
            raise ValueError(f"steps_per_sample must be >= 1, got {steps_per_sample}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.mode = mode
        self.optimizer_name = optimizer
        self.lr = float(lr if lr is not None else (0.1 if optimizer == "sgd" else 1e-3))
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.alpha = float(alpha)
        self.steps_per_sample = int(steps_per_sample)
        self.regulariser = regulariser
        self.optimizer = self._make_optimizer()
        self.version = 0  # optimizer steps taken
        self.pending_steps = 0  # labelled steps whose gradients wait for the next optimizer step
        self.last_loss: Tensor | None = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.readout.weight.dtype

    def new_state(self, batch_size: int) -> NetworkState:
        """Resting state for ``batch_size`` streams on the learner's device."""
        return self.model.new_state(batch_size, self.device)

    def _loss(self, logits: Tensor, labels: Tensor, steps_per_sample: int) -> Tensor:
        loss = ndot_loss(logits, labels, self.alpha, steps_per_sample)
        return loss if self.regulariser is None else loss + self.regulariser(self.model)

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        # Zeroed, not freed: a long-running learner keeps one gradient buffer instead of
        # reallocating it every step, and its memory is the same from the first step on.
        self.optimizer.zero_grad(set_to_none=False)
        self.pending_steps = 0
        self.version += 1

    def step(self, frames: Tensor, labels: Tensor | None, state: NetworkState) -> Tensor:
        """Advance ``state`` (in place) by one frame per row; learn from labelled rows; return logits [B, K].

        ``frames`` [B, C, H, W]; ``labels`` [B] long with -1 for unlabelled rows, or None (no row
        labelled: pure inference under ``no_grad``). The returned logits (detached) come from this
        step's forward, before any weight update.
        """
        if self.rule == "bptt":
            raise ValueError("rule 'bptt' needs whole sequences: use learn_sequence, or an online rule")
        frames = frames.to(self.device, self.dtype)
        learn_rows = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=self.device).to(torch.long)
            _check_labels(labels, state.batch_size, self.model.num_classes)
            learn_rows = labels >= 0
            if not bool(learn_rows.any()):
                learn_rows = None
        if learn_rows is None:
            with torch.no_grad():
                return self.model.step(frames, state, self.rule)
        logits = self.model.step(frames, state, self.rule, dropout_rows=learn_rows)
        loss = self._loss(logits[learn_rows], labels[learn_rows], self.steps_per_sample)
        loss.backward()
        self.last_loss = loss.detach()
        self.pending_steps += 1
        if self.mode == "online" or self.pending_steps >= self.steps_per_sample:
            self._optimizer_step()
        return logits.detach()

    @staticmethod
    def predict(state: NetworkState) -> Tensor:
        """Predicted class per row: argmax of the logits summed over the steps seen, LongTensor [B]."""
        return state.readout_sum.argmax(dim=1)

    def learn_sequence(self, frames: Tensor, labels: Tensor) -> float:
        """Train on one batch ``frames`` [T, B, ...] from a fresh state; return the summed loss.

        Online rules: mode "online" steps the optimizer every time-step, "accumulate" once at the
        end; ``bptt`` unrolls the sequence and steps once. T = ``frames.shape[0]`` scales the loss.
        Gradients left pending by ``step`` are discarded first.
        """
        frames = frames.to(self.device, self.dtype)
        labels = torch.as_tensor(labels, device=self.device).to(torch.long)
        self.optimizer.zero_grad(set_to_none=False)
        self.pending_steps = 0
        losses = unrolled_losses(self.model, frames, labels, self.rule, self.alpha, self.regulariser)
        if self.rule == "bptt":
            total = torch.stack(list(losses)).sum()
            total.backward()
            self._optimizer_step()
            return float(total.detach())
        total_value = torch.zeros((), dtype=torch.float64)
        for loss in losses:
            loss.backward()
            total_value += loss.detach().to("cpu", torch.float64)
            if self.mode == "online":
                self._optimizer_step()
            else:
                self.pending_steps += 1
        if self.mode == "accumulate":
            self._optimizer_step()
        self.last_loss = total_value
        return float(total_value)

    def reset_weights(self, seed: int | None = None) -> None:
        """Re-initialise every parameter (seeded when ``seed`` is given) and the optimizer; version = 0."""
        with torch.random.fork_rng(
            devices=[] if self.device.type != "cuda" else [self.device], enabled=seed is not None
        ):
            if seed is not None:
                torch.manual_seed(seed)
            for module in self.model.modules():
                if module is not self.model and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        for param in self.model.parameters():
            param.grad = None
        self.optimizer = self._make_optimizer()
        self.version = 0
        self.pending_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer state, counters and pending gradients (tensors, numbers, strings only).

        In mode "accumulate" between optimizer steps the gradients gathered so far are included, so a
        restore continues exactly where the save left off.
        """
        pending = {
            name: p.grad.detach().clone()
            for name, p in self.model.named_parameters()
            if p.grad is not None and self.pending_steps > 0
        }
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "pending_steps": self.pending_steps,
            "pending_grads": pending,
            "rule": self.rule,
            "mode": self.mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (weights, optimizer, counters, pending gradients)."""
        missing = {"model", "optimizer", "version"} - state.keys()
        if missing:
            raise KeyError(f"learner state lacks {sorted(missing)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        params = dict(self.model.named_parameters())
        for name, grad in state.get("pending_grads", {}).items():
            if name not in params:
                raise KeyError(f"pending gradient for unknown parameter {name!r}")
            params[name].grad = grad.detach().clone().to(params[name].device, params[name].dtype)
        self.version = int(state["version"])
        self.pending_steps = int(state.get("pending_steps", 0))
