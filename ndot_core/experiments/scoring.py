"""Scoring a saved run on data of its choosing: any labelled folder, or one recording (``ndot eval --data-dir``).

Each recording is framed as the run framed its own data and predicted from a fresh state, dropout
off, nothing learned::

    frames   = to_frames(events, sensor, n_event_bins=T | n_time_bins=T, output_size=(H, W))   [T, C, H, W]
                 (T, the split rule and (C, H, W) are the run's: its checkpoint records them)
    p        = softmax(sum_t o[t] / T)          class probabilities
    predicted = argmax_k p_k                     (= argmax of the summed readout, as in training)

A folder (``ndot_core.experiments.labelled_folder``) gives the accuracy, each class's recall and the
confusion matrix ``C[true, predicted]`` (counts), written as ``confusion.csv``, ``confusion.png``
and ``predictions.csv`` (one row per recording: id, label, predicted, p_0 .. p_{K-1}).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ndot_core.engine.learner import OnlineLearner
from ndot_core.events.datasets import DatasetError
from ndot_core.events.framing import to_frames
from ndot_core.events.readers import detect_format, read_events
from ndot_core.experiments.config import ExperimentError, RunConfig
from ndot_core.experiments.labelled_folder import LabelledRecording, read_labelled_folder
from ndot_core.experiments.plots import plot_confusion
from ndot_core.experiments.run_files import CheckpointError, load_checkpoint, resolve_checkpoint
from ndot_core.experiments.runs import learner_for

#: Sensor of N-MNIST files (``.bs2`` / ``.bin`` carry none); other formats carry theirs.
NMNIST_SENSOR = (34, 34)


@dataclass
class SavedRun:
    """A trained network from a run's checkpoint, with what framing its input needs."""

    learner: OnlineLearner
    config: RunConfig
    metadata: dict[str, Any]
    frame_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    folder: Path  # where the checkpoint lies

    @property
    def steps(self) -> int:
        return self.config.steps


def load_run(checkpoint: Path, device: str | None = None) -> SavedRun:
    """The network of a run folder or checkpoint path, in eval mode (``CheckpointError`` when unusable)."""
    json_path = resolve_checkpoint(checkpoint)
    state, metadata = load_checkpoint(json_path)
    if "config" not in metadata or "frame_shape" not in metadata or "num_classes" not in metadata:
        raise CheckpointError(f"{json_path} carries no run configuration (frame shape, classes)")
    config = RunConfig.from_json(metadata["config"])
    if device is not None:
        config.device = device
    frame_shape = tuple(int(v) for v in metadata["frame_shape"])
    if len(frame_shape) != 3:
        raise CheckpointError(f"{json_path}: frame_shape {frame_shape} is not (C, H, W)")
    learner = learner_for(config, frame_shape, int(metadata["num_classes"]))
    learner.load_state_dict(state)
    learner.model.eval()
    return SavedRun(learner, config, metadata, frame_shape, int(metadata["num_classes"]), json_path.parent)


def recording_frames(events: np.ndarray, sensor: tuple[int, int], run: SavedRun) -> np.ndarray:
    """A recording's frames ``[T, C, H, W]`` as the run framed its training data."""
    channels, height, width = run.frame_shape
    if channels != 2:
        raise ExperimentError(
            f"the run takes {channels}-channel frames ({run.config.dataset}); event recordings give 2 (OFF, ON)"
        )
    rule = {"n_event_bins" if run.config.split_by == "events" else "n_time_bins": run.steps}
    return to_frames(events, sensor, output_size=(height, width), **rule)


