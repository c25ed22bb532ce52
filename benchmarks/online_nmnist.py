"""Online (prequential) accuracy on N-MNIST through the worker's own path, without HTTP.

    .venv/bin/python benchmarks/online_nmnist.py --seed 0 1 2 --with-old-defaults   # defaults vs pre-tuning
    .venv/bin/python benchmarks/online_nmnist.py --optimizer sgd adam --lr 0.03 2e-4 --window-us 10000 20000
    .venv/bin/python benchmarks/online_nmnist.py --learn-at sequence step --seed 0 1 2   # test-then-train vs per step
    .venv/bin/python benchmarks/online_nmnist.py --seed 0 1 2 --replay-recent 0 2 --replay-memory-mb 64

Replays the ``nmnist-small`` recordings as ``make demo`` does: the same seeded shuffle
(``SequenceSource.select``), cut into the client's 10 ms packets (``clients.packets.packetize``,
``start``/``end`` flags, the label on every packet), ``--streams`` concurrent streams. The packets
go through the service's own ``Batcher`` (``StreamFramer`` per stream, fresh state rows at each
sequence start, one batched ``OnlineLearner.step`` per tick, labels on every step). Each round,
every stream whose last packet was answered posts its next packet with probability ``--ready``
(a ``wait=true`` client), then the batcher runs one worker round: at most the service's
``NDOT_MAX_TICKS_PER_ROUND`` ticks, finished packets answered, the rest (and learn_at=sequence's
replays) go on in the next rounds. 0.35 with 4 streams gives the ~1.5 live rows a tick of the live
demo, 1 gives lockstep batches.

Four accuracies per configuration (model, learner and framing from the service's settings unless
given; every option takes one or more values and the grid of all combinations runs, 1 thread):

- ``acc``: what the service's step replies say of a sample, its last step's prediction (argmax of the
  logits summed over the sequence). With ``--learn-at step`` each step predicts before it learns,
  but later steps run on weights that already learned the sample's own label from its earlier
  steps: an optimistic figure. With ``--learn-at sequence`` nothing of the sample is learned
  before its end, so it equals ``preq``.
- ``preq``: the service's own prequential figure (``ndot_prequential_accuracy``, learn_at=sequence
  only): the sequence's prediction at its end, scored before its replay learns it.
- ``frozen``: the weights as they were when the sample started predict all of it (no_grad), so
  nothing of its label can help; an honest prequential accuracy under either ``--learn-at``.
- ``held``: the final weights on the recordings never streamed (inference only): the held-out protocol.

The verdict compares the best configuration's seed-mean ``frozen`` accuracy over the last 100
samples with ``--target``; the *held-out protocol* line, the best seed-mean ``held`` with
``--held-out-target`` (issue 11: 90 %). The learner uses the service's step backend and, with
learn_at=sequence, its replay of recent sequences (``--replay-recent``, ``--replay-memory-mb``;
docs/accuracy.md). Writes ``results/online_nmnist.json`` and ``results/online_nmnist.png``
(the service's sample accuracy, rolling over 50 samples, per run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.packets import encode_body, packetize  # noqa: E402
from clients.sources import Sequence, open_source  # noqa: E402
from ndot_core import OnlineLearner, build_model  # noqa: E402
from ndot_core.events.framing import StreamFramer  # noqa: E402
from service.bus.messages import EventsPacket  # noqa: E402
from service.metrics import ServiceMetrics  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.worker.batcher import Batcher  # noqa: E402
from service.worker.sequences import SequenceLimits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
LAST = 100  # the "last N samples" of the verdict
PACKET_US = 10_000  # the demo client's packet length
#: The service's defaults before tuning (SGD at the learner's lr 0.1, 10 ms windows), for ``--with-old-defaults``.
OLD_DEFAULTS = {
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "steps_per_sample": 30,
    "window_us": 10_000,
    "replay_recent": 0,
}


@dataclass(frozen=True)
class Config:
    """One online run: learner, framing and model knobs (``None`` = the service's default)."""

    optimizer: str
    lr: float | None
    momentum: float
    alpha: float
    steps_per_sample: int
    mode: str
    rule: str
    window_us: int
    model_args: str  # "key=value,key=value" for build_model (empty = defaults)
    streams: int
    ready: float  # probability a busy stream posts its next packet in a round (1 = lockstep)
    seed: int
    learn_at: str = "sequence"  # the service's NDOT_LEARN_AT
    replay_recent: int = 2  # re-learns of recent sequences per new one (learn_at=sequence; service default)
    replay_memory_mb: float = 64.0  # their memory (MiB; the service's default)

    def label(self) -> str:
        lr = "default" if self.lr is None else f"{self.lr:g}"
        text = (
            f"{self.optimizer} lr={lr} T={self.steps_per_sample} a={self.alpha:g} w={self.window_us // 1000}ms "
            f"B={self.streams}"
        )
        if self.ready < 1:
            text += f" ready={self.ready:g}"
        if self.optimizer == "sgd":
            text += f" m={self.momentum:g}"
        if self.mode != "online" or self.rule != "ndot":
            text += f" {self.rule}/{self.mode}"
        text += f" learn@{self.learn_at}"
        if self.replay_recent and self.learn_at == "sequence":
            text += f" replay={self.replay_recent}/{self.replay_memory_mb:g}MiB"
        text += f" seed={self.seed}" if self.seed else ""
        return text + (f" [{self.model_args}]" if self.model_args else "")


def parse_model_args(text: str) -> dict[str, Any]:
    """``"channels=16/32/32,hidden=256"`` -> ``{"channels": (16, 32, 32), "hidden": 256}``."""
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        parts = [json.loads(v) for v in value.split("/")]
        options[key] = tuple(parts) if len(parts) > 1 else parts[0]
    return options


def load_samples(data_dir: Path, count: int, seed: int) -> tuple[list[Sequence], list[Sequence]]:
    """``(streamed, held_out)``: the first ``count`` recordings after the demo's seeded shuffle, and the rest."""
    shuffled = list(open_source(data_dir).select(shuffle=True, seed=seed))
    return shuffled[:count], shuffled[count:]


def sequence_frames(sequence: Sequence, window_us: int, input_size: tuple[int, int]) -> torch.Tensor:
    """The frames ``[T, 2, H, W]`` the service makes of a whole sequence (push all, then flush)."""
    framer = StreamFramer(sequence.sensor_size, window_us=window_us, output_size=input_size)
    return torch.from_numpy(np.stack(framer.push(sequence.events) + framer.flush()))


@torch.no_grad()
def predict_frozen(learner: OnlineLearner, frames: torch.Tensor) -> int:
    """Sample prediction of the current weights, nothing learned: argmax of the logits summed over ``frames``."""
    state = learner.new_state(1)
    for frame in frames:
        learner.step(frame.unsqueeze(0), None, state)
    return int(learner.predict(state)[0])


@torch.no_grad()
def held_out_accuracy(learner: OnlineLearner, samples: list[Sequence], window_us: int) -> float:
    """Accuracy of the final weights on recordings never streamed (inference only, batched by length)."""
    if not samples:
        return float("nan")
    by_length: dict[int, list[tuple[torch.Tensor, int]]] = {}
    for sequence in samples:
        frames = sequence_frames(sequence, window_us, learner.model.input_size)
        by_length.setdefault(len(frames), []).append((frames, int(sequence.label)))
    correct = 0
    for items in by_length.values():
        frames = torch.stack([f for f, _ in items], dim=1)  # [T, B, 2, H, W]
        state = learner.new_state(len(items))
        for frame in frames:
            learner.step(frame, None, state)
        correct += int((learner.predict(state) == torch.tensor([y for _, y in items])).sum())
    return correct / len(samples)


def replay(
    config: Config,
    samples: list[Sequence],
    held_out: list[Sequence],
    settings: Settings,
    *,
    frozen: bool = True,
    init_seed: int | None = None,
    sequence_limits: SequenceLimits | None = None,
    prepare: Callable[[OnlineLearner], None] | None = None,
    on_sample: Callable[[OnlineLearner, int], None] | None = None,
    before_scoring: Callable[[OnlineLearner], None] | None = None,
    scored_sets: dict[str, list[Sequence]] | None = None,
) -> dict[str, Any]:
    """Stream ``samples`` through a fresh learner and batcher; return accuracies and per-sample outcomes.

    Each round, every busy stream posts its next packet with probability ``config.ready`` (1 =
    lockstep); then the batcher drains. Before a sample's first packet, the current weights also
    predict the whole sample without learning (``frozen``: nothing of its own label can leak in;
    ``frozen=False`` skips it). ``init_seed`` seeds the weights (default: the service's seed),
    ``sequence_limits`` goes to the batcher (learn_at=sequence), ``prepare(learner)`` runs once
    before streaming, ``on_sample(learner, index)`` before each sample's first packet,
    ``before_scoring(learner)`` after the last replay; the final weights score ``held_out`` and each of ``scored_sets`` (``<name>_accuracy``).
    """
    torch.manual_seed(settings.seed if init_seed is None else init_seed)
    model = build_model(
        settings.model,
        in_channels=settings.in_channels,
        num_classes=settings.num_classes,
        input_size=settings.input_size,
        **parse_model_args(config.model_args),
    )
    learner = OnlineLearner(
        model,
        rule=config.rule,
        mode=config.mode,
        optimizer=config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        alpha=config.alpha,
        steps_per_sample=config.steps_per_sample,
        backend=settings.step_backend,
    )
    if prepare is not None:
        prepare(learner)
    batcher = Batcher(
        learner,
        config.streams,
        config.window_us,
        ServiceMetrics(),
        learn_at=config.learn_at,
        sequence_limits=sequence_limits,
    )
    rng = np.random.default_rng(config.seed)
    queue = iter(enumerate(samples))
    #: per stream: [index, sequence, packets, next packet, entry in flight or None]
    streams: list[list | None] = [None] * config.streams
    correct = np.zeros(len(samples), dtype=bool)
    frozen_correct = np.zeros(len(samples), dtype=bool)
    prequential = np.full(len(samples), np.nan)  # learn_at=sequence: the service's score of each sample
    steps = np.zeros(len(samples), dtype=np.int64)
    correct_steps = np.zeros(len(samples), dtype=np.int64)
    entry = ticks = 0
    started = time.perf_counter()
    while True:
        busy = 0
        for row in range(config.streams):
            if streams[row] is None:
                taken = next(queue, None)
                if taken is None:
                    continue
                index, sequence = taken
                if on_sample is not None:
                    on_sample(learner, index)
                if frozen:
                    frames = sequence_frames(sequence, config.window_us, settings.input_size)
                    frozen_correct[index] = predict_frozen(learner, frames) == sequence.label
                streams[row] = [index, sequence, packetize(sequence.events["t"], PACKET_US), 0, None]
            busy += 1
            index, sequence, packets, at, in_flight = streams[row]
            if in_flight is not None or (config.ready < 1 and rng.random() >= config.ready):
                continue
            packet = packets[at]
            width, height = sequence.sensor_size
            body = encode_body(sequence.events[packet.lo : packet.hi])
            entry_id = f"{entry}-0"
            entry += 1
            batcher.push_packet(
                entry_id,
                f"s{row}",
                EventsPacket(body, width, height, sequence.label, packet.start, packet.end),
            )
            streams[row][3:] = [at + 1, entry_id]
        if not busy:
            break
        idle = all(stream is None or stream[4] is None for stream in streams)  # no packet waits
        ticks += batcher.drain(settings.max_ticks_per_round, idle=idle)  # one worker round
        for row in range(config.streams):
            if streams[row] is None or streams[row][4] is None:
                continue
            index, sequence, packets, at, entry_id = streams[row]
            taken = batcher.take(entry_id)
            if taken is None:  # steps still queued: answered in a later round
                continue
            for result in taken[0]:
                steps[index] += 1
                correct_steps[index] += result["predicted"] == sequence.label
                correct[index] = result["predicted"] == sequence.label  # the last step's prediction stands
            scored = batcher.take_sequence(entry_id)
            if scored is not None and scored["correct"] is not None:
                prequential[index] = scored["correct"]
            streams[row][4] = None
            if at == len(packets):
                streams[row] = None
    ticks += batcher.drain()  # the last replays
    if before_scoring is not None:
        before_scoring(learner)
    seconds = time.perf_counter() - started
    last = min(LAST, len(samples))
    return {
        "config": asdict(config),
        "label": config.label(),
        "samples": len(samples),
        "sample_accuracy": float(correct.mean()),
        f"sample_accuracy_last_{LAST}": float(correct[-last:].mean()),
        "prequential_accuracy": float(np.mean(prequential)),
        f"prequential_accuracy_last_{LAST}": float(np.mean(prequential[-last:])),
        "frozen_accuracy": float(frozen_correct.mean()),
        f"frozen_accuracy_last_{LAST}": float(frozen_correct[-last:].mean()),
        "held_out_accuracy": held_out_accuracy(learner, held_out, config.window_us),
        "held_out_samples": len(held_out),
        **{
            f"{name}_accuracy": held_out_accuracy(learner, sequences, config.window_us)
            for name, sequences in (scored_sets or {}).items()
        },
        "step_accuracy": float(correct_steps.sum() / max(steps.sum(), 1)),
        "steps_per_sample": float(steps.mean()),
        "rows_per_tick": float(steps.sum() / max(ticks, 1)),
        "live_steps_per_s": float(steps.sum() / seconds),
        "learned_steps": int(
            batcher.metrics.registry.get_sample_value("ndot_steps_total", {"kind": "learn"})
        ),
        "optimizer_steps": learner.version,
        "seconds": seconds,
        "correct": correct.astype(int).tolist(),
        "frozen_correct": frozen_correct.astype(int).tolist(),
    }


def plot(results: list[dict[str, Any]], path: Path, window: int) -> None:
    """Rolling sample accuracy per run: frozen (solid, the honest one) and the service's (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rolling(values: np.ndarray) -> np.ndarray:
        cumulative = np.cumsum(np.r_[0.0, values])
        ends = np.arange(1, values.size + 1)
        return (cumulative[ends] - cumulative[np.maximum(ends - window, 0)]) / np.minimum(ends, window)

    figure, axes = plt.subplots(figsize=(9, 5))
    for result in results:
        frozen = np.asarray(result["frozen_correct"], dtype=float)
        seen = np.arange(1, frozen.size + 1)
        shown = seen >= 10  # a mean over fewer samples is noise
        (line,) = axes.plot(seen[shown], rolling(frozen)[shown], label=result["label"], linewidth=1.2)
        axes.plot(
            seen[shown],
            rolling(np.asarray(result["correct"], dtype=float))[shown],
            color=line.get_color(),
            linestyle="--",
            linewidth=0.8,
        )
    axes.set(
        xlabel="samples streamed",
        ylabel=f"sample accuracy, last {window}",
        ylim=(0, 1),
        title="Online accuracy on N-MNIST: frozen (solid) and as the service reports it (dashed)",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = Path(os.environ.get("NDOT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "nmnist-small"
    parser.add_argument("--data", type=Path, default=data, help="labelled folder (labels.txt + train/*.bs2)")
    parser.add_argument("--samples", type=int, default=600, help="samples streamed (one pass)")
    parser.add_argument(
        "--seed", type=int, nargs="+", default=[0], help="sample order seeds (the demo's --seed)"
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[4], help="concurrent streams (batch rows)")
    parser.add_argument("--optimizer", nargs="+", default=[defaults.optimizer], choices=("sgd", "adam"))
    parser.add_argument("--lr", type=float, nargs="+", default=[defaults.lr], help="learning rate(s)")
    parser.add_argument("--momentum", type=float, nargs="+", default=[defaults.momentum], help="SGD momentum")
    parser.add_argument(
        "--alpha", type=float, nargs="+", default=[defaults.alpha], help="MSE weight of Eq. 13"
    )
    parser.add_argument(
        "--steps-per-sample",
        type=int,
        nargs="+",
        default=[defaults.steps_per_sample],
        help="T: the loss is divided by it (and NDOT_A steps every T labelled steps)",
    )
    parser.add_argument("--mode", nargs="+", default=[defaults.mode], choices=("online", "accumulate"))
    parser.add_argument(
        "--learn-at",
        nargs="+",
        default=[defaults.learn_at],
        choices=("sequence", "step"),
        help="the service's NDOT_LEARN_AT: sequence = test-then-train (replay after the end), step = per step",
    )
    parser.add_argument(
        "--rule", nargs="+", default=[defaults.rule], choices=("ndot", "ndot_reference", "ottt")
    )
    parser.add_argument(
        "--window-us", type=int, nargs="+", default=[defaults.window_us], help="frame window (µs)"
    )
    parser.add_argument(
        "--model-args",
        nargs="+",
        default=[""],
        help='build_model options, e.g. "channels=16/32/32,hidden=256" ("" = defaults)',
    )
    parser.add_argument(
        "--with-old-defaults",
        action="store_true",
        help="also run each configuration with the pre-tuning defaults (SGD lr 0.1, T=30, 10 ms)",
    )
    parser.add_argument(
        "--ready",
        type=float,
        nargs="+",
        default=[0.35],
        help="probability a busy stream posts in a round: 1 = lockstep batches of --streams rows; "
        "0.35 with 4 streams gives the ~1.5 rows a tick the live demo sees",
    )
    parser.add_argument(
        "--replay-recent",
        type=int,
        nargs="+",
        default=[defaults.replay_recent],
        help="learn_at=sequence: re-learns of recent sequences after each new one (NDOT_REPLAY_RECENT)",
    )
    parser.add_argument(
        "--replay-memory-mb",
        type=float,
        nargs="+",
        default=[defaults.replay_memory_bytes / 2**20],
        help="their memory in MiB (NDOT_REPLAY_MEMORY_BYTES / 2**20)",
    )
    parser.add_argument(
        "--target", type=float, default=0.8, help=f"verdict: sample accuracy over the last {LAST}"
    )
    parser.add_argument(
        "--held-out-target",
        type=float,
        default=0.9,
        help="verdict of the held-out protocol: final weights on the unstreamed recordings",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "online_nmnist.json", help="JSON (PNG beside it)"
    )
    return parser


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean figures per configuration over its seeds, in the order first run."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(Config(**{**result["config"], "seed": 0}).label(), []).append(result)
    keys = (
        "sample_accuracy",
        f"sample_accuracy_last_{LAST}",
        "prequential_accuracy",
        f"prequential_accuracy_last_{LAST}",
        "frozen_accuracy",
        f"frozen_accuracy_last_{LAST}",
        "held_out_accuracy",
        "step_accuracy",
        "seconds",
    )
    return [
        {
            "label": label,
            "seeds": [r["config"]["seed"] for r in group],
            **{k: float(np.mean([r[k] for r in group])) for k in keys},
        }
        for label, group in groups.items()
    ]


def row(result: dict[str, Any]) -> str:
    return (
        f"{result['label']:<66} {result['sample_accuracy']:>6.1%} {result[f'sample_accuracy_last_{LAST}']:>7.1%} "
        f"{result['prequential_accuracy']:>6.1%} {result[f'prequential_accuracy_last_{LAST}']:>7.1%} "
        f"{result['frozen_accuracy']:>6.1%} {result[f'frozen_accuracy_last_{LAST}']:>6.1%} "
        f"{result['held_out_accuracy']:>6.1%} {result['step_accuracy']:>6.1%} {result['seconds']:>6.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    defaults = Settings(auth="off")
    args = build_parser(defaults).parse_args(argv)
    torch.set_num_threads(1)
    grid = [
        Config(*values)
        for values in itertools.product(
            args.optimizer,
            args.lr,
            args.momentum,
            args.alpha,
            args.steps_per_sample,
            args.mode,
            args.rule,
            args.window_us,
            args.model_args,
            args.streams,
            args.ready,
            args.seed,
            args.learn_at,
            args.replay_recent,
            args.replay_memory_mb,
        )
    ]
    if args.with_old_defaults:
        grid += [Config(**{**asdict(config), **OLD_DEFAULTS}) for config in grid]
        grid = list(dict.fromkeys(grid))
    data = {seed: load_samples(args.data, args.samples, seed) for seed in args.seed}
    print(
        f"online accuracy, {args.samples} N-MNIST samples streamed once;\n"
        f"acc = the service's sample prediction (last step, summed logits), preq = its test-then-train score\n"
        f"(learn_at=sequence), frozen = the weights at the sample's start predict it (its own label cannot\n"
        f"help), held-out = final weights on the {len(data[args.seed[0]][1])} unstreamed recordings"
    )
    header = (
        f"{'configuration':<66} {'acc':>6} {f'acc@{LAST}':>7} {'preq':>6} {f'preq@{LAST}':>7} {'frozen':>6} "
        f"{f'fr@{LAST}':>6} {'held':>6} {'step':>6} {'s':>6}"
    )
    print(f"{header} {'rows':>5}")
    results = []
    for config in grid:
        streamed, held_out = data[config.seed]
        limits = SequenceLimits(
            defaults.sequence_max_frames,
            defaults.sequence_max_bytes,
            defaults.sequences_held,
            replay_recent=config.replay_recent,
            replay_memory_bytes=int(config.replay_memory_mb * 2**20),
        )
        result = replay(config, streamed, held_out, defaults, sequence_limits=limits)
        results.append(result)
        print(f"{row(result)} {result['rows_per_tick']:>5.2f}", flush=True)
    means = summarise(results)
    if len(means) < len(results):
        print(f"mean over seeds {args.seed}\n{header}")
        for mean in means:
            print(row(mean))
    key = f"frozen_accuracy_last_{LAST}"
    best = max(means, key=lambda r: r[key])
    verdict = "PASS" if best[key] >= args.target else "FAIL"
    print(
        f"verdict: {verdict}: best frozen accuracy over the last {LAST} samples {best[key]:.1%} "
        f"(service's {best[f'sample_accuracy_last_{LAST}']:.1%}, prequential "
        f"{best[f'prequential_accuracy_last_{LAST}']:.1%}, held-out {best['held_out_accuracy']:.1%}; "
        f"target {args.target:.0%}): {best['label']}"
    )
    held = max(means, key=lambda r: r["held_out_accuracy"])
    spread = [
        r["held_out_accuracy"]
        for r in results
        if Config(**{**r["config"], "seed": 0}).label() == held["label"]
    ]
    held_verdict = "PASS" if held["held_out_accuracy"] >= args.held_out_target else "FAIL"
    print(
        f"held-out protocol: {held_verdict}: final weights on the {len(data[args.seed[0]][1])} recordings never "
        f"streamed {held['held_out_accuracy']:.1%} (min {min(spread):.1%}, max {max(spread):.1%} over seeds "
        f"{held['seeds']}; target {args.held_out_target:.0%}): {held['label']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "samples": args.samples,
        "target": args.target,
        "verdict": verdict,
        "held_out_target": args.held_out_target,
        "held_out_verdict": held_verdict,
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "means": means,
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=1))
    plot(results, args.out.with_suffix(".png"), window=50)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
