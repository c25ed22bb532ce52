"""Helpers for tests/test_nir_export.py: the CLI in a fresh interpreter, NIR arrays compared bit for
bit, and one network run step by step in ndot_core and in SpikingJelly (per layer spikes, logits)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nir
import numpy as np
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.nir_exchange import import_from_nir

from ndot_core.engine.network import SpikingNetwork

REPO_ROOT = Path(__file__).resolve().parent.parent
ARRAY_FIELDS = (
    "weight",
    "bias",
    "tau",
    "r",
    "v_leak",
    "v_threshold",
    "v_reset",
    "kernel_size",
    "stride",
    "padding",
)
#: A sitecustomize that hides nir (and nirtorch) from the interpreter it starts in.
HIDE_NIR = """import sys
class _HideNIR:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nir", "nirtorch"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/test_nir_export.py)", name=name)
        return None
sys.meta_path.insert(0, _HideNIR())
"""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m service.cli ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def arrays(graph) -> dict[tuple[str, str], np.ndarray]:
    """Every array of every node, keyed ``(node, field)``; the Input/Output shapes too."""
    found = {}
    for name, node in graph.nodes.items():
        for field in ARRAY_FIELDS:
            if hasattr(node, field) and not isinstance(getattr(node, field), str):
                found[(name, field)] = np.asarray(getattr(node, field))
        if isinstance(node, nir.Input):
            found[(name, "shape")] = np.asarray(node.input_type["input"])
        if isinstance(node, nir.Output):
            found[(name, "shape")] = np.asarray(node.output_type["output"])
    return found


def assert_bit_equal(one, other) -> None:
    a, b = arrays(one), arrays(other)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype and value.shape == b[key].shape, key
        assert value.tobytes() == b[key].tobytes(), f"{key} differs"
    assert list(one.edges) == list(other.edges)


def run_ndot(model: SpikingNetwork, frames: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer spikes [T, B, ...] and logits [T, B, K] of ``model`` (inference, fresh state)."""
    state = model.new_state(frames.shape[1])
    spikes: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    logits = []
    with torch.no_grad():
        for t in range(frames.shape[0]):
            logits.append(model.step(frames[t].to(model.readout.weight.dtype), state, "ndot"))
            for layer, neuron in zip(spikes, state.neurons, strict=True):
                layer.append(neuron.s.clone())
    return [torch.stack(layer) for layer in spikes], torch.stack(logits)


def run_spikingjelly(
    graph, frames: torch.Tensor, dtype: torch.dtype, subtract: bool = True
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same, by SpikingJelly's importer; ``subtract``: set its neurons to subtractive reset."""
    module = import_from_nir(graph, dt=float(graph.metadata["dt"]), dtype=dtype)
    named = dict(module.named_modules())
    lif_names = [name for name, node in graph.nodes.items() if isinstance(node, nir.LIF)]
    spikes: dict[str, list[torch.Tensor]] = {name: [] for name in lif_names}
    for name in lif_names:
        lif = named[f"{name}.module"]
        assert isinstance(lif, sj_neuron.LIFNode) and lif.v_reset == 0.0 and not lif.decay_input
        if subtract:
            lif.v_reset = None  # SpikingJelly's soft reset: v = h - v_threshold * spike
        named[name].register_forward_hook(
            lambda mod, args, out, name=name: spikes[name].append(out[0].clone())
        )
    logits, state = [], None
    with torch.no_grad():
        for t in range(frames.shape[0]):
            out, state = module(frames[t].to(dtype), state)
            logits.append(out)
    return [torch.stack(spikes[name]) for name in lif_names], torch.stack(logits)
