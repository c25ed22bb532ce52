"""``ndot train|eval|compare``: flags, exit codes, files, and a short version of the README experiment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ndot_core.experiments.cli import build_parser, main
from ndot_core.experiments.run_files import read_records

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--model",
    "mlp",
    "--model-arg",
    "hidden=[32,32]",
    "--limit",
    "100",
    "--batch-size",
    "16",
    "--lr",
    "0.05",
    "--no-progress",
    "--quiet",
]


def option_actions(command: str) -> list:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return [a for a in sub._actions if a.option_strings and "--help" not in a.option_strings]


@pytest.mark.parametrize("command", ["train", "eval", "compare"])
def test_help_explains_every_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    actions = option_actions(command)
    assert actions
    for action in actions:
        assert action.help and len(action.help) > 15, f"{action.option_strings} has no real help text"
        assert action.option_strings[-1] in text
        assert " ".join(action.help.split()[:2]) in text


def test_train_help_lists_the_issue_flags(capsys: pytest.CaptureFixture[str]) -> None:
    main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--data-dir",
        "--model",
        "--rule",
        "--mode",
        "-T",
        "--alpha",
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--seed",
        "--device",
        "--out",
        "--download",
        "--resume",
        "--schedule",
    ):
        assert flag in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "-T", "0"], "-T/--steps: expected a positive integer, got 0"),
        (["train", "--rule", "backprop"], "invalid choice: 'backprop'"),
        (["train", "--mode", "sometimes"], "invalid choice: 'sometimes'"),
        (["train", "--alpha", "1.5"], "expected a value in [0, 1], got 1.5"),
        (["train", "--model-arg", "hidden"], "expected KEY=VALUE"),
        (["train", "--epochs", "two"], "expected a positive integer, got 'two'"),
        (["compare", "--runs", "ndot:online,ndot:sideways"], "run 1 'ndot:sideways'"),
        (["eval"], "the following arguments are required: checkpoint"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_names_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "run"), *TINY])
    assert code == 1
    err = capsys.readouterr().err
    assert "--download" in err and str(tmp_path / "absent") in err


def test_eval_of_a_missing_checkpoint_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path)]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_train_then_resume_then_eval(
    nmnist_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = ["train", "--data-dir", str(nmnist_small), "-T", "3", "--out", str(out), *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert main([*base, "--epochs", "2"]) == 1  # the folder holds a run: refuse to overwrite it
    assert "--resume" in capsys.readouterr().err
    assert main([*base, "--epochs", "2", "--resume", "--schedule", "cosine"]) == 0
    history = read_records(out / "metrics.json")
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[1]["lr"] == pytest.approx(0.025)  # cosine at epoch 2 of 2
    capsys.readouterr()
    result_path = tmp_path / "eval.json"
    assert main(["eval", str(out), "--no-progress", "--out", str(result_path)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    result = json.loads(result_path.read_text())
    assert result["accuracy"] == pytest.approx(history[-1]["test_acc"])
    assert result["epoch"] == 2


def test_module_entry_point_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ndot_core.experiments.cli", "compare", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--runs" in done.stdout


def test_compare_short_version(
    nmnist_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README experiment in miniature: all four runs, two values of T, one epoch, 100 recordings."""
    out = tmp_path / "compare"
    code = main(
        [
            "compare",
            "--data-dir",
            str(nmnist_small),
            "-T",
            "2",
            "3",
            "--epochs",
            "1",
            "--in-process",
            "--runs",
            "ndot:online,ndot:accumulate,ottt:accumulate,bptt",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    rows = read_records(out / "compare.json")
    assert [(r["name"], r["T"]) for r in rows] == [
        (name, t) for t in (2, 3) for name in ("NDOT_O", "NDOT_A", "OTTT_A", "BPTT")
    ]
    for row in rows:
        assert 0 <= row["test_acc"] <= 1 and row["epoch_s"] > 0 and row["peak_mem_mib"] >= 0
        assert f"| {row['name']} | {row['T']} |" in printed
        assert (out / "runs" / f"{row['name']}_T{row['T']}" / "checkpoint.safetensors").is_file()
    assert printed.count("| NDOT_O |") == 2  # one table, one line per (run, T)
    assert (out / "compare.csv").read_text().startswith("name,")
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "in one process" in (out / "compare.md").read_text()
    again = [
        "compare",
        "--data-dir",
        str(nmnist_small),
        "-T",
        "2",
        "3",
        "--epochs",
        "1",
        "--in-process",
        "--out",
        str(out),
        *TINY,
    ]
    assert main(again) == 1  # the runs exist: refuse before training anything
    assert "--resume" in capsys.readouterr().err
    assert main([*again, "--resume"]) == 0  # every run is complete: nothing retrains, same table
    assert read_records(out / "compare.json") == [{**row} for row in rows]


def test_compare_trains_each_run_in_a_fresh_process(
    nmnist_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare"
    code = main(
        [
            "compare",
            "--data-dir",
            str(nmnist_small),
            "-T",
            "2",
            "--epochs",
            "1",
            "--runs",
            "ottt:online",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    (row,) = read_records(out / "compare.json")
    assert row["isolated"] is True and row["name"] == "OTTT_O"
    assert "fresh process" in capsys.readouterr().out
