"""Test-then-train over real HTTP (uvicorn in a thread, httpx), on the embedded bus and on Redis: a late
label through ``POST /v1/streams/{id}/label``, a label on the last packet only, the stream info and the
metric, and labels that cannot apply answered 4xx with a reason."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import (
    AUTH_SETTINGS,
    BINARY,
    INGEST_KEY,
    ServerThread,
    clear_redis,
    http,
    nmnist_samples,
    packets,
)

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module", params=["embedded", "redis"])
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    settings = Settings(
        **AUTH_SETTINGS,
        redis_url=url,
        bus_stream=f"test-preq-{uuid.uuid4().hex[:8]}",
        checkpoint_dir=tmp_path_factory.mktemp(request.param) / "ckpt",
        checkpoint_interval_s=0,
        window_us=10_000,
        learn_at="sequence",
    )
    with ServerThread(create_app(settings, run_worker=True)) as server:
        yield server.url
    if url:
        clear_redis(url, settings.bus_stream)


@pytest.fixture(scope="module")
def digits(nmnist_small: Path) -> list[tuple[np.ndarray, int]]:
    return nmnist_samples(nmnist_small, 3)


def stream(
    client: httpx.Client, stream_id: str, events: np.ndarray, label: int | None, last_only: bool = False
):
    """POST a recording as 10 ms packets (start ... end); the reply to its last packet."""
    bodies = packets(events)
    for i, body in enumerate(bodies):
        query = {"start": i == 0, "end": i == len(bodies) - 1, "width": 34, "height": 34}
        if label is not None and (not last_only or i == len(bodies) - 1):
            query["label"] = label
        answer = client.post(f"/v1/streams/{stream_id}/events", params=query, content=body, headers=BINARY)
        assert answer.status_code == 200, answer.text
    return answer.json()


def info_when(client: httpx.Client, stream_id: str, ready, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get(f"/v1/streams/{stream_id}").json()
        if ready(info) or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_a_late_label_is_scored_against_the_prediction_made_before_it(service: str, digits) -> None:
    (events, label), stream_id = digits[0], f"late-{uuid.uuid4().hex[:6]}"
    with http(service, key=INGEST_KEY) as client:
        ended = stream(client, stream_id, events, None)
        waiting = ended["sequence"]
        assert (
            waiting["sequence"] == 1 and waiting["label"] is None and waiting["learning"] == "awaiting_label"
        )
        assert waiting["predicted"] == ended["steps"][-1]["predicted"]
        assert not any(step["learned"] for step in ended["steps"])

        answer = client.post(f"/v1/streams/{stream_id}/label", json={"label": label})
        assert answer.status_code == 200, answer.text
        scored = answer.json()
        assert scored["stream_id"] == stream_id and scored["sequence"] == 1
        assert (scored["predicted"], scored["probabilities"]) == (
            waiting["predicted"],
            waiting["probabilities"],
        )
        assert scored["correct"] == (waiting["predicted"] == label) and scored["learning"] == "queued"

        info = info_when(client, stream_id, lambda i: i["learned_sequences"] == 1)
        assert (info["scored_sequences"], info["learned_sequences"]) == (1, 1)
        assert info["prequential_accuracy"] == float(scored["correct"])
        metrics = client.get("/metrics").text
        assert (
            "ndot_prequential_accuracy " in metrics and 'ndot_sequences_total{outcome="learned"}' in metrics
        )


def test_a_label_on_the_last_packet_only_is_learned_after_the_sequence(service: str, digits) -> None:
    (events, label), stream_id = digits[1], f"last-{uuid.uuid4().hex[:6]}"
    with http(service, key=INGEST_KEY) as client:
        before = client.get("/readyz").json()["model_version"]
        ended = stream(client, stream_id, events, label, last_only=True)
        scored = ended["sequence"]
        assert scored["label"] == label and scored["learning"] == "queued"
        assert scored["model_version"] == before  # predicted by weights that learned nothing of it
        info = info_when(client, stream_id, lambda i: i["learned_sequences"] == 1)
        assert info["learned_sequences"] == 1 and info["prequential_accuracy"] in (0.0, 1.0)


def test_labels_that_cannot_apply_answer_4xx_with_a_reason(service: str, digits) -> None:
    (events, label), stream_id = digits[2], f"bad-{uuid.uuid4().hex[:6]}"
    with http(service, key=INGEST_KEY) as client:
        route = f"/v1/streams/{stream_id}/label"
        assert client.post(route, json={"label": 1}).status_code == 404  # not open
        stream(client, stream_id, events, label)  # sequence 1, labelled on its packets: scored already
        cases = [
            ({"label": 10}, 422, "label 10 outside [0, 10)"),
            ({"label": -1}, 422, "label"),
            ({"label": "3"}, 422, "label"),
            ({"label": 3, "sequence": 0}, 422, "sequence"),
            ({"label": 3, "sequence": "first"}, 422, "sequence"),
            ({}, 422, "label"),
            ({"label": 3, "sequence": 1}, 409, "labelled and scored already"),
            ({"label": 3, "sequence": 7}, 409, "has not begun"),
        ]
        for body, status, text in cases:
            answer = client.post(route, json=body)
            assert answer.status_code == status, (body, answer.text)
            assert text in answer.json()["detail"], (body, answer.text)
        assert (
            client.post(route, content=b"{not json", headers={"content-type": "application/json"}).status_code
            == 400
        )
