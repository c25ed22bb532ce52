"""NIR export and import, validated by a simulator no one here wrote (SpikingJelly's NIR importer).

A stream_cnn is trained by a real ``ndot train`` run on real N-MNIST recordings; its NIR file is
imported by SpikingJelly (with subtractive reset set on its neurons) and both run the same
recordings: equal spikes in every layer (each of which must spike), logits within 1e-5, in float32
and float64. What SpikingJelly's importer cannot express by itself (the reset mode) is measured, not
skipped. ``nir.write`` -> ``nir.read`` keeps every array bit for bit; NIR -> ndot_core -> NIR too.
The command (``ndot export``, real subprocesses) and the endpoint (``POST /v1/model/export``, real
HTTP on both buses) export the same weights; without the ``nir`` package (hidden from a fresh
interpreter by a ``sitecustomize``) both say how to install it.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_support import (
    AUTH_SETTINGS,
    INGEST_KEY,
    ServerThread,
    ServiceProcess,
    clear_redis,
    free_port,
    http,
    nmnist_samples,
    post_sample,
    wait_ready,
)

from ndot_core.engine.models import build_model
from ndot_core.engine.network import SpikingNetwork
from ndot_core.events.framing import to_frames
from ndot_core.events.readers import read_events
from ndot_core.exchange import (
    INSTALL_HINT,
    ExchangeError,
    export_nir,
    graph_from_bytes,
    graph_to_bytes,
    import_nir,
    read_nir,
)
from service.app import create_app
from service.export import load_model
from service.export import main as export_main
from service.settings import Settings
from service.worker.model_export import read_checkpoint_model

nir = pytest.importorskip("nir", reason="pip install -e '.[dev]' installs nir")
pytest.importorskip(
    "spikingjelly.activation_based.nir_exchange", reason="pip install -e '.[dev]' installs it"
)
from nir_support import HIDE_NIR, REPO_ROOT, assert_bit_equal, cli, run_ndot, run_spikingjelly  # noqa: E402

STEPS = 10  # time-steps each recording is framed into
#: A short real training run: stream_cnn on 160 N-MNIST recordings, 2 epochs (every layer spikes after it).
TRAIN_FLAGS = (
    "--dataset nmnist-small --model stream_cnn -T 8 --epochs 2 --limit 160 --threads 1 --no-progress --quiet"
)


# --- a trained network and the recordings it runs on ---------------------------------------------


@pytest.fixture(scope="module")
def trained_run(nmnist_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An experiment run folder written by a real ``ndot train`` (stream_cnn, 160 recordings, 2 epochs)."""
    out = tmp_path_factory.mktemp("nir-run") / "run"
    done = cli("train", *TRAIN_FLAGS.split(), "--data-dir", str(nmnist_small), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def trained(trained_run: Path) -> SpikingNetwork:
    """The run's network, read by the loader ``ndot export`` uses."""
    model, described = load_model(trained_run)
    assert "epoch 2" in described
    return model


@pytest.fixture(scope="module")
def recordings(nmnist_small: Path) -> torch.Tensor:
    """16 real N-MNIST recordings (ids past the training run's), framed: [T, 16, 2, 34, 34] event counts."""
    lines = (nmnist_small / "labels.txt").read_text().splitlines()[1:]
    frames = [
        to_frames(*read_events(nmnist_small / "train" / f"{line.split()[0]}.bs2"), n_time_bins=STEPS)
        for line in lines[900:916]
    ]
    return torch.from_numpy(np.stack(frames, axis=1))


# --- SpikingJelly reproduces the trained network ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spikingjelly_reproduces_every_layer_of_the_trained_network(
    trained: SpikingNetwork, recordings: torch.Tensor, dtype: torch.dtype
) -> None:
    model = copy.deepcopy(trained).to(dtype)
    graph = graph_from_bytes(graph_to_bytes(export_nir(model)))  # through the file format
    ours, our_logits = run_ndot(model, recordings)
    theirs, their_logits = run_spikingjelly(graph, recordings, dtype)
    assert len(ours) == len(theirs) == 4
    for layer, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.shape == b.shape
        assert int(a.sum()) >= 20, (
            f"layer {layer} hardly spikes ({int(a.sum())} spikes): a silent layer proves nothing"
        )
        assert torch.equal(a, b), f"layer {layer}: {int((a != b).sum())} of {a.numel()} spikes differ"
    difference = float((our_logits - their_logits).abs().max())
    print(
        f"{dtype}: spikes equal in all 4 layers ({[int(a.sum()) for a in ours]} spikes), max |logit diff| {difference:.3g}"
    )
    assert difference <= 1e-5
    assert float(our_logits.abs().max()) > 0.1  # the logits carry something


