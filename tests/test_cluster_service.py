"""Worker ranks as a user runs them: ``ndot api`` + ``ndot workers`` (torchrun, gloo on loopback, Redis).

Two ranks split 8 shards; six cameras post labelled packets; every stream's steps equal the frames its
packets make (nothing lost, nothing applied twice), each rank holds the streams of its own shards,
the ranks average their weights on one tick clock (equal digests at the same clock, /v1/cluster),
a model reset reaching one rank resets both, and SIGTERM stops both ranks together.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_support import REPO_ROOT, ServiceProcess, auth, free_port, http, wait_ready
from test_faults import bus_figure, deployment, packet, settle  # noqa: F401  (fixture)

from ndot_core.events.framing import StreamFramer
from ndot_core.events.layout import events_from_bytes
from service.bus.shards import shard_of
from service.worker.cluster_checkpoints import committed_rounds

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SHARDS = 8
CAMERAS = [f"cam-{i}" for i in range(6)]  # shards 6 0 2 4 7 1: both ranks get some


def expected_steps(count: int, seed: int, end: bool = True) -> int:
    """Frames a fresh framer makes of packets 0..count-1 (the last one ending the sequence if ``end``)."""
    framer = StreamFramer((34, 34), window_us=10_000, output_size=(34, 34))
    frames = sum(len(framer.push(events_from_bytes(packet(i, seed), (34, 34)))) for i in range(count))
    return frames + (len(framer.flush()) if end else 0)


def post_cameras(url: str, count: int, first: int = 0, stop: int | None = None) -> list[int]:
    """Packets first..stop-1 of a ``count``-packet labelled sequence on every camera (wait=false)."""
    codes = []
    with http(url) as client:
        for i in range(first, count if stop is None else stop):
            for seed, camera in enumerate(CAMERAS):
                params = {"label": seed % 10, "start": i == 0, "end": i == count - 1, "wait": False}
                if i == 0:
                    params.update(width=34, height=34)
                answer = client.post(
                    f"/v1/streams/{camera}/events",
                    params=params,
                    content=packet(i, seed),
                    headers={"content-type": "application/octet-stream"},
                )
                codes.append(answer.status_code)
    return codes


def two_free_ports() -> int:
    """A port p with p and p + 1 free now (rank r serves its /metrics on p + r)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


@pytest.mark.parametrize(
    ("learn_at", "sync_mode"), [("step", "average"), ("sequence", "average"), ("sequence", "grad")]
)
def test_two_ranks_split_the_shards_and_keep_one_model(deployment, learn_at: str, sync_mode: str) -> None:  # noqa: F811
    env = {
        "NDOT_SHARDS": str(SHARDS),
        "NDOT_SYNC_EVERY_TICKS": "4",
        "NDOT_LEARN_AT": learn_at,
        "NDOT_SYNC_MODE": sync_mode,
    }
    deployment["start"]("api", **env)
    metrics_port = two_free_ports()
    workers = deployment["start"](
        "workers", NDOT_WORKER_RANKS="2", NDOT_WORKER_METRICS_PORT=str(metrics_port), **env
    )
    url = deployment["url"]
    wait_ready(url, workers, timeout_s=180)
    count = 30
    assert post_cameras(url, count) == [202] * (count * len(CAMERAS))
    with http(url) as client:
        want = {camera: expected_steps(count, seed) for seed, camera in enumerate(CAMERAS)}
        got = settle(client, want)  # live steps per stream: a sequence's replay and re-learns are not in them
        assert got == want, workers.log_tail()
        ranks_of = {s["stream_id"]: s["rank"] for s in client.get("/v1/streams").json()["streams"]}
        assert ranks_of == {c: shard_of(c, SHARDS) % 2 for c in CAMERAS}

        deadline = time.monotonic() + 30
        while True:  # the rank statuses are written at most once a second
            cluster = client.get("/v1/cluster", headers=auth()).json()
            synced = "averages" if sync_mode == "average" else "gradient_syncs"
            versions = {r["model_version"] for r in cluster["ranks"]}  # grad: one update per tick on all
            equal = sync_mode == "average" or (len(versions) == 1 and versions.pop() > 0)
            if cluster["digests_agree"] and all(r.get(synced, 0) > 0 for r in cluster["ranks"]) and equal:
                break
            assert time.monotonic() < deadline, cluster
            time.sleep(0.5)
        assert cluster["world_size"] == 2 and cluster["shards"] == SHARDS
        assert sorted(s for r in cluster["ranks"] for s in r["shards"]) == list(range(SHARDS))
        assert all(s % 2 == r["rank"] for r in cluster["ranks"] for s in r["shards"])
        digests = {r["digest"] for r in cluster["ranks"]}
        assert len(digests) == 1 and cluster["ranks"][0]["tick_clock"] > 0
        if sync_mode == "grad":
            assert all(r["averages"] == 0 for r in cluster["ranks"])  # equal without any average
        for rank in (0, 1):  # each rank's own /metrics, labelled with its rank
            text = httpx.get(f"http://127.0.0.1:{metrics_port + rank}/metrics", timeout=5).text
            assert f'ndot_cluster_world_size{{rank="{rank}"}} 2.0' in text
            assert f'ndot_cluster_averages_total{{rank="{rank}"}}' in text

        reset = client.post("/v1/model/reset", headers=auth())  # reaches the rank owning shard_of("*")
        assert reset.status_code == 200, reset.text
        deadline = time.monotonic() + 30
        while True:
            ranks = client.get("/v1/cluster", headers=auth()).json()["ranks"]
            if all(r["model_version"] == 0 for r in ranks):
                break
            assert time.monotonic() < deadline, ranks
            time.sleep(0.5)

    assert workers.stop(timeout_s=60) == 0, workers.log_tail()
    log = workers.log_path.read_text()
    assert log.count("event=shutdown_checkpoint ") == 2, workers.log_tail()


