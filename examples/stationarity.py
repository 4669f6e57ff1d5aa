"""Stationarity certificates during training: eps_hat(delta) against ||grad f|| on a ReLU MLP.

For smooth f, gradient descent reaches ||grad f|| <= eps in O(beta/eps^2) steps. A ReLU
network's loss is not smooth; its honest analogue is (delta, eps)-Goldstein stationarity: some
convex combination of gradients taken within distance delta of x has norm <= eps.
``stationarity_profile`` certifies it one-sidedly: the min-norm element of the convex hull of k
gradients sampled uniformly in the ball B(x, delta) has norm eps_hat(delta), so x is
(delta, eps_hat)-stationary; a large eps_hat proves nothing.

Setup: scikit-learn's digits (8x8 images, 10 classes), a fixed 1024-example subset (seed 0),
pixels / 16; f = mean cross-entropy of a ReLU MLP 64-64-64-10 (with biases, float64) over the whole
subset (full batch, so f is one deterministic function). Training: gradient descent (lr 0.5),
PolyakSGD and NesterovSGD (lr 0.05, momentum 0.9): the same effective step lr / (1 - momentum) =
0.5. At a few steps, the profile eps_hat(delta) for delta in a log grid (k = 64 samples per
radius, shared directions), at the iterate x_t (``opt.iterate``), against ||grad f(x_t)||.

Outputs under ``--out`` (default runs/stationarity): ``profiles.csv`` (one row per optimiser,
step and delta) and ``stationarity.png``, copied to docs/ (full runs only).

    python examples/stationarity.py            # 998 s measured on a loaded, shared 2-core CPU
    python examples/stationarity.py --quick    # seconds: smoke test (does not touch docs/)
"""

from __future__ import annotations

import csv
import math
import sys
import time

import torch
from _common import base_parser, format_table, prepare_out, publish_figure
from torch import Tensor, nn
from torch.func import functional_call

from torch_momentum import NesterovSGD, PolyakSGD, stationarity_profile

F64 = torch.float64
EFFECTIVE_LR = 0.5
MOMENTUM = 0.9


def load_subset(size: int, seed: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.tensor(x, dtype=F64)[idx] / 16.0, torch.tensor(y)[idx]


def make_net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    ).to(F64)


def optimizers(net: nn.Module) -> dict[str, torch.optim.Optimizer]:
    return {
        "GD": PolyakSGD(net.parameters(), lr=EFFECTIVE_LR, momentum=0.0),
        "PolyakSGD": PolyakSGD(
            net.parameters(), lr=EFFECTIVE_LR * (1 - MOMENTUM), momentum=MOMENTUM
        ),
        "NesterovSGD": NesterovSGD(
            net.parameters(), lr=EFFECTIVE_LR * (1 - MOMENTUM), momentum=MOMENTUM
        ),
    }


