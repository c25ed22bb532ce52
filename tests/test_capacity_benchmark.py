"""The capacity benchmark of issue 9 (``benchmarks/bench_capacity.py``) runs through: its part 1, short.

Its figures are not checked against targets here (timings belong to the benchmark, not to tests);
the test keeps the script working and its report's figures consistent with one another.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def _run_benchmark(script: str, *args: str) -> str:
    """Run ``benchmarks/<script> args`` to the end (exit code 0); its standard output."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_part_one_runs_and_writes_its_report_where_out_says(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "capacity.json"  # a .json --out is the file itself, its folder made
    stdout = _run_benchmark(
        "bench_capacity.py",
        *("--backends", "local", "--skip-service", "--compile", "off"),
        *("--rounds", "1", "--iters", "2", "--out", str(out)),
    )
    assert "Part 1" in stdout and "load average before" in stdout
    report = json.loads(out.read_text())
    assert len(report["machine"]["python_10m_additions_s"]) == 2
    assert all(seconds > 0 for seconds in report["machine"]["python_10m_additions_s"])
    assert report["machine"]["flush_denormals"] == "on"  # as the service's model threads run
    assert set(report["engine_seconds"]) == {"1", "8"}
    for figures in report["engine_seconds"].values():
        assert figures["floor"] > 0 and figures["step_local"] > 0 and figures["tick_local"] > 0
        assert figures["step_over_floor_local"] == figures["step_local"] / figures["floor"]
        assert figures["tick_over_step_local"] == figures["tick_local"] / figures["step_local"]
    assert [v["check"].split(" at ")[0] for v in report["verdicts"]] == [
        "step / floor",
        "step / floor",
        "tick / step",
    ]
    assert all(v["pass"] == (v["value"] <= v["target"]) for v in report["verdicts"])


def test_the_update_benchmark_runs_each_path_it_names(tmp_path: Path) -> None:
    """``bench_update.py``, short and eager: torch.optim's path never takes FusedUpdate, the two fused
    variants take it on every step after the first (which creates the optimizer's state)."""
    out = tmp_path / "update.json"
    stdout = _run_benchmark(
        "bench_update.py",
        *("--batches", "1", "--warm-steps", "3", "--rounds", "2", "--iters", "2", "--compile", "off"),
        *("--learn-digits", "24", "--out", str(out)),
    )
    assert "Verdict" in stdout and "load average before" in stdout
    figures = json.loads(out.read_text())["results"]["1"]
    steps = 3 + 2 * 2
    assert figures["torch.optim"]["fast_updates"] == 0
    assert figures["fused"]["fast_updates"] == figures["fused+ftz"]["fast_updates"] == steps - 1
    for name in ("torch.optim", "fused", "fused+ftz"):
        assert figures[name]["step_over_floor"] == figures[name]["step_ms"] / figures["floor"]["step_ms"]
    learned = json.loads(out.read_text())["learn_check"]  # (CI has ../shared/data; a user's machine may not)
    if learned is not None:
        assert learned["digits"] == 24
        assert (
            0 <= learned["accuracy_denormals_kept"] <= 1 and 0 <= learned["accuracy_denormals_flushed"] <= 1
        )
        assert learned["largest_relative_weight_difference"] >= 0
