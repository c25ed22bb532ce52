"""CompiledStep: the local step compiled by ``torch.compile`` per batch-size bucket, never in the way.

A step of B rows runs the graph of the smallest bucket ``P >= B`` (``BUCKETS``: 1, 2, 4, .., 64);
the B rows are padded to P with rows that change nothing real::

    frames 0,  state 0,  steps 0 (a fresh row),  label -1 (loss weight 0: zero gradient)

and the first B rows of the results are kept (the padding's state rows are scratch). A state the
previous step left (its tensors views of that step's padded outputs) goes in as those outputs,
scratch rows and all, without a copy: those rows came from padding and stay finite. One
graph per bucket (``step_graph.step_function``, each under its own code object so buckets never
count as recompiles of each other); larger batches than the largest bucket run eagerly.

Compilation stays out of the service's way:

* a bucket compiles in a background thread the first time a step needs it; until its graph is
  ready, ``run`` returns None and the caller runs the eager local step (the same numbers);
* once ready, a bucket's graph runs under ``torch._dynamo.run`` (never compiles again): inputs its
  guards do not accept (e.g. another layout) reach the Python function, which raises ``NotCompiled``
  at once (``torch.compiler.is_compiling()`` is False there, True in the graph), and that call
  runs eagerly with one warning, instead of recompiling on the serving thread;
* any error while compiling or running a graph logs one warning and turns the compiled step off
  for good (``failure`` says why): the caller's eager step serves, nothing reaches a client. A
  failed run leaves the state untouched (the graph is pure; the state is rebound only on success);
* compiled artifacts go to torch's on-disk caches (FX graph and AOT autograd caches) under
  ``TORCHINDUCTOR_CACHE_DIR`` (torch's default: a directory in /tmp): a restart with the same
  directory compiles a bucket in seconds instead of tens of seconds.

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
from torch import Tensor, nn

from ndot_core.engine.local_step import Grads, LocalStep
from ndot_core.engine.state import NetworkState
from ndot_core.engine.step_graph import step_function, step_parameters, unsupported_reason

COMPILE_MODES = ("off", "on", "auto")
BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
log = logging.getLogger(__name__)


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
class Bucket:
    """One bucket's compiled function and what became of its compilation."""

    size: int
    fn: Callable[..., tuple]
    ready: bool = False
    compile_s: float | None = None


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


