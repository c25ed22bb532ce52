"""The worker's phase timing (``benchmarks/phase_timing.py``, ``benchmarks/worker_phases.py``).

Its figures are not checked against targets (timings belong to the benchmark); the tests keep the
timing honest (what it adds up is each call's own time, results and errors pass through untouched),
its list of phases in step with the code, and the script working end to end on a real worker.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from phase_timing import PHASES, PhaseTotals, timed  # noqa: E402


def test_timed_counts_each_call_and_passes_results_and_errors_through() -> None:
    totals = PhaseTotals()

    def work(seconds: float) -> float:
        deadline = time.thread_time() + seconds
        while time.thread_time() < deadline:  # CPU, not sleep: thread CPU time must see it
            pass
        return seconds

    async def wait(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    def fail() -> None:
        raise KeyError("boom")

    timed_work, timed_wait = timed(work, "work", totals), timed(wait, "wait", totals)
    assert timed_work(0.02) == 0.02 and timed_work(0.01) == 0.01
    assert asyncio.run(timed_wait(0.05)) == "done"
    with pytest.raises(KeyError, match="boom"):
        timed(fail, "fail", totals)()
    snapshot = totals.snapshot()
    calls, wall_s, cpu_s = snapshot["work"]
    assert calls == 2 and 0.03 <= cpu_s <= wall_s < 1.0
    calls, wall_s, cpu_s = snapshot["wait"]
    assert calls == 1 and wall_s >= 0.05 and cpu_s < wall_s  # asleep: wall time, little CPU
    assert snapshot["fail"][0] == 1
    assert timed_work.__name__ == "work" and asyncio.iscoroutinefunction(timed_wait)


def test_every_phase_names_a_method_of_the_code() -> None:
    for phase in PHASES:
        module_name, qualified = phase.split(":")
        class_name, method = qualified.split(".")
        owner = getattr(importlib.import_module(module_name), class_name)
        assert callable(getattr(owner, method, None)), phase


@pytest.mark.redis
def test_worker_phases_runs_a_worker_and_reports_its_phases(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "phases.json"
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "worker_phases.py"),
        *("--streams", "1", "--window-ms", "20", "--duration", "2", "--out", str(out)),
    ]
    env = {**os.environ, "NDOT_BENCH_REDIS_URL": redis_url}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    for name in ("Worker.run_once", "RedisStreamBus.read", "EntryApplier.apply", "OnlineLearner.step"):
        assert phases[name]["calls_per_s"] > 0, name
    assert report["level"]["returned_steps"] > 0 and report["level"]["lost"] == 0
    assert 0 < report["worker_cpu_per_s"] <= 4
    # every learner step runs inside the apply (live rows) or the learning after the answers (replays)
    outer = (
        phases["EntryApplier.apply"]["cpu_ms_per_s"] + phases["EntryApplier.learn_deferred"]["cpu_ms_per_s"]
    )
    assert phases["OnlineLearner.step"]["cpu_ms_per_s"] <= outer * 1.01
    assert "OnlineLearner.step" in done.stdout and "of worker" in done.stdout
