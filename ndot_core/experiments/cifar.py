"""CIFAR-10 / CIFAR-100 from the authors' *binary* version, read with numpy (no torchvision, no pickle).

Record layout (https://www.cs.toronto.edu/~kriz/cifar.html): CIFAR-10 ``<label:1><pixels:3072>``,
CIFAR-100 ``<coarse:1><fine:1><pixels:3072>``; pixels are 1024 R, 1024 G, 1024 B bytes, row-major
32x32. Images come back ``[N, 3, 32, 32]`` uint8; :func:`normalize_images` gives the usual
``(x / 255 - mean) / std`` float32. Downloading happens only with ``download=True``.
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ndot_core.events.datasets import DatasetError, DatasetNotFoundError

IMAGE_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR binary archive lives and how its records are laid out."""

    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int  # bytes before the pixels; the label used is the last of them (fine for CIFAR-100)
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c32a1d4ab5d03f1284b67883e8d87530",
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        1,
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarSpec(
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "03b5dce01913d631647c71ecec9e9cb8",
        "cifar-100-binary",
        ("train.bin",),
        ("test.bin",),
        2,
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}


def read_cifar_binary(path: str | Path, label_bytes: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR binary file → ``(images [N, 3, 32, 32] uint8, labels [N] int64)``."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + IMAGE_BYTES
    if raw.size % record:
        raise DatasetError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte records")
    records = raw.reshape(-1, record)
    labels = records[:, label_bytes - 1].astype(np.int64)
    if len(labels) and labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DatasetError(f"{path}: record {bad} has label {labels[bad]} >= {num_classes} classes")
    return records[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), labels


def _download(spec: CifarSpec, root: Path) -> None:
    """Fetch the archive, check its MD5, extract only the expected regular files."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec.url.rsplit("/", 1)[1]
    if not archive.is_file():
        partial = archive.with_suffix(".part")
        with urllib.request.urlopen(spec.url, timeout=60) as response, open(partial, "wb") as out:  # noqa: S310
            while chunk := response.read(1 << 20):
                out.write(chunk)
        partial.rename(archive)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != spec.md5:
        raise DatasetError(
            f"{archive}: MD5 {digest} differs from the published {spec.md5}; delete it and retry"
        )
    wanted = {f"{spec.folder}/{name}" for name in spec.train_files + spec.test_files}
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
        tar.extractall(root, members=members, filter="data")


def load_cifar(
    name: str, root: str | Path, train: bool = True, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 3, 32, 32] uint8, labels [N] int64)`` of CIFAR-10 (``"cifar10"``) or CIFAR-100.

    Looks in ``root/cifar-10-batches-bin`` / ``root/cifar-100-binary``; when absent, downloads the
    binary archive only with ``download=True`` and raises :class:`DatasetNotFoundError` otherwise.
    """
    if name not in CIFAR_SPECS:
        raise DatasetError(f"unknown CIFAR dataset {name!r}; one of {tuple(CIFAR_SPECS)}")
    spec, root = CIFAR_SPECS[name], Path(root)
    files = [root / spec.folder / f for f in (spec.train_files if train else spec.test_files)]
    if not all(f.is_file() for f in files):
        if not download:
            raise DatasetNotFoundError(
                f"{name} not found under {root / spec.folder}; pass --download (download=True) to fetch {spec.url}"
            )
        _download(spec, root)
    parts = [read_cifar_binary(f, spec.label_bytes, spec.num_classes) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def normalize_images(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 ``[..., 3, H, W]`` → float32 ``(x / 255 - mean) / std`` with the dataset's channel statistics."""
    spec = CIFAR_SPECS[name]
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return (images.astype(np.float32) / 255.0 - mean) / std
