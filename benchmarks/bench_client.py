"""Client benchmark: packet cutting + encoding, the synthetic camera, and 8 real-time streams end to end.

    .venv/bin/python benchmarks/bench_client.py [--streams 8] [--samples 20] [--url URL]

Workload: N-MNIST samples from ../shared/data/nmnist-small (the synthetic camera when absent).
Measured:
  * client encoding: ``packetize`` (10 ms packets) + ``encode_body`` (13-byte records), events/s;
  * synthetic camera: samples/s and events/s of ``SyntheticCamera`` rendering (34x34, 0.3 s samples);
  * end to end: ``--streams`` separate ``ndot-client`` processes (one real-time stream each, binary
    10 ms packets) against ``ndot serve`` on the embedded bus (or ``--url``): POST -> prediction
    latency p50/p99 over every packet, and the schedule lag (how far behind the camera clock a
    packet went out; it grows without bound when the service does not keep up).
Targets: encoding >= 10 M events/s (the client is never the bottleneck of the API's 10 M/s);
p99 <= 25 ms with 8 real-time streams on CPU; keeps up = max schedule lag <= 100 ms.
Writes results/bench_client.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.local_service import LocalService  # noqa: E402
from clients.packets import encode_body, packetize  # noqa: E402
from clients.sources import SequenceSource, open_source, synthetic_source  # noqa: E402
from clients.synthetic import SyntheticCamera  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("NDOT_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_ENCODE = 10e6
TARGET_P99_S = 0.025
TARGET_LAG_S = 0.1


def dataset() -> tuple[str, SequenceSource, list[str]]:
    """The source the client processes replay, and its CLI arguments."""
    local = DATA / "nmnist-small"
    if (local / "labels.txt").is_file():
        return "nmnist-small", open_source(local), [str(local)]
    return "synthetic", synthetic_source(200), ["--synthetic", "200"]


def bench_encoding(source: SequenceSource, samples: int = 200) -> dict:
    sequences = list(source.select(limit=samples, shuffle=True, seed=0))
    events = sum(len(s.events) for s in sequences)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for sequence in sequences:
            for packet in packetize(sequence.events["t"], packet_us=10_000):
                encode_body(sequence.events[packet.lo : packet.hi])
        best = min(best, time.perf_counter() - start)
    return {"samples": len(sequences), "events": events, "seconds": best, "events_per_s": events / best}


def bench_synthetic(samples: int = 20) -> dict:
    camera = SyntheticCamera(noise_rate_hz=1.0)
    start = time.perf_counter()
    events = sum(len(camera.sample(i)[0]) for i in range(samples))
    seconds = time.perf_counter() - start
    camera_s = samples * camera.duration_us * 1e-6
    return {
        "samples": samples,
        "events": events,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "events_per_s": events / seconds,
        "realtime_factor": camera_s / seconds,
    }


def bench_end_to_end(url: str, source_args: list[str], streams: int, samples: int, workdir: Path) -> dict:
    """``streams`` client processes, one real-time stream each; latencies pooled over every packet."""
    processes = []
    for i in range(streams):
        out = workdir / f"client-{i}.json"
        command = [
            sys.executable,
            "-m",
            "clients.dvs_client",
            *source_args,
            "--url",
            url,
            "--limit",
            str(samples),
            "--shuffle",
            "--seed",
            str(i),
            "--stream-prefix",
            f"bench{i}",
            "--quiet",
            "--out",
            str(out),
        ]
        processes.append((subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL), out))
    codes = [process.wait() for process, _ in processes]
    records = [json.loads(out.read_text()) for _, out in processes if out.is_file()]
    latencies = (
        np.concatenate([np.asarray(r["packet_latencies_s"]) for r in records]) if records else np.zeros(0)
    )
    lags = [r["summary"]["schedule_lag_max_s"] or 0.0 for r in records]
    return {
        "streams": streams,
        "samples_per_stream": samples,
        "exit_codes": codes,
        "packets": int(latencies.size),
        "events": sum(r["summary"]["events"] for r in records),
        "latency_p50_ms": float(np.percentile(latencies, 50) * 1e3) if latencies.size else None,
        "latency_p99_ms": float(np.percentile(latencies, 99) * 1e3) if latencies.size else None,
        "schedule_lag_max_s": max(lags) if lags else None,
        "sample_accuracy": float(np.mean([r["summary"]["sample_accuracy"] or 0 for r in records]))
        if records
        else None,
        "_latencies_s": latencies.tolist(),
    }


def plot(latencies_s: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.sort(np.asarray(latencies_s) * 1e3)
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(values, np.arange(1, values.size + 1) / max(values.size, 1))
    axes.axvline(TARGET_P99_S * 1e3, color="red", linestyle="--", label="p99 target 25 ms")
    axes.axhline(0.99, color="grey", linestyle=":")
    axes.set(
        xscale="log",
        xlabel="POST -> prediction latency (ms, client side)",
        ylabel="fraction of packets",
        title=title,
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8, help="concurrent real-time client processes")
    parser.add_argument("--samples", type=int, default=20, help="samples each client process replays")
    parser.add_argument("--url", help="benchmark this running service instead of starting `ndot serve`")
    args = parser.parse_args()
    name, source, source_args = dataset()
    encoding = bench_encoding(source)
    synthetic = bench_synthetic()
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        service = None if args.url else LocalService(checkpoint_dir=Path(tmp) / "checkpoints")
        try:
            url = args.url or service.start()
            e2e = bench_end_to_end(url, source_args, args.streams, args.samples, Path(tmp))
        finally:
            if service is not None:
                service.close()
    latencies = e2e.pop("_latencies_s")
    verdicts = {
        "encoding >= 10 M events/s": encoding["events_per_s"] >= TARGET_ENCODE,
        f"p99 <= 25 ms, {args.streams} real-time streams": (e2e["latency_p99_ms"] or 1e9)
        <= TARGET_P99_S * 1e3,
        "keeps up (max schedule lag <= 100 ms)": (e2e["schedule_lag_max_s"] or 0) <= TARGET_LAG_S,
    }
    rows = [
        (
            "client packetize + encode",
            f"{encoding['events_per_s'] / 1e6:.1f} M events/s",
            f"{encoding['events']} events",
        ),
        (
            "synthetic camera",
            f"{synthetic['samples_per_s']:.1f} samples/s",
            f"{synthetic['events_per_s'] / 1e3:.0f} k events/s, {synthetic['realtime_factor']:.1f}x real time",
        ),
        (
            f"e2e latency p50 / p99 ({args.streams} streams)",
            f"{e2e['latency_p50_ms']:.1f} / {e2e['latency_p99_ms']:.1f} ms",
            f"{e2e['packets']} packets",
        ),
        ("e2e max schedule lag", f"{e2e['schedule_lag_max_s']:.3f} s", f"exit codes {e2e['exit_codes']}"),
    ]
    print(
        f"bench_client on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, data: {name}"
    )
    for label, value, note in rows:
        print(f"  {label:<38} {value:>22}   {note}")
    for label, ok in verdicts.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {label}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "data": name,
        "cpus": os.cpu_count(),
        "encoding": encoding,
        "synthetic": synthetic,
        "end_to_end": e2e,
        "verdicts": verdicts,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (RESULTS / "bench_client.json").write_text(json.dumps(result, indent=1))
    plot(latencies, RESULTS / "bench_client.png", f"{args.streams} real-time streams, client side ({name})")
    print(f"  wrote {RESULTS / 'bench_client.json'} and bench_client.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
