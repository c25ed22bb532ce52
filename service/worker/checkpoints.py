"""Checkpoint files: one safetensors file per checkpoint, written atomically, never pickled.

A checkpoint is a tree of plain values (dicts, lists, numbers, strings) whose leaves may be torch
tensors or numpy arrays: learner weights + optimizer state, the ``NetworkState`` of every slot,
the registry with each stream's framer state, and the last applied bus id per stream. ``pack``
splits the tree into the tensors (stored by safetensors) and a JSON skeleton stored in the file's
own safetensors header metadata together with a SHA-256 of the tensor bytes, so one ``os.replace``
publishes everything at once and a flipped or missing byte is refused on load.

The tree encoding is hand-written because safetensors stores only a flat ``str -> tensor`` map
and the optimizer / framer states are nested with int keys and numpy (even structured) arrays;
the only alternative, ``torch.save``, is a pickle.

    file = <safetensors header {"__metadata__": {"format", "tree", "sha256"}, tensors...}> <tensor bytes>
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

FORMAT = "ndot-checkpoint/1"
SUFFIX = ".safetensors"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_MAX_HEADER_BYTES = 64 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint name, file or content that cannot be used (the running model stays untouched)."""


def validate_name(name: str) -> str:
    """``name`` if it is a safe file stem: ``[A-Za-z0-9_.-]{1,128}``, no ``..``, no leading dot."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name or name.startswith("."):
        raise CheckpointError(
            f"checkpoint name {name!r} must match [A-Za-z0-9_.-]{{1,128}} without '..' or a leading '.'"
        )
    return name


# --- tree <-> (tensors, skeleton) ------------------------------------------------------------------


def pack(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a tree into ``{key: tensor}`` and a JSON-able skeleton referring to the keys."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, np.ndarray):
            raw = np.ascontiguousarray(node)
            tensors[path] = torch.from_numpy(raw.view(np.uint8).reshape(-1).copy())
            descr = raw.dtype.descr if raw.dtype.names else raw.dtype.str
            return {"__ndarray__": path, "dtype": descr, "shape": list(raw.shape)}
        if isinstance(node, np.generic):
            return node.item()
        if isinstance(node, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in node):
                return {k: walk(v, f"{path}.{k}") for k, v in node.items()}
            return {"__dict__": [[_key(k, path), walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise CheckpointError(f"{path or 'root'}: cannot store a {type(node).__name__} in a checkpoint")

    skeleton = walk(tree, "")
    return tensors, skeleton


def _key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, bool | int | float | str):
        return key
    raise CheckpointError(f"{path}: dict key {key!r} is not a JSON scalar")


def unpack(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of ``pack``; raises ``CheckpointError`` on a dangling key or a bad array record."""

    def tensor(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise CheckpointError(f"checkpoint refers to missing tensor {key!r}")
        return tensors[key]

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "__tensor__" in node:
            return tensor(node["__tensor__"])
        if "__ndarray__" in node:
            try:
                descr = node["dtype"]
                dtype = np.dtype([tuple(f) for f in descr] if isinstance(descr, list) else descr)
                if dtype.hasobject:
                    raise CheckpointError(f"array {node['__ndarray__']!r}: object dtype refused")
                raw = tensor(node["__ndarray__"]).numpy().tobytes()
                return np.frombuffer(raw, dtype=dtype).reshape(node["shape"]).copy()
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"array {node.get('__ndarray__')!r}: {err}") from err
        if "__tuple__" in node:
            return tuple(walk(v) for v in node["__tuple__"])
        if "__dict__" in node:
            return {k: walk(v) for k, v in node["__dict__"]}
        return {k: walk(v) for k, v in node.items()}

    return walk(skeleton)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        sha.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        sha.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def encode(tree: Any) -> bytes:
    """The bytes of a checkpoint file holding ``tree``."""
    tensors, skeleton = pack(tree)
    metadata = {"format": FORMAT, "tree": json.dumps(skeleton), "sha256": _digest(tensors)}
    return safetensors_save(tensors, metadata=metadata)


