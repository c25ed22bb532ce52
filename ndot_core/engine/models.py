"""The ``build_model`` registry: ``vgg11_ws``, ``mlp`` and ``stream_cnn`` as ``SpikingNetwork``s.

``vgg11_ws`` is the paper's VGG-11 with scaled weight standardization, ``mlp`` a flatten and two
spiking hidden layers, ``stream_cnn`` the service default, sized for 2-polarity event frames of
34x34 to 48x48 that learns N-MNIST on a CPU in seconds. The blocks and the time-step itself live in
``ndot_core.engine.network``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ndot_core.engine.layers import Scale, TraceConv2d, TraceLinear
from ndot_core.engine.network import SpikingBlock, SpikingNetwork
from ndot_core.engine.neuron import LIFParameters

__all__ = ["MODELS", "SpikingBlock", "SpikingNetwork", "build_model", "mlp", "stream_cnn", "vgg11_ws"]


def _lif(options: dict) -> LIFParameters:
    return LIFParameters(
        v_threshold=float(options.pop("v_threshold", 1.0)),
        lam=float(options.pop("lam", 0.5)),
        surrogate_alpha=float(options.pop("surrogate_alpha", 4.0)),
    )


def _flat_features(modules: Sequence[nn.Module], input_shape: tuple[int, ...]) -> int:
    """Number of features after running a zero frame through ``modules`` (weighted + post ops)."""
    with torch.no_grad():
        x = torch.zeros(1, *input_shape)
        for m in modules:
            x = m(x)
        return int(x[0].numel())


def mlp(
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    *,
    hidden: Sequence[int] = (256, 256),
    weight_standardization: bool = False,
    dropout: float = 0.0,
    **options,
) -> SpikingNetwork:
    """Flatten, two spiking hidden layers of widths ``hidden``, linear readout."""
    lif = _lif(options)
    if options:
        raise TypeError(f"mlp got unexpected options {sorted(options)}")
    if len(hidden) != 2:
        raise ValueError(f"mlp needs hidden=(h1, h2), got {tuple(hidden)}")
    sizes = [in_channels * input_size[0] * input_size[1], *hidden]
    blocks = [
        SpikingBlock(TraceLinear(a, b, weight_standardization=weight_standardization), lif, dropout=dropout)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    return SpikingNetwork(
        blocks,
        TraceLinear(sizes[-1], num_classes),
        name="mlp",
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        flatten_input=True,
    )


VGG11_CHANNELS: tuple[int | str, ...] = (64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


def vgg11_ws(
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    *,
    width: float = 1.0,
    scale: float = 2.74,
    dropout: float = 0.0,
    **options,
) -> SpikingNetwork:
    """VGG-11(WS): 64C3-128C3-AP2-256C3-256C3-AP2-512C3-512C3-AP2-512C3-512C3-GAP-FC.

    Each conv has scaled WS and is followed by LIF and ``Scale(scale)``; ``width`` scales every channel
    count (1.0 = the paper's network).
    """
    lif = _lif(options)
    if options:
        raise TypeError(f"vgg11_ws got unexpected options {sorted(options)}")
    blocks: list[SpikingBlock] = []
    channels = in_channels
    cfg = list(VGG11_CHANNELS)
    for i, item in enumerate(cfg):
        if item == "M":
            continue
        out = max(1, round(int(item) * width))
        # Pooling before the scale: the same linear map as Scale-then-pool, on 4x fewer elements.
        post: list[nn.Module] = []
        if i + 1 < len(cfg) and cfg[i + 1] == "M":
            post.append(nn.AvgPool2d(2))
        if i == len(cfg) - 1:
            post += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        post.append(Scale(scale))
        conv = TraceConv2d(channels, out, 3, padding=1, weight_standardization=True)
        blocks.append(SpikingBlock(conv, lif, post, dropout=dropout))
        channels = out
    return SpikingNetwork(
        blocks,
        TraceLinear(channels, num_classes),
        name="vgg11_ws",
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
    )


def stream_cnn(
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    *,
    channels: Sequence[int] = (16, 32, 32),
    hidden: int = 128,
    scale: float = 2.74,
    weight_standardization: bool = True,
    dropout: float = 0.0,
    **options,
) -> SpikingNetwork:
    """Small streaming CNN for 2-polarity event frames (34x34 .. 48x48).

    ``[C3(c_i) - LIF - AP2 - Scale] x len(channels) - flatten - FC(hidden) - LIF - Scale - FC(num_classes)``;
    convs use scaled WS. About 1 ms a step at batch 1 on one CPU core.
    """
    lif = _lif(options)
    if options:
        raise TypeError(f"stream_cnn got unexpected options {sorted(options)}")
    blocks: list[SpikingBlock] = []
    previous = in_channels
    for i, out in enumerate(channels):
        conv = TraceConv2d(previous, out, 3, padding=1, weight_standardization=weight_standardization)
        post: list[nn.Module] = [nn.AvgPool2d(2), Scale(scale)]  # pool first: 4x fewer elements to scale
        if i == len(channels) - 1:
            post.append(nn.Flatten())
        blocks.append(SpikingBlock(conv, lif, post, dropout=dropout))
        previous = out
    features = _flat_features([m for b in blocks for m in (b.weighted, b.post)], (in_channels, *input_size))
    blocks.append(SpikingBlock(TraceLinear(features, hidden), lif, [Scale(scale)], dropout=dropout))
    return SpikingNetwork(
        blocks,
        TraceLinear(hidden, num_classes),
        name="stream_cnn",
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
    )


MODELS: dict[str, Callable[..., SpikingNetwork]] = {
    "vgg11_ws": vgg11_ws,
    "mlp": mlp,
    "stream_cnn": stream_cnn,
}


def build_model(
    name: str, in_channels: int, num_classes: int, input_size: int | Sequence[int], **options
) -> SpikingNetwork:
    """Build a registered spiking network; ``input_size`` is (H, W) or one int for square frames.

    Common options: ``v_threshold`` (1.0), ``lam`` (0.5), ``surrogate_alpha`` (4.0), ``dropout`` (0).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    size = (
        (int(input_size), int(input_size))
        if isinstance(input_size, int)
        else tuple(int(v) for v in input_size)
    )
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be (H, W) with positive sides, got {input_size!r}")
    if in_channels < 1 or num_classes < 2:
        raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}")
    return MODELS[name](in_channels, num_classes, size, **options)
