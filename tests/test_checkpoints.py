"""Checkpoint files: exact round trip without pickle, safe names, corrupt files refused, model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ndot_core import OnlineLearner, build_model
from ndot_core.events.layout import EVENT_DTYPE
from service.bus.messages import EventsPacket
from service.metrics import ServiceMetrics
from service.worker.batcher import Batcher
from service.worker.checkpoints import (
    CheckpointError,
    CheckpointStore,
    check_like,
    decode,
    encode,
    validate_name,
)


def nested_tree() -> dict:
    events = np.zeros(3, dtype=EVENT_DTYPE)
    events["t"], events["x"], events["p"] = [1, 2, 3], [4, 5, 6], [True, False, True]
    return {
        "weights": {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)},
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.ones(2)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "framer": {"pending": np.arange(7, dtype=np.int64), "events": events, "clock": np.int64(12)},
        "pair": (1, "x"),
        "none": None,
        "flag": True,
        "half": torch.ones(2, dtype=torch.bfloat16),
        "model_version": 9,
    }


def test_round_trip_is_exact_for_nested_tensors_arrays_and_int_keys() -> None:
    tree = nested_tree()
    back = decode(encode(tree))
    assert torch.equal(back["weights"]["a"], tree["weights"]["a"])
    assert back["weights"]["b"].dtype == torch.int64 and back["half"].dtype == torch.bfloat16
    assert torch.equal(back["optimizer"]["state"][0]["momentum_buffer"], torch.ones(2))  # int key survives
    assert back["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    np.testing.assert_array_equal(back["framer"]["events"], tree["framer"]["events"])
    assert back["framer"]["events"].dtype == EVENT_DTYPE
    assert back["framer"]["clock"] == 12 and back["pair"] == (1, "x") and back["none"] is None


def test_unstorable_values_are_refused_at_save() -> None:
    with pytest.raises(CheckpointError, match="cannot store a set"):
        encode({"bad": {1, 2}})


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "x..y", "", "a b", "ü"])
def test_names_cannot_leave_the_checkpoint_folder(name: str, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint name"):
        validate_name(name)
    with pytest.raises(CheckpointError):
        CheckpointStore(tmp_path).load(name)


def test_store_saves_atomically_lists_oldest_first_and_prunes(tmp_path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    names = [store.save({"model_version": v, "registry": {"streams": [1] * v}}).name for v in range(3)]
    assert [i.name for i in store.list()] == names
    assert [i.streams for i in store.list()] == [0, 1, 2]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp file left
    assert store.prune(keep=1) == names[:2]
    assert [i.model_version for i in store.list()] == [2]


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty"])
def test_damaged_files_are_refused(damage: str, tmp_path) -> None:
    store = CheckpointStore(tmp_path)
    info = store.save(nested_tree())
    path = store.path(info.name)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip":
        data[-5] ^= 0x01
    elif damage == "foreign":
        from safetensors.torch import save

        data = bytearray(save({"w": torch.zeros(2)}))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        store.load(info.name)


def test_check_like_names_the_first_mismatch() -> None:
    reference = {"layer": {"weight": torch.zeros(4, 3)}}
    check_like(reference, {"layer": {"weight": torch.ones(4, 3)}})
    with pytest.raises(CheckpointError, match=r"\.layer\.weight: checkpoint has torch.float32\[4, 2\]"):
        check_like(reference, {"layer": {"weight": torch.zeros(4, 2)}})
    with pytest.raises(CheckpointError, match="keys"):
        check_like(reference, {"layer": {}})


def make_batcher(num_classes: int = 10, capacity: int = 4) -> Batcher:
    torch.manual_seed(0)
    learner = OnlineLearner(
        build_model("stream_cnn", in_channels=2, num_classes=num_classes, input_size=(34, 34))
    )
    return Batcher(learner, capacity, window_us=10_000, metrics=ServiceMetrics())


def busy_batcher() -> Batcher:
    batcher = make_batcher()
    events = np.zeros(60, dtype=EVENT_DTYPE)
    events["t"] = np.arange(60) * 1000
    events["x"], events["y"], events["p"] = np.arange(60) % 34, 7, True
    wire = events.view([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")]).tobytes()
    batcher.push_packet("1-0", "cam", EventsPacket(wire, 34, 34, label=3, start=True))
    batcher.drain()
    return batcher


def test_batcher_snapshot_restores_weights_states_and_streams_exactly(tmp_path) -> None:
    source = busy_batcher()
    store = CheckpointStore(tmp_path)
    tree = store.load(store.save(source.snapshot()).name)
    target = make_batcher(capacity=8)  # another max_streams: rows are remapped
    target.load(tree)
    for name, tensor in source.learner.model.state_dict().items():
        assert torch.equal(tensor, target.learner.model.state_dict()[name]), name
    row_source, row_target = source.registry.get("cam").row, target.registry.get("cam").row
    for name, tensor in source.state.state_dict().items():
        assert torch.equal(tensor[row_source], target.state.state_dict()[name][row_target]), name
    assert target.learner.version == source.learner.version > 0
    assert target.registry.get("cam").info() == source.registry.get("cam").info()


def test_a_checkpoint_of_another_model_is_refused_and_the_running_one_untouched(tmp_path) -> None:
    other = make_batcher(num_classes=5)
    running = busy_batcher()
    before = {k: v.clone() for k, v in running.learner.model.state_dict().items()}
    state_before = {k: v.clone() for k, v in running.state.state_dict().items()}
    with pytest.raises(CheckpointError, match="needs"):
        running.load(other.snapshot())
    assert all(torch.equal(before[k], v) for k, v in running.learner.model.state_dict().items())
    assert all(torch.equal(state_before[k], v) for k, v in running.state.state_dict().items())
    assert "cam" in running.registry
