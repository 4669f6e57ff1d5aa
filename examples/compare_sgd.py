"""PolyakSGD and NesterovSGD against ``torch.optim.SGD`` on an MLP, trained with Lightning.

What it checks. The velocity-form updates are algebraically the same methods as PyTorch's:

* heavy ball ``v ← −∇f(x) + m v;  x ← x + η v`` is ``SGD(momentum=m)`` with ``v = −buf``, so
  PolyakSGD's parameters equal the built-in's at every step;
* Nesterov ``v ← −∇f(y) + m v;  x ← x + η v`` with look-ahead ``y = x + η m v`` is
  ``SGD(momentum=m, nesterov=True)``, whose parameters are the look-ahead point ``y_t``; NesterovSGD
  also holds ``y_t`` while training, so the two parameter trajectories agree, and so do the
  iterates ``x_t = y_t − η m v_t`` (built-in: ``x_t = p + η m buf``).

Both pairs start from the same seed (same initial weights, same batch order) and the maximum
difference of parameters (and, for Nesterov, iterates) over all training steps is printed. By
default ours take the built-in's path with its operations in its order, so heavy ball is identical
at every step (difference 0). The Nesterov pair is identical until the first validation: there
NesterovSGD's ``eval()``/``train()`` round trip (``x = y - c v``, then ``y = x + c v``) rounds
``y`` by an ulp, and such float32 differences then grow slowly over the run (to ~5e-7 relative).

Fair validation numbers. NesterovSGD is validated at its iterate ``x_t`` through
``OptimizerModeSwitch``, while Lightning would validate ``SGD(nesterov=True)`` at its parameters,
which are the look-ahead ``y_t``. Comparing those two numbers would mix up two evaluation points
of one and the same trajectory. So both Nesterov runs are validated at the same point: the
built-in run through :class:`BuiltinNesterovAtIterate`, which moves its parameters to
``x_t = p + η m buf`` for validation and restores them bit for bit afterwards. In addition both
Nesterov runs report the metrics at the look-ahead ``y_t`` (``acc@y``, by ``functional_call``
without touching the parameters), which is what the built-in would show by default. Heavy ball
has no second point: its parameters are the iterate.

Data and model: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels scaled to
[0, 1], a stratified 80/20 split; MLP 64-128-128-10 with ReLU, cross-entropy, batch 64, lr 0.05,
momentum 0.9, float32, one CPU thread. Validation accuracy is torchmetrics'
``MulticlassAccuracy(average="micro")`` (plain accuracy).

Outputs under ``--out`` (default ``runs/compare_sgd/``): CSVLogger logs ``logs/<run>/metrics.csv``,
``summary.csv`` (one row per run), ``differences.csv`` (one row per compared pair) and
``loss_curves.png`` (copied to ``docs/compare_sgd.png`` when run without ``--quick``).

    python examples/compare_sgd.py              # 20 epochs, well under a minute on 2 cores
    python examples/compare_sgd.py --quick      # 2 epochs, no docs/ update
"""

from __future__ import annotations

import csv
import shutil
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import matplotlib
import torch
from _common import base_parser, format_table, prepare_out, publish_figure, quiet_lightning
from _steptimer import StepTimer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.callbacks import OptimizerModeSwitch

matplotlib.use("Agg")

