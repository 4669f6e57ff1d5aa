"""Every symmetry of a ResNet, its conserved charge, and where each optimiser moves it (digits).

A ResNet-style CNN with BatchNorm has three kinds of exact symmetries (Kunin et al., "Neural
Mechanics", ICLR 2021), each with a charge that gradient flow conserves:

* scale: the filters (and bias) of a conv right before BatchNorm, channel by channel: the loss does
  not change when they are scaled, so ``Q = ||x_A||^2`` is conserved;
* rescale: BatchNorm's gain and bias of a channel against the next conv's input slice of it
  (through a ReLU): ``Q = ||x_A||^2 - ||x_B||^2``;
* translation: softmax cross-entropy does not change when the same number is added to every
  logit: each input column of the classifier, summed over classes, and its bias sum,
  ``Q = <1, x_A>``.

``find_symmetries`` finds and verifies them numerically; a ``BalanceLedger`` splits each charge's
change, step by step, into momentum, weight decay, symmetry (0 while the symmetry holds),
discretisation, other (what no known rule explains) and rounding, exactly (the terms add up to the
change to float64 round-off). The script trains the same network with gradient descent, heavy
ball, heavy ball with weight decay and Adam, and shows what each does to the charges: gradient
descent and heavy ball move quadratic charges only at second order (discretisation) and keep the
translation charge EXACTLY (its change is round-off, 1e-15), weight decay shrinks every charge,
Adam's update is not linear in the gradient and breaks the translation charge (its ``other``
term); for the scale-invariant groups under heavy ball with weight decay, the angle between
``x_t`` and ``x_{t+1}`` settles at ``sqrt(2 lr wd / (1 + momentum))`` (Wan, Zhu, Zhang & Sun,
NeurIPS 2021).

Setup: scikit-learn's bundled 8x8 digits (1797 images), pixels / 16; ``torch_momentum.demos
.ResNetCNN`` (19,706 parameters), float64 (so that exactness shows at 1e-15), seed 0, minibatches
of 64 (shuffled, seed 0), cross-entropy; gradient descent lr 0.5, heavy ball lr 0.05 momentum 0.9
(the same effective step), the same with weight decay 5e-2 (strong, so that the angular
equilibrium is reached within the run: its relaxation rate is about 2 lr wd / (1 - momentum)), Adam
lr 1e-3; 600 steps each.

Outputs under ``--out`` (default ``runs/symmetries/``): ``summary.csv`` (per optimiser and kind:
the largest change of a unit's charge, its ledger, the closure) and ``symmetries.png``; a full run
copies the figure to ``docs/``.

    python examples/symmetries.py            # about two minutes on 2 cores
    python examples/symmetries.py --quick    # a few seconds, for smoke tests
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import base_parser, format_table, prepare_out, publish_figure
from sklearn.datasets import load_digits
from torch import Tensor, nn

from torch_momentum import PolyakSGD
from torch_momentum.balance import BalanceLedger, Symmetry, find_symmetries
from torch_momentum.demos import ResNetCNN

KINDS = ("scale", "rescale", "translation")
OPTIMIZERS: dict[str, tuple[str, Callable[[Any], torch.optim.Optimizer]]] = {
    "gd": ("gradient descent", lambda ps: PolyakSGD(ps, lr=0.5, momentum=0.0)),
    "heavy": ("heavy ball", lambda ps: PolyakSGD(ps, lr=0.05, momentum=0.9)),
    "heavy_wd": (
        "heavy ball + weight decay",
        lambda ps: PolyakSGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-2),
    ),
    "adam": ("Adam", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
}
EQUILIBRIUM = math.sqrt(2 * 0.05 * 5e-2 / (1 + 0.9))  # heavy ball with weight decay


def data(quick: bool) -> tuple[Tensor, Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float64).unsqueeze(1)
    y = torch.tensor(digits.target)
    return (x[:256], y[:256]) if quick else (x, y)


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def batches(x: Tensor, y: Tensor, steps: int, size: int = 64) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    out: list[tuple[Tensor, Tensor]] = []
    while len(out) < steps:
        order = torch.randperm(len(x), generator=g)
        out += [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(x), size)]
    return out[:steps]


def train(
    name: str, symmetries: list[Symmetry], stream: list[tuple[Tensor, Tensor]], every: int
) -> list[dict[str, Any]]:
    """Train a fresh copy of the network; every ``every`` steps, per kind, the largest change of
    a unit's charge and the sum of that unit's ledger terms, the closure and the angles."""
    torch.manual_seed(0)
    model = ResNetCNN().double()
    opt = OPTIMIZERS[name][1](model.parameters())
    ledger = BalanceLedger(None, opt, module=model, symmetries=symmetries)
    ledger.attach()
    records = []
    for step, batch in enumerate(stream, 1):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if step % every == 0 or step == len(stream):
            records.append({"step": step, **read(ledger)})
    ledger.detach()
    return records


def read(ledger: BalanceLedger) -> dict[str, Any]:
    row: dict[str, Any] = {}
    charges = ledger.read_charges()
    closure = 0.0
    for kind in KINDS:
        best = (0.0, 0.0, None)
        for entry in charges.values():
            scale = max(float(entry["scale"].max()), 1e-300)  # the charge's magnitude
            closure = max(closure, float(entry["closure"].abs().max()) / scale)
            if entry["kind"] != kind:
                continue
            change = entry["D"] - entry["D0"]
            u = int(change.abs().argmax())
            if abs(float(change[u])) >= abs(best[0]):
                best = (float(change[u]), float(entry["sums"][u].sum()), entry["sums"][u])
        row[kind] = {"change": best[0], "ledger": best[1], "terms": best[2]}
    row["closure"] = closure
    angles = torch.cat([a[~torch.isnan(a)] for a in ledger.read_angles().values()])
    row["angle"] = float(angles.mean()) if angles.numel() else math.nan
    return row


def figure(runs: dict[str, list[dict[str, Any]]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 9), layout="constrained")
    axes = fig.subplots(2, 3)
    colours = {"gd": "tab:gray", "heavy": "tab:blue", "heavy_wd": "tab:orange", "adam": "tab:red"}
    floor = 1e-17  # exact zeros on the log scale
    for ax, kind in zip(axes[0], KINDS, strict=True):
        for name, rows in runs.items():
            steps = [r["step"] for r in rows]
            change = [max(abs(r[kind]["change"]), floor) for r in rows]
            booked = [max(abs(r[kind]["ledger"]), floor) for r in rows]
            ax.plot(steps, change, color=colours[name], lw=1.5, label=OPTIMIZERS[name][0])
            ax.plot(steps, booked, "x", color=colours[name], ms=4)
        ax.set_yscale("log")
        ax.set_title(f"{kind}: largest |Q_u(t) - Q_u(0)| (line) and its ledger (x)", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0][2].axhspan(floor, 1e-13, color="0.9", zorder=0)
    axes[0][2].text(0.02, 0.04, "round-off", transform=axes[0][2].transAxes, fontsize=8)
    ax = axes[1][0]
    for name, rows in runs.items():
        ax.plot(
            [r["step"] for r in rows],
            [r["angle"] for r in rows],
            color=colours[name],
            lw=1.3,
            label=OPTIMIZERS[name][0],
        )
    ax.axhline(
        EQUILIBRIUM,
        color="black",
        ls="--",
        lw=1.0,
        label=r"$\sqrt{2\eta\lambda/(1+\mu)}$ (heavy ball + wd)",
    )
    ax.set_yscale("log")
    ax.set_title("angle between x_t and x_{t+1}, scale-invariant groups", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    rows = runs["adam"]
    terms = torch.stack([r["translation"]["terms"] for r in rows])
    steps = [r["step"] for r in rows]
    change = [r["translation"]["change"] for r in rows]
    ax.plot(steps, change, color="0.7", lw=6, label="change")  # wide and pale: terms lie on it
    for j, term in enumerate(("momentum", "weight_decay", "symmetry", "discretisation", "other")):
        if float(terms[:, j].abs().max()) > 0:
            ax.plot(steps, terms[:, j].tolist(), lw=1.2, label=term)
    ax.set_title("Adam, translation charge: the ledger (other: not linear in g)", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax = axes[1][2]
    for name, rows in runs.items():
        ax.plot(
            [r["step"] for r in rows],
            [max(r["closure"], floor) for r in rows],
            color=colours[name],
            lw=1.3,
            label=OPTIMIZERS[name][0],
        )
    ax.set_yscale("log")
    ax.set_title("closure: largest relative |change - sum of terms|, all charges", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle("Symmetries of a ResNet on digits: every charge's change and its exact ledger")
    return fig


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = base_parser(__doc__, "runs/symmetries")
    parser.add_argument("--steps", type=int, default=None, help="steps per optimiser (600)")
    args = parser.parse_args(argv)
    steps = args.steps or (12 if args.quick else 600)
    out = prepare_out(args.out)
    torch.manual_seed(0)
    x, y = data(args.quick)
    stream = batches(x, y, steps)
    start = time.perf_counter()
    model = ResNetCNN().double()
    found = find_symmetries(model, loss_fn, stream[:2], perturbed_batches=1)
    print(f"found {len(found)} symmetries in {time.perf_counter() - start:.1f} s:")
    print(found.summary())
    symmetries = [s for s in found if s.kind in KINDS]
    every = max(1, steps // 60)
    runs = {}
    for name in OPTIMIZERS:
        start = time.perf_counter()
        runs[name] = train(name, symmetries, stream, every)
        print(f"{OPTIMIZERS[name][0]}: {steps} steps in {time.perf_counter() - start:.1f} s")
    table = []
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optimizer", "kind", "max |dQ_u|", "its ledger", "closure"])
        for name, rows in runs.items():
            last = rows[-1]
            for kind in KINDS:
                cells = [
                    name,
                    kind,
                    f"{last[kind]['change']:.3g}",
                    f"{last[kind]['ledger']:.3g}",
                    f"{last['closure']:.1e}",
                ]
                writer.writerow(cells)
                table.append(cells)
    print(format_table(["optimizer", "kind", "max |dQ_u|", "its ledger", "closure"], table))
    angles = [r["angle"] for r in runs["heavy_wd"][len(runs["heavy_wd"]) // 2 :]]
    print(
        f"heavy ball + wd: mean angle over the second half {sum(angles) / len(angles):.4g},"
        f" equilibrium {EQUILIBRIUM:.4g}"
    )
    fig = figure(runs)
    fig.savefig(out / "symmetries.png", dpi=110)
    publish_figure(out / "symmetries.png", "symmetries.png", args.quick)
    return runs


if __name__ == "__main__":
    main()
