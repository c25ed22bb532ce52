"""This project's discrete LIF neuron as a NIR ``LIF`` (or ``IF``) node, and back.

The neuron (``ndot_core.engine.neuron``), one time-step::

    u[t] = lam * v[t-1] + I[t]        s[t] = [u[t] >= Vth]        v[t] = u[t] - Vth * s[t]

NIR's LIF is continuous: ``tau dv/dt = (v_leak - v) + R I``, spike when ``v > v_threshold``,
then ``v = v_reset``. Importers step it with forward Euler at a time-step ``dt`` they are given
(SpikingJelly's ``import_from_nir(graph, dt=...)``, default 1e-4 s)::

    v[t] = v[t-1] + dt/tau * (v_leak - v[t-1] + R I[t])
         = (1 - dt/tau) v[t-1] + (dt R / tau) I[t] + (dt/tau) v_leak

which is ``u[t] = lam v[t-1] + I[t]`` exactly when::

    v_leak = 0,   1 - dt/tau = lam,   dt R / tau = 1
    =>  tau = dt / (1 - lam),   r = tau / dt = 1 / (1 - lam),   v_threshold = Vth

``lam = 1`` (no leak) is NIR's ``IF`` (``dv/dt = R I``): ``v[t] = v[t-1] + dt R I[t]``, so ``r = 1/dt``.
With the default ``lam = 0.5``: ``tau = 2 dt``, ``r = 2``. SpikingJelly's importer maps this to
``LIFNode(tau=tau/dt, decay_input=False)``, whose charge ``H = V - V/tau' + X`` with ``tau' = 2`` is
``V - V/2 + X``: bit-identical to ``0.5 V + X`` in binary floating point (for other ``lam`` the two
differ by rounding, one ulp of ``V`` at most).

Two things NIR's LIF cannot say, recorded in the node's ``metadata`` instead:

* reset: this neuron subtracts the threshold (``v = u - Vth``); NIR resets to ``v_reset``. The node
  carries ``v_reset = 0`` and ``metadata["reset_mode"] = "subtract"``; an importer that ignores the
  metadata resets to 0 (see docs/nir.md for which importers honour it and how to set it by hand).
* firing: ``u >= Vth`` here (and in SpikingJelly); NIR's text says ``v > v_threshold``. They differ
  only when a membrane lands exactly on the threshold.

Parameters are stored in float64 so that ``tau / dt`` and ``1 - dt / tau`` give ``lam`` back
exactly; the metadata also records ``lam`` and ``dt``, and ``lif_from_node`` checks them against
``tau``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ndot_core.engine.neuron import LIFParameters
from ndot_core.exchange.nir_support import ExchangeError, require_nir

if TYPE_CHECKING:
    import nir

#: The time-step NIR importers assume by default (SpikingJelly, snnTorch: 1e-4 s).
DEFAULT_DT_S = 1e-4
#: ``metadata["reset_mode"]`` of this project's neurons: subtract the threshold after a spike.
RESET_SUBTRACT = "subtract"
#: Relative tolerance when a node's parameters are checked against the discrete ones.
_RTOL = 1e-9


def check_dt(dt: float) -> float:
    """``dt`` as a float if finite and > 0, else ``ExchangeError``."""
    dt = float(dt)
    if not (math.isfinite(dt) and dt > 0):
        raise ExchangeError(f"dt must be a finite number of seconds > 0, got {dt!r}")
    return dt


def neuron_node(lif: LIFParameters, shape: tuple[int, ...], dt: float) -> nir.NIRNode:
    """The NIR node (``LIF``, or ``IF`` when ``lam == 1``) of a layer of neurons of ``shape``."""
    nir_module = require_nir()
    dt = check_dt(dt)

    def full(value: float) -> np.ndarray:
        return np.full(shape, value, dtype=np.float64)

    metadata: dict[str, Any] = {
        "reset_mode": RESET_SUBTRACT,
        "firing": "u >= v_threshold",
        "lam": float(lif.lam),
        "dt": dt,
        "surrogate_alpha": float(lif.surrogate_alpha),
    }
    if lif.lam == 1.0:
        return nir_module.IF(
            r=full(1.0 / dt), v_threshold=full(lif.v_threshold), v_reset=full(0.0), metadata=metadata
        )
    tau = dt / (1.0 - lif.lam)
    return nir_module.LIF(
        tau=full(tau),
        r=full(tau / dt),
        v_leak=full(0.0),
        v_threshold=full(lif.v_threshold),
        v_reset=full(0.0),
        metadata=metadata,
    )


def _uniform(node_name: str, field: str, value: Any) -> float:
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0 or not np.all(np.isfinite(array)):
        raise ExchangeError(f"node {node_name!r}: {field} must be finite numbers")
    first = float(array.reshape(-1)[0])
    if not np.all(array == first):
        raise ExchangeError(
            f"node {node_name!r}: {field} differs between neurons; this model needs one value"
        )
    return first


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_RTOL, abs_tol=1e-12)


def lif_from_node(name: str, node: nir.NIRNode, dt: float) -> LIFParameters:
    """The ``LIFParameters`` of a NIR ``LIF`` / ``IF`` node written by ``neuron_node`` (or equivalent).

    Refuses what this neuron cannot do: per-neuron parameters, a leak potential, an input not scaled
    as ``r = tau/dt`` prescribes, and a reset to a value (a node without ``reset_mode: subtract``).
    """
    nir_module = require_nir()
    dt = check_dt(dt)
    metadata = dict(getattr(node, "metadata", None) or {})
    reset_mode = metadata.get("reset_mode")
    if isinstance(reset_mode, bytes):
        reset_mode = reset_mode.decode()
    if reset_mode != RESET_SUBTRACT:
        raise ExchangeError(
            f"node {name!r} resets to v_reset (metadata reset_mode={reset_mode!r}); "
            "ndot_core's neuron resets by subtracting the threshold and cannot represent it"
        )
    threshold = _uniform(name, "v_threshold", node.v_threshold)
    if not threshold > 0:
        raise ExchangeError(f"node {name!r}: v_threshold must be > 0, got {threshold}")
    r = _uniform(name, "r", node.r)
    if isinstance(node, nir_module.IF):
        if not _close(r, 1.0 / dt):
            raise ExchangeError(f"node {name!r}: IF needs r = 1/dt = {1.0 / dt}, got {r}")
        lam = 1.0
    elif isinstance(node, nir_module.LIF):
        tau = _uniform(name, "tau", node.tau)
        if _uniform(name, "v_leak", node.v_leak) != 0.0:
            raise ExchangeError(f"node {name!r}: v_leak must be 0 (this neuron has no leak potential)")
        if not tau > dt:
            raise ExchangeError(f"node {name!r}: tau must exceed dt = {dt} s, got {tau}")
        if not _close(r, tau / dt):
            raise ExchangeError(
                f"node {name!r}: r must be tau/dt = {tau / dt} (input not decayed), got {r}; "
                f"if the graph was exported with another dt than {dt} s, import with that one"
            )
        lam = 1.0 - dt / tau
    else:
        raise ExchangeError(f"node {name!r} is a {type(node).__name__}, not a LIF or IF neuron")
    recorded = metadata.get("lam")
    if recorded is not None:
        recorded = float(recorded)
        if not _close(recorded, lam):
            raise ExchangeError(
                f"node {name!r}: metadata lam={recorded} disagrees with tau and dt={dt} (lam={lam}); "
                "import with the dt the graph was exported with"
            )
        lam = recorded  # exactly the exported value
    alpha = float(metadata.get("surrogate_alpha", LIFParameters.surrogate_alpha))
    try:
        return LIFParameters(v_threshold=threshold, lam=lam, surrogate_alpha=alpha)
    except ValueError as err:
        raise ExchangeError(f"node {name!r}: {err}") from err