SEED = 0
LR = 0.05
MOMENTUM = 0.9
BATCH = 64
HIDDEN = 128
MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Digits(L.LightningDataModule):
    """sklearn's bundled digits, pixels / 16, stratified 80/20 split, fixed shuffling seed."""

    def __init__(self, batch_size: int = BATCH, seed: int = SEED) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        data = load_digits()
        x = torch.tensor(data.data / 16.0, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.long)
        idx_train, idx_val = train_test_split(
            range(len(y)), test_size=0.2, stratify=data.target, random_state=seed
        )
        self.train_set = TensorDataset(x[idx_train], y[idx_train])
        self.val_set = TensorDataset(x[idx_val], y[idx_val])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)  # same batch order in every run
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class MLP(L.LightningModule):
    """64-128-128-10 ReLU MLP; validation at the current parameters and, if set, at ``probe``."""

    def __init__(self, make_optimizer: MakeOptimizer, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.make_optimizer = make_optimizer
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.net.append(nn.Linear(hidden, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc_lookahead = MulticlassAccuracy(num_classes=10, average="micro")
        # Parameters of the look-ahead point y_t while the model is validated at x_t (or None).
        self.probe: dict[str, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)
        if self.probe is not None:
            logits_y = torch.func.functional_call(self.net, self.probe, (x,))
            self.val_acc_lookahead.update(logits_y, y)
            self.log("val_loss_lookahead", nn.functional.cross_entropy(logits_y, y))
            self.log("val_acc_lookahead", self.val_acc_lookahead)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def _single_optimizer(trainer: L.Trainer) -> torch.optim.Optimizer:
    (opt,) = trainer.optimizers
    return opt


class BuiltinNesterovAtIterate(Callback):
    """Validate ``SGD(nesterov=True)`` at its iterate ``x_t = p + η m buf`` (``p`` is ``y_t``).

    The parameters are saved before the shift and copied back afterwards, so training continues
    from bit-identical weights; the saved ``y_t`` is offered to the model as the look-ahead probe.
    """

    def __init__(self) -> None:
        self._saved: list[Tensor] = []

    @torch.no_grad()
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = _single_optimizer(trainer)
        self._saved = []
        for group in opt.param_groups:
            for p in group["params"]:
                self._saved.append(p.detach().clone())
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    p.add_(buf, alpha=group["lr"] * group["momentum"])
        names = [n for n, _ in pl_module.net.named_parameters()]
        pl_module.probe = dict(zip(names, self._saved, strict=True))

    @torch.no_grad()
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = [p for g in _single_optimizer(trainer).param_groups for p in g["params"]]
        for p, saved in zip(params, self._saved, strict=True):
            p.copy_(saved)
        self._saved, pl_module.probe = [], None


class NesterovLookaheadProbe(Callback):
    """Offer the look-ahead ``y_t`` as probe while NesterovSGD is validated at ``x_t``.

    Must come *before* :class:`OptimizerModeSwitch` in the callback list: it copies the parameters
    while they still hold ``y_t``, before the switch moves them to ``x_t``.
    """

    @torch.no_grad()
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.probe = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.probe = None


def iterate_of(opt: torch.optim.Optimizer, group: dict[str, Any], p: Tensor) -> Tensor:
    """The iterate ``x_t`` behind parameter ``p`` during training.

    Ours: ``opt.iterate(p)`` (NesterovSGD: ``y_t - c v_t``; PolyakSGD: ``p``). The built-in has no
    such method: with ``nesterov=True`` its parameters are ``y_t`` and ``x_t = p + η m buf``.
    """
    if isinstance(opt, (PolyakSGD, NesterovSGD)):
        return opt.iterate(p)
    buf = opt.state.get(p, {}).get("momentum_buffer")
    if group.get("nesterov") and buf is not None:
        return p + group["lr"] * group["momentum"] * buf  # p holds y_t, v_t = −buf
    return p


@dataclass
class Record:
    """What one run leaves behind: per-step losses, timings, parameter and iterate trajectories."""

    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    update_s: list[float] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    iterates: list[Tensor] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)


class Recorder(Callback):
    """Per step: loss and flat parameters and iterates; per validation: the metrics. The step
    times come from :class:`_steptimer.StepTimer` (see :func:`train`)."""

    def __init__(self) -> None:
        self.record = Record()

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any
    ) -> None:
        self.record.losses.append(float(outputs["loss"]))
        opt = _single_optimizer(trainer)
        params = [(g, p) for g in opt.param_groups for p in g["params"]]
        self.record.params.append(torch.cat([p.detach().flatten() for _, p in params]))
        self.record.iterates.append(torch.cat([iterate_of(opt, g, p).flatten() for g, p in params]))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        keys = ("val_acc", "val_loss", "val_acc_lookahead", "val_loss_lookahead")
        m = trainer.callback_metrics
        self.record.val.append({k: float(m[k]) for k in keys if k in m})


@dataclass
class Run:
    name: str
    make_optimizer: MakeOptimizer
    callbacks: Callable[[], list[Callback]] = list


RUNS = [
    Run("SGD(momentum)", lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM)),
    Run("PolyakSGD", lambda p: PolyakSGD(p, lr=LR, momentum=MOMENTUM)),
    Run(
        "SGD(nesterov)",
        lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM, nesterov=True),
        lambda: [BuiltinNesterovAtIterate()],
    ),
    Run(
        "NesterovSGD",
        lambda p: NesterovSGD(p, lr=LR, momentum=MOMENTUM),
        lambda: [NesterovLookaheadProbe(), OptimizerModeSwitch()],
    ),
]
PAIRS = [("PolyakSGD", "SGD(momentum)"), ("NesterovSGD", "SGD(nesterov)")]


