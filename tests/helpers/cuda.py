"""CUDA-only tests: the skip mark and a guard that fails on any host synchronisation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise inside the block on any CUDA operation that synchronises with the host
    (``torch.cuda.set_sync_debug_mode("error")``); pending work is finished first."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
