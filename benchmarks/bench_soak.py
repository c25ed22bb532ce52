"""Soak: 8 real-time camera streams against one `ndot serve` for minutes; is memory flat?

    .venv/bin/python benchmarks/bench_soak.py [--minutes 10] [--streams 8] [--sample-s 10]

The service (API + worker + embedded bus, keys on, stream_cnn learning online) runs in this
process under uvicorn, so its memory can be read from inside: every ``--sample-s`` seconds the
RSS (``/proc/self/status``) and the bytes of torch tensors (on CUDA ``torch.cuda.memory_allocated``;
on CPU, which has no allocator statistics, the unique storages of the tensors the worker holds:
weights, gradients, optimizer state and the streams' network state; a leak anywhere else shows in
the RSS. Walking ``gc.get_objects()`` instead is unsafe beside a running learner thread: it can
hand out a tuple under construction, and CPython then fails the learner step with a SystemError,
which this benchmark did before it read the worker's roots). Two client processes (benchmarks/realtime_load.py) replay labelled
N-MNIST at the pace of the event clock. After a warm-up (the first 20 %, at least 60 s) a
least-squares line is fitted to each series; verdict "flat" when its slope projects less than
max(10 MB, 2 % of the mean) of growth per hour (tensors: max(1 MB, 1 %)).
Writes results/bench_soak.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.realtime_load import REPO, camera_process, percentile  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(worker: Any, device: str) -> int:
    """Bytes of tensor memory: the CUDA allocator's count, or the unique storages the worker holds."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated())
    learner, state = worker.batcher.learner, worker.batcher.state
    tensors = list(_tensors(learner.state_dict())) + list(_tensors(state.state_dict()))
    tensors += [p.grad for p in learner.model.parameters() if p.grad is not None]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def _tensors(tree: Any) -> Any:
    import torch

    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


def serve(settings: Any, holder: dict[str, Any], stop: threading.Event) -> None:
    """API + worker on one event loop in this thread (the worker object is kept in ``holder``)."""
    import uvicorn

    from service.app import create_app
    from service.bus import LocalBus
    from service.metrics import ServiceMetrics
    from service.worker.loop import Worker

    async def main() -> None:
        bus, metrics = LocalBus(max_lag=settings.bus_max_lag), ServiceMetrics(settings.accuracy_window)
        app = create_app(settings, bus=bus, run_worker=False, metrics=metrics)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        worker = Worker(settings, bus, metrics)
        await worker.start()
        worker.run_in_background()
        holder.update(worker=worker, metrics=metrics)
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await worker.stop()
        server.should_exit = True
        await task

    asyncio.run(main())


