"""Train / held-out data of an experiment as arrays, served in time-major batches.

    event data  x [N, T, C, H, W]  ->  batch [T, B, C, H, W]
    images      x [N, C, H, W]     ->  batch [T, B, C, H, W]   (the same image at every step)

Training batches are shuffled and augmented from one seed per epoch; held-out batches come in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ndot_core.events.datasets import stratified_split_indices
from ndot_core.experiments.data import load_frames


@dataclass
class FrameSet:
    """One side of a split: event frames ``x`` [N, T, C, H, W] or images [N, C, H, W] (shown T times).

    ``augment(batch, rng)`` is the dataset's training augmentation (None: none).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    steps: int
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one frame."""
        return tuple(int(v) for v in self.x.shape[-3:])  # type: ignore[return-value]

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size

    def batches(self, batch_size: int, seed: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(frames [T, B, C, H, W], labels [B])``; with a ``seed``: shuffled and augmented."""
        rng = np.random.default_rng(seed) if seed is not None else None
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            rows = order[start : start + batch_size]
            batch = self.x[rows]
            if rng is not None and self.augment is not None:
                batch = self.augment(batch, rng)
            frames = torch.from_numpy(np.ascontiguousarray(batch))
            if frames.dim() == 4:  # static images: the same input at every time-step (direct encoding)
                frames = frames.unsqueeze(1).expand(-1, self.steps, -1, -1, -1)
            yield frames.transpose(0, 1), torch.from_numpy(self.y[rows])


def _stratified_subset(x: np.ndarray, y: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """About ``count`` items of ``(x, y)``, the same share of every class."""
    if count >= len(y):
        return x, y
    _, chosen = stratified_split_indices(y, count / len(y), seed)
    return x[chosen], y[chosen]


def load_frame_sets(
    dataset: str,
    data_dir: str | Path,
    steps: int,
    *,
    output_size: Sequence[int] | None = None,
    split_by: str = "events",
    heldout_fraction: float | None = None,
    seed: int = 0,
    limit: int | None = None,
    download: bool = False,
    progress: bool = False,
    shift: int | None = None,
) -> tuple[FrameSet, FrameSet]:
    """``(train, held-out)`` through :func:`ndot_core.datasets.load_frames` (options as there).

    ``limit=N`` keeps a stratified ~N items, split in the dataset's train/held-out proportion.
    ``shift=PX`` makes the training augmentation shift samples by up to PX pixels (``--shift``).
    """
    splits = load_frames(
        dataset,
        data_dir,
        steps,
        output_size=output_size,
        split_by=split_by,
        heldout_fraction=heldout_fraction,
        seed=seed,
        download=download,
        progress=progress,
    )
    train_x, train_y, test_x, test_y = splits.train_x, splits.train_y, splits.test_x, splits.test_y
    if limit is not None:
        share = limit / max(1, len(train_y) + len(test_y))
        train_x, train_y = _stratified_subset(train_x, train_y, round(share * len(train_y)), seed)
        test_x, test_y = _stratified_subset(test_x, test_y, round(share * len(test_y)), seed + 1)
    if shift is not None:  # replaces the dataset's crop padding (keeps its flip and cutout)
        splits.augmentation = {"flip": False, **splits.augmentation, "padding": shift}
    augment = splits.augment if any(splits.augmentation.values()) else None
    return (
        FrameSet(train_x, train_y, splits.num_classes, steps, augment),
        FrameSet(test_x, test_y, splits.num_classes, steps),
    )
