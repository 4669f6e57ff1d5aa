"""LayerBalanceMonitor where it was silently wrong: gradient norms under AMP with optimisers that
unscale themselves, mid-epoch resume, a second fit() on the same Trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tests.helpers.trainer import LAYERS, WITHOUT_LOGGER, fit
from torch_momentum import PolyakSGD
from torch_momentum.callbacks import LayerBalanceMonitor

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

pytestmark = WITHOUT_LOGGER


class _Repeat(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class _Model(pl.LightningModule):
    def __init__(self, make_opt: Any = None, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
        ).to(dtype)
        self.make_opt = make_opt or (lambda ps: PolyakSGD(ps, lr=0.05, momentum=0.9))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_opt(self.parameters())


def _loader(n: int = 20, dtype: torch.dtype = torch.float64) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 2, generator=g).to(dtype)
    return DataLoader(_Repeat(x, y, n), batch_size=None)


class _UnscaledGradNorm(Callback):
    """The total gradient norm with the loss scale divided out by hand."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler, self.norms = scaler, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[override]
        scale = float(self.scaler.get_scale())
        sq = sum(float((p.grad.double() / scale).square().sum()) for p in pl_module.parameters())
        self.norms.append(sq**0.5)


def test_grad_norms_under_amp_with_an_optimiser_that_unscales_itself(tmp_path: Path) -> None:
    """`16-mixed` with torch.optim.SGD(fused=True): Lightning skips unscale_ before
    on_before_optimizer_step (the kernel unscales), so the gradients read there are scaled;
    grad_norm/* came out multiplied by the loss scale (2**12 here)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    probe = _UnscaledGradNorm(scaler)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    model = _Model(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True), torch.float32)
    fit(
        model,
        [probe, monitor],
        _loader(dtype=torch.float32),
        max_steps=4,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
        default_root_dir=str(tmp_path),
    )
    assert scaler.get_scale() == 2.0**12  # no overflow: every step taken
    logged = [row["grad_norm/total"] for row in monitor.history]
    # float32 gradients summed in float64 both ways: the same numbers to ~1e-7
    assert logged == pytest.approx(probe.norms, rel=1e-5)


def _fit_monitor(
    root: Path,
    every: int,
    accumulate: int,
    epoch: int,
    ckpt_every: int | None,
    ckpt: str | None = None,
) -> LayerBalanceMonitor:
    monitor = LayerBalanceMonitor(
        layers=LAYERS, save_figure=False, log_every_n_steps=every, ledger=True
    )
    callbacks: list[Callback] = [monitor]
    if ckpt_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=root, every_n_train_steps=ckpt_every, save_top_k=-1, filename="{step}"
            )
        )
    fit(
        _Model(),
        callbacks,
        _loader(epoch),
        ckpt_path=ckpt,
        max_steps=8,
        log_every_n_steps=every,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=bool(ckpt_every),
        default_root_dir=str(root),
    )
    return monitor


@pytest.mark.parametrize(
    ("every", "ckpt_every", "accumulate", "epoch"),
    [(1, 3, 1, 20), (2, 4, 1, 20), (1, 3, 2, 20), (1, 4, 1, 4)],
    ids=["every-step", "cadence-2", "accumulate-2", "epoch-end"],
)
def test_mid_epoch_resume_equals_the_uninterrupted_history(
    tmp_path: Path, every: int, ckpt_every: int, accumulate: int, epoch: int
) -> None:
    """ModelCheckpoint(every_n_train_steps=...) mid-epoch: Lightning increments its step counter
    after on_train_start, so the monitor dropped a row (every step, checkpoint at 3: rows 0, 1,
    3, ...; cadence 2, checkpoint at 4: row 3 lost). Step- and epoch-end checkpoints, with and
    without accumulation, give the uninterrupted history."""
    whole = _fit_monitor(tmp_path / "whole", every, accumulate, epoch, ckpt_every)
    ckpt = str(tmp_path / "whole" / f"step={ckpt_every}.ckpt")
    resumed = _fit_monitor(tmp_path / "resumed", every, accumulate, epoch, None, ckpt)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history]
    for a, b in zip(resumed.history, whole.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12), (a["step"], key)


def test_a_second_fit_continues_every_series_from_one_origin(tmp_path: Path) -> None:
    """A second fit() on the same Trainer: the layer series continued from the first fit's W(0)
    while the ledger and per-unit D_i(0) restarted (diff - diff0 beside a ledger sum of 0).
    Now all continue: at every row, diff(t) - diff(0) equals the ledger's terms plus closure."""
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True, neurons=True)
    model = _Model()
    trainer = fit(model, [monitor], _loader(), max_steps=3, default_root_dir=str(tmp_path))
    d0 = {name: entry["D0"] for name, entry in monitor.unit_ledger.items()}
    assert d0  # the per-unit ledger of the hidden layers
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(model, _loader())
    assert [r["step"] for r in monitor.history] == list(range(6))
    first = monitor.history[0]
    for row in monitor.history:
        for pair in ("net.0-net.2", "net.2-net.4"):
            drift = row[f"balance/sq_norm_diff/{pair}"] - first[f"balance/sq_norm_diff/{pair}"]
            terms = sum(v for k, v in row.items() if k.startswith("ledger/") and k.endswith(pair))
            assert drift == pytest.approx(terms, rel=1e-9, abs=1e-12), (row["step"], pair)
    for name, entry in monitor.unit_ledger.items():
        assert torch.equal(entry["D0"], d0[name])  # one origin for the per-unit series too
    for name, entry in monitor.unit_ledger.items():
        scale = float(entry["D0"].abs().max() + entry["D"].abs().max())
        assert float(entry["closure"].abs().max()) <= 1e-12 * scale, name
