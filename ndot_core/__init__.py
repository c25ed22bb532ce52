"""ndot_core: the NDOT online-learning engine for spiking networks (torch + numpy only).

Public names (see docs/design.md): ``build_model``, ``OnlineLearner``, ``NetworkState``,
``accumulated_gradients``, ``RULES``, and the event names ``StreamFramer``, ``to_frames``,
``read_events``, ``NMNISTFolder``. They load lazily (PEP 562), so importing a torch-free
subpackage such as ``ndot_core.events`` (the camera client does) does not pay for importing torch;
``from ndot_core import OnlineLearner`` works as usual.

Subpackages: ``engine`` (neuron, rules, layers, network, models, loss, state, learner), ``events``
(layout, framing, readers, datasets; no torch), ``experiments`` (``ndot train|eval|compare``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ndot_core.engine.learner import OnlineLearner
    from ndot_core.engine.loss import FTRLRegulariser, ndot_loss
    from ndot_core.engine.models import build_model
    from ndot_core.engine.rules import RULES
    from ndot_core.engine.sequence_losses import accumulated_gradients
    from ndot_core.engine.state import NetworkState

_PUBLIC = {
    "OnlineLearner": "ndot_core.engine.learner",
    "accumulated_gradients": "ndot_core.engine.sequence_losses",
    "FTRLRegulariser": "ndot_core.engine.loss",
    "ndot_loss": "ndot_core.engine.loss",
    "build_model": "ndot_core.engine.models",
    "RULES": "ndot_core.engine.rules",
    "NetworkState": "ndot_core.engine.state",
    "StreamFramer": "ndot_core.events.framing",
    "to_frames": "ndot_core.events.framing",
    "read_events": "ndot_core.events.readers",
    "NMNISTFolder": "ndot_core.events.datasets",
}

__all__ = [
    "RULES",
    "FTRLRegulariser",
    "NMNISTFolder",
    "NetworkState",
    "OnlineLearner",
    "StreamFramer",
    "accumulated_gradients",
    "build_model",
    "ndot_loss",
    "read_events",
    "to_frames",
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
