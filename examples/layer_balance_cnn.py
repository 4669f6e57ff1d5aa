"""Per-channel balance and the ledger on a small CNN (scikit-learn digits), with Lightning.

For a bias-free ReLU CNN, scaling output channel i of a conv layer by α (its filter) and the
matching input-channel slice of the next layer by 1/α (for the conv after it, the slice of its
filters; for the Linear after a Flatten, the columns of channel i's spatial positions) leaves the
network unchanged: max pooling and ReLU are positively homogeneous. So gradient flow conserves,
for every hidden channel i, ``D_i = ‖in_i‖² − ‖out_i‖²``, and the conserved layer differences are
their sums. ``torch_momentum.balance.pair_units`` pairs the channels through the pooling layers
and the Flatten (as ``LayerBalanceMonitor(neurons=True)`` does), and
:class:`~torch_momentum.callbacks.LayerBalanceMonitor` with ``ledger=True`` splits the drift of
each adjacent pair into momentum, symmetry, discretisation (and weight-decay, other) terms.

Setup: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels / 16; the network
``conv1 (1→16, 3×3) → relu → maxpool 2 → conv2 (16→32, 3×3) → relu → maxpool 2 → flatten →
fc (128→10)``, all bias-free, PyTorch's default initialisation (seed 0), cross-entropy, minibatches
of 128 (shuffled, seed 0), 30 epochs (420 steps), float32. Gradient descent (``PolyakSGD``,
momentum 0) at lr η = 0.1 against ``PolyakSGD(0.9)`` and ``NesterovSGD(0.9)`` at lr η(1 − μ), the
same effective step. ``--quick``: 256 images, 3 epochs, for smoke tests.

Outputs under ``--out`` (default ``runs/layer_balance_cnn/``): ``summary.csv`` (one row per run:
accuracy, ledger terms per pair, per-channel drift per hidden layer), ``ledger_cnn.png``,
``unit_drift_cnn.png`` and CSVLogger logs; full runs copy the figures to ``docs/``.

    python examples/layer_balance_cnn.py            # about half a minute on 2 cores
    python examples/layer_balance_cnn.py --quick    # a few seconds, for smoke tests
"""

from __future__ import annotations

import csv
import shutil
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable

import lightning.pytorch as L
import torch
from _common import base_parser, format_table, prepare_out, publish_figure, quiet_lightning
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.balance import pair_units, unit_balance
from torch_momentum.callbacks import (
    LEDGER_TERMS,
    LayerBalanceMonitor,
    ledger_series,
    plot_ledger,
    plot_unit_drift,
)

MOMENTUM = 0.9
LABELS = {"gd": "gradient descent", "polyak": "PolyakSGD(0.9)", "nesterov": "NesterovSGD(0.9)"}


def make_net() -> nn.Sequential:
    """The bias-free ReLU CNN of the module docstring (8x8 inputs, 10 classes)."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1, bias=False),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3, padding=1, bias=False),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc=nn.Linear(32 * 2 * 2, 10, bias=False),
        )
    )


class DigitsCNN(L.LightningModule):
    def __init__(self, make_optimizer: Callable) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = make_net()
        self.make_optimizer = make_optimizer
        self.losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.detach())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def optimizer_factory(name: str, lr: float) -> Callable:
    if name == "gd":
        return lambda p: PolyakSGD(p, lr=lr, momentum=0.0)
    if name == "polyak":
        return lambda p: PolyakSGD(p, lr=lr * (1 - MOMENTUM), momentum=MOMENTUM)
    return lambda p: NesterovSGD(p, lr=lr * (1 - MOMENTUM), momentum=MOMENTUM)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = base_parser(__doc__.split("\n\n")[0], "runs/layer_balance_cnn")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 30)")
    parser.add_argument("--lr", type=float, default=0.1, help="gradient-descent rate η")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 30
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    out = prepare_out(args.out)
    shutil.rmtree(out / "logs", ignore_errors=True)
    quiet_lightning()
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    if args.quick:
        x, y = x[:256], y[:256]
    every = 1 if args.quick else 5
    t_start = time.perf_counter()

    rows, histories, unit_drift, table, ledger_table = [], {}, {}, [], []
    for name in ("gd", "polyak", "nesterov"):
        print(f"[layer_balance_cnn] {LABELS[name]}", flush=True)
        model = DigitsCNN(optimizer_factory(name, args.lr))
        units = pair_units(model)  # conv1 and conv2 channels, through the pools and Flatten
        d0 = unit_balance(model, units)
        # the three bias-free layers, adjacent in this order (without layers= the monitor
        # watches the model's symmetries and logs a summary instead of per-pair keys)
        monitor = LayerBalanceMonitor(
            layers=["net.conv1", "net.conv2", "net.fc"], log_every_n_steps=every, ledger=True
        )
        trainer = L.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(out / "logs", name=name, version=0),
            callbacks=[monitor],
            log_every_n_steps=every,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
        )
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=128,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        trainer.fit(model, loader)
        opt = trainer.optimizers[0]
        if hasattr(opt, "eval"):
            opt.eval()  # the iterate x_T
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        drift = {k: (v - d0[k]).abs().tolist() for k, v in unit_balance(model, units).items()}
        ledger = {
            pair: {term: values[-1] for term, (_, values) in cols.items()}
            for pair, cols in ledger_series(monitor.history).items()
        }
        histories[LABELS[name]] = monitor.history
        unit_drift[LABELS[name]] = drift
        row: dict[str, object] = {
            "optimizer": LABELS[name],
            "steps": trainer.global_step,
            "loss_final": float(model.losses[-1]),
            "train_accuracy": accuracy,
        }
        for pair, terms in ledger.items():
            for term in (*LEDGER_TERMS, "drift", "closure"):
                row[f"{term}_{pair}"] = terms[term]
            ledger_table.append(
                [
                    LABELS[name],
                    pair,
                    *(f"{terms[t]:.3g}" for t in (*LEDGER_TERMS, "drift")),
                    f"{abs(terms['closure']):.1e}",
                ]
            )
        for layer, values in drift.items():
            row[f"unit_drift_median_{layer}"] = statistics.median(values)
            row[f"unit_drift_max_{layer}"] = max(values)
        rows.append(row)
        table.append(
            [
                LABELS[name],
                f"{row['loss_final']:.3g}",
                f"{100 * accuracy:.1f} %",
                *(f"{statistics.median(v):.2e} / {max(v):.2e}" for v in drift.values()),
            ]
        )

    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    layers = list(unit_drift[LABELS["gd"]])
    print()
    print(
        format_table(
            ["optimizer", "loss", "train acc", *(f"{k} |ΔD_i| median / max" for k in layers)],
            table,
        )
    )
    print("\nLedger at the last logged step (cumulative; D(t) − D(0) = the terms + closure):")
    print(
        format_table(["optimizer", "pair", *LEDGER_TERMS, "D(t)−D(0)", "|closure|"], ledger_table)
    )
    fig = plot_ledger(histories, title="Balance ledger of a bias-free CNN on digits")
    fig.savefig(out / "ledger_cnn.png", dpi=100)
    fig = plot_unit_drift(unit_drift, title="Per-channel drift |D_i(T) − D_i(0)|, CNN on digits")
    fig.savefig(out / "unit_drift_cnn.png", dpi=100)
    publish_figure(out / "ledger_cnn.png", "ledger_cnn.png", args.quick)
    publish_figure(out / "unit_drift_cnn.png", "unit_drift_cnn.png", args.quick)
    print(f"\nwrote {out / 'summary.csv'}, {out / 'ledger_cnn.png'}, {out / 'unit_drift_cnn.png'}")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
