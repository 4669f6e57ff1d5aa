"""The default mode finds the model's symmetries by calling ``training_step`` on the first batch
(through ``training_step_loss``): those calls must not count as training batches for the
torchmetrics metrics the module updates there."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from tests.helpers.trainer import WITHOUT_LOGGER
from torch_momentum import PolyakSGD
from torch_momentum.callbacks import LayerBalanceMonitor, training_step_loss

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

pytestmark = [WITHOUT_LOGGER, pytest.mark.usefixtures("one_thread")]


class _Counted(pl.LightningModule):
    """A ReLU MLP whose training_step updates an accuracy and a sample count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
        self.accuracy = MulticlassAccuracy(num_classes=4, average="micro")
        self.samples = SumMetric()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.net(x)
        self.accuracy.update(logits.argmax(-1), y)
        self.samples.update(torch.tensor(float(len(y))))
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return PolyakSGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(callbacks: list[pl.Callback]) -> _Counted:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(32, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (32,), generator=g),
    )
    module = _Counted()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module


def test_discovery_leaves_the_modules_metrics_alone() -> None:
    """4 batches of 8: 32 samples and the same accuracy with the monitor as without (before,
    discovery's three calls counted the first batch 4 times: 56 samples, accuracy 0.5 instead
    of 0.6875 in the report's run)."""
    plain = _fit([])
    watched = _fit([LayerBalanceMonitor(save_figure=False)])
    assert float(plain.samples.compute()) == 32.0
    assert float(watched.samples.compute()) == 32.0
    assert float(watched.accuracy.compute()) == float(plain.accuracy.compute())


def test_training_step_loss_restores_metric_states() -> None:
    module = _Counted()
    batch = (torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 4, (8,)))
    module.samples.update(torch.tensor(3.0))
    loss = training_step_loss(module, batch)
    assert loss.dim() == 0
    assert float(module.samples.compute()) == 3.0
