"""Layering: imports only point down the data path, and no module imports itself in a circle.

Checked twice: on the static import graph of every module (``ast``, lazy imports inside functions
included, ``TYPE_CHECKING`` blocks excluded), and on what fresh interpreters really load.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGES = ("ndot_core", "service", "clients")

#: Layer of each group, bottom (0) up. An import must go to a lower layer, or stay inside its own
#: group (where the cycle check applies). Groups on one layer (engine/events, api/worker) are
#: siblings that may not import each other. ``ndot_core`` itself is the public facade: the
#: subpackages never import it, everything above does.
LAYERS: dict[str, int] = {
    "ndot_core.engine": 0,
    "ndot_core.events": 0,
    "ndot_core.experiments": 1,
    "ndot_core.exchange": 1,
    "ndot_core": 2,
    "service.settings": 3,
    "service.metrics": 3,
    "service.bus": 4,
    "service.api": 5,
    "service.worker": 5,
    "service.app": 6,
    "service.server": 6,
    "service.export": 6,
    "service.cli": 7,
    "service": 7,
    "clients": 8,
}
#: What each side may not import at all, whatever the layers say.
FORBIDDEN = {"clients": ("service", "ndot_core.engine", "ndot_core.experiments")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module: str) -> str:
    """The longest ``LAYERS`` key that is ``module`` or a package above it."""
    candidates = [g for g in LAYERS if module == g or module.startswith(g + ".")]
    assert candidates, f"{module} belongs to no layer: add its package to LAYERS"
    return max(candidates, key=len)


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


GRAPH = import_graph()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    group = group_of(module)
    for target in GRAPH[module]:
        target_group = group_of(target)
        if target_group == group:
            continue
        for banned in FORBIDDEN.get(group, ()):
            assert not (target == banned or target.startswith(banned + ".")), f"{module} imports {target}"
        assert LAYERS[target_group] < LAYERS[group], (
            f"{module} ({group}, layer {LAYERS[group]}) imports {target} "
            f"({target_group}, layer {LAYERS[target_group]}): imports must point down"
        )


def test_no_import_cycles() -> None:
    """Depth-first search for a back edge; the message names the circle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                circle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The two checks above can fail: a worker module importing the API is caught, and so is a circle."""
    upward = tmp_path / "upward.py"
    upward.write_text("def f():\n    from service.api.app import create_api\n")
    assert imports_of(upward, set(GRAPH)) == {"service.api.app"}
    assert LAYERS[group_of("service.api.app")] >= LAYERS[group_of("service.worker.loop")]
    typed = tmp_path / "typed.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from service.api import app\n")
    assert imports_of(typed, set(GRAPH)) == set()


def _modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_event_modules_do_not_import_torch() -> None:
    loaded = _modules_after("import ndot_core.events, ndot_core.events.framing, clients.dvs_client")
    assert "torch" not in loaded


def test_engine_names_load_on_first_use() -> None:
    loaded = _modules_after("from ndot_core import OnlineLearner, NetworkState, build_model, RULES")
    assert "ndot_core.engine.learner" in loaded and "torch" in loaded


def test_public_names_of_the_contract_import_from_where_users_import_them() -> None:
    _modules_after(
        "from ndot_core import OnlineLearner, build_model, NetworkState, accumulated_gradients, RULES, "
        "StreamFramer, to_frames, read_events, NMNISTFolder\n"
        "from ndot_core.events import EVENT_DTYPE, WIRE_DTYPE, EventError, validate_events, events_from_bytes, "
        "events_to_bytes, events_from_columns, from_tonic, StreamFramer, to_frames, read_events, NMNISTFolder\n"
        "from service.bus import Bus, BusEntry, BusFull, BusUnavailable, LocalBus, RedisStreamBus, make_bus\n"
        "from service.app import create_app\nfrom service.api.app import create_api\n"
        "from service.worker import Worker"
    )


def test_core_never_imports_service_or_clients() -> None:
    loaded = _modules_after(
        "import ndot_core, ndot_core.engine.learner, ndot_core.engine.models, ndot_core.events.framing, "
        "ndot_core.events.readers, ndot_core.events.datasets, ndot_core.experiments.runs, "
        "ndot_core.experiments.cli"
    )
    assert not {m for m in loaded if m.split(".")[0] in {"service", "clients"}}


def test_the_api_never_loads_the_worker() -> None:
    loaded = _modules_after("import service.api.app")
    assert not {m for m in loaded if m.startswith("service.worker")}
