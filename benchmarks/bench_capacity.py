"""Capacity of one worker: what a step, a tick and a round cost, and how many live cameras it follows.

    .venv/bin/python benchmarks/bench_capacity.py [--backends autograd local] [--windows-ms 20 10]
        [--levels 4 8 12 16 24] [--worker-levels 4 8 16 24 32 48 64] [--duration 15]
        [--answer-first on off] [--learn-at sequence] [--skip-http] [--skip-service]

Part 1, in this process, one torch thread, ``stream_cnn`` with the service's defaults, per batch
size B (1 and 8), interleaved round by round:

  * floor: the step's own convolutions and matmuls, bare (``bench_step.floor_ops``);
  * step:  ``OnlineLearner.step`` with every row labelled, per backend (with ``--compile on`` also
    ``compiled``: the local step under ``compile="on"``, timed once its graph compiled);
  * tick:  ``Batcher.tick`` with B live streams that each have one labelled frame queued: the
    batch stacked, ``select`` -> step -> ``assign``, results recorded (the worker's cost per step).

Part 2, the service: for each backend and window, ``ndot api`` + ``ndot worker`` as processes on
Redis (``$NDOT_BENCH_REDIS_URL``, default db 15, a stream of its own), keys on. For each level N,
N cameras replay labelled N-MNIST at the pace of their event clock in packets of one window,
``wait=true``, for ``--duration`` s (``benchmarks/realtime_load.py``). A level is *sustained*
when no camera fell more than 0.5 s behind its clock, no packet was lost or dead-lettered, the bus
drained within 2 s after the cameras stopped, and p99 POST -> prediction stayed under 250 ms. The
levels climb until one is not sustained. Cameras run in client processes on the same 2 cores: the
figure is for the whole service on this machine, clients included.

Part 3, the worker alone (the capacity of one worker, one thread): ``ndot worker`` on Redis, and
one light asyncio process that publishes each camera's packets straight onto the bus as the API
would and waits for each reply (``benchmarks/worker_load.py``): no HTTP, no API process, no client
processes competing for the 2 cores. Latency here is publish -> reply. Sustained as in part 2,
plus every step the cameras' packets make answered. Part 3 runs each ``--answer-first`` setting
(``NDOT_ANSWER_BEFORE_LEARNING``: on = a round's answers go before its replay steps, off = each tick
learns before the next and the round answers after) and each ``--compile`` setting (``NDOT_COMPILE``:
on = the steps run compiled, graphs by batch shape, rows in place; the worker is first driven until the graphs
it needs are compiled, figures thrown away) for each backend and window, under
``--learn-at`` (the service default, sequence: cameras send start/end flags and labels, each
sequence is scored, then learned by replay).

Parts 1 and 3 run their steps with denormal floats flushed to zero, as the service's model threads
do by default (``--flush-denormals off``: not; part 3 sets ``NDOT_FLUSH_DENORMALS`` accordingly).

Prints a table, the load average and the host's Python speed (a loop of 10 M additions) before and
after, and a verdict against the targets of issue 9; writes ``results/bench_capacity.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import (  # noqa: E402
    LEARNER,
    MODEL,
    STEPS_PER_SAMPLE,
    WARM_CALLS,
    add_flush_denormals_argument,
    floor_ops,
    make_frames,
    time_per_call,
)

from ndot_core import OnlineLearner, build_model  # noqa: E402
from service.metrics import ServiceMetrics  # noqa: E402
from service.worker.batcher import STEP, Batcher, PendingStep  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "step_over_floor_b8": 2.5,
    "step_over_floor_b1": 4.0,
    "tick_over_step_b8": 1.15,
    "streams_20ms": 16,
    "streams_10ms": 8,
    "p99_ms_8_streams_20ms": 25.0,
}
BEHIND_LIMIT_S, DRAIN_LIMIT_S, P99_LIMIT_MS = 0.5, 2.0, 250.0
#: torch's compile caches for part 3's compiled runs (kept between runs: a warm cache loads in seconds).
COMPILE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ndot-bench-compile"


def python_loop_s(additions: int = 10_000_000) -> float:
    """Seconds a pure-Python loop of ``additions`` integer additions takes inside a function: the host's Python
    speed, which the worker's per-call costs (dispatch, asyncio, framing, Redis replies) follow; with the bare
    floor of part 1 (its compute speed) it tells one host from another. (A loop at module level, as
    ``python -c`` runs it, reads globals and takes about twice as long: the figures in docs/benchmarks.md
    that name ``python -c`` are of that one.)"""
    started, total = time.perf_counter(), 0
    for value in range(additions):
        total += value
    return time.perf_counter() - started


def learner_for(backend: str) -> OnlineLearner:
    """``stream_cnn``'s learner on ``backend``; ``compiled``: the local step under ``compile="on"``."""
    torch.manual_seed(0)
    model = build_model(MODEL["name"], MODEL["in_channels"], MODEL["num_classes"], MODEL["input_size"])
    if backend == "compiled":
        return OnlineLearner(
            model, steps_per_sample=STEPS_PER_SAMPLE, backend="local", compile="on", **LEARNER
        )
    return OnlineLearner(model, steps_per_sample=STEPS_PER_SAMPLE, backend=backend, **LEARNER)


