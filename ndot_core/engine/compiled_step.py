"""CompiledStep: the local step compiled by ``torch.compile``, per batch shape, never in the way.

Two functions of ``step_graph`` are compiled: the learning step (forward and backward of labelled
rows, ``step_function``) and the prediction step (forward only, ``forward_function``: the rows of a
step with no label, e.g. the live rows under learn_at=sequence). Each compiles to graphs by batch
shape (``shapes``):

* ``"dynamic"`` (the default off CUDA): a graph for one row, and graphs whose batch size is symbolic
  (``torch._dynamo.mark_dynamic`` on dim 0), each running any batch of its range (``DYNAMIC_RANGES``:
  2-15 and 16-1024 rows) as it is: no padding. On CPU such a graph runs as fast as one of fixed
  size (docs/engine.md § Compiled step);
* ``"buckets"`` (the default on CUDA, whose graphs replay with fixed shapes): a graph per bucket
  (``BUCKETS``: 1, 2, 4, .., 64); a step of B rows runs the graph of the smallest bucket ``P >= B``,
  its rows padded to P with rows that change nothing real::

    frames 0,  state 0,  steps 0 (a fresh row),  label -1 (loss weight 0: zero gradient)

  and the first B rows of the results are kept (the padding's state rows are scratch). A state the
  previous step left (its tensors views of that step's padded outputs) goes in as those outputs,
  scratch rows and all, without a copy: those rows came from padding and stay finite. Larger batches
  than the largest bucket run eagerly.

Every graph is compiled under its own code object (``ndot_step_4``, ``ndot_forward_2to15``, ..), so
graphs never count as recompiles of each other. Compilation stays out of the service's way:

* a graph compiles in a background thread the first time a step needs it; until it is ready,
  ``run`` / ``predict`` return None and the caller runs the eager local step (the same numbers);
* once ready, a graph runs under ``torch._dynamo.run`` (never compiles again): inputs its guards do
  not accept (e.g. another layout) reach the Python function, which raises ``NotCompiled`` at once
  (``torch.compiler.is_compiling()`` is False there, True in the graph), and that call runs eagerly
  with one warning, instead of recompiling on the serving thread;
* any error while compiling or running a graph logs one warning and turns the compiled step off
  for good (``failure`` says why): the caller's eager step serves, nothing reaches a client. A
  failed run leaves the state untouched (the graph is pure; the state is rebound only on success);
* compiled artifacts go to torch's on-disk caches (FX graph and AOT autograd caches) under
  ``TORCHINDUCTOR_CACHE_DIR`` (torch's default: a directory in /tmp): a restart with the same
  directory compiles a graph in seconds instead of tens of seconds.

``compile_unavailable(device)`` says why a device cannot compile (no C++ compiler on CPU, no Triton
on CUDA): the learner's ``compile="auto"`` then stays eager.
"""

from __future__ import annotations

import copy
import functools
import logging
import shutil
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ndot_core.engine.fast_step import FastStep, rebind, state_tensors
from ndot_core.engine.local_step import LocalStep
from ndot_core.engine.state import NetworkState

COMPILE_MODES = ("off", "on", "auto")
SHAPES = ("dynamic", "buckets")
BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
#: Batch sizes of the dynamic graphs, (smallest, largest) each: one row has a graph of its own (a
#: symbolic size is never 1), and the CPU convolution picks its kernel and output layout by batch
#: size on either side of 16 (``torch._C._select_conv_backend``), so one symbolic batch size cannot
#: span 16. Larger batches than the last range run eagerly.
DYNAMIC_RANGES: tuple[tuple[int, int], ...] = ((1, 1), (2, 15), (16, 1024))
MAX_DYNAMIC_ROWS = DYNAMIC_RANGES[-1][1]
log = logging.getLogger(__name__)


def graph_size(rows: int, shapes: str, buckets: tuple[int, ...] = BUCKETS) -> tuple[int, int] | None:
    """``(graph size, rows it runs)`` for a step of ``rows`` rows under ``shapes``, or None: no graph
    runs it. "dynamic": the smallest size of the ``DYNAMIC_RANGES`` range holding the rows, unpadded;
    "buckets": the smallest bucket holding the rows, padded to it."""
    if shapes == "dynamic":
        return next(((low, rows) for low, high in DYNAMIC_RANGES if low <= rows <= high), None)
    size = bucket_for(rows, buckets)
    return None if size is None else (size, size)


