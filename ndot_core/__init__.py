"""ndot_core: the NDOT online-learning engine for spiking networks (torch + numpy only).

Public names (see docs/design.md): ``build_model``, ``OnlineLearner``, ``NetworkState``,
``accumulated_gradients``, ``RULES``. They load lazily (PEP 562), so importing a torch-free
submodule such as ``ndot_core.events`` or ``ndot_core.framing`` (the camera client does) does not
pay for importing torch; ``from ndot_core import OnlineLearner`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ndot_core.learner import OnlineLearner, accumulated_gradients
    from ndot_core.loss import FTRLRegulariser, ndot_loss
    from ndot_core.models import build_model
    from ndot_core.rules import RULES
    from ndot_core.state import NetworkState

_PUBLIC = {
    "OnlineLearner": "ndot_core.learner",
    "accumulated_gradients": "ndot_core.learner",
    "FTRLRegulariser": "ndot_core.loss",
    "ndot_loss": "ndot_core.loss",
    "build_model": "ndot_core.models",
    "RULES": "ndot_core.rules",
    "NetworkState": "ndot_core.state",
}

__all__ = [
    "RULES",
    "FTRLRegulariser",
    "NetworkState",
    "OnlineLearner",
    "accumulated_gradients",
    "build_model",
    "ndot_loss",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ndot_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
