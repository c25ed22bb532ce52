"""A spiking network advanced one time-step at a time over an explicit ``NetworkState``.

A network is a chain of spiking blocks and a linear readout::

    block l:  I^l[t] = W^l * x^l[t]          (TraceConv2d / TraceLinear; weight grad from the trace)
              s^l[t] = LIF(I^l[t])           (ndot_core.engine.neuron; e and a_hat by the rule)
              x^{l+1}[t] = post(m * s^l[t]),  a_hat_in^{l+1}[t] = post(m * a_hat^l[t])
    readout:  o[t] = W_o * x^{L+1}[t] + b    (logits; weight grad from the last trace)

``post`` is linear (average pooling, Scale, global average pooling, flatten) and ``m`` a dropout
mask fixed over a sequence, so both act on spikes and trace alike. The first block's input is the
data and carries no trace; under ``bptt`` no block uses a trace and autograd unrolls time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ndot_core.engine.layers import TraceConv2d, TraceLinear
from ndot_core.engine.neuron import LIFParameters, LIFState, lif_step
from ndot_core.engine.rules import check_rule
from ndot_core.engine.state import NetworkState


class SpikingBlock(nn.Module):
    """A weighted layer, a layer of LIF neurons, an optional fixed dropout mask and linear post-ops."""

    def __init__(
        self,
        weighted: TraceConv2d | TraceLinear,
        lif: LIFParameters,
        post: Sequence[nn.Module] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.weighted = weighted
        self.lif = lif
        self.post = nn.Sequential(*post)
        self.dropout = float(dropout)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        x_trace: Tensor | None,
        state: LIFState,
        first: Tensor,
        rule: str,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, LIFState]:
        """One step: returns (post-op spikes, post-op trace or None under bptt, new LIF state)."""
        current = self.weighted(x, x_trace)
        s, new_state = lif_step(current, state, self.lif, rule, first)
        trace = None if rule == "bptt" else new_state.trace
        if mask is not None:
            s = s * mask
            trace = None if trace is None else trace * mask
        out = self.post(s)
        out_trace = None if trace is None else self.post(trace)
        return out, out_trace, new_state


class SpikingNetwork(nn.Module):
    """Spiking blocks and a readout; ``step`` advances a ``NetworkState`` by one time-step."""

    def __init__(
        self,
        blocks: Sequence[SpikingBlock],
        readout: TraceLinear,
        *,
        name: str,
        in_channels: int,
        num_classes: int,
        input_size: tuple[int, int],
        flatten_input: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size
        self.flatten_input = flatten_input
        self.blocks = nn.ModuleList(blocks)
        self.readout = readout
        self.neuron_shapes = self._neuron_shapes()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one frame: (C, H, W)."""
        return (self.in_channels, *self.input_size)

    @torch.no_grad()
    def _neuron_shapes(self) -> list[tuple[int, ...]]:
        """Each block's neuron shape, from a dry run; checks that the readout fits."""
        x = torch.zeros(1, *self.input_shape)
        if self.flatten_input:
            x = x.flatten(1)
        shapes = []
        for i, block in enumerate(self.blocks):
            try:
                current = block.weighted(x)
            except RuntimeError as err:
                raise ValueError(
                    f"block {i} does not accept input of shape {tuple(x.shape[1:])}: {err}"
                ) from err
            shapes.append(tuple(current.shape[1:]))
            x = block.post(current)
        if x.dim() != 2 or x.shape[1] != self.readout.in_features:
            raise ValueError(
                f"readout expects {self.readout.in_features} features, blocks give {tuple(x.shape[1:])}"
            )
        return shapes

    def new_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> NetworkState:
        """Resting state (all zeros) for ``batch_size`` streams, on the parameters' device/dtype."""
        reference = self.readout.weight
        device = reference.device if device is None else torch.device(device)
        dtype = reference.dtype if dtype is None else dtype
        neurons = [LIFState.zeros(batch_size, shape, device, dtype) for shape in self.neuron_shapes]
        masks = {
            i: torch.zeros((batch_size, *self.neuron_shapes[i]), device=device, dtype=dtype)
            for i, block in enumerate(self.blocks)
            if block.dropout > 0
        }
        return NetworkState(
            neurons=neurons,
            readout_sum=torch.zeros(batch_size, self.num_classes, device=device, dtype=dtype),
            steps=torch.zeros(batch_size, device=device, dtype=torch.long),
            masks=masks,
        )

    def _check_input(self, x: Tensor, state: NetworkState) -> None:
        expected = (state.batch_size, *self.input_shape)
        if tuple(x.shape) != expected:
            raise ValueError(f"{self.name} step expects frames of shape {expected}, got {tuple(x.shape)}")
        if len(state.neurons) != len(self.blocks):
            raise ValueError(
                f"state has {len(state.neurons)} neuron layers, {self.name} has {len(self.blocks)}"
            )

    def _dropout_masks(self, state: NetworkState, first: Tensor, dropout_rows: Tensor | None) -> list:
        """Draw masks for rows starting a sequence; return each block's mask for this step (or None)."""
        active: list[Tensor | None] = [None] * len(self.blocks)
        for i, mask in state.masks.items():
            p = self.blocks[i].dropout
            if bool(first.any()):
                fresh = torch.bernoulli(torch.full_like(mask[first], 1 - p)) / (1 - p)
                mask = mask.clone()
                mask[first] = fresh
                state.masks[i] = mask
            if dropout_rows is not None and self.training and bool(dropout_rows.any()):
                rows = dropout_rows.view(-1, *([1] * (mask.dim() - 1)))
                active[i] = torch.where(rows, mask, torch.ones_like(mask))
        return active

    def step(self, x: Tensor, state: NetworkState, rule: str, dropout_rows: Tensor | None = None) -> Tensor:
        """Advance ``state`` (in place) by one time-step on frames ``x`` [B, C, H, W]; return logits [B, K].

        Under the online rules the new state is detached; under ``bptt`` the membranes keep their
        graph. ``dropout_rows`` ([B] bool) marks the rows that train (dropout applies to them only,
        in training mode). ``readout_sum`` and ``steps`` advance too.
        """
        check_rule(rule)
        self._check_input(x, state)
        first = state.steps == 0
        masks = self._dropout_masks(state, first, dropout_rows)
        h = x.flatten(1) if self.flatten_input else x
        h_trace: Tensor | None = None
        neurons = []
        for block, neuron, mask in zip(self.blocks, state.neurons, masks, strict=True):
            h, h_trace, new_neuron = block(h, h_trace, neuron, first, rule, mask)
            neurons.append(new_neuron)
        logits = self.readout(h, h_trace)
        state.neurons = neurons
        state.readout_sum = state.readout_sum + logits.detach()
        state.steps = state.steps + 1
        return logits
