"""The worker alone, two source trees side by side: a git revision against the working tree.

    .venv/bin/python benchmarks/worker_ab.py --base HEAD --streams 16 --rounds 3 --duration 12

Checks ``--base`` out into a temporary git worktree, then runs ``ndot worker`` from each tree in
turn (base, new, base, new, ...; ``worker_load.py``: N live N-MNIST cameras publish straight onto
Redis at the pace of their event clock, one window a packet, each waiting for its reply), with the
same settings (the service's defaults plus ``--set``), ``--rounds`` times each. Alternating the
two keeps the machine's drift out of the comparison. Prints each run's steps/s answered, p50 / p99
publish -> reply and how far the cameras fell behind, then the median of new / base per figure and
the load average. Writes ``results/worker_ab_<tag>.json``.

``--base .`` runs the working tree on both sides; ``--base-set`` / ``--new-set`` add settings to one
side only (e.g. ``--base . --new-set NDOT_COMPILE=on``: the compiled steps against the eager ones).
A side with ``NDOT_COMPILE=on`` is first driven until its compiled graphs are ready (figures thrown
away; torch's compile cache in ``~/.cache/ndot-bench-compile``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_capacity import COMPILE_CACHE, warm_compiled  # noqa: E402
from worker_load import REPO, WorkerProcess, delete_streams, level_names, worker_level  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = ("steps_per_s", "latency_p50_ms", "latency_p99_ms", "max_schedule_lag_s")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default."""


def worker_settings(sets: list[str], streams: int, window_ms: int) -> dict[str, str]:
    """A measured worker's settings: ``sets`` (``NDOT_X=VALUE``) over the cameras' window, room for
    ``streams`` and no backlog bound (a saturated worker queues its frames, it does not refuse them)."""
    env = dict(item.split("=", 1) for item in sets)
    env.setdefault("NDOT_WINDOW_US", str(window_ms * 1000))  # the worker frames as the cameras send
    env.setdefault("NDOT_MAX_STREAMS", str(streams + 8))
    env.setdefault("NDOT_MAX_STREAM_BACKLOG_FRAMES", "100000")
    return env


def compile_settings(env: dict[str, str]) -> dict[str, str]:
    """``env`` with, under ``NDOT_COMPILE=on``, the benchmarks' compile cache and the log that says when
    the graphs are ready (``warm_compiled`` reads it)."""
    if env.get("NDOT_COMPILE") != "on":
        return env
    return {"NDOT_COMPILE_CACHE_DIR": str(COMPILE_CACHE), "NDOT_LOG_LEVEL": "INFO", **env}


def warm(worker: WorkerProcess, streams: int, window_us: int) -> None:
    """3 s of 2 cameras (with ``NDOT_COMPILE=on``, then until the graphs for ``streams`` compiled), their
    streams deleted after: what is measured next steps a table of its own streams only."""
    worker_level(worker.stream, 2, 3.0, window_us)
    if worker.env.get("NDOT_COMPILE") == "on":
        warm_compiled(worker, [streams], window_us, 600.0)
    delete_streams(worker.stream, level_names(2))


def one_run(
    source: Path, env: dict[str, str], streams: int, duration_s: float, window_us: int
) -> dict[str, Any]:
    """One worker from ``source``, warmed (``warm``), then ``streams`` cameras measured."""
    with (
        tempfile.TemporaryDirectory(prefix="ndot-ab-") as workdir,
        WorkerProcess(Path(workdir), compile_settings(env), source=source) as worker,
    ):
        warm(worker, streams, window_us)
        level = worker_level(worker.stream, streams, duration_s, window_us)
    level.pop("replied_at", None)
    return level


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--base",
        default="HEAD",
        help="git revision to compare the working tree against ('.': the working tree)",
    )
    parser.add_argument("--streams", type=int, default=16, help="live cameras")
    parser.add_argument("--window-ms", type=int, default=20, help="frame window (one packet per window)")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NDOT_X=VALUE", help="a worker setting for both trees"
    )
    parser.add_argument("--base-set", action="append", default=[], metavar="NDOT_X=VALUE", help="base only")
    parser.add_argument("--new-set", action="append", default=[], metavar="NDOT_X=VALUE", help="new only")
    parser.add_argument("--tag", default="latest", help="results/worker_ab_<tag>.json")
    args = parser.parse_args(argv)
    env = worker_settings(args.set, args.streams, args.window_ms)
    sides = {
        "base": env | dict(item.split("=", 1) for item in args.base_set),
        "new": env | dict(item.split("=", 1) for item in args.new_set),
    }
    revision = "working tree"
    if args.base != ".":
        revision = subprocess.run(
            ["git", "rev-parse", "--short", args.base], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout.strip()
    load_start = os.getloadavg()
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="ndot-ab-tree-") as scratch:
        base_tree = REPO if args.base == "." else Path(scratch) / "base"
        if base_tree != REPO:
            subprocess.run(
                ["git", "worktree", "add", "--detach", "--quiet", str(base_tree), revision],
                cwd=REPO,
                check=True,
            )
        try:
            print(
                f"worker A/B: base {args.base} ({revision}) against the working tree; {args.streams} cameras, "
                f"{args.window_ms} ms windows, {args.duration:g} s a run, {args.rounds} runs each, "
                f"settings {sides}; load average {load_start[0]:.2f}",
                flush=True,
            )
            for index in range(args.rounds):
                for name, source in (("base", base_tree), ("new", REPO)):
                    level = one_run(source, sides[name], args.streams, args.duration, args.window_ms * 1000)
                    runs[name].append(level)
                    print(
                        f"  [{index + 1}/{args.rounds}] {name:4s} steps/s {level['steps_per_s']:6.1f}  p50 "
                        f"{level['latency_p50_ms']:5.1f} ms  p99 {level['latency_p99_ms']:5.1f} ms  behind "
                        f"{level['max_schedule_lag_s']:.2f} s  lost {level['lost']}  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
        finally:
            if base_tree != REPO:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False
                )
    ratios = {
        figure: statistics.median(
            new[figure] / base[figure] if base[figure] else float("nan")
            for base, new in zip(runs["base"], runs["new"], strict=True)
        )
        for figure in FIGURES
    }
    load_end = os.getloadavg()
    print(
        "median new / base over the pairs: "
        + ", ".join(f"{figure} {ratio:.2f}" for figure, ratio in ratios.items())
        + f"; load average at start {load_start[0]:.2f}, at end {' / '.join(f'{v:.2f}' for v in load_end)}; "
        f"wall {(time.perf_counter() - started) / 60:.1f} min"
    )
    out = RESULTS / f"worker_ab_{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv[1:] if argv is None else argv,
        "base": revision,
        "settings": sides,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "ratios_new_over_base": ratios,
        "runs": runs,
    }
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
