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


@pytest.mark.parametrize("fast", [pytest.param("compiled", marks=pytest.mark.compile), "graphs"])
@pytest.mark.parametrize("labelled", [False, True], ids=["predict", "learn"])
def test_a_dense_tick_steps_the_whole_table_in_place_on_the_fast_step(labelled: bool, fast: str) -> None:
    """3 of 4 streams with a frame: the compiled step (or the CUDA graph step's buffers, unrecorded)
    runs the whole table with the fourth inactive; predictions, states and weights as a gather / step /
    scatter on the eager step, the idle row exact."""
    from ndot_core.engine.compiled_step import compile_unavailable
    from ndot_core.engine.graph_step import GraphStep
    from service.metrics import ServiceMetrics
    from service.worker.batcher import STEP, Batcher, PendingStep

    if fast == "compiled" and compile_unavailable("cpu"):
        pytest.skip(compile_unavailable("cpu"))
    torch.manual_seed(0)
    compiled = OnlineLearner(
        build_model("stream_cnn", in_channels=2, num_classes=10, input_size=(34, 34)),
        optimizer="adam",
        lr=1e-3,
        backend="local",
        compile="on" if fast == "compiled" else "off",
    )
    if fast == "compiled":
        compiled.compiled.backend, compiled.compiled.background = "eager", False
    else:
        compiled.compiled = GraphStep(
            compiled.local, compiled.rule, compiled.alpha, compiled.steps_per_sample, capture=False
        )
    batchers = [
        Batcher(x, capacity=8, window_us=20_000, metrics=ServiceMetrics()) for x in (compiled, learner())
    ]
    for batcher in batchers:
        for i in range(4):
            batcher.open(f"s{i}", 34, 34)
    in_place = []
    step_in_place = batchers[0]._step_in_place
    batchers[0]._step_in_place = lambda *args: (in_place.append(len(args[1])), step_in_place(*args))
    for tick in range(4):
        idle = tick % 4  # a different stream sits each tick out
        entry = f"{tick + 1}-0"
        for batcher in batchers:
            for slot in batcher.registry:
                if slot.row != idle:
                    frame = frames(1, 10 * tick + slot.row).numpy()[0]
                    slot.pending.append((STEP, PendingStep(frame, 2 if labelled else -1, entry)))
                    batcher.remaining[entry] += 1
            idle_before = {k: v[idle].clone() for k, v in batcher.state.state_dict().items()}
            batcher.tick()
            for name, tensor in batcher.state.state_dict().items():
                assert torch.equal(tensor[idle], idle_before[name]), name
        assert compiled.last_backend == "compiled"
        got, want = (batcher.results[entry] for batcher in batchers)
        assert [r["predicted"] for r in got] == [r["predicted"] for r in want]
        for mine, theirs in zip(got, want, strict=True):
            torch.testing.assert_close(mine["probabilities"], theirs["probabilities"], rtol=0, atol=1e-5)
        for name, tensor in batchers[1].state.state_dict().items():  # (float32: rounding apart)
            torch.testing.assert_close(batchers[0].state.state_dict()[name], tensor, rtol=1e-4, atol=1e-4)
    assert in_place == [3, 3, 3, 3]  # every tick stepped inside the whole table
    assert compiled.version == (4 if labelled else 0)
    for p, q in zip(batchers[1].learner.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5)
