"""Training-time augmentation on numpy batches whose last two axes are (H, W).

Works for images ``[N, C, H, W]`` and event frames ``[N, T, 2, H, W]`` alike; one random draw per
sample (all time-steps of a sample move together). Written with numpy because torchvision's
transforms need torch tensors and one sample at a time; the operations are the standard ones:

- random crop: zero-pad by ``padding`` on each side, cut an ``H x W`` window at a uniform offset;
- horizontal flip with probability ``probability``;
- cutout (DeVries & Taylor, 2017): zero one ``size x size`` square centred uniformly in the image
  (clipped at the border).
"""

from __future__ import annotations

import numpy as np


def random_crop(batch: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Each sample shifted by a uniform offset in ``[-padding, padding]`` (zero fill); same shape."""
    if padding <= 0:
        return batch.copy()
    height, width = batch.shape[-2:]
    pad = [(0, 0)] * (batch.ndim - 2) + [(padding, padding), (padding, padding)]
    padded = np.pad(batch, pad)
    offsets = rng.integers(0, 2 * padding + 1, size=(len(batch), 2))
    out = np.empty_like(batch)
    for n, (dy, dx) in enumerate(offsets):
        out[n] = padded[n, ..., dy : dy + height, dx : dx + width]
    return out


def random_flip(batch: np.ndarray, rng: np.random.Generator, probability: float = 0.5) -> np.ndarray:
    """Each sample mirrored left-right with ``probability``."""
    flip = rng.random(len(batch)) < probability
    out = batch.copy()
    out[flip] = out[flip][..., ::-1]
    return out


def cutout(batch: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Each sample with one ``size x size`` square (centre uniform over the image, clipped) set to 0."""
    out = batch.copy()
    if size <= 0:
        return out
    height, width = batch.shape[-2:]
    centres = np.stack([rng.integers(0, height, len(batch)), rng.integers(0, width, len(batch))], axis=1)
    for n, (cy, cx) in enumerate(centres):
        top, left = max(0, cy - size // 2), max(0, cx - size // 2)
        out[n, ..., top : min(height, cy + (size + 1) // 2), left : min(width, cx + (size + 1) // 2)] = 0
    return out


def augment(
    batch: np.ndarray, rng: np.random.Generator, padding: int = 4, flip: bool = True, cutout_size: int = 0
) -> np.ndarray:
    """Random crop, then flip, then cutout: the paper's training augmentation (cutout for CIFAR only)."""
    out = random_crop(batch, padding, rng)
    if flip:
        out = random_flip(out, rng)
    if cutout_size:
        out = cutout(out, cutout_size, rng)
    return out
