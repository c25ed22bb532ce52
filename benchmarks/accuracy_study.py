"""What moves held-out accuracy of the service's online learner on N-MNIST: a one-factor-at-a-time study.

    .venv/bin/python benchmarks/accuracy_study.py                       # the default points, seeds 0 1 2
    .venv/bin/python benchmarks/accuracy_study.py --points base lr=5e-4 "lr=5e-4,replay=2" --tag combined

The 1000 ``nmnist-small`` recordings are split once, stratified (``ndot_core.experiments.splits``,
split seed 0): 700 *stream*, 150 *choose*, 150 *report*. Each run streams the 700 once, labelled, in
the order of its seed, through the service's own ``Batcher`` with learn_at=sequence (test-then-train:
``online_nmnist.replay``, 4 streams, ready 0.35, the learner's weights seeded by the same seed), then
the final weights predict the *choose* and *report* recordings unlabelled (inference only). Settings
are chosen on *choose*; *report* is what the docs quote. A point is the service's defaults with some
keys changed (``key=value,key=value``; ``base`` = none), except replay: off unless a point sets it
(``replay=0`` / ``16`` MiB, the study's base of 2026-11-30; the service's default is now 2 / 64 MiB):

    lr, alpha, optimizer, momentum, mode (online | accumulate), T (steps_per_sample), window_ms,
    input (counts | binary | log1p: what the model sees of a frame's event counts),
    channels (e.g. 32/64/64), hidden, dropout, replay (NDOT_REPLAY_RECENT-like: re-learns of
    recent sequences per new one), replay_mb (their memory), decay (lr / sqrt(1 + n / decay) at
    the n-th sample; 0 = constant), ema (predict with an exponential moving average of the weights,
    updated at each sample's start: w_avg <- ema w_avg + (1 - ema) w; 0 = the weights themselves)

Prints one line per run (with progress), then a table per point: mean ± sample standard deviation
over the seeds of choose / report accuracy and of the prequential accuracy over the last 100 streamed
samples, the difference to ``base`` on choose, seconds per run; the best point on *choose*, its
*report* accuracy against ``--target`` (the verdict), the load average and wall time. Writes
``results/accuracy_<tag>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from online_nmnist import LAST, Config, replay  # noqa: E402

from clients.sources import Sequence, open_source, read_labels  # noqa: E402
from ndot_core import OnlineLearner  # noqa: E402
from ndot_core.experiments.splits import NMNIST_SMALL_PARTS, stratified_parts  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.worker.sequences import SequenceLimits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The one-factor-at-a-time points around the service's defaults (each changes one thing).
DEFAULT_POINTS = (
    "base",
    "lr=5e-4",
    "lr=1e-3",
    "decay=200",
    "alpha=0",
    "alpha=0.5",
    "window_ms=10,T=30",
    "window_ms=30,T=10",
    "mode=accumulate",
    "input=binary",
    "input=log1p",
    "channels=32/64/64,hidden=256",
    "dropout=0.1",
    "replay=1",
    "replay=2",
    "replay=4",
    "replay=2,replay_mb=64",
)
INPUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "counts": lambda frames: frames,
    "binary": lambda frames: frames.clamp(max=1.0),
    "log1p": torch.log1p,
}


def parse_point(text: str) -> dict[str, str]:
    """``"lr=5e-4,replay=2"`` -> ``{"lr": "5e-4", "replay": "2"}`` (``base`` -> ``{}``)."""
    if text == "base":
        return {}
    return dict(item.split("=", 1) for item in text.split(","))


def run_point(
    point: str,
    seed: int,
    parts: dict[str, list[Sequence]],
    settings: Settings,
    streams: int,
    ready: float,
) -> dict[str, Any]:
    """One run of the protocol for ``point`` under ``seed`` (order of the stream part and weights)."""
    keys = parse_point(point)
    known = {"lr", "alpha", "optimizer", "momentum", "mode", "T", "window_ms", "input", "channels", "hidden"}
    known |= {"dropout", "replay", "replay_mb", "decay", "ema"}
    if set(keys) - known:
        raise SystemExit(
            f"unknown keys {sorted(set(keys) - known)} in point {point!r}; known: {sorted(known)}"
        )
    model_args = ",".join(f"{k}={keys[k]}" for k in ("channels", "hidden", "dropout") if k in keys)
    config = Config(
        optimizer=keys.get("optimizer", settings.optimizer),
        lr=float(keys.get("lr", settings.lr)),
        momentum=float(keys.get("momentum", settings.momentum)),
        alpha=float(keys.get("alpha", settings.alpha)),
        steps_per_sample=int(keys.get("T", settings.steps_per_sample)),
        mode=keys.get("mode", settings.mode),
        rule=settings.rule,
        window_us=int(float(keys.get("window_ms", settings.window_us / 1000)) * 1000),
        model_args=model_args,
        streams=streams,
        ready=ready,
        seed=seed,
        learn_at="sequence",
        replay_recent=int(keys.get("replay", 0)),  # the study's base: no replay (the defaults of 2026-11-30)
        replay_memory_mb=float(keys.get("replay_mb", 16)),
    )
    limits = SequenceLimits(
        settings.sequence_max_frames,
        settings.sequence_max_bytes,
        settings.sequences_held,
        replay_recent=config.replay_recent,
        replay_memory_bytes=int(config.replay_memory_mb * 2**20),
    )
    transform = INPUTS[keys.get("input", "counts")]
    decay = float(keys.get("decay", 0))
    ema = float(keys.get("ema", 0))
    averaged: list[torch.Tensor] = []

    def prepare(learner: OnlineLearner) -> None:
        if transform is INPUTS["counts"]:
            return
        step = learner.step
        learner.step = lambda frames, labels, state: step(transform(frames), labels, state)  # type: ignore[method-assign]

    def on_sample(learner: OnlineLearner, index: int) -> None:
        if decay > 0:
            for group in learner.optimizer.param_groups:
                group["lr"] = config.lr / np.sqrt(1 + index / decay)
        if ema > 0:
            weights = [p.detach() for p in learner.model.parameters()]
            if not averaged:
                averaged.extend(w.clone() for w in weights)
            for mean, weight in zip(averaged, weights, strict=True):
                mean.mul_(ema).add_(weight, alpha=1 - ema)

    def before_scoring(learner: OnlineLearner) -> None:
        if ema > 0:  # predict with the average of the weights over the last ~1 / (1 - ema) samples
            on_sample(learner, len(parts["stream"]))
            with torch.no_grad():
                for weight, mean in zip(learner.model.parameters(), averaged, strict=True):
                    weight.copy_(mean)

    order = np.random.default_rng(seed).permutation(len(parts["stream"]))
    result = replay(
        config,
        [parts["stream"][i] for i in order],
        [],
        settings,
        frozen=False,
        init_seed=seed,
        sequence_limits=limits,
        prepare=prepare,
        on_sample=on_sample,
        before_scoring=before_scoring,
        scored_sets={"choose": parts["choose"], "report": parts["report"]},
    )
    return {
        "point": point,
        "seed": seed,
        "choose": result["choose_accuracy"],
        "report": result["report_accuracy"],
        "preq": result["prequential_accuracy"],
        "preq_last": result[f"prequential_accuracy_last_{LAST}"],
        "seconds": result["seconds"],
        "learned_steps": result["learned_steps"],
        "optimizer_steps": result["optimizer_steps"],
        "config": result["config"],
        "limits": {"replay_recent": limits.replay_recent, "replay_memory_bytes": limits.replay_memory_bytes},
    }


def load_parts(data_dir: Path, split_seed: int) -> dict[str, list[Sequence]]:
    """The study's stratified parts of the labelled folder (sizes: ``NMNIST_SMALL_PARTS``)."""
    labels = [label for _, label in read_labels(data_dir / "labels.txt")]
    sequences = list(open_source(data_dir))
    indices = stratified_parts(labels, list(NMNIST_SMALL_PARTS.values()), seed=split_seed)
    return {
        name: [sequences[i] for i in part] for name, part in zip(NMNIST_SMALL_PARTS, indices, strict=True)
    }


