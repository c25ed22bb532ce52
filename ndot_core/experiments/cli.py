"""``ndot train | eval | compare``: offline experiments from the command line (argparse).

``main(argv) -> int`` never calls ``sys.exit`` itself: 0 on success, 2 for bad flags (argparse's
usage error), 1 when the run cannot proceed (missing dataset, mismatched checkpoint, ...).
``service.cli`` mounts these subcommands under its ``ndot`` script; ``python -m ndot_core.experiments.cli``
works too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ndot_core.engine.learner import MODES
from ndot_core.engine.rules import RULES
from ndot_core.events.datasets import DatasetError
from ndot_core.events.layout import EventError
from ndot_core.experiments import flags
from ndot_core.experiments.compare import (
    DEFAULT_RUNS,
    compare,
    format_table,
    write_table,
)
from ndot_core.experiments.config import ExperimentError, RunConfig, torch_threads
from ndot_core.experiments.run_files import CheckpointError
from ndot_core.experiments.runs import evaluate_checkpoint, train
from ndot_core.experiments.scoring import load_run, score_folder, score_recording, write_folder_report

PROG = "ndot"
EPILOG = """examples:
  ndot train --dataset nmnist --data-dir ../shared/data/nmnist-small --model mlp -T 10 --epochs 5 --out runs/ndot
  ndot eval runs/ndot
  ndot eval runs/ndot --data-dir ../shared/data/nmnist-small          # any labelled folder: confusion matrix
  ndot eval runs/ndot --data-dir ../shared/data/recordings/nmnist-digit.bin   # one recording
  ndot compare --data-dir ../shared/data/nmnist-small -T 6 10 --runs ndot:online,ottt:accumulate,bptt --out runs/cmp
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``ndot`` parser with its three offline subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Offline experiments with spiking networks trained by NDOT, OTTT or BPTT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,compare}")

    train_parser = commands.add_parser(
        "train",
        help="train one network and write metrics, curves and checkpoints",
        description="Train one spiking network on a stratified split; evaluate held-out every epoch.",
    )
    flags.add_data_flags(train_parser)
    flags.add_training_flags(train_parser, single_t=True)
    rules = train_parser.add_argument_group("learning rule")
    rules.add_argument(
        "--rule",
        default="ndot",
        choices=RULES,
        help="temporal dependency of the traces: ndot (paper), ndot_reference (authors' code), "
        "ottt (constant lambda) or bptt (unrolled) (default: %(default)s)",
    )
    rules.add_argument(
        "--mode",
        default="online",
        choices=MODES,
        help="online: optimizer step every time-step (NDOT_O); accumulate: one step per "
        "sample sequence (NDOT_A); ignored for bptt (default: %(default)s)",
    )
    flags.add_output_flags(train_parser, "runs/train")

    eval_parser = commands.add_parser(
        "eval",
        help="score a saved network: its run's held-out split, any labelled folder, or one recording",
        description="Load a run's checkpoint and score it. Without --data-dir: the run's own stratified split "
        "(--split). With --data-dir FOLDER: every recording its labels.txt lists (id<TAB>class lines, the "
        "recordings beside it or under train/), framed as the run framed its data; prints the accuracy and "
        "writes confusion.csv, confusion.png and predictions.csv (--out-dir). With --data-dir FILE: that one "
        "recording's prediction and class probabilities.",
    )
    eval_parser.add_argument(
        "checkpoint",
        type=Path,
        help="run folder (holding checkpoint.json) or checkpoint .json/.safetensors path",
    )
    eval_parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="score on this labelled folder (labels.txt of id<TAB>class lines, recordings beside it or under "
        "train/: .bs2 .bin .aedat4 .raw .dat .npy) or on this one recording file (default: the run's own split)",
    )
    eval_parser.add_argument(
        "--run-data-dir",
        type=Path,
        default=None,
        help="where the run's own dataset is now, if it moved (scoring the run's split)",
    )
    eval_parser.add_argument(
        "--sensor-size",
        type=flags.positive_int,
        nargs=2,
        metavar=("W", "H"),
        default=None,
        help="sensor of recordings whose files carry none (default: 34 34 for N-MNIST .bs2/.bin; other "
        "formats carry their own)",
    )
    eval_parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for confusion.csv, confusion.png and predictions.csv of a --data-dir folder "
        "(default: RUN/eval-<folder name>)",
    )
    eval_parser.add_argument("--download", action="store_true", help="download the run's dataset if missing")
    eval_parser.add_argument(
        "--split",
        default="test",
        choices=("test", "train"),
        help="which side of the run's stratified split to score (default: %(default)s)",
    )
    eval_parser.add_argument(
        "--batch-size", type=flags.positive_int, default=None, help="samples per batch (default: the run's)"
    )
    eval_parser.add_argument(
        "--device", type=flags.device, default=None, help="torch device (default: the run's)"
    )
    eval_parser.add_argument("--out", type=Path, default=None, help="also write the result to this JSON file")
    eval_parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    compare_parser = commands.add_parser(
        "compare",
        help="several rules/modes at one or more T, one table and one plot",
        description="Train each run (same data, seed and budget) in a fresh process and tabulate held-out "
        "accuracy, seconds per epoch and peak memory (CUDA allocator peak on a GPU; peak RSS "
        "growth during training on a CPU).",
    )
    flags.add_data_flags(compare_parser)
    flags.add_training_flags(compare_parser, single_t=False)
    compare_parser.add_argument(
        "--runs",
        type=flags.runs,
        default=DEFAULT_RUNS,
        help="comma-separated RULE:MODE items (bptt alone); NDOT_O = ndot:online, "
        "NDOT_A = ndot:accumulate, OTTT_A = ottt:accumulate, BPTT = bptt "
        "(default: %(default)s)",
    )
    compare_parser.add_argument(
        "--in-process",
        action="store_true",
        help="train every run in this process (quicker start; memory figures then "
        "include what earlier runs left behind)",
    )
    flags.add_output_flags(compare_parser, "runs/compare")
    return parser


