"""Hostile input over real HTTP (uvicorn in a thread, httpx, embedded bus): API keys and roles, the
per-key rate limit, body / events / stream-id limits, checkpoint names that try to leave their
folder, and corrupt or mismatched checkpoints that must leave the running model untouched."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_support import ADMIN_KEY, AUTH_SETTINGS, BINARY, INGEST_KEY, REPO_ROOT, ServerThread, auth, http

from ndot_core.events.layout import WIRE_DTYPE
from service.api.auth import AuthConfigError
from service.app import create_app
from service.bus import LocalBus
from service.settings import Settings
from service.worker.checkpoints import CheckpointStore, encode

MAX_EVENTS = 100


def body(count: int, start_us: int = 0) -> bytes:
    events = np.zeros(count, dtype=WIRE_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = np.arange(count) * 500 + start_us, 3, 4, 1
    return events.tobytes()


def settings_for(tmp: Path, **overrides) -> Settings:
    knobs = {
        **AUTH_SETTINGS,
        "checkpoint_dir": tmp / "ckpt",
        "checkpoint_interval_s": 0,
        "max_events_per_packet": MAX_EVENTS,
        "max_control_body_bytes": 1024,
        "window_us": 10_000,
        **overrides,
    }
    return Settings(redis_url=None, bus_stream=f"test-sec-{uuid.uuid4().hex[:8]}", **knobs)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A served app with its worker, keys on; yields (url, checkpoint dir)."""
    settings = settings_for(tmp_path_factory.mktemp("sec"))
    with ServerThread(create_app(settings, run_worker=True)) as server:
        yield server.url, settings.checkpoint_dir


INGEST_ROUTES = [
    ("POST", "/v1/streams/cam/events"),
    ("PUT", "/v1/streams/cam"),
    ("GET", "/v1/streams"),
    ("GET", "/v1/streams/cam"),
    ("POST", "/v1/streams/cam/reset"),
]
ADMIN_ROUTES = [
    ("DELETE", "/v1/streams/cam"),
    ("POST", "/v1/checkpoints"),
    ("GET", "/v1/checkpoints"),
    ("POST", "/v1/checkpoints/any/restore"),
    ("POST", "/v1/model/reset"),
    ("POST", "/v1/model/export"),
    ("GET", "/v1/cluster"),
]


def test_no_key_or_an_unknown_key_is_401_and_an_ingest_key_on_admin_routes_is_403(service) -> None:
    url, _ = service
    with http(url, key=None) as anonymous:
        for method, path in INGEST_ROUTES + ADMIN_ROUTES:
            answer = anonymous.request(method, path)
            assert answer.status_code == 401, (method, path, answer.text)
            assert (
                answer.headers["www-authenticate"] == "Bearer"
                and "missing API key" in answer.json()["detail"]
            )
            wrong = anonymous.request(method, path, headers=auth(ADMIN_KEY[:-1] + "X"))
            assert wrong.status_code == 401 and wrong.json()["detail"] == "unknown API key"
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):  # open, by design
            assert anonymous.get(path).status_code == 200, path
    with http(url, key=INGEST_KEY) as ingest:
        for method, path in ADMIN_ROUTES:
            answer = ingest.request(method, path)
            assert answer.status_code == 403, (method, path, answer.text)
            assert "needs an admin key" in answer.json()["detail"] and "ingest#0" in answer.json()["detail"]
        assert ingest.put("/v1/streams/cam", json={"width": 34, "height": 34}).status_code == 200
        assert ingest.post("/v1/streams/cam/events", content=body(50), headers=BINARY).status_code == 200
        assert ingest.get("/v1/streams/cam").json()["steps"] == 2
        assert ingest.post("/v1/streams/cam/reset").status_code == 200
    with http(url, key=None) as client:  # the other header, with the admin key: admin routes open
        assert client.get("/v1/streams", headers={"x-api-key": INGEST_KEY}).status_code == 200
        assert client.get("/v1/checkpoints", headers={"x-api-key": ADMIN_KEY}).status_code == 200
        assert client.get("/v1/checkpoints", headers={"x-api-key": INGEST_KEY}).status_code == 403
        metrics = client.get("/metrics").text
    refused = {
        reason: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("ndot_requests_refused_total{")
        for reason in [line.split('"')[1]]
    }
    unauthenticated = 2 * len(INGEST_ROUTES + ADMIN_ROUTES)
    assert refused["unauthenticated"] == unauthenticated and refused["forbidden"] == len(ADMIN_ROUTES) + 1


def test_auth_on_without_keys_refuses_to_start_and_off_says_so(tmp_path: Path, caplog) -> None:
    with pytest.raises(AuthConfigError, match="NDOT_INGEST_KEYS"):
        create_app(settings_for(tmp_path, ingest_keys=None, admin_keys=None))
    with pytest.raises(AuthConfigError, match="fewer than 16"):
        create_app(settings_for(tmp_path, ingest_keys="short", admin_keys=None))
    with pytest.raises(AuthConfigError, match="twice"):
        create_app(settings_for(tmp_path, ingest_keys=ADMIN_KEY))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "NDOT_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "api", "--redis-url", "redis://127.0.0.1:1/0"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "refusing to start: auth is on but no API key" in done.stderr

    settings = settings_for(tmp_path, auth="off", ingest_keys=None, admin_keys=None)
    with caplog.at_level(logging.WARNING, logger="ndot.api"):
        app = create_app(settings, bus=LocalBus(), run_worker=False)
        with ServerThread(app) as server, http(server.url, key=None) as client:
            assert client.get("/v1/streams").status_code == 200
    assert any("auth_disabled" in record.getMessage() for record in caplog.records)


