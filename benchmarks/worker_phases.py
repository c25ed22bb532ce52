"""Where one worker's time goes, phase by phase, under live cameras (no HTTP).

    .venv/bin/python benchmarks/worker_phases.py --streams 8 --window-ms 10 --set NDOT_COMPILE=on

Runs ``ndot worker`` with its phases timed (``benchmarks/phase_timing.py``: the read, the apply, the
framing, the ticks, the learner's steps, the round's writes, ...), warms it (until its compiled graphs
are ready with ``NDOT_COMPILE=on``), then drives ``--streams`` N-MNIST cameras for ``--duration`` s as
``worker_load.py`` does (each publishes one window a packet at its camera's clock straight onto Redis and
waits for its reply). Prints, per phase: calls a second, CPU and wall milliseconds a second, CPU a call,
and the share of the worker process's CPU (all its threads, over the same interval as the phases);
then the worker's and the cameras' process CPU and the level's figures. Phases nest
(``OnlineLearner.step`` inside ``StepRunner._step``): shares are not to be added up. The worker's
settings are those of ``worker_ab.py``. Writes ``results/worker_phases_<tag>.json`` (or ``--out``).

Needs Redis (``$NDOT_BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/15``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_capacity import python_loop_s  # noqa: E402
from worker_ab import compile_settings, warm, worker_settings  # noqa: E402
from worker_load import WorkerProcess, worker_level  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default."""


def read_totals(path: Path, timeout_s: float = 10.0) -> dict[str, Any]:
    """The worker's latest phase totals (written every second)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker wrote no phase totals to {path}")
        time.sleep(0.1)
    return json.loads(path.read_text())


def phase_rates(
    before: dict[str, Any], after: dict[str, Any], worker_cpu_s: float
) -> dict[str, dict[str, float]]:
    """Per phase between two totals: calls/s, CPU and wall ms/s, CPU ms a call, share of ``worker_cpu_s``."""
    seconds = after["elapsed_s"] - before["elapsed_s"]
    rates = {}
    for name, (calls, wall_s, cpu_s) in after["phases"].items():
        calls0, wall0, cpu0 = before["phases"].get(name, (0, 0.0, 0.0))
        calls, wall_s, cpu_s = calls - calls0, wall_s - wall0, cpu_s - cpu0
        rates[name] = {
            "calls_per_s": calls / seconds,
            "cpu_ms_per_s": 1e3 * cpu_s / seconds,
            "wall_ms_per_s": 1e3 * wall_s / seconds,
            "cpu_ms_per_call": 1e3 * cpu_s / calls if calls else 0.0,
            "share_of_worker_cpu": cpu_s / worker_cpu_s if worker_cpu_s else 0.0,
        }
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--streams", type=int, default=8, help="live cameras")
    parser.add_argument("--window-ms", type=int, default=20, help="frame window (one packet per window)")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds measured")
    parser.add_argument("--set", action="append", default=[], metavar="NDOT_X=VALUE", help="a worker setting")
    parser.add_argument("--tag", default="latest", help="results/worker_phases_<tag>.json")
    parser.add_argument("--out", type=Path, help="the report's path instead (a .json file)")
    args = parser.parse_args(argv)
    env = compile_settings(worker_settings(args.set, args.streams, args.window_ms))
    window_us = args.window_ms * 1000
    load_before, python_before = os.getloadavg(), python_loop_s()
    with tempfile.TemporaryDirectory(prefix="ndot-phases-") as workdir:
        totals_path = Path(workdir) / "phases.json"
        launcher = ("-m", "benchmarks.phase_timing", str(totals_path))
        with WorkerProcess(Path(workdir), env, launcher=launcher) as worker:
            warm(worker, args.streams, window_us)
            time.sleep(1.2)  # (totals written after the warm-up)
            before = read_totals(totals_path)
            cameras_before, started = time.process_time(), time.perf_counter()
            level = worker_level(worker.stream, args.streams, args.duration, window_us)
            seconds = time.perf_counter() - started
            cameras_cpu = (time.process_time() - cameras_before) / seconds
            time.sleep(1.2)
            after = read_totals(totals_path)
    worker_cpu_s = after["process_cpu_s"] - before["process_cpu_s"]  # (the worker's, with its phase totals)
    rates = phase_rates(before, after, worker_cpu_s)
    level.pop("replied_at", None)
    print(
        f"{args.streams} cameras, {args.window_ms} ms windows, settings {env}: "
        f"{level['steps_per_s']:.0f} steps/s of {args.streams * 1000 / args.window_ms:.0f}, p50 / p99 "
        f"{level['latency_p50_ms']:.1f} / {level['latency_p99_ms']:.1f} ms, {level['max_schedule_lag_s']:.2f} s "
        f"behind; worker process {100 * worker_cpu_s / (after['elapsed_s'] - before['elapsed_s']):.0f} % of a "
        f"core, cameras' process {100 * cameras_cpu:.0f} %"
    )
    print(
        f"  {'phase':34s}{'calls/s':>9s}{'CPU ms/s':>10s}{'wall ms/s':>11s}{'CPU ms/call':>13s}{'of worker':>11s}"
    )
    for name, rate in sorted(rates.items(), key=lambda item: -item[1]["cpu_ms_per_s"]):
        print(
            f"  {name:34s}{rate['calls_per_s']:9.1f}{rate['cpu_ms_per_s']:10.1f}{rate['wall_ms_per_s']:11.1f}"
            f"{rate['cpu_ms_per_call']:13.3f}{100 * rate['share_of_worker_cpu']:10.1f}%"
        )
    load_after, python_after = os.getloadavg(), python_loop_s()
    print(
        f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; 10 M additions {python_before:.2f} -> "
        f"{python_after:.2f} s"
    )
    out = args.out or RESULTS / f"worker_phases_{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "benchmarks/worker_phases.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": env,
        "level": level,
        "worker_cpu_per_s": worker_cpu_s / (after["elapsed_s"] - before["elapsed_s"]),
        "cameras_cpu_per_s": cameras_cpu,
        "phases": rates,
        "load_average": [load_before, load_after],
        "python_10m_additions_s": [python_before, python_after],
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