def dynamic_range(size: int) -> tuple[int, int] | None:
    """The ``DYNAMIC_RANGES`` range starting at ``size`` when it spans more than one size, else None."""
    return next(((low, high) for low, high in DYNAMIC_RANGES if low == size and high > low), None)


def graph_name(learn: bool, size: int, dynamic: bool) -> str:
    """The code object's name of a graph, e.g. ``ndot_step_4``, ``ndot_forward_2to15``."""
    kind = "step" if learn else "forward"
    span = dynamic_range(size) if dynamic else None
    return f"ndot_{kind}_{size}" if span is None else f"ndot_{kind}_{span[0]}to{span[1]}"


def default_shapes(device: torch.device | str) -> str:
    """``"buckets"`` on CUDA (graphs that replay with fixed shapes), ``"dynamic"`` elsewhere."""
    return "buckets" if torch.device(device).type == "cuda" else "dynamic"


def bucket_for(rows: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket holding ``rows`` rows, or None when there is none."""
    return next((b for b in sorted(buckets) if b >= rows), None)


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` (inductor) cannot compile for ``device`` here, or None when it can."""
    kind = torch.device(device).type
    if kind == "cpu":
        from torch._inductor import config

        compiler = config.cpp.cxx[1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        return None if shutil.which(compiler or "g++") else f"no C++ compiler ({compiler!r}) on PATH"
    if kind == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    return f"no compiler backend for device type {kind!r}"


@dataclass
class Graph:
    """One compiled function and what became of its compilation.

    ``learn``: the learning step (else the prediction step); ``size``: its batch size, or with
    ``dynamic`` the smallest of the sizes it runs (its ``DYNAMIC_RANGES`` range).
    """

    learn: bool
    size: int
    dynamic: bool
    fn: Callable[..., tuple]
    ready: bool = False
    compile_s: float | None = None

    @property
    def name(self) -> str:
        return graph_name(self.learn, self.size, self.dynamic)


class NotCompiled(RuntimeError):
    """A bucket's function ran as Python, not as its compiled graph (the inputs missed its guards)."""


def _graph_only(fn: Callable, name: str) -> Callable:
    """``fn`` that raises ``NotCompiled`` unless traced, under a code object of its own (named ``name``):
    dynamo caches compiled graphs per code object, so buckets never count as each other's recompiles."""

    def graph_only(*args):
        if not torch.compiler.is_compiling():
            raise NotCompiled(f"{name} ran outside its compiled graph")
        return fn(*args)

    code = graph_only.__code__.replace(co_name=name)
    return types.FunctionType(code, graph_only.__globals__, name, None, graph_only.__closure__)


@functools.lru_cache(maxsize=256)
def _strides(shape: tuple[int, ...], memory_format: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=memory_format).stride()


def _pad(
    t: Tensor, rows: int, value: float, memory_format: torch.memory_format, padded: dict[int, Tensor]
) -> Tensor:
    """``t`` with rows appended up to ``rows``, filled with ``value``, in ``memory_format`` (4-d tensors).

    Always with the strides a new tensor of that format has (e.g. a channels-last tensor with
    H = W = 1 may come with either of two strides): the compiled graph's guards check strides.
    ``padded``: the previous step's padded outputs by id; ``t`` the leading rows of one of them is
    that output itself (its other rows are padding).
    """
    fmt = memory_format if t.dim() == 4 else torch.contiguous_format
    shape = (rows, *t.shape[1:])
    base = t._base
    if base is not None and padded.get(id(base)) is base and base.shape == shape:
        t = base if t.storage_offset() == 0 and t.stride() == base.stride() else t
    if t.shape[0] == rows and t.stride() == _strides(shape, fmt) and t.storage_offset() == 0:
        return t
    out = torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt)
    out[: t.shape[0]].copy_(t)
    out[t.shape[0] :].fill_(value)
    return out


class CompiledStep(FastStep):
    """Compiled learning and prediction steps of ``local``'s network; see the module docstring.

    ``buckets``: the batch sizes of ``shapes="buckets"``; ``shapes``: "dynamic" or "buckets" (None:
    ``default_shapes`` of the model's device); ``backend``: the ``torch.compile`` backend ("inductor";
    a name or a callable); ``background``: compile in a thread (False: a step compiles its graph
    inline, for tests and benchmarks).
    """

    def __init__(
        self,
        local: LocalStep,
        rule: str,
        alpha: float,
        steps_per_sample: int,
        buckets: tuple[int, ...] = BUCKETS,
        backend: str | Callable = "inductor",
        background: bool = True,
        shapes: str | None = None,
    ) -> None:
        super().__init__(local, rule, alpha, steps_per_sample)
        self.buckets = tuple(sorted(buckets))
        self.shapes = shapes or default_shapes(local.model.readout.weight.device)
        if self.shapes not in SHAPES:
            raise ValueError(f"unknown shapes {self.shapes!r}; expected one of {SHAPES}")
        self.backend = backend
        self.background = background
        self._graphs: dict[tuple[bool, int], Graph] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._missed = False  # a guard miss was logged
        self._padded: dict[int, Tensor] = {}  # the last padded step's state outputs, by id
        if background:  # import the compiler here, not under the import lock while the caller serves
            import torch._inductor.compile_fx  # noqa: F401

    def __deepcopy__(self, memo: dict) -> CompiledStep:
        """A compiled step for the copied network, compiling its own graphs (the caches make it quick)."""
        local = copy.deepcopy(self.local, memo)
        other = CompiledStep(
            local, *self._args, self.buckets, self.backend, self.background, shapes=self.shapes
        )
        other.failure = other.failure or self.failure
        return other

    # -- compilation -----------------------------------------------------------------------------------
    def graph_size(self, rows: int) -> tuple[int, int] | None:
        """``graph_size`` under this step's shapes and buckets."""
        return graph_size(rows, self.shapes, self.buckets)

    def _graph(self, learn: bool, size: int) -> Graph:
        with self._lock:
            graph = self._graphs.get((learn, size))
            if graph is None:
                dynamic = self.shapes == "dynamic" and dynamic_range(size) is not None
                graph = Graph(learn, size, dynamic, self._functions[learn])
                graph.fn = torch.compile(
                    _graph_only(graph.fn, graph.name),
                    backend=self.backend,
                    dynamic=None if dynamic else False,
                )
                self._graphs[(learn, size)] = graph
        return graph

    def _example(self, graph: Graph) -> tuple:
        """Inputs of ``graph``'s size laid out as ``run`` lays them out (so that the guards hold); the
        batch dimension marked dynamic for a dynamic graph."""
        model = self.local.model
        span = dynamic_range(graph.size) if graph.dynamic else None
        rows = graph.size if span is None else min(max(8, 2 * span[0]), span[1])  # (a typical size: 8, 32)
        state = model.new_state(rows, self.local.model.readout.weight.device)
        frames = torch.zeros((rows, *model.input_shape), dtype=state.readout_sum.dtype, device=state.device)
        labels = torch.zeros(rows, dtype=torch.long, device=state.device) if graph.learn else None
        active = torch.ones(rows, dtype=torch.bool, device=state.device)
        inputs = self._inputs(frames, labels, active, state, rows)
        if span is not None:
            for tensor in (inputs[0], inputs[1], inputs[2], *inputs[3], *inputs[4:-1]):
                torch._dynamo.mark_dynamic(tensor, 0, min=span[0], max=span[1])
        return inputs

    def _compile(self, graph: Graph, threads: int) -> None:
        """Compile ``graph`` by one call on example inputs; on any error, turn the compiled step off."""
        torch.set_num_threads(threads)  # the serving thread's count: inductor sizes its loops by it
        start = time.perf_counter()
        try:
            with torch.no_grad():
                graph.fn(*self._example(graph))
        except Exception as err:  # noqa: BLE001 -- any compiler failure means: serve eagerly
            self.disable(f"compiling {graph.name} failed: {type(err).__name__}: {err}")
            return
        graph.compile_s = time.perf_counter() - start
        graph.fn = torch._dynamo.run(graph.fn)  # from now on: never recompile, eager on a guard miss
        graph.ready = True
        log.info("compiled step: graph %s ready in %.1f s", graph.name, graph.compile_s)

    def request(self, size: int, learn: bool = True) -> Graph:
        """Start compiling the graph of ``size`` (``graph_size``'s first figure) unless it has started."""
        with self._lock:
            started = (learn, size) in self._graphs
        graph = self._graph(learn, size)
        if not started:
            if self.background:
                thread = threading.Thread(
                    target=self._compile,
                    args=(graph, torch.get_num_threads()),
                    name=f"ndot-compile-{graph.name}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._compile(graph, torch.get_num_threads())
        return graph

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background compilations started so far (tests, benchmarks)."""
        for thread in list(self._threads):
            thread.join(timeout)

    def compile_seconds(self) -> dict[str, float]:
        """Seconds each ready graph took to compile, by graph name (e.g. ``ndot_step_2to15``)."""
        return {g.name: g.compile_s for g in self._graphs.values() if g.ready and g.compile_s is not None}

    def disable(self, reason: str) -> None:
        """Turn the compiled step off for good, with one warning (the first reason is kept)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.warning("compiled step off, the eager local step serves: %s", reason)

    # -- running ---------------------------------------------------------------------------------------
    def _inputs(
        self, frames: Tensor, labels: Tensor | None, active: Tensor, state: NetworkState, size: int
    ) -> tuple:
        """The graph's arguments, padded to ``size`` rows (padding rows inactive, labelled -1)."""
        fmt, padded = self.local.memory_format, self._padded
        neurons = [_pad(t, size, 0.0, fmt, padded) for t in state_tensors(state)[2:]]
        inputs = (
            _pad(frames, size, 0.0, torch.contiguous_format, {}),
            _pad(state.steps, size, 0, fmt, padded),
            _pad(state.readout_sum, size, 0.0, fmt, padded),
            neurons,
        )
        if labels is not None:
            inputs += (_pad(labels, size, -1, fmt, {}),)
        return (*inputs, _pad(active, size, False, fmt, {}), self.params)

    def ready(self, rows: int, learn: bool) -> bool:
        """Whether a step of ``rows`` rows would run compiled now (its graph compiled, nothing off);
        asks for the graph when it is not (it compiles as ``run`` would)."""
        shape = self.graph_size(rows)
        if self.failure is not None or shape is None:
            return False
        return self.request(shape[0], learn).ready

    def _call(
        self,
        learn: bool,
        frames: Tensor,
        labels: Tensor | None,
        state: NetworkState,
        active: Tensor | None,
    ) -> tuple | None:
        """Run the graph for this step and rebind ``state`` to its outputs; its other outputs, or None."""
        rows = state.batch_size
        shape = self.graph_size(rows)
        if self.failure is not None or shape is None:
            return None
        size, run_rows = shape
        graph = self.request(size, learn)
        if not graph.ready:
            return None
        if active is None:
            active = torch.ones(rows, dtype=torch.bool, device=frames.device)
        try:
            with torch.no_grad():
                outputs = graph.fn(*self._inputs(frames, labels, active, state, run_rows))
        except NotCompiled as err:  # this call's inputs missed the guards: this call runs eagerly
            if not self._missed:
                self._missed = True
                log.warning("compiled step: %s; those steps run eagerly", err)
            return None
        except Exception as err:  # noqa: BLE001 -- the state is untouched: the eager step can serve
            self.disable(f"running {graph.name} failed: {type(err).__name__}: {err}")
            return None
        logits, steps, readout_sum, neurons, *rest = outputs
        self._padded = {}
        if run_rows != rows:
            self._padded = {id(t): t for t in (steps, readout_sum, *neurons)}
            logits, steps, readout_sum = logits[:rows], steps[:rows], readout_sum[:rows]
            neurons = [t[:rows] for t in neurons]
        rebind(state, [steps, readout_sum, *neurons])
        return logits, *rest
