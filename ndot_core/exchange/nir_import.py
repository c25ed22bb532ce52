"""A NIR graph of this project's family back into a ``SpikingNetwork`` (the inverse of ``export_nir``).

The family: one chain from the ``Input`` to the ``Output`` node::

    Input [Flatten] ( (Conv2d | Affine | Linear) (LIF | IF) (AvgPool2d | Flatten | Scale)* )* (Affine | Linear) Output

Each weighted node and the neuron after it become a ``SpikingBlock`` (plain weights: no weight
standardization, the exported weights already hold it), the pooling / flatten / scale nodes after
the neuron become its post-ops, and the last weighted node is the readout. Neurons must be this
project's (``neuron_map.lif_from_node``: one value per layer, subtractive reset recorded in the
metadata, ``r = tau/dt``). ``export_nir(import_nir(g))`` holds the arrays of ``g`` bit for bit.

The graph is checked before anything is built: node types, one chain through every node, and each
array's shape against the layer it fills; anything else raises ``ExchangeError`` naming the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ndot_core.engine.layers import Scale, TraceConv2d, TraceLinear
from ndot_core.engine.network import SpikingBlock, SpikingNetwork
from ndot_core.exchange.neuron_map import DEFAULT_DT_S, check_dt, lif_from_node
from ndot_core.exchange.nir_support import ExchangeError, require_nir

if TYPE_CHECKING:
    import nir


def _chain(graph: nir.NIRGraph) -> list[tuple[str, Any]]:
    """The nodes from Input to Output in edge order; ``ExchangeError`` unless the graph is one chain."""
    nir_module = require_nir()
    nodes = dict(graph.nodes)
    inputs = [n for n, node in nodes.items() if isinstance(node, nir_module.Input)]
    outputs = [n for n, node in nodes.items() if isinstance(node, nir_module.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExchangeError(f"need one Input and one Output node, found {len(inputs)} and {len(outputs)}")
    following: dict[str, str] = {}
    for edge in graph.edges:
        source, target = (str(v) for v in edge)
        if source not in nodes or target not in nodes:
            raise ExchangeError(f"edge ({source!r}, {target!r}) names a node the graph lacks")
        if source in following:
            raise ExchangeError(f"node {source!r} feeds two nodes: only a chain maps to this model")
        following[source] = target
    order, name = [], inputs[0]
    while name != outputs[0]:
        if name not in following or len(order) > len(nodes):
            raise ExchangeError(f"the chain from {inputs[0]!r} stops at {name!r} before the Output node")
        order.append((name, nodes[name]))
        name = following[name]
    order.append((name, nodes[name]))
    if len(order) != len(nodes) or len(following) != len(nodes) - 1:
        left = sorted(set(nodes) - {n for n, _ in order})
        raise ExchangeError(f"nodes outside the Input-to-Output chain (or a loop): {left or 'edges'}")
    return order


def _tensor(name: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu" or tuple(array.shape) != shape:
        raise ExchangeError(
            f"node {name!r}: expected a numeric array of shape {shape}, found {array.dtype}{array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ExchangeError(f"node {name!r}: non-finite values")
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _ints(name: str, value: Any, count: int = 2) -> tuple[int, ...]:
    array = np.asarray(value).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, count)
    if array.size != count or array.dtype.kind not in "iu" or (array < 0).any():
        raise ExchangeError(f"node {name!r}: expected {count} non-negative integers, found {value!r}")
    return tuple(int(v) for v in array)


def _weighted(name: str, node: Any) -> TraceConv2d | TraceLinear:
    """An empty layer of the node's kind and shape (``_fill`` loads the arrays once the network stands)."""
    nir_module = require_nir()
    weight = np.asarray(node.weight)
    if isinstance(node, nir_module.Conv2d):
        if weight.ndim != 4 or int(np.asarray(node.groups)) != 1 or _ints(name, node.dilation) != (1, 1):
            raise ExchangeError(
                f"node {name!r}: only ungrouped, undilated 2-d convolutions map to this model"
            )
        padding = (0, 0) if isinstance(node.padding, str) and node.padding == "valid" else node.padding
        if isinstance(padding, str):
            raise ExchangeError(f"node {name!r}: padding {padding!r} is not mapped; give numbers")
        out_channels, in_channels, kh, kw = (int(v) for v in weight.shape)
        return TraceConv2d(
            in_channels, out_channels, (kh, kw), stride=_ints(name, node.stride), padding=_ints(name, padding)
        )
    if isinstance(node, nir_module.Affine | nir_module.Linear):
        if weight.ndim != 2:
            raise ExchangeError(f"node {name!r}: expected a 2-d weight, found shape {weight.shape}")
        return TraceLinear(
            int(weight.shape[1]), int(weight.shape[0]), bias=isinstance(node, nir_module.Affine)
        )
    raise ExchangeError(f"node {name!r} is a {type(node).__name__}, expected Conv2d, Affine or Linear")