def train(run: Run, data: Digits, epochs: int, out: Path) -> Record:
    L.seed_everything(SEED, verbose=False)  # same initial weights in every run
    model = MLP(run.make_optimizer)
    recorder = Recorder()
    # wall time of the whole step and of the update alone (on_before_optimizer_step, after
    # backward, to the optimiser's step post-hook; Lightning runs forward and backward inside
    # optimizer.step(closure))
    timer = StepTimer(update=True)
    version = run.name.replace("(", "_").rstrip(")")
    shutil.rmtree(out / "logs" / version, ignore_errors=True)  # this run's logs from last time
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(out, name="logs", version=version),
        callbacks=[*run.callbacks(), recorder, timer],
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, datamodule=data)
    recorder.record.step_s, recorder.record.update_s = timer.step_s, timer.update_s
    return recorder.record


def low_quantile(times: list[float]) -> float:
    """10th percentile: on a shared machine the median drifts with the load, the low tail less."""
    return statistics.quantiles(times, n=10)[0] if len(times) > 1 else times[0]


def max_differences(a: list[Tensor], b: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per step ``‖a_t − b_t‖_∞`` and ``‖a_t − b_t‖_∞ / ‖b_t‖_∞``."""
    diff = torch.stack([(x - y).abs().max() for x, y in zip(a, b, strict=True)])
    scale = torch.stack([y.abs().max() for y in b])
    return diff, diff / scale


def make_figure(records: dict[str, Record], diffs: dict[str, Tensor], epochs: int) -> Figure:
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    ax_loss, ax_acc, ax_diff = fig.subplots(1, 3)
    styles = {
        "SGD(momentum)": dict(color="tab:blue", linestyle="-", linewidth=2.5, alpha=0.5),
        "PolyakSGD": dict(color="tab:blue", linestyle="--", linewidth=1),
        "SGD(nesterov)": dict(color="tab:red", linestyle="-", linewidth=2.5, alpha=0.5),
        "NesterovSGD": dict(color="tab:red", linestyle="--", linewidth=1),
    }
    for name, rec in records.items():
        per_epoch = torch.tensor(rec.losses).reshape(epochs, -1).mean(dim=1)
        epochs_axis = range(1, epochs + 1)
        ax_loss.semilogy(epochs_axis, per_epoch, label=f"{name} train", **styles[name])
        val_loss = [v["val_loss"] for v in rec.val]
        ax_loss.semilogy(epochs_axis, val_loss, marker="o", markersize=3, **styles[name])
        ax_acc.plot(
            epochs_axis, [v["val_acc"] for v in rec.val], label=f"{name} at x_t", **styles[name]
        )
    for name in ("SGD(nesterov)", "NesterovSGD"):
        acc_y = [v.get("val_acc_lookahead", float("nan")) for v in records[name].val]
        style = {**styles[name], "linestyle": ":", "linewidth": 1.5}
        ax_acc.plot(range(1, len(acc_y) + 1), acc_y, label=f"{name} at y_t", **style)
    ax_loss.set(
        title="loss: train (epoch mean), validation at x_t (dots)",
        xlabel="epoch",
        ylabel="cross-entropy",
    )
    ax_acc.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
    floor = 1e-10
    steps_per_epoch = len(next(iter(records.values())).losses) // epochs
    for epoch in range(1, epochs):  # validation runs after every epoch
        ax_diff.axvline(epoch * steps_per_epoch, color="0.85", linewidth=0.6, zorder=0)
    ax_diff.plot([], [], color="0.85", linewidth=0.6, label="validation (eval()/train())")
    for label, d in diffs.items():
        if bool((d == 0).all()):
            ax_diff.plot([], [], label=f"{label}: identical (0) at every step")
        else:
            ax_diff.semilogy(d.clamp_min(floor), label=label)
    ax_diff.axhline(
        torch.finfo(torch.float32).eps, color="k", linewidth=0.8, linestyle=":", label="float32 eps"
    )
    ax_diff.set(
        title="ours vs built-in: max|Δp| / max|p|",
        xlabel="step",
        ylabel="relative parameter difference (0 drawn at 1e-10)",
    )
    for ax in (ax_loss, ax_acc, ax_diff):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"digits MLP, {epochs} epochs, lr={LR}, momentum={MOMENTUM}, same seed")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], "runs/compare_sgd/")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 20)
    if epochs < 1:
        parser.error("--epochs must be at least 1")
    out = prepare_out(args.out)
    torch.set_num_threads(1)  # same arithmetic and fair timings on a shared machine
    quiet_lightning()  # no per-run banners, no warnings that do not apply here

    data = Digits()
    records = {run.name: train(run, data, epochs, out) for run in RUNS}

    diff_rows, curves = [], {}
    for ours, builtin in PAIRS:
        kinds = [("parameters", "params")]
        if ours == "NesterovSGD":
            kinds = [("parameters (= y_t)", "params"), ("iterates x_t", "iterates")]
        for what, attr in kinds:
            absd, reld = max_differences(
                getattr(records[ours], attr), getattr(records[builtin], attr)
            )
            diff_rows.append(
                [f"{ours} vs {builtin}", what, absd.max().item(), reld.max().item(), len(absd)]
            )
            if attr == "params":
                curves[f"{ours} vs {builtin}"] = reld

    run_rows = []
    for name, rec in records.items():
        last = rec.val[-1]
        warm = slice(min(5, len(rec.step_s) - 1), None)  # skip the first steps (allocation)
        run_rows.append(
            [
                name,
                rec.losses[-1],
                last["val_loss"],
                last["val_acc"],
                last.get("val_acc_lookahead", float("nan")),
                1e3 * low_quantile(rec.step_s[warm]),
                1e6 * low_quantile(rec.update_s[warm]),
            ]
        )

    steps_per_epoch = len(records["PolyakSGD"].losses) // epochs
    print(f"digits MLP 64-{HIDDEN}-{HIDDEN}-10, {epochs} epochs x {steps_per_epoch} steps")
    print(f"lr={LR}, momentum={MOMENTUM}, batch {BATCH}, seed {SEED}, float32, 1 thread")
    print(
        format_table(
            ["pair", "compared", "max |Δ|", "max |Δ|/max|p|", "steps"],
            [[p, w, f"{a:.2e}", f"{r:.2e}", n] for p, w, a, r, n in diff_rows],
        )
    )
    print()
    print(
        format_table(
            ["run", "train loss", "val loss@x", "val acc@x", "val acc@y", "step ms", "update µs"],
            [
                [
                    n,
                    f"{tl:.4f}",
                    f"{vl:.4f}",
                    f"{va:.4f}",
                    "—" if va_y != va_y else f"{va_y:.4f}",
                    f"{sm:.2f}",
                    f"{us:.0f}",
                ]
                for n, tl, vl, va, va_y, sm, us in run_rows
            ],
        )
    )
    print(
        "@x: validated at the iterate x_t (NesterovSGD via OptimizerModeSwitch, SGD(nesterov) via "
        "BuiltinNesterovAtIterate); @y: at the look-ahead y_t. step: wall time of a whole "
        "training step in Lightning; update: the optimizer update after backward (10th percentiles "
        "over steps; medians move with the load of a shared machine)."
    )

    with (out / "summary.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["run", "train_loss", "val_loss_x", "val_acc_x", "val_acc_y", "step_ms", "update_us"]
        )
        w.writerows(run_rows)
    with (out / "differences.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "compared", "max_abs_diff", "max_rel_diff", "steps"])
        w.writerows(diff_rows)
    png = out / "loss_curves.png"
    make_figure(records, curves, epochs).savefig(png, dpi=110)
    published = publish_figure(png, "compare_sgd.png", args.quick)
    print(
        f"wrote {out / 'summary.csv'}, {out / 'differences.csv'}, {png}"
        + (f", {published}" if published else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
