"""PNG figures of experiment runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Accuracy (left) and loss (right) per epoch, train and held-out, from metrics records.

    The two losses differ in kind: training reports Eq. 13 summed over the steps, held-out the
    cross-entropy of the time-averaged logits (see ``ndot_core.experiments.evaluate``).
    """
    epochs = [r["epoch"] for r in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (("train_acc", "train"), ("test_acc", "held-out")):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, [100 * v if v is not None else None for v in values], marker="o", label=label)
    for key, label in (
        ("train_loss", "train (Eq. 13, summed over T)"),
        ("test_loss", "held-out (CE of time-averaged logits)"),
    ):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparison(
    rows: Sequence[Mapping[str, Any]],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Path,
    memory_label: str = "peak memory (MiB)",
) -> Path:
    """Compare runs: held-out accuracy curves, then bars of accuracy, s/epoch and two memory measures.

    ``rows`` are the compare table's records (``name``, ``T``, ``test_acc``, ``epoch_s``,
    ``peak_mem_mib``, ``saved_peak_mib``); ``histories`` maps ``f"{name} T={T}"`` to that run's
    per-epoch records.
    """
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    ax_curve, ax_acc, ax_time, ax_mem, ax_saved = axes
    names = list(dict.fromkeys(r["name"] for r in rows))
    steps = sorted({int(r["T"]) for r in rows})
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    styles = {steps_t: ("-", "--", ":", "-.")[j % 4] for j, steps_t in enumerate(steps)}
    for row in rows:
        history = histories.get(f"{row['name']} T={row['T']}", [])
        ax_curve.plot(
            [r["epoch"] for r in history],
            [100 * r["test_acc"] for r in history],
            marker=".",
            color=colours[row["name"]],
            linestyle=styles[int(row["T"])],
            label=f"{row['name']} T={row['T']}",
        )
    ax_curve.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="held-out accuracy per epoch")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=7)

    width = 0.8 / max(1, len(steps))
    for ax, key, ylabel, scale in (
        (ax_acc, "test_acc", "held-out accuracy (%)", 100.0),
        (ax_time, "epoch_s", "seconds per epoch", 1.0),
        (ax_mem, "peak_mem_mib", memory_label, 1.0),
        (ax_saved, "saved_peak_mib", "autograd saved for backward (MiB)", 1.0),
    ):
        for j, steps_t in enumerate(steps):
            heights = []
            for name in names:
                match = [r for r in rows if r["name"] == name and int(r["T"]) == steps_t]
                value = match[0].get(key) if match else None
                heights.append(scale * value if value is not None else 0.0)
            positions = [i + (j - (len(steps) - 1) / 2) * width for i in range(len(names))]
            ax.bar(positions, heights, width=width, label=f"T={steps_t}")
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set(ylabel=ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    accs = [100 * r["test_acc"] for r in rows if r.get("test_acc") is not None]
    if accs:
        ax_acc.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 2))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_confusion(matrix: Any, path: Path, title: str = "") -> Path:
    """Confusion matrix ``C[true, predicted]`` (counts) as a heat map, each row shaded by its share."""
    import numpy as np

    counts = np.asarray(matrix)
    classes = counts.shape[0]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * classes + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if classes <= 20:
        for (true, predicted), count in np.ndenumerate(counts):
            if count:
                colour = "white" if shares[true, predicted] > 0.6 else "black"
                ax.text(predicted, true, str(count), ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(classes))
        ax.set_yticks(range(classes))
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
