"""OnlineLearner: update modes, unlabelled rows, inference, bptt, regulariser, errors."""

from __future__ import annotations

import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)

from ndot_core import FTRLRegulariser, OnlineLearner, build_model, ndot_loss


def small_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("stream_cnn", 2, 3, (10, 10), channels=(4,), hidden=8)


def frames_for(seed: int, steps: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, batch, 2, 10, 10, generator=gen) < 0.3).float() * 2


def weights(learner: OnlineLearner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.model.state_dict().items()}


@pytest.mark.parametrize(("mode", "expected"), [("online", 6), ("accumulate", 1)])
def test_optimizer_steps_per_sample(mode: str, expected: int) -> None:
    learner = OnlineLearner(small_cnn(), mode=mode, steps_per_sample=6)
    frames, labels = frames_for(0, 6, 2), torch.tensor([0, 2])
    learner.learn_sequence(frames, labels)
    assert learner.version == expected
    state = learner.new_state(2)
    for x in frames:
        learner.step(x, labels, state)
    assert learner.version == 2 * expected


def test_accumulate_mode_waits_for_a_whole_sample() -> None:
    learner = OnlineLearner(small_cnn(), mode="accumulate", steps_per_sample=4)
    state = learner.new_state(1)
    before = weights(learner)
    for x in frames_for(1, 3, 1):
        learner.step(x, torch.tensor([1]), state)
    assert learner.version == 0 and learner.pending_steps == 3
    assert all(torch.equal(v, before[k]) for k, v in learner.model.state_dict().items())
    learner.step(frames_for(2, 1, 1)[0], torch.tensor([1]), state)
    assert learner.version == 1 and learner.pending_steps == 0


def test_inference_only_steps_change_no_weight_and_keep_no_graph() -> None:
    learner = OnlineLearner(small_cnn())
    state = learner.new_state(2)
    before = weights(learner)
    for x in frames_for(3, 4, 2):
        logits = learner.step(x, None, state)
        assert not logits.requires_grad
        learner.step(x, torch.tensor([-1, -1]), state)
    assert learner.version == 0
    assert all(p.grad is None for p in learner.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in learner.model.state_dict().items())
    assert state.steps.tolist() == [8, 8]


def test_learning_steps_leave_no_graph_in_the_state() -> None:
    learner = OnlineLearner(small_cnn(), mode="online")
    state = learner.new_state(2)
    for x in frames_for(4, 3, 2):
        logits = learner.step(x, torch.tensor([0, 1]), state)
        assert not logits.requires_grad
        for name, tensor in state.tensors().items():
            assert tensor.grad_fn is None and not tensor.requires_grad, name
    assert all(not p.grad.any() for p in learner.model.parameters())  # zeroed after each online step


def test_unlabelled_rows_do_not_steer_the_update() -> None:
    frames = frames_for(5, 3, 2)
    other = frames.clone()
    other[:, 1] = frames_for(6, 3, 1)[:, 0]  # a different stream in the unlabelled row
    results = []
    for x_seq in (frames, other):
        learner = OnlineLearner(small_cnn(1), optimizer="adam", lr=1e-2)
        state = learner.new_state(2)
        for x in x_seq:
            learner.step(x, torch.tensor([2, -1]), state)
        results.append(weights(learner))
    assert learner.version == 3
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], msg=k)
    untrained = small_cnn(1).state_dict()
    assert any(not torch.equal(v, untrained[k]) for k, v in results[0].items())  # it did learn


def test_returned_logits_are_from_before_the_update_and_summed_for_prediction() -> None:
    learner = OnlineLearner(small_cnn(), lr=0.5)
    state = learner.new_state(2)
    reference_model = small_cnn()
    reference_state = reference_model.new_state(2)
    x = frames_for(7, 1, 2)[0]
    logits = learner.step(x, torch.tensor([0, 1]), state)
    with torch.no_grad():
        expected = reference_model.step(x, reference_state, "ndot")
    torch.testing.assert_close(logits, expected)
    assert learner.version == 1
    second = learner.step(x, None, state)
    torch.testing.assert_close(state.readout_sum, logits + second)
    assert torch.equal(learner.predict(state), (logits + second).argmax(1))


