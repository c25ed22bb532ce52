"""What a background compilation costs the steps served beside it (``ndot_core.engine.compiled_step``).

    .venv/bin/python benchmarks/bench_compile_window.py [--batch 8] [--steps 300]

One torch thread, stream_cnn and the service's learning defaults (as ``bench_step.py``). A learner
with ``compile="on"`` steps a batch in a loop: first ``--steps`` eager steps alone (the compiled
step held back), then until its graph, compiling in a background thread, is ready (every step in
that window is the eager local step), then ``--steps`` compiled steps. Run twice: from an empty
compile cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``, cold) and again from the cache that run left
(warm, as a restart with the cache on a volume). Prints per run the window's length, the median,
99th percentile and longest step in it against the eager steps alone, and the load average.
Verdict: no step in a window longer than 1 s (a stall), compiled faster than eager.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import make_frames, make_learner  # noqa: E402

STALL_S = 1.0


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"median {statistics.median(times) * 1e3:6.2f} ms, p99 {p99 * 1e3:6.2f} ms, max {max(times) * 1e3:7.1f} ms"


def one_run(batch: int, steps: int) -> dict[str, float]:
    """In this process (its TORCHINDUCTOR_CACHE_DIR set by the caller): eager alone, window, compiled."""
    torch.set_num_threads(1)
    learner = make_learner("local", compile="on")
    compiled, learner.compiled = learner.compiled, None
    compiled.background = True
    frames, labels = make_frames(batch), torch.arange(batch) % 10
    state = learner.new_state(batch)

    def timed(count: int | None) -> list[float]:
        out: list[float] = []
        while count is None or len(out) < count:
            start = time.perf_counter()
            learner.step(frames[len(out) % len(frames)], labels, state)
            out.append(time.perf_counter() - start)
            if count is None and learner.last_backend == "compiled":
                return out[:-1]
        return out

    timed(30)
    alone = timed(steps)
    learner.compiled = compiled
    start = time.perf_counter()
    window = timed(None)
    window_s = time.perf_counter() - start
    after = timed(steps)
    if learner.last_backend != "compiled":
        raise SystemExit(f"the compiled step did not run: {compiled.failure}")
    print(f"  eager alone:          {summary(alone)}")
    print(f"  window ({window_s:5.1f} s, {len(window)} eager steps): {summary(window)}")
    print(f"  compiled:             {summary(after)}")
    return {
        "window_s": window_s,
        "max_window_s": max(window),
        "alone": statistics.median(alone),
        "compiled": statistics.median(after),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = one_run(args.batch, args.steps)
        print("RESULT", *(f"{k}={v}" for k, v in result.items()))
        return 0
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="ndot-compile-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        for run in ("cold", "warm"):  # each in a fresh process: only the on-disk cache carries over
            print(f"{run} (batch {args.batch}):", flush=True)
            command = [
                sys.executable,
                __file__,
                "--child",
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
            ]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT")))
            line = next(line for line in out.splitlines() if line.startswith("RESULT"))
            results[run] = {k: float(v) for k, v in (item.split("=") for item in line.split()[1:])}
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("\nVerdict")
    for run, r in results.items():
        ok = r["max_window_s"] <= STALL_S
        print(
            f"  [{'PASS' if ok else 'MISS'}] {run}: longest step while compiling {r['max_window_s'] * 1e3:.0f} ms (<= {STALL_S * 1e3:.0f})"
        )
        faster = r["compiled"] < r["alone"]
        print(
            f"  [{'PASS' if faster else 'MISS'}] {run}: compiled {r['compiled'] * 1e3:.2f} ms < eager {r['alone'] * 1e3:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
