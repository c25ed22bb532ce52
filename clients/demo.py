"""``make demo``: start ``ndot serve``, stream labelled N-MNIST through the client, watch accuracy rise.

1. Start ``python -m service.cli serve`` in the background (embedded bus, a temporary checkpoint
   folder, a free port, random API keys of its own) and wait for ``/readyz``; the client gets the
   ingest key. With ``--url`` the key comes from ``--api-key`` or ``NDOT_API_KEY``.
2. Pick the data: ``nmnist-small`` from the shared recordings (``$NDOT_SHARED_DATA`` or
   ``../shared/data`` beside the repository) when present; else tonic's N-MNIST test split when its
   host answers (downloaded once into ``runs/demo/data``); else the synthetic DVS camera.
3. Replay ``--samples`` samples (shuffled, seeded) as fast as the service takes them, printing one
   table row per ``--block`` samples: that block's prequential accuracy (each sample scored before
   anything of it is learned: the service's learn_at=sequence), its sample and step accuracy.
4. Write ``runs/demo/online_accuracy.png`` and ``runs/demo/replay.json``; stop the service (SIGTERM,
   wait, kill on timeout) whatever happens, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
from tqdm import tqdm

from clients.dvs_client import ClientConfig, replay
from clients.local_service import LocalService, ServiceStartError
from clients.scoreboard import SampleResult, Scoreboard, format_summary, plot_accuracy
from clients.sources import Sequence, SequenceSource, open_source, synthetic_source

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """``$NDOT_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("NDOT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def tonic_nmnist(save_to: Path, timeout_s: float = 5.0) -> SequenceSource | None:
    """N-MNIST's test split through tonic (downloads ~170 MB once), or None when its host is unreachable."""
    from tonic.datasets import NMNIST

    try:
        httpx.head(NMNIST.test_url, timeout=timeout_s, follow_redirects=True).raise_for_status()
    except httpx.HTTPError:
        return None
    from ndot_core.events.layout import from_tonic

    dataset = NMNIST(save_to=str(save_to), train=False)
    width, height = NMNIST.sensor_size[:2]

    def loader(index: int):
        def load() -> Sequence:
            events, label = dataset[index]
            return Sequence(
                f"nmnist-test-{index}", from_tonic(events, (width, height)), (width, height), int(label)
            )

        return load

    return SequenceSource([(f"nmnist-test-{i}", loader(i)) for i in range(len(dataset))])


def choose_source(kind: str, data_dir: Path, classes: int) -> tuple[str, str, SequenceSource]:
    """``(name, description, source)``: the first of shared nmnist-small, tonic's N-MNIST, the synthetic camera."""
    local = shared_data_dir() / "nmnist-small"
    if kind in ("auto", "nmnist-small") and (local / "labels.txt").is_file():
        return "N-MNIST subset", f"N-MNIST subset at {local}", open_source(local)
    if kind == "nmnist-small":
        raise SystemExit(f"demo: no N-MNIST subset at {local} (set NDOT_SHARED_DATA)")
    if kind in ("auto", "tonic"):
        source = tonic_nmnist(data_dir)
        if source is not None:
            return "N-MNIST test split", f"N-MNIST test split via tonic in {data_dir}", source
        if kind == "tonic":
            raise SystemExit("demo: N-MNIST download host unreachable")
        print(
            "demo: N-MNIST not found locally and its download host is unreachable: using the synthetic camera"
        )
    description = f"synthetic DVS camera ({classes} motion directions)"
    return "synthetic camera", description, synthetic_source(100_000, num_classes=classes)


class BlockTable:
    """Prints a row after 10, 25, 50 and every ``block`` finished samples: accuracy since the last row, and so far.

    ``preq``: samples the service scored (learn_at=sequence) that it predicted right before learning
    anything of them ("-" when it learns per step); ``acc``: last step's prediction == label; ``step acc``:
    correct labelled steps.
    """

    header = (
        f"{'samples':>8} {'preq(since)':>12} {'acc(since)':>11} {'step acc(since)':>16} {'preq(all)':>10} "
        f"{'acc(all)':>9} {'model v':>8} {'s':>7}"
    )

    def __init__(self, block: int) -> None:
        self.block = block
        self.rows: list[dict] = []
        self._correct = self._labelled = self._steps = self._correct_steps = 0
        self._scored = self._prequential = 0
        self._started_s = time.perf_counter()

    def __call__(self, sample: SampleResult, board: Scoreboard) -> None:
        if sample.prequential is not None:
            self._scored += 1
            self._prequential += sample.prequential
        if sample.correct is not None:
            self._labelled += 1
            self._correct += sample.correct
        self._steps += sample.steps
        self._correct_steps += sample.correct_steps
        done = len(board.samples)
        if done % self.block and not (done in (10, 25, 50) and done < self.block):
            return
        version = board.step_records[-1]["model_version"] if board.step_records else 0
        row = {
            "samples": len(board.samples),
            "block_prequential_accuracy": self._prequential / self._scored if self._scored else None,
            "prequential_accuracy": board.prequential_accuracy,
            "block_accuracy": self._correct / max(self._labelled, 1),
            "block_step_accuracy": self._correct_steps / max(self._steps, 1),
            "accuracy": board.sample_accuracy or 0.0,
            "model_version": version,
            "elapsed_s": time.perf_counter() - self._started_s,
        }
        self.rows.append(row)

        def pct(value: float | None, width: int) -> str:
            return f"{value:>{width}.1%}" if value is not None else f"{'-':>{width}}"

        tqdm.write(
            f"{row['samples']:>8} {pct(row['block_prequential_accuracy'], 12)} {row['block_accuracy']:>11.1%} "
            f"{row['block_step_accuracy']:>16.1%} {pct(row['prequential_accuracy'], 10)} {row['accuracy']:>9.1%} "
            f"{version:>8} {row['elapsed_s']:>7.1f}"
        )
        self._correct = self._labelled = self._steps = self._correct_steps = 0
        self._scored = self._prequential = 0


def score_held_out(sequences: Iterable[Sequence], config: ClientConfig, total: int) -> tuple[int, int]:
    """Stream ``sequences`` without their labels (inference only); ``(correct, scored)`` final predictions.

    The honest figure beside the online table: a labelled sample's final prediction sums steps made
    after the weights learned from its own earlier steps; these samples teach the model nothing.
    """
    labels: dict[int, int | None] = {}

    def unlabelled() -> Iterator[Sequence]:
        for index, sequence in enumerate(sequences):
            labels[index] = sequence.label
            yield dataclasses.replace(sequence, label=None)

    board = asyncio.run(replay(unlabelled(), config, total=total))
    scored = [s for s in board.samples if labels.get(s.index) is not None and s.final_prediction is not None]
    return sum(s.final_prediction == labels[s.index] for s in scored), len(scored)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (e.g. from a supervisor) unwinds like Ctrl-C, so the service is still stopped."""
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clients.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--samples", type=int, default=600, help="labelled samples to stream")
    parser.add_argument(
        "--held-out",
        type=int,
        default=100,
        help="then stream this many further samples unlabelled and score the final weights on them",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=100,
        help="samples per row of the accuracy table (plus rows at 10, 25, 50 when smaller)",
    )
    parser.add_argument(
        "--streams", type=int, default=4, help="concurrent client streams (batched by the worker)"
    )
    parser.add_argument(
        "--data",
        choices=("auto", "nmnist-small", "tonic", "synthetic"),
        default="auto",
        help="where the samples come from (auto: the first available, in this order)",
    )
    parser.add_argument("--classes", type=int, default=10, help="classes of the synthetic fallback")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs/demo"),
        help="where the plot, the JSON records, the service log and downloads go",
    )
    parser.add_argument("--plot", type=Path, help="PNG path (default OUT_DIR/online_accuracy.png)")
    parser.add_argument("--url", help="use this running service instead of starting `ndot serve`")
    parser.add_argument("--api-key", help="API key for --url (unset: $NDOT_API_KEY)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir: Path = args.out_dir
    plot_path = args.plot or out_dir / "online_accuracy.png"
    name, description, source = choose_source(args.data, out_dir / "data", args.classes)
    source = source.select(limit=args.samples + max(args.held_out, 0), shuffle=True, seed=args.seed)
    sequences = iter(source)
    labelled = min(args.samples, len(source))
    held_out = None
    service = None if args.url else LocalService(log_path=out_dir / "service.log", auth=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if service is not None:
            print(f"demo: starting ndot serve on {service.url} (log: {service.log_path}) ...")
            url = service.start()
        else:
            url = args.url
        print(
            f"demo: streaming {labelled} samples of the {description} to {url}, "
            f"{args.streams} streams, as fast as the service takes them"
        )
        print(
            "demo: online accuracy. preq: each sample scored before the service learned anything of it "
            "(test-then-train, learn_at=sequence; '-' when it learns per step); acc: the sample's last step; "
            f"step acc: each step predicted before its own update\n{BlockTable.header}"
        )
        table = BlockTable(args.block)
        api_key = (
            service.ingest_key if service is not None else args.api_key or os.environ.get("NDOT_API_KEY")
        )
        config = ClientConfig(
            url=url, streams=args.streams, realtime=False, stream_prefix="demo", api_key=api_key
        )
        board = asyncio.run(
            replay(itertools.islice(sequences, labelled), config, total=labelled, on_sample=table)
        )
        if len(source) > labelled:
            print(
                f"demo: held-out check: {len(source) - labelled} further samples, unlabelled (nothing learned)"
            )
            held_out = score_held_out(sequences, config, len(source) - labelled)
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    except ServiceStartError as error:
        print(f"demo: the service did not start: {error}", file=sys.stderr)
        return 1
    finally:
        if service is not None:
            code = service.stop()
            state = (
                "cleanly"
                if service.stopped_cleanly
                else ("killed" if service.killed else f"exit code {code}")
            )
            print(f"demo: service stopped ({state}; log: {service.log_path})")
            service.close()
    summary = board.summary()
    print("demo summary\n" + format_summary(summary))
    if board.scored_samples:
        print(
            f"demo: prequential accuracy {board.recent_prequential_accuracy:.1%} over the last "
            f"{min(board.window, board.scored_samples)} samples ({board.prequential_accuracy:.1%} over all "
            f"{board.scored_samples}): each predicted before anything of it was learned"
        )
    if held_out is not None and held_out[1]:
        print(
            f"demo: held-out accuracy {held_out[0] / held_out[1]:.1%} ({held_out[0]}/{held_out[1]} samples never "
            "streamed before, predicted by the final weights without their labels)"
        )
    board.write_json(out_dir / "replay.json")
    if plot_accuracy(board, plot_path, title=f"Online accuracy, {name} (predict, then learn)"):
        print(f"demo: wrote {plot_path} and {out_dir / 'replay.json'}")
    return 0 if summary["steps"] else 1


if __name__ == "__main__":
    sys.exit(main())
