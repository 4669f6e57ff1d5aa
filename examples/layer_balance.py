"""The main job: the layer-balance experiment of Du, Hu & Lee (2018) and its ledger, with Lightning.

Theory. For a network that is 1-homogeneous in each layer's weights (here bias-free ReLU layers),
``<∇_{W_h} loss, W_h>`` is the same for every layer h, so gradient flow keeps
``‖W_h(t)‖² − ‖W_h(0)‖²`` equal across layers: the differences of adjacent squared norms
``D = ‖W_h‖² − ‖W_{h+1}‖²`` are conserved however much the norms grow, and so is, for every
hidden unit i, ``D_i = ‖in_i‖² − ‖out_i‖²`` (incoming row against outgoing column). For any
update ``x → x + Δx``, exactly, ``ΔD = 2<x, Δx>_± + ‖Δx‖²_±`` (``<a, b>_±`` = the inner product
over the layer's incoming side minus the outgoing side). Gradient descent's first-order part is
``−2η<x, g>_± = 0``, so its drift is the discretisation ``η²‖g‖²_±`` alone; heavy ball adds a
first-order momentum term ``2ημ<x, v>_±``. The monitor's ledger (``ledger=True``) adds these terms
up over every step: ``D(t) − D(0) = momentum + weight_decay + symmetry + discretisation + other``
to round-off.

Setup (fixed seeds, documented so that the run is reproducible):

* data: n = 1000 Gaussian points ``x ~ N(0, s² I/1000)`` in R^1000, input scale s = 5
  (``--input-scale``); targets ``y = T3 relu(T2 relu(T1 x))`` of a fixed random teacher of the
  same shape (``T1`` entries N(0, 1/1000), ``T2``, ``T3`` N(0, 1/100)), divided by their std;
* model: ``x → W1 (100×1000) → relu → W2 (100×100) → relu → W3 (10×100)``, no biases;
  square loss ``½ mean_i ‖f(x_i) − y_i‖²``, full batch, float32;
* initialisation: balanced, every entry of W_h drawn from ``N(0, 0.1/numel(W_h))`` (every
  ‖W_h(0)‖² ≈ 0.1); unbalanced, all entries ``N(0, 1e-4)`` (‖W_h(0)‖² ≈ 10, 1, 0.1);
* optimisers: plain gradient descent (``PolyakSGD(momentum=0)``) with rate η = 0.2 for 2500
  steps (``--lr``, ``--steps``), and, at the same *effective* step size η/(1 − μ) = η,
  ``PolyakSGD(μ=0.9)``, ``NesterovSGD(μ=0.9)`` and the built-in ``torch.optim.SGD(momentum=0.9)``,
  all with lr = η(1 − μ) (``--same-lr`` runs them at η);
* why these settings: the small initialisation sits near the saddle at 0; with unit-scale inputs
  gradient descent needs far more steps to leave it, and a larger η leaves it sooner but adds
  discrete-time drift ~η²Σ‖g‖²_±. With s = 5 and η = 0.2 the loss falls from 5.0 to ~1e-3 in
  2500 steps while every ‖W_h‖² grows from ≤ 10 to ~45-55;
* bias variant: a 2-layer ReLU network with biases, ``x → W1 (100×1000, bias) → relu → W2
  (10×100, bias)``, balanced start, targets shifted by +1 (so that the output bias has something
  to learn), gradient descent for 1000 steps, monitored twice from the same seed: with the
  default layers (each module's weight and bias, so the output bias is wrongly counted in D) and
  with the dict grouping ``{"W1": [W1.weight, W1.bias], "W2": [W2.weight]}`` (the conserved
  quantity);
* ``--quick`` runs a reduced problem (200 points in R^100, 30 steps) for smoke tests.

:class:`~torch_momentum.callbacks.LayerBalanceMonitor` (``ledger=True``) logs the balance series
every ``--log-every`` steps (CSVLogger) and the ledger over every step; the ledger reads
NesterovSGD at its iterate x_t. The per-unit balance D_i is read with
``torch_momentum.balance.unit_balance`` before and after training.

Outputs under ``--out`` (default ``runs/layer_balance/``): ``figure.png`` (the paper's figure for
gradient descent: rows balanced/unbalanced, columns squared-norm differences and ratios),
``optimizers.png`` (``balance/drift`` per optimiser), ``ledger.png`` (the ledger of gradient
descent, PolyakSGD and NesterovSGD from the balanced start), ``unit_drift.png`` (per-unit
|D_i(T) − D_i(0)| by optimiser), ``summary.csv`` (one row per run, ledger terms included),
``bias_variant.csv``, CSVLogger logs under ``logs/``, and the printed tables. Full runs also copy
the figures to ``docs/``.

    python examples/layer_balance.py            # the default run (make demo)
    python examples/layer_balance.py --quick    # a few steps, for smoke tests
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import torch
from _common import base_parser, format_table, prepare_out, publish_figure, quiet_lightning
from _steptimer import StepTimer
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.balance import pair_units, unit_balance
from torch_momentum.callbacks import (
    LEDGER_TERMS,
    LayerBalanceMonitor,
    OptimizerModeSwitch,
    ledger_series,
    plot_ledger,
    plot_unit_drift,
    series,
)

LAYERS = ["W1", "W2", "W3"]
PAIRS = ["W1-W2", "W2-W3"]
OPTIMIZERS = ["gd", "polyak", "nesterov", "sgd"]
LEDGER_OPTIMIZERS = ["gd", "polyak", "nesterov"]
LABELS = {
    "gd": "gradient descent",
    "polyak": "PolyakSGD(0.9)",
    "nesterov": "NesterovSGD(0.9)",
    "sgd": "torch.optim.SGD(0.9)",
}
MOMENTUM = 0.9
HEURISTIC = (1 + MOMENTUM) / (1 - MOMENTUM)  # 19 at μ = 0.9
DRIFT_DECADES = 3  # optimizers.png: decades shown below the largest drift


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


class ReLUNet(L.LightningModule):
    """ReLU network ``W_k ... relu(W_1 x)`` of Linear layers named W1, W2, ..., square loss.

    ``balanced``: every weight entry of ``W_h`` is drawn from ``N(0, 0.1 / numel(W_h))`` (every
    ``‖W_h(0)‖² ≈ 0.1`` whatever the widths); otherwise from ``N(0, 1e-4)``. Biases start at 0.
    """

    def __init__(
        self,
        widths: Sequence[int],
        balanced: bool,
        make_optimizer: Callable,
        bias: bool = False,
        seed: int = 1,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = [f"W{i + 1}" for i in range(len(widths) - 1)]
        for name, n_in, n_out in zip(self.names, widths[:-1], widths[1:], strict=True):
            layer = nn.Linear(n_in, n_out, bias=bias)
            var = 0.1 / layer.weight.numel() if balanced else 1e-4
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * var**0.5)
                if bias:
                    layer.bias.zero_()
            setattr(self, name, layer)
        self.make_optimizer = make_optimizer
        self.losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names[:-1]:
            x = torch.relu(getattr(self, name)(x))
        return getattr(self, self.names[-1])(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = 0.5 * (self(x) - y).pow(2).sum(dim=1).mean()
        self.losses.append(loss.detach())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


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
    """One training run: the monitor's history and what was read after training."""

    init: str
    optimizer: str
    history: list[dict[str, float]]
    losses: list[float]
    ms_per_step: float
    #: per hidden layer, D_i(T) − D_i(0) for every unit (T: after the last step, at the iterate)
    unit_drift: dict[str, list[float]]
    weights: list[torch.Tensor] = field(repr=False)

    def last(self, key: str) -> float:
        """The monitor's last logged value of ``key``."""
        return next(row[key] for row in reversed(self.history) if key in row)

    def ledger(self) -> dict[str, dict[str, float]]:
        """``{pair: {term: cumulative value at the last logged step}}`` (plus closure, drift)."""
        return {
            pair: {term: values[-1] for term, (_, values) in cols.items()}
            for pair, cols in ledger_series(self.history).items()
        }

    def diff0(self, a: str, b: str) -> float:
        """D(0) of the pair a-b from logged values: diff(t) − (change_a(t) − change_b(t))."""
        return (
            self.last(f"balance/sq_norm_diff/{a}-{b}")
            - self.last(f"balance/sq_norm_change/{a}")
            + self.last(f"balance/sq_norm_change/{b}")
        )


