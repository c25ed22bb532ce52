"""Offline experiments: train a spiking network on a framed dataset, evaluate it, compare rules.

One epoch of ``train``::

    for each shuffled batch (frames [T, B, C, H, W], labels [B]):
        loss = learner.learn_sequence(frames, labels)        # NDOT_O / NDOT_A / OTTT_A / BPTT
        train prediction = argmax_k sum_t o_k[t]             # readout logits seen during learning
    held-out accuracy = mean(argmax_k sum_t o_k[t] == y)     # eval mode, no grad, fresh state per batch

and, under ``--out``: ``metrics.json`` / ``metrics.csv`` (one record per epoch), ``curves.png``,
``checkpoint.safetensors`` + ``checkpoint.json`` (see :mod:`ndot_core.experiments.run_files`) and ``summary.json``.
The shuffle and any randomness in an epoch are seeded from ``(seed, epoch)``, so a run resumed from
its checkpoint sees the same batches it would have seen without stopping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ndot_core.engine.learner import OnlineLearner
from ndot_core.engine.models import build_model
from ndot_core.experiments.config import (
    RESUME_KEYS,
    SCHEDULES,
    ExperimentError,
    RunConfig,
    cosine_lr,
    torch_threads,
)
from ndot_core.experiments.frame_sets import FrameSet, load_frame_sets
from ndot_core.experiments.memory import PeakMemory, SavedTensorsPeak
from ndot_core.experiments.plots import plot_training_curves
from ndot_core.experiments.run_files import (
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
    write_records,
)

MIB = float(1 << 20)


def load_run_data(config: RunConfig) -> tuple[FrameSet, FrameSet]:
    """``(train, held-out)`` frame sets for ``config`` (its dataset, T, framing, split and ``--limit``)."""
    return load_frame_sets(
        config.dataset,
        config.dataset_dir,
        config.steps,
        output_size=config.output_size,
        split_by=config.split_by,
        heldout_fraction=config.heldout_fraction,
        seed=config.seed,
        limit=config.limit,
        download=config.download,
        progress=config.progress,
        shift=config.shift,
    )


@torch.no_grad()
def evaluate(
    learner: OnlineLearner, data: FrameSet, batch_size: int, progress: bool = False
) -> tuple[float, float]:
    """Held-out ``(accuracy, loss)``: each batch from a fresh state, dropout off, no learning.

    The loss is the cross-entropy of the time-averaged logits ``sum_t o[t] / T`` (a summary of the
    prediction, not the training loss of Eq. 13).
    """
    model = learner.model
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        bar = tqdm(
            data.batches(batch_size, None),
            total=data.num_batches(batch_size),
            desc="held-out",
            leave=False,
            disable=not progress,
            file=sys.stderr,
        )
        for frames, labels in bar:
            frames = frames.to(learner.device, learner.dtype)
            labels = labels.to(learner.device)
            state = learner.new_state(labels.shape[0])
            for t in range(frames.shape[0]):
                model.step(frames[t], state, learner.rule)
            correct += int((learner.predict(state) == labels).sum())
            mean_logits = state.readout_sum / frames.shape[0]
            loss_sum += float(F.cross_entropy(mean_logits, labels, reduction="sum"))
    finally:
        model.train(was_training)
    return correct / max(1, len(data)), loss_sum / max(1, len(data))


class ReadoutRecorder:
    """Sums the readout's logits over the steps of a sequence (a forward hook on ``model.readout``).

    ``learn_sequence`` returns only the loss; the hook sees the same logits it learns from, so the
    training accuracy costs no extra forward pass.
    """

    def __init__(self, learner: OnlineLearner) -> None:
        self.total: Tensor | None = None
        self._handle = learner.model.readout.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
        logits = output.detach()
        self.total = logits if self.total is None else self.total + logits

    def take(self) -> Tensor | None:
        total, self.total = self.total, None
        return total

    def close(self) -> None:
        self._handle.remove()


def build_learner(config: RunConfig, train_set: FrameSet) -> OnlineLearner:
    """Model and learner for ``config``, seeded by ``config.seed``."""
    return learner_for(config, train_set.frame_shape, train_set.num_classes)


def learner_for(config: RunConfig, frame_shape: tuple[int, int, int], num_classes: int) -> OnlineLearner:
    """Model and learner for ``config`` on frames ``(C, H, W)`` of ``num_classes`` classes, seeded."""
    torch.manual_seed(config.seed)
    channels, height, width = frame_shape
    model = build_model(
        config.model,
        in_channels=channels,
        num_classes=num_classes,
        input_size=(height, width),
        **config.model_args,
    )
    return OnlineLearner(
        model,
        rule=config.rule,
        mode="accumulate" if config.rule == "bptt" else config.mode,
        optimizer=config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        alpha=config.alpha,
        steps_per_sample=config.steps,
        device=config.device,
        weight_decay=config.weight_decay,
    )


def _resume_point(config: RunConfig, learner: OnlineLearner) -> tuple[int, list[dict[str, Any]]]:
    """``(first epoch to run, history so far)``; loads the checkpoint under ``--out`` on ``--resume``."""
    _, json_path = checkpoint_paths(config.out)
    if not config.resume:
        if json_path.exists():
            raise ExperimentError(
                f"{config.out} already holds a checkpoint; pass --resume to continue it "
                "or choose another --out"
            )
        return 1, []
    if not json_path.exists():
        raise ExperimentError(f"--resume: no checkpoint at {json_path}")
    state, metadata = load_checkpoint(json_path)
    saved = metadata.get("config", {})
    mismatched = [k for k in RESUME_KEYS if saved.get(k) != config.to_json().get(k)]
    if mismatched:
        detail = ", ".join(f"{k}={saved.get(k)!r} (now {config.to_json().get(k)!r})" for k in mismatched)
        raise ExperimentError(f"--resume: {json_path} was trained with {detail}")
    learner.load_state_dict(state)
    return int(metadata["epoch"]) + 1, list(metadata.get("history", []))


def train_epoch(
    learner: OnlineLearner, data: FrameSet, config: RunConfig, epoch: int
) -> tuple[float, float | None]:
    """One pass over ``data``: ``(mean loss per batch, training accuracy or None)``."""
    torch.manual_seed(config.seed * 1_000_003 + epoch)
    learner.model.train()
    recorder = ReadoutRecorder(learner) if hasattr(learner.model, "readout") else None
    loss_sum, correct, seen, batches = 0.0, 0, 0, 0
    bar = tqdm(
        data.batches(config.batch_size, config.seed * 1_000_003 + epoch),
        total=data.num_batches(config.batch_size),
        leave=False,
        file=sys.stderr,
        desc=f"{config.run_name} T={config.steps} epoch {epoch}/{config.epochs}",
        disable=not config.progress,
    )
    try:
        for frames, labels in bar:
            loss_sum += learner.learn_sequence(frames, labels)
            batches += 1
            seen += labels.shape[0]
            postfix = {"loss": f"{loss_sum / batches:.3f}"}
            if recorder is not None and (summed := recorder.take()) is not None:
                correct += int((summed.argmax(dim=1).cpu() == labels).sum())
                postfix["acc"] = f"{100 * correct / seen:.1f}%"
            bar.set_postfix(postfix)
    finally:
        if recorder is not None:
            recorder.close()
    return loss_sum / max(1, batches), (correct / seen if recorder is not None and seen else None)


def train(
    config: RunConfig,
    data: tuple[FrameSet, FrameSet] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says; write metrics, curves and checkpoints under ``config.out``; return the summary.

    ``data``: the ``(train, held-out)`` sets of ``load_run_data(config)`` when already loaded.
    ``config.threads`` sets torch's CPU thread count for the run (restored afterwards).
    """
    with torch_threads(config.threads):
        return _train(config, data, log)


