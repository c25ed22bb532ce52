"""What a checkpoint's tree may hold, checked field by field before anything is swapped in.

The file's digest (``service.worker.checkpoints``) proves the bytes are the ones written; this
module checks that what they say fits the running worker, so a file altered with a valid digest,
or written by a buggy version, is refused with the path of the first bad field instead of being
swapped in::

    model_version, created          int >= 0, finite number >= 0
    last_entry_id                   None or "<ms>-<seq>" (the watermark of an unsharded bus; older files)
    shards, watermark               int in [1, 4096]; {"<shard>": "<ms>-<seq>"} with shards below it (the
                                    newest entry applied per shard; compared with the bus at start)
    rng.cpu (.cuda)                 uint8 tensors, the CPU one of torch's generator size
    network_state                   tensors (shapes checked against the model by ``Batcher.load``)
    learner                         model tensors; optimizer groups with the running optimizer's keys,
                                    parameter indices and finite, non-negative hyper-parameters; state
                                    per known parameter, tensors of its shape (or scalars); version ==
                                    model_version; pending steps >= 0; pending gradients of known
                                    parameters and their shapes
    registry.streams[i].meta        the ``StreamSlot`` fields: id, sensor 1..65536, counters >= 0 with
                                    correct <= labelled <= steps, prediction in [0, K), entry id covered
                                    by the watermark, finite activity time
    registry.streams[i].framer      the ``StreamFramer`` state: ints of their ranges, the stream's sensor,
                                    a 1-D int64 ``pending_index``
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from service.bus import BusInputError, entry_id_key
from service.bus.shards import MAX_SHARDS, Watermark, split_entry_id
from service.worker.checkpoints import CheckpointError

_INT64 = (-(2**63), 2**63 - 1)
_META_KEYS = {
    "stream_id",
    "width",
    "height",
    "last_active_s",
    "steps",
    "sequences",
    "sequence_step",
    "sequence_events",
    "labelled_steps",
    "correct_steps",
    "last_prediction",
    "last_entry_id",
}
#: Framer state ints and their ranges (``StreamFramer.state_dict``); ``None`` = the int64 range.
_FRAMER_INTS: dict[str, tuple[int, int] | None] = {
    "sensor_width": (1, 65536),
    "sensor_height": (1, 65536),
    "output_height": (0, 65536),
    "output_width": (0, 65536),
    "window_us": (1, _INT64[1]),
    "binary": (0, 1),
    "max_gap_windows": (0, _INT64[1]),
    "origin_us": None,
    "has_open_window": (0, 1),
    "open_window": None,
    "clock_us": None,
    "late_events": (0, _INT64[1]),
    "skipped_windows": (0, _INT64[1]),
    "frames_emitted": (0, _INT64[1]),
}


def _fail(path: str, what: str, value: Any) -> CheckpointError:
    shown = (
        f"a {type(value).__name__}" if isinstance(value, dict | list | tuple | torch.Tensor) else repr(value)
    )
    return CheckpointError(f"checkpoint field {path}: {what}, found {shown:.80}")


def _dict(path: str, value: Any) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "expected an object", value)
    return value


def _int(path: str, value: Any, lower: int = _INT64[0], upper: int = _INT64[1]) -> int:
    if type(value) is not int or not lower <= value <= upper:
        raise _fail(path, f"expected an integer in [{lower}, {upper}]", value)
    return value


def _number(path: str, value: Any, lower: float = 0.0) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < lower:
        raise _fail(path, f"expected a finite number >= {lower:g}", value)
    return float(value)


def _entry_id(path: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return entry_id_key(value)
    except BusInputError:
        raise _fail(path, "expected a bus entry id '<ms>-<seq>' or null", value) from None


def _tensor(path: str, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or (dtype is not None and value.dtype != dtype):
        raise _fail(path, f"expected a {dtype or 'tensor'}", value)
    return value


def beyond(watermark: str | None, newest: str | None) -> bool:
    """True when the watermark names an entry the bus never handed out (newest: the bus's newest id).

    Both ids of one shard (plain or shard-qualified ``"<shard>/<ms>-<seq>"``).
    """
    if watermark is None:
        return False
    return newest is None or entry_id_key(split_entry_id(watermark)[1]) > entry_id_key(
        split_entry_id(newest)[1]
    )


def tree_watermark(tree: dict[str, Any]) -> tuple[Watermark, int]:
    """``(watermark, shards)`` of a validated tree (a file of before shards: its ``last_entry_id``, 1 shard)."""
    if tree.get("shards", 1) > 1:
        return Watermark.from_dict(tree["watermark"]), int(tree["shards"])
    last = tree.get("last_entry_id")
    return (Watermark.of_ids([last]) if last else Watermark()), 1


def _watermark(tree: dict[str, Any]) -> Watermark:
    shards = _int("shards", tree.get("shards", 1), 1, MAX_SHARDS)
    last = _entry_id("last_entry_id", tree.get("last_entry_id"))
    if shards == 1:
        if "watermark" in tree:
            raise _fail(
                "watermark",
                "expected none on an unsharded bus (its mark is last_entry_id)",
                tree["watermark"],
            )
        return Watermark() if last is None else Watermark.of_ids([tree["last_entry_id"]])
    if last is not None:
        raise _fail(
            "last_entry_id", f"expected null with shards = {shards} (the marks are in watermark)", last
        )
    marks = _dict("watermark", tree.get("watermark"))
    for shard, raw in marks.items():
        if not isinstance(shard, str) or not shard.isdigit() or int(shard) >= shards:
            raise _fail("watermark", f"expected shard numbers below shards = {shards}", shard)
        if _entry_id(f"watermark.{shard}", raw) is None:
            raise _fail(f"watermark.{shard}", "expected a bus entry id '<ms>-<seq>'", raw)
    return Watermark.from_dict(marks)


def validate_tree(tree: Any, learner: Any, num_classes: int) -> None:
    """Raise ``CheckpointError`` naming the first field of ``tree`` that the running worker cannot take.

    ``learner`` is the running ``OnlineLearner`` (its model and optimizer are the reference).
    """
    tree = _dict("root", tree)
    for key in ("learner", "network_state", "registry", "model_version"):
        if key not in tree:
            raise CheckpointError(f"checkpoint lacks field {key}")
    version = _int("model_version", tree["model_version"], 0)
    if "created" in tree:
        _number("created", tree["created"])
    watermark = _watermark(tree)
    rng = _dict("rng", tree.get("rng", {}))
    if "cpu" in rng and _tensor("rng.cpu", rng["cpu"], torch.uint8).shape != torch.get_rng_state().shape:
        raise _fail("rng.cpu", f"expected {tuple(torch.get_rng_state().shape)} bytes", rng["cpu"])
    if "cuda" in rng and _tensor("rng.cuda", rng["cuda"], torch.uint8).dim() != 1:
        raise _fail("rng.cuda", "expected a 1-D uint8 tensor", rng["cuda"])
    for key, value in _dict("network_state", tree["network_state"]).items():
        _tensor(f"network_state.{key}", value)
    _validate_learner(_dict("learner", tree["learner"]), learner, version)
    registry = _dict("registry", tree["registry"])
    streams = registry.get("streams")
    if not isinstance(streams, list):
        raise _fail("registry.streams", "expected a list", streams)
    for i, stream in enumerate(streams):
        _validate_stream(f"registry.streams.{i}", stream, num_classes, watermark)


def _validate_learner(saved: dict[Any, Any], learner: Any, version: int) -> None:
    params = dict(learner.model.named_parameters())
    for key, value in _dict("learner.model", saved.get("model")).items():
        _tensor(f"learner.model.{key}", value)
    if _int("learner.version", saved.get("version"), 0) != version:
        raise _fail("learner.version", f"expected model_version {version}", saved.get("version"))
    if "pending_steps" in saved:
        _int("learner.pending_steps", saved["pending_steps"], 0)
    for name, grad in _dict("learner.pending_grads", saved.get("pending_grads", {})).items():
        path = f"learner.pending_grads.{name}"
        if name not in params or _tensor(path, grad).shape != params[name].shape:
            raise _fail(path, "expected the gradient of a model parameter, of its shape", grad)
    for key in ("rule", "mode"):
        if key in saved and not isinstance(saved[key], str):
            raise _fail(f"learner.{key}", "expected a string", saved[key])
    _validate_optimizer(_dict("learner.optimizer", saved.get("optimizer")), learner.optimizer)


def _validate_optimizer(saved: dict[Any, Any], optimizer: torch.optim.Optimizer) -> None:
    reference = optimizer.state_dict()
    groups, own = saved.get("param_groups"), reference["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(own):
        raise _fail("learner.optimizer.param_groups", f"expected {len(own)} groups", groups)
    shapes: dict[int, torch.Size] = {}
    for i, (group, ref) in enumerate(zip(groups, own, strict=True)):
        path = f"learner.optimizer.param_groups.{i}"
        if set(_dict(path, group)) != set(ref):
            raise _fail(path, f"expected keys {sorted(ref)}", sorted(map(str, group)))
        if group["params"] != ref["params"]:
            raise _fail(f"{path}.params", f"expected parameter indices {ref['params']}", group["params"])
        for key, value in group.items():
            if key != "params":
                _hyper(f"{path}.{key}", value, ref[key])
        shapes.update(zip(ref["params"], (p.shape for p in optimizer.param_groups[i]["params"]), strict=True))
    for index, state in _dict("learner.optimizer.state", saved.get("state", {})).items():
        path = f"learner.optimizer.state.{index}"
        if index not in shapes:
            raise _fail(path, "expected the index of an optimized parameter", index)
        for key, value in _dict(path, state).items():
            if isinstance(value, torch.Tensor):
                if value.shape != shapes[index] and value.numel() > 1:
                    raise _fail(f"{path}.{key}", f"expected shape {tuple(shapes[index])} or a scalar", value)
            else:
                _number(f"{path}.{key}", value)


def _hyper(path: str, value: Any, reference: Any) -> None:
    """An optimizer hyper-parameter of the same kind as the running optimizer's."""
    if isinstance(reference, bool) or reference is None:  # flags; foreach / fused may be None or a bool
        if not (isinstance(value, bool) or value is None):
            raise _fail(path, "expected true, false or null", value)
    elif isinstance(reference, int | float):
        _number(path, value)
    elif isinstance(reference, list | tuple):
        if not isinstance(value, list | tuple) or len(value) != len(reference):
            raise _fail(path, f"expected {len(reference)} numbers", value)
        for j, item in enumerate(value):
            _number(f"{path}.{j}", item)
    elif isinstance(reference, str) and not isinstance(value, str):
        raise _fail(path, "expected a string", value)


def _validate_stream(path: str, stream: Any, num_classes: int, watermark: Watermark) -> None:
    stream = _dict(path, stream)
    if set(stream) != {"meta", "framer"}:
        raise _fail(path, "expected keys ['framer', 'meta']", sorted(map(str, stream)))
    meta = _dict(f"{path}.meta", stream["meta"])
    if set(meta) != _META_KEYS:
        raise _fail(f"{path}.meta", f"expected keys {sorted(_META_KEYS)}", sorted(map(str, meta)))
    stream_id = meta["stream_id"]
    if not isinstance(stream_id, str) or not 0 < len(stream_id) <= 1024:
        raise _fail(f"{path}.meta.stream_id", "expected a stream id", stream_id)
    width = _int(f"{path}.meta.width", meta["width"], 1, 65536)
    height = _int(f"{path}.meta.height", meta["height"], 1, 65536)
    _number(f"{path}.meta.last_active_s", meta["last_active_s"], lower=-math.inf)
    counts = {
        key: _int(f"{path}.meta.{key}", meta[key], 0) for key in ("steps", "sequences", "sequence_events")
    }
    for key, bound in (
        ("labelled_steps", "steps"),
        ("sequence_step", "steps"),
        ("correct_steps", "labelled_steps"),
    ):
        counts[key] = _int(f"{path}.meta.{key}", meta[key], 0)
        if counts[key] > counts[bound]:
            raise _fail(f"{path}.meta.{key}", f"expected at most {bound} = {counts[bound]}", meta[key])
    if meta["last_prediction"] is not None:
        _int(f"{path}.meta.last_prediction", meta["last_prediction"], 0, num_classes - 1)
    last = meta["last_entry_id"]
    if last is not None:
        try:
            covered = watermark.covers(last)
        except BusInputError:
            raise _fail(f"{path}.meta.last_entry_id", "expected a bus entry id or null", last) from None
        if not covered:
            raise _fail(f"{path}.meta.last_entry_id", "expected an id covered by the watermark", last)
    framer = _dict(f"{path}.framer", stream["framer"])
    for key, bounds in _FRAMER_INTS.items():
        _int(f"{path}.framer.{key}", framer.get(key), *(bounds or _INT64))
    if (framer["sensor_width"], framer["sensor_height"]) != (width, height):
        found = f"{framer['sensor_width']}x{framer['sensor_height']}"
        raise _fail(
            f"{path}.framer.sensor_width/height", f"expected the stream's sensor {width}x{height}", found
        )
    pending = framer.get("pending_index", np.zeros(0, dtype=np.int64))
    if not isinstance(pending, np.ndarray) or pending.dtype != np.int64 or pending.ndim != 1:
        raise _fail(f"{path}.framer.pending_index", "expected a 1-D int64 array", pending)
