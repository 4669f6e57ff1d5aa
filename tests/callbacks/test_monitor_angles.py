"""The angular update that the default mode logs for scale-invariant groups (``angle/mean``):
the angle between x_t and x_{t+1} of the update the logging step takes, with or without the
ledger, across a mid-epoch resume, and in one logger row per step."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.trainer import WITHOUT_LOGGER
from torch_momentum import PolyakSGD
from torch_momentum.callbacks import LayerBalanceMonitor
from torch_momentum.demos import BatchNormMLP

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

pytestmark = [
    WITHOUT_LOGGER,
    pytest.mark.usefixtures("one_thread"),
    # the monitor says once which weight matrices no balance law covers (BatchNorm after them)
    pytest.mark.filterwarnings("ignore:.*the layer-balance law:RuntimeWarning"),
]


class _Task(pl.LightningModule):
    """Linear -> BatchNorm1d -> ReLU -> ... in float64: two per-channel scale symmetries."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = BatchNormMLP().double()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return PolyakSGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _loader() -> DataLoader:
    """The same batch of 8 four times (an epoch a mid-epoch resume replays identically)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g, dtype=torch.float64).repeat(4, 1)
    y = torch.randint(0, 10, (8,), generator=g).repeat(4)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _fit(
    monitor: LayerBalanceMonitor, steps: int, every: int = 1, **options: Any
) -> tuple[_Task, pl.Trainer]:
    options.setdefault("logger", False)
    options.setdefault("enable_checkpointing", False)
    ckpt_path = options.pop("ckpt_path", None)
    trainer = pl.Trainer(
        max_steps=steps,
        log_every_n_steps=every,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, *options.pop("callbacks", [])],
        **options,
    )
    task = _Task()
    trainer.fit(task, _loader(), ckpt_path=ckpt_path)
    return task, trainer


class _Snapshots(pl.Callback):
    """The parameters before every step, and after the last."""

    def __init__(self) -> None:
        self.points: list[dict[str, Tensor]] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
        self.points.append({n: p.detach().clone() for n, p in module.named_parameters()})

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.on_train_batch_start(trainer, module, None, -1)


@pytest.mark.parametrize("ledger", [False, True])
def test_the_logged_angle_is_the_update_of_its_step(tmp_path: Path, ledger: bool) -> None:
    """Row t holds the angle between x_t and x_{t+1} of the scale groups (all units of a
    symmetry as one vector, averaged over the symmetries), with and without the ledger. With
    the ledger it was the previous updates' (row 0 had none, row 1 held update 0's)."""
    snapshots = _Snapshots()
    monitor = LayerBalanceMonitor(save_figure=False, ledger=ledger)
    _fit(monitor, 6, callbacks=[snapshots], default_root_dir=tmp_path)
    scale = [s for s in monitor.symmetries or [] if s.kind == "scale"]
    assert len(scale) == 2
    for t, row in enumerate(monitor.history):
        a, b = snapshots.points[t], snapshots.points[t + 1]
        angles = []
        for s in scale:
            x = torch.cat([a[p.param].flatten() for p in s.parts])
            y = torch.cat([b[p.param].flatten() for p in s.parts])
            cross = (x.dot(x) * y.dot(y) - x.dot(y) ** 2).clamp_min(0).sqrt()
            angles.append(float(torch.atan2(cross, x.dot(y))))
        # float64: Gram sums against direct dot products, ~1e-8 relative near angles of 0.05
        # (the atan2 of a difference of squares); the off-by-one step differs by ~10 %
        assert row["angle/mean"] == pytest.approx(sum(angles) / len(angles), rel=1e-6), t


def test_a_mid_epoch_resume_keeps_the_ledgers_unread_angles(tmp_path: Path) -> None:
    """Every 3 steps, a checkpoint at step 4: the ledger's angle statistics of steps 3-4 are not
    read yet. They are saved with the ledger, so the resumed row 5 (the mean over steps 3-5)
    equals the uninterrupted one (before: 0.046843 against 0.049123, steps 3-4 lost)."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    whole = LayerBalanceMonitor(save_figure=False, ledger=True)
    _fit(whole, 9, every=3, callbacks=[saver], enable_checkpointing=True, default_root_dir=tmp_path)
    resumed = LayerBalanceMonitor(save_figure=False, ledger=True)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    _fit(resumed, 9, every=3, ckpt_path=checkpoint, default_root_dir=tmp_path)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history]
    for a, b in zip(resumed.history, whole.history, strict=True):
        # the same float64 operations in the same order; the restored sums go through floats
        assert a["angle/mean"] == pytest.approx(b["angle/mean"], rel=1e-12), a["step"]


def test_one_logger_row_per_logging_step(tmp_path: Path) -> None:
    """The angle of a step's update is logged with the step's other metrics: one CSV row per
    logging step, every column filled (before, without the ledger, a second row held
    ``angle/mean`` alone)."""
    monitor = LayerBalanceMonitor(save_figure=False)
    logger = CSVLogger(tmp_path, name="run")
    _fit(monitor, 4, every=2, logger=logger, default_root_dir=tmp_path)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["step"] for row in rows] == [str(r["step"]) for r in monitor.history]
    for row in rows:
        assert row["angle/mean"] and all(v != "" for v in row.values()), row
