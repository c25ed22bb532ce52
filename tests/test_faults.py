"""Faults against a real Redis, with `ndot api` and `ndot worker` as separate processes:

- the worker killed with SIGKILL while streams post: the next worker restores the newest checkpoint,
  re-applies the history after it, claims what was pending -- every packet's steps exactly once;
- Redis stopped and started under a running API and worker: 503 + Retry-After and /readyz not
  ready in the gap, recovery with no restart;
- SIGTERM: the worker finishes and acks its batch and checkpoints; the API finishes the request in
  flight and stops accepting;
- a poison packet (a label the model does not have, put straight on the bus) fails the learner
  step, is retried, dead-lettered and counted, while its stream and the others go on;
- a reply wait longer than redis-py's 5 s socket timeout.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from service_support import BINARY, ServiceProcess, auth, clear_redis, free_port, http, wait_ready
from test_bus_redis_faults import OwnRedis

from ndot_core.events.framing import StreamFramer
from ndot_core.events.layout import WIRE_DTYPE, events_from_bytes
from service.bus import RedisStreamBus, messages
from service.settings import Settings
from service.worker.checkpoints import CheckpointStore
from service.worker.loop import Worker

pytestmark = pytest.mark.redis

STREAMS = ("s0", "s1", "s2", "s3")


def packet(index: int, seed: int) -> bytes:
    """Packet ``index`` of a stream: 5 events inside window ``index`` (10 ms windows)."""
    rng = np.random.default_rng(seed * 1000 + index)
    events = np.zeros(5, dtype=WIRE_DTYPE)
    events["t"] = index * 10_000 + np.arange(5) * 2_000
    events["x"], events["y"], events["p"] = (
        rng.integers(0, 34, 5),
        rng.integers(0, 34, 5),
        rng.integers(0, 2, 5),
    )
    return events.tobytes()


def expected_steps(count: int, seed: int) -> int:
    """Frames a fresh framer makes of packets 0..count-1, the last one ending the sequence."""
    framer = StreamFramer((34, 34), window_us=10_000, output_size=(34, 34))
    frames = sum(len(framer.push(events_from_bytes(packet(i, seed), (34, 34)))) for i in range(count))
    return frames + len(framer.flush())


def post_all(url: str, count: int, first: int = 0, stop: int | None = None) -> list[int]:
    """Packets first..stop-1 of a ``count``-packet sequence on every stream, interleaved (wait=false)."""
    codes = []
    with http(url) as client:
        for i in range(first, count if stop is None else stop):
            for seed, stream in enumerate(STREAMS):
                params = {"label": seed, "start": i == 0, "end": i == count - 1, "wait": False}
                if i == 0:
                    params.update(width=34, height=34)
                answer = client.post(
                    f"/v1/streams/{stream}/events", params=params, content=packet(i, seed), headers=BINARY
                )
                codes.append(answer.status_code)
    return codes


def steps_by_stream(client: httpx.Client) -> dict[str, int]:
    return {s["stream_id"]: s["steps"] for s in client.get("/v1/streams").json()["streams"]}


def bus_figure(url: str, stream: str, name: str) -> Any:
    async def read() -> Any:
        bus = RedisStreamBus(
            url, stream=stream, max_lag=10_000, maxlen=100_000, shards=None
        )  # the deployment's
        try:
            await bus.start()
            if name == "dead":
                return await bus.dead_letters()
            return await getattr(bus, name)()
        finally:
            await bus.close()

    return asyncio.run(read())


@pytest.fixture
def deployment(redis_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Settings (as env) of one API + worker pair on the shared test Redis; cleans up the keys."""
    stream = f"test-faults-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "NDOT_BUS_STREAM": stream,
        "NDOT_PORT": str(port),
        "NDOT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
        "NDOT_WORKER_METRICS_PORT": "0",
        "NDOT_REQUEST_TIMEOUT_S": "3",
        "NDOT_WINDOW_US": "10000",
    }
    processes: list[ServiceProcess] = []

    def start(command: str, **extra: str) -> ServiceProcess:
        process = ServiceProcess(command, {**env, **extra}, tmp_path / f"{command}.log").start()
        processes.append(process)
        return process

    yield {
        "url": f"http://127.0.0.1:{port}",
        "stream": stream,
        "env": env,
        "start": start,
        "tmp": tmp_path,
        "redis_url": redis_url,
    }
    for process in processes:
        process.stop(timeout_s=20)
    clear_redis(redis_url, stream)


