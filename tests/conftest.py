"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

# float64 tolerance for "the same arithmetic up to rounding": each step does O(1) roundings of
# relative size 2**-53 ≈ 1.1e-16; after ~100 steps on a well-conditioned problem the accumulated
# relative difference stays far below 1e-12 (we measure ~1e-15), so 1e-12 fails on any real bug
# (a wrong sign or a missing term is O(lr) ≈ 1e-2) while never failing on rounding.
F64_RTOL = 1e-12


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one intra-op thread: for tiny models threads only add synchronisation,
    which stalls badly on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max(max|b|, tiny)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        scale = max(y.abs().max().item(), 1e-300)
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst
