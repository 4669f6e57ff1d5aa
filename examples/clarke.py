"""Clarke subgradients by gradient sampling, next to plain autograd at the kink.

For locally Lipschitz ``f`` the Clarke subdifferential at ``x`` is the convex hull of the limits of
gradients at nearby points. Autograd at a kink applies the chain rule with ``relu'(0) = 0`` and
``sign(0) = 0``, which need not give a subgradient (Kakade & Lee 2018: ``relu(x) - relu(-x) = x``
gets derivative 0 at 0). ``clarke_subgradient`` samples gradients in a small ball, where ``f`` is
differentiable almost surely, and returns the minimum-norm element of their convex hull
(Burke-Lewis-Overton gradient sampling); it estimates the Goldstein ε-subdifferential, which
shrinks to the Clarke set as the radius goes to 0.

Part 1 is a table of kink functions with exact answers: plain autograd at the kink,
``clarke_subgradient(f, x).min_norm`` and the minimum-norm element of the Clarke set, worked out
by hand. Part 2 checks Euler's identity for Clarke subgradients (Du, Hu & Lee 2018): for ``f``
locally Lipschitz and positively homogeneous of degree L, every ``s`` in the Clarke
subdifferential satisfies ``<s, x> = L f(x)``.
Here ``f(θ)`` is the summed output of a bias-free ReLU network with three layers as a function of
its parameters ``θ`` (L = 3), at a ``θ`` where a hidden unit sits exactly on its kink.

Outputs: printed tables and ``<out>/table.csv`` (one row per check). Exit status 1 if a check
fails. Float64 throughout: float32 rounding can hide a kink (see ``clarke_subgradient``).

    python examples/clarke.py            # about a second
    python examples/clarke.py --quick    # the same checks with a smaller network
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import base_parser, format_table, prepare_out
from torch import Tensor
from torch.func import functional_call

from torch_momentum import clarke_subgradient

F64 = torch.float64
EPS = torch.finfo(F64).eps


@dataclass
class Row:
    check: str
    autograd: str
    clarke: str
    exact: str
    error: float
    tolerance: float

    @property
    def holds(self) -> bool:
        return self.error <= self.tolerance


def fmt(t: Tensor | float) -> str:
    """Numbers rounded to 6 decimals, space-separated (so that the CSV stays parseable)."""
    values = t.reshape(-1).tolist() if isinstance(t, Tensor) else [t]
    return " ".join(f"{round(v, 6) + 0.0:.12g}" for v in values)


def autograd_at(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    z = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(z), z)
    return g


# ------------------------------------------------------------------------------------------
# Part 1: kink functions with exact answers
# ------------------------------------------------------------------------------------------


def kink_rows(seed: int) -> list[Row]:
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=F64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    ata_norm = torch.linalg.matrix_norm(a.T @ a, ord=2).item()

    def t(*v: float) -> Tensor:
        return torch.tensor(v, dtype=F64)

    # (name, f, x, exact min-norm element, radius or None, bias constant of the estimate)
    cases: list[tuple[str, Callable[[Tensor], Tensor], Tensor, Tensor, float | None, float]] = [
        ("|x| at 0", torch.abs, t(0.0).reshape(()), t(0.0), None, 0.0),
        ("relu(x) at 0 (hull [0, 1])", torch.relu, t(0.0).reshape(()), t(0.0), None, 0.0),
        (
            "relu(x) - relu(-x) at 0",
            lambda z: torch.relu(z) - torch.relu(-z),
            t(0.0).reshape(()),
            t(1.0),
            None,
            0.0,
        ),
        ("max(x1, x2) at (1, 1)", lambda z: z.max(), t(1.0, 1.0), t(0.5, 0.5), None, 0.0),
        (
            "||x||_2 at 0 in R^5",
            torch.linalg.vector_norm,
            torch.zeros(5, dtype=F64),
            t(0, 0, 0, 0, 0),
            None,
            0.0,
        ),
        (
            "|x1| - |x2| at 0",
            lambda z: z[0].abs() - z[1].abs(),
            t(0.0, 0.0),
            t(0.0, 0.0),
            None,
            0.0,
        ),
        (
            "max(x1 + x2, -x1 + x2) at 0",
            lambda z: torch.maximum(z[0] + z[1], -z[0] + z[1]),
            t(0.0, 0.0),
            t(0.0, 1.0),
            None,
            0.0,
        ),
        (
            "||x||_inf at (1, -1, 0.5)",
            lambda z: torch.linalg.vector_norm(z, ord=math.inf),
            t(1.0, -1.0, 0.5),
            t(0.5, -0.5, 0.0),
            None,
            0.0,
        ),
        (
            "lasso 1/2||Aw-b||^2 + ||w||_1 at 0",
            lambda w: 0.5 * (a @ w - b).pow(2).sum() + w.abs().sum(),
            t(0.0, 0.0),
            t(3.75, -3.25),
            None,
            # The answer's vertex of the Clarke set is sampled as vertex + A^T A (p - 0), |p| <=
            # radius; min_norm lies in the hull of those samples: off by <= ||A^T A|| radius.
            ata_norm,
        ),
        (
            "|x| at 1e-6, radius 2e-6 (Goldstein set; Clarke: 1)",
            torch.abs,
            t(1e-6).reshape(()),
            t(0.0),
            2e-6,
            0.0,
        ),
    ]
    rows = []
    for i, (name, f, x, exact, radius, bias) in enumerate(cases):
        res = clarke_subgradient(
            f, x, radius=radius, generator=torch.Generator().manual_seed(seed + i)
        )
        err = (res.min_norm.reshape(-1) - exact).abs().max().item()
        # Wolfe's solver is exact up to rounding (1e-12 covers it), plus the O(radius) bias.
        tol = 1e-12 + bias * res.radius
        rows.append(Row(name, fmt(autograd_at(f, x)), fmt(res.min_norm), fmt(exact), err, tol))
    return rows


# ------------------------------------------------------------------------------------------
# Part 2: the homogeneity lemma on a bias-free ReLU network
# ------------------------------------------------------------------------------------------


def relu_net_on_a_kink(d: int, width: int, n: int, seed: int):
    """Bias-free ReLU net d -> width -> width -> 1 with dyadic weights and integer data, so that
    every pre-activation is computed exactly; unit 0 of layer 1 is exactly 0 on input 0."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(d, width, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 1, bias=False),
    ).double()
    data = torch.randint(-3, 4, (n, d), generator=g).to(F64)
    data[0, -1] = 1.0
    with torch.no_grad():
        for layer in (net[0], net[2], net[4]):
            w = torch.randn(layer.weight.shape, generator=g, dtype=F64)
            layer.weight.copy_(torch.round(w * 16 / math.sqrt(layer.in_features)) / 16)
        w1 = net[0].weight
        w1[0, -1] = 0.0
        w1[0, -1] = -(w1[0] @ data[0])  # exact: dyadic products and sums
        assert (w1[0] @ data[0]).item() == 0.0

    def F(params: dict[str, Tensor]) -> Tensor:
        return functional_call(net, params, (data,)).sum()

    return net, F


