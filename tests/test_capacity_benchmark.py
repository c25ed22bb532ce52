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


def test_part_one_runs_and_writes_its_report_where_out_says(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "capacity.json"  # a .json --out is the file itself, its folder made
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "bench_capacity.py"),
        *("--backends", "local", "--skip-service", "--compile", "off"),
        *("--rounds", "1", "--iters", "2", "--out", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "Part 1" in done.stdout and "load average before" in done.stdout
    report = json.loads(out.read_text())
    assert len(report["machine"]["python_10m_additions_s"]) == 2
    assert all(seconds > 0 for seconds in report["machine"]["python_10m_additions_s"])
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
