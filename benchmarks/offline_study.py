"""What moves the held-out accuracy of offline ``ndot train`` on N-MNIST: the command and its variants.

    .venv/bin/python benchmarks/offline_study.py                       # default points, seeds 0 1 2, 2 jobs
    .venv/bin/python benchmarks/offline_study.py --points base "wide=--model-arg channels=[32,64,64]"

The 1000 ``nmnist-small`` recordings are split once, stratified (``ndot_core.experiments.splits``,
split seed 0, the accuracy study's parts): 700 *train*, 150 *choose*, 150 *report*. Each run trains
on the 700 with the documented command (``BASE``: docs/experiments.md, without ``--data-dir`` and
``--out``; ``--base`` for another) plus the point's flags, seeded by the run's seed (weights and
shuffles; the split stays), then scores *choose* and *report* from a fresh state, nothing learned
(``runs.evaluate``). A point is ``name=FLAGS`` (``ndot train`` flags, as on its command line);
``base`` adds none. Settings are chosen on *choose*; *report* is what the docs quote.

Runs go ``--jobs`` at a time in forked processes, one torch thread each (the frames are loaded once,
before the fork). Prints one line per run, then a table per point (mean ± sample standard deviation
over the seeds of choose, report and final train accuracy, seconds per run), the best point on
*choose* with its *report* accuracy against ``--target`` (the verdict), the load average and the
wall time. Writes ``results/offline_<tag>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_study import print_table_and_verdict, progress, summarise, write_study  # noqa: E402

from ndot_core.events.datasets import NMNISTFolder  # noqa: E402
from ndot_core.experiments.augment import augment  # noqa: E402
from ndot_core.experiments.cli import train_config  # noqa: E402
from ndot_core.experiments.config import RunConfig  # noqa: E402
from ndot_core.experiments.frame_sets import FrameSet  # noqa: E402
from ndot_core.experiments.runs import evaluate, train  # noqa: E402
from ndot_core.experiments.scoring import load_run  # noqa: E402
from ndot_core.experiments.splits import NMNIST_SMALL_PARTS, stratified_parts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The documented offline command (docs/experiments.md), without --data-dir and --out.
BASE = (
    "--dataset nmnist-small --model stream_cnn --rule ndot --mode online -T 16 --epochs 10 "
    "--optimizer adam --lr 1e-3 --schedule cosine --shift 2"
)
DEFAULT_POINTS = (
    "base",
    "sgd=--optimizer sgd --lr 0.1",
    "T10=-T 10",
    "lr2e-3=--lr 2e-3",
    "shift3=--shift 3",
    "wide=--model-arg channels=[32,64,64] --model-arg hidden=256",
    "accumulate=--mode accumulate",
)

#: Filled before the fork: ``{T: {part: (x, y)}}`` and the classes (shared with the forked runs).
_FRAMES: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default."""


def parse_point(text: str) -> tuple[str, list[str]]:
    """``name=FLAGS`` -> ``(name, [flag, ...])``; ``base`` -> ``("base", [])``."""
    name, _, flags = text.partition("=")
    return name, shlex.split(flags)


def point_config(point: str, seed: int, out: Path, base: str = BASE) -> RunConfig:
    """The run's config: ``base`` + the point's flags, this seed (the parts replace the held-out split)."""
    _, flags = parse_point(point)
    config = train_config([*shlex.split(base), *flags, "--seed", str(seed), "--out", str(out)])
    config.progress = False
    config.verbose = False
    config.threads = 1
    return config


def load_parts(data_dir: Path, steps: set[int], split_seed: int) -> None:
    """Frame the three parts once per T (as ``ndot train`` frames: T bins of equal event count)."""
    folder = NMNISTFolder(data_dir)
    indices = stratified_parts(folder.labels, list(NMNIST_SMALL_PARTS.values()), seed=split_seed)
    for t in sorted(steps):
        _FRAMES[t] = {}
        for name, part in zip(("train", "choose", "report"), indices, strict=True):
            x, y = folder.subset(part).frames(n_event_bins=t).arrays(progress=False)
            _FRAMES[t][name] = (x, y)


