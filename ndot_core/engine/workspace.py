"""Workspace: temporaries reused from one step to the next instead of allocated afresh.

A step of the local backend makes the same temporaries every time (pooled spikes and traces,
pooling transposes, surrogate factors). Allocating them anew each step costs more than the work on
them at small sizes, and large blocks go back to the OS and fault in again (glibc trims the heap).
A ``Workspace`` keeps one buffer per name and hands it out again while the dtype, device, memory
format and every dimension but the first stay the same. The first (the batch) may shrink: a
request for ``B`` rows of a buffer that holds more gets its first ``B`` rows, a view that is
contiguous in either memory format (the batch is the outermost dimension of both). A larger one
replaces the buffer. A worker's steps change size nearly every call (live rows, replay rows, a few
leftover frames); handing out views kept those steps ~25 % faster than replacing the buffer at each
new size (measured: batch sizes 7-10 in turn against a constant 8, ``stream_cnn``, one thread).

A buffer is overwritten by the next request for its name: whatever holds one (a ``Tape``) is valid
until the next step only. Nothing a step returns or leaves in the state is a workspace buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """Named reusable buffers; see the module docstring."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], like: Tensor, memory_format: torch.memory_format
    ) -> Tensor:
        """The buffer ``name`` of ``shape`` with ``like``'s dtype and device, in ``memory_format``.

        Its contents are whatever the last user left: callers write every element before reading.
        """
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.dim() != len(shape)
            or (shape and buf.shape[0] < shape[0])
            or buf.shape[1:] != shape[1:]
            or buf.dtype != like.dtype
            or buf.device != like.device
            or (len(shape) == 4 and not buf.is_contiguous(memory_format=memory_format))
        ):
            fmt = memory_format if len(shape) == 4 else torch.contiguous_format
            buf = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
            self._buffers[name] = buf
        return buf if not shape or buf.shape[0] == shape[0] else buf[: shape[0]]

    def clear(self) -> None:
        """Drop every buffer (the memory is freed when nothing else holds it)."""
        self._buffers.clear()