def train_one(
    init: str,
    name: str,
    data: tuple[torch.Tensor, ...],
    args: argparse.Namespace,
    out: Path,
    *,
    widths: Sequence[int],
    bias: bool = False,
    layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    tag: str | None = None,
) -> Run:
    x, y = data
    factory = optimizer_factory(name, args.lr, args.same_lr)
    model = ReLUNet(widths, init == "balanced", factory, bias=bias)
    # per-unit balance at the start and the end only (the monitor's neurons=True would also
    # keep a per-unit ledger on every step, which this script does not need)
    units = pair_units(model, model.names)
    d0 = unit_balance(model, units)
    # save_figure=False: the script draws its figures from all runs' histories at the end (the
    # monitor's per-run balance.png and ledger.png would cost ~1.4 s per run)
    monitor = LayerBalanceMonitor(
        layers=layers, log_every_n_steps=args.log_every, ledger=True, save_figure=False
    )
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps,
        max_epochs=1,  # the loader holds every step: one epoch (the bar reads "Epoch 0/0")
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(out / "logs", name=tag or f"{init}-{name}", version=0),
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
        opt.eval()  # NesterovSGD at its iterate x_T (OptimizerModeSwitch already put it there)
    d_end = unit_balance(model, units)
    steady = timer.step_s[len(timer.step_s) // 10 :] or timer.step_s
    return Run(
        init=init,
        optimizer=name,
        history=monitor.history,
        losses=[float(v) for v in model.losses],
        ms_per_step=1e3 * statistics.median(steady),
        unit_drift={k: (d_end[k] - d0[k]).tolist() for k in d_end},
        weights=[p.detach().clone() for p in model.parameters()],
    )


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
            curves = series(run.history, f"balance/{kind}/")
            for pair in PAIRS:
                a, b = pair.split("-")
                text = f"‖{a}‖² − ‖{b}‖²" if col == 0 else f"‖{a}‖² / ‖{b}‖²"
                ax.plot(*curves[pair], label=text)
            if col == 0:
                norms = series(run.history, "balance/sq_norm/")
                for a, style in zip(LAYERS, (":", "-.", "--"), strict=True):
                    ax.plot(*norms[a], style, color="grey", lw=1, label=f"‖{a}‖² (the norms)")
            else:
                ratios = [v for pair in PAIRS for v in curves[pair][1]]
                if ratios and max(ratios) / max(min(ratios), 1e-300) > 10:
                    ax.set_yscale("log")
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("step")
            ax.set_ylabel(
                r"$\|W_h\|^2 - \|W_{h+1}\|^2$  (grey: $\|W_h\|^2$)"
                if col == 0
                else r"$\|W_h\|^2 \,/\, \|W_{h+1}\|^2$"
            )
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle("Gradient descent keeps adjacent squared-norm differences (Du, Hu & Lee 2018)")
    fig.savefig(path, dpi=110)


def optimizers_figure(runs: dict[tuple[str, str], Run], names: list[str], path: Path) -> None:
    """``balance/drift`` per optimiser, log scale. The drift is exactly 0 at step 0 (and tiny
    while the network sits at the saddle): zeros are not drawn (a log axis has no 0) and the axis
    shows the top ``DRIFT_DECADES`` decades below the largest drift, where the optimisers differ."""
    fig = Figure(figsize=(11, 4.2), constrained_layout=True)
    axes = fig.subplots(1, 2, sharey=True)
    curves = {
        key: series(run.history, "balance/drift")[""]
        for key, run in runs.items()
        if key[1] in names
    }
    top = max((d for _, drift in curves.values() for d in drift), default=1.0) or 1.0
    for ax, init in zip(axes, ("balanced", "unbalanced"), strict=True):
        for name in names:
            if (init, name) not in curves:
                continue
            steps, drift = curves[(init, name)]
            # the built-in is dashed on top: it coincides with PolyakSGD (same iterates)
            style = (
                {"ls": "--", "lw": 1.2}
                if name == "sgd"
                else {"lw": 2.0 if name == "polyak" else 1.5}
            )
            shown = [d if d > 0 else math.nan for d in drift]  # log axis: 0 is not drawn
            ax.plot(steps, shown, label=LABELS[name], **style)
        ax.set_yscale("log")
        ax.set_ylim(top * 10.0**-DRIFT_DECADES, top * 2)
        ax.set_title(f"{init} initialization: balance/drift")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("max over adjacent pairs |D(t) − D(0)|")
    fig.suptitle(
        f"Drift from the balance law by optimiser (log scale, top {DRIFT_DECADES} decades;"
        " 0 at step 0 and smaller values while at the saddle are below the axis)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)


def fmt(v: float) -> str:
    return f"{v:.3g}"


def summarise(
    runs: dict[tuple[str, str], Run], args: argparse.Namespace
) -> tuple[list[dict], list[list[str]], list[list[str]]]:
    """summary.csv rows, the run table and the ledger table (one row per run and pair)."""
    csv_rows, table, ledger_table = [], [], []
    for (init, name), run in runs.items():
        ledger = run.ledger()
        gd = runs.get((init, "gd"))
        row: dict[str, object] = {
            "init": init,
            "optimizer": LABELS[name],
            "lr": args.lr if name == "gd" else momentum_lr(args.lr, args.same_lr),
            "steps": args.steps,
            "loss_0": run.losses[0],
            "loss_final": run.losses[-1],
            "diff_0": "/".join(f"{run.diff0(*p.split('-')):.3f}" for p in PAIRS),
            "drift_final": run.last("balance/drift"),
            **{f"sq_{n}": run.last(f"balance/sq_norm/{n}") for n in LAYERS},
        }
        for pair in PAIRS:
            for term in (*LEDGER_TERMS, "drift", "closure"):
                row[f"{term}_{pair}"] = ledger[pair][term]
            if ledger[pair]["discretisation"] != 0.0:
                # heavy ball, λ = 0, R = 0: Q(T) − Q(0) = (1+μ)/(1−μ) × discretisation exactly,
                # and Q = D when the velocity has died out (K_T = 0)
                row[f"drift_over_discretisation_{pair}"] = (
                    ledger[pair]["drift"] / ledger[pair]["discretisation"]
                )
            if gd is not None:
                row[f"drift_ratio_to_gd_{pair}"] = abs(ledger[pair]["drift"]) / abs(
                    gd.ledger()[pair]["drift"]
                )
            q = f"balance/corrected_diff/{pair}"
            if any(q in r for r in run.history):
                # Q(0) = D(0) since v_0 = 0; D(t) at the iterate = D(0) + the ledger's drift
                d_now = run.diff0(*pair.split("-")) + ledger[pair]["drift"]
                row[f"Q_change_{pair}"] = run.last(q) - run.diff0(*pair.split("-"))
                row[f"Q_minus_D_{pair}"] = run.last(q) - d_now
        for layer, values in run.unit_drift.items():
            mags = [abs(v) for v in values]
            row[f"unit_drift_max_{layer}"] = max(mags)
            row[f"unit_drift_median_{layer}"] = statistics.median(mags)
        row["ms_per_step"] = run.ms_per_step
        csv_rows.append(row)
        table.append(
            [
                init,
                LABELS[name],
                f"{row['lr']:.3g}",
                fmt(run.losses[0]),
                fmt(run.losses[-1]),
                str(row["diff_0"]),
                fmt(run.last("balance/drift")),
                *(f"{run.last(f'balance/sq_norm/{n}'):.2f}" for n in LAYERS),
                *(fmt(row[f"unit_drift_max_{layer}"]) for layer in run.unit_drift),
                f"{run.ms_per_step:.1f}",
            ]
        )
        for pair in PAIRS:
            ledger_table.append(
                [
                    init,
                    LABELS[name],
                    pair,
                    *(fmt(ledger[pair][t]) for t in (*LEDGER_TERMS, "drift")),
                    f"{abs(ledger[pair]['closure']):.1e}",
                ]
            )
    return csv_rows, table, ledger_table


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def print_ratios(runs: dict[tuple[str, str], Run]) -> None:
    """Heavy ball's and Nesterov's drift against gradient descent's, beside (1+μ)/(1−μ)."""
    print(
        f"\nDrift ratio to gradient descent at the same effective step; heuristic (1+μ)/(1−μ) ="
        f" {HEURISTIC:.0f}:"
    )
    for init in ("balanced", "unbalanced"):
        gd = runs.get((init, "gd"))
        if gd is None:
            continue
        gd_ledger = gd.ledger()
        for name in ("polyak", "nesterov"):
            run = runs.get((init, name))
            if run is None:
                continue
            ledger = run.ledger()
            parts = []
            for pair in PAIRS:
                text = f"{pair} {abs(ledger[pair]['drift']) / abs(gd_ledger[pair]['drift']):.1f}x"
                q = f"balance/corrected_diff/{pair}"
                if name == "polyak" and any(q in r for r in run.history):
                    dq = run.last(q) - run.diff0(*pair.split("-"))
                    text += f" (Q: {abs(dq) / abs(gd_ledger[pair]['drift']):.1f}x)"
                parts.append(text)
            print(f"  {init:10s} {LABELS[name]:17s} " + ", ".join(parts))
            own = ", ".join(
                f"{pair} {ledger[pair]['drift'] / (ledger[pair]['discretisation'] or math.nan):.2f}"
                for pair in PAIRS
            )
            print(f"  {'':10s} {'':17s} its D(T) − D(0) / its own discretisation term: {own}")


def print_unit_drift(runs: dict[tuple[str, str], Run]) -> None:
    print("\nPer-unit drift |D_i(T) − D_i(0)| (median / max over the 100 units of each layer):")
    for (init, name), run in runs.items():
        parts = []
        for layer, values in run.unit_drift.items():
            mags = [abs(v) for v in values]
            parts.append(f"{layer} {statistics.median(mags):.2e} / {max(mags):.2e}")
        print(f"  {init:10s} {LABELS[name]:20s} " + ", ".join(parts))


def bias_variant(
    data: tuple[torch.Tensor, ...], args: argparse.Namespace, out: Path
) -> tuple[list[dict], list[list[str]]]:
    """GD on a biased 2-layer net, monitored with the default layers and the dict grouping."""
    x, y = data
    # the output bias settles within a few hundred steps: 1000 steps show the whole effect
    args = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 1000)})
    args.log_every = max(1, args.steps // 300)
    groupings: dict[str, object] = {
        # each module's weight and bias, the grouping discover_layers() gives (the monitor
        # without layers= watches the model's symmetries instead, which group correctly)
        "default layers": ["W1", "W2"],
        "dict grouping": {"W1": ["W1.weight", "W1.bias"], "W2": ["W2.weight"]},
    }
    runs = {
        label: train_one(
            "balanced",
            "gd",
            (x, y + 1.0),
            args,
            out,
            widths=(x.shape[1], 100, 10),
            bias=True,
            layers=spec,
            tag=f"bias-{label.replace(' ', '_')}",
        )
        for label, spec in groupings.items()
    }
    # both runs follow the same trajectory: the default grouping's ‖W2‖² includes ‖b2‖²
    b2_change = runs["default layers"].last("balance/sq_norm_change/W2") - runs[
        "dict grouping"
    ].last("balance/sq_norm_change/W2")
    rows, table = [], []
    for label, run in runs.items():
        ledger = run.ledger()["W1-W2"]
        row = {
            "grouping": label,
            **{term: ledger[term] for term in (*LEDGER_TERMS, "drift", "closure")},
            "b2_sq_norm_change": b2_change,
            "loss_final": run.losses[-1],
            "steps": len(run.losses),
        }
        rows.append(row)
        table.append(
            [
                label,
                *(fmt(ledger[t]) for t in ("symmetry", "discretisation", "drift")),
                f"{abs(ledger['closure']):.1e}",
            ]
        )
    return rows, table


def main(argv: list[str] | None = None) -> dict[tuple[str, str], Run]:
    parser = base_parser(__doc__.split("\n\n")[0], "runs/layer_balance")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 2500)")
    parser.add_argument("--lr", type=float, default=0.2, help="gradient-descent rate η")
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="comma-separated subset of "
        + ", ".join(f"{n} ({LABELS[n]})" for n in OPTIMIZERS)
        + " (default: all)",
    )
    parser.add_argument("--input-scale", type=float, default=5.0, help="input norm scale s")
    parser.add_argument("--log-every", type=int, default=None, help="monitor/logger cadence")
    parser.add_argument(
        "--same-lr", action="store_true", help="momentum runs at lr η instead of η(1 − μ)"
    )
    parser.add_argument("--no-bias-variant", action="store_true", help="skip the bias variant")
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
    quiet_lightning()
    n, dim = (200, 100) if args.quick else (1000, 1000)
    data = make_data(n, dim, args.input_scale)
    t_start = time.perf_counter()

    runs: dict[tuple[str, str], Run] = {}
    for init in ("balanced", "unbalanced"):
        for name in names:
            print(f"[layer_balance] {init} initialization, {LABELS[name]}", flush=True)
            runs[(init, name)] = train_one(
                init, name, data, args, out, widths=(dim, 100, 100, 10), layers=LAYERS
            )

    csv_rows, table, ledger_table = summarise(runs, args)
    write_csv(out / "summary.csv", csv_rows)
    header = ["init", "optimizer", "lr", "loss0", "loss", "diff(0)", "drift"]
    header += [f"‖{n}‖²" for n in LAYERS] + ["unit W1", "unit W2", "ms/step"]
    print()
    print(format_table(header, table))
    print("\nLedger at the last logged step (cumulative; D(t) − D(0) = the terms + closure):")
    print(
        format_table(
            ["init", "optimizer", "pair", *LEDGER_TERMS, "D(t)−D(0)", "|closure|"], ledger_table
        )
    )
    print_ratios(runs)
    print_unit_drift(runs)
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

    if not args.no_bias_variant:
        print("[layer_balance] bias variant: gradient descent, default layers / dict grouping")
        bias_rows, bias_table = bias_variant(data, args, out)
        write_csv(out / "bias_variant.csv", bias_rows)
        print("\nBias variant (pair W1-W2; the default grouping counts b2 in D):")
        print(
            format_table(
                [
                    "grouping",
                    "symmetry",
                    "discretisation",
                    "D(t)−D(0)",
                    "|closure|",
                ],
                bias_table,
            )
        )
        print(f"  change of ‖b2‖² over the run: {bias_rows[0]['b2_sq_norm_change']:.3g}")

    paper_figure(runs, out / "figure.png")
    optimizers_figure(runs, names, out / "optimizers.png")
    figures = ["figure.png", "optimizers.png"]
    ledger_runs = {
        LABELS[n]: runs[("balanced", n)].history
        for n in LEDGER_OPTIMIZERS
        if ("balanced", n) in runs
    }
    if ledger_runs:
        fig = plot_ledger(
            ledger_runs, title="Balance ledger, balanced start: where D(t) − D(0) comes from"
        )
        fig.savefig(out / "ledger.png", dpi=100)
        fig = plot_unit_drift(
            {
                LABELS[n]: runs[("balanced", n)].unit_drift
                for n in LEDGER_OPTIMIZERS
                if ("balanced", n) in runs
            },
            title=f"Per-unit drift |D_i(T) − D_i(0)| after T = {args.steps} steps, balanced start",
        )
        fig.savefig(out / "unit_drift.png", dpi=100)
        figures += ["ledger.png", "unit_drift.png"]
    publish_figure(out / "figure.png", "layer_balance.png", args.quick)
    publish_figure(out / "optimizers.png", "layer_balance_optimizers.png", args.quick)
    if ledger_runs:
        publish_figure(out / "ledger.png", "ledger.png", args.quick)
        publish_figure(out / "unit_drift.png", "unit_drift.png", args.quick)
    print(f"\nwrote {', '.join(str(out / f) for f in figures)}, {out / 'summary.csv'}")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return runs


if __name__ == "__main__":
    main()
