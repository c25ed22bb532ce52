"""End to end with real processes and real N-MNIST recordings:

- embedded bus: ``ndot serve`` in a subprocess; labelled recordings give predictions; checkpoint ->
  stop (SIGTERM) -> start -> weights, stream states and predictions identical;
- Redis: ``ndot api`` and ``ndot worker`` as separate processes; one stream's reset leaves the
  other unchanged; packets accepted while the worker is down are applied once it is back, and the
  restarted worker continues exactly where the stopped one left off.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from service_support import (
    BINARY,
    ServiceProcess,
    clear_redis,
    free_port,
    http,
    nmnist_samples,
    packets,
    post_sample,
    wait_ready,
)

from ndot_core.events.framing import StreamFramer
from ndot_core.events.layout import events_from_bytes
from service.worker.checkpoints import CheckpointStore

pytestmark = pytest.mark.slow


def newest(checkpoint_dir: Path) -> dict[str, Any]:
    store = CheckpointStore(checkpoint_dir)
    return store.load(store.list()[-1].name)


def stream_rows(tree: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Each stream's row of the saved network state (row i belongs to the i-th saved stream)."""
    ids = [entry["meta"]["stream_id"] for entry in tree["registry"]["streams"]]
    return {sid: {k: v[i] for k, v in tree["network_state"].items()} for i, sid in enumerate(ids)}


def assert_same_model_and_streams(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert one["model_version"] == other["model_version"]
    for name, tensor in one["learner"]["model"].items():
        assert torch.equal(tensor, other["learner"]["model"][name]), name
    optimizer_state = one["learner"]["optimizer"]["state"]  # momentum (SGD) or moments (Adam)
    assert optimizer_state and optimizer_state.keys() == other["learner"]["optimizer"]["state"].keys()
    for index, state in optimizer_state.items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(other["learner"]["optimizer"]["state"][index][name])
            )
    rows_one, rows_other = stream_rows(one), stream_rows(other)
    assert rows_one.keys() == rows_other.keys()
    for sid, tensors in rows_one.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, rows_other[sid][name]), (sid, name)


def test_embedded_serve_predicts_and_resumes_identically_after_stop_and_start(
    nmnist_small: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "NDOT_PORT": str(port),
        "NDOT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
        "NDOT_WINDOW_US": "10000",
    }
    samples = nmnist_samples(nmnist_small, 4)
    serve = ServiceProcess("serve", env, tmp_path / "serve.log").start()
    try:
        wait_ready(url, serve)
        with http(url) as client:
            for events, label in samples[:3]:
                steps = post_sample(client, "digits", events, label, width=34, height=34)
                assert len(steps) >= 25 and all(s["label"] == label and s["learned"] for s in steps)
                assert all(
                    0 <= s["predicted"] < 10 and abs(sum(s["probabilities"]) - 1) < 1e-4 for s in steps
                )
            assert steps[-1]["model_version"] == len(steps) + steps[0]["model_version"] - 1
            events, label = samples[3]
            bodies = packets(events)
            half = len(bodies) // 2
            for i, content in enumerate(bodies[:half]):  # the 4th recording stops half way ...
                client.post(
                    "/v1/streams/digits/events",
                    params={"label": label, "start": i == 0},
                    content=content,
                    headers=BINARY,
                ).raise_for_status()
            saved = client.post("/v1/checkpoints").json()["name"]
            rest = [
                client.post(
                    "/v1/streams/digits/events",
                    params={"label": label, "end": i == len(bodies) - 1},
                    content=c,
                    headers=BINARY,
                ).json()["steps"]
                for i, c in enumerate(bodies[half:], start=half)
            ]
            before_stop = client.get("/v1/streams/digits").json()
        assert serve.stop() == 0, serve.log_tail()
        at_stop = newest(tmp_path / "ckpt")  # written on SIGTERM

        serve = ServiceProcess("serve", env, tmp_path / "serve.log").start()
        wait_ready(url, serve)
        with http(url) as client:
            assert client.get("/v1/streams/digits").json() == before_stop
            client.post("/v1/checkpoints").raise_for_status()
            assert_same_model_and_streams(at_stop, newest(tmp_path / "ckpt"))
            # ... and continued from the mid-recording checkpoint, the rest predicts exactly as before
            assert client.post(f"/v1/checkpoints/{saved}/restore").status_code == 200
            again = [
                client.post(
                    "/v1/streams/digits/events",
                    params={"label": label, "end": i == len(bodies) - 1},
                    content=c,
                    headers=BINARY,
                ).json()["steps"]
                for i, c in enumerate(bodies[half:], start=half)
            ]
            assert again == rest
    finally:
        serve.stop()