def progress(done: int, total: int, started: float) -> str:
    """``[k/n 3.2 min, ~5.1 min left, load 1.20]`` after run ``done`` (0-based) of ``total``."""
    elapsed = time.perf_counter() - started
    eta = elapsed / (done + 1) * (total - done - 1)
    return f"[{done + 1}/{total} {elapsed / 60:.1f} min, ~{eta / 60:.1f} min left, load {os.getloadavg()[0]:.2f}]"


def summarise(
    runs: list[dict[str, Any]],
    points: list[str],
    keys: tuple[str, ...] = ("choose", "report", "preq_last", "preq", "seconds"),
) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of ``keys`` per point over its seeds, in ``points`` order."""
    table = []
    for point in points:
        group = [r for r in runs if r["point"] == point]
        row: dict[str, Any] = {"point": point, "seeds": [r["seed"] for r in group]}
        for key in keys:
            values = np.array([r[key] for r in group], dtype=float)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        table.append(row)
    return table


def plot(
    table: list[dict[str, Any]],
    path: Path,
    target: float,
    xlabel: str = "accuracy after one labelled pass over 700 (%), mean ± sd",
) -> None:
    """Choose and report accuracy per point, as bars with their spread, against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.arange(len(table))
    figure, axes = plt.subplots(figsize=(9, 0.35 * len(table) + 1.6))
    for offset, key, colour in ((-0.2, "choose", "tab:blue"), (0.2, "report", "tab:orange")):
        axes.barh(
            y + offset,
            [100 * r[key] for r in table],
            0.4,
            xerr=[100 * r[f"{key}_std"] for r in table],
            color=colour,
            label=f"{key} split (150)",
        )
    axes.axvline(100 * target, color="k", linestyle=":", linewidth=1, label=f"target {target:.0%}")
    axes.set_yticks(y, [r["point"] for r in table], fontsize=8)
    axes.invert_yaxis()
    low = min(100 * min(r["choose"], r["report"]) for r in table)
    axes.set(xlim=(max(0, low - 8), 100), xlabel=xlabel)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.9 / len(table) - 0.06), ncol=3)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_table_and_verdict(
    table: list[dict[str, Any]],
    seeds: list[int],
    target: float,
    started: float,
    load_start: tuple[float, float, float],
    extra: list[tuple[str, Callable[[dict[str, Any]], str]]],
    width: int = 32,
) -> dict[str, Any]:
    """Print the points' table (choose, Δ to ``base``, report, ``extra`` columns, s/run) and the verdict:
    the best point on *choose* and its *report* accuracy against ``target``. Returns the summary
    ``write_study`` records (verdict, best point, wall seconds, load averages)."""
    base = next((r for r in table if r["point"] == "base"), None)
    print(f"\nmean ± sd over seeds {seeds}; Δ = choose - base's choose")
    heads = "".join(f" {name:>13}" for name, _ in extra)
    print(f"{'point':<{width}} {'choose':>13} {'Δ':>6} {'report':>13}{heads} {'s/run':>6}")
    for row in table:
        delta = f"{100 * (row['choose'] - base['choose']):+5.1f}" if base else "     -"
        cells = "".join(f" {cell(row):>13}" for _, cell in extra)
        print(
            f"{row['point']:<{width}} {100 * row['choose']:6.1f} ± {100 * row['choose_std']:4.1f} {delta:>6} "
            f"{100 * row['report']:6.1f} ± {100 * row['report_std']:4.1f}{cells} {row['seconds']:6.0f}"
        )
    best = max(table, key=lambda r: r["choose"])
    verdict = "PASS" if best["report"] >= target else "FAIL"
    wall = time.perf_counter() - started
    load_end = os.getloadavg()
    print(
        f"verdict: {verdict}: best point on choose: {best['point']} ({100 * best['choose']:.1f} %), its report "
        f"accuracy {100 * best['report']:.1f} ± {100 * best['report_std']:.1f} % (target {target:.0%}); "
        f"wall {wall / 60:.1f} min, load average at start {load_start[0]:.2f}, at end "
        f"{' / '.join(f'{v:.2f}' for v in load_end)} (1/5/15 min)"
    )
    return {
        "verdict": verdict,
        "best": best["point"],
        "wall_s": wall,
        "load_average_start": load_start,
        "load_average_end": load_end,
    }