def test_learning_lowers_the_loss_on_a_small_problem() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 1, 2, (4, 4), hidden=(32, 16))
    patterns = torch.zeros(2, 1, 4, 4)
    patterns[0, 0, :2] = 3.0
    patterns[1, 0, 2:] = 3.0
    labels = torch.tensor([0, 1])
    frames = patterns.unsqueeze(0).repeat(5, 1, 1, 1, 1)
    for rule in ("ndot", "ndot_reference", "ottt", "bptt"):
        learner = OnlineLearner(
            build_model("mlp", 1, 2, (4, 4), hidden=(32, 16)), rule=rule, mode="accumulate", lr=0.05
        )
        learner.model.load_state_dict(model.state_dict())
        first = learner.learn_sequence(frames, labels)
        for _ in range(30):
            last = learner.learn_sequence(frames, labels)
        assert last < 0.5 * first, rule
        assert learner.version == 31


def test_bptt_only_learns_whole_sequences() -> None:
    learner = OnlineLearner(small_cnn(), rule="bptt")
    with pytest.raises(ValueError, match="learn_sequence"):
        learner.step(frames_for(8, 1, 1)[0], torch.tensor([0]), learner.new_state(1))


def test_bad_input_is_named() -> None:
    learner = OnlineLearner(small_cnn())
    state = learner.new_state(2)
    with pytest.raises(ValueError, match=r"expects frames of shape \(2, 2, 10, 10\), got \(2, 2, 10, 11\)"):
        learner.step(torch.zeros(2, 2, 10, 11), None, state)
    with pytest.raises(ValueError, match="label 3 at row 1"):
        learner.step(torch.zeros(2, 2, 10, 10), torch.tensor([0, 3]), state)
    assert state.steps.tolist() == [0, 0]  # rejected before the state moved
    bad_options = [
        ({"rule": "stdp"}, "'stdp'"),
        ({"mode": "batch"}, "'batch'"),
        ({"optimizer": "lion"}, "'lion'"),
        ({"steps_per_sample": 0}, "steps_per_sample must be >= 1, got 0"),
    ]
    for options, message in bad_options:
        with pytest.raises(ValueError, match=message):
            OnlineLearner(small_cnn(), **options)


def test_reset_weights_is_seeded_and_resets_the_version() -> None:
    learner = OnlineLearner(small_cnn())
    learner.learn_sequence(frames_for(9, 2, 1), torch.tensor([1]))
    assert learner.version == 2
    learner.reset_weights(seed=5)
    first = weights(learner)
    learner.reset_weights(seed=5)
    assert learner.version == 0
    assert all(torch.equal(v, first[k]) for k, v in learner.model.state_dict().items())
    learner.reset_weights(seed=6)
    assert not torch.equal(learner.model.state_dict()["readout.weight"], first["readout.weight"])


def test_ndot_loss_is_eq_13() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    mse = ((logits - torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64)) ** 2).mean()
    assert float(ndot_loss(logits, labels, alpha=0.25, steps_per_sample=4)) == pytest.approx(
        float((0.75 * ce + 0.25 * mse) / 4)
    )


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_ftrl_regulariser_gradient_and_pull(norm: str) -> None:
    model = small_cnn(2)
    anchor = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    reg = FTRLRegulariser(anchor, rho=0.3, norm=norm)
    reg(model).backward()
    w = model.readout.weight
    expected = 0.6 * w.detach() if norm == "l2" else 0.3 * w.detach().sign()
    torch.testing.assert_close(w.grad, expected)


def test_ftrl_regulariser_keeps_learning_near_the_anchor() -> None:
    frames, labels = frames_for(10, 3, 2), torch.tensor([0, 1])
    distance = {}
    for rho in (0.0, 0.05):
        learner = OnlineLearner(small_cnn(2), lr=0.05, momentum=0.0)
        anchor = {k: v.detach().clone() for k, v in learner.model.named_parameters()}
        learner.regulariser = FTRLRegulariser(anchor, rho=rho, norm="l2") if rho else None
        for _ in range(3):
            learner.learn_sequence(frames, labels)
        params = learner.model.named_parameters()
        distance[rho] = sum(float((p.detach() - anchor[k]).pow(2).sum()) for k, p in params)
    assert 0 < distance[0.05] < distance[0.0]
