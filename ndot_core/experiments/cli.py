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
from ndot_core.experiments.config import ExperimentError, RunConfig
from ndot_core.experiments.run_files import CheckpointError
from ndot_core.experiments.runs import evaluate_checkpoint, train

PROG = "ndot"
EPILOG = """examples:
  ndot train --dataset nmnist --data-dir ../shared/data/nmnist-small --model mlp -T 10 --epochs 5 --out runs/ndot
  ndot eval runs/ndot
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
        help="held-out accuracy of a saved checkpoint",
        description="Load a checkpoint, rebuild its dataset split and report accuracy.",
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
        help="dataset folder, if not where the checkpoint's run found it",
    )
    eval_parser.add_argument("--download", action="store_true", help="download the dataset if missing")
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


def _train(args: argparse.Namespace) -> int:
    summary = train(_run_config(args, rule=args.rule, mode=args.mode, steps=args.steps))
    print(
        f"{summary['name']} T={summary['T']}: held-out accuracy {100 * summary['test_acc']:.2f}% after "
        f"{summary['epochs']} epochs ({summary['epoch_s']:.1f} s/epoch); files in {args.out}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(
        args.checkpoint,
        data_dir=args.data_dir,
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
