"""A ``SpikingNetwork`` as a NIR graph: a chain of plain weights, pooling, flattening and LIF nodes.

Block by block (``ndot_core.engine.network``)::

    [Flatten]                                   when the network flattens its input (mlp)
    Conv2d | Affine   W = W_hat * c, b          W_hat: the weight the layer uses (scaled weight
                                                standardization applied: W_hat = gain (W - mean W) /
                                                sqrt(var W * fan_in + eps)); c: the product of the
                                                Scale factors since the previous neuron (folded in:
                                                W (c x) = (c W) x, since pooling and flattening are linear)
    LIF | IF          tau, r, v_threshold, v_leak, v_reset (ndot_core.exchange.neuron_map)
    AvgPool2d         each nn.AvgPool2d; nn.AdaptiveAvgPool2d as the AvgPool2d with the same windows
    Flatten           nn.Flatten (NIR counts dimensions without the batch: start_dim 0)
    ... readout: Affine (Linear without a bias), Scale factors folded in likewise, then Output.

Weights keep the model's dtype (float32 normally); folding a scale rounds ``c W`` once, so a
simulator running the graph computes ``(c W) x`` where the model computes ``W (c x)``: equal up to
float rounding (docs/nir.md has the measured difference). Dropout is a training-time mask and is
left out. Anything else in a block (a module NIR has no node for) raises ``ExchangeError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ndot_core.engine.layers import Scale, TraceConv2d, TraceLinear
from ndot_core.engine.network import SpikingNetwork
from ndot_core.exchange.neuron_map import DEFAULT_DT_S, check_dt, neuron_node
from ndot_core.exchange.nir_support import ExchangeError, require_nir

if TYPE_CHECKING:
    import nir

#: ``metadata["format"]`` of a graph written here (``import_nir`` reads graphs of this family).
GRAPH_FORMAT = "ndot-nir/1"


def _array(tensor: Tensor) -> np.ndarray:
    array = tensor.detach().to("cpu").contiguous().numpy().copy()
    if not np.all(np.isfinite(array)):
        raise ExchangeError("the model holds non-finite weights (NaN or infinity): nothing to export")
    return array


def _pair(value: Any) -> np.ndarray:
    return np.array(value if isinstance(value, tuple | list) else (value, value), dtype=np.int64)


class _Chain:
    """Nodes in order, each named, with the shape (without batch) of what flows out of the last one."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        self.nir = require_nir()
        self.nodes: dict[str, Any] = {"input": self.nir.Input(input_type={"input": np.array(input_shape)})}
        self.shape = input_shape
        self.scale = 1.0  # Scale factors met since the last weighted layer, folded into the next one

    def add(self, name: str, node: Any, shape: tuple[int, ...]) -> None:
        """Append ``node`` as ``name`` (``name_2``, ``name_3``, ... when taken)."""
        unique, n = name, 1
        while unique in self.nodes:
            n += 1
            unique = f"{name}_{n}"
        self.nodes[unique] = node
        self.shape = shape

    def flatten(self, name: str) -> None:
        features = int(np.prod(self.shape))
        node = self.nir.Flatten(input_type={"input": np.array(self.shape)}, start_dim=0, end_dim=-1)
        self.add(name, node, (features,))

    def weighted(self, name: str, layer: TraceConv2d | TraceLinear) -> None:
        with torch.no_grad():
            weight = layer.effective_weight()
            if self.scale != 1.0:
                weight = weight * self.scale
        bias = None if layer.bias is None else _array(layer.bias)
        self.scale = 1.0
        if isinstance(layer, TraceConv2d):
            self._conv(name, layer, _array(weight), bias)
        elif len(self.shape) != 1 or self.shape[0] != layer.in_features:
            raise ExchangeError(f"{name}: a linear layer of {layer.in_features} inputs fed {self.shape}")
        elif bias is None:
            self.add(name, self.nir.Linear(weight=_array(weight)), (layer.out_features,))
        else:
            self.add(name, self.nir.Affine(weight=_array(weight), bias=bias), (layer.out_features,))

    def _conv(self, name: str, conv: TraceConv2d, weight: np.ndarray, bias: np.ndarray | None) -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ExchangeError(f"{name}: only ungrouped convolutions with numeric zero padding map to NIR")
        if len(self.shape) != 3:
            raise ExchangeError(f"{name}: a convolution fed a tensor of shape {self.shape}")
        node = self.nir.Conv2d(
            input_shape=tuple(int(v) for v in self.shape[1:]),
            weight=weight,
            stride=tuple(int(v) for v in conv.stride),
            padding=tuple(int(v) for v in conv.padding),
            dilation=tuple(int(v) for v in conv.dilation),
            groups=1,
            bias=np.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias,
        )
        self.add(name, node, tuple(int(v) for v in node.output_type["output"]))

    def post(self, name: str, module: nn.Module) -> None:
        """A linear op after a neuron layer: pooling, flattening, or a constant scale (folded)."""
        if isinstance(module, Scale):
            self.scale *= module.factor
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ExchangeError(f"{name}: only Flatten(1, -1) maps to NIR")
            self.flatten(name)
        elif isinstance(module, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
            self._pool(name, module)
        elif not isinstance(module, nn.Identity):
            raise ExchangeError(f"{name}: NIR has no node for {type(module).__name__}")

    def _pool(self, name: str, pool: nn.AvgPool2d | nn.AdaptiveAvgPool2d) -> None:
        if len(self.shape) != 3:
            raise ExchangeError(f"{name}: 2-d pooling fed a tensor of shape {self.shape}")
        channels, height, width = self.shape
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            out = _pair(pool.output_size)
            if any(v is None for v in out) or height % out[0] or width % out[1]:
                raise ExchangeError(
                    f"{name}: adaptive pooling to {tuple(out)} of {height}x{width} has uneven windows"
                )
            kernel = stride = np.array([height // out[0], width // out[1]], dtype=np.int64)
            padding = np.zeros(2, dtype=np.int64)
        else:
            if pool.ceil_mode or pool.divisor_override is not None:
                raise ExchangeError(f"{name}: AvgPool2d with ceil_mode or divisor_override has no NIR node")
            kernel, padding = _pair(pool.kernel_size), _pair(pool.padding)
            stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
            if padding.any():
                raise ExchangeError(
                    f"{name}: padded average pooling is not mapped (count_include_pad differs)"
                )
        out_h = (height - kernel[0]) // stride[0] + 1
        out_w = (width - kernel[1]) // stride[1] + 1
        node = self.nir.AvgPool2d(kernel_size=kernel, stride=stride, padding=padding)
        node.input_type = {"input": np.array([channels, height, width])}
        node.output_type = {"output": np.array([channels, out_h, out_w])}
        self.add(name, node, (channels, int(out_h), int(out_w)))


def export_nir(model: SpikingNetwork, dt: float = DEFAULT_DT_S) -> nir.NIRGraph:
    """The NIR graph of ``model``'s current weights (see the module docstring for the mapping).

    ``dt``: the time-step (seconds) an importer simulates one frame with; the LIF time constants
    are ``tau = dt / (1 - lam)``. Import with the same ``dt`` (it is in ``graph.metadata["dt"]``).
    """
    nir_module = require_nir()
    dt = check_dt(dt)
    chain = _Chain(tuple(int(v) for v in model.input_shape))
    if model.flatten_input:
        chain.flatten("flatten_input")
    for i, block in enumerate(model.blocks):
        kind = "conv" if isinstance(block.weighted, TraceConv2d) else "affine"
        chain.weighted(f"block{i}_{kind}", block.weighted)
        if chain.shape != tuple(model.neuron_shapes[i]):
            raise ExchangeError(
                f"block {i}: NIR shapes {chain.shape} differ from the model's {model.neuron_shapes[i]}"
            )
        chain.add(f"block{i}_lif", neuron_node(block.lif, chain.shape, dt), chain.shape)
        for module in block.post:  # named by kind, so re-exporting an imported model gives the same names
            kind = "flatten" if isinstance(module, nn.Flatten) else "avgpool"
            chain.post(f"block{i}_{kind}", module)
    chain.weighted("readout", model.readout)
    chain.nodes["output"] = nir_module.Output(output_type={"output": np.array(chain.shape)})
    names = list(chain.nodes)
    metadata = {
        "format": GRAPH_FORMAT,
        "producer": "ndot-stream",
        "model": model.name,
        "in_channels": int(model.in_channels),
        "num_classes": int(model.num_classes),
        "input_size": np.array(model.input_size, dtype=np.int64),
        "dt": dt,
    }
    try:
        return nir_module.NIRGraph(
            nodes=chain.nodes, edges=list(zip(names[:-1], names[1:], strict=True)), metadata=metadata
        )
    except (ValueError, AssertionError) as err:  # nir's own type check of the chain
        raise ExchangeError(f"NIR refused the graph: {err}") from err
