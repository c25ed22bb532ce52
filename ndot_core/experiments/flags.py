"""The flags of ``ndot train | eval | compare``: argparse types that explain a bad value, and flag groups."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ndot_core.engine.learner import OPTIMIZERS
from ndot_core.engine.models import MODELS
from ndot_core.experiments.compare import RunSpec, parse_runs
from ndot_core.experiments.data import DATASETS


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value}")
    return value


def unit_interval(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1], got {value}")
    return value


def model_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. hidden=[800,800]), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} asked for, but torch sees no CUDA device")
    return text


def runs(text: str) -> list[RunSpec]:
    try:
        return parse_runs(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_data_flags(parser: argparse.ArgumentParser) -> None:
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
        type=positive_int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="resize frames to H x W (default: the dataset's; 48 48 for DVS Gesture and "
        "CIFAR10-DVS, the sensor size otherwise)",
    )
    group.add_argument(
        "--heldout-fraction",
        type=fraction,
        default=None,
        help="held-out share of each class where the dataset has no test split "
        "(default: the dataset's; 0.2 for nmnist-small)",
    )
    group.add_argument(
        "--shift",
        type=non_negative_int,
        default=None,
        metavar="PX",
        help="training augmentation: shift each sample by up to PX pixels (zero fill), 0 = none "
        "(default: the dataset's; none for N-MNIST, 4 for DVS Gesture, CIFAR10-DVS and CIFAR)",
    )
    group.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="use only this many recordings (a stratified subset; for quick runs)",
    )


def add_training_flags(parser: argparse.ArgumentParser, single_t: bool) -> None:
    group = parser.add_argument_group("model and training")
    group.add_argument(
        "--model",
        default="mlp",
        choices=sorted(MODELS),
        help="spiking network from the build_model registry (default: %(default)s)",
    )
    group.add_argument(
        "--model-arg",
        type=model_arg,
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
            type=positive_int,
            default=10,
            help="time-steps (frames) per sample; also the T of the loss and of accumulate "
            "mode (default: %(default)s)",
        )
    else:
        group.add_argument(
            "-T",
            "--steps",
            type=positive_int,
            nargs="+",
            default=[6, 10],
            help="one or more values of T to compare (default: 6 10)",
        )
    group.add_argument(
        "--alpha",
        type=unit_interval,
        default=0.1,
        help="weight of MSE against cross-entropy in the loss, Eq. 13 (default: %(default)s)",
    )
    group.add_argument(
        "--epochs",
        type=positive_int,
        default=10,
        help="passes over the training split (default: %(default)s)",
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=32, help="samples per batch (default: %(default)s)"
    )
    group.add_argument(
        "--lr",
        type=non_negative_float,
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
        "--momentum", type=non_negative_float, default=0.9, help="SGD momentum (default: %(default)s)"
    )
    group.add_argument(
        "--weight-decay", type=non_negative_float, default=0.0, help="L2 weight decay (default: %(default)s)"
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
        type=device,
        default="cpu",
        help="torch device, e.g. cpu or cuda:0 (default: %(default)s)",
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads torch may use per run (default: %(default)s; small spiking nets at "
        "these batch sizes gain little from more, and on cores shared with other work "
        "extra threads slow every step down many times)",
    )


def add_output_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
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
