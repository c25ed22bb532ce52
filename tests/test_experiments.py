"""Experiment plumbing: checkpoints without pickle, metrics files, peak memory, batches, train/resume/eval."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ndot_core import OnlineLearner, build_model
from ndot_core.experiments.compare import RunSpec, format_table, parse_runs
from ndot_core.experiments.config import ExperimentError, RunConfig, cosine_lr, run_display_name
from ndot_core.experiments.frame_sets import FrameSet
from ndot_core.experiments.memory import MEASURE_RSS_HWM, MEASURE_RU_MAXRSS, SavedTensorsPeak
from ndot_core.experiments.plots import plot_training_curves
from ndot_core.experiments.run_files import (
    CheckpointError,
    flatten_state,
    load_checkpoint,
    read_records,
    save_checkpoint,
    unflatten_state,
    write_records,
)
from ndot_core.experiments.runs import evaluate, evaluate_checkpoint, load_run_data, train
from ndot_core.experiments.splits import stratified_parts


def tiny_learner(optimizer: str = "sgd", seed: int = 0, rule: str = "ndot") -> OnlineLearner:
    torch.manual_seed(seed)
    model = build_model("mlp", in_channels=2, num_classes=3, input_size=(4, 4), hidden=(8, 8))
    return OnlineLearner(model, rule=rule, mode="online", optimizer=optimizer, lr=0.05, steps_per_sample=3)


def tiny_frames(count: int = 12, steps: int = 3, seed: int = 0) -> FrameSet:
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.5, size=(count, steps, 2, 4, 4)).astype(np.float32)
    y = np.arange(count, dtype=np.int64) % 3
    return FrameSet(x, y, num_classes=3, steps=steps)


def trained_state(learner: OnlineLearner) -> dict:
    frames = torch.from_numpy(tiny_frames().x[:4]).transpose(0, 1)
    learner.learn_sequence(frames, torch.tensor([0, 1, 2, 0]))
    return learner.state_dict()


def assert_nested_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert torch.equal(a.cpu(), b.cpu()), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_nested_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_equal(x, y, f"{path}.{i}")
    else:
        assert a == b, path


# -- checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_flatten_round_trip_keeps_optimizer_int_keys_and_tuples(optimizer: str) -> None:
    state = trained_state(tiny_learner(optimizer))
    tensors, tree = flatten_state(state)
    json.dumps(tree)  # the non-tensor part is plain JSON
    restored = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert_nested_equal(state, restored)
    assert all(isinstance(k, int) for k in restored["optimizer"]["state"])


def test_checkpoint_restores_a_learner_exactly(tmp_path: Path) -> None:
    source = tiny_learner("sgd", seed=0)
    state = trained_state(source)
    save_checkpoint(tmp_path, state, {"epoch": 3, "note": "x"})
    loaded, metadata = load_checkpoint(tmp_path)
    assert metadata == {"epoch": 3, "note": "x"}
    target = tiny_learner("sgd", seed=1)
    target.load_state_dict(loaded)
    assert_nested_equal(source.state_dict(), target.state_dict())
    # both continue identically: same weights after one more batch each
    frames = torch.from_numpy(tiny_frames(seed=5).x[:4]).transpose(0, 1)
    labels = torch.tensor([2, 1, 0, 1])
    source.learn_sequence(frames, labels)
    target.learn_sequence(frames, labels)
    assert_nested_equal(source.state_dict()["model"], target.state_dict()["model"])


def test_checkpoint_tensor_file_is_plain_safetensors(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, trained_state(tiny_learner()), {})
    tensors = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert any(key.startswith("model.") for key in tensors)
    assert any(key.startswith("optimizer.state.") for key in tensors)


def test_checkpoint_with_altered_tensor_file_is_rejected(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, trained_state(tiny_learner()), {})
    path = tmp_path / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_checkpoint(tmp_path)


def test_unstorable_state_names_its_path() -> None:
    with pytest.raises(CheckpointError, match="model.bad"):
        flatten_state({"model": {"bad": object()}})


# -- metrics files, plots, schedule, memory ----------------------------------------------------------


def test_records_written_as_matching_json_and_csv(tmp_path: Path) -> None:
    records = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.75, "extra": "x"}]
    json_path, csv_path = write_records(tmp_path, "metrics", records)
    assert read_records(json_path) == records
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "epoch,test_acc,extra"
    assert lines[2] == "2,0.75,x"


def test_training_curves_png(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1 / e, "test_loss": 1.2 / e, "train_acc": 0.2 * e, "test_acc": 0.1 * e}
        for e in (1, 2, 3)
    ]
    path = plot_training_curves(history, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cosine_schedule_runs_from_base_towards_zero() -> None:
    assert cosine_lr(0.1, 1, 10) == pytest.approx(0.1)
    assert cosine_lr(0.1, 6, 10) == pytest.approx(0.05)
    values = [cosine_lr(0.1, e, 10) for e in range(1, 11)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False)) and values[-1] > 0


_PEAK_PROBE = """
import json, torch
from ndot_core.experiments.memory import PeakMemory
with PeakMemory("cpu") as meter:
    block = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MiB, every page touched
    del block