def _fill(name: str, node: Any, layer: TraceConv2d | TraceLinear) -> None:
    """Copy the node's weight and bias into ``layer`` (in the layer's dtype), shapes checked."""
    with torch.no_grad():
        layer.weight.copy_(_tensor(name, node.weight, tuple(layer.weight.shape), layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(_tensor(name, node.bias, tuple(layer.bias.shape), layer.bias.dtype))


def _post(name: str, node: Any) -> nn.Module | None:
    """The module of a pooling / flatten / scale node; None when ``node`` is none of those."""
    nir_module = require_nir()
    if isinstance(node, nir_module.AvgPool2d):
        kernel = _ints(name, node.kernel_size)
        return nn.AvgPool2d(kernel, stride=_ints(name, node.stride), padding=_ints(name, node.padding))
    if isinstance(node, nir_module.Flatten):
        start, end = int(node.start_dim), int(node.end_dim)  # NIR counts without the batch dimension
        return nn.Flatten(start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)
    if isinstance(node, nir_module.Scale):
        scale = np.asarray(node.scale, dtype=np.float64).reshape(-1)
        if scale.size == 0 or not np.all(scale == scale[0]) or not np.isfinite(scale[0]):
            raise ExchangeError(f"node {name!r}: only a uniform, finite Scale maps to this model")
        return Scale(float(scale[0]))
    return None


def import_nir(
    graph: nir.NIRGraph, dt: float | None = None, dtype: torch.dtype = torch.float32
) -> SpikingNetwork:
    """A ``SpikingNetwork`` running ``graph`` (see the module docstring for the family).

    ``dt``: the time-step the graph's time constants assume; default: ``graph.metadata["dt"]`` (set
    by ``export_nir``), else 1e-4 s.
    """
    nir_module = require_nir()
    if not isinstance(graph, nir_module.NIRGraph):
        raise ExchangeError(f"expected a NIRGraph, got {type(graph).__name__}")
    metadata = dict(graph.metadata or {})
    dt = check_dt(dt if dt is not None else metadata.get("dt", DEFAULT_DT_S))
    order = _chain(graph)
    shape = np.asarray(order[0][1].input_type["input"]).reshape(-1)
    if shape.size != 3 or (shape < 1).any():
        raise ExchangeError(
            f"the Input node must be a (channels, height, width) frame, found {shape.tolist()}"
        )
    body = order[1:-1]
    flatten_input = bool(body) and isinstance(body[0][1], nir_module.Flatten)
    if flatten_input:
        if (int(body[0][1].start_dim), int(body[0][1].end_dim)) != (0, -1):
            raise ExchangeError(f"node {body[0][0]!r}: an input Flatten must flatten the whole frame")
        body = body[1:]
    blocks: list[SpikingBlock] = []
    layers: list[tuple[str, Any, TraceConv2d | TraceLinear]] = []  # filled once the network stands
    i = 0
    while i < len(body) - 1:
        name, node = body[i]
        weighted = _weighted(name, node)
        layers.append((name, node, weighted))
        neuron_name, neuron = body[i + 1]
        if not isinstance(neuron, nir_module.LIF | nir_module.IF):
            raise ExchangeError(f"node {name!r} is followed by {neuron_name!r}, not by a LIF or IF neuron")
        post, i = [], i + 2
        while i < len(body) and (module := _post(body[i][0], body[i][1])) is not None:
            post.append(module)
            i += 1
        blocks.append(SpikingBlock(weighted, lif_from_node(neuron_name, neuron, dt), post))
    if i != len(body) - 1:
        raise ExchangeError("the chain must end with a readout (Affine or Linear) before the Output node")
    readout = _weighted(*body[-1])
    if not isinstance(readout, TraceLinear):
        raise ExchangeError(f"the readout {body[-1][0]!r} must be Affine or Linear")
    layers.append((*body[-1], readout))
    try:
        network = SpikingNetwork(
            blocks,
            readout,
            name=str(metadata.get("model", "nir")),
            in_channels=int(shape[0]),
            num_classes=readout.out_features,
            input_size=(int(shape[1]), int(shape[2])),
            flatten_input=flatten_input,
        )
    except ValueError as err:  # the network's dry run: a layer that does not fit what feeds it
        raise ExchangeError(f"the graph's layers do not fit together: {err}") from err
    network.to(dtype)
    for name, node, layer in layers:
        _fill(name, node, layer)
    return network
