"""FusedUpdate: ``optimizer.step()`` of a fused Adam or SGD, without ``torch.optim``'s per-step Python.

A ``torch.optim.Adam(fused=True)`` step is one kernel over every tensor, but ``Optimizer.step``
wraps it in Python that runs on every call: the profiler label and the step hooks, then per
parameter group a walk over every parameter (its gradient, its state, lazy initialisation), a
regrouping of all the tensors by device and dtype, and only then the kernel. For the service's model
(13 tensors, 81 k weights) that wrapper costs ~0.1 ms a step on one core, ~10 % of a batch-1
learning step whose update itself (the kernel) takes 60 us.

``FusedUpdate`` calls the very kernels ``torch.optim`` calls, with the same arguments in the same
order (``torch._fused_adam_`` after ``torch._foreach_add_`` of the step counts; ``torch._fused_sgd_``),
on lists gathered once from the optimizer's own state, so the update is the same to the bit and the
optimizer stays the owner of its state (``state_dict`` / ``load_state_dict`` unchanged). Only the
gradients are read afresh each call (the local backend hands in new gradient tensors). No library
offers this: ``torch.compile`` of ``optimizer.step`` costs a dynamo guard check of its own (~60 us
here) and a second compiled artifact.

It takes ``torch.optim``'s own ``step()`` whenever a call is outside what it mirrors: state not yet
initialised (the first step creates it), a parameter without gradient, more than one parameter
group, tensors on several devices or dtypes, complex parameters, amsgrad, a hyper-parameter given as
a tensor, a non-fused optimizer, a step hook registered, or the optimizer's ``state`` /
``param_groups`` replaced (``load_state_dict``): after that step it gathers its lists again. The
hyper-parameters are read from the group on every call, so a schedule that sets ``group["lr"]``
takes effect as it does with ``torch.optim``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["FusedUpdate"]

_ADAM_KEYS = ("lr", "betas", "weight_decay", "eps", "amsgrad", "maximize", "decoupled_weight_decay")
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def _plain(value: Any) -> bool:
    """A hyper-parameter the fast path passes as ``torch.optim`` would: a Python number or bool."""
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, (int, float, bool))


class FusedUpdate:
    """``update()`` = ``optimizer.step()`` for a ``torch.optim.Adam`` or ``SGD`` built with ``fused=True``.

    See the module docstring: the same kernels on lists gathered once; ``torch.optim``'s ``step()``
    wherever a call is outside the fast path. ``fast_steps`` counts the calls that took the fast path.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.fast_steps = 0
        self._kind = "adam" if type(optimizer) is torch.optim.Adam else "sgd"
        self._supported = type(optimizer) in (torch.optim.Adam, torch.optim.SGD)
        self._lists: tuple[list[Tensor], ...] | None = None
        self._params: list[Tensor] = []
        self._state: Any = None
        self._groups: Any = None

    def __call__(self) -> None:
        if self._lists is None or not self._current():
            self._slow()
            return
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):  # torch.optim skips such a parameter: so does its step()
            self._slow()
            return
        group = self.optimizer.param_groups[0]
        keys = _ADAM_KEYS if self._kind == "adam" else _SGD_KEYS
        if not all(_plain(group.get(key, False)) for key in keys):
            self._slow()
            return
        with torch.no_grad():
            if self._kind == "adam":
                self._adam(group, grads)
            else:
                self._sgd(group, grads)
        self.fast_steps += 1

    def _current(self) -> bool:
        """The gathered lists still describe the optimizer: same state and groups, no hooks since."""
        optimizer = self.optimizer
        return (
            optimizer.state is self._state
            and optimizer.param_groups is self._groups
            and len(self._groups) == 1
            and not optimizer._optimizer_step_pre_hooks
            and not optimizer._optimizer_step_post_hooks
            and not _global_optimizer_pre_hooks
            and not _global_optimizer_post_hooks
        )

    def _adam(self, group: dict[str, Any], grads: list[Tensor]) -> None:
        # As torch.optim.adam._fused_adam on one device and dtype, without grad scaling.
        exp_avgs, exp_avg_sqs, steps = self._lists
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay", False) else torch._fused_adam_
        kernel(
            self._params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            grad_scale=None,
            found_inf=None,
        )

    def _sgd(self, group: dict[str, Any], grads: list[Tensor]) -> None:
        # As torch.optim.sgd._fused_sgd after its first step (momentum buffers exist, or none needed).
        (buffers,) = self._lists
        torch._fused_sgd_(
            self._params,
            grads,
            buffers if group["momentum"] != 0 else [],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            is_first_step=False,
            grad_scale=None,
            found_inf=None,
        )

    def _slow(self) -> None:
        """``torch.optim``'s own step, then gather the lists for the next calls where they apply."""
        self.optimizer.step()
        self._lists = self._gather()

    def _gather(self) -> tuple[list[Tensor], ...] | None:
        """The state lists of the fast path, or None where a call must take ``torch.optim``'s step."""
        optimizer = self.optimizer
        self._state, self._groups = optimizer.state, optimizer.param_groups
        if not self._supported or len(optimizer.param_groups) != 1:
            return None
        group = optimizer.param_groups[0]
        params = list(group["params"])
        if not params or not group.get("fused") or group.get("differentiable") or group.get("amsgrad"):
            return None
        if group.get("capturable") or group.get("foreach"):
            return None
        if len({(p.device, p.dtype) for p in params}) != 1 or any(torch.is_complex(p) for p in params):
            return None
        if any(p.grad is None or p.grad.is_sparse for p in params):
            return None
        self._params = params
        if self._kind == "adam":
            states = [optimizer.state.get(p) for p in params]
            if any(not s or set(s) != {"step", "exp_avg", "exp_avg_sq"} for s in states):
                return None
            return (
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
            )
        if group["momentum"] == 0:
            return ([],)
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
        if any(b is None for b in buffers):
            return None
        return (buffers,)
