"""Scale-out primitives on real processes: torchrun, gloo on loopback (service.worker.cluster).

1. ``grad`` sync with 2 ranks equals one worker holding every stream (weights within 1e-6).
2. ``average`` with 3 ranks: the model digest is equal on every rank after every average, and the
   ranks really drift apart in between (so the equality is not trivial).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cluster_ranks import make_learner, make_streams, run_ticks
from conftest import REPO_ROOT

from service.worker.cluster import ClusterConfig, owned_shards

TORCHRUN_TIMEOUT_S = 180


def torchrun(nproc: int, *args: str) -> None:
    """Run tests/cluster_ranks.py on ``nproc`` local ranks; fails with the ranks' output."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(REPO_ROOT / "tests" / "cluster_ranks.py"),
        *args,
    ]
    # (PYTHONFAULTHANDLER: a rank that dies of a signal prints every thread's Python stack)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, cwd=REPO_ROOT
    )
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def test_owned_shards_partition_every_shard_once() -> None:
    for world in (1, 2, 3, 5):
        owners = [owned_shards(rank, world, 64) for rank in range(world)]
        assert sorted(s for shards in owners for s in shards) == list(range(64))
        assert all(all(s % world == rank for s in shards) for rank, shards in enumerate(owners))
    with pytest.raises(ValueError, match="outside"):
        owned_shards(2, 2, 64)


def test_cluster_config_from_torchrun_env() -> None:
    assert ClusterConfig.from_env({}) is None
    config = ClusterConfig.from_env(
        {"RANK": "1", "WORLD_SIZE": "3", "MASTER_PORT": "29400", "TORCHELASTIC_RESTART_COUNT": "2"}
    )
    assert config is not None and (config.rank, config.world_size, config.restart_count) == (1, 3, 2)
    with pytest.raises(ValueError, match="outside"):
        ClusterConfig.from_env({"RANK": "3", "WORLD_SIZE": "3", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="torchrun environment"):
        ClusterConfig.from_env({"RANK": "x", "WORLD_SIZE": "3", "MASTER_PORT": "1"})


def test_grad_sync_two_ranks_equals_one_worker(nmnist_small: Path, tmp_path: Path) -> None:
    torchrun(2, "--data-dir", str(nmnist_small), "--out", str(tmp_path), "--sync", "grad")
    oracle = make_learner()
    before = {name: p.detach().clone() for name, p in oracle.model.named_parameters()}
    run_ticks(oracle, make_streams(nmnist_small))
    expected = dict(oracle.model.named_parameters())
    learned = {name for name, value in before.items() if not torch.equal(value, expected[name])}
    # (the readout's weight stays: the last hidden layer does not spike yet in 8 steps from rest)
    assert learned >= {f"blocks.{i}.weighted.weight" for i in range(4)} | {"readout.bias"}, learned
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"rank{rank}.pt")
        assert weights.keys() == expected.keys()
        for name, value in weights.items():
            torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=1e-6, msg=name)
    record = json.loads((tmp_path / "rank1.json").read_text())["record"]
    assert record[-1]["labelled"] == 0, "rank 1's streams end early: its last ticks must be idle"
    assert all(len(set(tick["digests"])) == 1 for tick in record)


def test_average_three_ranks_digests_equal_after_every_average(nmnist_small: Path, tmp_path: Path) -> None:
    torchrun(3, "--data-dir", str(nmnist_small), "--out", str(tmp_path), "--sync", "average", "--period", "3")
    records = [json.loads((tmp_path / f"rank{r}.json").read_text())["record"] for r in range(3)]
    seen = [[(tick["tick"], tick["averaged"], tick["digests"]) for tick in record] for record in records]
    assert seen[0] == seen[1] == seen[2], "every rank saw the same digests on the same ticks"
    averaged = [tick for tick in records[0] if tick["averaged"]]
    drifted = [tick for tick in records[0] if not tick["averaged"]]
    assert [tick["tick"] for tick in averaged] == [2, 5]
    assert all(len(set(tick["digests"])) == 1 for tick in averaged)
    assert any(len(set(tick["digests"])) > 1 for tick in drifted), "ranks never differed: a trivial test"
