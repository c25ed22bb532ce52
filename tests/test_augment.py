"""Batch augmentation: crops are shifts, flips mirror, cutout zeros one square; time-steps move together."""

from __future__ import annotations

import numpy as np

from ndot_core.experiments.augment import augment, cutout, random_crop, random_flip


def frames_batch(count=6, steps=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 5, (count, steps, 2, size, size)).astype(np.float32)  # no zeros inside


def shift(sample, dy, dx):
    """``sample`` moved by (dy, dx) with zero fill."""
    size = sample.shape[-1]
    out = np.zeros_like(sample)
    src = sample[..., max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
    out[..., max(0, dy) : max(0, dy) + src.shape[-2], max(0, dx) : max(0, dx) + src.shape[-1]] = src
    return out


def test_random_crop_is_a_zero_filled_shift_shared_by_all_time_steps():
    batch = frames_batch()
    cropped = random_crop(batch, padding=2, rng=np.random.default_rng(1))
    assert cropped.shape == batch.shape
    shifts_seen = set()
    for sample, result in zip(batch, cropped, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(shift(sample, dy, dx), result)
        ]
        assert len(matches) == 1
        shifts_seen.add(matches[0])
    assert len(shifts_seen) > 1  # offsets drawn per sample
    np.testing.assert_array_equal(random_crop(batch, 0, np.random.default_rng(0)), batch)


def test_flip_mirrors_columns():
    batch = frames_batch()
    np.testing.assert_array_equal(
        random_flip(batch, np.random.default_rng(0), probability=1.0), batch[..., ::-1]
    )
    np.testing.assert_array_equal(random_flip(batch, np.random.default_rng(0), probability=0.0), batch)


def test_cutout_zeros_one_square_per_sample():
    batch = frames_batch(size=16)
    out = cutout(batch, 4, np.random.default_rng(3))
    for result in out:
        zeros = result[0, 0] == 0
        assert np.array_equal(zeros, result[-1, 1] == 0)  # same square in every step and channel
        rows, cols = np.flatnonzero(zeros.any(axis=1)), np.flatnonzero(zeros.any(axis=0))
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4
        assert zeros.sum() == len(rows) * len(cols)


def test_augment_leaves_its_input_alone():
    batch = frames_batch()
    before = batch.copy()
    augment(batch, np.random.default_rng(0), padding=2, flip=True, cutout_size=3)
    np.testing.assert_array_equal(batch, before)