def _train(
    config: RunConfig, data: tuple[FrameSet, FrameSet] | None, log: Callable[[str], None] | None
) -> dict[str, Any]:
    log = log or (lambda line: tqdm.write(line, file=sys.stdout))
    say = log if config.verbose else (lambda line: None)
    if config.schedule not in SCHEDULES:
        raise ExperimentError(f"unknown schedule {config.schedule!r}; expected one of {SCHEDULES}")
    train_set, test_set = data if data is not None else load_run_data(config)
    if train_set.steps != config.steps or train_set.frame_shape != test_set.frame_shape:
        raise ExperimentError(
            f"data has T={train_set.steps}, frames {train_set.frame_shape} / "
            f"{test_set.frame_shape}; the run asks for T={config.steps}"
        )
    learner = build_learner(config, train_set)
    start_epoch, history = _resume_point(config, learner)
    base_lr = learner.lr
    say(
        f"{config.run_name} T={config.steps} {config.model} on {config.dataset}: {len(train_set)} train / "
        f"{len(test_set)} held-out, frames {(config.steps, *train_set.frame_shape)}, device {learner.device}"
        + (f", resuming at epoch {start_epoch}" if start_epoch > 1 else "")
    )
    for epoch in range(start_epoch, config.epochs + 1):
        lr = cosine_lr(base_lr, epoch, config.epochs) if config.schedule == "cosine" else base_lr
        for group in learner.optimizer.param_groups:
            group["lr"] = lr
        with PeakMemory(learner.device) as meter, SavedTensorsPeak() as saved:
            started = time.perf_counter()
            train_loss, train_acc = train_epoch(learner, train_set, config, epoch)
            epoch_s = time.perf_counter() - started
        test_acc, test_loss = evaluate(learner, test_set, config.batch_size, config.progress)
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "epoch_s": epoch_s,
            "peak_mem_mib": meter.peak_bytes / MIB,
            "mem_measure": meter.measure,
            "saved_peak_mib": saved.peak_bytes / MIB,
            "model_version": learner.version,
        }
        history.append(record)
        write_records(config.out, "metrics", history)
        save_checkpoint(
            config.out,
            learner.state_dict(),
            {
                "config": config.to_json(),
                "epoch": epoch,
                "history": history,
                "num_classes": train_set.num_classes,
                "frame_shape": list(train_set.frame_shape),
            },
        )
        plot_training_curves(
            history,
            config.out / "curves.png",
            title=f"{config.run_name} T={config.steps} {config.model} / {config.dataset}",
        )
        train_part = f"acc {100 * train_acc:.1f}%" if train_acc is not None else ""
        say(
            f"epoch {epoch}/{config.epochs}  loss {train_loss:.4f} {train_part}  held-out acc "
            f"{100 * test_acc:.2f}%  {epoch_s:.1f} s  peak {meter.peak_bytes / MIB:.1f} MiB ({meter.measure}), "
            f"autograd saved {saved.peak_bytes / MIB:.1f} MiB"
        )
    if not history:
        raise ExperimentError(f"nothing to do: --epochs {config.epochs} is below the first epoch to run")
    summary = summarise(config, history)
    write_records(config.out, "summary", [summary])
    return summary


