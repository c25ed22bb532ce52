"""Service benchmark: API ingest, POST -> prediction latency, worker throughput.

    .venv/bin/python benchmarks/bench_service.py [--duration 5] [--phases ingest,latency,worker] [--no-redis]

1. ingest   events/s one API process accepts: 10k-event binary packets (``wait=false``), loaded by
            ``wrk`` (1 thread, 8 connections) or, without wrk, by 4 plain ``http.client`` processes.
            A sink consumer acks what the API publishes, so only the API is measured. Embedded bus
            (sink in the API's event loop) and Redis (sink in this process). Target >= 10 M events/s.
2. latency  ``ndot serve`` (embedded bus, stream_cnn): 8 processes each replay labelled N-MNIST at
            real time in 10 ms packets (``wait=true``); POST -> prediction p50 / p99. Target p99 <= 25 ms.
3. worker   the batcher alone, 8 N-MNIST streams, one 10 ms packet per stream per tick of camera
            time: steps/s and whether it keeps up with real time (8 x 100 steps/s).
Loopback only; every phase is bounded by ``--duration`` seconds. Writes results/bench_service.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_load import (  # noqa: E402
    PACKET_EVENTS,
    REDIS_URL,
    ROOT,
    WINDOW_US,
    free_port,
    load,
    nmnist_packets,
    packet_body,
    redis_sink,
    replay_stream,
    wait_http,
)

from service.bus.shards import delete_bus_keys  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_INGEST = 10e6
TARGET_P99_S = 0.025
STREAMS = 8


def bench_ingest(bus: str, duration_s: float) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, str(Path(__file__).with_name("service_load.py")), "sink-server", str(port)] + (
        [REDIS_URL] if bus == "redis" else []
    )
    server = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stop = asyncio.Event()
    sink_thread = None
    try:
        stream = server.stdout.readline().split()[-1]
        if bus == "redis":
            loop = asyncio.new_event_loop()
            sink_thread = threading.Thread(target=loop.run_until_complete, args=(redis_sink(stream, stop),))
            sink_thread.start()
        conn = http.client.HTTPConnection("127.0.0.1", port)  # open the stream (declare its sensor size)
        conn.request(
            "POST",
            "/v1/streams/bench/events?wait=false&width=34&height=34",
            b"",
            {"Content-Type": "application/octet-stream"},
        )
        assert conn.getresponse().status == 202
        result = load(url, "/v1/streams/bench/events?wait=false", packet_body(), duration_s)
    finally:
        if sink_thread is not None:
            loop.call_soon_threadsafe(stop.set)
            sink_thread.join(10)
        server.terminate()
        server.wait(30)
        if bus == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            delete_bus_keys(client, stream)
    result["events_per_s"] = result["ok_per_s"] * PACKET_EVENTS
    result["bus"] = bus
    return result


# --- 2. latency --------------------------------------------------------------------------------------


def bench_latency(duration_s: float, threads: int = 0) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "NDOT_PORT": str(port),
            "NDOT_CHECKPOINT_DIR": tmp,
            "NDOT_LOG_LEVEL": "WARNING",
            "NDOT_TORCH_THREADS": str(threads),
            "NDOT_AUTH": "off",
        }  # loopback benchmark
        env.pop("REDIS_URL", None)
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(url, "/readyz")
            context = mp.get_context("spawn")
            queue = context.Queue()
            procs = [
                context.Process(target=replay_stream, args=(url, s, duration_s, queue))
                for s in range(STREAMS)
            ]
            for p in procs:
                p.start()
            results = [queue.get(timeout=duration_s + 120) for _ in procs]
            for p in procs:
                p.join()
        finally:
            server.terminate()
            server.wait(60)
    latencies = np.array([x for r in results for x in r[0]])
    return {
        "streams": STREAMS,
        "requests": int(latencies.size),
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "max_ms": float(latencies.max() * 1e3),
        "max_send_lateness_ms": max(r[1] for r in results) * 1e3,
        "latencies_ms": (latencies * 1e3).tolist(),
    }


# --- 3. worker ---------------------------------------------------------------------------------------


def bench_worker(duration_s: float, threads: int = 0) -> dict[str, Any]:
    import torch

    from ndot_core import OnlineLearner, build_model
    from service.bus.messages import EventsPacket
    from service.metrics import ServiceMetrics
    from service.settings import Settings
    from service.worker.batcher import Batcher

    device = Settings().torch_device()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    learner = OnlineLearner(
        build_model("stream_cnn", in_channels=2, num_classes=10, input_size=(34, 34)), device=device
    )
    batcher = Batcher(learner, 64, WINDOW_US, ServiceMetrics())
    streams = [
        [
            (label, k, len(packets), body)
            for label, packets in nmnist_packets(10, 40 * s)
            for k, (_, body) in enumerate(packets)
        ]
        for s in range(STREAMS)
    ]
    ticks = steps = 0
    camera_s = 0.0
    started = time.perf_counter()
    while time.perf_counter() - started < duration_s and ticks < min(len(s) for s in streams):
        for s, packets in enumerate(streams):
            label, k, count, body = packets[ticks]
            packet = EventsPacket(body, 34, 34, label=label, start=k == 0, end=k == count - 1)
            batcher.push_packet(f"{ticks + 1}-{s}", f"cam-{s}", packet)
        before = sum(slot.steps for slot in batcher.registry)
        batcher.drain()
        batcher.results.clear()
        steps += sum(slot.steps for slot in batcher.registry) - before
        ticks += 1
        camera_s += WINDOW_US / 1e6
    wall_s = time.perf_counter() - started
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "streams": STREAMS,
        "camera_s": camera_s,
        "wall_s": wall_s,
        "steps": steps,
        "steps_per_s": steps / wall_s,
        "realtime_factor": camera_s / wall_s,
    }


# --- report ------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ingest = results.get("ingest", [])
    if ingest:
        axes[0].bar([r["bus"] for r in ingest], [r["events_per_s"] / 1e6 for r in ingest], color="tab:blue")
        axes[0].axhline(TARGET_INGEST / 1e6, color="tab:red", linestyle="--", label="target")
        axes[0].set_ylabel("M events/s accepted")
        axes[0].set_title("API ingest, 10k-event packets")
        axes[0].legend()
    latency = results.get("latency")
    if latency:
        values = np.sort(latency["latencies_ms"])
        axes[1].plot(values, np.arange(1, values.size + 1) / values.size)
        axes[1].axvline(TARGET_P99_S * 1e3, color="tab:red", linestyle="--", label="p99 target")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("POST -> prediction (ms)")
        axes[1].set_ylabel("fraction of requests")
        axes[1].set_title(f"{STREAMS} real-time N-MNIST streams")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--phases", default="ingest,latency,worker")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis ingest run")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    if "ingest" in phases:
        results["ingest"] = [bench_ingest("embedded", args.duration)]
        if not args.no_redis:
            try:
                results["ingest"].append(bench_ingest("redis", args.duration))
            except Exception as err:  # no Redis here: report it, keep the other phases
                print(f"redis ingest skipped: {err}")
    if "latency" in phases:
        results["latency"] = bench_latency(args.duration, args.torch_threads)
    if "worker" in phases:
        results["worker"] = bench_worker(args.duration, args.torch_threads)

    rows, verdicts = [], []
    for r in results.get("ingest", []):
        rows.append(
            (
                f"ingest ({r['bus']}, {r['tool']})",
                f"{r['events_per_s'] / 1e6:8.2f} M events/s",
                f"{r['ok_per_s']:.0f} packets/s, {r['refused']} refused",
            )
        )
        verdicts.append((f"ingest {r['bus']} >= 10 M events/s", r["events_per_s"] >= TARGET_INGEST))
    if "latency" in results:
        r = results["latency"]
        rows.append(
            (
                "POST -> prediction p50 / p99",
                f"{r['p50_ms']:6.1f} / {r['p99_ms']:.1f} ms",
                f"{r['requests']} requests, max {r['max_ms']:.0f} ms, sends up to {r['max_send_lateness_ms']:.0f} ms late",
            )
        )
        verdicts.append(("p99 <= 25 ms", r["p99_ms"] <= TARGET_P99_S * 1e3))
    if "worker" in results:
        r = results["worker"]
        rows.append(
            (
                f"worker ({r['device']}, {r['torch_threads']} threads, {r['streams']} streams)",
                f"{r['steps_per_s']:8.0f} steps/s",
                f"{r['realtime_factor']:.2f}x real time",
            )
        )
        verdicts.append(("worker keeps up with 8 real-time streams", r["realtime_factor"] >= 1.0))
    print(f"\n{'measure':44} {'value':>22}  detail")
    for name, value, detail in rows:
        print(f"{name:44} {value:>22}  {detail}")
    print("\nverdict:")
    for name, ok in verdicts:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    RESULTS.mkdir(exist_ok=True)
    saved = {k: v for k, v in results.items()}
    if "latency" in saved:
        saved["latency"] = {k: v for k, v in saved["latency"].items() if k != "latencies_ms"}
    saved["verdict"] = {name: ok for name, ok in verdicts}
    (RESULTS / "bench_service.json").write_text(json.dumps(saved, indent=2))
    plot(results, RESULTS / "bench_service.png")
    print(f"\nwrote {RESULTS / 'bench_service.json'} and bench_service.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
