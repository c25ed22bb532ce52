"""The streaming CNN learns real N-MNIST recordings with NDOT on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)

from ndot_core import OnlineLearner, build_model

STEPS = 8  # frames per recording
WINDOW_US = 300_000  # the whole ~0.3 s recording
SENSOR = 34
TONIC_DTYPE = np.dtype([("x", int), ("y", int), ("t", int), ("p", int)])


def frames_of(events: np.ndarray) -> np.ndarray:
    """Event counts in ``STEPS`` equal time bins over ``WINDOW_US``: float32 [T, 2, 34, 34].

    A stand-in for ``ndot_core.framing.to_frames`` (written in parallel), kept to these four lines.
    """
    events = events[(events["t"] >= 0) & (events["t"] < WINDOW_US)]
    bins = events["t"] * STEPS // WINDOW_US
    frames = np.zeros((STEPS, 2, SENSOR, SENSOR), np.float32)
    np.add.at(frames, (bins, events["p"], events["y"], events["x"]), 1.0)
    return frames


def load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from tonic.io import read_mnist_file

    rows = [line.split() for line in (folder / "labels.txt").read_text().splitlines()[1:] if line.strip()]
    frames = [
        frames_of(read_mnist_file(str(folder / "train" / f"{i}.bs2"), dtype=TONIC_DTYPE)) for i, _ in rows
    ]
    return np.stack(frames), np.array([int(c) for _, c in rows])


def stratified_split(labels: np.ndarray, held_out_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    held = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:held_out_per_class] for c in range(10)]
    )
    return np.setdiff1d(np.arange(len(labels)), held), held


@pytest.mark.slow
def test_stream_cnn_learns_nmnist_with_ndot(nmnist_small: Path) -> None:
    frames, labels = load(nmnist_small)
    assert frames.shape == (1000, STEPS, 2, SENSOR, SENSOR)
    train, held = stratified_split(labels, held_out_per_class=20, seed=0)  # 800 / 200
    x_train, y_train = torch.from_numpy(frames[train]), torch.from_numpy(labels[train])
    x_held, y_held = torch.from_numpy(frames[held]), torch.from_numpy(labels[held])

    torch.manual_seed(0)
    model = build_model("stream_cnn", in_channels=2, num_classes=10, input_size=(SENSOR, SENSOR))
    learner = OnlineLearner(
        model, rule="ndot", mode="online", optimizer="adam", lr=1e-3, steps_per_sample=STEPS
    )
    for _epoch in range(2):
        order = torch.randperm(len(y_train))
        for start in range(0, len(order), 16):
            batch = order[start : start + 16]
            learner.learn_sequence(x_train[batch].transpose(0, 1), y_train[batch])
    assert learner.version == 2 * 50 * STEPS  # NDOT_O: one update per time-step

    state = learner.new_state(len(y_held))  # held-out streams advance side by side, inference only
    for t in range(STEPS):
        learner.step(x_held[:, t], None, state)
    accuracy = float((learner.predict(state) == y_held).float().mean())
    assert accuracy > 0.8, f"held-out accuracy {accuracy:.3f}"
