"""The live model as a NIR file (``POST /v1/model/export``), and the model a checkpoint file holds.

The API process holds no model (it may run apart from the worker, over Redis), so the export is a
control entry like ``model_reset``, answered by the worker in bus order (after every entry before it)::

    API     publish MODEL_EXPORT {format: "nir", dt: "<seconds>"} on stream MODEL_STREAM, wait for the reply
    worker  export_reply(model, version, fields): ndot_core.exchange.export_nir(model, dt) -> NIR (HDF5) bytes
            reply {"ok": true, "format": "nir", "model", "model_version", "bytes", "sha256", "nir_base64"}
    API     base64-decodes, checks length and SHA-256, answers the file

Replies are JSON on both buses, so the file travels base64-encoded (4/3 of its size) in the one reply,
popped once by the waiting request and dropped after ``NDOT_REPLY_TTL_S`` if nobody waits: no key
outlives the request. ``MAX_EXPORT_BYTES`` bounds the file (64 MiB: ``stream_cnn`` is ~0.5 MB, a full
VGG-11 34.5 MB); larger models answer 413 and can be exported offline from a checkpoint
(``ndot export``). Without the optional ``nir`` package the worker answers 501 with the install command.

``model_from_checkpoint`` rebuilds the network a checkpoint file describes (``tree["model"]``, the
worker's ``model_descriptor``) and loads its weights after ``checkpoints.check_like`` has checked every
tensor's name, shape and dtype (the file's digest is checked by ``checkpoints.decode``).
"""

from __future__ import annotations

import base64
import hashlib
import math
from pathlib import Path
from typing import Any

from ndot_core.engine.models import MODELS, build_model
from ndot_core.engine.network import SpikingNetwork
from ndot_core.exchange import DEFAULT_DT_S, ExchangeError, NIRUnavailable, export_nir, graph_to_bytes
from service.bus import messages
from service.worker.checkpoints import CheckpointError, check_like, decode

#: The export formats the worker writes (the ``format`` query parameter).
FORMATS = ("nir",)
#: Largest NIR file the worker sends in a reply (the reply is base64: 4/3 of this).
MAX_EXPORT_BYTES = 64 * 1024 * 1024


def export_reply(model: SpikingNetwork, model_version: int, fields: dict[str, bytes]) -> bytes:
    """The reply to a MODEL_EXPORT entry: the NIR file of ``model``'s current weights, or an error reply."""
    fmt = fields.get("format", b"nir").decode(errors="replace")
    if fmt not in FORMATS:
        return messages.error_reply(422, f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    try:
        dt = float(fields.get("dt", repr(DEFAULT_DT_S).encode()))
    except ValueError:
        return messages.error_reply(422, f"malformed dt {fields.get('dt')!r}")
    if not (math.isfinite(dt) and dt > 0):
        return messages.error_reply(422, f"dt must be a finite number of seconds > 0, got {dt!r}")
    try:
        data = graph_to_bytes(export_nir(model, dt=dt))
    except NIRUnavailable as err:
        return messages.error_reply(501, str(err))
    except ExchangeError as err:
        return messages.error_reply(422, f"the running model cannot be expressed in NIR: {err}")
    if len(data) > MAX_EXPORT_BYTES:
        return messages.error_reply(
            413,
            f"the NIR file is {len(data)} bytes, over the bound of {MAX_EXPORT_BYTES} for a reply; "
            "export a checkpoint offline instead: ndot export CHECKPOINT --format nir --out FILE",
        )
    return messages.ok_reply(
        format=fmt,
        model=model.name,
        model_version=model_version,
        dt=dt,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        nir_base64=base64.b64encode(data).decode("ascii"),
    )


def _descriptor(tree: dict[str, Any]) -> tuple[str, int, int, tuple[int, int]]:
    """``(name, in_channels, num_classes, (H, W))`` of ``tree["model"]``, each checked."""
    model = tree.get("model")
    if not isinstance(model, dict):
        raise CheckpointError("checkpoint field model: expected the worker's model descriptor object")
    name, size = model.get("name"), model.get("input_size")
    if name not in MODELS:
        raise CheckpointError(
            f"checkpoint field model.name: expected one of {sorted(MODELS)}, found {name!r}"
        )
    counts = [model.get("in_channels"), model.get("num_classes")]
    if not isinstance(size, list) or len(size) != 2:
        raise CheckpointError(f"checkpoint field model.input_size: expected [height, width], found {size!r}")
    if any(type(v) is not int or not 1 <= v <= 65536 for v in [*counts, *size]):
        raise CheckpointError(
            f"checkpoint field model: expected integers in [1, 65536], found {model!r:.200}"
        )
    return name, counts[0], counts[1], (size[0], size[1])


def model_from_checkpoint(tree: dict[str, Any]) -> SpikingNetwork:
    """The network a decoded checkpoint tree holds: built from ``tree["model"]``, weights checked and loaded."""
    name, in_channels, num_classes, size = _descriptor(tree)
    try:
        model = build_model(name, in_channels=in_channels, num_classes=num_classes, input_size=size)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint field model: {err}") from err
    learner = tree.get("learner")
    weights = learner.get("model") if isinstance(learner, dict) else None
    check_like(model.state_dict(), weights, "learner.model")
    model.load_state_dict(weights)
    return model.eval()


def read_checkpoint_model(path: Path) -> tuple[SpikingNetwork, int]:
    """``(model, model_version)`` of a service checkpoint file (digest, tree and weights checked)."""
    tree = decode(Path(path).read_bytes())
    if not isinstance(tree, dict):
        raise CheckpointError(f"{Path(path).name} does not hold a checkpoint tree")
    version = tree.get("model_version", 0)
    return model_from_checkpoint(tree), version if type(version) is int else 0
