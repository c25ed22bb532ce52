"""OnlineLearner: one persistent spiking network that learns while a batch of streams advances.

Per labelled step t (Algorithm 1 of the paper; labels -1 mark rows that only infer)::

    o[t] = model.step(frames[t], state)          forward; the state advances and is detached
    L[t] = ndot_loss(o[t][labelled], y) (+ rho ||W - W_hat||)
    L[t].backward()                              gradients of step t only (trace-driven weights)
    mode "online" (NDOT_O):     optimizer.step() now
    mode "accumulate" (NDOT_A): optimizer.step() every ``steps_per_sample`` labelled steps

With no labelled row the step runs under ``torch.no_grad``. Nothing of a step's graph survives it,
so memory is constant however many steps run. Prediction = argmax of the logits summed so far.

Backends of ``step`` (``backend=``): "autograd" (the reference: ``model.step`` and ``loss.backward()``),
"local" (``ndot_core.engine.local_step``: the same step without an autograd graph, a hand-written
backward of step t, channels-last tensors, a fused optimizer called through
``fused_update.FusedUpdate``; same logits, states and gradients up to float rounding) and "auto"
(local where ``local_plan.unsupported_reason`` finds nothing against it, else autograd).
``learn_sequence`` always uses autograd (``bptt`` and module hooks need it).

``compile=`` ("off", "on", "auto"; ``ndot_core.engine.compiled_step``) runs the local backend's
steps (learning and prediction) through ``torch.compile``, graphs by batch shape compiled in the
background: until a graph is ready, and for good after a compile error (one warning), the eager
local step runs.
"on" needs the local backend and a compiler (``ValueError`` otherwise); "auto" compiles where both are.

``cuda_graphs=`` ("off", "on", "auto"; ``ndot_core.engine.graph_step``) replays the local backend's
steps as CUDA graphs, one per bucket, with the state in static buffers. It takes the place of the
compiled step where it runs: "on" needs the local backend and a CUDA device (``ValueError``
otherwise); "auto" uses it where both are, else ``compile`` decides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from ndot_core.engine.compiled_step import COMPILE_MODES, CompiledStep, compile_unavailable
from ndot_core.engine.fast_step import FastStep
from ndot_core.engine.fused_update import FusedUpdate
from ndot_core.engine.graph_step import GRAPH_MODES, GraphStep, graphs_unavailable
from ndot_core.engine.local_plan import LocalBackendUnsupported, unsupported_reason
from ndot_core.engine.local_step import LocalStep, accumulate_grads
from ndot_core.engine.loss import FTRLRegulariser, ndot_loss, ndot_loss_grad
from ndot_core.engine.models import SpikingNetwork
from ndot_core.engine.rules import check_rule
from ndot_core.engine.sequence_losses import accumulated_gradients, check_labels, unrolled_losses
from ndot_core.engine.state import NetworkState

Fast = TypeVar("Fast", bound=FastStep)
log = logging.getLogger(__name__)
__all__ = ["BACKENDS", "MODES", "OPTIMIZERS", "OnlineLearner", "accumulated_gradients"]
MODES = ("online", "accumulate")
OPTIMIZERS = ("sgd", "adam")
BACKENDS = ("autograd", "local", "auto")


class OnlineLearner:
    """Model, optimizer, rule and mode; advances a batch of independent streams one step at a time.

    ``rule`` in ``RULES`` (``bptt`` only through ``learn_sequence``); ``mode`` "online" (NDOT_O) or
    "accumulate" (NDOT_A); ``optimizer`` "sgd" (with ``momentum``) or "adam"; ``lr`` defaults to 0.1
    for SGD and 1e-3 for Adam; ``alpha`` weighs MSE against CE (Eq. 13); ``steps_per_sample`` is the
    T of the loss and of the accumulate mode; ``regulariser`` adds the FTRL-OTTT term to every step.
    ``backend`` ("autograd", "local" or "auto", see the module docstring) computes ``step``; "local"
    raises ``LocalBackendUnsupported`` (a ``ValueError``) for a rule or model it does not cover, and
    at a step where a model module has forward hooks; "auto" uses autograd there instead.
    ``compile`` ("off", "on", "auto", see the module docstring) compiles the local backend's steps;
    ``cuda_graphs`` (the same modes) replays them as CUDA graphs instead, on a GPU. ``last_backend``
    says which one the latest ``step`` used ("autograd", "local", "compiled": either fast step).
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
        backend: str = "autograd",
        compile: str = "off",
        cuda_graphs: str = "off",
    ) -> None:
        self.rule = check_rule(rule)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
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
        self.backend = backend
        use_local = backend == "local" or (backend == "auto" and unsupported_reason(model, rule) is None)
        self.local: LocalStep | None = LocalStep(self.model, rule) if use_local else None
        self.compiled: FastStep | None = self._make_graphs(cuda_graphs) or self._make_compiled(compile)
        self.last_backend: str | None = None
        self.optimizer = self._make_optimizer()
        self._update = FusedUpdate(self.optimizer)
        self.version = 0  # optimizer steps taken
        self.pending_steps = 0  # labelled steps whose gradients wait for the next optimizer step
        #: When True, a labelled ``step`` only adds its gradients to ``.grad`` (``pending_steps`` + 1) and
        #: the caller applies them with ``apply_update`` (e.g. after reducing them over processes).
        self.hold_updates = False
        self._last_loss: Tensor | Callable[[], Tensor] | None = None
        self._deferred: Callable[[], None] | None = None  # the learning of a step(defer_learning=True)

    @property
    def last_loss(self) -> Tensor | None:
        """Loss of the latest learning ``step`` (or the sum of ``learn_sequence``'s), detached.

        The local backend does not need the loss value for its gradient; it computes it here, on first
        read, from the logits and labels it kept (the same ``ndot_loss`` call as the autograd path).
        """
        self.learn_pending()
        if callable(self._last_loss):
            self._last_loss = self._last_loss()
        return self._last_loss

    @last_loss.setter
    def last_loss(self, value: Tensor | None) -> None:
        self._last_loss = value

    def _make_graphs(self, cuda_graphs: str) -> GraphStep | None:
        """The CUDA graph step for ``cuda_graphs`` ("off", "on", "auto"), or None where it does not run."""
        return self._fast_step("cuda_graphs", cuda_graphs, GRAPH_MODES, graphs_unavailable, GraphStep)

    def _make_compiled(self, compile: str) -> CompiledStep | None:
        """The compiled step for ``compile`` ("off", "on", "auto"), or None where it does not run."""
        return self._fast_step("compile", compile, COMPILE_MODES, compile_unavailable, CompiledStep)

    def _fast_step(
        self,
        option: str,
        mode: str,
        modes: tuple[str, ...],
        unavailable: Callable[[torch.device], str | None],
        kind: type[Fast],
    ) -> Fast | None:
        """A ``kind`` fast step under ``option=mode``: None for "off", and for "auto" where it cannot
        run (the local backend and ``unavailable(device)`` say); "on" where it cannot is a ValueError."""
        if mode not in modes:
            raise ValueError(f"unknown {option} {mode!r}; expected one of {modes}")
        if mode == "off":
            return None
        reason = "it needs the local backend" if self.local is None else unavailable(self.device)
        if reason is not None:
            if mode == "on":
                raise ValueError(f"{option}='on' cannot run: {reason}")
            log.info("%s='auto': off here (%s)", option, reason)
            return None
        return kind(self.local, self.rule, self.alpha, self.steps_per_sample)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # The local backend takes the fused kernels (one call for every tensor); autograd keeps torch's
        # default implementation, the reference. Both compute the same update up to rounding.
        options: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            options["momentum"] = self.momentum
        kind = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.SGD
        if self.local is not None:
            try:
                return kind(params, fused=True, **options)
            except RuntimeError:  # a device or dtype without fused kernels
                pass
        return kind(params, **options)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.readout.weight.dtype

    def new_state(self, batch_size: int) -> NetworkState:
        """Resting state for ``batch_size`` streams on the learner's device (in the local backend's layout)."""
        state = self.model.new_state(batch_size, self.device)
        return state if self.local is None else state.with_memory_format(self.local.memory_format)

    def _loss(self, logits: Tensor, labels: Tensor, steps_per_sample: int) -> Tensor:
        loss = ndot_loss(logits, labels, self.alpha, steps_per_sample)
        return loss if self.regulariser is None else loss + self.regulariser(self.model)

    def _optimizer_step(self) -> None:
        if self.local is None:
            self.optimizer.step()  # the reference path: torch.optim as is
        else:  # the same fused kernel without torch.optim's per-step Python (fused_update.py)
            if self._update.optimizer is not self.optimizer:
                self._update = FusedUpdate(self.optimizer)
            self._update()
        # Zeroed, not freed: a long-running learner keeps one gradient buffer instead of
        # reallocating it every step, and its memory is the same from the first step on. (The local
        # backend's next step hands in fresh gradient tensors when nothing is pending; the zeros
        # keep ``.grad`` reading the same as on the autograd backend meanwhile.)
        if self.local is None:
            self.optimizer.zero_grad(set_to_none=False)
        else:  # the same, in one call (the local backend's gradients carry no graph to detach)
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
            torch._foreach_zero_([g for g in grads if g is not None])
        self.pending_steps = 0
        self.version += 1

    def step(
        self,
        frames: Tensor,
        labels: Tensor | None,
        state: NetworkState,
        defer_learning: bool = False,
        active: Tensor | None = None,
    ) -> Tensor:
        """Advance ``state`` (in place) by one frame per row; learn from labelled rows; return logits [B, K].

        ``frames`` [B, C, H, W]; ``labels`` [B] long with -1 for unlabelled rows, or None (no row
        labelled: pure inference under ``no_grad``). The returned logits (detached) come from this
        step's forward, before any weight update.

        ``active`` [B] bool (None: every row): only those rows step; the others keep their state
        exactly and learn nothing (their frames are not read, their logits mean nothing). Where the
        compiled step has the batch's graph ready (``steps_in_place``), one graph steps the whole
        batch, the selection fused into its state writes (no gather before, no scatter after);
        elsewhere the active rows are selected, stepped and written back (``NetworkState.assign``).

        ``defer_learning``: the step's backward and optimizer step wait for ``learn_pending`` (the caller
        answers from the logits and the state first). Anything that reads or changes the weights or the
        gradients runs the pending learning first (the next ``step`` included), so the updates are the
        same as without deferring. The compiled step computes its gradients with its forward and
        does not defer.
        """
        self.learn_pending()
        if self.rule == "bptt":
            raise ValueError("rule 'bptt' needs whole sequences: use learn_sequence, or an online rule")
        # labels and active rows are checked where the caller made them (the worker's: on the CPU, so a
        # GPU step waits for nothing here), then sent to the device without waiting (``_to_device``)
        if active is not None:
            active = torch.as_tensor(active).to(torch.bool)
            if active.shape != (state.batch_size,):
                raise ValueError(f"active has shape {tuple(active.shape)}, expected ({state.batch_size},)")
            if bool(active.all()):
                active = None
            elif state.masks or not self.steps_in_place(state.batch_size, labels is not None):
                return self._step_selected(frames, labels, state, defer_learning, active.to(self.device))
        frames = self._to_device(torch.as_tensor(frames)).to(self.dtype)
        learn_rows, learn_index, all_labelled = None, None, False
        if labels is not None:
            labels = torch.as_tensor(labels).to(torch.long)
            smallest, largest = check_labels(labels, state.batch_size, self.model.num_classes)
            if active is not None:  # (a row that does not step learns nothing)
                labels = labels.masked_fill(~active.to(labels.device), -1)
                smallest, largest = (int(v) for v in torch.aminmax(labels))
            all_labelled = smallest >= 0
            if largest >= 0 and not all_labelled and self.compiled is not None:  # (a fast step's rows)
                learn_index = self._to_device((labels >= 0).nonzero().flatten())
            labels = self._to_device(labels)
            learn_rows = labels >= 0 if largest >= 0 else None
        if active is not None:
            active = self._to_device(active)
        if self._use_local():
            stepped = self._local_step(frames, labels, learn_rows, learn_index, all_labelled, state, active)
            if stepped is None:  # the compiled graph did not serve the masked step (state untouched)
                return self._step_selected(frames, labels, state, defer_learning, active)
            logits, learn = stepped
        else:
            logits, learn = self._autograd_step(frames, labels, learn_rows, state)
        if learn is not None:
            if defer_learning:
                self._deferred = learn
            else:
                learn()
        return logits

    def steps_in_place(self, rows: int, learn: bool) -> bool:
        """Whether ``step(..., active=)`` on a state of ``rows`` rows runs as one compiled graph over
        all of them now (``learn``: with labels); else it gathers and scatters the active rows. Asks
        for the graph when it is not compiled yet (it compiles in the background)."""
        return self.compiled is not None and self._use_local() and self.compiled.ready(rows, learn)

    def _step_selected(
        self, frames: Tensor, labels: Tensor | None, state: NetworkState, defer: bool, active: Tensor
    ) -> Tensor:
        """``step`` with ``active`` by selection: the active rows stepped apart, then written back (on
        success only: a failing step leaves ``state`` as it was)."""
        rows = active.nonzero().flatten()
        sub = state.select(rows)
        frames = torch.as_tensor(frames)
        sub_labels = None if labels is None else torch.as_tensor(labels).to(self.device)[rows]
        sub_logits = self.step(frames.to(self.device)[rows], sub_labels, sub, defer)
        state.assign(rows, sub)
        logits = sub_logits.new_zeros((state.batch_size, sub_logits.shape[1]))
        return logits.index_copy_(0, rows, sub_logits)

    @property
    def learning_pending(self) -> bool:
        """A ``step(defer_learning=True)`` whose backward and optimizer step have not run yet."""
        return self._deferred is not None

    def learn_pending(self) -> bool:
        """Run the deferred backward and optimizer step, if any; returns whether one ran.

        If it raises, the error goes to the caller and that learning is not retried (the state the
        forward advanced stays); the caller decides what it means (the worker drops it and counts it).
        """
        learn, self._deferred = self._deferred, None
        if learn is None:
            return False
        learn()
        return True

    def _autograd_step(
        self, frames: Tensor, labels: Tensor | None, learn_rows: Tensor | None, state: NetworkState
    ) -> tuple[Tensor, Callable[[], None] | None]:
        """The reference step: ``model.step`` and ``loss.backward()``; returns (logits, its learning)."""
        self.last_backend = "autograd"
        if learn_rows is None:
            with torch.no_grad():
                return self.model.step(frames, state, self.rule), None
        logits = self.model.step(frames, state, self.rule, dropout_rows=learn_rows)

        def learn() -> None:
            loss = self._loss(logits[learn_rows], labels[learn_rows], self.steps_per_sample)
            loss.backward()
            self.last_loss = loss.detach()
            self._learned()

        return logits.detach(), learn

    def _learned(self) -> None:
        """A labelled step's gradients are in ``.grad``: count it, and step the optimizer when due."""
        self.pending_steps += 1
        if self._update_due():
            self._optimizer_step()

    def _use_local(self) -> bool:
        """Whether this step runs on the local backend ("auto" falls back to autograd where it cannot)."""
        if self.local is None:
            return False
        try:
            self.local.check(self.rule)
        except LocalBackendUnsupported:
            if self.backend == "local":
                raise
            return False
        return True

    def _to_device(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the learner's device; from the CPU to a GPU through pinned memory, not waited for
        (a copy from pageable memory would wait for the GPU's queue)."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _local_step(
        self,
        frames: Tensor,
        labels: Tensor | None,
        learn_rows: Tensor | None,
        learn_index: Tensor | None,
        all_labelled: bool,
        state: NetworkState,
        active: Tensor | None = None,
    ) -> tuple[Tensor, Callable[[], None] | None] | None:
        """``step`` on the local backend: the forward now; returns (logits, its learning: the hand-written
        backward and the same optimizer rules), the learning done already on the compiled step.
        ``learn_index``: the labelled rows' indices (None when every row or none is labelled).
        ``active`` (not every row) runs on the compiled step only: None when it did not serve."""
        assert self.local is not None
        compiled = None
        if self.compiled is not None and learn_rows is not None:
            compiled = self.compiled.run(frames, labels, state, active)  # None: not ready (or off)
        if compiled is not None:
            self.last_backend = "compiled"
            logits, grads = compiled
            self._local_learn(logits, labels, None if all_labelled else learn_index, grads)
            return logits, None
        if self.compiled is not None and learn_rows is None:
            logits = self.compiled.predict(frames, state, active)
            if logits is not None:
                self.last_backend = "compiled"
                return logits, None
        if active is not None:  # (its graph stopped serving since ``steps_in_place``: the caller selects)
            return None
        self.last_backend = "local"
        logits, tape = self.local.forward(frames, state, self.rule, learn_rows, all_labelled)
        if tape is None:
            return logits, None
        return logits, lambda: self._local_learn(logits, labels, tape.rows, None, tape)

    def _local_learn(
        self, logits: Tensor, labels: Tensor, rows: Tensor | None, grads: Any, tape: Any = None
    ) -> None:
        """The local step's learning: ``grads`` (the compiled step's) or the backward of ``tape``, the
        regulariser's gradients, then ``_learned``. ``tape`` is valid until the next forward."""
        assert self.local is not None
        if rows is None:
            rows_logits, rows_labels = logits.clone(), labels
        else:
            rows_logits, rows_labels = logits.index_select(0, rows), labels.index_select(0, rows)
        if grads is None:
            grad_logits = ndot_loss_grad(rows_logits, rows_labels, self.alpha, self.steps_per_sample)
            grads = self.local.backward(tape, grad_logits)
        penalty = None
        if self.regulariser is not None:
            params = dict(self.model.named_parameters())
            grads += [(params[name], g) for name, g in self.regulariser.gradients(self.model).items()]
            with torch.no_grad():
                penalty = self.regulariser(self.model)
        accumulate_grads(grads, replace=self.pending_steps == 0)  # nothing pending: buffers hold zeros
        alpha, steps = self.alpha, self.steps_per_sample

        def loss() -> Tensor:
            value = ndot_loss(rows_logits, rows_labels, alpha, steps)
            return value if penalty is None else value + penalty

        self._last_loss = loss
        self._learned()

    def _update_due(self) -> bool:
        """Whether a labelled ``step`` applies its gradients now (never while ``hold_updates``)."""
        if self.hold_updates:
            return False
        return self.mode == "online" or self.pending_steps >= self.steps_per_sample

    def held_gradients(self) -> list[Tensor]:
        """Every trainable parameter's ``.grad`` (zeros where none yet), in ``optimizer`` order."""
        self.learn_pending()
        grads = []
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                grads.append(param.grad)
        return grads

    def apply_update(self) -> None:
        """One optimizer step with the gradients in ``.grad`` (as set by the caller); ``version`` + 1."""
        self.learn_pending()
        self._optimizer_step()

    def drop_held(self) -> None:
        """Forget the gradients held so far (zeroed in place; ``pending_steps`` = 0)."""
        self._deferred = None
        torch._foreach_zero_(self.held_gradients())
        self.pending_steps = 0

    @staticmethod
    def predict(state: NetworkState) -> Tensor:
        """Predicted class per row: argmax of the logits summed over the steps seen, LongTensor [B]."""
        return state.readout_sum.argmax(dim=1)

    def learn_sequence(self, frames: Tensor, labels: Tensor) -> float:
        """Train on one batch ``frames`` [T, B, ...] from a fresh state; return the summed loss.

        Online rules: mode "online" steps the optimizer every time-step, "accumulate" once at the
        end; ``bptt`` unrolls the sequence and steps once. T = ``frames.shape[0]`` scales the loss.
        Gradients left pending by ``step`` are discarded first. Always on the autograd backend.
        """
        self.learn_pending()
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
        self._deferred = None
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
        self.learn_pending()
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
        self._deferred = None
        missing = {"model", "optimizer", "version"} - state.keys()
        if missing:
            raise KeyError(f"learner state lacks {sorted(missing)}")
        self.model.load_state_dict(state["model"])
        own = {key: self.optimizer.defaults.get(key) for key in ("fused", "foreach")}
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this learner's kernels, whichever saved the state
            group.update(own)
        self.optimizer.zero_grad(set_to_none=True)
        params = dict(self.model.named_parameters())
        for name, grad in state.get("pending_grads", {}).items():
            if name not in params:
                raise KeyError(f"pending gradient for unknown parameter {name!r}")
            params[name].grad = grad.detach().clone().to(params[name].device, params[name].dtype)
        self.version = int(state["version"])
        self.pending_steps = int(state.get("pending_steps", 0))
