"""Run ``ndot serve`` as a background process: start on a free port, wait for ``/readyz``, stop cleanly.

Used by ``make demo`` and the client's end-to-end tests. The service gets its own process group
(so a Ctrl-C in the terminal reaches only the caller, which then stops it): ``stop()`` sends
SIGTERM (the worker checkpoints and exits), waits, and kills the group if it does not exit in time.
Settings go in as ``NDOT_*`` environment variables (service/settings.py); ``REDIS_URL`` is removed
unless given, so the embedded bus is used.

Auth: ``auth=True`` generates a random ingest key and admin key for this service alone
(``.ingest_key``, ``.admin_key``, ``.headers(admin=...)``); ``auth=False`` (the default, for tests
and benchmarks on loopback) starts it with ``NDOT_AUTH=off`` and is refused on any other address.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

#: Exit codes of a clean stop: uvicorn finishes its shutdown, then re-raises the SIGTERM it caught.
CLEAN_EXIT_CODES = (0, -signal.SIGTERM)


class ServiceStartError(RuntimeError):
    """The service exited or did not become ready in time (message holds its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class LocalService:
    """``python -m service.cli serve`` in the background; use as a context manager or start()/stop()."""

    def __init__(
        self,
        checkpoint_dir: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        command: tuple[str, ...] = ("serve",),
        auth: bool = False,
    ) -> None:
        if not auth and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"auth=False only on a loopback address, not {host!r}")
        self.host = host
        self.auth = auth
        self.ingest_key = secrets.token_urlsafe(32) if auth else None
        self.admin_key = secrets.token_urlsafe(32) if auth else None
        self.port = port or free_port(host)
        self._tempdir = tempfile.TemporaryDirectory(prefix="ndot-service-")
        self.checkpoint_dir = checkpoint_dir or Path(self._tempdir.name) / "checkpoints"
        self.log_path = log_path or Path(self._tempdir.name) / "service.log"
        self.command = command
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self.killed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def headers(self, admin: bool = False) -> dict[str, str]:
        """``Authorization`` with this service's ingest (or admin) key; empty when auth is off."""
        key = self.admin_key if admin else self.ingest_key
        return {"authorization": f"Bearer {key}"} if key else {}

    def _auth_env(self) -> dict[str, str]:
        if not self.auth:
            return {"NDOT_AUTH": "off"}
        return {"NDOT_AUTH": "on", "NDOT_INGEST_KEYS": self.ingest_key, "NDOT_ADMIN_KEYS": self.admin_key}

    def start(self, ready_timeout_s: float = 180.0) -> str:
        """Start the process and wait until ``/readyz`` answers 200; return the base URL."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("REDIS_URL", "NDOT_REDIS_URL", "NDOT_AUTH", "NDOT_INGEST_KEYS", "NDOT_ADMIN_KEYS")
        }
        env.update(self._auth_env())
        env.update(
            {
                "NDOT_HOST": self.host,
                "NDOT_PORT": str(self.port),
                "NDOT_CHECKPOINT_DIR": str(self.checkpoint_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", *self.command],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + ready_timeout_s
        last_answer = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceStartError(
                    f"ndot serve exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2.0)
                if response.status_code == 200:
                    return self.url
                last_answer = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as error:
                last_answer = f"{type(error).__name__}"
            time.sleep(0.2)
        self.stop()
        raise ServiceStartError(
            f"ndot serve not ready after {ready_timeout_s:.0f} s ({last_answer}):\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL the process group; the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                self.killed = True
                process.wait()
        return process.returncode

    @property
    def stopped_cleanly(self) -> bool:
        """It exited by itself or after SIGTERM, without being killed."""
        return self.process is not None and not self.killed and self.process.returncode in CLEAN_EXIT_CODES

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        self._tempdir.cleanup()

    def __enter__(self) -> LocalService:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