def test_the_rate_limit_is_per_key_and_answers_429_with_retry_after(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, rate_limit_rps=0.5, rate_limit_burst=3)
    app = create_app(settings, bus=LocalBus(), run_worker=False)
    with ServerThread(app) as server, http(server.url, key=INGEST_KEY) as client:
        assert [client.get("/v1/streams").status_code for _ in range(3)] == [200] * 3
        limited = client.get("/v1/streams")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) == 2
        assert "rate limit of 0.5 requests/s (burst 3)" in limited.json()["detail"]
        assert client.get("/v1/streams", headers=auth(ADMIN_KEY)).status_code == 200  # its own bucket
        assert client.get("/healthz").status_code == 200  # ops routes are not limited


def test_body_events_and_stream_id_limits_name_the_limit(service) -> None:
    url, _ = service
    with http(url) as client:
        big = client.put(
            "/v1/streams/lim",
            content=b'{"width": 34, "height": 34' + b" " * 2000 + b"}",
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413 and "limit of 1024 bytes" in big.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
            yield b'{"width": 34,'
            yield b" " * 2000 + b'"height": 34}'

        chunked = client.put(
            "/v1/streams/lim", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413 and "limit of 1024 bytes" in chunked.json()["detail"]
        assert client.put("/v1/streams/lim", json={"width": 34, "height": 34}).status_code == 200
        many = client.post("/v1/streams/lim/events", content=body(MAX_EVENTS + 1), headers=BINARY)
        assert many.status_code == 422 and str(MAX_EVENTS) in many.json()["detail"]
        for bad_id in ("x" * 65, "a%2Fb", "caf%C3%A9", "a%20b"):
            answer = client.post(f"/v1/streams/{bad_id}/events", content=body(5), headers=BINARY)
            assert answer.status_code in (404, 422), (bad_id, answer.text)
            if answer.status_code == 422:
                assert "[A-Za-z0-9_.-]{1,64}" in answer.json()["detail"], answer.json()
        assert (
            client.post(
                f"/v1/streams/{'x' * 64}/events",
                params={"width": 34, "height": 34},
                content=body(5),
                headers=BINARY,
            ).status_code
            == 200
        )


def test_checkpoint_names_cannot_leave_the_checkpoint_folder(service, tmp_path: Path) -> None:
    url, checkpoint_dir = service
    with http(url) as client:
        saved = client.post("/v1/checkpoints").json()["name"]
        outside = checkpoint_dir.parent / "outside.safetensors"  # a valid checkpoint one level up
        outside.write_bytes((checkpoint_dir / f"{saved}.safetensors").read_bytes())
        for name in ("..%2Foutside", "..", ".hidden", "%2E%2E%2Foutside", "a%2F..%2F..%2Foutside", "x" * 129):
            answer = client.post(f"/v1/checkpoints/{name}/restore")
            assert answer.status_code in (404, 422), (name, answer.text)
        assert client.post("/v1/checkpoints/outside/restore").status_code == 404


def test_corrupt_truncated_or_mismatched_checkpoints_are_refused_and_the_model_is_untouched(service) -> None:
    url, checkpoint_dir = service
    store = CheckpointStore(checkpoint_dir)
    with http(url) as client:
        client.post(
            "/v1/streams/ck/events",
            params={"width": 34, "height": 34, "label": 3},
            content=body(50),
            headers=BINARY,
        ).raise_for_status()
        before = client.post("/v1/checkpoints").json()
        data = (checkpoint_dir / f"{before['name']}.safetensors").read_bytes()
        flipped = bytearray(data)
        flipped[-100] ^= 0xFF
        tree = store.load(before["name"])
        first = next(iter(tree["learner"]["model"]))
        tree["learner"]["model"][first] = torch.zeros(3, 3)  # right names, wrong shape
        bad = {
            "truncated": data[: len(data) // 2],
            "flipped": bytes(flipped),
            "empty": b"",
            "not-safetensors": b"\x08" + b"\x00" * 7 + b"{}garbage",
            "wrong-shape": encode(tree),
        }
        for name, content in bad.items():
            (checkpoint_dir / f"{name}.safetensors").write_bytes(content)
            answer = client.post(f"/v1/checkpoints/{name}/restore")
            assert answer.status_code == 422, (name, answer.text)
            assert answer.json()["detail"], name
        assert "checkpoint has torch.float32[3, 3]" in client.post("/v1/checkpoints/wrong-shape/restore").text
        after = client.post("/v1/checkpoints").json()
        assert after["model_version"] == before["model_version"]
    weights_before, weights_after = (
        store.load(before["name"])["learner"],
        store.load(after["name"])["learner"],
    )
    for key, tensor in weights_before["model"].items():
        assert torch.equal(tensor, weights_after["model"][key]), key