def until_compiled(learner: OnlineLearner, call: Any, timeout_s: float = 600.0) -> None:
    """Call ``call`` until ``learner``'s steps run compiled (a graph compiles in the background)."""
    deadline = time.monotonic() + timeout_s
    call()
    while learner.last_backend != "compiled":
        if learner.compiled is None or learner.compiled.failure or time.monotonic() > deadline:
            raise RuntimeError(
                f"the compiled step did not come up ({learner.compiled and learner.compiled.failure})"
            )
        time.sleep(0.2)
        call()


def ticker(backend: str, batch: int) -> Any:
    """A function running one worker tick over ``batch`` streams that each have one frame queued."""
    learner = learner_for(backend)
    batcher = Batcher(learner, capacity=max(64, batch), window_us=20_000, metrics=ServiceMetrics())
    slots = [batcher.open(f"cam-{i}", 34, 34)[0] for i in range(batch)]
    frames = make_frames(batch).numpy()
    count = [0]

    def tick() -> None:
        count[0] += 1
        for i, slot in enumerate(slots):
            entry = f"{count[0]}-{i}"
            slot.pending.append((STEP, PendingStep(frames[count[0] % len(frames), i], i % 10, entry)))
            batcher.remaining[entry] += 1
        batcher.tick()
        batcher.results.clear()
        batcher.remaining.clear()

    if backend == "compiled":
        until_compiled(learner, tick)
    return tick