def read_recording(
    path: Path, sensor_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """``(events, (W, H))`` of one file; N-MNIST files get the N-MNIST sensor unless ``sensor_size`` says."""
    if sensor_size is None and detect_format(path) == "nmnist":
        sensor_size = NMNIST_SENSOR
    return read_events(path, sensor_size=sensor_size)


@torch.no_grad()
def predict(learner: OnlineLearner, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted [B], probabilities [B, K])`` of a batch of recordings' frames ``[B, T, C, H, W]``."""
    batch = torch.from_numpy(np.ascontiguousarray(frames)).to(learner.device, learner.dtype).transpose(0, 1)
    state = learner.new_state(batch.shape[1])
    for frame in batch:
        learner.model.step(frame, state, learner.rule)
    mean = state.readout_sum / max(batch.shape[0], 1)
    probabilities = torch.softmax(mean.float(), dim=1)
    return probabilities.argmax(dim=1).cpu().numpy(), probabilities.cpu().numpy()


def score_recording(run: SavedRun, path: Path, sensor_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """One recording's prediction and class probabilities."""
    events, sensor = read_recording(path, sensor_size)
    predicted, probabilities = predict(run.learner, recording_frames(events, sensor, run)[None])
    return {
        "recording": str(path),
        "events": int(len(events)),
        "sensor": list(sensor),
        "predicted": int(predicted[0]),
        "probabilities": [round(float(p), 6) for p in probabilities[0]],
    }


def _batches(
    recordings: list[LabelledRecording], run: SavedRun, batch_size: int, sensor_size: tuple[int, int] | None
) -> Iterator[tuple[list[LabelledRecording], np.ndarray]]:
    for start in range(0, len(recordings), batch_size):
        part = recordings[start : start + batch_size]
        frames = []
        for recording in part:
            try:
                events, sensor = read_recording(recording.path, sensor_size)
            except (ValueError, OSError) as err:
                raise DatasetError(f"recording {recording.id!r} ({recording.path}): {err}") from err
            frames.append(recording_frames(events, sensor, run))
        yield part, np.stack(frames)


def score_folder(
    run: SavedRun,
    folder: Path,
    batch_size: int = 32,
    sensor_size: tuple[int, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy, per-class recall, confusion matrix and per-recording predictions on a labelled folder."""
    recordings = read_labelled_folder(folder, run.num_classes)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(recordings), desc="scoring", unit="rec", disable=not progress, file=sys.stderr)
    for part, frames in _batches(recordings, run, batch_size, sensor_size):
        predicted, probabilities = predict(run.learner, frames)
        for recording, guess, p in zip(part, predicted, probabilities, strict=True):
            rows.append({"id": recording.id, "label": recording.label, "predicted": int(guess), "p": p})
        bar.update(len(part))
    bar.close()
    labels = np.array([row["label"] for row in rows])
    predictions = np.array([row["predicted"] for row in rows])
    matrix = confusion_matrix(labels, predictions, run.num_classes)
    totals = matrix.sum(axis=1)
    return {
        "folder": str(folder),
        "samples": len(rows),
        "accuracy": float((labels == predictions).mean()),
        "recall": {k: float(matrix[k, k] / totals[k]) for k in range(run.num_classes) if totals[k]},
        "confusion": matrix.tolist(),
        "predictions": rows,
    }


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """``C[true, predicted]``: how many recordings of each true class got each prediction."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def write_folder_report(result: dict[str, Any], out_dir: Path, title: str) -> dict[str, Path]:
    """``confusion.csv``, ``confusion.png`` and ``predictions.csv`` of a folder's score under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = np.asarray(result["confusion"])
    classes = matrix.shape[0]
    paths = {
        "confusion_csv": out_dir / "confusion.csv",
        "confusion_png": out_dir / "confusion.png",
        "predictions_csv": out_dir / "predictions.csv",
    }
    with open(paths["confusion_csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *range(classes)])
        for true, counts in enumerate(matrix):
            writer.writerow([true, *counts.tolist()])
    with open(paths["predictions_csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "predicted", *(f"p_{k}" for k in range(classes))])
        for row in result["predictions"]:
            writer.writerow(
                [row["id"], row["label"], row["predicted"], *(f"{float(p):.6f}" for p in row["p"])]
            )
    plot_confusion(matrix, paths["confusion_png"], title)
    return paths
