"""A crash in native code tells where it happened: ``ndot`` turns ``faulthandler`` on (``service/cli.py``)."""

from __future__ import annotations

import signal
from pathlib import Path

from service_support import ServiceProcess, free_port, wait_ready


def test_a_native_crash_prints_every_threads_python_stack(tmp_path: Path) -> None:
    """SIGABRT, as an abort in torch or gloo raises it, in a running ``ndot serve``: the log holds the
    Python stack of each thread (the main thread in the CLI), not only the signal's exit code."""
    port = free_port()
    env = {
        "NDOT_PORT": str(port),
        "NDOT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "NDOT_WORKER_METRICS_PORT": "0",
        "PYTHONFAULTHANDLER": "",  # (the service's own doing, not the environment's)
    }
    service = ServiceProcess("serve", env, tmp_path / "serve.log").start()
    try:
        wait_ready(f"http://127.0.0.1:{port}", service)
        assert service.process is not None
        service.process.send_signal(signal.SIGABRT)
        assert service.process.wait(30) == -signal.SIGABRT
    finally:
        service.stop()
    log = service.log_path.read_text(errors="replace")
    assert "Fatal Python error: Aborted" in log, service.log_tail()
    assert "(most recent call first)" in log and "service/cli.py" in log, service.log_tail()
