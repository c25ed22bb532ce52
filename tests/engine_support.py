"""Helpers shared by the engine tests (imported explicitly; not a conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Run each engine test on one torch thread, restoring the count after.

    The engine's tensors in these tests are tiny: a second OpenMP thread only adds barrier waits,
    which cost 10-20x when the cores are shared with other processes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