def test_spikingjelly_as_imported_resets_to_zero_and_differs_measurably(
    trained: SpikingNetwork, recordings: torch.Tensor
) -> None:
    """NIR's LIF resets to v_reset; without setting SpikingJelly's neurons to subtract, the network differs.

    This is what the importer cannot express from the file alone (it reads v_reset = 0, not the
    metadata's reset_mode): the difference is measured and must be real, or the reset test above
    would prove nothing.
    """
    graph = export_nir(trained)
    assert all(
        node.metadata["reset_mode"] == "subtract"
        for node in graph.nodes.values()
        if isinstance(node, nir.LIF)
    )
    ours, our_logits = run_ndot(trained, recordings)
    hard, hard_logits = run_spikingjelly(graph, recordings, torch.float32, subtract=False)
    differing = [int((a != b).sum()) for a, b in zip(ours, hard, strict=True)]
    difference = float((our_logits - hard_logits).abs().max())
    print(
        f"hard reset (as imported): spikes differing per layer {differing}, max |logit diff| {difference:.3g}"
    )
    assert differing[0] > 0 and difference > 1e-3


def test_import_back_into_ndot_core_gives_identical_outputs_and_the_same_graph(
    trained: SpikingNetwork, recordings: torch.Tensor, tmp_path: Path
) -> None:
    graph = export_nir(trained)
    nir.write(tmp_path / "model.nir", graph)
    read = nir.read(tmp_path / "model.nir")
    assert_bit_equal(graph, read)  # nir.write -> nir.read: every array bit for bit
    assert read.nodes["block0_lif"].metadata["reset_mode"] == "subtract"
    imported = import_nir(read)
    assert_bit_equal(export_nir(imported), graph)  # NIR -> ndot_core -> NIR: the same arrays
    ours, our_logits = run_ndot(imported, recordings)
    theirs, their_logits = run_spikingjelly(read, recordings, torch.float32)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(our_logits, their_logits)  # the same ops on the same weights: bit for bit
    original_spikes, original_logits = run_ndot(trained, recordings)
    assert all(torch.equal(a, b) for a, b in zip(ours, original_spikes, strict=True))
    assert float((our_logits - original_logits).abs().max()) <= 1e-5  # folded scales round once


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mlp", {"hidden": (24, 16)}),
        ("vgg11_ws", {"width": 0.0625}),
        ("stream_cnn", {"lam": 0.75, "v_threshold": 0.5}),
    ],
)
def test_every_model_family_and_neuron_round_trips(name: str, options: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=2, num_classes=10, input_size=(32, 32), **options).double()
    graph = graph_from_bytes(graph_to_bytes(export_nir(model, dt=0.02)))
    imported = import_nir(graph, dtype=torch.float64)
    assert imported.blocks[0].lif == model.blocks[0].lif
    frames = (torch.rand(6, 3, 2, 32, 32, generator=torch.Generator().manual_seed(1)) < 0.3).double() * 3
    (spikes, logits), (back_spikes, back_logits) = run_ndot(model, frames), run_ndot(imported, frames)
    assert all(torch.equal(a, b) for a, b in zip(spikes, back_spikes, strict=True))
    assert float((logits - back_logits).abs().max()) <= 1e-9


def test_graphs_outside_the_family_are_refused_with_the_reason() -> None:
    graph = export_nir(build_model("stream_cnn", in_channels=2, num_classes=10, input_size=(34, 34)))
    hard = copy.deepcopy(graph)
    hard.nodes["block1_lif"].metadata = {}
    with pytest.raises(ExchangeError, match="block1_lif.*resets to v_reset"):
        import_nir(hard)
    with pytest.raises(ExchangeError, match="r must be tau/dt.*import with that one"):
        import_nir(graph, dt=1.5e-4)  # exported with dt = 1e-4 s
    tampered = copy.deepcopy(graph)
    tampered.nodes["block2_lif"].metadata["lam"] = 0.4
    with pytest.raises(ExchangeError, match="metadata lam=0.4 disagrees"):
        import_nir(tampered)
    forked = copy.deepcopy(graph)
    forked.edges.append(("block0_conv", "readout"))
    with pytest.raises(ExchangeError, match="feeds two nodes"):
        import_nir(forked)
    with pytest.raises(ExchangeError, match="HDF5 signature"):
        graph_from_bytes(b"not a nir file at all")
    with pytest.raises(ExchangeError, match="not a readable NIR graph"):
        graph_from_bytes(graph_to_bytes(graph)[:4000])


# --- the command --------------------------------------------------------------------------------------