def _run_config(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    values = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "download": args.download,
        "model": args.model,
        "model_args": dict(args.model_arg),
        "split_by": args.split_by,
        "output_size": tuple(args.output_size) if args.output_size else None,
        "alpha": args.alpha,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "seed": args.seed,
        "heldout_fraction": args.heldout_fraction,
        "shift": args.shift,
        "limit": args.limit,
        "device": args.device,
        "threads": args.threads,
        "out": args.out,
        "resume": args.resume,
        "progress": not args.no_progress,
        "verbose": not args.quiet,
    }
    values.update(overrides)
    return RunConfig(**values)


def train_config(argv: Sequence[str]) -> RunConfig:
    """The :class:`RunConfig` that ``ndot train`` builds from ``argv`` (flags after ``train``).

    For scripts that run the command's exact settings with a few flags changed
    (``benchmarks/offline_study.py``); bad flags raise ``SystemExit`` as argparse does.
    """
    args = build_parser().parse_args(["train", *argv])
    return _run_config(args, rule=args.rule, mode=args.mode, steps=args.steps)


def _train(args: argparse.Namespace) -> int:
    summary = train(_run_config(args, rule=args.rule, mode=args.mode, steps=args.steps))
    print(
        f"{summary['name']} T={summary['T']}: held-out accuracy {100 * summary['test_acc']:.2f}% after "
        f"{summary['epochs']} epochs ({summary['epoch_s']:.1f} s/epoch); files in {args.out}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.data_dir is not None:
        return _eval_data(args)
    result = evaluate_checkpoint(
        args.checkpoint,
        data_dir=args.run_data_dir,
        device=args.device,
        batch_size=args.batch_size,
        split=args.split,
        download=args.download,
        progress=not args.no_progress,
    )
    print(
        f"{result['name']} T={result['T']} epoch {result['epoch']}: {args.split} accuracy "
        f"{100 * result['accuracy']:.2f}% on {result['samples']} samples (loss {result['loss']:.4f})"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


def _eval_data(args: argparse.Namespace) -> int:
    """``ndot eval RUN --data-dir PATH``: a labelled folder (accuracy, confusion matrix) or one recording."""
    path: Path = args.data_dir
    if not path.exists():
        raise ExperimentError(f"--data-dir {path}: no such folder or file")
    sensor = tuple(args.sensor_size) if args.sensor_size else None
    with torch_threads(1):
        run = load_run(args.checkpoint, args.device)
        if path.is_file():
            result = score_recording(run, path, sensor)
            print(
                f"{path}: predicted class {result['predicted']} ({result['events']} events, sensor "
                f"{result['sensor'][0]}x{result['sensor'][1]})"
            )
            for k, p in sorted(enumerate(result["probabilities"]), key=lambda item: -item[1]):
                print(f"  class {k:>3}  p = {p:.4f}")
        else:
            result = score_folder(
                run, path, args.batch_size or run.config.batch_size, sensor, not args.no_progress
            )
            out_dir = args.out_dir or run.folder / f"eval-{path.resolve().name}"
            title = f"{run.config.run_name} T={run.steps} on {path.resolve().name}"
            files = write_folder_report(result, out_dir, title)
            print(
                f"{path}: accuracy {100 * result['accuracy']:.2f}% on {result['samples']} recordings "
                f"({run.config.run_name} T={run.steps}, epoch {run.metadata.get('epoch')})"
            )
            print(
                "  recall per class: "
                + ", ".join(f"{k}: {100 * r:.0f}%" for k, r in result["recall"].items())
            )
            print(
                f"  wrote {files['confusion_csv']}, {files['confusion_png'].name}, {files['predictions_csv'].name}"
            )
            result = {
                **result,
                "predictions": [{**row, "p": [float(p) for p in row["p"]]} for row in result["predictions"]],
            }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


def _compare(args: argparse.Namespace) -> int:
    rows = compare(_run_config(args), args.runs, args.steps, isolate=not args.in_process)
    print(format_table(rows))
    write_table(rows, args.out)
    print(f"\nwritten: {args.out / 'compare.json'}, compare.csv, compare.md, compare.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ndot train|eval|compare`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return {"train": _train, "eval": _eval, "compare": _compare}[args.command](args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    except (
        ExperimentError,
        CheckpointError,
        DatasetError,
        EventError,
        OSError,
        ValueError,
        TypeError,
    ) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
