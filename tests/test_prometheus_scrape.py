"""The real Prometheus server (Debian package `prometheus`) scraping a running `ndot serve` every
second while N-MNIST recordings stream in: through Prometheus' HTTP API, the online accuracy, the
steps per second and the process memory arrive with sane values, and the alert rules of
deploy/prometheus/alerts.yml load and evaluate without error (none of them firing on a healthy
service). Skips with a reason where the prometheus binary is not installed (.ci/run installs it)."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from service_support import (
    INGEST_KEY,
    ServiceProcess,
    free_port,
    nmnist_samples,
    stream_in_background,
    wait_ready,
)

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy/prometheus/alerts.yml"
JOB = "ndot-serve"


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; .ci/run installs it)")
    return path


@pytest.fixture
def served(tmp_path: Path, nmnist_small: Path) -> Iterator[str]:
    port = free_port()
    env = {
        "NDOT_PORT": str(port),
        "NDOT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
        "NDOT_RESTORE_ON_START": "false",
    }
    serve = ServiceProcess("serve", env, tmp_path / "serve.log").start()
    try:
        wait_ready(f"http://127.0.0.1:{port}", serve)
        yield f"127.0.0.1:{port}"
    finally:
        serve.stop()


@pytest.fixture
def prometheus(prometheus_binary: str, served: str, tmp_path: Path) -> Iterator[httpx.Client]:
    """Prometheus on a free port, scraping ``served`` every second, with the service's alert rules."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [served]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if client.get("/-/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield client
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def query(client: httpx.Client, promql: str) -> list[float]:
    answer = client.get("/api/v1/query", params={"query": promql}).json()
    assert answer["status"] == "success", answer
    return [float(item["value"][1]) for item in answer["data"]["result"]]


def test_prometheus_scrapes_accuracy_steps_and_memory(
    prometheus: httpx.Client, served: str, nmnist_small: Path
) -> None:
    samples = nmnist_samples(nmnist_small, 200)  # streams on (until stopped) while the scrapes look
    stop, streamer = stream_in_background(f"http://{served}", "digits", samples, INGEST_KEY)
    try:
        deadline = time.monotonic() + 60
        while True:  # until a few scrapes saw the learning
            steps_per_s = query(prometheus, f'sum(rate(ndot_steps_total{{job="{JOB}"}}[5s]))')
            learned = query(prometheus, f'ndot_steps_total{{job="{JOB}", kind="learn"}}')
            if steps_per_s and steps_per_s[0] > 0 and learned and learned[0] > 0:
                break
            assert time.monotonic() < deadline, f"no steps seen: rate {steps_per_s}, learned {learned}"
            time.sleep(0.5)
        assert 1 <= steps_per_s[0] < 100_000  # the service stepped at most twice the cameras' pace
        (accuracy,) = query(prometheus, f'ndot_online_accuracy{{job="{JOB}"}}')
        assert 0.0 <= accuracy <= 1.0
        (prequential,) = query(prometheus, f'ndot_prequential_accuracy{{job="{JOB}"}}')
        assert math.isnan(prequential) or 0.0 <= prequential <= 1.0  # NaN until a sequence is scored
        (rss,) = query(prometheus, f'process_resident_memory_bytes{{job="{JOB}"}}')
        assert 50 * 2**20 < rss < 16 * 2**30  # torch and a model: tens of MiB at least, not tens of GiB
        (up,) = query(prometheus, f'up{{job="{JOB}"}}')
        assert up == 1.0
        (age,) = query(prometheus, f'time() - ndot_worker_heartbeat_timestamp_seconds{{job="{JOB}"}}')
        assert -5 < age < 10

        groups = prometheus.get("/api/v1/rules").json()["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        expected = {
            rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
        }
        assert set(rules) == expected and all(rule["health"] == "ok" for rule in rules.values()), rules
        active = [a for a in prometheus.get("/api/v1/alerts").json()["data"]["alerts"]]
        assert not active, active  # a healthy service raises no alert (not even pending)
    finally:
        stop.set()
        streamer.join(60)
