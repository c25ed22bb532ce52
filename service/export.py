"""``ndot export SOURCE --format nir --out FILE``: a trained network as a NIR file, offline.

SOURCE is any of::

    an experiment run folder (holding checkpoint.json)      ndot train --out DIR writes one
    a run checkpoint, checkpoint.json or .safetensors       ndot_core.experiments.run_files
    a service checkpoint file, <name>.safetensors           the worker's NDOT_CHECKPOINT_DIR
    a service checkpoint folder                             its newest readable checkpoint

Each is read by its own loader, which checks it before anything is built: a run checkpoint's tensor
file against the SHA-256 in its JSON (``load_checkpoint``), then the weights against the model its
configuration names (``load_state_dict``, strict); a service checkpoint's digest over tree and tensors
(``checkpoints.decode``) and every weight's name, shape and dtype (``model_export.model_from_checkpoint``).
The graph is ``ndot_core.exchange.export_nir`` (docs/nir.md), written atomically.

Exit codes: 0 written; 1 the source is missing, corrupt or holds a model NIR cannot express;
2 bad flags, or the optional ``nir`` package is not installed (the message says how to install it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ndot_core.engine.models import build_model
from ndot_core.engine.network import SpikingNetwork
from ndot_core.exchange import DEFAULT_DT_S, ExchangeError, NIRUnavailable, export_nir, require_nir, write_nir
from ndot_core.experiments.config import RunConfig
from ndot_core.experiments.run_files import CheckpointError as RunCheckpointError
from ndot_core.experiments.run_files import load_checkpoint
from service.worker.checkpoints import SUFFIX, CheckpointError, CheckpointStore
from service.worker.model_export import FORMATS, read_checkpoint_model

EPILOG = """examples:
  ndot export runs/train --format nir --out model.nir          # an experiment run (ndot train --out runs/train)
  ndot export checkpoints/ --format nir --out live.nir         # the newest service checkpoint
  ndot export checkpoints/ckpt-20261130T120000.000000-v812.safetensors --out v812.nir --dt 0.01

The file is HDF5; read it with nir.read, import it with e.g. SpikingJelly's
spikingjelly.activation_based.nir_exchange.import_from_nir(graph, dt=<the same dt>). The LIF reset is
subtractive here and NIR's is to a value: see docs/nir.md for what to set in the importer.
"""


class SourceError(ValueError):
    """SOURCE is missing, corrupt, or of no known kind."""


def _dt(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"dt must be in (0, 60] seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndot export",
        description="Write a trained network (experiment run or service checkpoint) as a NIR file "
        "(Neuromorphic Intermediate Representation) for other simulators and neuromorphic hardware.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source",
        type=Path,
        metavar="RUN_OR_CHECKPOINT",
        help="experiment run folder or its checkpoint .json/.safetensors, or a service checkpoint "
        "file or folder (the newest readable one is taken)",
    )
    parser.add_argument(
        "--format", default="nir", choices=FORMATS, help="export format (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, required=True, help="file to write (replaced if it exists)")
    parser.add_argument(
        "--dt",
        type=_dt,
        default=_dt(os.environ.get("NDOT_NIR_DT", repr(DEFAULT_DT_S))),
        help="seconds an importer simulates one frame with; LIF tau = dt / (1 - lam); import with the "
        "same dt (it is in the file's metadata) [env NDOT_NIR_DT; default %(default)s, SpikingJelly's "
        "and snnTorch's default]",
    )
    return parser


def _run_model(path: Path) -> tuple[SpikingNetwork, str]:
    """The network of an experiment run's checkpoint (hash-checked, strict weight load)."""
    state, metadata = load_checkpoint(path)
    try:
        config = RunConfig.from_json(metadata["config"])
        channels, height, width = (int(v) for v in metadata["frame_shape"])
        model = build_model(
            config.model,
            in_channels=channels,
            num_classes=int(metadata["num_classes"]),
            input_size=(height, width),
            **config.model_args,
        )
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # RuntimeError: load_state_dict's mismatch
        raise SourceError(f"{path}: not a usable run checkpoint: {type(err).__name__}: {err}") from err
    return model.eval(), f"run {path} (epoch {metadata.get('epoch')})"


def _service_model(path: Path) -> tuple[SpikingNetwork, str]:
    model, version = read_checkpoint_model(path)
    return model, f"service checkpoint {path.name} (model_version {version})"


def load_model(source: Path) -> tuple[SpikingNetwork, str]:
    """``(model, description)`` of SOURCE (see the module docstring for the kinds)."""
    if source.is_dir():
        if (source / "checkpoint.json").is_file():
            return _run_model(source)
        newest = CheckpointStore(source).list()
        if not newest:
            raise SourceError(
                f"{source} holds neither checkpoint.json (a run) nor a readable service checkpoint"
            )
        return _service_model(source / f"{newest[-1].name}{SUFFIX}")
    if not source.is_file():
        raise SourceError(f"no such file or folder: {source}")
    if source.suffix == ".json" or (source.suffix == SUFFIX and source.with_suffix(".json").is_file()):
        return _run_model(source)
    if source.suffix == SUFFIX:
        return _service_model(source)
    raise SourceError(f"{source}: expected a run folder, a .json or a {SUFFIX} checkpoint")


def main(argv: Sequence[str] | None = None) -> int:
    """``ndot export``; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        require_nir()
        model, described = load_model(args.source)
        graph = export_nir(model, dt=args.dt)
        size = write_nir(graph, args.out)
    except NIRUnavailable as err:
        print(f"ndot export: {err}", file=sys.stderr)
        return 2
    except (SourceError, CheckpointError, RunCheckpointError, ExchangeError, OSError) as err:
        print(f"ndot export: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {model.name} from {described}, {len(graph.nodes)} NIR nodes, {size} bytes, "
        f"dt={args.dt:g} s (import with the same dt; LIF reset is subtractive: docs/nir.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
