"""The online learning step against its hardware floor: autograd, local and compiled local step.

    .venv/bin/python benchmarks/bench_step.py [--rounds 7] [--iters 30] [--batches 1 8 32]

One torch thread. For ``stream_cnn`` on 2x34x34 event frames with 10 classes and the service's
learning defaults (``service/settings.py``: NDOT, online mode, Adam lr 2e-4, alpha 0.1, T = 15),
at each batch size, interleaved round by round in one process:
  * floor: the step's own convolutions and matmuls run bare under ``torch.no_grad`` on the same
    shapes -- per conv layer its forward and one ``convolution_backward`` (input gradient except for
    the first layer, weight and bias gradients), per linear layer its forward and the two gradient
    matmuls. Timed as one sequence in NCHW and in channels-last; the floor is the faster of the two;
  * ``OnlineLearner.step`` with every row labelled, ``backend="autograd"`` and ``backend="local"``;
  * "compiled": ``backend="local", compile="on"`` (``ndot_core.engine.compiled_step``), the bucket
    compiled before timing (its compile time is printed: cold, or warm when torch's on-disk cache
    under ``TORCHINDUCTOR_CACHE_DIR`` already holds it), with the CPU default of graphs by batch
    range (``shapes="dynamic"``: no padding); ``--pad`` times graphs per bucket (``shapes="buckets"``,
    the CUDA default) on a batch one row short of each bucket instead (the padded rows' cost included).
Figures are medians over rounds of the mean time per step in a round (each round after a few
untimed calls, so that each measure runs warm, as one learner does in a service). The steps run
with denormal floats flushed to zero, as the service's model threads do (``--flush-denormals off``:
not). Targets (the service's step / floor, the service's step being the compiled one where
``--compile`` is on, the default, else the local one): <= 2.5x at batch 8 and <= 4x at batch 1
(batch 32 reported, no target). The machine's load average is printed before and after: other
processes on the cores inflate every figure.
Writes results/bench_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ndot_core import OnlineLearner, build_model  # noqa: E402
from ndot_core.engine.layers import TraceConv2d  # noqa: E402
from ndot_core.engine.network import SpikingNetwork  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {1: 4.0, 8: 2.5}  # the service's step / floor, by batch size
# the service defaults (service/settings.py)
MODEL = {"name": "stream_cnn", "in_channels": 2, "num_classes": 10, "input_size": (34, 34)}
LEARNER = {"rule": "ndot", "mode": "online", "optimizer": "adam", "lr": 2e-4, "alpha": 0.1}
STEPS_PER_SAMPLE = 15
SEQUENCE = 20  # distinct frames cycled through
WARM_CALLS = 3  # untimed calls before each timed round of a measure: steady state, as in a service


def make_learner(backend: str, compile: str = "off") -> OnlineLearner:
    torch.manual_seed(0)
    model = build_model(MODEL["name"], MODEL["in_channels"], MODEL["num_classes"], MODEL["input_size"])
    learner = OnlineLearner(
        model, steps_per_sample=STEPS_PER_SAMPLE, backend=backend, compile=compile, **LEARNER
    )
    if learner.compiled is not None:
        learner.compiled.background = False  # compile the bucket at the first step, before timing
    return learner


def make_frames(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = (SEQUENCE, batch, MODEL["in_channels"], *MODEL["input_size"])
    return (torch.rand(shape, generator=gen) < 0.1).float() * 2


def floor_ops(model: SpikingNetwork, batch: int, memory_format: torch.memory_format) -> Callable[[], None]:
    """The step's convolutions and matmuls, bare, on its shapes: forward, then the backward ones."""
    gen = torch.Generator().manual_seed(2)
    x = torch.zeros(batch, *model.input_shape)
    forward, backward = [], []
    with torch.no_grad():
        layers = [block.weighted for block in model.blocks] + [model.readout]
        posts = [block.post for block in model.blocks] + [None]
        if model.flatten_input:
            x = x.flatten(1)
        for i, (layer, post) in enumerate(zip(layers, posts, strict=True)):
            inputs = (torch.rand(x.shape, generator=gen) < 0.2).float()
            weight = layer.effective_weight().detach().clone()
            bias = None if layer.bias is None else layer.bias.detach().clone()
            if isinstance(layer, TraceConv2d):
                inputs = inputs.contiguous(memory_format=memory_format)
                weight = weight.contiguous(memory_format=memory_format)
                conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
                out = F.conv2d(inputs, weight, bias, *conv)
                grad = torch.randn(out.shape, generator=gen).contiguous(memory_format=memory_format)
                mask = [i > 0, True, bias is not None]
                sizes = None if bias is None else [bias.shape[0]]
                args = (grad, inputs, weight, sizes, *map(list, conv[:3]), False, [0, 0], conv[3], mask)
                forward.append(lambda a=inputs, w=weight, b=bias, c=conv: F.conv2d(a, w, b, *c))
                backward.append(lambda args=args: torch.ops.aten.convolution_backward(*args))
            else:
                out = F.linear(inputs, weight, bias)
                grad = torch.randn(out.shape, generator=gen)
                forward.append(lambda a=inputs, w=weight, b=bias: F.linear(a, w, b))
                backward.append(lambda a=inputs, g=grad: g.t() @ a)
                if i > 0:
                    backward.append(lambda w=weight, g=grad: g @ w)
            x = out if post is None else post(out)

    def run() -> None:
        with torch.no_grad():
            for op in forward:
                op()
            for op in reversed(backward):
                op()

    return run


