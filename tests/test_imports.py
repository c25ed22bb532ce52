"""Layering rules checked on the real import graph (fresh interpreters, no caching)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def _modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_event_modules_do_not_import_torch() -> None:
    loaded = _modules_after("import ndot_core.events.layout, ndot_core.events.framing")
    assert "torch" not in loaded


def test_engine_names_load_on_first_use() -> None:
    loaded = _modules_after("from ndot_core import OnlineLearner, NetworkState, build_model, RULES")
    assert "ndot_core.engine.learner" in loaded and "torch" in loaded


def test_core_never_imports_service_or_clients() -> None:
    loaded = _modules_after(
        "import ndot_core, ndot_core.engine.learner, ndot_core.engine.models, ndot_core.events.framing, ndot_core.events.readers, "
        "ndot_core.events.datasets, ndot_core.experiments.runs, ndot_core.experiments.cli"
    )
    assert not {m for m in loaded if m.split(".")[0] in {"service", "clients"}}
