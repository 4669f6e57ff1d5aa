"""The Lightning harness shared by the benchmarks that fit a model under LayerBalanceMonitor.

Used by ``callback_overhead.py`` and ``figures.py``:

* :class:`RepeatedBatch`: one batch ``length`` times, so that an epoch is ``length`` steps on the
  same data (the data loader costs nothing and every step does the same work);
* :class:`LossModule`: a ``LightningModule`` around a network and a loss ``loss(net, batch)``,
  optimised by ``PolyakSGD`` with the given hyperparameters;
* the losses :func:`cross_entropy` (classification) and :func:`next_token` (the next-token
  cross-entropy of a language model returning ``.logits``), and the benchmark inputs
  :func:`images` (random 1x8x8 images, 10 classes) and :func:`gpt2` (``gpt2_tiny(n_layer=4)`` of
  ``torch_momentum.demos`` on random sequences of 32 tokens);
* :func:`model_names`: the ``--models`` option, checked.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from torch_momentum import PolyakSGD
from torch_momentum.demos import gpt2_tiny

__all__ = [
    "Batch",
    "LossFn",
    "LossModule",
    "RepeatedBatch",
    "Task",
    "cross_entropy",
    "gpt2",
    "images",
    "model_names",
    "next_token",
]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
Task = tuple[nn.Module, Batch, LossFn]  # network, its batch, its loss


class RepeatedBatch(Dataset):
    """The same batch ``length`` times (one epoch); load it with ``batch_size=None``."""

    def __init__(self, batch: Batch, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        return self.batch


class LossModule(pl.LightningModule):
    """``loss(net, batch)`` per training step (logged as ``train_loss``), optimised by
    ``PolyakSGD(parameters, **optimizer)``."""

    def __init__(self, net: nn.Module, loss: LossFn, **optimizer: float) -> None:
        super().__init__()
        self.net, self.loss, self.optimizer = net, loss, optimizer

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.loss(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return PolyakSGD(self.parameters(), **self.optimizer)


def cross_entropy(net: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of the logits ``net(x)`` against the classes ``y``."""
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def next_token(net: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of the logits at positions ``0 .. T-2`` against the tokens at ``1 ..
    T-1`` (a model returning ``.logits``, e.g. GPT-2 of ``transformers``)."""
    logits = net(batch[0]).logits[:, :-1]
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch[1][:, 1:].flatten())


def images(net: nn.Module, batch_size: int) -> Task:
    """``net`` on ``batch_size`` random 1x8x8 images of 10 classes, cross-entropy (the batch is
    drawn after ``net`` was built)."""
    batch = (torch.randn(batch_size, 1, 8, 8), torch.randint(0, 10, (batch_size,)))
    return net, batch, cross_entropy


def gpt2(sequences: int) -> Task:
    """``gpt2_tiny(n_layer=4)`` (vocabulary 64) on ``sequences`` random sequences of 32 tokens,
    next-token cross-entropy (the tokens are drawn before the model is built)."""
    ids = torch.randint(0, 64, (sequences, 32))
    return gpt2_tiny(n_layer=4), (ids, ids), next_token


def model_names(parser: argparse.ArgumentParser, models: str, known: Iterable[str]) -> list[str]:
    """The comma-separated ``--models`` value as a list; ``parser.error`` (exit status 2) names
    any that is not in ``known``."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    choices = list(known)
    unknown = [m for m in names if m not in choices]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {choices}")
    return names
