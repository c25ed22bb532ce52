"""Bus benchmark: publish throughput with 10k-event packets, publish→read and reply latency.

    .venv/bin/python benchmarks/bench_bus.py [--packets 2000] [--redis-url redis://127.0.0.1:6379/15]

For each bus (LocalBus; RedisStreamBus when Redis answers) it measures:
  * throughput: 8 concurrent publishers push 13-byte-record packets of 10k events (130 kB) while one
    consumer reads (COUNT 64) and acks — packets/s, events/s, MB/s, BusFull retries;
  * hop latency: one packet at a time, publish → the blocked consumer holds it (p50/p99);
  * reply latency: put_reply → the waiting wait_reply returns, 8 waiters at once (p50/p99);
  * a worker round: ``send_round`` of 8 replies (400 B), 3 values (a 2.5 kB status snapshot among
    them) and 8 acks, what a worker pays each round at 8 cameras: client CPU and wall ms (medians).
Targets: the bus carries >= 1000 packets/s of 10k events (the API's 10 M events/s) and its hop
p99 <= 5 ms (a fifth of the 25 ms POST→prediction budget). Writes results/bench_bus.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.bus import Bus, BusFull, LocalBus, RedisStreamBus  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EVENTS_PER_PACKET = 10_000
RECORD_BYTES = 13
TARGET_PACKETS_PER_S = 1_000
TARGET_HOP_P99_MS = 5.0


def _percentile_ms(samples_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples_s) * 1000, q))


async def throughput(bus: Bus, packets: int, publishers: int = 8) -> dict[str, float]:
    payload = np.random.default_rng(0).bytes(EVENTS_PER_PACKET * RECORD_BYTES)
    retries, consumed, done = 0, 0, asyncio.Event()

    async def publisher(n: int) -> None:
        nonlocal retries
        for _ in range(n):
            while True:
                try:
                    await bus.publish("events", "bench", {"events": payload})
                    break
                except BusFull as full:
                    retries += 1
                    await asyncio.sleep(min(full.retry_after_s, 0.001))

    async def consumer() -> None:
        nonlocal consumed
        while consumed < packets:
            entries = await bus.read("bench-worker", 64, 100)
            await bus.ack([e.id for e in entries])
            consumed += len(entries)
        done.set()

    share = [packets // publishers + (i < packets % publishers) for i in range(publishers)]
    start = time.perf_counter()
    reader = asyncio.create_task(consumer())
    await asyncio.gather(*(publisher(n) for n in share))
    await asyncio.wait_for(done.wait(), 120)
    await reader
    elapsed = time.perf_counter() - start
    return {
        "packets": packets,
        "seconds": elapsed,
        "packets_per_s": packets / elapsed,
        "events_per_s": packets * EVENTS_PER_PACKET / elapsed,
        "mb_per_s": packets * len(payload) / elapsed / 1e6,
        "busfull_retries": retries,
    }


async def hop_latency(bus: Bus, n: int) -> list[float]:
    payload = bytes(EVENTS_PER_PACKET * RECORD_BYTES)
    samples = []
    for _ in range(n):
        reader = asyncio.create_task(bus.read("hop-worker", 1, 5_000))
        await asyncio.sleep(0)  # let the reader block first
        start = time.perf_counter()
        await bus.publish("events", "hop", {"events": payload})
        entries = await reader
        samples.append(time.perf_counter() - start)
        await bus.ack([e.id for e in entries])
    return samples


async def reply_latency(bus: Bus, rounds: int, waiters: int = 8) -> list[float]:
    samples = []
    for r in range(rounds):
        ids = [f"bench-{r}-{i}" for i in range(waiters)]
        tasks = [asyncio.create_task(bus.wait_reply(i, 5)) for i in ids]
        await asyncio.sleep(0.002)
        start = time.perf_counter()
        for i in ids:
            await bus.put_reply(i, b'{"ok": true, "steps": []}', 5)
        for task in tasks:
            assert await task is not None
            samples.append(time.perf_counter() - start)
    return samples


async def round_cost(bus: Bus, rounds: int = 300, repeats: int = 5) -> dict[str, float]:
    """A worker round's ``send_round`` (8 replies, 3 values, 8 acks of read entries): client CPU and wall ms
    per round, medians of ``repeats`` runs of ``rounds``."""
    values = [
        ("status", os.urandom(2500), None),
        ("heartbeat", b"1764547200.0", 60.0),
        ("busy:cam", b"1", 5.0),
    ]
    cpu, wall = [], []
    for _ in range(repeats):
        cpu_s = wall_s = 0.0
        for _ in range(rounds):
            ids = [await bus.publish("events", f"cam-{i}", {"n": b"0"}) for i in range(8)]
            await bus.read("bench", 8, 0)
            replies = [(entry_id, os.urandom(400)) for entry_id in ids]
            wall_start, cpu_start = time.perf_counter(), time.thread_time()
            await bus.send_round(values, replies, 5.0, ids)
            cpu_s += time.thread_time() - cpu_start
            wall_s += time.perf_counter() - wall_start
            for entry_id in ids:
                await bus.wait_reply(entry_id, 0)
        cpu.append(cpu_s / rounds * 1000)
        wall.append(wall_s / rounds * 1000)
    return {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall)}


async def measure(name: str, bus: Bus, packets: int) -> dict[str, Any]:
    await bus.start()
    try:
        result: dict[str, Any] = {"bus": name, "throughput": await throughput(bus, packets)}
        hops = await hop_latency(bus, 300)
        replies = await reply_latency(bus, 60)
        result["round_ms"] = await round_cost(bus)
    finally:
        await bus.close()
    result["hop_ms"] = {
        "p50": _percentile_ms(hops, 50),
        "p99": _percentile_ms(hops, 99),
        "mean": statistics.fmean(hops) * 1000,
    }
    result["reply_ms"] = {"p50": _percentile_ms(replies, 50), "p99": _percentile_ms(replies, 99)}
    result["pass"] = (
        result["throughput"]["packets_per_s"] >= TARGET_PACKETS_PER_S
        and result["hop_ms"]["p99"] <= TARGET_HOP_P99_MS
    )
    return result


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["bus"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(names, [r["throughput"]["packets_per_s"] for r in results], color="tab:blue")
    ax1.axhline(TARGET_PACKETS_PER_S, color="tab:red", ls="--", label="target")
    ax1.set_yscale("log")
    ax1.set_ylabel("10k-event packets / s (log)")
    ax1.legend()
    x = np.arange(len(names))
    for k, (key, label) in enumerate([("hop_ms", "publish→read"), ("reply_ms", "reply")]):
        ax2.bar(x + 0.2 * (2 * k - 1), [r[key]["p99"] for r in results], 0.4, label=f"{label} p99")
    ax2.axhline(TARGET_HOP_P99_MS, color="tab:red", ls="--", label="hop target")
    ax2.set_xticks(x, names)
    ax2.set_ylabel("ms")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--packets", type=int, default=2_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()

    buses: list[tuple[str, Bus]] = [("local", LocalBus(max_lag=256))]
    stream = f"ndot-bench:{uuid.uuid4().hex}"
    redis_bus = RedisStreamBus(args.redis_url, stream=stream, max_lag=256, maxlen=1024)
    if asyncio.run(redis_bus.ping()):
        buses.append(("redis", RedisStreamBus(args.redis_url, stream=stream, max_lag=256, maxlen=1024)))
    else:
        print(f"no Redis at {args.redis_url}: measuring the local bus only")
    results = [asyncio.run(measure(name, bus, args.packets)) for name, bus in buses]
    if len(buses) > 1:
        import redis

        raw = redis.Redis.from_url(args.redis_url)
        raw.delete(*raw.scan_iter(match=f"{stream}*"))
        raw.close()

    print(
        f"{'bus':<7}{'packets/s':>11}{'Mevents/s':>11}{'MB/s':>8}{'BusFull':>9}"
        f"{'hop p50 ms':>12}{'hop p99 ms':>12}{'reply p50 ms':>14}{'reply p99 ms':>14}"
        f"{'round cpu ms':>14}{'round ms':>10}  verdict"
    )
    for r in results:
        t = r["throughput"]
        print(
            f"{r['bus']:<7}{t['packets_per_s']:>11.0f}{t['events_per_s'] / 1e6:>11.2f}{t['mb_per_s']:>8.0f}"
            f"{t['busfull_retries']:>9}{r['hop_ms']['p50']:>12.3f}{r['hop_ms']['p99']:>12.3f}"
            f"{r['reply_ms']['p50']:>14.3f}{r['reply_ms']['p99']:>14.3f}{r['round_ms']['cpu_ms']:>14.3f}"
            f"{r['round_ms']['wall_ms']:>10.3f}  {'PASS' if r['pass'] else 'FAIL'}"
        )
    verdict = "PASS" if all(r["pass"] for r in results) else "FAIL"
    print(
        f"verdict: {verdict} (targets: >= {TARGET_PACKETS_PER_S} packets/s of {EVENTS_PER_PACKET} events, "
        f"hop p99 <= {TARGET_HOP_P99_MS} ms)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    (RESULTS / "bench_bus.json").write_text(
        json.dumps({"verdict": verdict, "meta": meta, "results": results}, indent=2)
    )
    plot(results, RESULTS / "bench_bus.png")
    print(f"wrote {RESULTS / 'bench_bus.json'} and bench_bus.png")


if __name__ == "__main__":
    main()
