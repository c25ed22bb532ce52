"""The streams' neuron states as one compact table: live stream i owns row i, rows 0..n-1, no holes.

A tick steps the streams that have a frame ready. When that is every live stream (the usual case at
real time), the batch *is* the table: the learner steps it as it is and rebinds its tensors, with
no gather before and no scatter after. Otherwise the rows are one contiguous run (views, one block
copy back) or scattered (``select`` / ``assign``). Rows are kept compact by ``fit``: after streams
come or go (rarely, next to ticks), the table is rebuilt in row order and the streams renumbered.

Failure isolation holds on every path: ``OnlineLearner.step`` rebinds a state's tensors instead of
writing into them, so the tensors held before a step are the state before it (``restore``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ndot_core import NetworkState, OnlineLearner
from service.worker.streams import StreamRegistry


def shallow(state: NetworkState) -> NetworkState:
    """The same tensors in a new holder: what the state is now, whatever a step rebinds later."""
    return NetworkState(list(state.neurons), state.readout_sum, state.steps, dict(state.masks))


class StateTable:
    """One ``NetworkState`` row per live stream of ``registry``, rows ``0 .. len(registry) - 1``."""

    def __init__(self, learner: OnlineLearner, state: NetworkState | None = None) -> None:
        self.learner = learner
        self.state = learner.new_state(0) if state is None else state

    def fit(self, registry: StreamRegistry) -> None:
        """Make the table exactly the registry's streams in row order (a no-op when it already is).

        New streams (rows past the table) get resting rows; removed streams' rows go; the streams are
        renumbered 0..n-1 in their current row order.
        """
        slots = sorted(registry, key=lambda slot: slot.row)
        rows = [slot.row for slot in slots]
        if rows == list(range(self.state.batch_size)):
            return
        size = self.state.batch_size
        if rows and rows[-1] >= size:  # new streams: resting rows up to the highest one
            grown = self.learner.new_state(rows[-1] + 1 - size)
            self.state = NetworkState.cat([self.state, grown]) if size else grown
        self.state = self.state.select(rows)
        registry.renumber(slots)

    def batch_of(self, rows: Sequence[int]) -> tuple[NetworkState, str]:
        """The rows (sorted, distinct) to step, and how to put them back (``put``)."""
        if len(rows) == self.state.batch_size:
            return self.state, "whole"
        start = rows[0]
        if rows[-1] - start == len(rows) - 1:
            return self.state.narrow(start, len(rows)), "run"
        return self.state.select(list(rows)), "scattered"

    def put(self, rows: Sequence[int], sub: NetworkState, how: str) -> None:
        """Write a stepped batch back (nothing to do for the whole table: it was stepped as it is)."""
        if how == "run":
            self.state.write_rows(rows[0], sub)
        elif how == "scattered":
            self.state.assign(list(rows), sub)

    def reset_rows(self, rows: Sequence[int], copy: bool = False) -> None:
        """Put ``rows`` at rest, in place; ``copy``: in a copy of the table (the tensors before stay as
        they were, e.g. for a step's pending learning that holds them)."""
        if copy:
            self.state = self.state.clone()
        self.state.reset_rows(list(rows))
