"""FastStep: what the learner's fast local steps share -- ``CompiledStep`` (torch.compile) and
``GraphStep`` (CUDA graphs).

Both run the pure functions of ``step_graph`` on a state's rows and answer the learner through the same
three calls; each says how one step runs (``_call``). A fast step never fails a caller: where it cannot
run a step it returns None and the learner's eager local step serves.
"""

from __future__ import annotations

from torch import Tensor, nn

from ndot_core.engine.local_step import Grads, LocalStep
from ndot_core.engine.state import NetworkState
from ndot_core.engine.step_graph import forward_function, step_function, step_parameters, unsupported_reason


def state_tensors(state: NetworkState) -> list[Tensor]:
    """``[steps, readout_sum, *neurons]``, every block's (v, s, e, trace) flat: the state as the
    functions of ``step_graph`` take it and return it."""
    return [state.steps, state.readout_sum, *(t for neuron in state.neurons for t in neuron)]


def rebind(state: NetworkState, tensors: list[Tensor]) -> None:
    """Point ``state`` at ``tensors`` (in the order of ``state_tensors``): a step's new state."""
    state.steps, state.readout_sum = tensors[0], tensors[1]
    neurons = tensors[2:]
    state.neurons = [type(n)(*neurons[4 * i : 4 * i + 4]) for i, n in enumerate(state.neurons)]


class FastStep:
    """``run`` and ``predict`` over a subclass's ``_call``, for ``local``'s network under ``rule``;
    ``params``: the step's parameters in the order of its gradients (None where a layer has none);
    ``failure``: why it is off for good, or None."""

    def __init__(self, local: LocalStep, rule: str, alpha: float, steps_per_sample: int) -> None:
        self.local = local
        self._args = (rule, alpha, steps_per_sample)
        self.params: list[nn.Parameter | None] = step_parameters(local)
        self.failure: str | None = unsupported_reason(local)
        #: The pure functions to run, by ``learn``: the learning step and the prediction step.
        self._functions = {True: step_function(local, *self._args), False: forward_function(local, rule)}

    def ready(self, rows: int, learn: bool) -> bool:
        """Whether a step of ``rows`` rows runs on this fast step now (``learn``: a learning step)."""
        raise NotImplementedError

    def _call(
        self,
        learn: bool,
        frames: Tensor,
        labels: Tensor | None,
        state: NetworkState,
        active: Tensor | None,
    ) -> tuple | None:
        """One step of checked inputs and a state without dropout masks: ``state`` rebound to its new
        tensors, ``(logits, *rest)`` back (rest: the gradients of a learning step); None, with the state
        untouched, where this step cannot run it."""
        raise NotImplementedError

    def _step(
        self, learn: bool, frames: Tensor, labels: Tensor | None, state: NetworkState, active: Tensor | None
    ) -> tuple | None:
        """``_call`` where it may run: frames checked against the state; a state with dropout masks (drawn
        per sequence, which the pure functions leave out) runs eagerly."""
        self.local.model._check_input(frames, state)
        return None if state.masks else self._call(learn, frames, labels, state, active)

    def _kept(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """The gradients as the caller may keep them (a subclass copies what its next step overwrites)."""
        return grads

    def run(
        self, frames: Tensor, labels: Tensor, state: NetworkState, active: Tensor | None = None
    ) -> tuple[Tensor, Grads] | None:
        """One step as ``LocalStep.forward`` + ``backward`` on every row, or None: run the eager step.

        ``labels`` [B] long, -1 for rows that do not learn (at least one row learns). ``active`` [B]
        bool (None: every row): rows not active keep their state and learn nothing (``step_graph``).
        On success the state advances (rebound, as the eager step does) and ``(logits [B, K],
        [(param, grad)])`` come back, the gradients those of the labelled active rows' loss. None
        where this step does not run the batch (off, no graph for its size, or not ready yet).
        """
        out = self._step(True, frames, labels, state, active)
        if out is None:
            return None
        logits, grads = out
        pairs = [(p, g) for p, g in zip(self.params, self._kept(grads), strict=True) if p is not None]
        return logits, pairs

    def predict(self, frames: Tensor, state: NetworkState, active: Tensor | None = None) -> Tensor | None:
        """One step with no row learning (``LocalStep.forward`` without a tape): the logits [B, K], the
        state advanced (``active`` as in ``run``); or None (as ``run``): run the eager step."""
        out = self._step(False, frames, None, state, active)
        return None if out is None else out[0]
