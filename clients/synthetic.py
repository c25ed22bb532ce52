"""Synthetic DVS camera: moving patterns of known classes through a DVS pixel model.

A stand-in for a real event camera on machines without recordings. Each sample renders a moving
pattern of class ``k`` as a continuous intensity image ``I(x, y, t)`` and turns it into events with
the standard DVS pixel model (Lichtsteiner et al., 2008; as in ESIM / v2e):

    L(x, y, t) = log(I(x, y, t) + eps)
    an ON event fires each time  L - L_ref >= +C_on  (then L_ref += C_on),
    an OFF event fires each time L - L_ref <= -C_off (then L_ref -= C_off),

with a per-pixel reference level ``L_ref`` (set at the first frame), per-pixel thresholds
``C ~ N(contrast_threshold, threshold_sigma)`` (fixed-pattern mismatch), event timestamps linearly
interpolated between the two render steps a crossing lies between, a per-pixel refractory period
(a crossing less than ``refractory_us`` after the pixel's last event is dropped; the reference still
moves), and optional Poisson shot-noise events at ``noise_rate_hz`` per pixel.

Written by hand: the maintained emulators (v2e, ESIM) need video files, OpenCV / CUDA builds or C++
toolchains; this model is a hundred lines of numpy and deterministic under a seed.

Pattern families (``pattern=``):
  * ``"directions"``: a bright or dark disk starts near the centre and moves in direction
    ``2 pi k / K`` (class = direction of motion; the event-count map is a streak).
  * ``"bars"``: a bar at orientation ``pi k / K`` through the centre oscillates along its normal
    (class = orientation; the event-count map is a band at that angle).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ndot_core.events.layout import EVENT_DTYPE

PATTERNS = ("directions", "bars")


class SyntheticError(ValueError):
    """A synthetic-camera parameter is out of range (message names the parameter and value)."""


@dataclass(frozen=True)
class SyntheticCamera:
    """Renders labelled event sequences; ``sample(i)`` is a pure function of ``(seed, i)``.

    Units: times in µs, sizes in pixels, rates in Hz, thresholds in log-intensity units.
    """

    width: int = 34
    height: int = 34
    num_classes: int = 10
    pattern: str = "directions"
    duration_us: int = 300_000
    render_step_us: int = 1_000
    contrast_threshold: float = 0.2
    threshold_sigma: float = 0.02
    refractory_us: int = 100
    noise_rate_hz: float = 0.0
    background: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "width": self.width >= 8,
            "height": self.height >= 8,
            "num_classes": self.num_classes >= 2,
            "pattern": self.pattern in PATTERNS,
            "duration_us": self.duration_us >= self.render_step_us,
            "render_step_us": self.render_step_us >= 1,
            "contrast_threshold": 0.01 <= self.contrast_threshold <= 2.0,
            "threshold_sigma": self.threshold_sigma >= 0,
            "refractory_us": self.refractory_us >= 0,
            "noise_rate_hz": self.noise_rate_hz >= 0,
            "background": 0.0 < self.background < 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise SyntheticError(f"SyntheticCamera: {name}={getattr(self, name)!r} is out of range")

    @property
    def sensor_size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return (self.width, self.height)

    def label_of(self, index: int) -> int:
        """Class of sample ``index``: a seeded shuffle of a balanced cycle through the classes."""
        block, pos = divmod(index, self.num_classes)
        order = np.random.default_rng([self.seed, 7919, block]).permutation(self.num_classes)
        return int(order[pos])

    def sample(self, index: int) -> tuple[np.ndarray, int]:
        """Events (EVENT_DTYPE, sorted by t) and the class of sample ``index``."""
        label = self.label_of(index)
        return self.render(label, np.random.default_rng([self.seed, index])), label

    def samples(self, count: int, start: int = 0) -> Iterator[tuple[np.ndarray, int]]:
        """Samples ``start .. start + count - 1``."""
        for index in range(start, start + count):
            yield self.sample(index)

    def render(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """Events of one sample of class ``label`` with per-sample jitter drawn from ``rng``."""
        if not 0 <= label < self.num_classes:
            raise SyntheticError(f"label={label} is outside 0..{self.num_classes - 1}")
        times_us = np.arange(0, self.duration_us + 1, self.render_step_us, dtype=np.int64)
        scene = _scene(self, label, rng)
        frames = (scene(float(t) * 1e-6) for t in times_us)
        events = DVSPixelModel(self, rng).convert(frames, times_us)
        return events

    def static_scene_events(self, rng: np.random.Generator) -> np.ndarray:
        """Events of a scene that never changes: only noise events can occur."""
        times_us = np.arange(0, self.duration_us + 1, self.render_step_us, dtype=np.int64)
        still = np.full((self.height, self.width), 0.6, dtype=np.float64)
        return DVSPixelModel(self, rng).convert((still for _ in times_us), times_us)


def _scene(camera: SyntheticCamera, label: int, rng: np.random.Generator):
    """A function ``t_s -> intensity image [H, W] in (0, 1]`` for one jittered sample of ``label``."""
    ys, xs = np.mgrid[0 : camera.height, 0 : camera.width].astype(np.float64) + 0.5
    size = min(camera.width, camera.height)
    duration_s = camera.duration_us * 1e-6
    foreground = 0.9 if rng.random() < 0.75 else 0.05  # mostly bright objects, sometimes dark ones
    centre = np.array([camera.width, camera.height]) / 2 + rng.uniform(-0.06, 0.06, 2) * size

    if camera.pattern == "directions":
        angle = 2 * np.pi * label / camera.num_classes + rng.normal(0, 0.05)
        radius = size * rng.uniform(0.12, 0.16)
        travel = size * rng.uniform(0.38, 0.46)  # pixels over the whole sample
        direction = np.array([np.cos(angle), np.sin(angle)])

        def scene(t_s: float) -> np.ndarray:
            cx, cy = centre - direction * travel * 0.3 + direction * travel * (t_s / duration_s)
            distance = np.hypot(xs - cx, ys - cy) - radius
            return _blend(camera.background, foreground, distance)

    else:  # bars
        angle = np.pi * label / camera.num_classes + rng.normal(0, 0.03)
        normal = np.array([-np.sin(angle), np.cos(angle)])
        tangent = np.array([np.cos(angle), np.sin(angle)])
        half_width = size * rng.uniform(0.05, 0.07)
        half_length = size * rng.uniform(0.32, 0.38)
        amplitude = size * rng.uniform(0.15, 0.2)
        cycles = rng.uniform(1.0, 1.5)
        phase = rng.uniform(0, 2 * np.pi)

        def scene(t_s: float) -> np.ndarray:
            offset = amplitude * np.sin(2 * np.pi * cycles * t_s / duration_s + phase)
            cx, cy = centre + normal * offset
            across = np.abs((xs - cx) * normal[0] + (ys - cy) * normal[1]) - half_width
            along = np.abs((xs - cx) * tangent[0] + (ys - cy) * tangent[1]) - half_length
            return _blend(camera.background, foreground, np.maximum(across, along))

    return scene


def _blend(background: float, foreground: float, signed_distance_px: np.ndarray) -> np.ndarray:
    """Anti-aliased shape: ``foreground`` inside (distance < 0), ``background`` outside, 1-px ramp."""
    inside = np.clip(0.5 - signed_distance_px, 0.0, 1.0)
    return background + (foreground - background) * inside


class DVSPixelModel:
    """Per-pixel state of a DVS sensor: reference log level, thresholds, last event time.

    ``convert(frames, times_us)`` turns a sequence of intensity images into events (see module
    docstring for the equations). State: ``reference`` [H, W], ``threshold_on/off`` [H, W],
    ``last_event_us`` [H, W].
    """

    eps = 1e-3

    def __init__(self, camera: SyntheticCamera, rng: np.random.Generator) -> None:
        shape = (camera.height, camera.width)
        self.camera = camera
        self.rng = rng
        sigma = camera.threshold_sigma
        lowest = 0.25 * camera.contrast_threshold
        self.threshold_on = np.maximum(camera.contrast_threshold + sigma * rng.standard_normal(shape), lowest)
        self.threshold_off = np.maximum(
            camera.contrast_threshold + sigma * rng.standard_normal(shape), lowest
        )
        self.last_event_us = np.full(shape, np.iinfo(np.int64).min // 2, dtype=np.int64)
        self.reference: np.ndarray | None = None

    def convert(self, frames, times_us: np.ndarray) -> np.ndarray:
        """Events (EVENT_DTYPE, sorted by t, then y, x) for intensity frames rendered at ``times_us``."""
        chunks: list[np.ndarray] = []
        previous_log: np.ndarray | None = None
        previous_t = 0
        for frame, t_us in zip(frames, times_us, strict=True):
            log_intensity = np.log(np.asarray(frame, dtype=np.float64) + self.eps)
            if previous_log is None:
                self.reference = log_intensity.copy()
            else:
                chunks.append(self._crossings(previous_log, log_intensity, int(previous_t), int(t_us)))
                chunks.append(self._noise(int(previous_t), int(t_us)))
            previous_log, previous_t = log_intensity, t_us
        events = np.concatenate(chunks) if chunks else np.zeros(0, EVENT_DTYPE)
        order = np.lexsort((events["x"], events["y"], events["t"]))
        return events[order]

    def _crossings(self, log_a: np.ndarray, log_b: np.ndarray, t_a: int, t_b: int) -> np.ndarray:
        """Threshold crossings between two render steps, timestamps interpolated, refractory applied."""
        assert self.reference is not None
        delta = log_b - self.reference
        polarity = delta > 0
        threshold = np.where(polarity, self.threshold_on, self.threshold_off)
        counts = np.floor(np.abs(delta) / threshold).astype(np.int64)
        ys, xs = np.nonzero(counts)
        out: list[np.ndarray] = []
        if ys.size:
            n = counts[ys, xs]
            sign = np.where(polarity[ys, xs], 1.0, -1.0)
            step = threshold[ys, xs] * sign
            start_ref = self.reference[ys, xs]
            span = log_b[ys, xs] - log_a[ys, xs]
            safe_span = np.where(np.abs(span) > 1e-12, span, 1.0)
            for k in range(1, int(n.max()) + 1):  # k-th crossing of every pixel that has one
                rows = n >= k
                level = start_ref[rows] + k * step[rows]
                fraction = np.clip((level - log_a[ys[rows], xs[rows]]) / safe_span[rows], 0.0, 1.0)
                t = t_a + np.ceil(fraction * (t_b - t_a)).astype(np.int64)
                py, px = ys[rows], xs[rows]
                fire = t - self.last_event_us[py, px] >= self.camera.refractory_us
                self.last_event_us[py[fire], px[fire]] = t[fire]
                chunk = np.zeros(int(fire.sum()), EVENT_DTYPE)
                chunk["t"], chunk["x"], chunk["y"] = t[fire], px[fire], py[fire]
                chunk["p"] = sign[rows][fire] > 0
                out.append(chunk)
            self.reference[ys, xs] += n * step
        return np.concatenate(out) if out else np.zeros(0, EVENT_DTYPE)

    def _noise(self, t_a: int, t_b: int) -> np.ndarray:
        """Poisson shot noise: ``noise_rate_hz`` events per pixel per second, random polarity."""
        camera = self.camera
        expected = camera.noise_rate_hz * camera.width * camera.height * (t_b - t_a) * 1e-6
        count = int(self.rng.poisson(expected)) if expected > 0 else 0
        noise = np.zeros(count, EVENT_DTYPE)
        if count:
            noise["t"] = self.rng.integers(t_a + 1, t_b + 1, count)
            noise["x"] = self.rng.integers(0, camera.width, count)
            noise["y"] = self.rng.integers(0, camera.height, count)
            noise["p"] = self.rng.random(count) < 0.5
        return noise
