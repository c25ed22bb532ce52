"""Files an experiment run leaves under its ``--out`` folder: metrics and checkpoints.

Checkpoints hold no pickle. A nested state (``learner.state_dict()``: weights, optimizer
state, counters) is split into

* ``<name>.safetensors`` -- every tensor, keyed by its dotted path in the nest
  (``model.features.0.weight``, ``optimizer.state.0.momentum_buffer``), and
* ``<name>.json`` -- the rest of the nest with ``{"__tensor__": key}`` where a tensor was,
  the run's metadata, and the SHA-256 of the tensor file (checked on load).

The JSON is written last, so a checkpoint whose JSON exists is complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_FORMAT = "ndot-checkpoint/1"
TENSOR_KEY = "__tensor__"
ITEMS_KEY = "__items__"
TUPLE_KEY = "__tuple__"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nest of dicts/lists/tuples/scalars/tensors into ``(tensors, json_tree)``.

    Dicts whose keys are not all plain strings (an optimizer's ``state`` is keyed by int)
    become ``{"__items__": [[key, value], ...]}`` so the key types survive JSON.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = path or "tensor"
            if key in tensors:
                raise CheckpointError(f"two tensors map to the key {key!r}")
            tensors[key] = node.detach().cpu().clone().contiguous()
            return {TENSOR_KEY: key}
        if isinstance(node, Mapping):
            keys = list(node.keys())
            plain = all(isinstance(k, str) and "." not in k and not k.startswith("__") for k in keys)
            if plain:
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items()}
            items = []
            for k, v in node.items():
                if not isinstance(k, str | int | float | bool):
                    raise CheckpointError(f"state key {k!r} at {path or '<root>'} is not a str/int/float")
                items.append([k, walk(v, f"{path}.{k}" if path else str(k))])
            return {ITEMS_KEY: items}
        if isinstance(node, tuple):
            return {TUPLE_KEY: [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, str | int | float | bool):
            return node
        raise CheckpointError(f"cannot store {type(node).__name__} at {path or '<root>'} in a checkpoint")

    json_tree = walk(tree, prefix)
    return tensors, json_tree


def unflatten_state(json_tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(json_tree, dict):
        if set(json_tree) == {TENSOR_KEY}:
            key = json_tree[TENSOR_KEY]
            if key not in tensors:
                raise CheckpointError(f"tensor {key!r} named in the JSON is not in the tensor file")
            return tensors[key]
        if set(json_tree) == {ITEMS_KEY}:
            return {k: unflatten_state(v, tensors) for k, v in json_tree[ITEMS_KEY]}
        if set(json_tree) == {TUPLE_KEY}:
            return tuple(unflatten_state(v, tensors) for v in json_tree[TUPLE_KEY])
        return {k: unflatten_state(v, tensors) for k, v in json_tree.items()}
    if isinstance(json_tree, list):
        return [unflatten_state(v, tensors) for v in json_tree]
    return json_tree


def checkpoint_paths(out_dir: Path, name: str = "checkpoint") -> tuple[Path, Path]:
    """``(tensor_file, json_file)`` of checkpoint ``name`` in ``out_dir``."""
    return out_dir / f"{name}.safetensors", out_dir / f"{name}.json"


def save_checkpoint(out_dir: Path, state: Any, metadata: Mapping[str, Any], name: str = "checkpoint") -> Path:
    """Write ``state`` (any nest with tensors) + ``metadata`` atomically; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensor_path, json_path = checkpoint_paths(out_dir, name)
    tensors, tree = flatten_state(state)
    tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, tensor_path)
    document = {
        "format": CHECKPOINT_FORMAT,
        "tensor_file": tensor_path.name,
        "tensor_sha256": digest,
        "metadata": dict(metadata),
        "state": tree,
    }
    _atomic_write_bytes(json_path, json.dumps(document, indent=1).encode())
    return json_path


def resolve_checkpoint(path: Path) -> Path:
    """Accept a run folder, a ``.json`` or a ``.safetensors`` path; return the JSON path."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.json"
    elif path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (train with --out to write one)")
    return path


def load_checkpoint(path: Path) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state, metadata)``.

    Tensors come from safetensors (no pickle); the tensor file's hash must match the JSON.
    """
    json_path = resolve_checkpoint(path)
    try:
        document = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{json_path} is not valid JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{json_path} is not an {CHECKPOINT_FORMAT} file")
    tensor_path = json_path.with_name(document["tensor_file"])
    if not tensor_path.is_file():
        raise CheckpointError(f"tensor file {tensor_path} named by {json_path} is missing")
    data = tensor_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != document["tensor_sha256"]:
        raise CheckpointError(
            f"{tensor_path} has SHA-256 {digest}, {json_path} expects {document['tensor_sha256']}"
        )
    tensors = load_file(str(tensor_path))
    return unflatten_state(document["state"], tensors), document["metadata"]


def write_records(out_dir: Path, stem: str, records: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write a list of flat dicts as ``<stem>.json`` and ``<stem>.csv`` (columns in first-seen order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    _atomic_write_bytes(json_path, json.dumps(list(records), indent=1).encode())
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    _atomic_write_bytes(csv_path, buffer.getvalue().encode())
    return json_path, csv_path


def read_records(json_path: Path) -> list[dict[str, Any]]:
    """Read records written by :func:`write_records`."""
    records = json.loads(Path(json_path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{json_path} does not hold a list of records")
    return records
