"""Checkpoint integrity: the digest covers the whole file (tree included), every field of the tree is
checked before anything is swapped in, a watermark beyond the bus's newest id skips nothing, and every
skip is logged and counted (ndot_entries_skipped_total)."""

from __future__ import annotations

import asyncio
import copy
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_worker import TWO_FRAMES, post, reply, run, wire

from service.bus import Bus, LocalBus, RedisStreamBus, messages
from service.settings import Settings
from service.worker.checkpoints import CheckpointError, CheckpointStore, encode
from service.worker.loop import Worker


async def first_checkpoint(bus: LocalBus, new_worker) -> tuple[Worker, str]:
    """A worker that learned one labelled packet of stream "a", and the name of the checkpoint it saved."""
    first = await new_worker("w1")
    await post(bus, "a", wire(TWO_FRAMES), label=1)
    await first.run_once(block_ms=0)
    return first, first.applier.save()["name"]


def restore_errors(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value("ndot_checkpoint_errors_total", {"stage": "restore"})


def flip_digit(data: bytes, text: str) -> bytes:
    """``data`` with the last digit of the first occurrence of ``text`` changed (same length)."""
    at = data.index(text.encode())
    digits = [m.start() for m in re.finditer(rb"\d", text.encode())]
    where = at + digits[-1]
    return data[:where] + bytes([ord("0") + (data[where] - ord("0") + 1) % 10]) + data[where + 1 :]


def test_one_flipped_digit_anywhere_in_the_tree_is_refused(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        first, saved = await first_checkpoint(bus, new_worker)
        store = CheckpointStore(tmp_path / "ckpt")
        data = store.path(saved).read_bytes()
        watermark = first.last_entry_id
        for name, field in [
            ("watermark", watermark),
            ("steps", '\\"steps\\": 2'),
            ("clock", '\\"clock_us\\": '),
        ]:
            if name == "clock":
                field = data[data.index(field.encode()) :].split(b",")[0].decode()
            store.path(f"ckpt-{name}").write_bytes(flip_digit(data, field))
            with pytest.raises(CheckpointError, match="does not match its SHA-256"):
                store.load(f"ckpt-{name}")
        store.path(saved).write_bytes(flip_digit(data, watermark))  # the newest one, altered
        second = await new_worker("w2")
        assert second.restored_from is None and second.batcher.learner.version == 0  # nothing usable
        assert restore_errors(second) == 4

    run(tmp_path, scenario)


def step(node: Any, part: str) -> Any:
    return node[int(part)] if isinstance(node, list) else node[part]


def get(tree: Any, path: str) -> Any:
    for part in path.split("."):
        tree = step(tree, part)
    return tree


def tampered(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``tree`` with the field at ``path`` (dotted; list indices as numbers) set to ``value``."""
    tree = copy.deepcopy(tree)
    parent, _, last = path.rpartition(".")
    node = get(tree, parent) if parent else tree
    node[int(last) if isinstance(node, list) else last] = value
    return tree


STREAM = "registry.streams.0"
TAMPERINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "last_entry_id": ("last_entry_id", lambda v: "12x"),
    "model_version": ("model_version", lambda v: True),
    "learner.version": ("learner.version", lambda v: v + 1),
    "steps": (f"{STREAM}.meta.steps", lambda v: -1),
    "correct_steps": (f"{STREAM}.meta.correct_steps", lambda v: 99),
    "last_prediction": (f"{STREAM}.meta.last_prediction", lambda v: 10),
    "stream last_entry_id": (f"{STREAM}.meta.last_entry_id", lambda v: "99999999999999-0"),
    "stream_id": (f"{STREAM}.meta.stream_id", lambda v: 7),
    "sensor_width": (f"{STREAM}.framer.sensor_width", lambda v: v + 1),
    "window_us": (f"{STREAM}.framer.window_us", lambda v: 0),
    "pending_index": (f"{STREAM}.framer.pending_index", lambda v: np.zeros(3, dtype=np.float64)),
    "lr": ("learner.optimizer.param_groups.0.lr", lambda v: -1.0),
    "betas": ("learner.optimizer.param_groups.0.betas", lambda v: "fast"),
    "params": ("learner.optimizer.param_groups.0.params", lambda v: v[:-1]),
    "optimizer state": ("learner.optimizer.state", lambda v: {999: {"step": torch.tensor(1.0)}}),
    "rng": ("rng.cpu", lambda v: torch.zeros(7, dtype=torch.uint8)),
}


def test_every_field_of_the_tree_is_checked_and_the_running_model_stays_untouched(tmp_path: Path) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker("w1")
        await post(bus, "a", wire(TWO_FRAMES), label=1)
        await worker.run_once(block_ms=0)
        store = CheckpointStore(tmp_path / "ckpt")
        tree = store.load(worker.applier.save()["name"])
        weights = {k: v.clone() for k, v in worker.batcher.learner.model.state_dict().items()}
        version = worker.batcher.learner.version
        for case, (path, change) in TAMPERINGS.items():
            name = f"ckpt-{case.replace(' ', '-')}"
            store.path(name).write_bytes(encode(tampered(tree, path, change(get(tree, path)))))
            entry_id = await bus.publish(messages.RESTORE, messages.MODEL_STREAM, {"name": name.encode()})
            await worker.run_once(block_ms=0)
            answer = await reply(bus, entry_id)
            assert answer["status"] == 422, (case, answer)
            field = path.rsplit(".", 1)[0] if case in ("optimizer state",) else path
            assert field.split(".")[-1] in answer["detail"], (case, answer["detail"])
        assert worker.batcher.learner.version == version and "a" in worker.batcher.registry
        for key, tensor in worker.batcher.learner.model.state_dict().items():
            assert torch.equal(tensor, weights[key]), key
        assert restore_errors(worker) == len(TAMPERINGS)

    run(tmp_path, scenario)


async def started_worker(settings: Settings, bus: Bus, consumer: str) -> Worker:
    await bus.start()
    worker = Worker(settings, bus, consumer=consumer)
    await worker.start()
    return worker


def test_a_local_bus_whose_clock_stepped_back_skips_nothing(tmp_path: Path) -> None:
    """Yesterday's run checkpointed with a wall clock an hour ahead; today's ids are all below its watermark."""
    settings = Settings(
        redis_url=None,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_interval_s=0,
        read_block_ms=1,
        window_us=10_000,
    )

    async def main() -> None:
        ahead = LocalBus(clock_ms=lambda: time.time_ns() // 1_000_000 + 3_600_000)
        first = await started_worker(settings, ahead, "w1")
        await post(ahead, "a", wire(TWO_FRAMES), label=1)
        await first.run_once(block_ms=0)
        first.applier.save()
        await ahead.close()

        bus = LocalBus()  # the clock is right again: its ids are an hour below the watermark
        second = await started_worker(settings, bus, "w2")
        assert second.restored_from is not None and second.last_entry_id is None
        entry_id = await post(bus, "a", wire([t + 30_000 for t in TWO_FRAMES]), label=1)
        await second.run_once(block_ms=0)
        answer = await reply(bus, entry_id)
        assert len(answer["steps"]) == 3 and not answer.get("skipped"), answer
        assert second.metrics.registry.get_sample_value("ndot_entries_skipped_total") == 0
        await bus.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_watermark_beyond_the_bus_newest_id_skips_nothing(
    kind: str, tmp_path: Path, request, caplog
) -> None:
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    stream = f"ndot-test:{uuid.uuid4().hex}"
    settings = Settings(
        redis_url=url,
        bus_stream=stream,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_interval_s=0,
        read_block_ms=1,
        window_us=10_000,
    )

    def new_bus() -> Bus:
        return LocalBus() if url is None else RedisStreamBus(url, stream=stream)

    async def main() -> None:
        bus = new_bus()
        first = await started_worker(settings, bus, "w1")
        await post(bus, "a", wire(TWO_FRAMES), label=1)
        await first.run_once(block_ms=0)
        store = CheckpointStore(tmp_path / "ckpt")
        tree = store.load(first.applier.save()["name"])
        store.path("ckpt-future").write_bytes(
            encode({**tree, "last_entry_id": "99999999999999-0", "created": time.time() + 1})
        )
        await bus.close()

        bus = new_bus()
        with caplog.at_level("INFO", logger="ndot.worker"):
            second = await started_worker(settings, bus, "w2")
        assert second.restored_from == "ckpt-future" and second.last_entry_id is None
        assert any("watermark_beyond_bus" in r.getMessage() for r in caplog.records)
        entry_id = await post(bus, "a", wire([t + 30_000 for t in TWO_FRAMES]), label=1)
        await second.run_once(block_ms=0)
        answer = await reply(bus, entry_id)
        assert len(answer["steps"]) == 3 and not answer.get("skipped"), answer
        await bus.close()

    try:
        asyncio.run(main())
    finally:
        if url is not None:
            from service_support import clear_redis

            clear_redis(url, stream)


def test_a_skip_is_logged_and_counted(tmp_path: Path, caplog) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        first = await new_worker("w1")
        entry_id = await post(bus, "a", wire(TWO_FRAMES), label=1)
        first.applier.apply(await bus.read("w1", 10, 0), housekeeping=False)
        first.applier.save()  # then the process dies before its reply and ack
        second = await new_worker("w2")
        with caplog.at_level("INFO", logger="ndot.worker"):
            await second._claim_and_apply(min_idle_ms=0)
        assert (await reply(bus, entry_id))["skipped"]
        assert second.metrics.registry.get_sample_value("ndot_entries_skipped_total") == 1
        lines = [r.getMessage() for r in caplog.records if "entries_skipped" in r.getMessage()]
        assert len(lines) == 1 and entry_id in lines[0] and "watermark" in lines[0], lines

    run(tmp_path, scenario)


def signed(tree_json: str) -> bytes:
    """A checkpoint file whose tree is ``tree_json`` as it stands, signed as the worker signs: the digest
    has no key, so whoever can write the folder can sign anything."""
    from safetensors.torch import save as safetensors_save

    from service.worker.checkpoints import FORMAT, _digest

    tensors = {"t0": torch.zeros(2)}
    metadata = {"format": FORMAT, "tree": tree_json, "sha256": _digest(tensors, tree_json)}
    return safetensors_save(tensors, metadata=metadata)


#: Trees of the wrong shape under a valid digest, each the newest by its ``created``: each must be a
#: refused file, not an exception.
NEWEST = '"created": 1e12'
MALFORMED_TREES = {
    "a __dict__ of pairs that are not pairs": '{"__dict__": [[1]], ' + NEWEST + "}",
    "an array without its dtype": '{"__ndarray__": "t0", ' + NEWEST + "}",
    "a tuple of a number": '{"model": {"__tuple__": 5}, ' + NEWEST + "}",
    "nesting deeper than the stack": '{"model": ' + "[" * 700 + "]" * 700 + ", " + NEWEST + "}",
}


@pytest.mark.parametrize("tree_json", list(MALFORMED_TREES.values()), ids=list(MALFORMED_TREES))
def test_a_signed_tree_of_the_wrong_shape_is_refused_and_the_older_checkpoint_serves(
    tree_json: str, tmp_path: Path
) -> None:
    async def scenario(bus: LocalBus, new_worker) -> None:
        first, saved = await first_checkpoint(bus, new_worker)
        store = CheckpointStore(tmp_path / "ckpt")
        store.path("forged").write_bytes(signed(tree_json))
        assert store.list()[-1].name == "forged"
        with pytest.raises(CheckpointError, match="malformed"):
            store.load("forged")
        second = await new_worker("w2")  # the forged file is tried first, refused; the good one serves
        assert (
            second.restored_from == saved and second.batcher.learner.version == first.batcher.learner.version
        )
        assert restore_errors(second) == 1

    run(tmp_path, scenario)
