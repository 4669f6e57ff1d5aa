"""Lightning models, data, Trainer settings and the one ``fit`` helper of the callback tests.

Imported both by ``tests/callbacks/`` (in the pytest process) and by ``tests/scripts/`` (in the
DDP / FSDP2 processes), so the single-process reference and the distributed runs build exactly
the same model from the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.demos import ReluMLP

D_IN, HIDDEN, D_OUT, N_POINTS = 12, 16, 3, 64

# LayerBalanceMonitor warns when the Trainer has no logger (tests/callbacks/test_monitor_figures.py
# asserts that warning). The tests that fit without a logger on purpose, to read the monitor's
# history only, carry this mark (warnings are errors in this suite).
WITHOUT_LOGGER = pytest.mark.filterwarnings(
    "ignore:`LayerBalanceMonitor` is used with a `Trainer` that has no logger:RuntimeWarning"
)


#: The layers of make_net() (Linear, ReLU, Linear, ReLU, Linear) in a BalanceModel: what the
#: monitor's layer mode is given explicitly (without ``layers=`` it watches the model's symmetries).
LAYERS = ["net.0", "net.2", "net.4"]


def make_data(
    n: int = N_POINTS, seed: int = 1, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """A fixed regression problem: x ~ N(0, I), y = a fixed random linear map of x, plus a bump."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=dtype)
    a = torch.randn(D_IN, D_OUT, generator=g, dtype=dtype)
    y = x @ a / D_IN**0.5 + 0.5
    return x, y


class _RepeatedBatch(Dataset):
    """The full batch ``(x, y)``, ``length`` times: many full-batch steps in one epoch."""

    def __init__(self, x: Tensor, y: Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


def make_loader(
    x: Tensor, y: Tensor, batch_size: int | None = None, repeat: int | None = None
) -> DataLoader:
    """Mini-batches of ``(x, y)`` in order; or, with ``repeat``, the full batch ``repeat`` times
    per epoch (Lightning's per-epoch overhead dominates tiny full-batch runs otherwise)."""
    if repeat is not None:
        return DataLoader(_RepeatedBatch(x, y, repeat), batch_size=None)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or len(x), shuffle=False)


def make_net(
    bias: bool = False, dtype: torch.dtype = torch.float64, scales: tuple[float, ...] | None = None
) -> nn.Sequential:
    """Three-layer ReLU MLP ``D_IN -> HIDDEN -> HIDDEN -> D_OUT``: the layers of ``demos.ReluMLP``
    (Linear at ``0, 2, 4``, as :data:`LAYERS` names them) in a plain ``nn.Sequential``, which the
    tests slice (``net[::2]``: ``nn.Sequential`` builds the slice as ``type(self)(OrderedDict)``,
    which ``ReluMLP``'s constructor does not take); ``scales`` scale the layers."""
    net = nn.Sequential(*ReluMLP(D_IN, (HIDDEN, HIDDEN), D_OUT, bias=bias)).to(dtype)
    if scales is not None:
        with torch.no_grad():
            for layer, scale in zip(list(net)[::2], scales, strict=True):
                for p in layer.parameters():
                    p.mul_(scale)
    return net


class BalanceModel(pl.LightningModule):
    """Square loss (mean over the batch) on :func:`make_net`, optimised with torch-momentum."""

    def __init__(
        self,
        net: nn.Module | None = None,
        lr: float = 0.05,
        momentum: float = 0.0,
        optimizer: str = "polyak",
        fsdp: bool = False,
    ) -> None:
        super().__init__()
        self.net = net if net is not None else make_net()
        self.lr = lr
        self.momentum = momentum
        self.optimizer_name = optimizer
        self.fsdp = fsdp

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_model(self) -> None:
        if not self.fsdp:
            return
        from torch.distributed.fsdp import fully_shard

        assert self.device_mesh is not None  # ModelParallelStrategy sets it
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.children():
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "polyak":
            return PolyakSGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.optimizer_name == "nesterov":
            return NesterovSGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        raise ValueError(self.optimizer_name)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet, fast Trainer settings for the tests."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 5,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    kwargs.update(overrides)
    return kwargs


def fit(
    model: pl.LightningModule,
    callbacks: Sequence[pl.Callback] = (),
    loader: DataLoader | None = None,
    *,
    val_loader: DataLoader | None = None,
    ckpt_path: str | Path | None = None,
    **trainer_options: Any,
) -> pl.Trainer:
    """``Trainer.fit`` of ``model`` with ``callbacks`` on a quiet CPU Trainer; returns the Trainer.

    The Trainer takes :func:`trainer_kwargs` updated by ``trainer_options``, without a logger
    unless ``logger=`` is given. ``loader`` defaults to the full batch of :func:`make_data`, 64
    times per epoch; ``val_loader`` and ``ckpt_path`` go to ``Trainer.fit``.
    """
    trainer_options.setdefault("logger", False)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=list(callbacks), **trainer_options))
    if loader is None:
        loader = make_loader(*make_data(), repeat=64)
    trainer.fit(model, loader, val_loader, ckpt_path=ckpt_path)
    return trainer


def _sq_norm(tensors: list[Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in tensors)


def _grad(p: Tensor) -> Tensor:
    assert p.grad is not None, "every parameter of the reference gets a gradient"
    return p.grad


def reference_sgd(
    net: nn.Module,
    lr: float,
    steps: int,
    *,
    momentum: float = 0.0,
    clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> list[dict[str, list[float]]]:
    """Plain-torch full-batch ``torch.optim.SGD`` on :func:`make_data` (what the monitor tests
    fit through Lightning); per step, before the update: the squared norm of every ``Linear``
    layer ("sq") and its gradient norm ("grad", before clipping to the total norm ``clip``,
    unscaled: fp16 autocast with ``scaler``)."""
    x, y = make_data(dtype=next(net.parameters()).dtype)
    layers = [m for m in net.children() if isinstance(m, nn.Linear)]
    out = []
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
            loss = ((net(x) - y) ** 2).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        out.append(
            {
                "sq": [_sq_norm([p.detach() for p in m.parameters()]) for m in layers],
                "grad": [math.sqrt(_sq_norm([_grad(p) for p in m.parameters()])) for m in layers],
            }
        )
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return out


class ValidatedModel(BalanceModel):
    """BalanceModel with a validation step that records the loss and the parameters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_records: list[dict[str, Any]] = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("val_loss", loss)
        self.val_records.append(
            {
                "step": self.trainer.global_step,
                "loss": loss.item(),
                "params": [p.detach().clone() for p in self.parameters()],
            }
        )
        return loss
