"""Helpers for the service tests: real servers (thread or subprocess), N-MNIST packets, Redis cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from ndot_core.events.layout import events_to_bytes
from ndot_core.events.readers import read_events

REPO_ROOT = Path(__file__).resolve().parent.parent
BINARY = {"content-type": "application/octet-stream"}
#: The API keys every test service runs with (auth is on by default).
INGEST_KEY = "test-ingest-key-0123456789"
ADMIN_KEY = "test-admin-key-0123456789ab"
AUTH_SETTINGS = {"ingest_keys": INGEST_KEY, "admin_keys": ADMIN_KEY}
AUTH_ENV = {"NDOT_INGEST_KEYS": INGEST_KEY, "NDOT_ADMIN_KEYS": ADMIN_KEY}


def auth(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerThread:
    """A real uvicorn server for ``app`` on a free port, in a thread of this process."""

    def __init__(self, app, config: uvicorn.Config | None = None) -> None:
        """``config``: a uvicorn config for ``app`` (its port is replaced by a free one)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if config is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        config.host, config.port = "127.0.0.1", self.port
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class ServiceProcess:
    """``python -m service.cli <command>`` as a subprocess with settings as env vars."""

    def __init__(self, command: str, env: dict[str, str], log_path: Path) -> None:
        self.command, self.log_path = command, log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NDOT_") and k != "REDIS_URL"}
        # 10 ms windows: the tests cut their packets and count their expected frames at 10 ms;
        # learn_at=step: they count per-step learning (test-then-train: tests/test_prequential*.py)
        self.env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO_ROOT),
                "NDOT_WINDOW_US": "10000",
                "NDOT_LEARN_AT": "step",
                **AUTH_ENV,
                **env,
            }
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", self.command],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait: the exit code (the worker checkpoints on the way out)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


def wait_ready(url: str, process: ServiceProcess | None = None, timeout_s: float = 120) -> None:
    """Poll ``/readyz`` until 200 (the worker beats and the model is loaded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.command} exited:\n{process.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready" + (f":\n{process.log_tail()}" if process else ""))


def nmnist_samples(folder: Path, count: int) -> list[tuple[np.ndarray, int]]:
    """The first ``count`` labelled recordings of the N-MNIST subset."""
    lines = (folder / "labels.txt").read_text().splitlines()[1:]
    samples = []
    for line in lines[:count]:
        sample_id, label = line.split()
        events, _ = read_events(folder / "train" / f"{sample_id}.bs2")
        samples.append((events, int(label)))
    return samples


def packets(events: np.ndarray, window_us: int = 10_000) -> list[bytes]:
    """The recording cut into wire bodies of ``window_us`` of camera time each."""
    t = events["t"]
    edges = np.arange(int(t[0]), int(t[-1]) + window_us, window_us)
    cuts = np.searchsorted(t, edges[1:], side="left")
    return [events_to_bytes(part) for part in np.split(events, cuts) if len(part)]


def post_sample(
    client: httpx.Client, stream_id: str, events: np.ndarray, label: int | None, **params: object
) -> list[dict]:
    """POST a whole recording (start ... end) and return every step it produced."""
    bodies = packets(events)
    steps: list[dict] = []
    for i, body in enumerate(bodies):
        query = {"start": i == 0, "end": i == len(bodies) - 1, **params}
        if label is not None:
            query["label"] = label
        answer = client.post(f"/v1/streams/{stream_id}/events", params=query, content=body, headers=BINARY)
        assert answer.status_code == 200, answer.text
        steps += answer.json()["steps"]
    return steps


def stream_in_background(
    url: str, stream_id: str, samples: list, key: str
) -> tuple[threading.Event, threading.Thread]:
    """Post ``samples`` (``(events, label)``) one labelled recording after the other on a daemon thread
    (the first opens the 34x34 stream); set the returned event to stop it between recordings."""
    stop = threading.Event()

    def stream() -> None:
        with http(url, key=key) as client:
            for i, (events, label) in enumerate(samples):
                if stop.is_set():
                    return
                post_sample(
                    client, stream_id, events, label, **({"width": 34, "height": 34} if i == 0 else {})
                )

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    return stop, streamer


def clear_redis(url: str, prefix: str) -> None:
    """Delete every key of one test's bus (its stream name, and its shards' keys)."""
    import redis

    from service.bus.shards import delete_bus_keys

    client = redis.Redis.from_url(url)
    try:
        delete_bus_keys(client, prefix)
    finally:
        client.close()


@contextlib.contextmanager
def http(url: str, timeout_s: float = 30, key: str | None = ADMIN_KEY) -> Iterator[httpx.Client]:
    """An httpx client for ``url`` sending ``key`` (the admin key by default; None = no key)."""
    with httpx.Client(base_url=url, timeout=timeout_s, headers=auth(key) if key else {}) as client:
        yield client
