"""Online accuracy, latency and throughput of a replay, from the service's responses.

Three accuracies; each prediction is made before the service learns from that step's (or sample's) label:

    step accuracy        = correct labelled steps / labelled steps     (the service's ndot_online_accuracy)
    sample accuracy      = samples whose last step's prediction == label / labelled samples
                           (the prediction of the readout summed over the whole sequence, as N-MNIST is
                           scored); with learn_at=step a sample's later steps follow updates on its
                           earlier steps, so this is optimistic
    prequential accuracy = samples whose scored prediction was right / samples the service scored
                           (learn_at=sequence: the ``sequence`` object of the reply to the packet that
                           ended the sample; predicted before anything of the sample was learned,
                           the service's ndot_prequential_accuracy)

each overall and over the last ``window`` steps / samples.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

#: The accuracy curves start once this many samples are averaged.
MIN_SAMPLES_PLOTTED = 10


@dataclass
class SampleResult:
    """What became of one sequence: its steps and whether its final prediction was right."""

    index: int
    name: str
    stream_id: str
    label: int | None
    events: int = 0
    packets: int = 0
    steps: int = 0
    correct_steps: int = 0
    final_prediction: int | None = None
    #: learn_at=sequence: whether the service's scored prediction of this sample was right (None: not scored).
    prequential: bool | None = None

    @property
    def correct(self) -> bool | None:
        """Final prediction == label; None when unlabelled or no step came back."""
        if self.label is None or self.final_prediction is None:
            return None
        return self.final_prediction == self.label


@dataclass
class Scoreboard:
    """Everything a replay measured; ``summary()`` is the closing report."""

    window: int = 100
    started_s: float = field(default_factory=time.perf_counter)
    finished_s: float | None = None
    outcomes: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    schedule_lag_s: list[float] = field(default_factory=list)
    step_records: list[dict] = field(default_factory=list)
    samples: list[SampleResult] = field(default_factory=list)
    events_sent: int = 0
    retries: int = 0
    labelled_steps: int = 0
    correct_steps: int = 0
    labelled_samples: int = 0
    correct_samples: int = 0
    scored_samples: int = 0
    prequential_correct: int = 0
    _recent_steps: deque = field(default_factory=deque)
    _recent_samples: deque = field(default_factory=deque)
    _recent_prequential: deque = field(default_factory=deque)

    def record_steps(
        self, sample: SampleResult, steps: list[dict], latency_s: float, sequence: dict | None = None
    ) -> None:
        """Steps one 200 response reported for ``sample`` (and the ``sequence`` it ended, when scored)."""
        if sequence is not None and sequence.get("correct") is not None:
            sample.prequential = bool(sequence["correct"])
        now = time.perf_counter() - self.started_s
        for step in steps:
            predicted = int(step["predicted"])
            label = step.get("label")
            correct = None if label is None else predicted == int(label)
            sample.steps += 1
            sample.final_prediction = predicted
            if correct is not None:
                self.labelled_steps += 1
                self.correct_steps += correct
                sample.correct_steps += correct
                self._push(self._recent_steps, correct)
            self.step_records.append(
                {
                    "time_s": round(now, 6),
                    "stream_id": sample.stream_id,
                    "sample": sample.index,
                    "name": sample.name,
                    "step": int(step["step"]),
                    "predicted": predicted,
                    "label": label,
                    "correct": correct,
                    "learned": bool(step.get("learned", False)),
                    "model_version": int(step.get("model_version", -1)),
                    "latency_s": round(latency_s, 6),
                }
            )

    def finish_sample(self, sample: SampleResult) -> None:
        self.samples.append(sample)
        if sample.correct is not None:
            self.labelled_samples += 1
            self.correct_samples += sample.correct
            self._push(self._recent_samples, sample.correct)
        if sample.prequential is not None:
            self.scored_samples += 1
            self.prequential_correct += sample.prequential
            self._push(self._recent_prequential, sample.prequential)

    def _push(self, recent: deque, correct: bool) -> None:
        recent.append(correct)
        if len(recent) > self.window:
            recent.popleft()

    @property
    def step_accuracy(self) -> float | None:
        return self.correct_steps / self.labelled_steps if self.labelled_steps else None

    @property
    def recent_step_accuracy(self) -> float | None:
        return float(np.mean(self._recent_steps)) if self._recent_steps else None

    @property
    def sample_accuracy(self) -> float | None:
        return self.correct_samples / self.labelled_samples if self.labelled_samples else None

    @property
    def recent_sample_accuracy(self) -> float | None:
        return float(np.mean(self._recent_samples)) if self._recent_samples else None

    @property
    def prequential_accuracy(self) -> float | None:
        return self.prequential_correct / self.scored_samples if self.scored_samples else None

    @property
    def recent_prequential_accuracy(self) -> float | None:
        return float(np.mean(self._recent_prequential)) if self._recent_prequential else None

    def summary(self) -> dict:
        """Closing figures: counts, accuracies, latency percentiles, throughput."""
        elapsed_s = (self.finished_s or time.perf_counter()) - self.started_s
        latencies = np.asarray(self.latencies_s)
        return {
            "samples": len(self.samples),
            "packets": dict(self.outcomes),
            "retries_503": self.retries,
            "events": self.events_sent,
            "steps": len(self.step_records),
            "labelled_steps": self.labelled_steps,
            "step_accuracy": self.step_accuracy,
            f"step_accuracy_last_{self.window}": self.recent_step_accuracy,
            "sample_accuracy": self.sample_accuracy,
            f"sample_accuracy_last_{self.window}": self.recent_sample_accuracy,
            "scored_samples": self.scored_samples,
            "prequential_accuracy": self.prequential_accuracy,
            f"prequential_accuracy_last_{self.window}": self.recent_prequential_accuracy,
            "latency_p50_ms": float(np.percentile(latencies, 50) * 1e3) if latencies.size else None,
            "latency_p99_ms": float(np.percentile(latencies, 99) * 1e3) if latencies.size else None,
            "schedule_lag_max_s": max(self.schedule_lag_s) if self.schedule_lag_s else None,
            "elapsed_s": elapsed_s,
            "events_per_s": self.events_sent / elapsed_s if elapsed_s > 0 else None,
            "first_errors": self.errors[:10],
        }

    def write_json(self, path: Path) -> None:
        """``{"summary", "samples": [...], "steps": [per-step records], "packet_latencies_s": [...]}``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        samples = [{**asdict(s), "correct": s.correct} for s in self.samples]
        payload = {
            "summary": self.summary(),
            "samples": samples,
            "steps": self.step_records,
            "packet_latencies_s": [round(x, 6) for x in self.latencies_s],
        }
        path.write_text(json.dumps(payload, indent=1))


