"""The consistent cut of a cluster: every rank checkpoints the same round, rank 0 commits it.

At a round ``R`` the ranks agreed on (``RoundSync``: a rank's checkpoint was due, or they stop)::

    every rank   average the weights (the same round), drain, save its tree to
                 <dir>/round-<R>/   (learner, its streams, the watermark of its shards)
    barrier      (every rank's file is written)
    rank 0       <dir>/round-<R>/COMMITTED  {round, world_size, shards, files}   (written, then renamed)

A round without ``COMMITTED`` never happened. At start every rank takes the newest committed round:
the learner (weights, optimizer) from rank 0's file, and the streams and shard marks of the shards it
owns *now* from whichever files held them, so a group restarted with another world size remaps whole
shards and every stream goes on from its state at ``R``; each rank then replays its shards' history
after their marks (``service.worker.recovery``): every step applied exactly once. Rank 0 keeps the
newest ``checkpoint_keep`` committed rounds and deletes older rounds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ndot_core import NetworkState
from service.bus.shards import shard_of
from service.worker.checkpoints import CheckpointError, CheckpointStore

log = logging.getLogger("ndot.cluster")

COMMITTED = "COMMITTED"


def round_dir(base: Path, round_id: int) -> Path:
    return base / f"round-{round_id:012d}"


def committed_rounds(base: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(round, manifest)`` of every committed round under ``base``, oldest first (bad manifests skipped)."""
    rounds = []
    for folder in sorted(base.glob("round-*")) if base.is_dir() else []:
        marker = folder / COMMITTED
        try:
            manifest = json.loads(marker.read_text())
            rounds.append((int(manifest["round"]), manifest))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(rounds, key=lambda item: item[0])


def save_round(
    base: Path,
    round_id: int,
    rank: int,
    world_size: int,
    shards: int,
    tree: dict[str, Any],
    fence_holds: Callable[[], bool] = lambda: True,
) -> str:
    """This rank's part of the cut (a collective: every rank calls it for the same round); returns
    the round's name once rank 0 committed it, or raises ``CheckpointError`` on every rank when a rank
    could not write its file, or when rank 0's fencing token is stale (``fence_holds()`` False: a
    newer group started); the round is then not committed, and never restored."""
    folder = round_dir(base, round_id)
    store = CheckpointStore(folder)
    name: str | None = None
    streams = size = 0
    error = ""
    try:
        if rank == 0:  # a folder left by an attempt that died before its commit is written anew
            (folder / COMMITTED).unlink(missing_ok=True)
        info = store.save(tree, name=f"rank-{rank}-of-{world_size}")
        name, streams, size = info.name, info.streams, info.bytes
    except OSError as err:  # a full disk: this rank says so, and no rank waits for it in vain
        error = f"{type(err).__name__}: {err.strerror or err}"
    fenced = rank == 0 and not fence_holds()
    gathered: list[tuple[str | None, bool, int, int] | None] = [None] * world_size
    dist.all_gather_object(gathered, (name, fenced, streams, size))  # also the barrier: every file written
    files = [item[0] for item in gathered if item is not None]
    failed = [r for r, item in enumerate(gathered) if item is None or item[0] is None]
    stale = any(item[1] for item in gathered if item is not None)
    if not failed and not stale and rank == 0:
        manifest = {
            "round": round_id,
            "world_size": world_size,
            "shards": shards,
            "files": files,
            "created": time.time(),
            "model_version": int(tree.get("model_version", 0)),
            "tick_clock": int(tree.get("tick_clock", 0)),
            "streams": sum(item[2] for item in gathered if item is not None),
            "bytes": sum(item[3] for item in gathered if item is not None),
        }
        temporary = folder / f"{COMMITTED}.tmp"
        temporary.write_text(json.dumps(manifest))
        os.replace(temporary, folder / COMMITTED)
    dist.barrier()  # nobody goes on (or acks past the cut) before it is committed
    if stale:
        raise CheckpointError(f"round {round_id} not committed: a newer worker group holds the fencing token")
    if failed:
        raise CheckpointError(
            f"round {round_id} not committed: ranks {failed} could not save ({error or 'see their logs'})"
        )
    return folder.name


def round_infos(base: Path) -> list[dict[str, Any]]:
    """The committed rounds as ``GET /v1/checkpoints`` lists checkpoints (``CheckpointInfo``), oldest first."""
    return [
        {
            "name": f"round-{round_id}",
            "model_version": int(manifest.get("model_version", 0)),
            "streams": int(manifest.get("streams", 0)),
            "created": float(manifest.get("created", 0.0)),
            "bytes": int(manifest.get("bytes", 0)),
        }
        for round_id, manifest in committed_rounds(base)
    ]


def prune_rounds(base: Path, keep: int) -> None:
    """Rank 0: delete every round folder older than the newest ``keep`` committed rounds."""
    rounds = committed_rounds(base)
    if not rounds:
        return
    oldest_kept = rounds[max(len(rounds) - keep, 0)][0]
    for folder in base.glob("round-*"):
        try:
            number = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if number < oldest_kept:
            shutil.rmtree(folder, ignore_errors=True)


def merged_tree(base: Path, manifest: dict[str, Any], owned: list[int], shards: int) -> dict[str, Any]:
    """The tree this rank restores from a committed round: rank 0's learner, the owned shards' streams
    (state rows, framers, counters) and marks from every rank's file. ``CheckpointError`` if unusable."""
    if int(manifest.get("shards", -1)) != shards:
        raise CheckpointError(
            f"round {manifest.get('round')} was cut with {manifest.get('shards')} shards, not {shards}"
        )
    store = CheckpointStore(round_dir(base, int(manifest["round"])))
    trees = [store.load(str(name)) for name in manifest["files"]]
    mine = set(owned)
    streams: list[dict[str, Any]] = []
    states: list[NetworkState] = []
    marks: dict[str, str] = {}
    for tree in trees:
        for shard, raw in dict(tree.get("watermark") or {}).items():
            if int(shard) in mine:
                marks[shard] = raw
        kept = [
            i
            for i, stream in enumerate(tree["registry"]["streams"])
            if shard_of(stream["meta"]["stream_id"], shards) in mine
        ]
        if kept:
            streams += [tree["registry"]["streams"][i] for i in kept]
            states.append(NetworkState.from_state_dict(tree["network_state"]).select(kept))
    merged = dict(trees[0])
    merged["registry"] = {"streams": streams}
    base_state = NetworkState.from_state_dict(trees[0]["network_state"])
    merged["network_state"] = (NetworkState.cat(states) if states else base_state.select([])).state_dict()
    merged["watermark"], merged["shards"], merged["last_entry_id"] = marks, shards, None
    return merged