def test_cli_exports_a_run_and_refuses_bad_sources(
    trained_run: Path, trained: SpikingNetwork, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.nir"
    done = cli("export", str(trained_run), "--format", "nir", "--out", str(out))  # a real subprocess
    assert done.returncode == 0, done.stderr
    assert "stream_cnn" in done.stdout and "epoch 2" in done.stdout
    assert_bit_equal(read_nir(out), export_nir(trained))
    # the refusals, in this process (the same main the subprocess runs)
    assert export_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.nir")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for path in trained_run.glob("checkpoint.*"):
        data = bytearray(path.read_bytes())
        if path.suffix == ".safetensors":
            data[-5] ^= 0xFF  # one flipped byte in a weight
        (corrupt / path.name).write_bytes(bytes(data))
    assert export_main([str(corrupt), "--out", str(tmp_path / "x.nir")]) == 1
    assert "SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "x.nir").exists()
    with pytest.raises(SystemExit) as usage:
        export_main([str(trained_run), "--format", "onnx", "--out", str(out)])
    assert usage.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


def test_without_nir_the_cli_says_how_to_install_it(trained_run: Path, tmp_path: Path) -> None:
    hide = tmp_path / "hide-nir"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_NIR)
    done = cli(
        "export",
        str(trained_run),
        "--out",
        str(tmp_path / "x.nir"),
        env={"PYTHONPATH": f"{hide}:{REPO_ROOT}"},
    )
    assert done.returncode == 2, done.stderr
    assert INSTALL_HINT in done.stderr and "not installed" in done.stderr
    assert not (tmp_path / "x.nir").exists()


# --- the endpoint -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["embedded", "redis"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A served app with its worker in-process, on the embedded bus or on Redis; and its checkpoint folder."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    folder = tmp_path_factory.mktemp(f"nir-{request.param}") / "ckpt"
    settings = Settings(
        redis_url=url,
        bus_stream=f"test-nir-{uuid.uuid4().hex[:8]}",
        checkpoint_dir=folder,
        checkpoint_interval_s=0,
        window_us=10_000,
        **AUTH_SETTINGS,
    )
    with ServerThread(create_app(settings, run_worker=True)) as server:
        yield server.url, folder
    if url:
        clear_redis(url, settings.bus_stream)


def test_endpoint_exports_the_current_weights_like_the_cli_does_from_a_checkpoint(
    service: tuple[str, Path], nmnist_small: Path, tmp_path: Path
) -> None:
    url, folder = service
    with http(url) as client:
        for events, label in nmnist_samples(nmnist_small, 2):
            assert post_sample(client, "nir-cam", events, label, width=34, height=34)
        saved = client.post("/v1/checkpoints").json()
        answer = client.post("/v1/model/export", params={"format": "nir"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/x-hdf5"
        assert answer.headers["x-model-version"] == str(saved["model_version"]) and saved["model_version"] > 0
        assert answer.headers["x-content-sha256"] == hashlib.sha256(answer.content).hexdigest()
        assert f"stream_cnn-v{saved['model_version']}.nir" in answer.headers["content-disposition"]
        live = graph_from_bytes(answer.content)
        slow = client.post("/v1/model/export", params={"dt": 0.01})
        assert slow.status_code == 200 and float(graph_from_bytes(slow.content).metadata["dt"]) == 0.01
        for params, status in (({"format": "onnx"}, 422), ({"dt": 0}, 422), ({"dt": "nan"}, 422)):
            refused = client.post("/v1/model/export", params=params)
            assert refused.status_code == status and refused.json()["detail"], (params, refused.text)
    with http(url, key=INGEST_KEY) as client:
        assert client.post("/v1/model/export").status_code == 403
    with http(url, key=None) as client:
        assert client.post("/v1/model/export").status_code == 401
    checkpoint = folder / f"{saved['name']}.safetensors"
    model, version = read_checkpoint_model(checkpoint)
    assert version == saved["model_version"]
    assert_bit_equal(live, export_nir(model))  # the live weights are the ones just checkpointed
    out = tmp_path / "ckpt.nir"
    done = cli(
        "export", str(folder), "--format", "nir", "--out", str(out)
    )  # the folder: its newest checkpoint
    assert done.returncode == 0, done.stderr
    assert saved["name"] in done.stdout
    assert_bit_equal(read_nir(out), live)


def test_without_nir_the_endpoint_answers_501_with_the_install_command(tmp_path: Path) -> None:
    hide = tmp_path / "hide-nir"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_NIR)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "PYTHONPATH": f"{hide}:{REPO_ROOT}",
        "NDOT_PORT": str(port),
        "NDOT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
    }
    serve = ServiceProcess("serve", env, tmp_path / "serve.log").start()
    try:
        wait_ready(url, serve)
        with http(url) as client:
            answer = client.post("/v1/model/export")
        assert answer.status_code == 501, answer.text
        assert INSTALL_HINT in answer.json()["detail"]
    finally:
        assert serve.stop() == 0, serve.log_tail()