def rank_pids(stream: str) -> dict[int, int]:
    """``{rank: pid}`` of the worker ranks serving ``stream`` (found by their environment in /proc: torchrun
    gives its workers ``RANK`` and ``TORCHELASTIC_RESTART_COUNT``)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(
                item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item
            )
        except OSError:
            continue
        if environ.get("NDOT_BUS_STREAM") == stream and "TORCHELASTIC_RESTART_COUNT" in environ:
            found[int(environ["RANK"])] = int(proc.name)
    return found


def wait_for(what, timeout_s: float = 120, every_s: float = 0.3):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while not (value := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)
    return value


@pytest.mark.parametrize("sync_mode", ["average", "grad"])
def test_a_rank_killed_mid_round_restarts_the_group_from_the_committed_cut(
    deployment,  # noqa: F811
    sync_mode: str,
) -> None:
    env = {
        "NDOT_SHARDS": str(SHARDS),
        "NDOT_SYNC_EVERY_TICKS": "4",
        "NDOT_CHECKPOINT_MAX_ENTRIES": "30",
        "NDOT_SYNC_MODE": sync_mode,
    }
    deployment["start"]("api", **env)
    workers = deployment["start"]("workers", NDOT_WORKER_RANKS="2", **env)
    url, stream, base = deployment["url"], deployment["stream"], deployment["tmp"] / "ckpt" / "cluster"
    wait_ready(url, workers, timeout_s=180)
    count = 60
    codes: list[int] = []
    posting = threading.Thread(target=lambda: codes.extend(post_cameras(url, count)))
    posting.start()
    wait_for(lambda: committed_rounds(base))  # a cut is committed while the cameras post
    before = rank_pids(stream)
    os.kill(before[1], signal.SIGKILL)  # no reply, no ack, no cut: torchrun restarts the group
    posting.join()
    assert codes == [202] * (count * len(CAMERAS))
    after = wait_for(lambda: (pids := rank_pids(stream)) and len(pids) == 2 and pids != before and pids)
    assert set(after.values()).isdisjoint(before.values()), "every rank was restarted"
    with http(url) as client:
        want = {camera: expected_steps(count, seed) for seed, camera in enumerate(CAMERAS)}
        got = settle(client, want)
        assert got == want, workers.log_tail()  # nothing lost, nothing applied twice
        assert bus_figure(deployment["redis_url"], stream, "dead") == []
        cluster = wait_for(
            lambda: (
                (c := client.get("/v1/cluster", headers=auth()).json())["attempt"] == 1
                and c["digests_agree"]
                and c
            )
        )
        assert all(r["alive"] and r["attempt"] == 1 for r in cluster["ranks"])
        rounds = client.get("/v1/checkpoints", headers=auth()).json()["checkpoints"]  # the group's cuts
        assert rounds and all(r["name"].startswith("round-") and r["bytes"] > 0 for r in rounds), rounds
    assert "event=round_restored" in workers.log_path.read_text()
    assert workers.stop(timeout_s=60) == 0, workers.log_tail()


def test_a_smaller_group_takes_over_the_shards_of_a_committed_round(deployment) -> None:  # noqa: F811
    env = {"NDOT_SHARDS": str(SHARDS), "NDOT_SYNC_EVERY_TICKS": "4"}
    deployment["start"]("api", **env)
    url = deployment["url"]
    three = deployment["start"]("workers", NDOT_WORKER_RANKS="3", **env)
    wait_ready(url, three, timeout_s=180)
    half = 20
    with http(url) as client:
        assert post_cameras(url, 2 * half, stop=half) == [202] * (half * len(CAMERAS))
        first = {camera: expected_steps(half, seed, end=False) for seed, camera in enumerate(CAMERAS)}
        assert settle(client, first) == first
        assert three.stop(timeout_s=60) == 0, three.log_tail()  # the stop round is a committed cut
        two = deployment["start"]("workers", NDOT_WORKER_RANKS="2", **env)
        wait_ready(url, two, timeout_s=180)
        assert post_cameras(url, 2 * half, first=half) == [202] * (half * len(CAMERAS))
        want = {camera: expected_steps(2 * half, seed) for seed, camera in enumerate(CAMERAS)}
        assert settle(client, want) == want, two.log_tail()  # every stream went on from its state
        ranks_of = {s["stream_id"]: s["rank"] for s in client.get("/v1/streams").json()["streams"]}
        assert ranks_of == {c: shard_of(c, SHARDS) % 2 for c in CAMERAS}
    assert "world_then=3 world_now=2" in two.log_path.read_text()
    assert two.stop(timeout_s=60) == 0, two.log_tail()


def test_a_rank_slow_to_start_after_a_restart_does_not_break_the_group(deployment) -> None:  # noqa: F811
    env = {"NDOT_SHARDS": str(SHARDS), "NDOT_SYNC_EVERY_TICKS": "4"}
    deployment["start"]("api", **env)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=2",
        str(REPO_ROOT / "tests" / "slow_rank_worker.py"),
    ]
    ranks = ServiceProcess("workers", {**deployment["env"], **env}, deployment["tmp"] / "slow.log")
    log = open(ranks.log_path, "ab")  # noqa: SIM115 (closed below)
    ranks.process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=ranks.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        url, stream = deployment["url"], deployment["stream"]
        wait_ready(url, ranks, timeout_s=180)
        first = wait_for(lambda: (pids := rank_pids(stream)) and len(pids) == 2 and pids)
        os.kill(first[0], signal.SIGKILL)  # rank 0 dies; on the restart rank 1 takes 4 s to start
        wait_for(lambda: (pids := rank_pids(stream)) and len(pids) == 2 and pids[1] != first[1] and pids)
        count = 10
        assert post_cameras(url, count) == [202] * (count * len(CAMERAS))
        with http(url) as client:
            want = {camera: expected_steps(count, seed) for seed, camera in enumerate(CAMERAS)}
            assert settle(client, want) == want, ranks.log_tail()
            cluster = client.get("/v1/cluster", headers=auth()).json()
            assert cluster["attempt"] == 1 and all(r["alive"] for r in cluster["ranks"]), cluster
    finally:
        ranks.process.send_signal(signal.SIGTERM)
        ranks.process.wait(60)
        log.close()


def test_ndot_workers_says_what_it_needs() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "NDOT_REDIS_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "workers", "--nproc", "2"],
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "needs REDIS_URL" in done.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "workers", "--nproc", "0"],
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT), "REDIS_URL": "redis://127.0.0.1:6379/15"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--nproc must be >= 1" in bad.stderr
