"""ndot_core: the NDOT online-learning engine for spiking networks (torch + numpy only).

Public names (see docs/design.md): ``build_model``, ``OnlineLearner``, ``NetworkState``,
``accumulated_gradients``, ``RULES``. Importing this package loads torch but not tonic or any
event-file reader; those live in ``ndot_core.events`` / ``framing`` / ``readers`` / ``datasets``.
"""

from ndot_core.learner import OnlineLearner, accumulated_gradients
from ndot_core.loss import FTRLRegulariser, ndot_loss
from ndot_core.models import build_model
from ndot_core.rules import RULES
from ndot_core.state import NetworkState

__all__ = [
    "RULES",
    "FTRLRegulariser",
    "NetworkState",
    "OnlineLearner",
    "accumulated_gradients",
    "build_model",
    "ndot_loss",
]
