"""Checkpoint files that fail must not stop the service nor change what it answers: an unreadable file in
the folder is skipped, logged and counted (ndot_checkpoint_errors_total{stage}); a failing periodic
checkpoint leaves the packets already applied answered 200 and not dead-lettered; a failed write
leaves no temp file; a failed checkpoint on SIGTERM is one log line and exit code 1, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from service_support import BINARY, REPO_ROOT, ServiceProcess, clear_redis, free_port, http, wait_ready
from test_checkpoint_integrity import first_checkpoint
from test_worker import TWO_FRAMES, post, reply, run, wire

from service.bus import LocalBus
from service.worker.checkpoints import CheckpointStore, encode


def errors(worker: Any, stage: str) -> float:
    return worker.metrics.registry.get_sample_value("ndot_checkpoint_errors_total", {"stage": stage})


def bad_files(folder: Path, good: dict[str, Any]) -> list[str]:
    """Files with valid names and digests but the wrong tree shape, all newer than the good one."""
    newer = good["created"] + 100
    trees = {
        "ckpt-a-list": [1, 2, 3],
        "ckpt-registry-list": {"model_version": 1, "registry": [], "created": newer},
        "ckpt-version-text": {"model_version": "7", "registry": {"streams": []}, "created": newer},
        "ckpt-learner-list": {**good, "learner": [], "created": newer + 1},
        "ckpt-bad-stream": {
            **good,
            "registry": {"streams": [{"meta": {}, "framer": {}}]},
            "created": newer + 2,
        },
    }
    for name, tree in trees.items():
        (folder / f"{name}.safetensors").write_bytes(encode(tree))
    (folder / "ckpt-garbage.safetensors").write_bytes(b"\x00" * 40)
    return list(trees)


def test_unreadable_files_in_the_folder_are_skipped_logged_and_counted_at_start(
    tmp_path: Path, caplog
) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        first, saved = await first_checkpoint(bus, new_worker)
        folder = tmp_path / "ckpt"
        good = CheckpointStore(folder).load(saved)
        names = bad_files(folder, good)
        with caplog.at_level("INFO", logger="ndot.worker"):
            second = await new_worker("w2")  # used to stop here (AttributeError in the listing)
        assert second.restored_from == saved and second.batcher.learner.version == 2
        assert [c["name"] for c in second.checkpoints] == [saved, "ckpt-learner-list", "ckpt-bad-stream"]
        assert errors(second, "list") == 4  # a list, a registry list, a text version, garbage
        assert errors(second, "restore") == 2  # listed, but refused when loaded
        logged = " ".join(r.getMessage() for r in caplog.records if "checkpoint_error" in r.getMessage())
        assert all(name in logged for name in names + ["ckpt-garbage"]), logged
        second.applier.save()  # the next listing does not report the same files again
        assert errors(second, "list") == 4

    run(tmp_path, scenario)


def test_a_failing_periodic_checkpoint_changes_no_answer(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        folder = tmp_path / "ckpt"
        folder.mkdir(exist_ok=True)
        (folder / "ckpt-bad.safetensors").write_bytes(encode({"model_version": 0, "registry": []}))
        first = await post(bus, "a", wire(TWO_FRAMES), label=1)
        await worker.run_once(block_ms=0)  # applied, then checkpointed (every entry) past the bad file
        answer = await reply(bus, first)
        assert answer["ok"] and len(answer["steps"]) == 2, answer
        assert len(worker.checkpoints) == 1 and errors(worker, "list") == 1

        shutil.rmtree(folder)
        folder.write_text("not a folder")  # every write fails from now on
        second = await post(bus, "a", wire([t + 30_000 for t in TWO_FRAMES]), label=1)
        await worker.run_once(block_ms=0)
        answer = await reply(bus, second)
        assert answer["ok"] and len(answer["steps"]) == 3, answer  # 3 windows closed: applied and answered
        assert await bus.dead_letters() == [] and errors(worker, "save") == 1
        assert (
            worker.metrics.registry.get_sample_value("ndot_packets_total", {"outcome": "dead_lettered"}) == 0
        )
        requested = await bus.publish("checkpoint", "*", {})
        await worker.run_once(block_ms=0)
        refused = await reply(bus, requested)
        assert refused["status"] == 500 and "FileExistsError" in refused["detail"], refused
        assert str(tmp_path) not in refused["detail"]  # no server path in an answer
        assert errors(worker, "save") == 3  # the request, then the periodic one after it

    run(tmp_path, scenario, checkpoint_max_entries=1)


def test_a_write_that_fails_half_way_leaves_no_temp_file(tmp_path: Path) -> None:
    """A file size limit (RLIMIT_FSIZE, as a full disk) makes the write itself fail, in a child process."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from service.worker.checkpoints import CheckpointStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = CheckpointStore({str(tmp_path / "ckpt")!r})
        store.directory.mkdir()
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            store.save({{"model_version": 1, "weights": torch.zeros(1 << 20)}})
        except OSError as err:
            print("refused", err.errno)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("refused"), done.stdout + done.stderr
    assert list((tmp_path / "ckpt").iterdir()) == []  # neither the checkpoint nor its temp file


def stop_with_a_broken_folder(service: ServiceProcess, url: str, folder: Path) -> tuple[int, str]:
    with http(url) as client:
        answer = client.post(
            "/v1/streams/cam/events",
            params={"width": 34, "height": 34, "label": 1},
            content=wire(TWO_FRAMES),
            headers=BINARY,
        )
        assert answer.status_code == 200, answer.text
    shutil.rmtree(folder, ignore_errors=True)
    folder.write_text("not a folder")
    code = service.stop()
    return code, service.log_path.read_text(errors="replace")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_failed_checkpoint_on_sigterm_is_one_line_and_exit_code_1(
    command: str, tmp_path: Path, request
) -> None:
    folder = tmp_path / "ckpt"
    env = {
        "NDOT_CHECKPOINT_DIR": str(folder),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
        "NDOT_WORKER_METRICS_PORT": "0",
    }
    processes = []
    if command == "worker":
        redis_url, stream = request.getfixturevalue("redis_url"), f"test-ckf-{uuid.uuid4().hex[:8]}"
        env |= {"REDIS_URL": redis_url, "NDOT_BUS_STREAM": stream}
        api_port = free_port()
        processes.append(ServiceProcess("api", {**env, "NDOT_PORT": str(api_port)}, tmp_path / "api.log"))
    port = api_port if command == "worker" else free_port()
    service = ServiceProcess(command, {**env, "NDOT_PORT": str(port)}, tmp_path / f"{command}.log")
    processes.append(service)
    url = f"http://127.0.0.1:{port}"
    try:
        for process in processes:
            process.start()
        wait_ready(url, processes[0])
        code, log = stop_with_a_broken_folder(service, url, folder)
    finally:
        for process in processes:
            process.stop()
        if command == "worker":
            clear_redis(redis_url, stream)
    failed = [line for line in log.splitlines() if "shutdown_checkpoint_failed" in line]
    assert code == 1, log[-3000:]
    assert len(failed) == 1 and "FileExistsError" in failed[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
