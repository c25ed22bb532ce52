"""Exchange formats: this project's spiking networks as NIR graphs (export) and back (import).

    export_nir(model, dt=1e-4) -> nir.NIRGraph      conv/linear with weight standardization and the
                                                    constant scales folded in, pooling, flatten, LIF
    import_nir(graph, dt=None) -> SpikingNetwork    a graph of the same family back into a model
    graph_to_bytes / graph_from_bytes / write_nir / read_nir     NIR (HDF5) files

The equations of the neuron mapping are in ``neuron_map``; the manual is docs/nir.md. ``nir`` is an
optional dependency (``pip install 'ndot-stream[nir]'``): this package imports without it, and
every function that needs it raises ``NIRUnavailable`` with the install command.
"""

from __future__ import annotations

from ndot_core.exchange.neuron_map import DEFAULT_DT_S, RESET_SUBTRACT
from ndot_core.exchange.nir_export import GRAPH_FORMAT, export_nir
from ndot_core.exchange.nir_import import import_nir
from ndot_core.exchange.nir_support import (
    INSTALL_HINT,
    ExchangeError,
    NIRUnavailable,
    graph_from_bytes,
    graph_to_bytes,
    read_nir,
    require_nir,
    write_nir,
)

__all__ = [
    "DEFAULT_DT_S",
    "GRAPH_FORMAT",
    "INSTALL_HINT",
    "RESET_SUBTRACT",
    "ExchangeError",
    "NIRUnavailable",
    "export_nir",
    "graph_from_bytes",
    "graph_to_bytes",
    "import_nir",
    "read_nir",
    "require_nir",
    "write_nir",
]
