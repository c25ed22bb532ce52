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

import torch

from ndot_core.engine.learner import MODES, OPTIMIZERS
from ndot_core.engine.models import MODELS
from ndot_core.engine.rules import RULES
from ndot_core.events.datasets import DatasetError
from ndot_core.events.layout import EventError
from ndot_core.experiments.compare import (
    DEFAULT_RUNS,
    RunSpec,
    compare,
    format_table,
    parse_runs,
    write_table,
)
from ndot_core.experiments.data import DATASETS
from ndot_core.experiments.run_files import CheckpointError
from ndot_core.experiments.runs import ExperimentError, RunConfig, evaluate_checkpoint, train

PROG = "ndot"
EPILOG = """examples:
  ndot train --dataset nmnist --data-dir ../shared/data/nmnist-small --model mlp -T 10 --epochs 5 --out runs/ndot
  ndot eval runs/ndot
  ndot compare --data-dir ../shared/data/nmnist-small -T 6 10 --runs ndot:online,ottt:accumulate,bptt --out runs/cmp
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value}")
    return value


def _unit_interval(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1], got {value}")
    return value


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. hidden=[800,800]), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} asked for, but torch sees no CUDA device")
    return text


def _runs(text: str) -> list[RunSpec]:
    try:
        return parse_runs(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="nmnist-small",
        choices=tuple(DATASETS),
        help="dataset: nmnist-small (a folder of train/{id}.bs2 + labels.txt, split here), "
        "nmnist, dvsgesture, cifar10dvs (event data through tonic), cifar10, cifar100 "
        "(binary version; images shown at every time-step) (default: %(default)s)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding the dataset, e.g. ../shared/data/nmnist-small (default: data/<dataset>)",
    )
    group.add_argument(
        "--download",
        action="store_true",
        help="download the dataset into --data-dir if it is missing (never done otherwise)",
    )
    group.add_argument(
        "--split-by",
        default="events",
        choices=("events", "time"),
        help="cut each recording into T frames of equal event count (the paper's) or of "
        "equal duration (default: %(default)s)",
    )
    group.add_argument(
        "--output-size",
        type=_positive_int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="resize frames to H x W (default: the dataset's; 48 48 for DVS Gesture and "
        "CIFAR10-DVS, the sensor size otherwise)",
    )
    group.add_argument(
        "--heldout-fraction",
        type=_fraction,
        default=None,
        help="held-out share of each class where the dataset has no test split "
        "(default: the dataset's; 0.2 for nmnist-small)",
    )
    group.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="use only this many recordings (a stratified subset; for quick runs)",
    )


def _add_training_flags(parser: argparse.ArgumentParser, single_t: bool) -> None:
    group = parser.add_argument_group("model and training")
    group.add_argument(
        "--model",
        default="mlp",
        choices=sorted(MODELS),
        help="spiking network from the build_model registry (default: %(default)s)",
    )
    group.add_argument(
        "--model-arg",
        type=_model_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option passed to build_model, VALUE as JSON, repeatable (e.g. hidden=[800,800], "
        "dropout=0.1, lam=0.5)",
    )
    if single_t:
        group.add_argument(
            "-T",
            "--steps",
            type=_positive_int,
            default=10,
            help="time-steps (frames) per sample; also the T of the loss and of accumulate "
            "mode (default: %(default)s)",
        )
    else:
        group.add_argument(
            "-T",
            "--steps",
            type=_positive_int,
            nargs="+",
            default=[6, 10],
            help="one or more values of T to compare (default: 6 10)",
        )
    group.add_argument(
        "--alpha",
        type=_unit_interval,
        default=0.1,
        help="weight of MSE against cross-entropy in the loss, Eq. 13 (default: %(default)s)",
    )
    group.add_argument(
        "--epochs",
        type=_positive_int,
        default=10,
        help="passes over the training split (default: %(default)s)",
    )
    group.add_argument(
        "--batch-size", type=_positive_int, default=32, help="samples per batch (default: %(default)s)"
    )
    group.add_argument(
        "--lr",
        type=_non_negative_float,
        default=None,
        help="learning rate (default: 0.1 for sgd, 0.001 for adam)",
    )
    group.add_argument(
        "--optimizer",
        default="sgd",
        choices=OPTIMIZERS,
        help="weight optimizer: sgd (with --momentum) or adam (default: %(default)s)",
    )
    group.add_argument(
        "--momentum", type=_non_negative_float, default=0.9, help="SGD momentum (default: %(default)s)"
    )
    group.add_argument(
        "--weight-decay", type=_non_negative_float, default=0.0, help="L2 weight decay (default: %(default)s)"
    )
    group.add_argument(
        "--schedule",
        default="constant",
        choices=("constant", "cosine"),
        help="learning-rate schedule over the epochs (default: %(default)s)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the weights and the shuffles (default: %(default)s)",
    )
    group.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="torch device, e.g. cpu or cuda:0 (default: %(default)s)",
    )
    group.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads torch may use per run (default: %(default)s; small spiking nets at "
        "these batch sizes gain little from more, and on cores shared with other work "
        "extra threads slow every step down many times)",
    )


def _add_output_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out",
        type=Path,
        default=Path(default_out),
        help="folder for metrics.json/.csv, curves.png and checkpoint.safetensors/.json "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out up to --epochs (same data, model and rule)",
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    group.add_argument("--quiet", action="store_true", help="print no per-epoch lines")


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
    _add_data_flags(train_parser)
    _add_training_flags(train_parser, single_t=True)
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
    _add_output_flags(train_parser, "runs/train")

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
        "--batch-size", type=_positive_int, default=None, help="samples per batch (default: the run's)"
    )
    eval_parser.add_argument("--device", type=_device, default=None, help="torch device (default: the run's)")
    eval_parser.add_argument("--out", type=Path, default=None, help="also write the result to this JSON file")
    eval_parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    compare_parser = commands.add_parser(
        "compare",
        help="several rules/modes at one or more T, one table and one plot",
        description="Train each run (same data, seed and budget) in a fresh process and tabulate held-out "
        "accuracy, seconds per epoch and peak memory (CUDA allocator peak on a GPU; peak RSS "
        "growth during training on a CPU).",
    )
    _add_data_flags(compare_parser)
    _add_training_flags(compare_parser, single_t=False)
    compare_parser.add_argument(
        "--runs",
        type=_runs,
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
    _add_output_flags(compare_parser, "runs/compare")
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
