"""What one training run depends on (``RunConfig``, the flags of ``ndot train``) and small run helpers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

SCHEDULES = ("constant", "cosine")
# Settings that must match for --resume to continue a run (epochs, device and lr schedule may change).
RESUME_KEYS = (
    "dataset",
    "model",
    "model_args",
    "rule",
    "mode",
    "steps",
    "split_by",
    "output_size",
    "optimizer",
    "batch_size",
    "seed",
    "heldout_fraction",
    "limit",
    "alpha",
)


class ExperimentError(RuntimeError):
    """An experiment cannot run as asked (existing run folder, mismatched checkpoint, failed child run)."""


@dataclass
class RunConfig:
    """Everything one training run depends on (the CLI flags of ``ndot train``)."""

    dataset: str = "nmnist-small"
    data_dir: Path | None = None
    download: bool = False
    model: str = "mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    rule: str = "ndot"
    mode: str = "online"
    steps: int = 10
    split_by: str = "events"
    output_size: tuple[int, int] | None = None
    alpha: float = 0.1
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    seed: int = 0
    heldout_fraction: float | None = None
    shift: int | None = None  # random shifts of up to this many pixels in training (None: the dataset's)
    limit: int | None = None
    device: str = "cpu"
    threads: int | None = 1
    out: Path = Path("runs/train")
    resume: bool = False
    progress: bool = True
    verbose: bool = True

    @property
    def run_name(self) -> str:
        return run_display_name(self.rule, self.mode)

    @property
    def dataset_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else Path("data") / self.dataset

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        for key, value in record.items():
            if isinstance(value, Path):
                record[key] = str(value)
            elif isinstance(value, tuple):
                record[key] = list(value)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        for key in ("data_dir", "out"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        if values.get("output_size") is not None:
            values["output_size"] = tuple(values["output_size"])
        return cls(**values)


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(count)`` (None: unchanged), then restore the old count."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_display_name(rule: str, mode: str) -> str:
    """``NDOT_O``, ``NDOT_A``, ``OTTT_A``, ``BPTT`` -- the paper's names for (rule, mode)."""
    if rule == "bptt":
        return "BPTT"
    return f"{rule.upper()}_{mode[0].upper()}"


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """``lr_e = base * (1 + cos(pi * (e - 1) / E)) / 2`` for epoch ``e`` in ``1..E``."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - 1) / max(1, epochs)))
