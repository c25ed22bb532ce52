"""Whether the optional ``nir`` package is installed, and NIR files as bytes.

NIR (the Neuromorphic Intermediate Representation, PyPI ``nir``) is an optional dependency: the
extra ``ndot-stream[nir]`` installs it (with ``nirtorch``, which simulators' importers use).
Everything in ``ndot_core.exchange`` imports it on first use through ``require_nir``, so the package
imports without it and a caller can tell the user exactly what to install.

A NIR file is HDF5 (``nir.write`` / ``nir.read``, via h5py). ``graph_from_bytes`` checks the HDF5
signature and a size bound before h5py parses anything, and turns every failure into an
``ExchangeError`` naming what is wrong.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import nir

#: What to run to get NIR support (the message every "not installed" answer carries).
INSTALL_HINT = "pip install 'ndot-stream[nir]' (in a clone: pip install -e '.[nir]')"
#: The eight bytes every HDF5 file starts with (a NIR file is HDF5).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Largest NIR file read from bytes (VGG-11 on 32x32 frames in float32: 34.5 MB).
MAX_NIR_BYTES = 256 * 1024 * 1024


class ExchangeError(ValueError):
    """A model that NIR cannot express, or a NIR graph that is not of this project's family."""


class NIRUnavailable(ImportError):
    """The optional package ``nir`` is not installed; the message says how to install it."""


def require_nir() -> ModuleType:
    """The ``nir`` module; ``NIRUnavailable`` (with the install command) when it is not installed."""
    try:
        import nir
    except ImportError as err:
        raise NIRUnavailable(
            f"NIR support needs the optional packages nir and nirtorch, which are not installed: {INSTALL_HINT}"
        ) from err
    return nir


def graph_to_bytes(graph: nir.NIRGraph) -> bytes:
    """The NIR (HDF5) file of ``graph`` as bytes (``nir.write``, gzip-compressed arrays)."""
    nir_module = require_nir()
    buffer = io.BytesIO()
    nir_module.write(buffer, graph)
    return buffer.getvalue()


def graph_from_bytes(data: bytes, max_bytes: int = MAX_NIR_BYTES) -> nir.NIRGraph:
    """The graph of a NIR file's bytes; ``ExchangeError`` when too large, not HDF5 or not a NIR graph."""
    nir_module = require_nir()
    if len(data) > max_bytes:
        raise ExchangeError(f"NIR file of {len(data)} bytes exceeds the bound of {max_bytes} bytes")
    if not data.startswith(HDF5_SIGNATURE):
        raise ExchangeError("not a NIR file: it does not start with the HDF5 signature")
    try:
        graph = nir_module.read(io.BytesIO(data))
    except Exception as err:  # h5py and nir raise many kinds (OSError, KeyError, AssertionError, ...)
        raise ExchangeError(f"not a readable NIR graph: {type(err).__name__}: {err}") from err
    if not isinstance(graph, nir_module.NIRGraph):
        raise ExchangeError(f"the NIR file holds a {type(graph).__name__}, not a NIRGraph")
    return graph


def write_nir(graph: nir.NIRGraph, path: Path | str) -> int:
    """Write ``graph`` to ``path`` atomically (temp file, then rename); returns the bytes written."""
    data = graph_to_bytes(graph)
    target = Path(path)
    temp = target.with_name(f".{target.name}.tmp")
    try:
        temp.write_bytes(data)
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return len(data)


def read_nir(path: Path | str, max_bytes: int = MAX_NIR_BYTES) -> nir.NIRGraph:
    """The graph of the NIR file at ``path`` (checked as ``graph_from_bytes`` does)."""
    target = Path(path)
    size = target.stat().st_size
    if size > max_bytes:
        raise ExchangeError(f"{target.name}: {size} bytes exceeds the bound of {max_bytes} bytes")
    return graph_from_bytes(target.read_bytes(), max_bytes)