def run(
    name: str, args, x: Tensor, y: Tensor, radii: list[float], checkpoints: list[int]
) -> list[dict[str, float | str]]:
    net = make_net(args.width, args.seed)
    opt = optimizers(net)[name]

    def f(params: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    rows: list[dict[str, float | str]] = []
    for step in range(checkpoints[-1] + 1):
        if step in checkpoints:
            point = {n: opt.iterate(p) for n, p in net.named_parameters()}  # x_t, not y_t
            with torch.no_grad():
                loss = float(f(point))
            prof = stationarity_profile(
                f,
                point,
                radii,
                num_samples=args.samples,
                generator=torch.Generator().manual_seed(args.seed + step),
            )
            for delta, eps, active in zip(prof.radii, prof.eps_hat, prof.active, strict=True):
                rows.append(
                    {
                        "optimizer": name,
                        "step": step,
                        "loss": loss,
                        "delta": delta,
                        "eps_hat": eps,
                        "active": active,
                        "grad_norm": prof.grad_norm,
                    }
                )
        if step == checkpoints[-1]:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return rows


def plot(rows: list[dict], radii: list[float], names: list[str], path) -> None:
    """Top: ‖∇f(x_t)‖ per optimiser, the profile ε̂(δ)/‖∇f‖ at the last step, and how many of the
    k samples carry weight there. Bottom, per optimiser: ε̂(δ)/‖∇f(x_t)‖ against the step. The
    certificates differ from ‖∇f‖ by a few percent only, invisible on a common log axis: the
    ratio shows them (below 1: the sampled hull is shorter than the gradient at x)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8.5), layout="constrained")
    (ax_grad, ax_prof, ax_act), bottom = fig.subplots(2, 3)
    bottom[1].sharey(bottom[0])
    bottom[2].sharey(bottom[0])
    cmap = matplotlib.colormaps["viridis"]
    colors = {d: cmap(0.9 * i / max(1, len(radii) - 1)) for i, d in enumerate(radii)}
    markers = dict(zip(names, ("o", "s", "^"), strict=False))
    last = max(r["step"] for r in rows)

    def at(name: str, step: int, delta: float) -> dict:
        return next(
            r for r in rows if r["optimizer"] == name and r["step"] == step and r["delta"] == delta
        )

    for name in names:
        steps = sorted({r["step"] for r in rows if r["optimizer"] == name})
        grad = [at(name, s, radii[0])["grad_norm"] for s in steps]
        ax_grad.plot(steps, grad, marker=markers[name], ms=4, label=name)
        final = [at(name, last, d) for d in radii]
        ax_prof.plot(
            radii,
            [r["eps_hat"] / r["grad_norm"] for r in final],
            marker=markers[name],
            label=f"{name} (‖∇f‖ = {final[0]['grad_norm']:.3g})",
        )
        ax_act.plot(radii, [r["active"] for r in final], marker=markers[name], label=name)
    ax_grad.set(
        xscale="symlog", yscale="log", xlabel="step", ylabel="‖∇f(x_t)‖ (autograd at the iterate)"
    )
    ax_grad.set_xlim(left=0)
    ax_grad.set_title("gradient norm during training")
    ax_prof.set(xscale="log", xlabel="δ (radius)", ylabel="ε̂(δ) / ‖∇f(x_t)‖")
    ax_prof.set_title(f"step {last}: x is (δ, ε̂(δ))-stationary")
    ax_act.set(xscale="log", xlabel="δ (radius)", ylabel="samples with weight > 0")
    ax_act.set_ylim(bottom=0)
    ax_act.set_title(f"step {last}: samples the min-norm element uses")
    ax_act.yaxis.get_major_locator().set_params(integer=True)
    for ax, name in zip(bottom, names, strict=False):
        steps = sorted({r["step"] for r in rows if r["optimizer"] == name})
        for d in radii:
            ratio = [at(name, s, d)["eps_hat"] / at(name, s, d)["grad_norm"] for s in steps]
            ax.plot(steps, ratio, marker="o", ms=3, color=colors[d], label=f"δ = {d:g}")
        ax.set(xscale="symlog", xlabel="step", ylabel="ε̂(δ) / ‖∇f(x_t)‖")
        ax.set_xlim(left=0)
        ax.set_title(f"{name}: ε̂(δ) relative to ‖∇f(x_t)‖")
    for ax in (ax_prof, *bottom):
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
    for ax in (ax_grad, ax_prof, ax_act, *bottom):
        ax.grid(alpha=0.3, which="both")
    for ax in (ax_grad, ax_prof, ax_act, bottom[0]):
        ax.legend(fontsize=8)
    fig.suptitle(
        "Goldstein certificates of a ReLU MLP's full-batch loss on digits: ε̂(δ) = norm of the"
        " min-norm element of k gradients sampled in B(x, δ) (one-sided)"
    )
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0], "runs/stationarity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64, help="k per radius")
    args = parser.parse_args()
    out = prepare_out(args.out)
    if args.quick:
        size, args.width, args.samples = 256, 16, 16
        radii = [1e-3, 1e-1]
        checkpoints = [0, 20]
    else:
        size = 1024
        radii = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
        checkpoints = [0, 30, 100, 300, 1000, 3000]
    x, y = load_subset(size, args.seed)
    names = ["GD", "PolyakSGD", "NesterovSGD"]
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name in names:
        rows += run(name, args, x, y, radii, checkpoints)
    elapsed = time.perf_counter() - t0

    with (out / "profiles.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    last = checkpoints[-1]
    header = ["optimizer", "loss", "‖∇f‖", *[f"ε̂({d:g})" for d in radii], "active"]
    table = []
    for name in names:
        mine = [r for r in rows if r["optimizer"] == name and r["step"] == last]
        table.append(
            [
                name,
                f"{mine[0]['loss']:.4g}",
                f"{mine[0]['grad_norm']:.3g}",
                *[f"{r['eps_hat']:.3g}" for r in mine],
                "/".join(str(r["active"]) for r in mine),
            ]
        )
    print(
        f"n = {size} examples, MLP 64-{args.width}-{args.width}-10, k = {args.samples} per "
        f"radius, at step {last} (the iterate x_t); {elapsed:.0f} s\n"
    )
    print(format_table(header, table))
    fig_path = out / "stationarity.png"
    plot(rows, radii, names, fig_path)
    published = publish_figure(fig_path, "stationarity.png", args.quick)
    print(f"\nwrote {out / 'profiles.csv'}, {fig_path}" + (f", {published}" if published else ""))
    bad = [r for r in rows if not (math.isfinite(r["eps_hat"]) and r["eps_hat"] >= 0)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
