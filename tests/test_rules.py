"""Temporal-dependency rules: e and the presynaptic trace for ndot, ndot_reference, ottt."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from engine_support import single_torch_thread  # noqa: F401  (autouse: one torch thread)

from ndot_core.engine.neuron import LIFParameters, LIFState, lif_step
from ndot_core.engine.rules import (
    RULES,
    advance_trace,
    check_rule,
    dependency_paper,
    dependency_reference,
    stabilise,
)

LAM = 0.5
VECTORS = (
    Path(os.environ.get("NDOT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")).parent
    / "vectors"
    / "lif_trace_vectors.json"
)


def run(currents: list[float], rule: str, params: LIFParameters = LIFParameters()) -> dict[str, list[float]]:  # noqa: B008
    """One neuron driven by ``currents``; returns its s, v, e and trace sequences."""
    state = LIFState.zeros(1, (1,), "cpu", torch.float64)
    out: dict[str, list[float]] = {"s": [], "v": [], "e": [], "trace": []}
    for t, i in enumerate(currents):
        s, state = lif_step(
            torch.tensor([[i]], dtype=torch.float64), state, params, rule, torch.tensor([t == 0])
        )
        for name, value in (("s", s), ("v", state.v), ("e", state.e), ("trace", state.trace)):
            out[name].append(float(value.detach()))
    return out


@pytest.fixture(scope="module")
def vectors() -> dict:
    if not VECTORS.is_file():
        pytest.skip(f"test vectors not found at {VECTORS}")
    data = json.loads(VECTORS.read_text())
    assert data["lam"] == LAM and data["v_threshold"] == 1.0
    return data["cases"]


CASES = ["steady_drive", "exact_threshold_zero_residual", "negative_input", "silent", "strong_burst"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    ("rule", "e_key", "trace_key"),
    [
        ("ndot", "e_paper", "trace_paper"),
        ("ndot_reference", "e_reference", "trace_reference"),
        ("ottt", None, "trace_ottt"),
    ],
)
def test_shared_vectors(vectors: dict, case: str, rule: str, e_key: str | None, trace_key: str) -> None:
    expected = vectors[case]
    out = run(expected["input_current"], rule)
    assert out["s"] == expected["s"]
    assert out["v"] == pytest.approx(expected["v"], abs=1e-12)
    if e_key is not None:
        assert out["e"] == pytest.approx(expected[e_key], abs=1e-12)
    assert out["trace"] == pytest.approx(expected[trace_key], abs=1e-12)


def test_paper_e_by_hand_with_zero_denominator() -> None:
    # I = 1, 0, 0.75: u = 1 (spike, v = 0), 0, 0.75.
    # e[1] = r[1] = 0; e[2] = 0/0 -> lam; e[3] = 0.75/0 -> lam.
    # trace: s[1] = 1; e[1]*1 + 0 = 0; e[2]*0 + 0 = 0.
    out = run([1.0, 0.0, 0.75], "ndot")
    assert out["e"] == [0.0, LAM, LAM]
    assert out["trace"] == [1.0, 0.0, 0.0]


def test_reference_e_by_hand() -> None:
    # I = 1.5, 0.5: u = 1.5 (spike, v = 0.5), 0.75. e_code[1]: denominator v0 - s0 = 0 -> lam;
    # e_code[2] = (0.75 - 0) / (0.5 - 1) = -1.5 -> clamp -> -lam. trace: 1; -0.5 * 1 + 0 = -0.5.
    out = run([1.5, 0.5], "ndot_reference")
    assert out["e"] == [LAM, -LAM]
    assert out["trace"] == [1.0, -0.5]


def test_first_step_paper_e_is_the_residual_itself() -> None:
    v = torch.tensor([[0.3], [-0.2], [0.9], [0.4]], dtype=torch.float64)
    v_prev = torch.tensor([[0.0], [0.0], [0.0], [0.8]], dtype=torch.float64)
    first = torch.tensor([True, True, True, False])
    e = dependency_paper(v, v_prev, first, LAM)
    assert e.flatten().tolist() == [0.3, -0.2, LAM, LAM]  # 0.9 clamped; 0.4 / 0.8 = 0.5


def test_stabilise_zero_denominators_nan_and_clamp() -> None:
    numerator = torch.tensor([0.0, 0.3, -0.3, 0.3, float("nan"), 0.1, 3.0, -3.0, -0.0])
    denominator = torch.tensor([0.0, 0.0, 0.0, -0.0, 1.0, 0.5, 1.0, 1.0, 2.0])
    e = stabilise(numerator / denominator, LAM)
    assert e.tolist() == [LAM, LAM, LAM, LAM, LAM, pytest.approx(0.2), LAM, -LAM, 0.0]


def test_nan_membrane_gives_lam_in_both_variants() -> None:
    v = torch.tensor([[float("nan")]], dtype=torch.float64)
    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    assert float(dependency_paper(v, one, torch.tensor([False]), LAM)) == LAM
    assert float(dependency_paper(v, zero, torch.tensor([True]), LAM)) == LAM
    assert float(dependency_reference(v, zero, one, zero, 1.0, LAM)) == LAM


def test_paper_trace_equals_closed_form_on_random_sequences() -> None:
    """a_hat[t] = s[t] + sum_{k<t} P_{k,t} s[k], P_{k,t} = prod_{i=k}^{t-1} e[i] (Eq. 11)."""
    gen = torch.Generator().manual_seed(1)
    steps, neurons = 12, 64
    currents = torch.randn(steps, 1, neurons, generator=gen, dtype=torch.float64) * 0.8 + 0.4
    state = LIFState.zeros(1, (neurons,), "cpu", torch.float64)
    s_seq, e_seq, traces = [], [], []
    for t in range(steps):
        s, state = lif_step(currents[t], state, LIFParameters(), "ndot", torch.tensor([t == 0]))
        s_seq.append(s.detach())
        e_seq.append(state.e)
        traces.append(state.trace)
    assert torch.stack(s_seq).sum() > steps  # the neurons do fire
    assert (torch.stack(e_seq).abs() < LAM).any()  # and e is not just lam
    for t in range(steps):
        closed = s_seq[t].clone()
        for k in range(t):
            closed += torch.stack(e_seq[k:t]).prod(dim=0) * s_seq[k]
        torch.testing.assert_close(traces[t], closed)


def test_variants_really_differ() -> None:
    currents = [0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    traces = {rule: run(currents, rule)["trace"] for rule in ("ndot", "ndot_reference", "ottt")}
    assert traces["ndot"] != traces["ottt"]
    assert traces["ndot"] != traces["ndot_reference"]
    assert all(math.isfinite(x) for t in traces.values() for x in t)


def test_rule_names() -> None:
    assert RULES == ("ndot", "ndot_reference", "ottt", "bptt")
    assert check_rule("ottt") == "ottt"
    with pytest.raises(ValueError, match="'NDOT'"):
        check_rule("NDOT")
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="'bptt' has no trace"):
        advance_trace(
            "bptt",
            v=z,
            s=z,
            v_prev=z,
            s_prev=z,
            e_prev=z,
            trace_prev=z,
            first=torch.tensor([True]),
            lam=LAM,
            v_threshold=1.0,
        )
