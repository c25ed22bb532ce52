"""Hostile bodies over real HTTP (uvicorn in a thread, httpx, embedded bus): any body gets a 4xx with a
clear message and never a 500 or a reset connection; a refused first packet leaves no stream behind;
answers carry no server path and no connection URL; a client that hangs up mid-upload is one INFO line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from service_support import AUTH_SETTINGS, BINARY, ServerThread, free_port, http

from ndot_core.events.layout import WIRE_DTYPE
from service.app import create_app
from service.bus import LocalBus, messages
from service.settings import Settings

JSON = {"content-type": "application/json"}
SECRET = "s3cret-Pa55word-of-redis"
DEEP = 30_000  # brackets: past Python's recursion limit, within the 64 KiB of a control body


def settings_for(tmp: Path, **overrides) -> Settings:
    knobs = {**AUTH_SETTINGS, "checkpoint_dir": tmp / "ckpt", "checkpoint_interval_s": 0, "window_us": 10_000}
    knobs = {"redis_url": None, "bus_stream": f"test-hostile-{uuid.uuid4().hex[:8]}", **knobs, **overrides}
    return Settings(**knobs)


def wire(count: int) -> bytes:
    events = np.zeros(count, dtype=WIRE_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = np.arange(count) * 500, 3, 4, 1
    return events.tobytes()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    settings = settings_for(tmp_path_factory.mktemp("hostile"))
    with ServerThread(create_app(settings, run_worker=True)) as server:
        yield server.url, settings.checkpoint_dir


def columns(t: object, x: object = None, y: object = None, p: object = None) -> dict[str, object]:
    return {"t": t, "x": t if x is None else x, "y": t if y is None else y, "p": t if p is None else p}


HOSTILE_JSON = {
    "scalar columns": (columns(5), 422, "must be a list of integers"),
    "null columns": (columns(None), 422, "must be a list of integers"),
    "string columns": (columns("abcd"), 422, "must be a list of integers"),
    "object columns": (columns({"a": 1}), 422, "must be a list of integers"),
    "nested column": (columns([[1], [2]], [1, 2], [1, 2], [1, 1]), 422, "must be a flat list"),
    "a list body": ([1, 2, 3], 422, "JSON body must be an object"),
    "a null body": (None, 422, "JSON body must be an object"),
    "boolean t": (columns([True, False], [1, 2], [1, 2], [1, 1]), 422, "t=True is a boolean"),
    "boolean x": (columns([1, 2], [1, True], [1, 2], [1, 1]), 422, "x=True is a boolean"),
    "boolean y": (columns([1, 2], [1, 2], [False, 1], [1, 1]), 422, "y=False is a boolean"),
}
HOSTILE_RAW = {
    "deep nesting": (b'{"t": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400, "nested too deeply"),
    "deep inside a column": (
        b'{"x": [1], "y": [1], "p": [1], "t": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}",
        422,
        "must be a flat list",
    ),
    "an integer of 5000 digits": (
        b'{"t": [' + b"9" * 5000 + b'], "x": [1], "y": [1], "p": [1]}',
        400,
        "JSON",
    ),
    "not UTF-8": (b'{"t": [1], "x": ["\xff\xfe"]}', 400, "not valid JSON"),
    "truncated": (b'{"t": [1, 2', 400, "not valid JSON"),
}


def test_any_json_body_gets_a_4xx_with_a_message_and_the_connection_survives(service) -> None:
    url, _ = service
    bodies = {name: (json.dumps(doc).encode(), *rest) for name, (doc, *rest) in HOSTILE_JSON.items()}
    with http(url) as client:
        assert client.put("/v1/streams/cam", json={"width": 34, "height": 34}).status_code == 200
        for name, (content, status, text) in {**bodies, **HOSTILE_RAW}.items():
            answer = client.post("/v1/streams/cam/events", content=content, headers=JSON)
            assert answer.status_code == status, (name, answer.status_code, answer.text[:300])
            assert text in answer.json()["detail"], (name, answer.json())
        good = {"t": [0, 5000, 25000], "x": [3, 4, 5], "y": [9, 9, 9], "p": [True, False, 1]}  # p may be bool
        assert client.post("/v1/streams/cam/events", json=good).status_code == 200  # same connection
        metrics = client.get("/metrics").text
    rejected = float(metrics.split('ndot_packets_total{outcome="rejected"} ')[1].split()[0])
    assert rejected >= len(bodies) + len(HOSTILE_RAW)


def test_malformed_json_on_put_is_400_and_booleans_are_no_sensor_size(service) -> None:
    url, _ = service
    with http(url) as client:
        for document in (b'{"width": 34,', b"[" * DEEP, b'{"width": "\xff"}'):
            answer = client.put("/v1/streams/put-bad", content=document, headers=JSON)
            assert answer.status_code == 400, (document[:20], answer.text)
            assert "body is not valid JSON" in answer.json()["detail"], answer.json()
        boolean = client.put("/v1/streams/put-bad", json={"width": True, "height": 34})
        assert boolean.status_code == 422 and "body.width" in boolean.json()["detail"], boolean.text
        assert client.get("/v1/streams/put-bad").status_code == 404


def test_a_refused_first_packet_leaves_no_stream_behind(service) -> None:
    url, _ = service
    with http(url) as client:
        for i, (content, headers) in enumerate(
            [(b'{"t": 5}', JSON), (b"\x00" * 14, BINARY), (wire(3)[::-1], BINARY), (b"[" * DEEP, JSON)]
        ):
            stream = f"ghost-{i}"
            first = client.post(
                f"/v1/streams/{stream}/events",
                params={"width": 34, "height": 34},
                content=content,
                headers=headers,
            )
            assert 400 <= first.status_code < 500, first.text
            assert client.get(f"/v1/streams/{stream}").status_code == 404
            again = client.post(f"/v1/streams/{stream}/events", content=wire(3), headers=BINARY)
            assert again.status_code == 404, again.text  # never opened
            reopened = client.put(f"/v1/streams/{stream}", json={"width": 20, "height": 20})
            assert reopened.status_code == 200, reopened.text  # another size: no 409 from a ghost


def test_a_packet_refused_by_backpressure_opens_no_stream(tmp_path: Path) -> None:
    bus = LocalBus(max_lag=1)
    settings = settings_for(tmp_path)
    with ServerThread(create_app(settings, bus=bus, run_worker=False)) as server, http(server.url) as client:
        params = {"width": 34, "height": 34, "wait": False}
        assert (
            client.post("/v1/streams/a/events", params=params, content=wire(3), headers=BINARY).status_code
            == 202
        )
        full = client.post("/v1/streams/b/events", params=params, content=wire(3), headers=BINARY)
        assert full.status_code == 503
        known = asyncio.run(bus.get_value(messages.sensor_key(settings.bus_stream, "a")))
        ghost = asyncio.run(bus.get_value(messages.sensor_key(settings.bus_stream, "b")))
    assert known == b"34x34" and ghost is None


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own, with a password; yields (URL with the password, process)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", SECRET]
    args += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=SECRET, socket_connect_timeout=0.2)
    try:
        for _ in range(100):
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        yield f"redis://:{SECRET}@127.0.0.1:{port}/0", process
    finally:
        client.close()
        process.kill()
        process.wait()


def test_answers_carry_no_server_path_and_no_connection_url(
    service, tmp_path: Path, redis_with_password
) -> None:
    url, checkpoint_dir = service
    with http(url) as client:
        missing = client.post("/v1/checkpoints/nothere/restore")
        assert missing.status_code == 404 and "nothere" in missing.json()["detail"]
        assert str(checkpoint_dir.parent) not in missing.text and "/tmp" not in missing.text
    redis_url, redis_server = redis_with_password
    settings = settings_for(tmp_path, redis_url=redis_url)
    with ServerThread(create_app(settings, run_worker=False)) as server, http(server.url) as client:
        redis_server.kill()  # Redis goes away under the running API
        redis_server.wait()
        params = {"width": 34, "height": 34}
        down = client.post("/v1/streams/a/events", params=params, content=wire(3), headers=BINARY)
        assert down.status_code == 503 and down.headers["retry-after"] == "1", down.text
        assert "bus unavailable" in down.json()["detail"]
        port = redis_url.rsplit(":", 1)[1].split("/")[0]
        for leak in (SECRET, "127.0.0.1", port, "redis"):
            assert leak not in down.text, down.text


def test_a_client_hanging_up_mid_upload_is_one_info_line(service, caplog) -> None:
    url, _ = service
    host, port = url.removeprefix("http://").split(":")
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /v1/streams/cam/events HTTP/1.1\r\nHost: x\r\n"
                    + f"Authorization: Bearer {AUTH_SETTINGS['admin_keys']}\r\n".encode()
                    + b"Content-Type: application/octet-stream\r\nContent-Length: 130000\r\n\r\n"
                    + wire(100)
                )
                time.sleep(0.3)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(
                "client_disconnected" in r.getMessage() for r in caplog.records
            ):
                time.sleep(0.05)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    lines = [r for r in caplog.records if "client_disconnected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]
