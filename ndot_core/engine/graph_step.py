"""GraphStep: the local step replayed as CUDA graphs, one per bucket, its inputs and state in static buffers.

On a GPU a step of a small batch is bound by kernel launches (hundreds a step), not by arithmetic.
A CUDA graph records the step's kernels once and replays them with one launch. A graph replays on
fixed memory, so each bucket (``GRAPH_BUCKETS``: 1, 2, 4, .., 1024 rows: a GPU steps a thousand
cameras in one batch) owns static buffers::

    inputs:  frames [P, C, H, W], labels [P], active [P]        copied in every step (small)
    state:   steps [P], readout_sum [P, K], per block (v, s, e, trace) [P, ...]
    outputs: logits [P, K], gradients (the learning step)       written by the replay

The graph runs the pure functions of ``step_graph`` (``step_function`` for a learning step,
``forward_function`` for a prediction step) and ends by writing the new state into the state
buffers: a state that a replay advanced *is* those buffers (the caller's ``NetworkState`` is rebound
to their first B rows), so the next step of the same state copies nothing in. A step of B < P rows
runs the padding rows inactive (``active`` False, label -1: they keep their values and learn
nothing); they hold zeros or rows an earlier state left, finite either way. The weights are the
model's parameters themselves (updated in place by the fused optimizer: fixed addresses).

One state at a time lives in a bucket's buffers. When another state steps on the same bucket, the
one there is first moved out (its tensors cloned and rebound), then the new one is copied in: two
tables that alternate (the live rows and the replays) stay correct, each paying one copy a switch,
and a replay writes no tensor of a state other than the one it steps (as the eager step: e.g. the
table that a stepped ``narrow`` of its rows came from keeps its values). Views taken of a state held
in the buffers follow it only while it stays there: keep rows with ``clone``.
Gradients and logits are cloned out of the graph's output buffers (the next replay overwrites them;
a gradient may wait for the optimizer across steps).

Nothing on the way synchronises the host: copies in are device-to-device (the learner sends frames,
labels and active rows from pinned memory without waiting: ``OnlineLearner.step``), the replay is
asynchronous, and the caller reads the predictions when it needs them.

A bucket's graph is captured the first time a step needs it, on the serving thread: two warm-up calls
on a side stream, then the capture on the step's one capture stream, on the model's device (whatever
device the thread has current). Any error there puts the thread back on the stream it served on,
logs one warning and turns the graph step off for good (``failure``): the caller's eager local step
serves. A failed replay is a CUDA error, which leaves the device unusable anyway; a failed copy-in
leaves the caller's state untouched.

``capture=False`` runs the same buffers and calls without recording a graph (the function is called
where the graph would replay): it is how the buffer logic is tested on a machine without a GPU
(``tests/test_graph_step.py``), against the eager step, bit for bit. The capture itself is covered
by the tests marked ``cuda``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ndot_core.engine.compiled_step import bucket_for
from ndot_core.engine.fast_step import FastStep, rebind, state_tensors
from ndot_core.engine.local_step import LocalStep
from ndot_core.engine.state import NetworkState

GRAPH_MODES = ("off", "on", "auto")
GRAPH_BUCKETS: tuple[int, ...] = tuple(2**k for k in range(11))  # 1, 2, 4, .., 1024 rows
WARMUP_CALLS = 2  # calls on a side stream before the capture (cuDNN/cuBLAS pick and cache their kernels)
log = logging.getLogger(__name__)


def graphs_unavailable(device: torch.device | str) -> str | None:
    """Why CUDA graphs cannot run on ``device``, or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type!r}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


@dataclass
class Bucket:
    """One bucket's static buffers and its replay (see the module docstring)."""

    learn: bool
    size: int
    frames: Tensor
    labels: Tensor | None
    active: Tensor
    steps: Tensor
    readout_sum: Tensor
    neurons: list[Tensor]
    replay: Callable[[], None] = lambda: None
    outputs: tuple = ()  # (logits, grads) after a replay
    #: The states whose tensors are (were last rebound to) the state buffers, by id: weak references.
    holders: dict[int, weakref.ReferenceType[NetworkState]] = field(default_factory=dict)
    graph: object = field(default=None, repr=False)  # the torch.cuda.CUDAGraph, with capture

    @property
    def state_buffers(self) -> list[Tensor]:
        return [self.steps, self.readout_sum, *self.neurons]