def settle(client: httpx.Client, want: dict[str, int], timeout_s: float = 120) -> dict[str, int]:
    """Poll the streams until their step counts reach ``want`` (or time runs out), then once more."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = steps_by_stream(client)
        if all(got.get(s, 0) >= n for s, n in want.items()):
            break
        time.sleep(0.2)
    time.sleep(1.0)  # anything applied twice would show up now
    return steps_by_stream(client)


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_loses_no_packet_and_applies_none_twice(deployment) -> None:
    count = 120
    api = deployment["start"]("api")
    worker = deployment["start"]("worker", NDOT_CHECKPOINT_MAX_ENTRIES="40")
    wait_ready(deployment["url"], worker)
    posting = threading.Thread(target=lambda: codes.extend(post_all(deployment["url"], count)))
    codes: list[int] = []
    checkpoints = CheckpointStore(deployment["tmp"] / "ckpt")
    posting.start()
    with http(deployment["url"]) as client:
        deadline = time.monotonic() + 60
        while not checkpoints.list() or sum(steps_by_stream(client).values()) < 60:
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.05)
        worker.process.send_signal(signal.SIGKILL)  # mid-stream: no reply, no ack, no last checkpoint
        worker.process.wait()
        applied_at_kill = sum(steps_by_stream(client).values())
        posting.join()
        assert codes == [202] * (count * len(STREAMS))  # the API takes packets with no worker behind it
        want = {stream: expected_steps(count, seed) for seed, stream in enumerate(STREAMS)}
        assert applied_at_kill < sum(want.values())

        second = deployment["start"]("worker")
        wait_ready(deployment["url"], second)
        got = settle(client, want)
        assert got == want, second.log_tail()
        info = {s["stream_id"]: s for s in client.get("/v1/streams").json()["streams"]}
        assert all(info[s]["labelled_steps"] == want[s] and info[s]["sequences"] == 1 for s in STREAMS)
    log = second.log_path.read_text()
    assert (
        "event=checkpoint_restored" in log and "event=replayed" in log
    )  # restored, then the history after it
    assert bus_figure(deployment["redis_url"], deployment["stream"], "lag") == 0
    assert bus_figure(deployment["redis_url"], deployment["stream"], "dead") == []
    assert api.process.poll() is None


@pytest.mark.slow
def test_sigterm_the_worker_acks_and_checkpoints_and_the_api_finishes_what_is_in_flight(deployment) -> None:
    count = 40
    api = deployment["start"]("api")
    worker = deployment["start"]("worker")
    wait_ready(deployment["url"], worker)
    assert post_all(deployment["url"], count, stop=count // 2) == [202] * (count // 2 * len(STREAMS))
    with http(deployment["url"]) as client:
        while sum(steps_by_stream(client).values()) == 0:
            time.sleep(0.02)
    assert worker.stop() == 0, worker.log_tail()  # mid-way through the packets
    assert "event=shutdown_checkpoint" in worker.log_path.read_text()
    assert bus_figure(deployment["redis_url"], deployment["stream"], "pending_count") == 0  # its batch acked
    store = CheckpointStore(deployment["tmp"] / "ckpt")
    last = store.load(store.list()[-1].name)
    applied = sum(entry["meta"]["steps"] for entry in last["registry"]["streams"])
    assert applied > 0 and last["shards"] == Settings().shards > 1 and last["watermark"]

    # The API: a request in flight when SIGTERM comes still gets its answer; new connections are refused.
    in_flight: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: in_flight.append(
            httpx.post(
                f"{deployment['url']}/v1/streams/s0/events",
                params={"label": 0},
                content=packet(count // 2, 0),
                headers={**BINARY, **auth()},
                timeout=30,
            )
        )
    )
    thread.start()
    time.sleep(0.5)
    api.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{deployment['url']}/healthz", timeout=2)
    thread.join(30)
    assert in_flight[0].status_code == 504 and "will be applied" in in_flight[0].json()["detail"]
    assert api.process.wait(30) == 0

    api = deployment["start"]("api")
    worker = deployment["start"]("worker")
    wait_ready(deployment["url"], worker)
    assert post_all(deployment["url"], count, first=count // 2 + 1) == [202] * (
        (count // 2 - 1) * len(STREAMS)
    )
    want = {stream: expected_steps(count, seed) for seed, stream in enumerate(STREAMS)}
    with http(deployment["url"]) as client:
        assert settle(client, want) == want, worker.log_tail()


@pytest.mark.slow
def test_redis_stopped_and_started_gives_503_then_recovers_without_a_restart(
    deployment, tmp_path: Path
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis(tmp_path)
    server.start()
    try:
        env = {"REDIS_URL": server.url}
        deployment["start"]("api", **env)
        worker = deployment["start"]("worker", **env)
        url = deployment["url"]
        wait_ready(url, worker)
        with http(url) as client:
            first = client.post(
                "/v1/streams/cam/events",
                params={"width": 34, "height": 34, "label": 1},
                content=packet(0, 0) + packet(1, 0)[: 13 * 5],
                headers=BINARY,
            )
            assert first.status_code == 200 and len(first.json()["steps"]) == 1
            # A request waiting for its reply when Redis dies: 504 ("do not send it again"), never a 503,
            # which would make a client resend a packet that is already on the bus.
            worker.process.send_signal(signal.SIGSTOP)
            waiting: list[httpx.Response] = []
            thread = threading.Thread(
                target=lambda: waiting.append(
                    client.post(
                        "/v1/streams/cam/events", params={"label": 1}, content=packet(2, 0), headers=BINARY
                    )
                )
            )
            thread.start()
            time.sleep(0.5)
            server.kill()
            thread.join(10)
            worker.process.send_signal(signal.SIGCONT)
            assert waiting[0].status_code == 504 and "do not send it again" in waiting[0].json()["detail"]
            gap = client.post(
                "/v1/streams/cam/events", params={"label": 1}, content=packet(3, 0), headers=BINARY
            )
            assert gap.status_code == 503 and int(gap.headers["retry-after"]) >= 1
            assert "bus unavailable" in gap.json()["detail"]
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["bus"] is False
            assert "bus unreachable" in ready.json()["reasons"]
            assert client.get("/healthz").status_code == 200

            server.start()  # same port, empty: no stream, no group, no values
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, worker.log_tail()
                time.sleep(0.2)
            deadline = time.monotonic() + 30
            while (
                after := client.post(
                    "/v1/streams/cam/events", params={"label": 1}, content=packet(3, 0), headers=BINARY
                )
            ).status_code == 404:
                assert time.monotonic() < deadline, "the worker did not publish its streams again"
                time.sleep(0.2)
            assert after.status_code == 200 and after.json()["steps"], after.text
            # windows 0-2 closed: the stream's state lived through the outage. Packet 2 either went down with
            # Redis (no persistence here) or had reached the stopped worker's socket already; either way
            # packet 3 (sent again by hand after its 503) closes windows 1 and 2.
            assert client.get("/v1/streams/cam").json()["steps"] == 3
    finally:
        server.kill()


def test_a_poison_packet_is_retried_then_dead_lettered_and_its_stream_goes_on(
    redis_url: str, tmp_path: Path
) -> None:
    stream = f"test-poison-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=redis_url,
        bus_stream=stream,
        checkpoint_dir=tmp_path,
        checkpoint_interval_s=0,
        max_failures=3,
        read_block_ms=10,
        window_us=10_000,
        learn_at="step",  # the learner itself meets the bad label (learn_at=sequence refuses it at once)
    )

    async def publish(bus: RedisStreamBus, name: str, index: int, label: int) -> str:
        events = messages.EventsPacket(packet(index, 0), 34, 34, label=label, start=index == 0)
        return await bus.publish(messages.EVENTS, name, events.to_fields())

    async def scenario() -> None:
        bus = RedisStreamBus(redis_url, stream=stream, max_lag=1000)
        await bus.start()
        try:
            worker = Worker(settings, bus, consumer="w1")
            await worker.start()
            for i in range(3):
                await publish(bus, "good", i, 2)
                await publish(bus, "bad", i, 1)
            poison = await publish(
                bus, "bad", 3, 99
            )  # the API would refuse it; straight on the bus it is not
            later = [await publish(bus, "bad", 4, 1), await publish(bus, "good", 4, 2)]
            while await bus.lag():
                await worker.run_once(block_ms=10)
            refused = json.loads(await bus.wait_reply(poison, 1))
            assert refused == {"ok": False, "status": 500, "detail": refused["detail"]}
            assert "learner step failed 3 times" in refused["detail"] and "label 99" in refused["detail"]
            (dead,) = await bus.dead_letters()
            assert dead.fields["original_id"].decode() == poison and b"label 99" in dead.fields["error"]
            for entry_id in later:  # the packets after it, on its stream and the other, still learn
                answer = json.loads(await bus.wait_reply(entry_id, 1))
                assert answer["ok"] and answer["steps"] and all(step["learned"] for step in answer["steps"])
            sample = worker.metrics.registry.get_sample_value
            assert sample("ndot_packets_total", {"outcome": "dead_lettered"}) == 1
            assert sample("ndot_packets_total", {"outcome": "failed"}) == 3
            assert sample("ndot_packets_total", {"outcome": "applied"}) == 9 - 1  # 9 published, 1 dead
            good, bad = worker.batcher.registry.get("good"), worker.batcher.registry.get("bad")
            assert good.steps == 4 and bad.steps == 3  # windows 0-3 (3 empty); bad's window 2 never ran
        finally:
            await bus.close()

    try:
        asyncio.run(scenario())
    finally:
        clear_redis(redis_url, stream)


@pytest.mark.slow
def test_a_reply_wait_longer_than_the_redis_socket_timeout(redis_url: str) -> None:
    stream = f"test-wait-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        bus = RedisStreamBus(redis_url, stream=stream)
        try:
            started = time.monotonic()
            waiting = asyncio.create_task(bus.wait_reply("late", 9))
            nothing = asyncio.create_task(bus.wait_reply("never", 6))
            await asyncio.sleep(5.5)
            await bus.put_reply("late", b"here", 5)
            assert await waiting == b"here"
            assert await nothing is None  # not BusUnavailable: the socket timeout does not cut the wait
            assert 6 <= time.monotonic() - started < 8
        finally:
            await bus.close()

    try:
        asyncio.run(scenario())
    finally:
        clear_redis(redis_url, stream)
