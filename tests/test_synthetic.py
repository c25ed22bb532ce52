"""The synthetic DVS camera: valid events, a working pixel model, recoverable classes, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from clients.synthetic import PATTERNS, SyntheticCamera, SyntheticError
from ndot_core.events.layout import EVENT_DTYPE


def count_map(events: np.ndarray, camera: SyntheticCamera) -> np.ndarray:
    counts = np.zeros((camera.height, camera.width))
    np.add.at(counts, (events["y"], events["x"]), 1)
    return counts


@pytest.mark.parametrize("pattern", PATTERNS)
def test_events_are_sorted_inside_the_sensor_with_both_polarities(pattern: str) -> None:
    camera = SyntheticCamera(width=48, height=40, pattern=pattern, duration_us=100_000, noise_rate_hz=2.0)
    events, label = camera.sample(3)
    assert events.dtype == EVENT_DTYPE
    assert 0 <= label < camera.num_classes
    assert len(events) > 200
    assert np.all(np.diff(events["t"]) >= 0)
    assert events["t"].min() >= 0 and events["t"].max() <= camera.duration_us
    assert events["x"].max() < 48 and events["y"].max() < 40
    assert 0.2 < events["p"].mean() < 0.8


def test_a_static_scene_gives_no_events_without_noise_and_poisson_noise_with_it() -> None:
    quiet = SyntheticCamera(noise_rate_hz=0.0, duration_us=200_000)
    assert len(quiet.static_scene_events(np.random.default_rng(0))) == 0

    noisy = SyntheticCamera(noise_rate_hz=5.0, duration_us=200_000)
    events = noisy.static_scene_events(np.random.default_rng(0))
    expected = 5.0 * 34 * 34 * 0.2  # rate x pixels x seconds = 1156
    assert abs(len(events) - expected) < 5 * np.sqrt(expected)
    assert np.all(np.diff(events["t"]) >= 0)


def test_same_seed_same_events_other_seed_other_events_and_order_does_not_matter() -> None:
    camera = SyntheticCamera(duration_us=100_000, noise_rate_hz=1.0, seed=11)
    later_first = SyntheticCamera(duration_us=100_000, noise_rate_hz=1.0, seed=11).sample(5)
    first = camera.sample(5)
    assert first[1] == later_first[1]
    np.testing.assert_array_equal(first[0], later_first[0])
    other = SyntheticCamera(duration_us=100_000, noise_rate_hz=1.0, seed=12).sample(5)
    assert len(other[0]) != len(first[0]) or not np.array_equal(other[0], first[0])


def test_labels_cycle_through_every_class_in_each_block() -> None:
    camera = SyntheticCamera(num_classes=5, seed=3)
    labels = [camera.label_of(i) for i in range(10)]
    assert sorted(labels[:5]) == list(range(5)) and sorted(labels[5:]) == list(range(5))
    assert labels != sorted(labels)  # shuffled, not a class-ordered stream


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_class_is_recoverable_from_event_count_maps(pattern: str) -> None:
    """Nearest-centroid on normalised count maps of held-out samples beats chance by far."""
    camera = SyntheticCamera(pattern=pattern, num_classes=4, duration_us=150_000, noise_rate_hz=1.0)
    maps, labels = [], []
    for events, label in camera.samples(24):
        counts = count_map(events, camera)
        maps.append(counts.ravel() / counts.sum())
        labels.append(label)
    maps_a, labels_a = np.stack(maps), np.array(labels)
    centroids = np.stack([maps_a[:12][labels_a[:12] == k].mean(0) for k in range(4)])
    predicted = np.argmin(((maps_a[12:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == labels_a[12:]).mean() >= 0.75  # chance is 0.25


def test_refractory_period_separates_events_of_one_pixel() -> None:
    camera = SyntheticCamera(refractory_us=2_000, noise_rate_hz=0.0, duration_us=100_000)
    events, _ = camera.sample(0)
    pixel = events["y"].astype(np.int64) * camera.width + events["x"]
    order = np.lexsort((events["t"], pixel))
    same_pixel = np.diff(pixel[order]) == 0
    gaps = np.diff(events["t"][order])[same_pixel]
    assert gaps.size > 0 and gaps.min() >= 2_000
    no_refractory = SyntheticCamera(refractory_us=0, noise_rate_hz=0.0, duration_us=100_000).sample(0)[0]
    assert len(no_refractory) > len(events)


def test_a_higher_contrast_threshold_gives_fewer_events() -> None:
    low = SyntheticCamera(contrast_threshold=0.15, duration_us=100_000).sample(1)[0]
    high = SyntheticCamera(contrast_threshold=0.4, duration_us=100_000).sample(1)[0]
    assert len(high) < 0.6 * len(low)


def test_bad_parameters_raise_naming_the_parameter() -> None:
    with pytest.raises(SyntheticError, match="contrast_threshold=5"):
        SyntheticCamera(contrast_threshold=5)
    with pytest.raises(SyntheticError, match="pattern='spirals'"):
        SyntheticCamera(pattern="spirals")
    with pytest.raises(SyntheticError, match="label=7"):
        SyntheticCamera(num_classes=4).render(7, np.random.default_rng(0))
