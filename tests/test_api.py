"""The HTTP API over real HTTP (uvicorn in a thread, httpx), on the embedded bus and on Redis:
bad input answers 4xx with a message while accepted packets are still applied; stream lifecycle;
backpressure 503 + Retry-After; 504 with the packet still applied; readiness, metrics, OpenAPI."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from service_support import AUTH_SETTINGS, BINARY, ServerThread, clear_redis, http

from ndot_core.events.layout import WIRE_DTYPE
from service.app import create_app
from service.bus import LocalBus
from service.settings import Settings
from service.worker.loop import Worker

LIMIT_EVENTS = 2000


def body(t_us: list[int] | np.ndarray, x: int | list[int] = 3, y: int = 4) -> bytes:
    events = np.zeros(len(t_us), dtype=WIRE_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = t_us, x, y, 1
    return events.tobytes()


#: 25 ms of events: closes two 10 ms windows.
TWO_FRAMES = body(np.arange(0, 25_000, 500))


def settings_for(tmp: Path, redis_url: str | None, **overrides) -> Settings:
    # the packets here are cut at 10 ms; the tests count per-step learning (sequence: test_prequential_api.py)
    knobs = {**AUTH_SETTINGS, "window_us": 10_000, "learn_at": "step", **overrides}
    return Settings(
        redis_url=redis_url,
        bus_stream=f"test-api-{uuid.uuid4().hex[:8]}",
        checkpoint_dir=tmp / "ckpt",
        max_body_bytes=13 * LIMIT_EVENTS,
        checkpoint_interval_s=0,
        **knobs,
    )


@pytest.fixture(scope="module", params=["embedded", "redis"])
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A served app with its worker in-process, on the embedded bus or on Redis."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    settings = settings_for(tmp_path_factory.mktemp(request.param), url)
    with ServerThread(create_app(settings, run_worker=True)) as server:
        yield server.url
    if url:
        clear_redis(url, settings.bus_stream)


BAD_INPUTS = [
    # (name, query, body, content type, status, text in the message)
    ("truncated body", {}, TWO_FRAMES[:-1], BINARY, 422, "not a multiple of the 13-byte"),
    ("misaligned body", {}, TWO_FRAMES[1:] + b"\xff", BINARY, 422, "event 0"),
    ("x outside the sensor", {}, body([1, 2], x=[3, 34]), BINARY, 422, "x=34"),
    ("decreasing t", {}, body([5, 4]), BINARY, 422, "t=4 decreases"),
    ("label out of range", {"label": 10}, TWO_FRAMES, BINARY, 422, "label 10 outside [0, 10)"),
    ("negative label", {"label": -1}, TWO_FRAMES, BINARY, 422, "label -1"),
    ("wrong content type", {}, TWO_FRAMES, {"content-type": "text/csv"}, 415, "text/csv"),
    ("body over the limit", {}, body(np.arange(LIMIT_EVENTS + 1)), BINARY, 413, f"{13 * LIMIT_EVENTS} bytes"),
    ("malformed JSON", {}, b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
    (
        "JSON columns of unequal length",
        {},
        json.dumps({"t": [1], "x": [1, 2], "y": [1], "p": [1]}).encode(),
        {"content-type": "application/json"},
        422,
        "differ in length",
    ),
    ("another sensor size", {"width": 64, "height": 64}, TWO_FRAMES, BINARY, 409, "34x34, not 64x64"),
    ("bad boolean", {"start": "maybe"}, TWO_FRAMES, BINARY, 422, "query.start"),
]


def test_bad_input_answers_4xx_with_a_message_and_accepted_packets_are_still_applied(service: str) -> None:
    with http(service) as client:
        assert client.put("/v1/streams/cam", json={"width": 34, "height": 34}).status_code == 200
        accepted = client.post(
            "/v1/streams/cam/events", params={"wait": "false", "label": 1}, content=TWO_FRAMES, headers=BINARY
        )
        assert accepted.status_code == 202 and accepted.json()["packet_id"]
        for name, query, content, headers, status, text in BAD_INPUTS:
            answer = client.post("/v1/streams/cam/events", params=query, content=content, headers=headers)
            assert answer.status_code == status, (name, answer.text)
            assert text in answer.json()["detail"], (name, answer.json())
        unknown = client.post("/v1/streams/nobody/events", content=TWO_FRAMES, headers=BINARY)
        assert unknown.status_code == 404 and "PUT /v1/streams/nobody" in unknown.json()["detail"]
        bad_id = client.post("/v1/streams/no%20spaces/events", content=TWO_FRAMES, headers=BINARY)
        assert bad_id.status_code == 422 and "stream_id" in bad_id.json()["detail"]

        later = [t + 30_000 for t in range(0, 25_000, 500)]
        last = client.post("/v1/streams/cam/events", params={"label": 1}, content=body(later), headers=BINARY)
        assert last.status_code == 200, last.text
        info = client.get("/v1/streams/cam").json()
        # 2 steps of the 202 packet + the window it left open + 2 of the last one: none lost to the bad ones
        assert info["steps"] == 5 and info["labelled_steps"] == 5
        metrics = client.get("/metrics").text
        assert f'ndot_packets_total{{outcome="rejected"}} {float(len(BAD_INPUTS) + 2)}' in metrics


def test_json_columns_and_binary_bodies_give_the_same_predictions(service: str) -> None:
    t = list(range(0, 25_000, 500))
    columns = {"t": t, "x": [3] * len(t), "y": [4] * len(t), "p": [1] * len(t)}
    with http(service) as client:
        as_json = client.post("/v1/streams/json-a/events", params={"width": 34, "height": 34}, json=columns)
        as_binary = client.post(
            "/v1/streams/bin-a/events", params={"width": 34, "height": 34}, content=body(t), headers=BINARY
        )
        assert as_json.status_code == as_binary.status_code == 200
        steps_json, steps_binary = as_json.json()["steps"], as_binary.json()["steps"]
        assert len(steps_json) == 2
        assert [s["probabilities"] for s in steps_json] == [s["probabilities"] for s in steps_binary]


def test_stream_lifecycle_open_list_reset_delete(service: str) -> None:
    with http(service) as client:
        opened = client.put("/v1/streams/life", json={"width": 34, "height": 34})
        assert opened.status_code == 200 and opened.json()["steps"] == 0
        client.post("/v1/streams/life/events", content=TWO_FRAMES, headers=BINARY).raise_for_status()
        listed = {s["stream_id"]: s for s in client.get("/v1/streams").json()["streams"]}
        assert listed["life"]["steps"] == 2 and listed["life"]["last_prediction"] is not None
        assert client.post("/v1/streams/life/reset").json() == {
            "stream_id": "life",
            "action": "reset",
            "ok": True,
        }
        assert client.delete("/v1/streams/life").status_code == 200
        assert client.get("/v1/streams/life").status_code == 404
        assert client.post("/v1/streams/life/events", content=TWO_FRAMES, headers=BINARY).status_code == 404
        assert client.post("/v1/streams/life/reset").status_code == 404
        assert client.post("/v1/checkpoints/..%2Fetc/restore").status_code in (404, 422)
        assert client.post("/v1/checkpoints/nothing-here/restore").status_code == 404


def test_health_readiness_metrics_and_openapi(service: str) -> None:
    with http(service) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["worker"] and ready.json()["model"] == "stream_cnn"
        metrics = client.get("/metrics").text
        for name in (
            "ndot_events_total",
            "ndot_packets_total",
            "ndot_steps_total",
            "ndot_predictions_total",
            "ndot_correct_predictions_total",
            "ndot_online_accuracy",
            "ndot_active_streams",
            "ndot_streams_evicted_total",
            "ndot_late_events_total",
            "ndot_bus_lag",
            "ndot_device_memory_bytes",
            "ndot_model_version",
            "ndot_step_duration_seconds_bucket",
            "ndot_prediction_latency_seconds_bucket",
            "process_resident_memory_bytes",
        ):
            assert f"\n{name}" in metrics, name
        assert 'le="0.0001"' in metrics  # sub-ms buckets
        spec = client.get("/openapi.json").json()
        post = spec["paths"]["/v1/streams/{stream_id}/events"]["post"]
        content = post["requestBody"]["content"]
        assert set(content) == {"application/octet-stream", "application/json"}
        assert content["application/json"]["example"]["t"]
        assert {"200", "202", "413", "415", "422", "503", "504"} <= set(post["responses"])
        assert {"/v1/checkpoints", "/v1/model/reset", "/readyz", "/metrics"} <= set(spec["paths"])


def test_checkpoint_restore_and_model_reset_over_http(service: str) -> None:
    with http(service) as client:
        client.post(
            "/v1/streams/ck/events",
            params={"width": 34, "height": 34, "label": 4, "start": True},
            content=TWO_FRAMES,
            headers=BINARY,
        ).raise_for_status()
        saved = client.post("/v1/checkpoints").json()
        assert saved["model_version"] > 0 and saved["streams"] >= 1
        assert saved["name"] in [c["name"] for c in client.get("/v1/checkpoints").json()["checkpoints"]]
        reset = client.post("/v1/model/reset").json()
        assert reset == {"model": "stream_cnn", "model_version": 0}
        restored = client.post(f"/v1/checkpoints/{saved['name']}/restore")
        assert restored.status_code == 200 and restored.json()["model_version"] == saved["model_version"]
        assert client.get("/readyz").json()["model_version"] == saved["model_version"]


def test_backpressure_answers_503_with_retry_after_and_a_late_reply_504(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, None, request_timeout_s=0.3)
    app = create_app(settings, bus=LocalBus(max_lag=2), run_worker=False)  # nobody consumes
    with ServerThread(app) as server, http(server.url) as client:
        late = client.post(
            "/v1/streams/bp/events", params={"width": 34, "height": 34}, content=TWO_FRAMES, headers=BINARY
        )
        assert late.status_code == 504 and "will be applied" in late.json()["detail"]
        assert (
            client.post(
                "/v1/streams/bp/events", params={"wait": "false"}, content=TWO_FRAMES, headers=BINARY
            ).status_code
            == 202
        )
        full = client.post(
            "/v1/streams/bp/events", params={"wait": "false"}, content=TWO_FRAMES, headers=BINARY
        )
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert "max_lag=2" in full.json()["detail"]
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and "no worker heartbeat" in not_ready.json()["reasons"]
        assert 'ndot_packets_total{outcome="throttled"} 1.0' in client.get("/metrics").text


@pytest.mark.redis
def test_a_packet_that_timed_out_is_still_applied_by_a_worker_started_later(
    redis_url: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, redis_url, request_timeout_s=0.3)
    try:
        with ServerThread(create_app(settings, run_worker=False)) as server, http(server.url) as client:
            late = client.post(
                "/v1/streams/late/events",
                params={"width": 34, "height": 34, "label": 2},
                content=TWO_FRAMES,
                headers=BINARY,
            )
            assert late.status_code == 504
            packet_id = late.json()["detail"].split("entry ")[1].split(" ")[0]

            async def consume() -> dict:
                from service.bus import make_bus

                bus = make_bus(settings)
                await bus.start()
                try:
                    worker = Worker(settings, bus, consumer="late-worker")
                    await worker.start()
                    await worker.run_once(block_ms=100)
                    return json.loads(await bus.wait_reply(packet_id, 5))
                finally:
                    await bus.close()

            answer = asyncio.run(consume())
            assert answer["ok"] and len(answer["steps"]) == 2 and answer["steps"][0]["label"] == 2
            deadline = time.monotonic() + 5
            while client.get("/v1/streams/late").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/v1/streams/late").json()["steps"] == 2
    finally:
        clear_redis(redis_url, settings.bus_stream)
