"""A rank of a test cluster, run under ``torchrun`` by tests/test_cluster.py (not a test module itself).

Each rank holds the streams ``i`` with ``i % world_size == rank`` (as shards are owned) of a fixed set
of real N-MNIST recordings, steps them tick by tick on one tick clock, keeps the weights in step by
``grad`` or ``average`` sync (``service.worker.cluster``), and writes what the test checks into
``--out``: its final weights (``rank{r}.pt``) and, per tick, its model digest (``rank{r}.json``).
The test computes the one-worker oracle in its own process with ``run_ticks`` on every stream.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ndot_core import OnlineLearner, build_model
from ndot_core.events import NMNISTFolder, to_frames

STREAMS = 4
SEED = 0


@dataclass
class Stream:
    """One camera's frames [T, 2, 34, 34] and its per-step labels (-1 = unlabelled step)."""

    frames: torch.Tensor
    labels: list[int]


def make_streams(data_dir: Path, count: int = STREAMS) -> list[Stream]:
    """``count`` real recordings of different lengths; stream 2 is unlabelled for its first 3 steps."""
    folder = NMNISTFolder(data_dir)
    streams = []
    for i in range(count):
        events, label = folder[i]
        steps = 8 if i % 2 == 0 else 5  # the odd streams end early: their rank runs idle ticks
        frames = to_frames(events, (34, 34), n_time_bins=steps)
        labels = [int(label)] * steps
        if i == 2:
            labels[:3] = [-1, -1, -1]
        streams.append(Stream(torch.from_numpy(frames), labels))
    return streams


def make_learner() -> OnlineLearner:
    """The service's learner (stream_cnn, NDOT_O, Adam at the service's lr, the local step), seeded."""
    torch.manual_seed(SEED)
    model = build_model("stream_cnn", in_channels=2, num_classes=10, input_size=(34, 34))
    return OnlineLearner(model, mode="online", optimizer="adam", lr=2e-4, steps_per_sample=8, backend="auto")


def ticks_of(streams: list[Stream]) -> int:
    return max(len(s.labels) for s in streams)


def tick(learner: OnlineLearner, streams: list[Stream], state, k: int) -> int:  # noqa: ANN001
    """Step every stream that has a frame at tick ``k``; returns the labelled rows stepped."""
    rows = [i for i, s in enumerate(streams) if k < len(s.labels)]
    if not rows:
        return 0
    index = torch.tensor(rows)
    frames = torch.stack([streams[i].frames[k] for i in rows])
    labels = torch.tensor([streams[i].labels[k] for i in rows])
    sub = state.select(index)
    learner.step(frames, labels, sub)
    state.assign(index, sub)
    return int((labels >= 0).sum())


def run_ticks(learner: OnlineLearner, streams: list[Stream]) -> None:
    """One worker holding every stream: the oracle."""
    state = learner.new_state(len(streams))
    for k in range(ticks_of(streams)):
        tick(learner, streams, state, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sync", choices=("grad", "average"), required=True)
    parser.add_argument("--period", type=int, default=3, help="ticks between averages (--sync average)")
    args = parser.parse_args()

    from service.worker import cluster  # the module under test

    config = cluster.ClusterConfig.from_env()
    assert config is not None, "run me under torchrun"
    cluster.join(config, timeout_s=60)
    torch.set_num_threads(1)
    everything = make_streams(args.data_dir)
    mine = [s for i, s in enumerate(everything) if i % config.world_size == config.rank]
    learner = make_learner()
    if args.sync == "average":  # different data per rank, so that averaging has something to do
        torch.manual_seed(100 + config.rank)
        for stream in mine:
            stream.frames = stream.frames * (1.0 + torch.rand(()))
    cluster.broadcast_parameters(learner.model.parameters())
    gradient_sync = cluster.GradientSync(learner) if args.sync == "grad" else None
    averager = cluster.ParameterAverager(args.period) if args.sync == "average" else None
    clock = cluster.TickClock()
    ticks = clock.agree(ticks_of(mine))
    state = learner.new_state(len(mine))
    record = []
    for k in range(ticks):
        labelled = tick(learner, mine, state, k)
        averaged = False
        if gradient_sync is not None:
            gradient_sync.after_tick(labelled)
        else:
            assert averager is not None
            averaged = averager.average_parameters(learner.model.parameters())
        digests: list[str | None] = [None] * config.world_size
        torch.distributed.all_gather_object(digests, cluster.model_digest(learner.model.parameters()))
        record.append({"tick": k, "labelled": labelled, "averaged": averaged, "digests": digests})
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {name: p.detach().clone() for name, p in learner.model.named_parameters()},
        args.out / f"rank{config.rank}.pt",
    )
    (args.out / f"rank{config.rank}.json").write_text(json.dumps({"ticks": ticks, "record": record}))
    # Every rank done with every collective before any tears its connections down. (Once in CI a rank
    # aborted, SIGABRT, no Python error; ~90 local runs under load did not reproduce it. A rank that
    # leaves while the others still finish is the one race here; PYTHONFAULTHANDLER shows the rest.)
    torch.distributed.barrier()
    cluster.leave()


if __name__ == "__main__":
    main()