class CompiledStep:
    """Per-bucket compiled forward and backward of ``local``'s step; see the module docstring.

    ``backend``: the ``torch.compile`` backend ("inductor"; a name or a callable); ``background``:
    compile in a thread (False: ``run`` compiles the bucket inline, for tests and benchmarks).
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
    ) -> None:
        self.local = local
        self._args = (rule, alpha, steps_per_sample)
        self.buckets = tuple(sorted(buckets))
        self.backend = backend
        self.background = background
        self.params: list[nn.Parameter | None] = step_parameters(local)
        self.failure: str | None = unsupported_reason(local)
        self._function = step_function(local, rule, alpha, steps_per_sample)
        self._buckets: dict[int, Bucket] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._missed = False  # a guard miss was logged
        self._padded: dict[int, Tensor] = {}  # the last padded step's state outputs, by id
        if background:  # import the compiler here, not under the import lock while the caller serves
            import torch._inductor.compile_fx  # noqa: F401

    def __deepcopy__(self, memo: dict) -> CompiledStep:
        """A compiled step for the copied network, compiling its own buckets (the caches make it quick)."""
        local = copy.deepcopy(self.local, memo)
        other = CompiledStep(local, *self._args, self.buckets, self.backend, self.background)
        other.failure = other.failure or self.failure
        return other

    # -- compilation -----------------------------------------------------------------------------------
    def _bucket(self, size: int) -> Bucket:
        with self._lock:
            bucket = self._buckets.get(size)
            if bucket is None:
                fn = _graph_only(self._function, f"ndot_step_{size}")
                bucket = Bucket(size, torch.compile(fn, backend=self.backend, dynamic=False))
                self._buckets[size] = bucket
                return bucket
        return bucket

    def _example(self, size: int) -> tuple:
        """Inputs of ``size`` rows laid out as ``run`` lays them out (so that the guards hold)."""
        model = self.local.model
        state = model.new_state(size, self.local.model.readout.weight.device)
        frames = torch.zeros((size, *model.input_shape), dtype=state.readout_sum.dtype, device=state.device)
        labels = torch.zeros(size, dtype=torch.long, device=state.device)
        return self._inputs(frames, labels, state, size)

    def _compile(self, bucket: Bucket, threads: int) -> None:
        """Compile ``bucket`` by one call on example inputs; on any error, turn the compiled step off."""
        torch.set_num_threads(threads)  # the serving thread's count: inductor sizes its loops by it
        start = time.perf_counter()
        try:
            with torch.no_grad():
                bucket.fn(*self._example(bucket.size))
        except Exception as err:  # noqa: BLE001 -- any compiler failure means: serve eagerly
            self.disable(f"compiling bucket {bucket.size} failed: {type(err).__name__}: {err}")
            return
        bucket.compile_s = time.perf_counter() - start
        bucket.fn = torch._dynamo.run(bucket.fn)  # from now on: never recompile, eager on a guard miss
        bucket.ready = True
        log.info("compiled step: bucket %d ready in %.1f s", bucket.size, bucket.compile_s)

    def request(self, size: int) -> Bucket:
        """Start compiling bucket ``size`` (in the background when so configured) unless it has started."""
        with self._lock:
            started = size in self._buckets
        bucket = self._bucket(size)
        if not started:
            if self.background:
                thread = threading.Thread(
                    target=self._compile,
                    args=(bucket, torch.get_num_threads()),
                    name=f"ndot-compile-{size}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._compile(bucket, torch.get_num_threads())
        return bucket

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background compilations started so far (tests, benchmarks)."""
        for thread in list(self._threads):
            thread.join(timeout)

    def compile_seconds(self) -> dict[int, float]:
        """Seconds each ready bucket took to compile, by bucket size."""
        return {b.size: b.compile_s for b in self._buckets.values() if b.ready and b.compile_s is not None}

    def disable(self, reason: str) -> None:
        """Turn the compiled step off for good, with one warning (the first reason is kept)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.warning("compiled step off, the eager local step serves: %s", reason)

    # -- running ---------------------------------------------------------------------------------------
    def _inputs(self, frames: Tensor, labels: Tensor, state: NetworkState, size: int) -> tuple:
        fmt, padded = self.local.memory_format, self._padded
        neurons = [_pad(t, size, 0.0, fmt, padded) for neuron in state.neurons for t in neuron]
        return (
            _pad(frames, size, 0.0, torch.contiguous_format, {}),
            _pad(state.steps, size, 0, fmt, padded),
            _pad(state.readout_sum, size, 0.0, fmt, padded),
            neurons,
            _pad(labels, size, -1, fmt, {}),
            self.params,
        )

    def run(self, frames: Tensor, labels: Tensor, state: NetworkState) -> tuple[Tensor, Grads] | None:
        """One step as ``LocalStep.forward`` + ``backward`` on every row, or None: run the eager step.

        ``labels`` [B] long, -1 for rows that do not learn (at least one row learns). On success the
        state advances (rebound, as the eager step does) and ``(logits [B, K], [(param, grad)])``
        come back, the gradients those of the labelled rows' loss. None when the compiled step is
        off, the batch is larger than every bucket or its bucket is not compiled yet (this call
        starts compiling it).
        """
        self.local.model._check_input(frames, state)
        rows = state.batch_size
        size = bucket_for(rows, self.buckets)
        if self.failure is not None or size is None or state.masks:
            return None
        bucket = self.request(size)
        if not bucket.ready:
            return None
        try:
            with torch.no_grad():
                outputs = bucket.fn(*self._inputs(frames, labels, state, size))
        except NotCompiled as err:  # this call's inputs missed the guards: this call runs eagerly
            if not self._missed:
                self._missed = True
                log.warning("compiled step: %s; those steps run eagerly", err)
            return None
        except Exception as err:  # noqa: BLE001 -- the state is untouched: the eager step can serve
            self.disable(f"running bucket {size} failed: {type(err).__name__}: {err}")
            return None
        logits, steps, readout_sum, neurons, grads = outputs
        self._padded = {}
        if size != rows:
            self._padded = {id(t): t for t in (steps, readout_sum, *neurons)}
            logits, steps, readout_sum = logits[:rows], steps[:rows], readout_sum[:rows]
            neurons = [t[:rows] for t in neurons]
        state.neurons = [type(n)(*neurons[4 * i : 4 * i + 4]) for i, n in enumerate(state.neurons)]
        state.readout_sum, state.steps = readout_sum, steps
        pairs = [(p, g) for p, g in zip(self.params, grads, strict=True) if p is not None]
        return logits, pairs