def _holds(bucket: Bucket, state: NetworkState) -> bool:
    """Whether ``state``'s tensors are the first rows of ``bucket``'s state buffers (no copy needed)."""
    return all(
        t.data_ptr() == b.data_ptr() and t.stride() == b.stride()
        for t, b in zip(state_tensors(state), bucket.state_buffers, strict=True)
    )


def _move_out(bucket: Bucket, state: NetworkState) -> None:
    """Rebind each of ``state``'s tensors that lives in ``bucket``'s state buffers to a copy of itself."""
    buffers = {b.untyped_storage().data_ptr() for b in bucket.state_buffers}
    tensors = state_tensors(state)
    if any(t.untyped_storage().data_ptr() in buffers for t in tensors):
        rebind(state, [t.clone() if t.untyped_storage().data_ptr() in buffers else t for t in tensors])


def _leaves(outputs: tuple) -> list[Tensor]:
    """The tensors of a step's outputs ``(logits, [grads])``, in order."""
    flat = []
    for item in outputs:
        flat += [t for t in item if t is not None] if isinstance(item, list | tuple) else [item]
    return flat


class GraphStep(FastStep):
    """Learning and prediction steps of ``local``'s network as CUDA graphs per bucket; see the module
    docstring. A ``FastStep``, as ``CompiledStep``: the learner holds either."""

    def __init__(
        self,
        local: LocalStep,
        rule: str,
        alpha: float,
        steps_per_sample: int,
        buckets: tuple[int, ...] = GRAPH_BUCKETS,
        capture: bool = True,
    ) -> None:
        super().__init__(local, rule, alpha, steps_per_sample)
        self.buckets = tuple(sorted(buckets))
        self.capture = capture
        self._buckets: dict[tuple[bool, int], Bucket] = {}
        # One memory pool for every graph: a replay's outputs are cloned out before any other graph
        # replays (``_call``), so one graph's scratch may reuse another's (22 pools of a 1024-row step
        # each would hold gigabytes apart).
        self._pool: tuple | None = None
        # One capture stream, on the model's device, for every capture (the docs ask graphs that share
        # a pool to be captured on one stream; torch's default capture stream lives on the device that
        # was current when it was made, e.g. cuda:0 in a worker thread stepping a model on cuda:1).
        self._capture_stream: torch.cuda.Stream | None = None

    def disable(self, reason: str) -> None:
        """Turn the graph step off for good, with one warning (the first reason is kept)."""
        if self.failure is None:
            self.failure = reason
            log.warning("CUDA graph step off, the eager local step serves: %s", reason)

    def graphs(self) -> list[str]:
        """The buckets captured so far, e.g. ``["step_8", "forward_16"]``."""
        return [f"{'step' if learn else 'forward'}_{size}" for learn, size in sorted(self._buckets)]

    def ready(self, rows: int, learn: bool) -> bool:
        """Whether a step of ``rows`` rows runs as a graph (one is captured when first needed)."""
        return self.failure is None and bucket_for(rows, self.buckets) is not None

    # -- buffers and capture ----------------------------------------------------------------------------
    def _new_bucket(self, learn: bool, size: int, like: NetworkState, frame_shape: torch.Size) -> Bucket:
        model, device = self.local.model, like.device
        state = model.new_state(size, device).with_memory_format(self.local.memory_format)
        neurons = [t.clone() for t in state_tensors(state)[2:]]
        bucket = Bucket(
            learn=learn,
            size=size,
            frames=torch.zeros((size, *frame_shape), dtype=like.readout_sum.dtype, device=device),
            labels=torch.full((size,), -1, dtype=torch.long, device=device) if learn else None,
            active=torch.zeros(size, dtype=torch.bool, device=device),
            steps=torch.zeros_like(state.steps),
            readout_sum=torch.zeros_like(state.readout_sum),
            neurons=neurons,
        )
        function = self._functions[learn]

        def body() -> tuple:
            args = (bucket.frames, bucket.steps, bucket.readout_sum, bucket.neurons)
            args += (bucket.labels,) if learn else ()
            logits, steps, readout_sum, new, *rest = function(*args, bucket.active, self.params)
            for buffer, value in zip(bucket.state_buffers, [steps, readout_sum, *new], strict=True):
                buffer.copy_(value)
            return logits, *rest

        if not self.capture:

            def call() -> None:  # outputs at fixed addresses, overwritten by each call, as a replay does
                with torch.no_grad():  # (as captured: the buffers carry no autograd history)
                    outputs = body()
                if not bucket.outputs:
                    bucket.outputs = outputs
                    return
                for kept, new in zip(_leaves(bucket.outputs), _leaves(outputs), strict=True):
                    kept.copy_(new)

            bucket.replay = call
            return bucket
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP_CALLS):  # (every row inactive: the zero state stays zero)
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(device)
        graph = torch.cuda.CUDAGraph()
        serving = torch.cuda.current_stream(device)
        try:
            with (
                torch.cuda.device(device),
                torch.no_grad(),
                torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream),
            ):
                bucket.outputs = body()
        except BaseException:
            # torch.cuda.graph's exit ends the capture before it restores the stream: a capture that
            # fails there leaves this thread on the capture stream, with no ordering against the
            # serving stream that the eager step (which now serves) and other threads use
            torch.cuda.set_stream(serving)
            torch.cuda.synchronize(device)
            raise
        bucket.graph, bucket.replay = graph, graph.replay
        log.info("CUDA graph step: %s_%d captured", "step" if learn else "forward", size)
        return bucket

    def _bucket(self, learn: bool, rows: int, state: NetworkState, frames: Tensor) -> Bucket | None:
        size = bucket_for(rows, self.buckets)
        if self.failure is not None or size is None:
            return None
        bucket = self._buckets.get((learn, size))
        if bucket is None:
            try:
                bucket = self._new_bucket(learn, size, state, frames.shape[1:])
            except Exception as err:  # noqa: BLE001 -- a capture failure means: serve eagerly
                self.disable(f"capturing the {size}-row graph failed: {type(err).__name__}: {err}")
                return None
            self._buckets[(learn, size)] = bucket
        return bucket

    def _load(
        self,
        bucket: Bucket,
        frames: Tensor,
        labels: Tensor | None,
        active: Tensor | None,
        state: NetworkState,
    ) -> None:
        """Copy the step's inputs into ``bucket``, and ``state`` unless it is there already. Every other
        state held there is moved out first: the replay writes only ``state`` (as the eager step, which
        never writes into the tensors of another state, e.g. the table a stepped ``narrow`` came from)."""
        rows = state.batch_size
        for holder in [ref() for ref in bucket.holders.values()]:
            if holder is not None and holder is not state:
                _move_out(bucket, holder)  # kept as it is, in memory of its own
        bucket.holders.clear()
        if not _holds(bucket, state):
            storages = {b.untyped_storage().data_ptr() for b in bucket.state_buffers}
            for buffer, t in zip(bucket.state_buffers, state_tensors(state), strict=True):
                if t.untyped_storage().data_ptr() in storages:  # (other rows of the buffers: no overlap)
                    t = t.clone()
                buffer[:rows].copy_(t)
        bucket.frames[:rows].copy_(frames)
        bucket.active[rows:].fill_(False)
        if active is None:
            bucket.active[:rows].fill_(True)
        else:
            bucket.active[:rows].copy_(active)
        if bucket.labels is not None:
            bucket.labels[rows:].fill_(-1)
            bucket.labels[:rows].copy_(labels)

    # -- running ----------------------------------------------------------------------------------------
    def _call(
        self,
        learn: bool,
        frames: Tensor,
        labels: Tensor | None,
        state: NetworkState,
        active: Tensor | None,
    ) -> tuple | None:
        rows = state.batch_size
        bucket = self._bucket(learn, rows, state, frames)
        if bucket is None:
            return None
        self._load(bucket, frames, labels, active, state)
        bucket.replay()
        bucket.holders[id(state)] = weakref.ref(state)
        rebind(state, [buffer[:rows] for buffer in bucket.state_buffers])
        logits, *rest = bucket.outputs
        return logits[:rows].clone(), *rest

    def _kept(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """Copies: the next replay overwrites the output buffers, and a gradient may wait for the
        optimizer across steps."""
        return [None if g is None else g.clone() for g in grads]


__all__ = ["GRAPH_BUCKETS", "GRAPH_MODES", "Bucket", "GraphStep", "graphs_unavailable"]
