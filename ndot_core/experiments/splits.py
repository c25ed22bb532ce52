"""Stratified, seeded splits of a labelled collection into parts of given sizes (stream / choose / report).

Each class's indices are shuffled (``np.random.default_rng(seed)``) and given evenly spaced ranks in
``[0, 1)``: the ``j``-th of a class of ``n`` gets ``(j + u) / n`` with one ``u ~ U[0, 1)`` per class.
All indices sorted by rank interleave the classes in proportion, so cutting that order into consecutive
parts of the requested sizes gives every part each class's share to within one sample::

    |#{class c in part k} - size_k * n_c / N| <= 1 (about)

The parts are disjoint, their union is the first ``sum(sizes)`` of that order, and the same
``(labels, sizes, seed)`` always gives the same parts (each part sorted ascending).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_parts(
    labels: Sequence[int] | np.ndarray, sizes: Sequence[int], seed: int = 0
) -> list[np.ndarray]:
    """Index arrays, one per entry of ``sizes``, drawn without overlap and stratified by ``labels``."""
    labels = np.asarray(labels)
    if any(size < 0 for size in sizes):
        raise ValueError(f"part sizes must be >= 0, got {list(sizes)}")
    if sum(sizes) > labels.size:
        raise ValueError(f"parts of {sum(sizes)} samples asked of {labels.size}")
    rng = np.random.default_rng(seed)
    ranks = np.empty(labels.size, dtype=np.float64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        ranks[members] = (np.arange(members.size) + rng.random()) / members.size
    order = np.argsort(ranks, kind="stable")
    cuts = np.cumsum([0, *sizes])
    return [np.sort(order[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]


#: The accuracy study's parts of the 1000 ``nmnist-small`` recordings (docs/accuracy.md).
NMNIST_SMALL_PARTS = {"stream": 700, "choose": 150, "report": 150}


__all__ = ["NMNIST_SMALL_PARTS", "stratified_parts"]
