"""The compact state table: every stepping path (whole table, a run of rows, scattered rows) gives
the states a gather / step / scatter gives, a failed step changes nothing, and streams that come and
go keep their own rows' states."""

from __future__ import annotations

import pytest
import torch

from ndot_core import NetworkState, OnlineLearner, build_model
from service.worker.state_table import StateTable
from service.worker.streams import StreamRegistry


def learner() -> OnlineLearner:
    torch.manual_seed(0)
    model = build_model("stream_cnn", in_channels=2, num_classes=10, input_size=(34, 34))
    return OnlineLearner(model, optimizer="adam", lr=1e-3, backend="local")


def registry_of(count: int) -> StreamRegistry:
    registry = StreamRegistry(16, lambda w, h: None)
    for i in range(count):
        registry.open(f"s{i}", 34, 34, now_s=float(i))
    return registry


def frames(batch: int, seed: int) -> torch.Tensor:
    return (torch.rand(batch, 2, 34, 34, generator=torch.Generator().manual_seed(seed)) < 0.2).float()


def advanced(table_learner: OnlineLearner, table: StateTable, steps: int = 3) -> None:
    """Put some history into every row (all rows stepped, inference only)."""
    for k in range(steps):
        table_learner.step(frames(table.state.batch_size, 100 + k), None, table.state)


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [1, 2, 3], [0, 2, 4]], ids=["whole", "run", "scattered"])
def test_every_path_equals_gather_step_scatter(rows: list[int]) -> None:
    reference_learner, table_learner = learner(), learner()
    registry = registry_of(5)
    table = StateTable(table_learner)
    table.fit(registry)
    advanced(table_learner, table)
    reference = table.state.clone()
    labels = torch.tensor([3] * len(rows))
    batch = frames(len(rows), 7)

    sub = reference.select(rows)
    reference_learner.load_state_dict(table_learner.state_dict())
    expected_logits = reference_learner.step(batch, labels, sub)
    reference.assign(rows, sub)

    stepped, how = table.batch_of(rows)
    assert how == {5: "whole", 3: "run" if rows == [1, 2, 3] else "scattered"}[len(rows)]
    logits = table_learner.step(batch, labels, stepped)
    table.put(rows, stepped, how)
    assert torch.equal(logits, expected_logits)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(table.state.state_dict()[name], tensor), name


def test_a_failed_step_on_the_whole_table_changes_nothing() -> None:
    from service.metrics import ServiceMetrics
    from service.worker.batcher import STEP, Batcher, PendingStep

    batcher = Batcher(learner(), capacity=8, window_us=20_000, metrics=ServiceMetrics())
    slots = [batcher.open(f"s{i}", 34, 34)[0] for i in range(3)]
    before = {k: v.clone() for k, v in batcher.state.state_dict().items()}
    bad = frames(1, 1).numpy()[0][:1]  # one channel instead of two: the model refuses it
    for slot in slots:
        slot.pending.append((STEP, PendingStep(bad, 1, "1-0")))
        batcher.remaining["1-0"] += 1
    batcher.tick()
    assert "1-0" in batcher.poisoned
    for name, tensor in batcher.state.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_rows_stay_with_their_streams_when_streams_come_and_go() -> None:
    table_learner = learner()
    registry = registry_of(5)
    table = StateTable(table_learner)
    table.fit(registry)
    advanced(table_learner, table)
    by_stream = {slot.stream_id: table.state.select([slot.row]).state_dict() for slot in registry}
    registry.remove("s1")
    registry.remove("s3")
    registry.open("new", 34, 34, now_s=10.0)
    table.fit(registry)
    assert sorted(slot.row for slot in registry) == list(range(4)) == list(range(table.state.batch_size))
    for slot in registry:
        state = table.state.select([slot.row]).state_dict()
        if slot.stream_id != "new":  # (a new stream's row is reset by the batcher's RESET marker)
            assert all(torch.equal(state[k], v) for k, v in by_stream[slot.stream_id].items())
    registry.open("newer", 34, 34, now_s=11.0)  # a row past the table: it grows by a resting row
    table.fit(registry)
    row = registry.get("newer").row
    assert row == 4 and all(not t.any() for t in table.state.select([row]).state_dict().values())


def test_narrow_views_and_write_rows() -> None:
    state = learner().new_state(6)
    for tensor in state.tensors().values():
        tensor.copy_(torch.arange(6).view(-1, *([1] * (tensor.dim() - 1))).expand_as(tensor))
    view = state.narrow(2, 3)
    assert int(view.steps[0]) == 2 and view.steps.data_ptr() == state.steps[2:].data_ptr()
    other = NetworkState.from_state_dict({k: torch.full_like(v, 9) for k, v in view.state_dict().items()})
    state.write_rows(2, other)
    assert state.steps.tolist() == [0, 1, 9, 9, 9, 5]
    with pytest.raises(IndexError):
        state.narrow(4, 3)