def time_per_call(fn: Callable[[], None], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def measure(batch: int, rounds: int, iters: int, compiled: bool, shapes: str = "dynamic") -> dict[str, float]:
    """Median over rounds of seconds per call: floors (NCHW, channels-last) and the backends' steps."""
    learners = {backend: make_learner(backend) for backend in ("autograd", "local")}
    if compiled:
        learners["compiled"] = make_learner("local", compile="on")
        learners["compiled"].compiled.shapes = shapes
    frames = make_frames(batch)
    labels = torch.arange(batch) % MODEL["num_classes"]
    states = {name: learner.new_state(batch) for name, learner in learners.items()}
    counter = {name: 0 for name in learners}

    def stepper(name: str) -> Callable[[], None]:
        learner, state = learners[name], states[name]

        def step() -> None:
            counter[name] += 1
            learner.step(frames[counter[name] % SEQUENCE], labels, state)

        return step

    model = learners["local"].model
    fns = {
        "floor_nchw": floor_ops(model, batch, torch.contiguous_format),
        "floor_channels_last": floor_ops(model, batch, torch.channels_last),
        "autograd": stepper("autograd"),
        "local": stepper("local"),
    }
    compile_s = None
    if compiled:
        fns["compiled"] = stepper("compiled")
        start = time.perf_counter()
        fns["compiled"]()  # compiles the bucket
        compile_s = time.perf_counter() - start
        step = learners["compiled"]
        if step.last_backend != "compiled":
            raise SystemExit(f"the compiled step did not run: {step.compiled.failure}")
    for fn in fns.values():  # warm-up: kernels, caches, optimizer state
        time_per_call(fn, max(3, iters // 3))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time_per_call(fn, WARM_CALLS)  # the other measures evicted this one's tensors from the caches
            samples[name].append(time_per_call(fn, iters))
    out = {name: statistics.median(times) for name, times in samples.items()}
    out["floor"] = min(out["floor_nchw"], out["floor_channels_last"])
    if compiled:
        if learners["compiled"].last_backend != "compiled":
            raise SystemExit(f"the compiled step stopped: {learners['compiled'].compiled.failure}")
        out["compile_s"] = compile_s
    return out


def add_flush_denormals_argument(parser: argparse.ArgumentParser) -> None:
    """``--flush-denormals on|off``: the steps' float mode (on, as the service's model threads run)."""
    parser.add_argument(
        "--flush-denormals",
        choices=["on", "off"],
        default="on",
        help="run the steps with denormals flushed to zero, as the service's model threads do "
        "(NDOT_FLUSH_DENORMALS, default on)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median taken; default 7)")
    parser.add_argument("--iters", type=int, default=30, help="calls per round and measure (default 30)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (1 8 32)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--compile", choices=["on", "off"], default="on", help="time the compiled step too (default on)"
    )
    add_flush_denormals_argument(parser)
    parser.add_argument(
        "--pad",
        action="store_true",
        help="compiled graphs per bucket (shapes='buckets', the CUDA default), each batch one row short of "
        "its bucket (padding)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(args.flush_denormals == "on")
    started = time.perf_counter()
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    print(
        f"stream_cnn 2x34x34, 10 classes, {LEARNER}, T={STEPS_PER_SAMPLE}; 1 torch thread; "
        f"denormals flushed: {args.flush_denormals}"
    )
    compiled = args.compile == "on"
    print(
        f"{'batch':>5s} {'floor':>9s} {'autograd':>9s} {'local':>9s} {'compiled':>9s}"
        "  autograd/floor  local/floor  compiled/floor  compiled vs local  compile"
    )
    results: dict[str, dict[str, float]] = {}
    for batch in args.batches:
        rows = batch - 1 if args.pad and batch > 1 else batch
        r = measure(rows, args.rounds, args.iters, compiled, "buckets" if args.pad else "dynamic")
        r["autograd_over_floor"] = r["autograd"] / r["floor"]
        r["local_over_floor"] = r["local"] / r["floor"]
        r["speedup"] = r["autograd"] / r["local"]
        line = f"{rows:5d} {r['floor'] * 1e3:7.3f}ms {r['autograd'] * 1e3:7.3f}ms {r['local'] * 1e3:7.3f}ms"
        if compiled:
            r["compiled_over_floor"] = r["compiled"] / r["floor"]
            r["compiled_speedup"] = r["local"] / r["compiled"]
            line += (
                f" {r['compiled'] * 1e3:7.3f}ms  {r['autograd_over_floor']:14.2f}  {r['local_over_floor']:11.2f}"
                f"  {r['compiled_over_floor']:14.2f}  {r['compiled_speedup']:16.2f}x  {r['compile_s']:5.1f}s"
            )
        else:
            line += f" {'-':>9s}  {r['autograd_over_floor']:14.2f}  {r['local_over_floor']:11.2f}"
        results[str(rows)] = r
        print(
            line + f"   (floor NCHW {r['floor_nchw'] * 1e3:.3f} ms,"
            f" channels-last {r['floor_channels_last'] * 1e3:.3f} ms)"
        )
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")

    verdicts = []
    step = "compiled" if compiled else "local"
    for batch, target in TARGETS.items():
        if str(batch) in results:
            ratio = results[str(batch)][f"{step}_over_floor"]
            verdicts.append(
                (f"batch {batch}: {step} step / floor = {ratio:.2f} (<= {target})", ratio <= target)
            )
    print("\nVerdict")
    for text, ok in verdicts:
        print(f"  [{'PASS' if ok else 'MISS'}] {text}")

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": 1,
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "model": MODEL,
        "learner": {**LEARNER, "steps_per_sample": STEPS_PER_SAMPLE},
        "rounds": args.rounds,
        "iters": args.iters,
        "seconds_per_step": results,
        "compiled": compiled,
        "padded": args.pad,
        "flush_denormals": args.flush_denormals,
        "targets_step_over_floor": {str(b): t for b, t in TARGETS.items()},
        "verdicts": [{"check": text, "pass": ok} for text, ok in verdicts],
        "wall_s": time.perf_counter() - started,
    }
    path = args.out / "bench_step.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