def summarise(config: RunConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """One record per run: final and best held-out accuracy, median s/epoch, peak memory over epochs.

    The median resists epochs slowed by other work on a shared machine (all epochs are in metrics.json).
    """
    return {
        "name": config.run_name,
        "rule": config.rule,
        "mode": config.mode if config.rule != "bptt" else "-",
        "T": config.steps,
        "epochs": len(history),
        "test_acc": history[-1]["test_acc"],
        "best_test_acc": max(r["test_acc"] for r in history),
        "train_acc": history[-1]["train_acc"],
        "epoch_s": float(np.median([r["epoch_s"] for r in history])),
        "peak_mem_mib": max(r["peak_mem_mib"] for r in history),
        "mem_measure": history[-1]["mem_measure"],
        "saved_peak_mib": max(r.get("saved_peak_mib", 0.0) for r in history),
    }


def evaluate_checkpoint(
    checkpoint: Path,
    data_dir: Path | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    split: str = "test",
    download: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint, rebuild its dataset split and report ``{"accuracy", "loss", "samples", ...}``."""
    state, metadata = load_checkpoint(checkpoint)
    if "config" not in metadata:
        raise CheckpointError(f"{checkpoint} carries no run configuration")
    config = RunConfig.from_json(metadata["config"])
    if data_dir is not None:
        config.data_dir = data_dir
    if device is not None:
        config.device = device
    config.download = download
    train_set, test_set = load_run_data(config)
    data = {"test": test_set, "train": train_set}.get(split)
    if data is None:
        raise ExperimentError(f"unknown split {split!r}; expected 'test' or 'train'")
    with torch_threads(config.threads):
        learner = build_learner(config, train_set)
        learner.load_state_dict(state)
        accuracy, loss = evaluate(learner, data, batch_size or config.batch_size, progress)
    return {
        "checkpoint": str(checkpoint),
        "epoch": metadata.get("epoch"),
        "name": config.run_name,
        "T": config.steps,
        "split": split,
        "samples": len(data),
        "accuracy": accuracy,
        "loss": loss,
    }