def run_point(job: tuple[str, int, str, str]) -> dict[str, Any]:
    """Train one (point, seed) on *train*; score *choose* and *report*; return the run's record."""
    point, seed, scratch, base = job
    out = Path(scratch) / f"{parse_point(point)[0]}-{seed}"
    config = point_config(point, seed, out, base)
    frames = _FRAMES[config.steps]
    classes = int(max(frames["train"][1].max(), frames["choose"][1].max())) + 1
    # --shift as load_frame_sets applies it to N-MNIST (no flip): samples shifted by up to that many pixels
    shifted = functools.partial(augment, padding=config.shift, flip=False) if config.shift else None
    train_set = FrameSet(*frames["train"], classes, config.steps, shifted)
    choose_set = FrameSet(*frames["choose"], classes, config.steps)
    report_set = FrameSet(*frames["report"], classes, config.steps)
    started = time.perf_counter()
    summary = train(config, data=(train_set, choose_set))
    saved = load_run(out)
    report, _ = evaluate(saved.learner, report_set, config.batch_size)
    return {
        "point": point,
        "seed": seed,
        "choose": float(summary["test_acc"]),
        "report": float(report),
        "train": float(summary["train_acc"]),
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = Path(os.environ.get("NDOT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "nmnist-small"
    parser.add_argument("--data", type=Path, default=data, help="labelled folder (labels.txt + train/*.bs2)")
    parser.add_argument(
        "--base", default=BASE, help="the ndot train flags every point starts from (the documented command)"
    )
    parser.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS), help="name=FLAGS (see above)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2], help="weight and shuffle seeds")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/choose/report split")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument(
        "--target", type=float, default=0.97, help="verdict: report accuracy of the best point"
    )
    parser.add_argument("--tag", default="study", help="results/offline_<tag>.json and .png")
    args = parser.parse_args(argv)
    names = [parse_point(p)[0] for p in args.points]
    if len(set(names)) != len(names):
        parser.error(f"point names must differ: {names}")
    with tempfile.TemporaryDirectory() as probe:  # bad flags fail here, before any data is loaded
        steps = {point_config(p, 0, Path(probe), args.base).steps for p in args.points}
    load_start = os.getloadavg()
    started = time.perf_counter()
    load_parts(args.data, steps, args.split_seed)
    print(
        f"offline study: nmnist-small split train 700, choose 150, report 150 (stratified, split seed "
        f"{args.split_seed}); base: ndot train {args.base}; {args.jobs} jobs, one thread each; frames loaded in "
        f"{time.perf_counter() - started:.0f} s; load average {load_start[0]:.2f}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [(point, seed, scratch, args.base) for point in args.points for seed in args.seed]
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for done, run in enumerate(pool.imap_unordered(run_point, jobs)):
                runs.append(run)
                print(
                    f"{progress(done, len(jobs), started)} {parse_point(run['point'])[0]:<12} seed {run['seed']}: choose "
                    f"{run['choose']:.1%} report {run['report']:.1%} train {run['train']:.1%} "
                    f"({run['seconds']:.0f} s)",
                    flush=True,
                )
    runs.sort(key=lambda r: (args.points.index(r["point"]), r["seed"]))
    table = summarise(runs, list(args.points), keys=("choose", "report", "train", "seconds"))
    summary = print_table_and_verdict(
        table,
        args.seed,
        args.target,
        started,
        load_start,
        [("train", lambda row: f"{100 * row['train']:6.1f}")],
        width=60,
    )
    write_study(
        RESULTS / f"offline_{args.tag}.json",
        sys.argv[1:] if argv is None else argv,
        {"base": args.base, "split_seed": args.split_seed, "jobs": args.jobs},
        args.target,
        summary,
        table,
        runs,
        xlabel="held-out accuracy after ndot train on 700 (%)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
