"""Peak memory of a code region, measured the way the device allows.

    peak_bytes = max_{t in region} M(t) - M(start)

with M the CUDA caching allocator's allocated bytes on a GPU (``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``), and the process's resident set size on a CPU. On Linux the RSS
high-water mark (``VmHWM``) is reset to the current RSS at the start (``/proc/self/clear_refs``
with ``5``), so the figure covers this region only; where that is not possible ``ru_maxrss`` is
used, which only counts growth past the process's earlier peak (the figure then says so).

What the CPU figure means: the extra resident memory the region needed -- activations, saved
tensors, optimizer buffers -- as the OS sees it, including allocator slack. Memory freed earlier in
the same process may be reused without raising RSS, so compare runs each in a fresh process.
"""

from __future__ import annotations

import gc
import resource
import sys
from pathlib import Path
from types import TracebackType

import torch

MEASURE_CUDA = "cuda_max_allocated_delta"
MEASURE_RSS_HWM = "rss_hwm_delta"
MEASURE_RU_MAXRSS = "ru_maxrss_delta"

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as meter: ...; meter.peak_bytes, meter.measure``."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.measure = ""
        self.peak_bytes = 0
        self._start = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.measure = MEASURE_CUDA
        elif _reset_rss_peak() and (rss := _status_kib("VmRSS")) is not None:
            self._start = rss * 1024
            self.measure = MEASURE_RSS_HWM
        else:
            self._start = _ru_maxrss_bytes()
            self.measure = MEASURE_RU_MAXRSS
        return self

    def current_peak(self) -> int:
        """Peak so far in the region, in bytes (the region may still be running)."""
        if self.measure == MEASURE_CUDA:
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.measure == MEASURE_RSS_HWM:
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = _ru_maxrss_bytes()
        return max(0, peak - self._start)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.measure == MEASURE_CUDA:
            torch.cuda.synchronize(self.device)
        self.peak_bytes = self.current_peak()


class _SavedTensor:
    """What autograd stores instead of a saved tensor while a :class:`SavedTensorsPeak` is active."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: SavedTensorsPeak) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:  # the graph that saved it is gone
        self.meter._release(self.key)


class SavedTensorsPeak:
    """Peak bytes that autograd keeps for backward inside a region, on any device.

        saved(t) = sum of storage bytes over distinct storages saved by live graphs at time t
        peak_bytes = max_t saved(t)

    Counted through ``torch.autograd.graph.saved_tensors_hooks``; parameters (leaf tensors that need
    a gradient) are left out, as they are held anyway. This is the memory a training rule's graph
    costs: one time-step's activations for the online rules, all T steps' for BPTT. It excludes
    gradients, optimizer state and allocator slack (those are in :class:`PeakMemory`).
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.current_bytes = 0
        self._live: dict[int, list[int]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: torch.Tensor) -> object:
        if tensor.is_leaf and tensor.requires_grad:
            return tensor
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        if size == 0:
            return tensor
        key = storage.data_ptr()
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [size, 1]
            self.current_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry[1] += 1
        return _SavedTensor(tensor, key, self)

    @staticmethod
    def _unpack(saved: object) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _SavedTensor) else saved  # type: ignore[return-value]

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self._live[key]

    def __enter__(self) -> SavedTensorsPeak:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(exc_type, exc, traceback)
            self._hooks = None
