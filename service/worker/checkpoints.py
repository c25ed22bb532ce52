"""Checkpoint files: one safetensors file per checkpoint, written atomically, never pickled.

A checkpoint is a tree of plain values (dicts, lists, numbers, strings) whose leaves may be torch
tensors or numpy arrays: learner weights + optimizer state, the ``NetworkState`` of every slot,
the registry with each stream's framer state, and the last applied bus id per stream. ``pack``
splits the tree into the tensors (stored by safetensors) and a JSON skeleton stored in the file's
own safetensors header metadata together with a SHA-256 over the format, the JSON skeleton and the
tensors (names, dtypes, shapes, bytes): the whole file. One ``os.replace`` publishes everything at
once (a failed write leaves no temp file behind), and a flipped or missing byte anywhere, in a
tensor or in the tree (bus ids, framer state, registry, optimizer structure), is refused on load.
What the tree's values mean is checked against the running model by ``service.worker.checkpoint_tree``.

The tree encoding is hand-written because safetensors stores only a flat ``str -> tensor`` map
and the optimizer / framer states are nested with int keys and numpy (even structured) arrays;
the only alternative, ``torch.save``, is a pickle.

    file = <safetensors header {"__metadata__": {"format", "tree", "sha256"}, tensors...}> <tensor bytes>
    sha256 = SHA-256(format | tree | for each tensor by name: name, dtype, shape, bytes)

Files of the first format (``ndot-checkpoint/1``, digest over the tensors only) are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

FORMAT = "ndot-checkpoint/2"
_OLD_FORMATS = ("ndot-checkpoint/1",)
_METADATA_KEYS = {"format", "tree", "sha256"}
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


def _digest(tensors: dict[str, torch.Tensor], tree: str) -> str:
    sha = hashlib.sha256()
    sha.update(f"{FORMAT}|{len(tree)}|".encode())
    sha.update(tree.encode())
    for key in sorted(tensors):
        t = tensors[key]
        sha.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        sha.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def encode(tree: Any) -> bytes:
    """The bytes of a checkpoint file holding ``tree``."""
    tensors, skeleton = pack(tree)
    try:
        text = json.dumps(skeleton, allow_nan=False)
    except ValueError as err:  # NaN or infinity: JSON has none, and a restore would refuse it
        raise CheckpointError(f"cannot store a non-finite number in a checkpoint: {err}") from err
    return safetensors_save(
        tensors, metadata={"format": FORMAT, "tree": text, "sha256": _digest(tensors, text)}
    )


def decode(data: bytes) -> Any:
    """The tree of a checkpoint file's bytes; ``CheckpointError`` when corrupt, truncated or foreign."""
    metadata = read_metadata(data)
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own SafetensorError on any malformed body
        raise CheckpointError(f"checkpoint tensors unreadable: {err}") from err
    text = metadata.get("tree")
    if not isinstance(text, str) or _digest(tensors, text) != metadata.get("sha256"):
        raise CheckpointError("checkpoint content does not match its SHA-256 (corrupt or altered file)")
    try:
        skeleton = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint tree unreadable: {err}") from err
    # (the digest has no key: whoever can write the folder can sign a tree of any shape; a record of
    # the wrong shape, e.g. ``{"__dict__": [[1]]}`` or an array without its dtype, or nesting deeper than
    # Python's stack, is a refused file like any other, never an exception that stops the worker)
    try:
        return unpack(tensors, skeleton)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint tree malformed: {type(err).__name__}: {err}") from err


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
    if isinstance(metadata, dict) and metadata.get("format") in _OLD_FORMATS:
        raise CheckpointError(
            f"{metadata['format']} file of an older version (its digest does not cover the tree): refused"
        )
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"not an {FORMAT} file")
    if set(metadata) != _METADATA_KEYS:
        raise CheckpointError(
            f"checkpoint metadata has keys {sorted(metadata)}, not {sorted(_METADATA_KEYS)}"
        )
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


#: ``report(stage, name, error)``: a checkpoint file that could not be listed, deleted, ...
Report = Callable[[str, str, BaseException], None]


class CheckpointStore:
    """Checkpoint files in one folder; names never leave it.

    A file that cannot be read is skipped, never fatal: ``report("list", name, error)`` is called once
    per bad file (and again only if it changes), and listing, pruning and restoring go on without it.
    """

    def __init__(self, directory: Path | str, report: Report | None = None) -> None:
        self.directory = Path(directory)
        self.report = report or (lambda stage, name, error: None)
        self._reported: set[tuple[str, int, int]] = set()  # (name, size, mtime_ns) of bad files reported

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
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:  # disk full, read-only folder, interrupted: no partial file stays behind
            temp.unlink(missing_ok=True)
            raise
        return CheckpointInfo(
            name, version, len(tree.get("registry", {}).get("streams", [])), created, len(data)
        )

    def load(self, name: str) -> dict[str, Any]:
        """The tree of checkpoint ``name``; ``CheckpointError`` when missing or corrupt."""
        path = self.path(name)
        if not path.is_file():  # the answer names the checkpoint, never the server's folder
            raise CheckpointError(f"no checkpoint named {name!r}; GET /v1/checkpoints lists them")
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
        if not isinstance(tree, dict) or not isinstance(tree.get("registry", {}), dict):
            raise CheckpointError(f"checkpoint {name!r} does not hold a checkpoint tree")
        streams = tree.get("registry", {}).get("streams", [])
        version, created = tree.get("model_version", 0), tree.get("created", 0.0)
        if not isinstance(streams, list) or type(version) is not int or type(created) not in (int, float):
            raise CheckpointError(f"checkpoint {name!r}: streams, model_version or created of the wrong type")
        return CheckpointInfo(name, version, len(streams), float(created), path.stat().st_size)

    def list(self) -> list[CheckpointInfo]:
        """Readable checkpoints, oldest first (by write time); unreadable files are left out."""
        if not self.directory.is_dir():
            return []
        infos = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            name = path.name[: -len(SUFFIX)]
            try:
                infos.append(self.info(name))
            except Exception as err:  # any bad file is skipped: one must never stop the others
                self._report_once("list", name, path, err)
        return sorted(infos, key=lambda i: (i.created, i.name))

    def _report_once(self, stage: str, name: str, path: Path, error: BaseException) -> None:
        try:
            stat = path.stat()
            mark = (name, stat.st_size, stat.st_mtime_ns)
        except OSError:
            mark = (name, -1, -1)
        if mark not in self._reported:
            self._reported.add(mark)
            self.report(stage, name, error)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest checkpoints; returns the deleted names."""
        infos = self.list()
        doomed = infos[: max(len(infos) - keep, 0)]
        deleted = []
        for info in doomed:
            try:
                self.path(info.name).unlink(missing_ok=True)
                deleted.append(info.name)
            except OSError as err:  # reported; the checkpoint just written stays good
                self.report("prune", info.name, err)
        return deleted
