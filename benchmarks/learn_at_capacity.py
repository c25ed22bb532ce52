"""What test-then-train costs: worker capacity with NDOT_LEARN_AT=step vs sequence, at saturation, no HTTP.

    .venv/bin/python benchmarks/learn_at_capacity.py --streams 1 4 16 --samples-per-stream 8
    .venv/bin/python benchmarks/learn_at_capacity.py --streams --realtime 4 8 --duration 15   # needs Redis

For each mode and stream count S, a ``Worker`` on the embedded bus (this process, the service's default
settings but ``max_stream_speed=0``: no pace cap) gets S streams' labelled N-MNIST samples
(``../shared/data/nmnist-small``) as 10 ms packets (start / end flags, the label on every packet), all
published up front, and runs its loop until every packet is answered and every replay has run. Reported:
samples/s, live steps/s (frames the streams made), learner rows/s (live + replayed), and rows per tick.
``step`` learns on the live rows; ``sequence`` steps them unlabelled and replays each sample's frames
with its label as extra rows of later ticks.

``--realtime N ...``: ``ndot worker`` on Redis under N real-time N-MNIST cameras at 20 ms
(``benchmarks/worker_load.py``: each publishes one window per packet at its camera's clock and waits
for the reply), per mode: steps/s, how far the cameras fell behind, latency and the worker's CPU.
Writes ``results/learn_at_capacity.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.packets import encode_body, packetize  # noqa: E402
from clients.sources import open_source  # noqa: E402
from service.bus import LocalBus, messages  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.worker.loop import Worker  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


async def measure(learn_at: str, streams: int, samples: list, per_stream: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            auth="off",
            learn_at=learn_at,
            max_stream_speed=0,
            checkpoint_interval_s=0,
            checkpoint_dir=Path(folder),
            restore_on_start=False,
            read_block_ms=1,
        )
        bus = LocalBus(max_lag=10**7, max_bytes=2**34)
        await bus.start()
        worker = Worker(settings, bus, consumer="bench")
        await worker.start()
        ids = []
        for k in range(per_stream):  # sample k of every stream, then k + 1: streams interleave on the bus
            for s in range(streams):
                sequence = samples[(k * streams + s) % len(samples)]
                for packet in packetize(sequence.events["t"], 10_000):
                    body = encode_body(sequence.events[packet.lo : packet.hi])
                    fields = messages.EventsPacket(body, 34, 34, sequence.label, packet.start, packet.end)
                    ids.append(await bus.publish(messages.EVENTS, f"s{s}", fields.to_fields()))
        started = time.perf_counter()
        while await bus.pending_count() or await bus.lag() or worker.applier.has_work:
            await worker.run_once(block_ms=0)
        seconds = time.perf_counter() - started
        registry = worker.metrics.registry
        steps = {
            kind: registry.get_sample_value("ndot_steps_total", {"kind": kind}) for kind in ("learn", "infer")
        }
        ticks = worker.batcher.ticks_run
        live = steps["infer"] + (steps["learn"] if learn_at == "step" else 0)
        rows = steps["learn"] + steps["infer"]
        await bus.close()
    return {
        "learn_at": learn_at,
        "streams": streams,
        "samples": streams * per_stream,
        "packets": len(ids),
        "seconds": seconds,
        "samples_per_s": streams * per_stream / seconds,
        "live_steps_per_s": live / seconds,
        "rows_per_s": rows / seconds,
        "rows_per_tick": rows / max(ticks, 1),
        "ticks": ticks,
        "optimizer_steps": worker.batcher.learner.version,
    }


def realtime(learn_at: str, streams: int, duration_s: float) -> dict[str, Any]:
    """Real-time cameras against ``ndot worker`` on Redis (``worker_load``), with the worker's CPU share."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from worker_load import WorkerProcess, worker_level

    def cpu_s(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with tempfile.TemporaryDirectory() as folder:
        env = {"NDOT_LEARN_AT": learn_at, "NDOT_WINDOW_US": "20000"}
        with WorkerProcess(Path(folder), env) as worker:
            before, started = cpu_s(worker.process.pid), time.perf_counter()
            level = worker_level(worker.stream, streams, duration_s, 20_000)
            cpu = (cpu_s(worker.process.pid) - before) / (time.perf_counter() - started)
    return {"learn_at": learn_at, "streams": streams, "worker_cpu": cpu, **level}


def main(argv: list[str] | None = None) -> int:
    data = Path(os.environ.get("NDOT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "nmnist-small"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=data, help="labelled folder (labels.txt + train/*.bs2)")
    parser.add_argument(
        "--streams", type=int, nargs="*", default=[1, 4, 16], help="stream counts (saturation)"
    )
    parser.add_argument("--samples-per-stream", type=int, default=8, help="samples each stream sends")
    parser.add_argument("--learn-at", nargs="+", default=["step", "sequence"], choices=("step", "sequence"))
    parser.add_argument(
        "--realtime", type=int, nargs="*", default=[], help="also: this many real-time cameras (Redis)"
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each --realtime level")
    parser.add_argument("--out", type=Path, default=RESULTS / "learn_at_capacity.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    samples = list(open_source(args.data).select(limit=256, shuffle=True, seed=0))
    print(
        f"{'learn_at':>9} {'streams':>7} {'samples/s':>10} {'live steps/s':>13} {'rows/s':>8} {'rows/tick':>9} {'s':>6}"
    )
    results = []
    for streams in args.streams:
        for learn_at in args.learn_at:
            result = asyncio.run(measure(learn_at, streams, samples, args.samples_per_stream))
            results.append(result)
            print(
                f"{learn_at:>9} {streams:>7} {result['samples_per_s']:>10.1f} {result['live_steps_per_s']:>13.0f} "
                f"{result['rows_per_s']:>8.0f} {result['rows_per_tick']:>9.2f} {result['seconds']:>6.1f}",
                flush=True,
            )
    for streams in args.realtime:
        for learn_at in args.learn_at:
            level = realtime(learn_at, streams, args.duration)
            results.append(level)
            print(
                f"{learn_at:>9} {streams:>3} real-time cameras: {level['steps_per_s']:.0f} steps/s, "
                f"{level['max_schedule_lag_s']:.2f} s behind at most, p99 {level['latency_p99_ms']:.1f} ms, "
                f"worker {100 * level['worker_cpu']:.0f} % of a core",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