def write_study(
    out: Path,
    argv: list[str],
    fields: dict[str, Any],
    target: float,
    summary: dict[str, Any],
    table: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    **plot_options: Any,
) -> None:
    """``out`` (JSON: the date, ``argv``, ``fields``, the target, the summary, the table, the runs) and
    its plot beside it (``out`` with ``.png``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": argv,
        **fields,
        "target": target,
        **summary,
        "table": table,
        "runs": runs,
    }
    out.write_text(json.dumps(payload, indent=1))
    plot(table, out.with_suffix(".png"), target, **plot_options)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = Path(os.environ.get("NDOT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "nmnist-small"
    parser.add_argument("--data", type=Path, default=data, help="labelled folder (labels.txt + train/*.bs2)")
    parser.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS), help="points (see above)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2], help="orders and weight seeds")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the stream/choose/report split")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams (batch rows)")
    parser.add_argument("--ready", type=float, default=0.35, help="as online_nmnist.py --ready")
    parser.add_argument(
        "--target", type=float, default=0.9, help="verdict: report accuracy of the best point"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a service setting for every point (e.g. lr=5e-4): the base the points change",
    )
    parser.add_argument("--tag", default="study", help="results/accuracy_<tag>.json and .png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings(auth="off", **dict(item.split("=", 1) for item in args.set))
    load_start = os.getloadavg()
    started = time.perf_counter()
    parts = load_parts(args.data, args.split_seed)
    sizes = ", ".join(f"{name} {len(part)}" for name, part in parts.items())
    print(
        f"accuracy study: nmnist-small split {sizes} (stratified, split seed {args.split_seed}); each run "
        f"streams the 700 once with labels (learn_at=sequence, {args.streams} streams), then predicts choose "
        f"and report unlabelled; base = the service's defaults{' with ' + ', '.join(args.set) if args.set else ''}"
        f" ({settings.optimizer} lr {settings.lr:g}, T {settings.steps_per_sample}, alpha {settings.alpha:g}, "
        f"{settings.window_us // 1000} ms, {settings.mode}); load average {load_start[0]:.2f}",
        flush=True,
    )
    jobs = [(point, seed) for point in args.points for seed in args.seed]
    runs = []
    for done, (point, seed) in enumerate(jobs):
        run = run_point(point, seed, parts, settings, args.streams, args.ready)
        runs.append(run)
        print(
            f"{progress(done, len(jobs), started)} {point:<32} seed {seed}: choose {run['choose']:.1%} report "
            f"{run['report']:.1%} preq@{LAST} {run['preq_last']:.1%} ({run['seconds']:.0f} s)",
            flush=True,
        )
    table = summarise(runs, list(dict.fromkeys(args.points)))
    summary = print_table_and_verdict(
        table,
        args.seed,
        args.target,
        started,
        load_start,
        [(f"preq@{LAST}", lambda row: f"{100 * row['preq_last']:6.1f} ± {100 * row['preq_last_std']:4.1f}")],
    )
    write_study(
        RESULTS / f"accuracy_{args.tag}.json",
        sys.argv[1:] if argv is None else argv,
        {"parts": {name: len(part) for name, part in parts.items()}, "set": args.set},
        args.target,
        summary,
        table,
        runs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