@pytest.mark.redis
def test_api_and_worker_apart_over_redis(redis_url: str, nmnist_small: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stream = f"test-e2e-{uuid.uuid4().hex[:8]}"
    env = {
        "REDIS_URL": redis_url,
        "NDOT_BUS_STREAM": stream,
        "NDOT_PORT": str(port),
        "NDOT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
        "NDOT_WORKER_METRICS_PORT": str(free_port()),
    }
    (events_a, label_a), (events_b, _) = nmnist_samples(nmnist_small, 2)
    api = ServiceProcess("api", env, tmp_path / "api.log").start()
    worker = ServiceProcess("worker", env, tmp_path / "worker.log").start()
    try:
        wait_ready(url, worker)
        with http(url) as client:
            steps = post_sample(client, "a", events_a, label_a, width=34, height=34)
            assert len(steps) >= 25 and steps[-1]["model_version"] > 0
            half_b = packets(events_b)[:10]
            for i, content in enumerate(half_b):
                client.post(
                    "/v1/streams/b/events",
                    params={"start": i == 0, "width": 34, "height": 34},
                    content=content,
                    headers=BINARY,
                ).raise_for_status()
            client.post("/v1/checkpoints").raise_for_status()
            rows_before = stream_rows(newest(tmp_path / "ckpt"))
            info_a = client.get("/v1/streams/a").json()
            assert client.post("/v1/streams/b/reset").status_code == 200
            client.post("/v1/checkpoints").raise_for_status()
            rows_after = stream_rows(newest(tmp_path / "ckpt"))
            for name, tensor in rows_before["a"].items():
                assert torch.equal(tensor, rows_after["a"][name]), name
            assert not any(t.any() for t in rows_after["b"].values())
            assert client.get("/v1/streams/a").json() == info_a

            assert worker.stop() == 0, worker.log_tail()
            at_stop = newest(tmp_path / "ckpt")  # written on SIGTERM
            late = [
                client.post(
                    "/v1/streams/b/events", params={"wait": "false", "label": 7}, content=c, headers=BINARY
                )
                for c in packets(events_b)[10:14]
            ]
            assert [r.status_code for r in late] == [
                202
            ] * 4  # the API takes packets while the worker is away
            worker = ServiceProcess("worker", env, tmp_path / "worker.log").start()
            wait_ready(url, worker)
            last = client.post(
                "/v1/streams/b/events", params={"label": 7}, content=packets(events_b)[14], headers=BINARY
            )
            assert last.status_code == 200, last.text
            # b was reset before: its fresh framer turns the 5 packets into this many frames
            framer = StreamFramer((34, 34), window_us=10_000, output_size=(34, 34))
            expected = sum(len(framer.push(events_from_bytes(c, (34, 34)))) for c in packets(events_b)[10:15])
            assert client.get("/v1/streams/b").json()["labelled_steps"] == expected > 0
            client.post("/v1/checkpoints").raise_for_status()
            resumed = newest(tmp_path / "ckpt")
            assert resumed["model_version"] == at_stop["model_version"] + expected  # each step applied once
            for name, tensor in stream_rows(at_stop)["a"].items():  # a was not touched across the restart
                assert torch.equal(tensor, stream_rows(resumed)["a"][name]), name
    finally:
        worker.stop()
        api.stop()
        clear_redis(redis_url, stream)
