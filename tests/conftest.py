"""Shared fixtures for the test suite.

torch is imported inside the fixtures, not here: under ``pytest -n 2`` (make test-fast) the
controlling process loads this file too, and it runs no test; importing torch there would add
~2 s before the workers start. The optimiser table and helpers shared by the optimiser tests are
in ``tests/helpers/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# The ledger's C kernel is built into the repository's build/ (git-ignored, `make clean` removes
# it), not into the user's cache; subprocesses (DDP, examples) inherit it.
os.environ.setdefault(
    "TORCH_MOMENTUM_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "kernel"),
)


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> None:
    # One intra-op thread for the whole test process (each xdist worker is one process, so `-n 2`
    # uses two cores, not four). The suite's models are tiny: a second OpenMP thread only adds a
    # barrier per op, and when the other core is busy that barrier waits for a time slice.
    # Measured on the 2-core development machine while another process was running: the 60-step
    # test_polyak_equals_builtin_sgd took 7.7 s with 2 threads and 0.1 s with 1. Tests that start
    # subprocesses set OMP_NUM_THREADS themselves; the `one_thread` fixture restores this value.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one intra-op thread: for tiny models threads only add synchronisation,
    which stalls badly on a loaded 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
