"""Trainer helpers shared by the Lightning callbacks of this package (not user API)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


def logging_step(trainer: Any) -> int:
    """The step Lightning logs ``training_step`` metrics with: the batches that stepped so far
    (``fit_loop.epoch_loop._batches_that_stepped``, which counts optimiser steps once under
    gradient accumulation and several optimisers), or ``trainer.global_step`` where the loop
    does not have it.

    Args:
        trainer: a ``lightning.pytorch.Trainer``.

    Returns:
        The step as an ``int``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from torch_momentum.callbacks._trainer import logging_step
        >>> logging_step(Trainer(logger=False, enable_progress_bar=False))
        0
    """
    loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(loop, "epoch_loop", None)
    step = getattr(epoch_loop, "_batches_that_stepped", None)
    return int(trainer.global_step if step is None else step)


def is_last_step(trainer: Any, step: int) -> bool:
    """Whether optimiser step ``step`` is the last of ``fit`` (as far as can be foreseen)."""
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps > 0 and step + 1 >= max_steps:
        return True
    loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(loop, "epoch_loop", None)
    progress = getattr(epoch_loop, "batch_progress", None)
    max_epochs = getattr(trainer, "max_epochs", None)
    if progress is None or max_epochs is None or max_epochs < 0:
        return False
    return bool(progress.is_last_batch) and trainer.current_epoch + 1 >= max_epochs


def loss_scale(trainer: Any, optimizer: Any) -> float:
    """The loss scale still in the gradients at ``on_before_optimizer_step``: Lightning's
    mixed-precision plugin leaves them scaled for optimisers that unscale themselves
    (``_step_supports_amp_scaling``: fused SGD, Adam); 1 otherwise (a host read when > 1)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


@contextmanager
def metric_states_kept(module: nn.Module) -> Iterator[None]:
    """Restore the accumulated state of every torchmetrics ``Metric`` inside ``module`` on exit:
    a ``training_step`` called for a callback's own evaluations (symmetry discovery,
    certificates) updates the metrics it holds, which would count those calls as training
    batches.

    Example:
        >>> import torch
        >>> from torchmetrics.aggregation import SumMetric
        >>> from torch_momentum.callbacks._trainer import metric_states_kept
        >>> total = SumMetric()
        >>> total.update(torch.tensor(1.0))
        >>> with metric_states_kept(total):
        ...     total.update(torch.tensor(5.0))
        >>> total.compute()
        tensor(1.)
    """
    try:
        from torchmetrics import Metric
    except ImportError:  # no metric can be inside
        yield
        return
    saved = []
    for m in module.modules():
        if isinstance(m, Metric):
            # the states registered with add_state, and the bookkeeping of update/compute
            names = [*m._defaults, "_update_count", "_computed", "_forward_cache"]
            saved.append((m, {n: _copied(getattr(m, n)) for n in names if hasattr(m, n)}))
    try:
        yield
    finally:
        for m, states in saved:
            for name, value in states.items():
                setattr(m, name, value)
