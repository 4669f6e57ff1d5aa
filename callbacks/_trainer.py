"""Trainer helpers shared by the Lightning callbacks of this package (not user API)."""

from __future__ import annotations

from typing import Any


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