def decode(data: bytes) -> Any:
    """The tree of a checkpoint file's bytes; ``CheckpointError`` when corrupt, truncated or foreign."""
    metadata = read_metadata(data)
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own SafetensorError on any malformed body
        raise CheckpointError(f"checkpoint tensors unreadable: {err}") from err
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError("checkpoint tensor bytes do not match their SHA-256 (corrupt file)")
    try:
        skeleton = json.loads(metadata["tree"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint tree unreadable: {err}") from err
    return unpack(tensors, skeleton)


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a checkpoint (header only, no tensor is read)."""
    if len(data) < 8:
        raise CheckpointError(f"checkpoint is {len(data)} bytes, shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise CheckpointError(f"checkpoint header length {header_len} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        metadata = header["__metadata__"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint header unreadable: {err}") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"not an {FORMAT} file")
    return metadata


# --- validation against the running model -----------------------------------------------------------


def check_like(reference: Any, candidate: Any, path: str = "") -> None:
    """Raise ``CheckpointError`` unless ``candidate`` has ``reference``'s structure, tensor shapes and dtypes."""
    where = path or "root"
    if isinstance(reference, torch.Tensor):
        if not isinstance(candidate, torch.Tensor):
            raise CheckpointError(f"{where}: expected a tensor, found {type(candidate).__name__}")
        if candidate.shape != reference.shape or candidate.dtype != reference.dtype:
            raise CheckpointError(
                f"{where}: checkpoint has {candidate.dtype}{list(candidate.shape)}, "
                f"the model needs {reference.dtype}{list(reference.shape)}"
            )
    elif isinstance(reference, dict):
        if not isinstance(candidate, dict) or set(candidate) != set(reference):
            found = sorted(map(str, candidate)) if isinstance(candidate, dict) else type(candidate).__name__
            raise CheckpointError(
                f"{where}: keys {found} differ from the model's {sorted(map(str, reference))}"
            )
        for key, value in reference.items():
            check_like(value, candidate[key], f"{path}.{key}")
    elif isinstance(reference, list | tuple):
        if not isinstance(candidate, list | tuple) or len(candidate) != len(reference):
            raise CheckpointError(f"{where}: expected {len(reference)} items, found {candidate!r:.80}")
        for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
            check_like(ref, cand, f"{path}.{i}")


# --- the folder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``GET /v1/checkpoints`` lists of one file."""

    name: str
    model_version: int
    streams: int
    created: float
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_version": self.model_version,
            "streams": self.streams,
            "created": self.created,
            "bytes": self.bytes,
        }


class CheckpointStore:
    """Checkpoint files in one folder; names never leave it."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}{SUFFIX}"

    def save(self, tree: dict[str, Any], name: str | None = None) -> CheckpointInfo:
        """Write ``tree`` (which should hold ``model_version`` and ``streams``) to a temp file, then rename."""
        created = time.time()
        version = int(tree.get("model_version", 0))
        if name is None:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created)) + f".{int(created % 1 * 1e6):06d}"
            name = f"ckpt-{stamp}-v{version}"
        target = self.path(name)
        data = encode({**tree, "created": created})
        self.directory.mkdir(parents=True, exist_ok=True)
        temp = self.directory / f".{target.name}.{os.getpid()}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        return CheckpointInfo(
            name, version, len(tree.get("registry", {}).get("streams", [])), created, len(data)
        )

    def load(self, name: str) -> dict[str, Any]:
        """The tree of checkpoint ``name``; ``CheckpointError`` when missing or corrupt."""
        path = self.path(name)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint named {name!r} in {self.directory}")
        tree = decode(path.read_bytes())
        if not isinstance(tree, dict):
            raise CheckpointError(f"checkpoint {name!r} does not hold a dict")
        return tree

    def info(self, name: str) -> CheckpointInfo:
        path = self.path(name)
        with open(path, "rb") as handle:
            head = handle.read(8)
            (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            data = head + handle.read(min(header_len, _MAX_HEADER_BYTES))
        tree = json.loads(read_metadata(data)["tree"])
        streams = tree.get("registry", {}).get("streams", []) if isinstance(tree, dict) else []
        return CheckpointInfo(
            name,
            int(tree.get("model_version", 0)),
            len(streams),
            float(tree.get("created", 0.0)),
            path.stat().st_size,
        )

    def list(self) -> list[CheckpointInfo]:
        """Readable checkpoints, oldest first (by write time); unreadable files are left out."""
        if not self.directory.is_dir():
            return []
        infos = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            name = path.name[: -len(SUFFIX)]
            try:
                infos.append(self.info(name))
            except (CheckpointError, OSError, ValueError, struct.error):
                continue
        return sorted(infos, key=lambda i: (i.created, i.name))

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest checkpoints; returns the deleted names."""
        infos = self.list()
        doomed = infos[: max(len(infos) - keep, 0)]
        for info in doomed:
            self.path(info.name).unlink(missing_ok=True)
        return [i.name for i in doomed]
