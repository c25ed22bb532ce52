"""How closely SpikingJelly reproduces an exported network: every layer's spikes, logits, predictions.

    .venv/bin/python benchmarks/nir_agreement.py RUN [--split test] [--batch-size 50]

RUN is an experiment run folder (``ndot train --out RUN``). The run's own held-out split (the same
frames its evaluation uses, ``ndot_core.experiments.runs.load_run_data``) goes through

* the trained network as ndot_core runs it (weight standardization and the Scale factors unfolded),
* the network ndot_core imports back from the NIR file (``import_nir``: folded plain weights),
* SpikingJelly's ``import_from_nir`` of the same file, its LIF neurons set to subtractive reset,
* the same without that setting (NIR's reset to ``v_reset = 0``, as the importer builds it),

in float32 and float64, and reports per layer the spikes fired and the spikes that differ, the
largest logit difference, the predictions that differ, and the float32 rounding margin: the largest
membrane difference between the unfolded and the folded network against the smallest distance of
any membrane from the threshold. Writes ``benchmarks/results/nir_agreement.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ndot_core.engine.network import SpikingNetwork  # noqa: E402
from ndot_core.exchange import export_nir, graph_from_bytes, graph_to_bytes, import_nir  # noqa: E402
from ndot_core.experiments.config import RunConfig  # noqa: E402
from ndot_core.experiments.run_files import load_checkpoint  # noqa: E402
from ndot_core.experiments.runs import load_run_data  # noqa: E402
from service.export import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_ndot(
    model: SpikingNetwork, frames: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per layer spikes and pre-reset membranes [T, B, ...], and logits [T, B, K]."""
    state = model.new_state(frames.shape[1])
    spikes: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    membranes: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    logits = []
    with torch.no_grad():
        for t in range(frames.shape[0]):
            logits.append(model.step(frames[t].to(model.readout.weight.dtype), state, "ndot"))
            for i, (neuron, block) in enumerate(zip(state.neurons, model.blocks, strict=True)):
                spikes[i].append(neuron.s.clone())
                membranes[i].append(neuron.v + block.lif.v_threshold * neuron.s)  # u = v + Vth s
    return [torch.stack(s) for s in spikes], [torch.stack(m) for m in membranes], torch.stack(logits)


def run_spikingjelly(graph, frames: torch.Tensor, dtype: torch.dtype, subtract: bool):
    import nir
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    module = import_from_nir(graph, dt=float(graph.metadata["dt"]), dtype=dtype)
    named = dict(module.named_modules())
    lifs = [name for name, node in graph.nodes.items() if isinstance(node, nir.LIF)]
    spikes: dict[str, list[torch.Tensor]] = {name: [] for name in lifs}
    for name in lifs:
        if subtract:
            named[f"{name}.module"].v_reset = None
        named[name].register_forward_hook(lambda m, a, out, name=name: spikes[name].append(out[0].clone()))
    logits, state = [], None
    with torch.no_grad():
        for t in range(frames.shape[0]):
            out, state = module(frames[t].to(dtype), state)
            logits.append(out)
    return [torch.stack(spikes[name]) for name in lifs], None, torch.stack(logits)


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def compare(reference, other) -> dict:
    spikes, _, logits = reference
    other_spikes, _, other_logits = other
    return {
        "spikes_differing": [
            int((a != b.reshape(a.shape)).sum()) for a, b in zip(spikes, other_spikes, strict=True)
        ],
        "max_abs_logit_diff": float((logits - other_logits).abs().max()),
        "predictions_differing": int((logits.sum(0).argmax(1) != other_logits.sum(0).argmax(1)).sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="experiment run folder (ndot train --out)")
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "nir_agreement.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, metadata = load_checkpoint(args.run)
    config = RunConfig.from_json(metadata["config"])
    config.progress = False
    train_set, test_set = load_run_data(config)
    data = test_set if args.split == "test" else train_set
    trained, described = load_model(args.run)
    started = time.time()
    totals: dict = {}
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(trained).to(dtype)
        graph = graph_from_bytes(graph_to_bytes(export_nir(model)))
        imported = import_nir(graph, dtype=dtype)
        key = str(dtype).replace("torch.", "")
        rows = {
            "spikes_fired": None,
            "spikingjelly_subtract": [],
            "spikingjelly_as_imported": [],
            "imported": [],
        }
        margin = {
            "max_abs_membrane_diff": 0.0,
            "min_abs_membrane_minus_threshold": float("inf"),
            "membranes_exactly_at_threshold": 0,  # fire here (u >= Vth, SpikingJelly too), not under NIR's v > Vth
            "membranes_within_1e-5_of_threshold": 0,  # where float32 rounding (~1e-6) could flip a spike
            "membrane_values": 0,
        }
        fired, correct, samples = None, 0, 0
        for frames, labels in data.batches(args.batch_size, None):
            ours = run_ndot(model, frames)
            back = run_ndot(imported, frames)
            counts = [int(s.sum()) for s in ours[0]]
            fired = counts if fired is None else [a + b for a, b in zip(fired, counts, strict=True)]
            correct += int((ours[2].sum(0).argmax(1) == labels).sum())
            samples += len(labels)
            rows["imported"].append(compare(ours, back))
            rows["spikingjelly_subtract"].append(compare(ours, run_spikingjelly(graph, frames, dtype, True)))
            rows["spikingjelly_as_imported"].append(
                compare(ours, run_spikingjelly(graph, frames, dtype, False))
            )
            for u, v, block in zip(ours[1], back[1], model.blocks, strict=True):
                margin["max_abs_membrane_diff"] = max(
                    margin["max_abs_membrane_diff"], float((u - v).abs().max())
                )
                distance = (u - block.lif.v_threshold).abs()
                margin["min_abs_membrane_minus_threshold"] = min(
                    margin["min_abs_membrane_minus_threshold"], float(distance.min())
                )
                margin["membranes_exactly_at_threshold"] += int((distance == 0).sum())
                margin["membranes_within_1e-5_of_threshold"] += int((distance <= 1e-5).sum())
                margin["membrane_values"] += distance.numel()
        summary = {"spikes_fired": fired, "accuracy": correct / samples, "samples": samples, **margin}
        for name in ("imported", "spikingjelly_subtract", "spikingjelly_as_imported"):
            parts = rows[name]
            summary[name] = {
                "spikes_differing": [sum(p["spikes_differing"][i] for p in parts) for i in range(len(fired))],
                "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in parts),
                "predictions_differing": sum(p["predictions_differing"] for p in parts),
            }
        totals[key] = summary
        print(json.dumps({key: summary}, indent=1))
    record = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, 1 thread",
        "source": described,
        "model": trained.name,
        "steps": config.steps,
        "seconds": round(time.time() - started, 1),
        "results": totals,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
