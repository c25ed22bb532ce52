"""Readers on the real recordings in ../shared/data/recordings (counts from its README)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ndot_core.events.layout import EVENT_DTYPE, TONIC_DTYPE, EventError, as_event_array
from ndot_core.events.readers import detect_format, prophesee_sensor_size, read_events

# file, format, events, sensor (W, H) -- from ../shared/data/README.md
RECORDINGS = [
    ("nmnist-digit.bin", "nmnist", 4_325, (34, 34)),
    ("dvs128-clips/1.bs2", "nmnist", None, (128, 128)),
    ("dvxplorer-0.59s.aedat4", "aedat4", 111_954, (320, 240)),
    ("dvxplorer-1.46s.aedat4", "aedat4", 323_963, (320, 240)),
    ("prophesee-evt2-640x480.raw", "evt2", 539_481, (640, 480)),
    ("prophesee-evt3-1280x720.raw", "evt3", 219_596, (1280, 720)),
]


@pytest.fixture(scope="module")
def recordings(shared_data):
    return shared_data / "recordings"


@pytest.mark.parametrize(("name", "file_format", "count", "sensor"), RECORDINGS)
def test_reads_each_real_recording(recordings, name, file_format, count, sensor):
    path = recordings / name
    assert detect_format(path) == file_format
    events, sensor_size = read_events(path)
    assert events.dtype == EVENT_DTYPE
    assert sensor_size == sensor
    if count is not None:
        assert len(events) == count
    assert len(events) > 1000
    assert (np.diff(events["t"]) >= 0).all()
    assert events["x"].max() < sensor[0] and events["y"].max() < sensor[1]
    assert 0 < events["p"].mean() < 1  # both polarities present


def test_dvs128_clips_are_63k_to_181k_events_of_1_45_s(recordings):
    for clip in sorted((recordings / "dvs128-clips").glob("*.bs2")):
        events, sensor = read_events(clip)
        assert sensor == (128, 128)
        assert 63_000 <= len(events) < 182_000  # README: "63k-181k"
        assert 1.3e6 < events["t"][-1] - events["t"][0] < 1.5e6


def test_evt3_decode_equals_the_reference_field_by_field(recordings):
    events, _ = read_events(recordings / "prophesee-evt3-1280x720.raw")
    reference = np.load(recordings / "prophesee-evt3-1280x720.reference.npy", allow_pickle=False)
    assert len(events) == len(reference)
    for field in ("t", "x", "y", "p"):
        np.testing.assert_array_equal(events[field].astype(np.int64), reference[field].astype(np.int64))


def test_evt2_recording_spans_50_ms(recordings):
    events, _ = read_events(recordings / "prophesee-evt2-640x480.raw")
    assert events["t"][-1] - events["t"][0] == 50_000


def test_aedat4_equals_tonic_reader(recordings):
    from tonic.io import read_aedat4

    path = recordings / "dvxplorer-0.59s.aedat4"
    events, _ = read_events(path)
    np.testing.assert_array_equal(events, as_event_array(read_aedat4(str(path))))


def test_nmnist_bin_equals_tonic_reader(recordings):
    from tonic.io import read_mnist_file

    path = recordings / "nmnist-digit.bin"
    events, _ = read_events(path)
    np.testing.assert_array_equal(events, as_event_array(read_mnist_file(str(path), dtype=TONIC_DTYPE)))


def test_format_found_from_the_header_when_the_extension_says_nothing(recordings, tmp_path):
    for name, expected in (("prophesee-evt3-1280x720.raw", "evt3"), ("dvxplorer-0.59s.aedat4", "aedat4")):
        renamed = tmp_path / f"{name}.recording"
        shutil.copyfile(recordings / name, renamed)
        assert detect_format(renamed) == expected
        events, _ = read_events(renamed)
        np.testing.assert_array_equal(events, read_events(recordings / name)[0])


def test_dat_written_by_expelliarmus_reads_back_with_header_geometry(recordings, tmp_path):
    from expelliarmus import Wizard

    source, _ = read_events(recordings / "prophesee-evt2-640x480.raw")
    source = source[:5000]
    layout = Wizard(encoding="evt2").read(str(recordings / "prophesee-evt2-640x480.raw"))[:0].dtype
    library_events = np.zeros(len(source), dtype=layout)
    for field in ("t", "x", "y", "p"):
        library_events[field] = source[field]
    plain = tmp_path / "plain.dat"
    Wizard(encoding="dat").save(str(plain), library_events)
    events, sensor = read_events(plain)  # no geometry in this header: bounding box of the events
    np.testing.assert_array_equal(events, source)
    assert sensor == (int(source["x"].max()) + 1, int(source["y"].max()) + 1)
    data = plain.read_bytes()
    marker = data.index(b"% Version 2")
    with_geometry = tmp_path / "geometry.dat"
    with_geometry.write_bytes(data[:marker] + b"% Width 640\n% Height 480\n" + data[marker:])
    events, sensor = read_events(with_geometry)
    assert sensor == (640, 480)
    np.testing.assert_array_equal(events, source)


def test_npy_structured_arrays(tmp_path):
    layout = np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "u1")])
    array = np.zeros(3, dtype=layout)
    array["t"], array["x"], array["y"], array["p"] = [1, 2, 3], [5, 6, 7], [1, 2, 3], [0, 1, 1]
    np.save(tmp_path / "events.npy", array)
    events, sensor = read_events(tmp_path / "events.npy")
    assert sensor == (8, 4)  # bounding box, as the file has no sensor size
    assert events.dtype == EVENT_DTYPE and events["x"].tolist() == [5, 6, 7]
    assert read_events(tmp_path / "events.npy", sensor_size=(640, 480))[1] == (640, 480)
    with pytest.raises(EventError, match="outside the sensor"):
        read_events(tmp_path / "events.npy", sensor_size=(6, 6))


def test_npy_never_unpickles(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"t": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EventError, match="not a plain numpy array"):
        read_events(tmp_path / "objects.npy")


def test_npy_declaring_more_than_it_holds_is_refused_without_allocating(tmp_path):
    """A 2-event file whose header claims 10**10 events (122 GiB): refused from its size, nothing allocated."""
    np.save(tmp_path / "small.npy", np.zeros(2, dtype=EVENT_DTYPE))
    data = (tmp_path / "small.npy").read_bytes()
    end = data.index(b"\n") + 1
    header = data[10:end].decode("latin1")
    claimed = header.replace("(2,)", "(10000000000,)")
    claimed = claimed[:-1].rstrip().ljust(len(header) - 1) + "\n"  # the same header length
    assert len(claimed) == len(header) and "10000000000" in claimed
    (tmp_path / "forged.npy").write_bytes(data[:10] + claimed.encode("latin1") + data[end:])
    with pytest.raises(EventError, match="not a plain numpy array .*greater than file size"):
        read_events(tmp_path / "forged.npy")


def test_unknown_and_unsupported_formats(tmp_path):
    (tmp_path / "a.xyz").write_bytes(b"hello world")
    with pytest.raises(EventError, match="unknown event file format"):
        read_events(tmp_path / "a.xyz")
    (tmp_path / "old.aedat").write_bytes(b"#!AER-DAT2.0\r\n# This is a raw AE data file\r\n")
    with pytest.raises(EventError, match="AEDAT 2.0 is not supported"):
        read_events(tmp_path / "old.aedat")
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / "missing.raw")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (["evt 3.0", "geometry 1280x720"], (1280, 720)),
        (["format EVT3;height=720;width=1280"], (1280, 720)),
        (["Height 240", "Width 304", "Version 2"], (304, 240)),
        (["evt 2.0", "plugin_name hal_plugin_gen3_fx3"], (640, 480)),
        (["evt 3.0", "plugin_name hal_plugin_imx636_evk4"], (1280, 720)),
        (["evt 3.0", "plugin_name something_else"], None),
    ],
)
def test_prophesee_header_geometry(header, expected):
    assert prophesee_sensor_size(header) == expected


@pytest.mark.parametrize("fields", ["width=abc;height=1", "width=-5;height=10", "width=;height=7"])
def test_a_prophesee_format_line_with_no_sizes_is_an_event_error(fields):
    """An ``EventError`` naming the values (a file's fault: the client says so in one line), not a
    bare ``ValueError`` from ``int``."""
    with pytest.raises(EventError, match="are not sizes"):
        prophesee_sensor_size([f"format EVT3;{fields}"])
