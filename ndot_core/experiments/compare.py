"""``ndot compare``: the same data, seed and budget under several rules/modes and values of T.

Each (run, T) trains in a fresh child process (``multiprocessing`` spawn), so its peak-memory figure
(:mod:`ndot_core.experiments.memory`) is not flattered or spoiled by memory an earlier run left in the
allocator. The parent reads each run's ``summary.json`` / ``metrics.json`` and writes
``compare.json``, ``compare.csv`` and ``compare.png`` under ``--out``.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ndot_core.engine.learner import MODES
from ndot_core.engine.rules import RULES
from ndot_core.experiments.config import ExperimentError, RunConfig, run_display_name
from ndot_core.experiments.frame_sets import FrameSet
from ndot_core.experiments.memory import MEASURE_CUDA, MEASURE_RSS_HWM, MEASURE_RU_MAXRSS
from ndot_core.experiments.plots import plot_comparison
from ndot_core.experiments.run_files import CheckpointError, read_records, write_records
from ndot_core.experiments.runs import load_run_data, train

DEFAULT_RUNS = "ndot:online,ndot:accumulate,ottt:accumulate,bptt"
MEMORY_MEANING = {
    MEASURE_CUDA: "peak CUDA allocated bytes during a training epoch minus those allocated at its start",
    MEASURE_RSS_HWM: "peak resident memory (VmHWM) during a training epoch minus the RSS at its start",
    MEASURE_RU_MAXRSS: "growth of the process's maximum RSS (ru_maxrss) during a training epoch",
}


@dataclass(frozen=True)
class RunSpec:
    """One rule/mode pair of a comparison, e.g. ``ndot:online`` (NDOT_O) or ``bptt``."""

    rule: str
    mode: str

    @property
    def name(self) -> str:
        return run_display_name(self.rule, self.mode)


def parse_runs(text: str) -> list[RunSpec]:
    """``"ndot:online,ottt:accumulate,bptt"`` -> specs; ``ValueError`` names the bad item."""
    specs: list[RunSpec] = []
    for position, item in enumerate(part.strip() for part in text.split(",")):
        rule, _, mode = item.partition(":")
        if rule not in RULES:
            raise ValueError(f"run {position} {item!r}: unknown rule {rule!r}; expected one of {RULES}")
        if rule == "bptt":
            if mode not in ("", "accumulate"):
                raise ValueError(
                    f"run {position} {item!r}: bptt takes no mode (it updates once per sequence)"
                )
            mode = "accumulate"
        elif mode not in MODES:
            raise ValueError(f"run {position} {item!r}: mode must be one of {MODES}, as in 'ndot:online'")
        spec = RunSpec(rule, mode)
        if spec in specs:
            raise ValueError(f"run {position} {item!r} is listed twice")
        specs.append(spec)
    if not specs:
        raise ValueError("no runs given")
    return specs


def _child_train(config: RunConfig, data: tuple[FrameSet, FrameSet]) -> None:
    try:
        train(config, data)
    except (ExperimentError, CheckpointError, ValueError) as err:
        print(f"ndot compare: {config.run_name} T={config.steps}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def run_in_child(config: RunConfig, data: tuple[FrameSet, FrameSet]) -> None:
    """Train ``config`` on ``data`` in a fresh spawned process; ``ExperimentError`` when it fails."""
    process = multiprocessing.get_context("spawn").Process(target=_child_train, args=(config, data))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise ExperimentError(
            f"{config.run_name} T={config.steps} failed in its child process "
            f"(exit code {process.exitcode}); see its output above and {config.out}"
        )


def compare(
    base: RunConfig, runs: Sequence[RunSpec], steps: Sequence[int], isolate: bool = True
) -> list[dict[str, Any]]:
    """Train every (run, T) with ``base``'s data, seed and budget; return one record per run.

    The data is loaded once per T and handed to every run. Runs go to
    ``base.out / "runs" / f"{name}_T{T}"``; ``--resume`` resumes each of them.
    ``isolate=False`` trains in this process (faster to start; the memory figures then mean less).
    """
    if not base.resume:
        taken = [
            base.out / "runs" / f"{spec.name}_T{t}"
            for t in steps
            for spec in runs
            if (base.out / "runs" / f"{spec.name}_T{t}" / "checkpoint.json").exists()
        ]
        if taken:
            raise ExperimentError(
                f"{taken[0]} already holds a checkpoint; pass --resume to continue the "
                "comparison or choose another --out"
            )
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, Any]]] = {}
    for steps_t in steps:
        data = load_run_data(replace(base, steps=int(steps_t)))
        for spec in runs:
            config = replace(
                base,
                rule=spec.rule,
                mode=spec.mode,
                steps=int(steps_t),
                out=base.out / "runs" / f"{spec.name}_T{steps_t}",
            )
            if base.resume and not (config.out / "checkpoint.json").exists():
                config = replace(config, resume=False)
            if isolate:
                run_in_child(config, data)
            else:
                train(config, data)
            summary = read_records(config.out / "summary.json")[0]
            summary["isolated"] = isolate
            rows.append(summary)
            histories[f"{spec.name} T={steps_t}"] = read_records(config.out / "metrics.json")
    write_records(base.out, "compare", rows)
    measures = {row["mem_measure"] for row in rows}
    label = "peak GPU memory (MiB)" if measures == {MEASURE_CUDA} else "peak RSS delta (MiB)"
    plot_comparison(rows, histories, base.out / "compare.png", memory_label=label)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as one Markdown table, with a line saying what the memory column measures."""
    lines = [
        "| run | T | held-out acc (last epoch) | best epoch | train acc | s / epoch (median) | "
        "peak mem (MiB) | autograd saved (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        train_acc = f"{100 * row['train_acc']:.1f}%" if row.get("train_acc") is not None else "-"
        lines.append(
            f"| {row['name']} | {row['T']} | {100 * row['test_acc']:.2f}% | "
            f"{100 * row['best_test_acc']:.2f}% | {train_acc} | {row['epoch_s']:.1f} | "
            f"{row['peak_mem_mib']:.1f} | {row.get('saved_peak_mib', 0.0):.1f} |"
        )
    for measure in sorted({row["mem_measure"] for row in rows}):
        lines.append(f"\npeak mem = {MEMORY_MEANING.get(measure, measure)} ({measure}), largest over epochs.")
    lines.append(
        "autograd saved = peak bytes of tensors autograd held for backward during an epoch "
        "(saved_tensors_hooks; parameters excluded): one step's graph for the online rules, T steps' "
        "for BPTT."
    )
    isolated = {bool(row.get("isolated", True)) for row in rows}
    lines.append(
        "Each run trained in a fresh process."
        if isolated == {True}
        else "Runs trained one after another in one process: memory freed by earlier runs can be reused "
        "without raising RSS, so later runs' figures can read low."
    )
    return "\n".join(lines)


def write_table(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """``compare.md`` beside ``compare.json``."""
    path = out / "compare.md"
    path.write_text(format_table(rows) + "\n")
    return path