def homogeneity_rows(quick: bool, seed: int) -> tuple[list[Row], dict[str, float]]:
    L = 3
    net, F = relu_net_on_a_kink(*((8, 6, 10) if quick else (20, 16, 32)), seed=seed)
    theta = {name: p.detach().clone() for name, p in net.named_parameters()}
    res = clarke_subgradient(F, theta, generator=torch.Generator().manual_seed(seed))
    names = list(theta)

    def inner(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
        return sum((a[n] * b[n]).sum().item() for n in names)

    k = res.weights.shape[0]
    worst, lip = 0.0, 0.0
    for i in range(k):
        point = {n: res.points[n][i] for n in names}
        s = {n: res.samples[n][i] for n in names}
        scale = sum((s[n] * point[n]).abs().sum().item() for n in names)
        worst = max(worst, abs(inner(s, point) - L * F(point).item()) / scale)
        lip = max(lip, math.sqrt(inner(s, s)))
    params = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
    plain = dict(zip(names, torch.autograd.grad(F(params), list(params.values())), strict=True))
    value = L * F(theta).item()
    rows = [
        Row(
            "Euler <s_i, θ_i> = L F(θ_i) at all samples (relative)",
            "",
            f"{worst:.1e}",
            "0",
            worst,
            256 * EPS,  # sums of a few hundred products: a few hundred ulps of the absolute sum
        ),
        Row(
            "<g, θ> = L F(θ) at the kink",
            fmt(inner(plain, theta)),
            fmt(inner(res.min_norm, theta)),
            fmt(value),
            abs(inner(res.min_norm, theta) - value),
            2 * (1 + L) * lip * res.radius,  # each sample is off by <= (1 + L) Lip radius
        ),
    ]
    spread = max(res.samples[n].std(dim=0).max().item() for n in names)
    info = {
        "parameters": float(sum(t.numel() for t in theta.values())),
        "samples": float(k),
        "radius": res.radius,
        "largest sample spread (std of an entry)": spread,
        "min_norm ||g||": math.sqrt(inner(res.min_norm, res.min_norm)),
        "autograd ||g||": math.sqrt(inner(plain, plain)),
    }
    return rows, info


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0], "runs/clarke")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample points")
    args = parser.parse_args()
    out = prepare_out(args.out)

    kinks = kink_rows(args.seed)
    lemma, info = homogeneity_rows(args.quick, args.seed)
    header = ["check", "autograd at x", "clarke min_norm", "exact", "error", "tolerance", "holds"]

    def table(rows: list[Row]) -> str:
        cells = [
            [
                r.check,
                r.autograd,
                r.clarke,
                r.exact,
                f"{r.error:.1e}",
                f"{r.tolerance:.1e}",
                r.holds,
            ]
            for r in rows
        ]
        return format_table(header, cells)

    print("Part 1: kinks. autograd at the kink vs clarke_subgradient(f, x).min_norm (float64)\n")
    print(table(kinks))
    print(
        "\nPart 2: homogeneity lemma <s, θ> = L F(θ), F = sum of a bias-free 3-layer ReLU net's"
        " outputs (L = 3)\n"
    )
    print(table(lemma))
    print("\n" + "  ".join(f"{k}: {v:.3g}" for k, v in info.items()))

    rows = kinks + lemma
    with (out / "table.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r.check, r.autograd, r.clarke, r.exact, r.error, r.tolerance, r.holds])
    failed = [r.check for r in rows if not r.holds]
    print(f"\nwrote {out / 'table.csv'}; {len(rows) - len(failed)} of {len(rows)} checks hold")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