print(json.dumps({"measure": meter.measure, "peak": meter.peak_bytes}))
"""


def test_peak_memory_sees_a_large_allocation() -> None:
    # A fresh interpreter, as PeakMemory's docstring asks: inside the long test process the C
    # allocator may serve the block from memory freed by earlier tests, which RSS never sees.
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["measure"] in (MEASURE_RSS_HWM, MEASURE_RU_MAXRSS)
    if result["measure"] == MEASURE_RSS_HWM:
        assert result["peak"] >= 24 << 20


# -- batches and evaluation --------------------------------------------------------------------------


def test_batches_are_time_major_and_seeded() -> None:
    data = tiny_frames(count=10)
    first = list(data.batches(4, seed=7))
    again = list(data.batches(4, seed=7))
    assert [f.shape for f, _ in first] == [(3, 4, 2, 4, 4), (3, 4, 2, 4, 4), (3, 2, 2, 4, 4)]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    labels = torch.cat([labels for _, labels in first])
    assert sorted(labels.tolist()) == sorted(data.y.tolist())
    in_order = torch.cat([labels for _, labels in data.batches(4, seed=None)])
    assert in_order.tolist() == data.y.tolist()
    frames, labels = next(iter(data.batches(4, seed=None)))
    assert torch.equal(frames[:, 1], torch.from_numpy(data.x[1]))


def test_static_images_are_repeated_over_time() -> None:
    images = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
    data = FrameSet(images, np.zeros(5, dtype=np.int64), num_classes=2, steps=4)
    frames, _ = next(iter(data.batches(5, seed=None)))
    assert frames.shape == (4, 5, 3, 4, 4)
    assert torch.equal(frames[0], frames[3]) and torch.equal(frames[0], torch.from_numpy(images))


def test_evaluate_counts_correct_predictions_and_leaves_weights() -> None:
    learner = tiny_learner()
    data = tiny_frames(count=9)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    accuracy, loss = evaluate(learner, data, batch_size=4)
    assert_nested_equal(before, learner.model.state_dict())
    predictions = []
    for frames, _ in data.batches(9, seed=None):
        state = learner.new_state(9)
        for t in range(frames.shape[0]):
            learner.step(frames[t], None, state)
        predictions = learner.predict(state).tolist()
    assert accuracy == pytest.approx(np.mean(np.array(predictions) == data.y))
    assert math.isfinite(loss) and loss > 0
    assert learner.model.training


def test_stratified_parts_are_disjoint_sized_proportional_and_seeded() -> None:
    labels = np.repeat(np.arange(10), [87, 117, 95, 100, 103, 91, 99, 110, 98, 100])
    np.random.default_rng(5).shuffle(labels)
    sizes = [700, 150, 150]
    parts = stratified_parts(labels, sizes, seed=0)
    assert [part.size for part in parts] == sizes
    assert np.unique(np.concatenate(parts)).size == sum(sizes)  # disjoint
    counts = np.bincount(labels, minlength=10)
    for part, size in zip(parts, sizes, strict=True):
        share = np.bincount(labels[part], minlength=10)
        assert np.abs(share - size * counts / labels.size).max() <= 1.5
    again = stratified_parts(labels, sizes, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[1], stratified_parts(labels, sizes, seed=1)[1])
    with pytest.raises(ValueError, match="1001 samples"):
        stratified_parts(labels, [1001], seed=0)


def test_run_names_and_run_parsing() -> None:
    assert [s.name for s in parse_runs("ndot:online,ndot:accumulate,ottt:accumulate,bptt")] == [
        "NDOT_O",
        "NDOT_A",
        "OTTT_A",
        "BPTT",
    ]
    assert run_display_name("ndot_reference", "online") == "NDOT_REFERENCE_O"
    assert parse_runs(" ottt:online ") == [RunSpec("ottt", "online")]
    for bad, message in (
        ("ndot:sideways", "run 0"),
        ("ndot:online,foo", "unknown rule 'foo'"),
        ("bptt:online", "bptt takes no mode"),
        ("ndot:online,ndot:online", "twice"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_runs(bad)


def test_table_names_its_memory_measure() -> None:
    row = {
        "name": "NDOT_O",
        "T": 6,
        "test_acc": 0.97,
        "best_test_acc": 0.98,
        "train_acc": 0.99,
        "epoch_s": 3.2,
        "peak_mem_mib": 40.0,
        "mem_measure": MEASURE_RSS_HWM,
        "saved_peak_mib": 9.5,
    }
    table = format_table([row])
    assert "| NDOT_O | 6 | 97.00% | 98.00% | 99.0% | 3.2 | 40.0 | 9.5 |" in table
    assert "VmHWM" in table


# -- train / resume / eval on the real N-MNIST subset ------------------------------------------------


def small_config(nmnist_small: Path, out: Path, **changes) -> RunConfig:
    config = RunConfig(
        data_dir=nmnist_small,
        model="mlp",
        model_args={"hidden": [32, 32]},
        steps=3,
        epochs=2,
        batch_size=16,
        limit=120,
        out=out,
        progress=False,
        verbose=False,
        lr=0.05,
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def small_data(nmnist_small: Path) -> tuple[FrameSet, FrameSet]:
    """The 120-recording stratified subset at T=3, loaded once for this module."""
    return load_run_data(small_config(nmnist_small, Path("unused")))


def test_shift_sets_the_training_shift_of_a_dataset_without_augmentation(
    nmnist_small: Path, small_data: tuple[FrameSet, FrameSet]
) -> None:
    plain, _ = small_data  # N-MNIST's default: no augmentation
    assert plain.augment is None
    shifted, held_out = load_run_data(small_config(nmnist_small, Path("unused"), shift=2))
    assert held_out.augment is None
    batch = shifted.x[:8]
    moved = shifted.augment(batch, np.random.default_rng(0))
    assert moved.shape == batch.shape and not np.array_equal(moved, batch)
    for before, after in zip(batch, moved, strict=True):  # a shift of <= 2 px, never a mirror image
        matches = [
            np.array_equal(
                np.pad(before, [(0, 0)] * 2 + [(2, 2)] * 2)[..., 2 - dy : 36 - dy, 2 - dx : 36 - dx], after
            )
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        ]
        assert any(matches)
    assert RunConfig.from_json(small_config(nmnist_small, Path("unused"), shift=2).to_json()).shift == 2


def test_subset_is_stratified_and_split(small_data: tuple[FrameSet, FrameSet]) -> None:
    train_set, test_set = small_data
    assert len(train_set) + len(test_set) == pytest.approx(120, abs=10)
    assert len(test_set) == pytest.approx(0.2 * (len(train_set) + len(test_set)), abs=5)
    for part in small_data:
        counts = np.bincount(part.y, minlength=10)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 3
    assert train_set.x.shape[1:] == (3, 2, 34, 34)


def test_train_writes_metrics_curves_and_checkpoint(
    nmnist_small: Path, small_data: tuple[FrameSet, FrameSet], tmp_path: Path
) -> None:
    summary = train(small_config(nmnist_small, tmp_path), small_data)
    history = read_records(tmp_path / "metrics.json")
    assert [r["epoch"] for r in history] == [1, 2]
    for record in history:
        assert 0 <= record["test_acc"] <= 1 and 0 <= record["train_acc"] <= 1
        assert record["train_loss"] > 0 and record["epoch_s"] > 0 and record["peak_mem_mib"] >= 0
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    _, metadata = load_checkpoint(tmp_path)
    assert metadata["epoch"] == 2 and metadata["config"]["rule"] == "ndot"
    assert summary["test_acc"] == history[-1]["test_acc"]
    result = evaluate_checkpoint(tmp_path, progress=False)  # reloads the data from disk
    assert result["accuracy"] == pytest.approx(history[-1]["test_acc"])
    assert result["samples"] == len(small_data[1])


def test_bptt_trains_and_reports_training_accuracy(
    nmnist_small: Path, small_data: tuple[FrameSet, FrameSet], tmp_path: Path
) -> None:
    summary = train(small_config(nmnist_small, tmp_path, rule="bptt", epochs=1), small_data)
    assert summary["name"] == "BPTT" and summary["mode"] == "-"
    assert 0 <= summary["train_acc"] <= 1


def test_resume_continues_exactly_where_it_stopped(
    nmnist_small: Path, small_data: tuple[FrameSet, FrameSet], tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    train(small_config(nmnist_small, straight, epochs=2), small_data)
    stopped = tmp_path / "stopped"
    train(small_config(nmnist_small, stopped, epochs=1), small_data)
    train(small_config(nmnist_small, stopped, epochs=2, resume=True), small_data)
    assert [r["epoch"] for r in read_records(stopped / "metrics.json")] == [1, 2]
    assert_nested_equal(load_checkpoint(straight)[0]["model"], load_checkpoint(stopped)[0]["model"])


def test_existing_run_is_not_overwritten_and_mismatched_resume_fails(
    nmnist_small: Path, small_data: tuple[FrameSet, FrameSet], tmp_path: Path
) -> None:
    train(small_config(nmnist_small, tmp_path, epochs=1), small_data)
    with pytest.raises(ExperimentError, match="--resume"):
        train(small_config(nmnist_small, tmp_path, epochs=2), small_data)
    with pytest.raises(ExperimentError, match="rule='ndot'"):
        train(small_config(nmnist_small, tmp_path, epochs=2, rule="ottt", resume=True), small_data)


def test_data_of_another_t_is_refused(
    nmnist_small: Path, small_data: tuple[FrameSet, FrameSet], tmp_path: Path
) -> None:
    with pytest.raises(ExperimentError, match="T=3"):
        train(small_config(nmnist_small, tmp_path, steps=4), small_data)


def test_saved_tensor_peak_grows_with_an_unrolled_graph_only() -> None:
    weight = torch.randn(64, 64, requires_grad=True)

    def unrolled(steps: int) -> SavedTensorsPeak:
        with SavedTensorsPeak() as meter:
            h = torch.zeros(8, 64)
            for _ in range(steps):
                h = torch.tanh(h @ weight + 1)
            h.sum().backward()
        return meter

    def step_by_step(steps: int) -> SavedTensorsPeak:
        with SavedTensorsPeak() as meter:
            h = torch.zeros(8, 64)
            for _ in range(steps):
                h = torch.tanh(h.detach() @ weight + 1)
                h.sum().backward()
        return meter

    activation = 8 * 64 * 4  # one step's [8, 64] float32 output, kept once although two ops save it
    assert unrolled(8).peak_bytes - unrolled(4).peak_bytes == 4 * activation
    assert step_by_step(8).peak_bytes == step_by_step(4).peak_bytes == 2 * activation
    assert unrolled(8).current_bytes == 0 and step_by_step(8).current_bytes == 0


@pytest.mark.parametrize("rule, grows", [("ndot", False), ("bptt", True)])
def test_learner_graph_memory_is_constant_in_t_for_ndot_only(rule: str, grows: bool) -> None:
    peaks = []
    for steps in (2, 6):
        learner = tiny_learner(rule=rule)
        frames = torch.rand(steps, 4, 2, 4, 4)
        with SavedTensorsPeak() as meter:
            learner.learn_sequence(frames, torch.tensor([0, 1, 2, 0]))
        peaks.append(meter.peak_bytes)
    input_growth = 4 * 4 * 2 * 4 * 4 * 4  # the [T, B, 2, 4, 4] float input is one storage, saved by layer 1
    if grows:
        assert peaks[1] > peaks[0] + 2 * input_growth
    else:
        assert peaks[1] <= peaks[0] + input_growth


# -- the offline study (benchmarks/offline_study.py) ---------------------------------------------------


def test_the_offline_study_trains_with_the_documented_command_and_the_points_flags(tmp_path: Path) -> None:
    import re
    import shlex

    from benchmarks.offline_study import BASE, parse_point, point_config
    from ndot_core.experiments.cli import train_config

    text = (Path(__file__).resolve().parent.parent / "docs" / "experiments.md").read_text()
    command = re.search(r"^ndot train (.*?--out \S+)", text.replace("\\\n", " "), re.M).group(1)
    flags = shlex.split(command)
    for flag in ("--data-dir", "--out"):  # the study's parts and scratch folders replace these two
        at = flags.index(flag)
        del flags[at : at + 2]
    assert flags == shlex.split(BASE)  # the study's base is the command the docs give

    documented = train_config([*flags, "--seed", "3", "--out", str(tmp_path)])
    studied = point_config("base", 3, tmp_path)
    assert (studied.model, studied.rule, studied.mode, studied.steps, studied.epochs, studied.lr) == (
        documented.model,
        documented.rule,
        documented.mode,
        documented.steps,
        documented.epochs,
        documented.lr,
    )
    assert (studied.schedule, studied.shift, studied.seed, studied.threads) == ("cosine", 2, 3, 1)
    name, extra = parse_point("wide=--model-arg channels=[32,64,64] --shift 3")
    assert name == "wide" and extra == ["--model-arg", "channels=[32,64,64]", "--shift", "3"]
    wide = point_config("wide=--model-arg channels=[32,64,64] --shift 3", 0, tmp_path)
    assert wide.model_args == {"channels": [32, 64, 64]} and wide.shift == 3
    with pytest.raises(SystemExit):  # a bad point fails before anything runs
        point_config("typo=--shfit 3", 0, tmp_path)
