"""Live views without a browser: the worker's live values (``service.worker.live``), the API's event
stream (``service.api.routes.view``) over real HTTP, with API and worker in different processes over
Redis, and what slow, vanished and numerous viewers cost (the browser itself: test_view_browser.py)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import (
    AUTH_SETTINGS,
    INGEST_KEY,
    ServerThread,
    ServiceProcess,
    clear_redis,
    free_port,
    http,
    nmnist_samples,
    post_sample,
    wait_ready,
)

from service.api.routes.view import LIVE, LiveHub, Viewer, close_live_views, sse
from service.app import create_app
from service.bus import LocalBus, messages
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker.live import LiveFrames
from service.worker.streams import StreamSlot

KEY = {"x-api-key": INGEST_KEY}


class Step:
    def __init__(self, frame: np.ndarray, label: int | None) -> None:
        self.frame, self.label = frame, label


def slot(stream_id: str, queued: int = 0) -> StreamSlot:
    s = StreamSlot(stream_id, row=0, width=128, height=96, framer=None, last_active_s=0.0)
    s.pending.extend([("reset", None)] + [("step", object())] * queued)
    return s


def frame_of(value: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value["data"]), dtype=np.uint8).reshape(value["shape"])


def read_events(response: httpx.Response, count: int, kind: str = LIVE, timeout_s: float = 30) -> list[dict]:
    """The next ``count`` events of ``kind`` on an open event stream, with their arrival times."""
    found, name, deadline = [], None, time.monotonic() + timeout_s
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name == kind:
            found.append({"at": time.monotonic(), **json.loads(line[6:])})
            if len(found) == count:
                return found
        assert time.monotonic() < deadline, f"only {len(found)} {kind} events in {timeout_s} s"
    raise AssertionError(f"the stream ended after {len(found)} {kind} events")


# --- the worker's side --------------------------------------------------------------------------------


def test_live_values_only_for_watched_streams_at_most_one_per_interval() -> None:
    live = LiveFrames(window_us=20_000)
    a, b = slot("a", queued=3), slot("b")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 3, size=(2, 34, 34)).astype(np.float32) for _ in range(50)]
    probs = [0.1] * 10
    live.record([(a, Step(frames[0], 3))], [3], [probs], version=1)
    assert live.due_values("p", now=0.0) == []  # nobody watches: nothing kept, nothing written

    live.watch({"a"})
    for i, frame in enumerate(frames):
        a.steps += 1
        live.record([(a, Step(frame, 3)), (b, Step(frame, None))], [i % 10, 0], [probs, probs], version=i)
    (key, value, ttl), *others = live.due_values("p", now=0.0)
    assert not others and key == messages.live_key("p", "a") and ttl == messages.LIVE_TTL_S
    snap = json.loads(value)
    assert np.array_equal(frame_of(snap["frame"]), frames[-1].astype(np.uint8))
    assert np.array_equal(frame_of(snap["accumulated"]), np.minimum(sum(frames), 255).astype(np.uint8))
    assert snap["frames"] == 50 and snap["model_version"] == 49 and snap["predicted"] == 9
    assert snap["label"] == 3 and snap["probabilities"] == probs and snap["sensor"] == [128, 96]
    assert snap["queued_frames"] == 3 and snap["lag_s"] == pytest.approx(0.06)  # 3 frames of 20 ms
    assert snap["recent_accuracy"] == pytest.approx(5 / 50) and snap["info"]["steps"] == 50

    live.record([(a, Step(frames[0], None))], [1], [probs], version=50)
    assert live.due_values("p", now=0.05) == []  # within the interval: it waits (and accumulates)
    (_, value, _), *_ = live.due_values("p", now=0.1)
    assert json.loads(value)["frames"] == 1
    assert live.due_values("p", now=5.0) == []  # no step since: nothing to write
    live.watch(set())
    assert live.watched == {}


def test_a_viewer_keeps_one_message_per_kind_however_many_arrive() -> None:
    viewer = Viewer("a")
    for i in range(10_000):
        viewer.offer(LIVE, sse(LIVE, json.dumps({"i": i}).encode()))
        viewer.offer("info", sse("info", json.dumps({"j": i}).encode()))
    assert len(viewer.pending) == 2 and viewer.ready.is_set()
    sent = viewer.take()
    assert sent == sse(LIVE, b'{"i": 9999}') + sse("info", b'{"j": 9999}')
    assert viewer.pending == {} and not viewer.ready.is_set()


def test_many_views_share_a_message_budget_so_their_cost_stays_bounded() -> None:
    hub = LiveHub(LocalBus(), "p", ServiceMetrics())
    assert hub.poll_interval_s() == messages.LIVE_INTERVAL_S  # few views: up to 10 updates/s each
    hub.viewers = 40
    assert hub.poll_interval_s() == pytest.approx(0.1)
    hub.viewers = 100  # 400 messages/s in all: 4 per second for each
    assert hub.poll_interval_s() == pytest.approx(0.25)


# --- API and worker in different processes, over Redis ---------------------------------------------


@pytest.mark.redis
def test_live_view_over_redis_with_api_and_worker_apart(
    redis_url: str, nmnist_small: Path, tmp_path: Path
) -> None:
    import redis

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prefix = f"test-live-{uuid.uuid4().hex[:8]}"
    env = {
        "REDIS_URL": redis_url,
        "NDOT_BUS_STREAM": prefix,
        "NDOT_PORT": str(port),
        "NDOT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
        "NDOT_WORKER_METRICS_PORT": "0",
        "NDOT_MAX_STREAM_SPEED": "0",  # step as fast as frames come: the view must still send <= ~10/s
    }
    samples = nmnist_samples(nmnist_small, 16)
    store = redis.Redis.from_url(redis_url)
    flag, live_value = (
        f"{prefix}:value:{key(prefix, 'cam')}" for key in (messages.viewing_key, messages.live_key)
    )
    api = ServiceProcess("api", env, tmp_path / "api.log").start()
    worker = ServiceProcess("worker", env, tmp_path / "worker.log").start()
    try:
        wait_ready(url, worker)
        assert httpx.get(f"{url}/v1/streams/cam/live").status_code == 401
        with http(url, key=INGEST_KEY) as client:
            post_sample(client, "cam", *samples[0], width=34, height=34)
        done, enough = threading.Event(), threading.Event()

        def stream() -> None:  # until the view has its events: a fast worker is through 15 samples in 1 s
            with http(url, key=INGEST_KEY) as client:
                for events, label in itertools.islice(itertools.cycle(samples[1:]), 300):
                    if enough.is_set():
                        break
                    post_sample(client, "cam", events, label)
            done.set()

        with httpx.stream("GET", f"{url}/v1/streams/cam/live", headers=KEY, timeout=30) as view:
            assert view.status_code == 200 and view.headers["content-type"].startswith("text/event-stream")
            wait_until(lambda: store.get(flag) == b"1", 2, "the viewing flag")
            streamer = threading.Thread(target=stream, daemon=True)
            streamer.start()
            updates = read_events(view, 12)
            enough.set()
            streamer.join(120)
        assert done.is_set()
        span = updates[-1]["at"] - updates[1]["at"]
        assert 10 / span <= 12, f"{len(updates) - 2} updates in {span:.2f} s: over ~10 per second"
        assert all(u["stream_id"] == "cam" and len(u["probabilities"]) == 10 for u in updates)
        assert all(abs(sum(u["probabilities"]) - 1) < 1e-2 for u in updates)
        assert [u["model_version"] for u in updates] == sorted(u["model_version"] for u in updates)
        assert updates[-1]["model_version"] > updates[0]["model_version"]
        assert max(u["frames"] for u in updates) > 1  # faster than 10 steps/s: frames accumulate
        frames = [frame_of(u["frame"]) for u in updates]
        assert all(f.shape == (2, 34, 34) for f in frames) and any(f.any() for f in frames)
        assert updates[-1]["info"]["labelled_steps"] > 0 and updates[-1]["info"]["stream_id"] == "cam"

        # the view closed: its flag lapses, and the worker stops writing the stream's live value
        deadline = time.monotonic() + messages.VIEWING_TTL_S + 5
        while store.exists(flag):
            assert time.monotonic() < deadline, "the viewing flag outlived its view"
            time.sleep(0.2)
        time.sleep(2.5)  # the worker reads the flags at housekeeping, about once a second
        assert store.exists(live_value)
        store.delete(live_value)
        with http(url, key=INGEST_KEY) as client:
            post_sample(client, "cam", *samples[0])
        assert not store.exists(live_value)
    finally:
        worker.stop()
        api.stop()
        store.close()
        clear_redis(redis_url, prefix)


# --- what viewers cost: in-process service (embedded bus, worker beside the API) ---------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, LiveHub, ServerThread]]:
    """A served app with its worker; its live hub made up front so a test can tighten its limits."""
    bus, metrics = LocalBus(), ServiceMetrics()
    settings = Settings(
        redis_url=None,
        bus_stream=f"test-view-{uuid.uuid4().hex[:8]}",
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_interval_s=0,
        window_us=10_000,
        max_stream_speed=0,
        rate_limit_rps=0,
        **AUTH_SETTINGS,
    )
    app = create_app(settings, bus=bus, run_worker=True, metrics=metrics)
    hub = app.state.live_hub = LiveHub(bus, settings.bus_stream, metrics)
    with ServerThread(app) as server:
        try:
            yield server.url, hub, server
        finally:
            close_live_views(app)  # uvicorn waits for open responses before it stops
            time.sleep(0.3)


def keep_streaming(url: str, samples: list, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        with http(url, key=INGEST_KEY) as client:
            i = 0
            while not stop.is_set():
                events, label = samples[i % len(samples)]
                post_sample(client, "cam", events, label, width=34, height=34)
                i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_client_that_stops_reading_is_dropped_with_a_bounded_buffer(served, nmnist_small: Path) -> None:
    url, hub, server = served
    hub.send_timeout_s = 1.0
    stop = threading.Event()
    streamer = keep_streaming(url, nmnist_samples(nmnist_small, 4), stop)
    stalled = socket.socket()
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window that soon closes
        stalled.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        stalled.sendall(
            f"GET /v1/streams/cam/live HTTP/1.1\r\nHost: x\r\nX-API-Key: {INGEST_KEY}\r\n\r\n".encode()
        )
        assert stalled.recv(64).startswith(b"HTTP/1.1 200")  # ... and never reads again
        wait_until(lambda: hub.viewers == 1, 5, "the view to open")
        for connection in server.server.server_state.connections:  # the kernel's buffer for this
            # connection as small as Linux allows (else it grows to tcp_wmem's 4 MiB before the send waits)
            connection.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
        most_pending = 0
        deadline = time.monotonic() + 60
        while hub.viewers:  # the server fills its buffers, its send times out, the view is dropped
            assert time.monotonic() < deadline, "a stalled client was never dropped"
            for channel in list(hub.channels.values()):
                most_pending = max([most_pending, *(len(v.pending) for v in channel.viewers)])
            time.sleep(0.05)
        assert most_pending <= 2  # at most one live and one info message wait, however long it stalls
        with httpx.stream("GET", f"{url}/v1/streams/cam/live", headers=KEY, timeout=30) as view:
            assert read_events(view, 2)  # the others are served as before
    finally:
        stalled.close()
        stop.set()
        streamer.join(60)


def test_vanished_viewers_leave_nothing_and_many_share_one_channel(served, nmnist_small: Path) -> None:
    url, hub, _ = served
    stop = threading.Event()
    streamer = keep_streaming(url, nmnist_samples(nmnist_small, 4), stop)
    hub.max_viewers = 8

    async def watch_together(count: int) -> list[dict]:
        seen: list[dict] = []
        release = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=30) as client:

            async def one() -> None:
                async with client.stream("GET", "/v1/streams/cam/live") as view:
                    assert view.status_code == 200
                    name = None
                    async for line in view.aiter_lines():
                        if line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: ") and name == LIVE:
                            seen.append(json.loads(line[6:]))
                            await release.wait()  # stay connected until every view has had an update
                            return  # ... then hang up without a word

            views = [asyncio.create_task(one()) for _ in range(count)]
            deadline = time.monotonic() + 30
            while len(seen) < count:
                assert time.monotonic() < deadline, f"{len(seen)} of {count} views got an update"
                await asyncio.sleep(0.05)
            assert hub.viewers == count and len(hub.channels) == 1  # one poller for all of them
            full = await client.get("/v1/streams/cam/live")
            assert full.status_code == 503 and "Retry-After" in full.headers and "at most 8" in full.text
            release.set()
            await asyncio.gather(*views)
        return seen

    try:
        seen = asyncio.run(watch_together(8))
        assert all(len(s["probabilities"]) == 10 for s in seen)
        wait_until(lambda: hub.viewers == 0 and not hub.channels, 5, "the views to be freed")
        metrics = httpx.get(f"{url}/metrics").text
        assert "ndot_live_viewers 0.0" in metrics
    finally:
        stop.set()
        streamer.join(60)
