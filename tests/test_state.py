"""NetworkState: per-row reset, select/assign/cat, save and load, dropout masks fixed over a sequence."""

from __future__ import annotations

import io

import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ndot_core import NetworkState, OnlineLearner, build_model


def small_cnn(seed: int = 0, **options):
    torch.manual_seed(seed)
    return build_model("stream_cnn", 2, 4, (12, 12), channels=(4, 6), hidden=8, **options)


def frames_for(seed: int, steps: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, batch, 2, 12, 12, generator=gen) < 0.3).float() * 2


def advance(model, state: NetworkState, frames: torch.Tensor) -> None:
    with torch.no_grad():
        for x in frames:
            model.step(x, state, "ndot")


def assert_states_equal(a: NetworkState, b: NetworkState) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_reset_one_row_leaves_every_other_row_bit_identical() -> None:
    model = small_cnn()
    frames = frames_for(1, 6, 3)
    state, untouched = model.new_state(3), model.new_state(3)
    advance(model, state, frames[:3])
    advance(model, untouched, frames[:3])
    assert state.neurons[0].trace[1].abs().sum() > 0
    state.reset_rows([1])
    for name, tensor in state.tensors().items():
        assert torch.equal(tensor[[0, 2]], untouched.tensors()[name][[0, 2]]), name
        assert not tensor[1].any(), name
    advance(model, state, frames[3:])
    advance(model, untouched, frames[3:])
    for name, tensor in state.tensors().items():
        assert torch.equal(tensor[[0, 2]], untouched.tensors()[name][[0, 2]]), name
    fresh = model.new_state(1)
    advance(model, fresh, frames[3:, 1:2])
    for name, tensor in fresh.tensors().items():
        torch.testing.assert_close(state.tensors()[name][1:2], tensor, msg=name)


def test_select_assign_cat_round_trip() -> None:
    model = small_cnn()
    state = model.new_state(4)
    advance(model, state, frames_for(2, 3, 4))
    picked = state.select([3, 1])
    assert picked.batch_size == 2
    for name, tensor in picked.tensors().items():
        assert torch.equal(tensor, state.tensors()[name][[3, 1]]), name
    target = model.new_state(4)
    target.assign(torch.tensor([3, 1]), picked)
    target.assign(torch.tensor([True, False, True, False]), state.select([0, 2]))
    assert_states_equal(target, state)
    assert_states_equal(NetworkState.cat([state.select([0, 1]), state.select([2, 3])]), state)


def test_selected_rows_step_like_the_whole_batch() -> None:
    """The worker's path: select the ready rows, step them, assign them back."""
    model = small_cnn()
    frames = frames_for(3, 2, 3)
    whole, parts = model.new_state(3), model.new_state(3)
    advance(model, whole, frames)
    for x in frames:
        sub = parts.select([0, 2])
        advance(model, sub, x[[0, 2]].unsqueeze(0))
        parts.assign([0, 2], sub)
        sub = parts.select([1])
        advance(model, sub, x[[1]].unsqueeze(0))
        parts.assign([1], sub)
    for name, tensor in whole.tensors().items():
        torch.testing.assert_close(parts.tensors()[name], tensor, msg=name)


def test_row_errors_name_the_row() -> None:
    state = small_cnn().new_state(2)
    with pytest.raises(IndexError, match="row 5 at position 1"):
        state.reset_rows([0, 5])
    with pytest.raises(ValueError, match="3 rows but the other state has 1"):
        state.assign([0, 1, 1], state.select([0]))


def test_state_dict_round_trip_through_torch_and_safetensors() -> None:
    model = small_cnn(dropout=0.2)
    state = model.new_state(3)
    advance(model, state, frames_for(4, 2, 3))
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    assert_states_equal(NetworkState.from_state_dict(torch.load(buffer, weights_only=True)), state)
    assert_states_equal(NetworkState.from_state_dict(st_load(st_save(state.state_dict()))), state)
    assert "masks.0" in state.state_dict()


def test_from_state_dict_names_the_bad_entry() -> None:
    good = small_cnn().new_state(2).state_dict()
    with pytest.raises(ValueError, match="'neurons.0.x'"):
        NetworkState.from_state_dict({**good, "neurons.0.x": torch.zeros(2)})
    with pytest.raises(ValueError, match="'readout_sum' has shape"):
        NetworkState.from_state_dict({**good, "readout_sum": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="neurons.1 lacks"):
        NetworkState.from_state_dict({k: v for k, v in good.items() if k != "neurons.1.trace"})


def test_detach_and_dtype() -> None:
    state = small_cnn().new_state(2)
    double = state.to(dtype=torch.float64)
    assert double.readout_sum.dtype == torch.float64 and double.steps.dtype == torch.long
    assert all(not t.requires_grad for t in state.detach().tensors().values())


def test_save_load_continue_is_bit_identical_to_never_saving() -> None:
    frames = frames_for(5, 9, 2)
    labels = torch.tensor([1, -1])

    def make():
        return OnlineLearner(
            small_cnn(7), rule="ndot", mode="accumulate", optimizer="adam", lr=1e-2, steps_per_sample=3
        )

    learner, state = make(), None
    state = learner.new_state(2)
    for x in frames[:4]:
        learner.step(x, labels, state)
    assert learner.pending_steps == 1  # saved between optimizer steps: pending gradients matter
    buffer = io.BytesIO()
    torch.save({"learner": learner.state_dict(), "state": state.state_dict()}, buffer)
    for x in frames[4:]:
        learner.step(x, labels, state)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = make()
    restored.reset_weights(seed=123)  # make sure the weights really come from the file
    restored.load_state_dict(saved["learner"])
    restored_state = NetworkState.from_state_dict(saved["state"])
    for x in frames[4:]:
        restored.step(x, labels, restored_state)

    assert restored.version == learner.version == 3
    for (name, a), b in zip(
        learner.model.state_dict().items(), restored.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert_states_equal(restored_state, state)


def test_dropout_mask_is_fixed_over_a_sequence_and_redrawn_after_reset() -> None:
    model = small_cnn(dropout=0.5)
    state = model.new_state(2)
    advance(model, state, frames_for(6, 1, 2))
    mask = state.masks[0].clone()
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    advance(model, state, frames_for(7, 3, 2))
    assert torch.equal(state.masks[0], mask)
    state.reset_rows([0])
    advance(model, state, frames_for(8, 1, 2))
    assert not torch.equal(state.masks[0][0], mask[0])
    assert torch.equal(state.masks[0][1], mask[1])
