"""The learner's step on a GPU: eager local step against CUDA graphs, and the streams one GPU follows.

    .venv/bin/python benchmarks/bench_gpu.py [--batches 1 8 64 256 1024] [--window-ms 20]

For ``stream_cnn`` on 2x34x34 event frames with the service's learning defaults (as
``bench_step.py``), at each batch size, interleaved round by round in one process:
  * "eager": ``OnlineLearner(backend="local")``, one kernel launch per op;
  * "graphs": the same with ``cuda_graphs="on"`` (``ndot_core.engine.graph_step``): one CUDA graph
    per bucket of rows, the state in its static buffers;
each as a learning step (every row labelled) and as a prediction step (no label). Times are per
step, the GPU synchronised once per round (``torch.cuda.synchronize``), medians over rounds. First,
at each batch size, the graphs must compute what the eager step does (logits, state and weights
within ``AGREEMENT_ATOL`` after 4 learning steps and a prediction), else nothing is timed (exit 1).

Under learn_at=sequence a worker runs, per window of camera time, one prediction step of its live
rows and one learning step of its replay rows (one per stream at real time). So one GPU follows N
real-time cameras when ``predict(N) + learn(N) <= window``: printed per batch, with the largest N
measured that fits (the goal: >= 1,000 streams at 20 ms windows). What it leaves out -- framing,
the bus, HTTP -- runs on the CPU: ``bench_capacity.py`` measures the worker whole.

``--device cpu`` runs the same script with the graphs' buffers unrecorded (``capture=False``) to check
the script itself; its figures say nothing about a GPU. Writes results/bench_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import LEARNER, MODEL, STEPS_PER_SAMPLE  # noqa: E402

from ndot_core import OnlineLearner, build_model  # noqa: E402
from ndot_core.engine.graph_step import GraphStep  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_STREAMS = 1000
#: The graphs replay the eager step's own kernels; a little room for the order of reductions
AGREEMENT_ATOL = 1e-4


def make_learner(device: str, graphs: bool) -> OnlineLearner:
    torch.manual_seed(0)
    model = build_model(MODEL["name"], MODEL["in_channels"], MODEL["num_classes"], MODEL["input_size"])
    cuda = device.startswith("cuda")
    learner = OnlineLearner(
        model,
        steps_per_sample=STEPS_PER_SAMPLE,
        backend="local",
        device=device,
        cuda_graphs="on" if graphs and cuda else "off",
        **LEARNER,
    )
    if graphs and not cuda:  # the script's own check: the buffers, no recording
        learner.compiled = GraphStep(
            learner.local, learner.rule, learner.alpha, learner.steps_per_sample, capture=False
        )
    return learner


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_steps(learner: OnlineLearner, batch: int, learn: bool, iters: int, device: str) -> float:
    """Seconds per step over ``iters`` steps (frames and labels made on the host, as the worker's)."""
    state = learner.new_state(batch)
    frames = (torch.rand(iters + 3, batch, MODEL["in_channels"], *MODEL["input_size"]) < 0.1).float() * 2
    labels = torch.arange(batch) % MODEL["num_classes"] if learn else None
    for i in range(3):  # warm: the bucket's graph is captured at its first step
        learner.step(frames[i], labels, state)
    sync(device)
    start = time.perf_counter()
    for i in range(3, iters + 3):
        learner.step(frames[i], labels, state)
    sync(device)
    return (time.perf_counter() - start) / iters


def disagreement(device: str, batch: int, steps: int = 4) -> float:
    """Largest difference between the eager step and the graphs over ``steps`` learning steps then one
    prediction step of ``batch`` rows from the same start: logits, state and weights (an empty or
    stale graph would time as a speed-up; this catches it)."""
    eager, graphs = make_learner(device, False), make_learner(device, True)
    states = eager.new_state(batch), graphs.new_state(batch)
    gen = torch.Generator().manual_seed(batch)
    frames = (
        torch.rand(steps + 1, batch, MODEL["in_channels"], *MODEL["input_size"], generator=gen) < 0.1
    ).float()
    labels = torch.arange(batch) % MODEL["num_classes"]
    worst = 0.0
    for i in range(steps + 1):
        y = labels if i < steps else None
        got, want = graphs.step(frames[i], y, states[1]), eager.step(frames[i], y, states[0])
        pairs = [(got, want), *zip(states[1].tensors().values(), states[0].tensors().values(), strict=True)]
        worst = max([worst, *(float((a.float() - b.float()).abs().max()) for a, b in pairs)])
    if graphs.last_backend != "compiled":
        return float("inf")  # the graphs did not run at all
    for p, q in zip(graphs.model.parameters(), eager.model.parameters(), strict=True):
        worst = max(worst, float((p.detach() - q.detach()).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda", help="torch device (default cuda; cpu: a check of the script)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256, 1024], help="batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median taken; default 5)")
    parser.add_argument("--iters", type=int, default=30, help="steps per round and measure (default 30)")
    parser.add_argument("--window-ms", type=float, default=20.0, help="camera window (default 20 ms)")
    parser.add_argument("--out", default=str(RESULTS / "bench_gpu.json"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA device; run it on a GPU machine (or --device cpu to check it)")
        return 2
    torch.set_num_threads(1)
    load = os.getloadavg()
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"bench_gpu on {name}, torch {torch.__version__}, load average {load[0]:.2f}", flush=True)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # (fp32: comparable)
    try:
        differences = {batch: disagreement(args.device, batch) for batch in args.batches}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    print(
        "graphs against the eager step (largest difference in logits, state, weights after 4 learning "
        "steps and a prediction): " + ", ".join(f"batch {b} {d:.1e}" for b, d in differences.items()),
        flush=True,
    )
    if not all(d <= AGREEMENT_ATOL for d in differences.values()):
        print(f"the graphs do not compute the eager step (tolerance {AGREEMENT_ATOL:g}): no timing")
        return 1
    learners = {kind: make_learner(args.device, kind == "graphs") for kind in ("eager", "graphs")}
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for batch in args.batches:
            for learn in (True, False):
                for kind, learner in learners.items():
                    key = f"{kind} {'learn' if learn else 'predict'} {batch}"
                    times.setdefault(key, []).append(
                        time_steps(learner, batch, learn, args.iters, args.device)
                    )
    failure = learners["graphs"].compiled.failure if learners["graphs"].compiled is not None else "off"
    if failure:
        print(f"the graph step did not run: {failure}")
        return 1
    median = {key: statistics.median(values) for key, values in times.items()}
    window_s = args.window_ms / 1000
    rows, fits = [], 0
    print(
        f"{'batch':>6} {'eager learn':>12} {'graphs learn':>13} {'eager predict':>14} {'graphs predict':>15} "
        f"{'speed-up':>9} {'window used':>12}"
    )
    for batch in args.batches:
        figures = {
            k: median[f"{k} {batch}"]
            for k in ("eager learn", "graphs learn", "eager predict", "graphs predict")
        }
        used = (figures["graphs learn"] + figures["graphs predict"]) / window_s
        if used <= 1:
            fits = max(fits, batch)
        speedup = figures["eager learn"] / figures["graphs learn"]
        rows.append(
            {
                "batch": batch,
                **{k: v * 1e3 for k, v in figures.items()},
                "speedup_learn": speedup,
                "window_used": used,
            }
        )
        print(
            f"{batch:6d} "
            + " ".join(
                f"{figures[k] * 1e3:11.3f}ms" if i == 0 else f"{figures[k] * 1e3:12.3f}ms"
                for i, k in enumerate(figures)
            )
            + f" {speedup:8.2f}x {100 * used:10.1f} %"
        )
    load_end = os.getloadavg()
    verdict = "met" if fits >= GOAL_STREAMS else "not met"
    print(
        f"streams one GPU follows at {args.window_ms:g} ms windows (predict + learn of N rows within a "
        f"window, the largest N measured): {fits}; goal >= {GOAL_STREAMS}: {verdict}. "
        f"Load average {load[0]:.2f} -> {load_end[0]:.2f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "device": name,
                "torch": torch.__version__,
                "window_ms": args.window_ms,
                "rows": rows,
                "disagreement": {str(b): d for b, d in differences.items()},
                "streams": fits,
                "goal": GOAL_STREAMS,
                "verdict": verdict,
                "load": [load[0], load_end[0]],
                "rounds": args.rounds,
                "iters": args.iters,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
