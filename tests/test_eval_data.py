"""``ndot eval RUN --data-dir``: a saved network scored on any labelled folder (both layouts: recordings
under train/, and beside labels.txt) with its confusion matrix, or on one recording; bad folders answer
exit 1 with a message. Real N-MNIST recordings from ../shared/data, a tiny run trained here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ndot_core.events.datasets import NMNISTFolder
from ndot_core.experiments.cli import main
from ndot_core.experiments.scoring import load_run

TINY_RUN = ["--model", "mlp", "--model-arg", "hidden=[16,16]", "-T", "3", "--epochs", "1", "--limit", "60"]


@pytest.fixture(scope="module")
def run(nmnist_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(nmnist_small),
                "--out",
                str(out),
                "--no-progress",
                "--quiet",
                *TINY_RUN,
            ]
        )
        == 0
    )
    return out


def oracle_predictions(run: Path, folder: NMNISTFolder, positions: list[int]) -> np.ndarray:
    """The run's own framing (the dataset pipeline of ``ndot train``) and a plain unrolled forward."""
    saved = load_run(run)
    frames, _ = folder.subset(positions).frames(n_event_bins=saved.steps).arrays()
    x = torch.from_numpy(frames).transpose(0, 1)
    state = saved.learner.new_state(x.shape[1])
    with torch.no_grad():
        for frame in x:
            saved.learner.model.step(frame, state, saved.learner.rule)
    return state.readout_sum.argmax(dim=1).numpy()


def test_a_folder_of_another_layout_is_scored_with_its_confusion_matrix(
    run: Path, nmnist_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = NMNISTFolder(nmnist_small)
    positions = list(range(0, 240, 20))  # 12 recordings, linked beside a labels file of their own
    folder = tmp_path / "mine"
    folder.mkdir()
    lines = ["# my recordings", ""]
    for position in positions:
        name = f"digit-{position}.bs2"
        (folder / name).symlink_to(source.paths[position])
        lines.append(f"digit-{position}\t{int(source.labels[position])}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")

    out_dir, out = tmp_path / "report", tmp_path / "result.json"
    args = [
        "eval",
        str(run),
        "--data-dir",
        str(folder),
        "--out-dir",
        str(out_dir),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "accuracy" in capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = oracle_predictions(run, source, positions)
    assert [row["predicted"] for row in result["predictions"]] == expected.tolist()
    labels = source.labels[positions]
    assert result["accuracy"] == pytest.approx(float((expected == labels).mean()))
    with open(out_dir / "confusion.csv") as handle:
        matrix = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(handle))[1:]])
    assert matrix.shape == (10, 10) and matrix.sum() == len(positions)
    assert np.trace(matrix) == int((expected == labels).sum())
    for true, predicted in zip(labels, expected, strict=True):
        assert matrix[true, predicted] >= 1
    assert (out_dir / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out_dir / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [f"digit-{p}" for p in positions]
    assert all(abs(sum(float(r[f"p_{k}"]) for k in range(10)) - 1) < 1e-4 for r in rows)


def test_the_nmnist_layout_is_scored_whole_by_default_into_the_run_folder(
    run: Path, nmnist_small: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(run), "--data-dir", str(nmnist_small), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "on 1000 recordings" in printed and "recall per class" in printed
    with open(run / "eval-nmnist-small" / "confusion.csv") as handle:
        assert sum(int(v) for row in list(csv.reader(handle))[1:] for v in row[1:]) == 1000


def test_one_recording_gets_its_prediction_and_class_probabilities(
    run: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = shared_data / "recordings" / "nmnist-digit.bin"
    out = tmp_path / "one.json"
    assert main(["eval", str(run), "--data-dir", str(recording), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert f"predicted class {result['predicted']}" in printed
    assert printed.count("p = ") == 10 and result["events"] == 4325 and result["sensor"] == [34, 34]
    probabilities = np.array(result["probabilities"])
    assert probabilities.argmax() == result["predicted"] and probabilities.sum() == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("../secret\t1\n", "plain file name"),
        ("absent\t1\n", "no recording for id 'absent'"),
        ("digit\t12\n", "class 12 outside [0, 10)"),
        ("digit three\n", "expected 'id<TAB>class'"),
        ("# nothing\n", "lists no recording"),
    ],
)
def test_a_bad_labelled_folder_exits_1_naming_the_problem(
    run: Path,
    nmnist_small: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    labels: str,
    message: str,
) -> None:
    (tmp_path / "digit.bs2").symlink_to(NMNISTFolder(nmnist_small).paths[0])
    (tmp_path / "labels.txt").write_text(labels)
    assert main(["eval", str(run), "--data-dir", str(tmp_path), "--no-progress"]) == 1
    assert message in capsys.readouterr().err


def test_a_missing_data_path_exits_1(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run), "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert "no such folder or file" in capsys.readouterr().err
