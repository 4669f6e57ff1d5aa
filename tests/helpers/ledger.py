"""Train a model a few steps with a ledger of given symmetries attached, as many tests do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from torch_momentum.balance import BalanceLedger


def train_with_ledger(
    model: nn.Module,
    loss: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    opt: torch.optim.Optimizer,
    symmetries: Sequence[Any],
    steps: int,
) -> BalanceLedger:
    """``steps`` optimiser steps of ``loss(model, batch)`` with a :class:`BalanceLedger` of
    ``symmetries`` attached from the first; the ledger, still attached."""
    ledger = BalanceLedger(None, opt, module=model, symmetries=list(symmetries))
    ledger.attach()
    for _ in range(steps):
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()
    return ledger
