"""The one step timer of the examples and benchmarks: a Lightning callback.

Imported by the example scripts (``from _steptimer import StepTimer``, this folder is on their
``sys.path``) and by ``benchmarks/callback_overhead.py`` (which puts this folder on its path).
Kept apart from ``_common.py`` because it imports Lightning, which the torch-only examples do
not need.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback


class StepTimer(Callback):
    """Wall-clock times of a Lightning training run, per step.

    - ``step_s[i]``: training batch ``i`` from ``on_train_batch_start`` to ``on_train_batch_end``
      (forward, backward, callbacks and the optimiser step);
    - ``update_s[i]`` (with ``update=True``): from ``on_before_optimizer_step`` (after backward)
      to the optimiser's step post-hook, i.e. the update alone;
    - ``starts``: ``perf_counter()`` at every batch start, and once more at the end of training,
      so consecutive differences are whole steps including what Lightning does between batches.
    """

    def __init__(self, update: bool = False) -> None:
        self.update = update
        self.step_s: list[float] = []
        self.update_s: list[float] = []
        self.starts: list[float] = []
        self._t0 = self._t1 = 0.0
        self._handles: list[Any] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.update:
            self._handles = [
                opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers
            ]

    def _after_step(self, *_: Any) -> None:
        self.update_s.append(time.perf_counter() - self._t1)

    def on_train_batch_start(self, *_: Any) -> None:
        self._t0 = time.perf_counter()
        self.starts.append(self._t0)

    def on_before_optimizer_step(self, *_: Any) -> None:
        self._t1 = time.perf_counter()

    def on_train_batch_end(self, *_: Any) -> None:
        self.step_s.append(time.perf_counter() - self._t0)

    def on_train_end(self, *_: Any) -> None:
        self.starts.append(time.perf_counter())
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def seconds_per_step(self, warmup: int = 0) -> float:
        """Mean time between consecutive batch starts, after ``warmup`` steps."""
        timed = self.starts[warmup:]
        if len(timed) < 2:
            raise ValueError(f"need more than warmup={warmup} steps, got {len(self.starts) - 1}")
        return (timed[-1] - timed[0]) / (len(timed) - 1)
