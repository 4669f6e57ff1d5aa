"""The main job: the layer-balance experiment of Du, Hu & Lee (2018), with Lightning.

Theory. For a network that is 1-homogeneous in each layer's weights (here bias-free ReLU layers),
``<∇_{W_h} loss, W_h>`` is the same for every layer h, so gradient flow keeps
``‖W_h(t)‖² − ‖W_h(0)‖²`` equal across layers: the differences of adjacent squared norms are
conserved, ``‖W_h(t)‖² − ‖W_{h+1}(t)‖² = ‖W_h(0)‖² − ‖W_{h+1}(0)‖²``, however much the norms grow.
A gradient-descent step with rate η changes such a difference by exactly
``η² (‖g_h‖² − ‖g_{h+1}‖²)``, second order in η; momentum methods move the weights along the
velocity instead of the gradient, and the first-order cancellation no longer holds.

Setup (fixed seeds, documented so that the run is reproducible):

* data: n = 1000 Gaussian points ``x ~ N(0, s² I/1000)`` in R^1000, input scale s = 5
  (``--input-scale``); targets ``y = T3 relu(T2 relu(T1 x))`` of a fixed random teacher of the
  same shape (``T1`` entries N(0, 1/1000), ``T2``, ``T3`` N(0, 1/100)), divided by their std;
* model: ``x → W1 (100×1000) → relu → W2 (100×100) → relu → W3 (10×100)``, no biases;
  square loss ``½ mean_i ‖f(x_i) − y_i‖²``, full batch, float32;
* initialisation: balanced ``W1, W2, W3 ~ N(0, 1e-4/100), N(0, 1e-4/10), N(0, 1e-4)`` entrywise
  (every ‖W_h(0)‖² ≈ 0.1), unbalanced all ``N(0, 1e-4)`` (‖W_h(0)‖² ≈ 10, 1, 0.1);
* optimisers: plain gradient descent (``PolyakSGD(momentum=0)``) with rate η = 0.2 for 2500
  steps (``--lr``, ``--steps``), and, at the same
  *effective* step size η/(1 − μ) = η, ``PolyakSGD(μ=0.9)``, ``NesterovSGD(μ=0.9)`` and the
  built-in ``torch.optim.SGD(momentum=0.9)``, all with lr = η(1 − μ). Comparing at equal
  effective step size means the momentum runs travel as fast as gradient descent, so the drift
  they add is due to momentum, not to a ten times larger step (``--same-lr`` runs them at η).
* why these settings: the small initialisation sits near the saddle at 0; with unit-scale inputs
  gradient descent needs far more steps to leave it, and a larger η leaves it sooner but adds
  discrete-time drift ~η²Σ‖g‖². With s = 5 and η = 0.2 the loss falls from 5.0 to ~1e-3 in 2500
  steps while every ‖W_h‖² grows from ≤ 10 to ~45-55 and the differences move by < 0.5.
* ``--quick`` runs a reduced problem (200 points in R^100, 30 steps) for smoke tests.
* :class:`~torch_momentum.callbacks.LayerBalanceMonitor` logs the balance series every
  ``--log-every`` steps (CSVLogger); NesterovSGD is read at its parameters (the look-ahead point,
  what the gradient is taken at) during training and at its iterate for the final table.

Outputs under ``--out`` (default ``runs/layer_balance/``): ``figure.png`` (the paper's figure for
gradient descent: rows balanced/unbalanced, columns squared-norm differences and ratios of
adjacent layers against the step), ``optimizers.png`` (``balance/drift`` against the step for
each optimiser and both initialisations), ``summary.csv``, CSVLogger logs under ``logs/``, and the
printed table. Full runs also copy the figures to ``docs/``.

    python examples/layer_balance.py            # the default run (make demo)
    python examples/layer_balance.py --quick    # a few steps, for smoke tests
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import torch
from _common import base_parser, format_table, prepare_out, publish_figure
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.callbacks import LayerBalanceMonitor, OptimizerModeSwitch

LAYERS = ["W1", "W2", "W3"]
PAIRS = [("W1", "W2"), ("W2", "W3")]
OPTIMIZERS = ["gd", "polyak", "nesterov", "sgd"]
LABELS = {
    "gd": "gradient descent",
    "polyak": "PolyakSGD(0.9)",
    "nesterov": "NesterovSGD(0.9)",
    "sgd": "torch.optim.SGD(0.9)",
}
MOMENTUM = 0.9


def make_data(n: int, dim: int, input_scale: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Gaussian inputs and targets of a fixed random bias-free ReLU teacher (unit std)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * (input_scale / dim**0.5)
    t1 = torch.randn(100, dim, generator=g) / dim**0.5
    t2 = torch.randn(100, 100, generator=g) / 10
    t3 = torch.randn(10, 100, generator=g) / 10
    y = torch.relu(torch.relu(x @ t1.T) @ t2.T) @ t3.T
    return x, y / y.std()


class FullBatch(Dataset):
    """Yields the whole data set as one batch, ``steps`` times: one epoch = the whole run."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class DeepReLU(L.LightningModule):
    """3-layer bias-free ReLU network trained with the square loss."""

    def __init__(self, dim: int, balanced: bool, make_optimizer: Callable, seed: int = 1) -> None:
        super().__init__()
        self.W1 = nn.Linear(dim, 100, bias=False)
        self.W2 = nn.Linear(100, 100, bias=False)
        self.W3 = nn.Linear(100, 10, bias=False)
        variances = (1e-4 / 100, 1e-4 / 10, 1e-4) if balanced else (1e-4, 1e-4, 1e-4)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer, var in zip((self.W1, self.W2, self.W3), variances, strict=True):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * var**0.5)
        self.make_optimizer = make_optimizer
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W3(torch.relu(self.W2(torch.relu(self.W1(x)))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = 0.5 * (self(x) - y).pow(2).sum(dim=1).mean()
        self.losses.append(loss.detach())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class StepTimer(Callback):
    """Wall time of each training batch (forward, backward, callbacks and optimiser step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


def momentum_lr(lr: float, same_lr: bool) -> float:
    """lr of the momentum runs: η(1 − μ) (equal effective step η), or η with ``--same-lr``."""
    return lr if same_lr else lr * (1 - MOMENTUM)


def optimizer_factory(name: str, lr: float, same_lr: bool = False) -> Callable:
    """Gradient descent at rate ``lr``; momentum methods at :func:`momentum_lr`."""
    slow = momentum_lr(lr, same_lr)
    if name == "gd":
        return lambda p: PolyakSGD(p, lr=lr, momentum=0.0)
    if name == "polyak":
        return lambda p: PolyakSGD(p, lr=slow, momentum=MOMENTUM)
    if name == "nesterov":
        return lambda p: NesterovSGD(p, lr=slow, momentum=MOMENTUM)
    if name == "sgd":
        return lambda p: torch.optim.SGD(p, lr=slow, momentum=MOMENTUM)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@dataclass
class Run:
    init: str
    optimizer: str
    history: list[dict[str, float]]
    losses: list[float]
    final_sq: list[float]
    initial_sq: list[float]
    ms_per_step: float
    weights: list[torch.Tensor] = field(repr=False)

    @property
    def drift(self) -> float:
        d0 = [self.initial_sq[i] - self.initial_sq[i + 1] for i in range(len(PAIRS))]
        d = [self.final_sq[i] - self.final_sq[i + 1] for i in range(len(PAIRS))]
        return max(abs(a - b) for a, b in zip(d, d0, strict=True))


def train_one(
    init: str, name: str, data: tuple[torch.Tensor, ...], args: argparse.Namespace, out: Path
) -> Run:
    x, y = data
    model = DeepReLU(x.shape[1], init == "balanced", optimizer_factory(name, args.lr, args.same_lr))
    initial_sq = [getattr(model, n).weight.detach().pow(2).sum().item() for n in LAYERS]
    monitor = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=args.log_every, save_figure=True)
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(out / "logs", name=f"{init}-{name}", version=0),
        callbacks=[monitor, OptimizerModeSwitch(), timer],
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(FullBatch(x, y, args.steps), batch_size=None, shuffle=False)
    trainer.fit(model, loader)
    opt = trainer.optimizers[0]
    if hasattr(opt, "eval"):
        opt.eval()  # report NesterovSGD at its iterate x_t
    weights = [getattr(model, n).weight.detach().clone() for n in LAYERS]
    steady = timer.times[len(timer.times) // 10 :] or timer.times
    return Run(
        init=init,
        optimizer=name,
        history=monitor.history,
        losses=[float(v) for v in model.losses],
        final_sq=[w.pow(2).sum().item() for w in weights],
        initial_sq=initial_sq,
        ms_per_step=1e3 * statistics.median(steady),
        weights=weights,
    )


def series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h]
    return [p[0] for p in points], [p[1] for p in points]


def paper_figure(runs: dict[tuple[str, str], Run], path: Path) -> None:
    """Rows balanced / unbalanced; columns adjacent differences and ratios (gradient descent)."""
    fig = Figure(figsize=(11, 7.5), constrained_layout=True)
    axes = fig.subplots(2, 2)
    panel = iter("abcd")
    for row, init in enumerate(("balanced", "unbalanced")):
        run = runs.get((init, "gd"))
        for col, (kind, label) in enumerate(
            (("sq_norm_diff", "squared norm differences"), ("sq_norm_ratio", "squared norm ratios"))
        ):
            ax = axes[row, col]
            letter = next(panel)
            ax.set_title(f"({letter}) {init.capitalize()} initialization, {label}")
            if run is None:
                continue
            for a, b in PAIRS:
                steps, values = series(run.history, f"balance/{kind}/{a}-{b}")
                ax.plot(steps, values, label=f"‖{a}‖² − ‖{b}‖²" if col == 0 else f"‖{a}‖² / ‖{b}‖²")
            if col == 0:
                for a, style in zip(LAYERS, (":", "-.", "--"), strict=True):
                    steps, norms = series(run.history, f"balance/sq_norm/{a}")
                    ax.plot(steps, norms, style, color="grey", lw=1, label=f"‖{a}‖² (the norms)")
            else:
                ratios = [
                    v for a, b in PAIRS for v in series(run.history, f"balance/{kind}/{a}-{b}")[1]
                ]
                if ratios and max(ratios) / max(min(ratios), 1e-300) > 10:
                    ax.set_yscale("log")
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle("Gradient descent keeps adjacent squared-norm differences (Du, Hu & Lee 2018)")
    fig.savefig(path, dpi=110)


def optimizers_figure(runs: dict[tuple[str, str], Run], names: list[str], path: Path) -> None:
    fig = Figure(figsize=(11, 4.2), constrained_layout=True)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, init in zip(axes, ("balanced", "unbalanced"), strict=True):
        for name in names:
            run = runs.get((init, name))
            if run is None:
                continue
            steps, drift = series(run.history, "balance/drift")
            # the built-in is dashed on top: it coincides with PolyakSGD (same iterates)
            style = (
                {"ls": "--", "lw": 1.2}
                if name == "sgd"
                else {"lw": 2.0 if name == "polyak" else 1.5}
            )
            ax.plot(steps, [max(d, 1e-12) for d in drift], label=LABELS[name], **style)
        ax.set_yscale("log")
        ax.set_title(f"{init} initialization: balance/drift")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("max over adjacent pairs |diff(t) − diff(0)|")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], Run]:
    parser = base_parser(__doc__.split("\n\n")[0], "runs/layer_balance")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 2500)")
    parser.add_argument("--lr", type=float, default=0.2, help="gradient-descent rate η")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset")
    parser.add_argument("--input-scale", type=float, default=5.0, help="input norm scale s")
    parser.add_argument("--log-every", type=int, default=None, help="monitor/logger cadence")
    parser.add_argument(
        "--same-lr", action="store_true", help="momentum runs at lr η instead of η(1 − μ)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in OPTIMIZERS:
            parser.error(f"--optimizers: unknown optimizer {n!r}; choose from {OPTIMIZERS}")
    if args.steps is None:
        args.steps = 30 if args.quick else 2500
    if args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    if args.log_every is None:
        args.log_every = max(1, args.steps // 300)
    out = prepare_out(args.out)
    shutil.rmtree(out / "logs", ignore_errors=True)  # each run rewrites its CSVLogger folders
    torch.manual_seed(0)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    n, dim = (200, 100) if args.quick else (1000, 1000)
    data = make_data(n, dim, args.input_scale)

    runs: dict[tuple[str, str], Run] = {}
    for init in ("balanced", "unbalanced"):
        for name in names:
            print(f"[layer_balance] {init} initialization, {LABELS[name]}", flush=True)
            runs[(init, name)] = train_one(init, name, data, args, out)

    rows, csv_rows = [], []
    for (init, name), run in runs.items():
        diff0 = [run.initial_sq[i] - run.initial_sq[i + 1] for i in range(2)]
        row = {
            "init": init,
            "optimizer": LABELS[name],
            "lr": args.lr if name == "gd" else momentum_lr(args.lr, args.same_lr),
            "steps": args.steps,
            "loss_0": run.losses[0],
            "loss_final": run.losses[-1],
            "diff_0": "/".join(f"{d:.3f}" for d in diff0),
            "drift_final": run.drift,
            **{f"sq_{n}": v for n, v in zip(LAYERS, run.final_sq, strict=True)},
            "ms_per_step": run.ms_per_step,
        }
        csv_rows.append(row)
        rows.append(
            [
                init,
                LABELS[name],
                f"{row['lr']:.3g}",
                f"{row['loss_0']:.3g}",
                f"{row['loss_final']:.3g}",
                row["diff_0"],
                f"{run.drift:.3g}",
                *(f"{v:.3f}" for v in run.final_sq),
                f"{run.ms_per_step:.1f}",
            ]
        )
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    header = ["init", "optimizer", "lr", "loss0", "loss", "diff(0)", "drift"]
    header += [f"‖{n}‖²" for n in LAYERS] + ["ms/step"]
    print()
    print(format_table(header, rows))
    for init in ("balanced", "unbalanced"):
        ours, ref = runs.get((init, "polyak")), runs.get((init, "sgd"))
        if ours is not None and ref is not None:
            diff = max(
                (a - b).abs().max().item() for a, b in zip(ours.weights, ref.weights, strict=True)
            )
            scale = max(b.abs().max().item() for b in ref.weights)
            print(
                f"PolyakSGD vs built-in SGD ({init}): max parameter difference {diff:.2e} "
                f"(relative {diff / scale:.2e}; float32 rounding)"
            )
    paper_figure(runs, out / "figure.png")
    optimizers_figure(runs, names, out / "optimizers.png")
    publish_figure(out / "figure.png", "layer_balance.png", args.quick)
    publish_figure(out / "optimizers.png", "layer_balance_optimizers.png", args.quick)
    print(f"\nwrote {out / 'figure.png'}, {out / 'optimizers.png'}, {out / 'summary.csv'}")
    return runs


if __name__ == "__main__":
    main()
