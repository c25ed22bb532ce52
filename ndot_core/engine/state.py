"""NetworkState: the whole network's state for a batch of independent streams, one row per stream.

Explicit tensors only: per spiking layer the ``LIFState`` (membrane v, last spike s, dependency e,
trace a_hat), the dropout masks fixed over a sequence (only for layers with dropout), the readout
logits summed over the steps seen (``readout_sum`` [B, K], the prediction is its argmax) and the
number of steps each row has taken (``steps`` [B], 0 = a fresh sequence).

A row at rest is all zeros, so resetting a row is writing zeros into it; the dropout mask of a row
with ``steps == 0`` is drawn afresh by the model at its next step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ndot_core.engine.neuron import LIFState

Rows = Sequence[int] | Tensor
_NEURON_KEY = re.compile(r"^neurons\.(\d+)\.(v|s|e|trace)$")
_MASK_KEY = re.compile(r"^masks\.(\d+)$")


def index_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor.index_select(0, index)`` in the tensor's own layout (a channels-last tensor stays so)."""
    if (
        tensor.dim() == 4
        and not tensor.is_contiguous()
        and tensor.is_contiguous(memory_format=torch.channels_last)
    ):
        return tensor.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return tensor.index_select(0, index)


@dataclass
class NetworkState:
    """State of a spiking network for ``batch_size`` streams; see the module docstring."""

    neurons: list[LIFState]
    readout_sum: Tensor
    steps: Tensor
    masks: dict[int, Tensor] = field(default_factory=dict)

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Number of rows (streams)."""
        return int(self.steps.shape[0])

    @property
    def device(self) -> torch.device:
        return self.steps.device

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by its ``state_dict`` name (the same objects, not copies)."""
        out: dict[str, Tensor] = {}
        for i, neuron in enumerate(self.neurons):
            for name, tensor in neuron._asdict().items():
                out[f"neurons.{i}.{name}"] = tensor
        for i, mask in sorted(self.masks.items()):
            out[f"masks.{i}"] = mask
        out["readout_sum"] = self.readout_sum
        out["steps"] = self.steps
        return out

    def _map(self, fn: Callable[[Tensor], Tensor]) -> NetworkState:
        return NetworkState(
            neurons=[LIFState(*(fn(t) for t in neuron)) for neuron in self.neurons],
            readout_sum=fn(self.readout_sum),
            steps=fn(self.steps),
            masks={i: fn(m) for i, m in self.masks.items()},
        )

    def _index(self, rows: Rows) -> Tensor:
        """``rows`` (ints, a LongTensor or a bool mask [B]) as a LongTensor on this state's device."""
        index = torch.as_tensor(rows, device=self.device)
        if index.dtype == torch.bool:
            if index.shape != (self.batch_size,):
                raise IndexError(
                    f"bool row mask has shape {tuple(index.shape)}, expected ({self.batch_size},)"
                )
            return index.nonzero().flatten()
        index = index.to(torch.long).flatten()
        bad = (index < 0) | (index >= self.batch_size)
        if bad.any():
            at = int(bad.nonzero()[0])
            raise IndexError(
                f"row {int(index[at])} at position {at} is out of range for batch size {self.batch_size}"
            )
        return index

    # -- rows ----------------------------------------------------------------------------------------
    def reset_rows(self, rows: Rows) -> None:
        """Fresh (zero) state for ``rows`` only, in place; every other row stays bit-identical."""
        index = self._index(rows)
        if index.numel() == 0:
            return
        for tensor in self.tensors().values():
            tensor.index_fill_(0, index, 0)

    def select(self, rows: Rows) -> NetworkState:
        """A copy of ``rows`` (in the given order) as a new state, each tensor in its own layout."""
        index = self._index(rows)
        return self._map(lambda t: index_rows(t, index))

    def assign(self, rows: Rows, other: NetworkState) -> None:
        """Write ``other``'s rows into this state at ``rows`` (in place)."""
        index = self._index(rows)
        if index.numel() != other.batch_size:
            raise ValueError(f"assign got {index.numel()} rows but the other state has {other.batch_size}")
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys():
            raise ValueError(f"states differ in layout: {sorted(mine.keys() ^ theirs.keys())}")
        for name, tensor in mine.items():
            tensor.index_copy_(0, index, theirs[name].detach().to(tensor.device, tensor.dtype))

    def narrow(self, start: int, length: int) -> NetworkState:
        """Rows ``start .. start + length - 1`` as *views* (no copy): a step that rebinds its state's
        tensors (as ``OnlineLearner.step`` does) leaves this state unchanged until ``write_rows``."""
        if not 0 <= start <= start + length <= self.batch_size:
            raise IndexError(f"rows {start}..{start + length - 1} outside batch size {self.batch_size}")
        return self._map(lambda t: t.narrow(0, start, length))

    def write_rows(self, start: int, other: NetworkState) -> None:
        """Write ``other``'s rows into rows ``start ..`` in place: ``assign`` for a contiguous run of
        rows, as one block copy per tensor."""
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys():
            raise ValueError(f"states differ in layout: {sorted(mine.keys() ^ theirs.keys())}")
        for name, tensor in mine.items():
            tensor.narrow(0, start, other.batch_size).copy_(theirs[name].detach())

    @staticmethod
    def cat(states: Sequence[NetworkState]) -> NetworkState:
        """Stack the rows of several states of the same network."""
        if not states:
            raise ValueError("cat needs at least one state")
        parts = [s.tensors() for s in states]
        for i, p in enumerate(parts[1:], start=1):
            if p.keys() != parts[0].keys():
                raise ValueError(f"state {i} differs in layout from state 0")
        return NetworkState.from_state_dict({k: torch.cat([p[k] for p in parts]) for k in parts[0]})

    # -- whole state ---------------------------------------------------------------------------------
    def detach(self) -> NetworkState:
        """The same values without autograd history."""
        return self._map(Tensor.detach)

    def clone(self) -> NetworkState:
        return self._map(Tensor.clone)

    def with_memory_format(self, memory_format: torch.memory_format) -> NetworkState:
        """The same values with every 4-d tensor in ``memory_format`` (e.g. ``torch.channels_last``)."""
        return self._map(lambda t: t.contiguous(memory_format=memory_format) if t.dim() == 4 else t)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NetworkState:
        """Move to ``device``; floating tensors (not ``steps``) also to ``dtype`` when given."""
        return self._map(lambda t: t.to(device, dtype) if (dtype and t.is_floating_point()) else t.to(device))

    def state_dict(self) -> dict[str, Tensor]:
        """Plain named tensors (detached, contiguous); loadable by ``from_state_dict``."""
        return {k: t.detach().contiguous() for k, t in self.tensors().items()}

    @staticmethod
    def from_state_dict(tensors: dict[str, Tensor]) -> NetworkState:
        """Rebuild a state from ``state_dict()`` output; raises ``ValueError`` naming a bad key."""
        neurons: dict[int, dict[str, Tensor]] = {}
        masks: dict[int, Tensor] = {}
        for key, tensor in tensors.items():
            if not isinstance(tensor, Tensor):
                raise ValueError(f"state entry {key!r} is {type(tensor).__name__}, not a tensor")
            if m := _NEURON_KEY.match(key):
                neurons.setdefault(int(m[1]), {})[m[2]] = tensor
            elif m := _MASK_KEY.match(key):
                masks[int(m[1])] = tensor
            elif key not in ("readout_sum", "steps"):
                raise ValueError(f"unexpected state entry {key!r}")
        for key in ("readout_sum", "steps"):
            if key not in tensors:
                raise ValueError(f"state entry {key!r} is missing")
        if sorted(neurons) != list(range(len(neurons))):
            raise ValueError(f"neuron layers {sorted(neurons)} are not numbered 0..{len(neurons) - 1}")
        layers = []
        for i in range(len(neurons)):
            missing = set(LIFState._fields) - neurons[i].keys()
            if missing:
                raise ValueError(f"neurons.{i} lacks {sorted(missing)}")
            layers.append(LIFState(**neurons[i]))
        state = NetworkState(layers, tensors["readout_sum"], tensors["steps"].to(torch.long), masks)
        for key, tensor in state.tensors().items():
            if tensor.dim() == 0 or tensor.shape[0] != state.batch_size:
                raise ValueError(
                    f"state entry {key!r} has shape {tuple(tensor.shape)}; expected {state.batch_size} rows"
                )
        return state
