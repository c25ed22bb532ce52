"""FusedUpdate against ``torch.optim``'s own ``step()``: the same weights and state, to the bit.

Two copies of a model with the same gradients each step: one stepped by ``optimizer.step()``, the
other by ``FusedUpdate``; after every step the parameters and every optimizer state tensor must be
equal (``torch.equal``), and the fast path must actually have run (``fast_steps``), so that a
FusedUpdate that always fell back would fail here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ndot_core import OnlineLearner, build_model
from ndot_core.engine.fused_update import FusedUpdate


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _pair(kind: str, **options):
    reference, fast = _model(), _model()
    make = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    ref_opt = make(reference.parameters(), fused=True, **options)
    fast_opt = make(fast.parameters(), fused=True, **options)
    return reference, ref_opt, fast, fast_opt, FusedUpdate(fast_opt)


def _grads(reference: nn.Module, fast: nn.Module, step: int, fresh: bool) -> None:
    gen = torch.Generator().manual_seed(step)
    for p, q in zip(reference.parameters(), fast.parameters(), strict=True):
        g = torch.randn(p.shape, generator=gen) * 1e-2
        p.grad = g.clone()
        if fresh or q.grad is None:  # the local backend hands in new gradient tensors
            q.grad = g.clone()
        else:
            q.grad.copy_(g)


def _assert_same(reference, ref_opt, fast, fast_opt) -> None:
    for p, q in zip(reference.parameters(), fast.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in ref_opt.state[p].items():
            assert torch.equal(value, fast_opt.state[q][key]), key


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("adam", {"lr": 2e-3}),
        ("adam", {"lr": 1e-3, "weight_decay": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6}),
        ("adam", {"lr": 1e-3, "weight_decay": 1e-2, "decoupled_weight_decay": True}),
        ("adam", {"lr": 1e-3, "maximize": True}),
        ("sgd", {"lr": 0.05}),
        ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
        ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "dampening": 0.0}),
        ("sgd", {"lr": 0.05, "momentum": 0.5, "dampening": 0.1}),
    ],
)
def test_the_update_is_torch_optims_to_the_bit(kind: str, options: dict) -> None:
    reference, ref_opt, fast, fast_opt, update = _pair(kind, **options)
    for step in range(12):
        _grads(reference, fast, step, fresh=step % 2 == 0)
        ref_opt.step()
        update()
        _assert_same(reference, ref_opt, fast, fast_opt)
        if step == 5:  # a schedule sets the group's lr: both follow it
            ref_opt.param_groups[0]["lr"] *= 0.5
            fast_opt.param_groups[0]["lr"] *= 0.5
    assert update.fast_steps == 11  # the first step initialised the state through torch.optim


def test_it_takes_torch_optims_step_outside_its_fast_path_and_gathers_again() -> None:
    reference, ref_opt, fast, fast_opt, update = _pair("adam", lr=1e-3)
    for step in range(3):
        _grads(reference, fast, step, fresh=True)
        ref_opt.step()
        update()
    assert update.fast_steps == 2
    # the optimizer's state replaced (as a checkpoint restore does): the old lists are stale
    fast_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    _grads(reference, fast, 3, fresh=True)
    ref_opt.step()
    update()
    _assert_same(reference, ref_opt, fast, fast_opt)
    assert update.fast_steps == 2
    # a parameter without gradient: torch.optim skips it, and so does the fallback
    _grads(reference, fast, 4, fresh=True)
    for p in (next(reference.parameters()), next(fast.parameters())):
        p.grad = None
    ref_opt.step()
    update()
    _assert_same(reference, ref_opt, fast, fast_opt)
    assert update.fast_steps == 2
    # a step hook registered: it must run, so torch.optim steps
    calls = []
    handle = fast_opt.register_step_post_hook(lambda *_: calls.append(1))
    _grads(reference, fast, 5, fresh=True)
    ref_opt.step()
    update()
    assert calls == [1]
    handle.remove()
    # a tensor lr: not mirrored, torch.optim steps
    for opt in (ref_opt, fast_opt):
        opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    _grads(reference, fast, 6, fresh=True)
    ref_opt.step()
    update()
    _assert_same(reference, ref_opt, fast, fast_opt)
    assert update.fast_steps == 2
    for opt in (ref_opt, fast_opt):
        opt.param_groups[0]["lr"] = 1e-3
    _grads(reference, fast, 7, fresh=False)
    ref_opt.step()
    update()
    _assert_same(reference, ref_opt, fast, fast_opt)
    assert update.fast_steps == 3  # back on the fast path


def test_a_non_fused_or_amsgrad_optimizer_always_takes_torch_optims_step() -> None:
    for options in ({"fused": False}, {"fused": True, "amsgrad": True}):
        torch.manual_seed(0)
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **options)
        update = FusedUpdate(opt)
        for step in range(3):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.01 * (step + 1))
            update()
        assert update.fast_steps == 0
        assert all(int(s["step"]) == 3 for s in opt.state.values())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_local_learner_updates_through_it_as_the_reference_path_would(optimizer: str) -> None:
    """The learner's local backend through FusedUpdate, against the same learner whose updates go through
    ``optimizer.step()``: the same weights after a run of labelled steps, and a reset learner (a new
    optimizer) still takes the fast path."""
    learners = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("stream_cnn", 2, 10, (16, 16))
        learners.append(
            OnlineLearner(
                model, steps_per_sample=4, backend="local", optimizer=optimizer, lr=1e-3, momentum=0.9
            )
        )
    fast, reference = learners
    reference._update = None  # noqa: SLF001 -- the reference steps with torch.optim itself
    reference._optimizer_step = lambda: _reference_step(reference)  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(3)
    states = [learner.new_state(3) for learner in learners]
    for step in range(6):
        frames = (torch.rand(3, 2, 16, 16, generator=gen) < 0.2).float()
        labels = torch.tensor([step % 10, -1, (step + 3) % 10])
        for learner, state in zip(learners, states, strict=True):
            learner.step(frames, labels, state)
    for p, q in zip(fast.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert fast._update.fast_steps == 5  # noqa: SLF001
    fast.reset_weights(seed=1)
    state = fast.new_state(2)
    for _ in range(3):
        fast.step(torch.ones(2, 2, 16, 16), torch.tensor([1, 2]), state)
    assert fast._update.fast_steps == 2  # noqa: SLF001


def _reference_step(learner: OnlineLearner) -> None:
    learner.optimizer.step()
    torch._foreach_zero_([p.grad for p in learner.model.parameters() if p.grad is not None])
    learner.pending_steps = 0
    learner.version += 1
