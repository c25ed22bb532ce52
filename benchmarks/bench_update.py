"""The learning step's optimizer update: torch.optim's step against FusedUpdate, denormals kept or flushed.

    .venv/bin/python benchmarks/bench_update.py [--batches 1 8] [--warm-steps 2000] [--rounds 7]

One torch thread, ``stream_cnn`` 2x34x34 with the service's learning defaults (``bench_step.py``'s
learner: NDOT online, Adam, the compiled local step; ``--compile off``: the eager one). Per batch size, three learners from the same seed,
each first run ``--warm-steps`` labelled steps on its own (a learner that has been serving a while:
the Adam moments of weights whose gradient stays exactly zero have decayed by then), then timed
round by round, interleaved, ``--iters`` steps each:

  * ``torch.optim``: the update through ``optimizer.step()`` (the path before ``FusedUpdate``),
    denormals kept (the thread's default float mode);
  * ``fused``: ``FusedUpdate`` (``ndot_core.engine.fused_update``), denormals kept;
  * ``fused+ftz``: ``FusedUpdate`` in a thread that flushes denormals to zero, as the service's model
    threads do (``NDOT_FLUSH_DENORMALS``, default on).

Each one's count of denormal Adam moments is printed after. The floor (``bench_step.floor_ops``, channels-last) is
timed in the same rounds, so each step is also given as a multiple of it.

Then (``--learn-check``, on unless ``off``) what flushing denormals does to what is learned: one pass
of the eager local step over 800 N-MNIST-small digits (``$NDOT_SHARED_DATA/nmnist-small``, by default
``../shared/data``; skipped with a line when absent), 8 streams a batch, 20 ms frames, labelled, then
the held-out accuracy on the other 200, once with denormals kept and once flushed, from the same
seed: both accuracies and the largest difference between the two runs' weights (relative to the
weight's largest entry).

Verdict: the service's path (``fused+ftz``) no slower than ``torch.optim`` at any batch, and the
weights learned with denormals flushed within 1e-6 of those learned without. Writes
``results/bench_update.json``.
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

from bench_step import floor_ops, make_frames, make_learner  # noqa: E402

from ndot_core import OnlineLearner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: variant -> (through FusedUpdate, denormals flushed)
VARIANTS = {"torch.optim": (False, False), "fused": (True, False), "fused+ftz": (True, True)}
TINY = torch.finfo(torch.float32).tiny


class TorchOptimStep:
    """The learner's update as it was before ``FusedUpdate``: ``optimizer.step()`` itself."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def __call__(self) -> None:
        self.optimizer.step()


def denormal_moments(learner: OnlineLearner) -> int:
    """Adam moments (exp_avg, exp_avg_sq) that are denormal floats."""
    moments = [t for s in learner.optimizer.state.values() for key, t in s.items() if key != "step"]
    return sum(int(((t != 0) & (t.abs() < TINY)).sum()) for t in moments)


def measure(
    batch: int, warm_steps: int, rounds: int, iters: int, compile: str = "on"
) -> dict[str, dict[str, float]]:
    """Median ms per learning step by variant (and the floor's), denormal moments, fast updates."""
    frames = make_frames(batch)
    labels = torch.arange(batch) % 10
    learners = {name: make_learner("local", compile=compile) for name in VARIANTS}
    states = {name: learner.new_state(batch) for name, learner in learners.items()}
    for name, learner in learners.items():
        fused, flush = VARIANTS[name]
        if not fused:
            learner._update = TorchOptimStep(learner.optimizer)  # noqa: SLF001 -- the path before
        torch.set_flush_denormal(flush)
        for i in range(warm_steps):
            learner.step(frames[i % len(frames)], labels, states[name])
    floor = floor_ops(learners["fused"].model, batch, torch.channels_last)
    steps: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "floor"]}
    for _ in range(rounds):
        for name, learner in learners.items():
            torch.set_flush_denormal(VARIANTS[name][1])
            started = time.perf_counter()
            for i in range(iters):
                learner.step(frames[i % len(frames)], labels, states[name])
            steps[name].append((time.perf_counter() - started) / iters * 1e3)
        torch.set_flush_denormal(False)
        started = time.perf_counter()
        for _ in range(iters):
            floor()
        steps["floor"].append((time.perf_counter() - started) / iters * 1e3)
    floor_ms = statistics.median(steps["floor"])
    out: dict[str, dict[str, float]] = {"floor": {"step_ms": floor_ms}}
    for name, learner in learners.items():
        step_ms = statistics.median(steps[name])
        out[name] = {
            "step_ms": step_ms,
            "step_over_floor": step_ms / floor_ms,
            "denormal_moments": denormal_moments(learner),
            "fast_updates": getattr(learner._update, "fast_steps", 0),  # noqa: SLF001
        }
    torch.set_flush_denormal(False)
    return out


Digit = tuple[torch.Tensor, int]