def format_summary(summary: dict) -> str:
    """The summary as aligned ``name  value`` lines."""

    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    rows = [(name, show(value)) for name, value in summary.items() if name != "first_errors" or value]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    cumulative = np.cumsum(np.r_[0.0, values])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def plot_accuracy(
    board: Scoreboard, path: Path, title: str = "Online accuracy (predict, then learn)"
) -> bool:
    """PNG of sample and step accuracy over the last ``window`` samples vs samples seen; False if none labelled."""
    scored = [s for s in board.samples if s.correct is not None]
    if not scored:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = np.arange(1, len(scored) + 1)
    sample_correct = np.array([float(s.correct) for s in scored])
    step_fraction = np.array([s.correct_steps / max(s.steps, 1) for s in scored])
    shown = seen >= min(MIN_SAMPLES_PLOTTED, len(scored))  # a mean over 1-9 samples is noise
    figure, axes = plt.subplots(figsize=(7, 4))
    curves = [
        (sample_correct, f"sample (final prediction), last {board.window}"),
        (step_fraction, f"step, last {board.window} samples"),
    ]
    for values, label in curves:
        axes.plot(seen[shown], rolling_mean(values, board.window)[shown], label=label)
    if all(
        s.prequential is not None for s in scored
    ):  # dashed: under learn_at=sequence it is the sample curve
        prequential = np.array([float(s.prequential) for s in scored])
        axes.plot(
            seen[shown],
            rolling_mean(prequential, board.window)[shown],
            "k--",
            linewidth=1,
            label=f"prequential (scored before learning), last {board.window}",
        )
    axes.set(xlabel="labelled samples seen", ylabel="accuracy", ylim=(0, 1), title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