def fit(times_s: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope, per minute."""
    if times_s.size < 2:
        return 0.0
    return float(np.polyfit(times_s / 60.0, values, 1)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the streams post")
    parser.add_argument("--streams", type=int, default=8, help="real-time camera streams")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--tag", default="", help="results/bench_soak-TAG.{json,png} instead of bench_soak.*")
    args = parser.parse_args()

    from clients.local_service import free_port
    from service.settings import Settings

    key = secrets.token_urlsafe(24)
    port = free_port()
    duration_s = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        settings = Settings(
            redis_url=None,
            port=port,
            checkpoint_dir=Path(tmp) / "ckpt",
            ingest_keys=key,
            admin_keys=secrets.token_urlsafe(24),
            log_level="WARNING",
            checkpoint_interval_s=60,
        )
        holder: dict[str, Any] = {}
        stop = threading.Event()
        thread = threading.Thread(target=serve, args=(settings, holder, stop), daemon=True)
        thread.start()
        while "worker" not in holder:
            time.sleep(0.1)
        worker = holder["worker"]
        device = settings.torch_device()
        url = f"http://127.0.0.1:{port}"
        names = [f"soak-{i}" for i in range(args.streams)]
        groups = [names[0::2], names[1::2]]
        context = mp.get_context("spawn")
        outs = [Path(tmp) / f"camera-{i}.json" for i in range(2)]
        children = [
            context.Process(target=camera_process, args=(url, key, group, duration_s, i, str(out)))
            for i, (group, out) in enumerate(zip(groups, outs, strict=True))
        ]
        metrics = holder["metrics"].registry
        samples: list[dict[str, float]] = []
        started = time.perf_counter()
        for child in children:
            child.start()
        while any(child.is_alive() for child in children):
            now = time.perf_counter() - started
            steps = sum(
                metrics.get_sample_value("ndot_steps_total", {"kind": k}) or 0 for k in ("learn", "infer")
            )
            samples.append(
                {
                    "t_s": now,
                    "rss_mb": rss_bytes() / 2**20,
                    "tensor_mb": tensor_bytes(worker, device) / 2**20,
                    "steps": steps,
                }
            )
            print(
                f"  t={now:6.0f} s  RSS {samples[-1]['rss_mb']:7.1f} MB  tensors {samples[-1]['tensor_mb']:6.2f} MB"
                f"  steps {steps:.0f}",
                flush=True,
            )
            next_due = started + len(samples) * args.sample_s
            while time.perf_counter() < next_due and any(child.is_alive() for child in children):
                time.sleep(min(0.5, max(next_due - time.perf_counter(), 0)))
        stop.set()
        thread.join(60)
        records = [json.loads(out.read_text()) for out in outs if out.is_file()]

    t = np.array([s["t_s"] for s in samples])
    warm = t >= max(60.0, 0.2 * duration_s)
    result: dict[str, Any] = {
        "benchmark": "soak",
        "command": " ".join(["benchmarks/bench_soak.py", *sys.argv[1:]]),
        "minutes": args.minutes,
        "streams": args.streams,
        "device": device,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "samples": samples,
    }
    verdicts = {}
    for name, floor_mb, share in (("rss_mb", 10.0, 0.02), ("tensor_mb", 1.0, 0.01)):
        values = np.array([s[name] for s in samples])
        slope = fit(t[warm], values[warm])
        allowed = max(floor_mb, share * float(values[warm].mean())) if warm.any() else floor_mb
        flat = abs(slope * 60) < allowed
        verdicts[name] = flat
        result[f"{name}_slope_per_min"] = slope
        result[f"{name}_allowed_per_hour"] = allowed
        result[f"{name}_first"], result[f"{name}_last"] = float(values[0]), float(values[-1])
        print(
            f"{name:>10}: {values[0]:.1f} -> {values[-1]:.1f} MB; slope after warm-up {slope:+.3f} MB/min "
            f"= {slope * 60:+.1f} MB/h (flat if |.| < {allowed:.1f} MB/h): {'flat' if flat else 'GROWING'}"
        )
    latencies = [v for r in records for v in r["latencies_ms"]]
    result.update(
        packets=sum(r["accepted"] for r in records),
        steps=samples[-1]["steps"] if samples else 0,
        latency_p50_ms=percentile(latencies, 50),
        latency_p99_ms=percentile(latencies, 99),
        warmup_s=float(max(60.0, 0.2 * duration_s)),
    )
    result["verdict"] = "flat" if all(verdicts.values()) else "growing"
    print(
        f"packets {result['packets']}, steps {result['steps']:.0f}, p50 {result['latency_p50_ms'] or 0:.1f} ms, "
        f"p99 {result['latency_p99_ms'] or 0:.1f} ms; verdict: memory {result['verdict']}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_soak-{args.tag}" if args.tag else "bench_soak"
    result["environment"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(samples, result, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.json and {stem}.png")
    return 0 if result["verdict"] == "flat" else 1


def plot(samples: list[dict[str, float]], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s["t_s"] for s in samples]) / 60
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name, title in (
        (axes[0], "rss_mb", "process RSS (MB)"),
        (axes[1], "tensor_mb", "tensor memory (MB)"),
    ):
        values = np.array([s[name] for s in samples])
        ax.plot(t, values, marker="o", markersize=3)
        ax.axvline(result["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
        slope = result[f"{name}_slope_per_min"]
        warm = t >= result["warmup_s"] / 60
        if warm.any():
            ax.plot(
                t[warm],
                values[warm].mean() + slope * (t[warm] - t[warm].mean()),
                "r--",
                label=f"fit {slope:+.3f} MB/min",
            )
        ax.set(xlabel="minutes", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(
        f"soak: {result['streams']} real-time streams, {result['minutes']:g} min -- {result['verdict']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