def learn_digits(data: Path, digits: int) -> tuple[list[Digit], list[Digit]]:
    """``digits`` N-MNIST-small recordings of ``data`` in 20 ms frames, seeded order: (4/5 learned, 1/5 held
    out). Framed once, for both runs of the learn check."""
    import numpy as np

    from ndot_core.events.datasets import NMNISTFolder

    view = NMNISTFolder(data).frames(time_window_us=20_000)
    order = np.random.default_rng(0).permutation(len(view))[:digits]
    framed = [(torch.from_numpy(frames), label) for frames, label in (view[int(i)] for i in order)]
    return framed[: digits * 4 // 5], framed[digits * 4 // 5 :]


def learn_check(train: list[Digit], held_out: list[Digit], flush: bool) -> tuple[float, list[torch.Tensor]]:
    """One labelled pass over ``train`` (8 streams a batch) with denormals flushed or kept, then the
    accuracy on ``held_out``; and the weights learned."""
    torch.set_flush_denormal(flush)
    learner = make_learner("local")

    def batches(items: list[Digit]):
        for start in range(0, len(items), 8):
            samples = items[start : start + 8]
            steps = min(len(frames) for frames, _ in samples)
            yield (
                [torch.stack([frames[t] for frames, _ in samples]) for t in range(steps)],
                torch.tensor([label for _, label in samples]),
            )

    for frames, labels in batches(train):
        state = learner.new_state(len(labels))
        for frame in frames:
            learner.step(frame, labels, state)
    correct = 0
    for frames, labels in batches(held_out):
        state, summed = learner.new_state(len(labels)), 0
        for frame in frames:
            summed = summed + learner.step(frame, None, state)
        correct += int((summed.argmax(1) == labels).sum())
    torch.set_flush_denormal(False)
    return correct / len(held_out), [p.detach().clone() for p in learner.model.parameters()]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (1 8)")
    parser.add_argument(
        "--warm-steps", type=int, default=2000, help="labelled steps each learner runs before timing (2000)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds, median taken (7)")
    parser.add_argument("--iters", type=int, default=100, help="steps per round and variant (100)")
    parser.add_argument(
        "--compile", choices=["on", "off"], default="on", help="the compiled local step (on) or the eager one"
    )
    parser.add_argument(
        "--learn-check",
        choices=["on", "off"],
        default="on",
        help="one pass over N-MNIST-small with denormals kept and flushed: the same weights? (on)",
    )
    parser.add_argument(
        "--learn-digits",
        type=int,
        default=1000,
        help="digits of the learn check: 4/5 learned, 1/5 held out (1000)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_update.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()
    print(
        f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; 1 torch thread"
    )
    print(
        f"stream_cnn 2x34x34, NDOT online, Adam, local step (compile {args.compile}); "
        f"{args.warm_steps} warm steps per learner;"
        " ms per step (median of rounds)"
    )
    results: dict[str, dict[str, dict[str, float]]] = {}
    for batch in args.batches:
        r = measure(batch, args.warm_steps, args.rounds, args.iters, args.compile)
        results[str(batch)] = r
        print(f"batch {batch:3d}: floor {r['floor']['step_ms']:.3f}")
        for name in VARIANTS:
            v = r[name]
            print(
                f"  {name:12s} step {v['step_ms']:.3f} ({v['step_over_floor']:.2f}x floor, "
                f"{v['step_ms'] / r['torch.optim']['step_ms']:.2f}x torch.optim's)  "
                f"denormal Adam moments {v['denormal_moments']}"
            )
    learned: dict[str, float] | None = None
    data = Path(os.environ.get("NDOT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "nmnist-small"
    if args.learn_check == "on" and not (data / "labels.txt").is_file():
        print(f"learn check skipped: no N-MNIST-small at {data}")
    elif args.learn_check == "on":
        train, held_out = learn_digits(data, args.learn_digits)
        accuracy_kept, weights_kept = learn_check(train, held_out, flush=False)
        accuracy_flushed, weights_flushed = learn_check(train, held_out, flush=True)
        difference = max(
            float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
            for a, b in zip(weights_kept, weights_flushed, strict=True)
        )
        learned = {
            "digits": args.learn_digits,
            "accuracy_denormals_kept": accuracy_kept,
            "accuracy_denormals_flushed": accuracy_flushed,
            "largest_relative_weight_difference": difference,
        }
        print(
            f"one pass over {len(train)} N-MNIST-small digits, held-out accuracy on "
            f"{len(held_out)}: denormals kept "
            f"{accuracy_kept:.3f}, flushed {accuracy_flushed:.3f}; largest relative weight difference {difference:.2e}"
        )
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    verdicts = [
        (
            f"batch {b}: fused+ftz step / torch.optim step = "
            f"{r['fused+ftz']['step_ms'] / r['torch.optim']['step_ms']:.2f} (<= 1)",
            r["fused+ftz"]["step_ms"] <= r["torch.optim"]["step_ms"],
        )
        for b, r in results.items()
    ]
    if learned is not None:
        difference = learned["largest_relative_weight_difference"]
        verdicts.append(
            (
                f"weights learned with denormals flushed vs kept: {difference:.2e} apart (<= 1e-6)",
                difference <= 1e-6,
            )
        )
    print("\nVerdict")
    for text, ok in verdicts:
        print(f"  [{'PASS' if ok else 'MISS'}] {text}")
    report = {
        "command": "benchmarks/bench_update.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": 1,
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "warm_steps": args.warm_steps,
        "compile": args.compile,
        "rounds": args.rounds,
        "iters": args.iters,
        "results": results,
        "learn_check": learned,
        "verdicts": [{"check": text, "pass": ok} for text, ok in verdicts],
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