def engine_figures(backends: list[str], batches: list[int], rounds: int, iters: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for batch in batches:
        labels = torch.arange(batch) % MODEL["num_classes"]
        frames = make_frames(batch)
        fns: dict[str, Any] = {}
        model = learner_for("autograd").model
        fns["floor"] = min(
            (floor_ops(model, batch, fmt) for fmt in (torch.contiguous_format, torch.channels_last)),
            key=lambda fn: time_per_call(fn, iters),
        )
        for backend in backends:
            learner = learner_for(backend)
            state = learner.new_state(batch)
            counter = [0]

            def step(learner=learner, state=state, counter=counter, frames=frames, labels=labels) -> None:
                counter[0] += 1
                learner.step(frames[counter[0] % len(frames)], labels, state)

            if backend == "compiled":
                until_compiled(learner, step)
            fns[f"step_{backend}"] = step
            fns[f"tick_{backend}"] = ticker(backend, batch)
        for fn in fns.values():
            time_per_call(fn, max(3, iters // 3))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                time_per_call(fn, WARM_CALLS)
                samples[name].append(time_per_call(fn, iters))
        figures = {name: statistics.median(values) for name, values in samples.items()}
        for backend in backends:
            figures[f"step_over_floor_{backend}"] = figures[f"step_{backend}"] / figures["floor"]
            figures[f"tick_over_step_{backend}"] = figures[f"tick_{backend}"] / figures[f"step_{backend}"]
        out[str(batch)] = figures
    return out


def service_levels(
    backend: str, window_ms: int, levels: list[int], duration_s: float, workdir: Path
) -> list[dict[str, Any]]:
    from bench_load import Deployment, run_level

    measured: list[dict[str, Any]] = []
    deployment = Deployment(workdir, max_streams=max(levels) + 8)
    deployment.env.update(
        {
            "NDOT_STEP_BACKEND": backend,
            "NDOT_WINDOW_US": str(window_ms * 1000),
            "NDOT_RATE_LIMIT_RPS": "0",
            "NDOT_MAX_STREAM_BACKLOG_FRAMES": "100000",
        }
    )
    with deployment:
        for streams in levels:
            level = run_level(
                deployment, streams, duration_s, min(4, streams), workdir, window_us=window_ms * 1000
            )
            level["required_steps_per_s"] = streams * 1000 / window_ms
            level["sustained"] = (
                level["max_behind_camera_s"] <= BEHIND_LIMIT_S
                and level["packets_lost"] == 0
                and level["dead_lettered"] == 0
                and level["drain_s"] <= DRAIN_LIMIT_S
                and (level["latency_p99_ms"] or 0) <= P99_LIMIT_MS
            )
            print(
                f"  {backend:8s} {window_ms:3d} ms {streams:4d} streams: p50 {level['latency_p50_ms']:7.1f} ms "
                f"p99 {level['latency_p99_ms']:7.1f} ms  steps/s {level['steps_per_s']:7.1f} "
                f"(cameras made {level['steps_expected'] / duration_s:.0f} frames/s)  behind {level['max_behind_camera_s']:.2f} s "
                f"drain {level['drain_s']:.1f} s  lost {level['packets_lost']}  "
                f"{'sustained' if level['sustained'] else 'NOT sustained'}",
                flush=True,
            )
            measured.append({k: v for k, v in level.items() if not k.startswith("_")})
            if not level["sustained"]:
                break
    return measured


def compiled_graphs_ready(log: Path) -> set[str]:
    """Graphs the worker's log says are compiled (``compiled step: graph NAME ready``)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return set(re.findall(r"compiled step: graph (\S+) ready", text))


def wanted_graphs(levels: list[int]) -> set[str]:
    """The graphs the steps of up to ``max(levels) + 2`` rows use (the CPU default: dynamic shapes)."""
    from ndot_core.engine.compiled_step import graph_name, graph_size

    sizes = {graph_size(rows, "dynamic")[0] for rows in range(1, max(levels) + 3)}
    return {graph_name(learn, size, True) for size in sizes for learn in (True, False)}


def warm_compiled(worker: Any, levels: list[int], window_us: int, timeout_s: float) -> set[str]:
    """Drive the worker (figures thrown away) until every graph its levels' steps can use has compiled,
    or ``timeout_s``, then delete the streams it drove; returns the graphs ready. Compiled artifacts land in ``COMPILE_CACHE``, so a
    later run loads them in seconds instead of compiling for minutes."""
    from worker_load import delete_streams, level_names, worker_level

    wanted = wanted_graphs(levels)
    deadline = time.monotonic() + timeout_s
    drive = sorted({1, 2, *levels})
    while not wanted <= compiled_graphs_ready(worker.log) and time.monotonic() < deadline:
        for streams in drive:  # every batch size up to the largest level (a graph compiles when first met)
            worker_level(worker.stream, streams, 4.0, window_us)
    # the measured levels start from a table of their own streams only (no idle rows left over)
    delete_streams(worker.stream, [name for streams in drive for name in level_names(streams)])
    ready = compiled_graphs_ready(worker.log)
    print(f"  compiled graphs ready: {sorted(ready)} (wanted {sorted(wanted)})", flush=True)
    return ready


def worker_levels(
    backend: str,
    window_ms: int,
    levels: list[int],
    duration_s: float,
    workdir: Path,
    answer_first: str = "on",
    learn_at: str = "sequence",
    compile: str = "off",
    compile_warmup_s: float = 300.0,
    flush_denormals: bool = True,
) -> list[dict[str, Any]]:
    """Part 3: the worker alone, packets published straight onto the bus (``worker_load.py``)."""
    from worker_load import WorkerProcess, delete_streams, level_names, worker_level

    measured: list[dict[str, Any]] = []
    env = {
        "NDOT_STEP_BACKEND": backend,
        "NDOT_WINDOW_US": str(window_ms * 1000),
        "NDOT_MAX_STREAMS": str(max(levels) + 8),
        "NDOT_MAX_STREAM_BACKLOG_FRAMES": "100000",
        "NDOT_ANSWER_BEFORE_LEARNING": "true" if answer_first == "on" else "false",
        "NDOT_LEARN_AT": learn_at,
        "NDOT_COMPILE": compile,
        "NDOT_FLUSH_DENORMALS": "true" if flush_denormals else "false",
    }
    if compile != "off":
        env |= {"NDOT_COMPILE_CACHE_DIR": str(COMPILE_CACHE), "NDOT_LOG_LEVEL": "INFO"}
    with WorkerProcess(workdir, env) as worker:
        if compile != "off":
            warm_compiled(worker, levels, window_ms * 1000, compile_warmup_s)
        for streams in levels:
            level = worker_level(worker.stream, streams, duration_s, window_ms * 1000)
            delete_streams(worker.stream, level_names(streams))  # the next level: a table of its own
            level.pop("replied_at")
            level["camera_frames_per_s"] = level["expected_steps"] / duration_s
            level["sustained"] = (
                level["max_schedule_lag_s"] <= BEHIND_LIMIT_S
                and level["lost"] == 0
                and level["returned_steps"] == level["expected_steps"]
                and (level["latency_p99_ms"] or 0) <= P99_LIMIT_MS
            )
            print(
                f"  {backend:8s} answer-first {answer_first:3s} compile {compile:3s} {window_ms:3d} ms "
                f"{streams:4d} streams: "
                f"p50 {level['latency_p50_ms']:7.1f} ms "
                f"p99 {level['latency_p99_ms']:7.1f} ms  steps/s {level['steps_per_s']:7.1f} "
                f"(cameras made {level['camera_frames_per_s']:.0f} frames/s)  behind {level['max_schedule_lag_s']:.2f} s  "
                f"lost {level['lost']}  {'sustained' if level['sustained'] else 'NOT sustained'}",
                flush=True,
            )
            measured.append(level)
            if not level["sustained"]:
                break
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backends", nargs="+", default=["autograd", "local"], help="step backends (before, after)"
    )
    parser.add_argument("--windows-ms", type=int, nargs="+", default=[20, 10], help="frame windows (20 10)")
    parser.add_argument("--levels", type=int, nargs="+", default=[4, 8, 12, 16, 24], help="camera counts")
    parser.add_argument(
        "--worker-levels",
        type=int,
        nargs="+",
        default=[4, 8, 16, 24, 32, 48, 64],
        help="camera counts, part 3",
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level (15)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of part 1 (5)")
    parser.add_argument("--iters", type=int, default=30, help="calls per round and measure in part 1 (30)")
    parser.add_argument(
        "--answer-first",
        nargs="+",
        choices=["on", "off"],
        default=["on", "off"],
        help="part 3: NDOT_ANSWER_BEFORE_LEARNING settings to compare (on off)",
    )
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=["off", "on"],
        default=["off"],
        help="part 3: NDOT_COMPILE settings to compare (off; 'on' first drives the worker until the "
        "graphs it needs compiled, up to --compile-warmup seconds; the cache stays in ~/.cache/ndot-bench-compile)",
    )
    parser.add_argument(
        "--compile-warmup", type=float, default=300.0, help="part 3: most seconds of warm-up per compiled run"
    )
    parser.add_argument(
        "--learn-at",
        choices=["sequence", "step"],
        default="sequence",
        help="part 3: NDOT_LEARN_AT (sequence)",
    )
    add_flush_denormals_argument(parser)
    parser.add_argument("--skip-service", action="store_true", help="part 1 only (no Redis needed)")
    parser.add_argument(
        "--skip-http", action="store_true", help="skip part 2 (API, HTTP and client processes)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="where the report goes: a .json file, or a directory (its bench_capacity.json)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(args.flush_denormals == "on")
    started = time.perf_counter()
    load_before = os.getloadavg()
    python_before = python_loop_s()
    print(
        f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; 1 torch thread; "
        f"denormals flushed (part 1; part 3's worker: NDOT_FLUSH_DENORMALS): {args.flush_denormals}; "
        f"Python speed: 10 M additions in {python_before:.2f} s"
    )

    print("\nPart 1: floor, step and tick, milliseconds (medians of interleaved rounds)")
    engine_backends = args.backends + (
        ["compiled"] if "on" in args.compile and "local" in args.backends else []
    )
    engine = engine_figures(engine_backends, [1, 8], args.rounds, args.iters)
    for batch, f in engine.items():
        cells = "  ".join(
            f"{b}: step {f[f'step_{b}'] * 1e3:6.3f} ({f[f'step_over_floor_{b}']:4.2f}x floor) "
            f"tick {f[f'tick_{b}'] * 1e3:6.3f} ({f[f'tick_over_step_{b}']:4.2f}x step)"
            for b in engine_backends
        )
        print(f"  batch {batch:>2s}: floor {f['floor'] * 1e3:6.3f}  {cells}")

    service: dict[str, dict[str, list[dict[str, Any]]]] = {}
    if not (args.skip_service or args.skip_http):
        print(
            f"\nPart 2: live cameras against ndot api + ndot worker on Redis, {args.duration:g} s per level"
        )
        with tempfile.TemporaryDirectory(prefix="ndot-capacity-") as tmp:
            for backend in args.backends:
                for window_ms in args.windows_ms:
                    workdir = Path(tmp) / f"{backend}-{window_ms}"
                    workdir.mkdir()
                    levels = service_levels(backend, window_ms, args.levels, args.duration, workdir)
                    service.setdefault(backend, {})[str(window_ms)] = levels
    alone: dict[str, dict[str, list[dict[str, Any]]]] = {}  # by "backend" or "backend/answer-first off"
    if not args.skip_service:
        print(
            f"\nPart 3: the worker alone, packets published straight onto Redis, {args.duration:g} s per level, "
            f"learn_at={args.learn_at}"
        )
        with tempfile.TemporaryDirectory(prefix="ndot-capacity-") as tmp:
            for backend in args.backends:
                for window_ms in args.windows_ms:
                    for answer_first, compile in itertools.product(args.answer_first, args.compile):
                        workdir = Path(tmp) / f"alone-{backend}-{window_ms}-{answer_first}-{compile}"
                        workdir.mkdir()
                        levels = worker_levels(
                            backend,
                            window_ms,
                            args.worker_levels,
                            args.duration,
                            workdir,
                            answer_first,
                            args.learn_at,
                            compile,
                            args.compile_warmup,
                            args.flush_denormals == "on",
                        )
                        name = backend if answer_first == "on" else f"{backend}/answer-first off"
                        name += "/compiled" if compile == "on" else ""
                        alone.setdefault(name, {})[str(window_ms)] = levels
    load_after = os.getloadavg()
    python_after = python_loop_s()
    print(
        f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
        f"10 M additions in {python_after:.2f} s"
    )

    def sustained(backend: str, window_ms: int, part: dict[str, Any] = alone) -> int:
        levels = part.get(backend, {}).get(str(window_ms), [])
        return max((lv["streams"] for lv in levels if lv["sustained"]), default=0)

    def p99_at(backend: str, window_ms: int, streams: int) -> float | None:
        for level in alone.get(backend, {}).get(str(window_ms), []):
            if level["streams"] == streams:
                return level["latency_p99_ms"]
        return None

    best = args.backends[-1]
    fastest = engine_backends[-1]  # (the compiled step when measured: the local step's fastest form)
    checks = [
        (
            f"step / floor at batch 8 ({fastest}) <= {TARGETS['step_over_floor_b8']}",
            engine["8"][f"step_over_floor_{fastest}"],
            TARGETS["step_over_floor_b8"],
            "<=",
        ),
        (
            f"step / floor at batch 1 ({fastest}) <= {TARGETS['step_over_floor_b1']}",
            engine["1"][f"step_over_floor_{fastest}"],
            TARGETS["step_over_floor_b1"],
            "<=",
        ),
        (
            f"tick / step at batch 8 ({best}) <= {TARGETS['tick_over_step_b8']}",
            engine["8"][f"tick_over_step_{best}"],
            TARGETS["tick_over_step_b8"],
            "<=",
        ),
    ]
    if alone:  # the best answer-first variant of the last backend (compiled or not) against the targets
        variants = [name for name in alone if name.split("/")[0] == best and "answer-first off" not in name]
        best_alone = max(variants, key=lambda name: (sustained(name, 20), sustained(name, 10)), default=best)
        checks += [
            (
                f"worker alone: sustained streams at 20 ms ({best_alone}) >= {TARGETS['streams_20ms']}",
                sustained(best_alone, 20),
                TARGETS["streams_20ms"],
                ">=",
            ),
            (
                f"worker alone: sustained streams at 10 ms ({best_alone}) >= {TARGETS['streams_10ms']}",
                sustained(best_alone, 10),
                TARGETS["streams_10ms"],
                ">=",
            ),
            (
                f"worker alone: p99 publish->reply at 8 streams, 20 ms ({best_alone}) <= {TARGETS['p99_ms_8_streams_20ms']} ms",
                p99_at(best_alone, 20, 8),
                TARGETS["p99_ms_8_streams_20ms"],
                "<=",
            ),
        ]
    print("\nVerdict")
    verdicts = []
    for text, value, target, sense in checks:
        ok = value is not None and (value <= target if sense == "<=" else value >= target)
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"  [{'PASS' if ok else 'MISS'}] {text}: {shown}")
        verdicts.append({"check": text, "value": value, "target": target, "pass": ok})
    for name in alone:
        for window_ms in args.windows_ms:
            http = f", {sustained(name, window_ms, service)} through HTTP" if name in service else ""
            p99 = p99_at(name, window_ms, 8)
            print(
                f"  {name}: at {window_ms} ms, {sustained(name, window_ms)} real-time streams on the worker alone"
                f"{http}; p99 publish->reply at 8 streams {'n/a' if p99 is None else f'{p99:.1f} ms'}"
            )

    path = args.out if args.out.suffix == ".json" else args.out / "bench_capacity.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "benchmarks/bench_capacity.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": 1,
            "flush_denormals": args.flush_denormals,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "python_10m_additions_s": [python_before, python_after],
        },
        "engine_seconds": engine,
        "service": service,
        "worker_alone": alone,
        "learn_at": args.learn_at,
        "sustained_worker_alone": {b: {str(w): sustained(b, w) for w in args.windows_ms} for b in alone},
        "sustained_through_http": {
            b: {str(w): sustained(b, w, service) for w in args.windows_ms} for b in service
        },
        "verdicts": verdicts,
        "wall_s": time.perf_counter() - started,
        "numpy": np.__version__,
    }
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
