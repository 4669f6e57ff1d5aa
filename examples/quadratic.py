"""The classical gradient-descent and momentum theorems, checked numerically with our optimisers.

Problems (float64 throughout, fixed seeds):

* ``f(x) = ½ xᵀAx`` with ``A = Q diag(λ) Qᵀ`` symmetric positive definite in R^100, ``Q`` a
  random orthogonal matrix and ``λ`` evenly spaced from ``μ = 1`` to ``L = κ`` for ``κ = 100`` and
  ``κ = 1000``; the minimiser is ``x* = 0`` and ``β = L`` is the smoothness constant.
* ``g(x) = Σ_j log(1 + (Bx)_j²)`` with ``B ∈ R^{100×100}`` (singular values 1 to 0.01): smooth
  and nonconvex (the scalar ``φ(z) = log(1 + z²)`` has ``φ'' = 2(1 − z²)/(1 + z²)² ∈ [−1/4, 2]``),
  so ``‖∇²g‖₂ ≤ β = 2‖B‖₂²``; ``g ≥ 0 = g(0)``, hence ``g* = 0`` is known. At the start 71% of the
  ``(Bx_0)_j`` lie in the concave region ``|z| > 1``.

Theorems checked, each with ``torch_momentum``'s optimisers (``PolyakSGD(momentum=0)`` is gradient
descent; ``NesterovSGD`` is read at its iterate ``x_t`` through ``opt.eval()``):

1. GD on the quadratic with ``η = 1/λ_max``: ``‖x_t‖ ≤ (1 − ηλ_min)^t ‖x_0‖`` for every t.
2. Descent lemma (``‖∇²f‖₂ ≤ β``, ``η = 1/β``): ``f(x_t) − f(x_{t+1}) ≥ ‖∇f(x_t)‖²/(2β)`` at
   every step, on the quadratic and on the nonconvex ``g``.
3. Heavy ball with ``η = 4/(√L + √μ)²``, momentum ``((√κ − 1)/(√κ + 1))²`` converges at rate
   ``(√κ − 1)/(√κ + 1)``; Nesterov with ``η = 1/L``, momentum ``(√κ − 1)/(√κ + 1)`` at
   ``1 − 1/√κ``. Both iteration matrices have a double eigenvalue of that modulus (at ``λ = μ``,
   and for heavy ball also at ``λ = L``), so ``‖x_t‖ ≈ C·t·rate^t``: the measured rate is the
   exponential of the least-squares slope of ``log ‖x_t‖`` over the second half of the run, and
   the ``t`` prefactor biases it upwards by about ``2 ln 2 / T`` in log-rate. The "holds" column
   allows 1.5 times that bias plus 2% of ``|log rate|``.
4. Stationarity (``T = O(β/ε²)``): GD with ``η = 1/β`` on ``g`` has
   ``min_{t<T} ‖∇g(x_t)‖² ≤ 2β(g(x_0) − g*)/T``, checked for several ``T``.

Every trajectory is also compared with a plain velocity-form loop written from the formulas
(``v ← −∇f(x [+ η m v]) + m v;  x ← x + η v``), independently of the optimiser code.

Outputs: a printed table, ``<out>/summary.csv`` and ``<out>/quadratic.png`` (``‖x_t‖/‖x_0‖`` on a
log scale against t with the theoretical lines, and the stationarity bound against T), copied to
``docs/quadratic.png`` when run without ``--quick``. Exit status 1 if any check fails.

    python examples/quadratic.py            # 1000 steps, a few seconds
    python examples/quadratic.py --quick    # 300 steps, no docs/ update
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch
from _common import base_parser, format_table, prepare_out, publish_figure
from matplotlib.figure import Figure
from torch import Tensor

from torch_momentum import NesterovSGD, PolyakSGD

DTYPE = torch.float64
DIM = 100
KAPPAS = (100.0, 1000.0)
# Relative float64 slack for the "holds at every t" checks: trajectories of a few thousand steps
# accumulate rounding of order 1e-16 * steps * dim relative to the quantities compared.
BOUND_RTOL = 1e-9
CSV_COLUMNS = ("problem", "method", "check", "theory", "measured", "holds", "lr", "momentum")
CSV_COLUMNS += ("ref_diff",)


@dataclass
class Problem:
    """A smooth objective with the constants the theorems need."""

    name: str
    f: Callable[[Tensor], Tensor]  # batched: (..., d) -> (...)
    grad: Callable[[Tensor], Tensor]  # batched: (..., d) -> (..., d)
    beta: float  # smoothness: ‖∇²f‖₂ ≤ beta everywhere
    f_star: float  # known minimum value
    x0: Tensor
    mu: float = 0.0  # strong convexity (quadratics only)
    extra: dict[str, float] = field(default_factory=dict)


def random_orthogonal(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed orthogonal matrix (QR of a Gaussian matrix with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def quadratic_problem(kappa: float, dim: int = DIM, seed: int = 0) -> Problem:
    """``½ xᵀAx``, ``A = Q diag(λ) Qᵀ``, ``λ`` evenly spaced in ``[1, κ]``; μ, L by eigvalsh."""
    gen = torch.Generator().manual_seed(seed)
    q = random_orthogonal(dim, gen)
    lam = torch.linspace(1.0, kappa, dim, dtype=DTYPE)
    a = (q * lam) @ q.T
    a = 0.5 * (a + a.T)
    eig = torch.linalg.eigvalsh(a)  # the theorems speak of A's eigenvalues, rounding included
    x0 = torch.randn(dim, generator=gen, dtype=DTYPE)
    return Problem(
        name=f"quadratic κ={kappa:g}",
        f=lambda x: 0.5 * ((x @ a) * x).sum(-1),
        grad=lambda x: x @ a,
        beta=eig[-1].item(),
        f_star=0.0,
        x0=x0,
        mu=eig[0].item(),
        extra={"kappa": kappa},
    )


def nonconvex_problem(dim: int = DIM, seed: int = 1) -> Problem:
    """Nonconvex ``Σ_j log(1 + (Bx)_j²)``: ``β = 2‖B‖₂²`` (since ``|φ''| ≤ 2``) and ``f* = 0`` at 0.

    ``B = U diag(s) Vᵀ`` with singular values ``s`` log-spaced from 1 to 0.01, so that near the
    minimiser GD is slow along the small-``s`` directions and ``min_t ‖∇f(x_t)‖²`` decays gradually.
    """
    gen = torch.Generator().manual_seed(seed)
    s = torch.logspace(0.0, -2.0, dim, dtype=DTYPE)
    b = (random_orthogonal(dim, gen) * s) @ random_orthogonal(dim, gen).T
    beta = 2.0 * torch.linalg.matrix_norm(b, ord=2).item() ** 2
    x0 = 10.0 * torch.randn(dim, generator=gen, dtype=DTYPE)  # 71% of |(Bx0)_j| > 1: nonconvex

    def f(x: Tensor) -> Tensor:
        return torch.log1p((x @ b.T) ** 2).sum(-1)

    def grad(x: Tensor) -> Tensor:
        z = x @ b.T
        return (2.0 * z / (1.0 + z**2)) @ b

    return Problem(name="nonconvex Σlog(1+(Bx)²)", f=f, grad=grad, beta=beta, f_star=0.0, x0=x0)


def run_optimizer(
    problem: Problem,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    momentum: float,
    steps: int,
) -> Tensor:
    """Train ``x`` by ``loss.backward(); opt.step()``; return the iterates as a (T+1, d) tensor.

    NesterovSGD keeps its parameters at the look-ahead point in train mode; the iterate ``x_t`` is
    read in eval mode, then training mode is restored.
    """
    x = torch.nn.Parameter(problem.x0.clone())
    opt = optimizer_cls([x], lr=lr, momentum=momentum)
    switch = isinstance(opt, NesterovSGD)
    iterates = [problem.x0.clone()]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        problem.f(x).backward()
        opt.step()
        if switch:
            opt.eval()
            iterates.append(x.detach().clone())
            opt.train()
        else:
            iterates.append(x.detach().clone())
    return torch.stack(iterates)


def velocity_form_reference(
    problem: Problem, lr: float, momentum: float, steps: int, nesterov: bool
) -> Tensor:
    """The velocity-form formulas as written: ``v ← −∇f(x + [η m v]) + m v;  x ← x + η v``."""
    x, v = problem.x0.clone(), torch.zeros_like(problem.x0)
    iterates = [x]
    for _ in range(steps):
        point = x + lr * momentum * v if nesterov else x
        v = -problem.grad(point) + momentum * v
        x = x + lr * v
        iterates.append(x)
    return torch.stack(iterates)


def max_relative_difference(a: Tensor, b: Tensor) -> float:
    """``max_t ‖a_t − b_t‖ / ‖b_t‖`` over a trajectory."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def fitted_rate(norms: Tensor, start: int | None = None) -> float:
    """``exp`` of the least-squares slope of ``log ‖x_t‖`` over ``t ≥ start`` (default T/2)."""
    start = len(norms) // 2 if start is None else start
    t = torch.arange(start, len(norms), dtype=DTYPE)
    y = norms[start:].log()
    slope = ((t - t.mean()) * (y - y.mean())).sum() / ((t - t.mean()) ** 2).sum()
    return math.exp(slope.item())


def prefactor_bias(steps: int) -> float:
    """Log-rate bias of a tail fit over ``[T/2, T]`` when ``‖x_t‖ ∝ t·ρ^t``: ``ln 2/(T/2)``."""
    return 2.0 * math.log(2.0) / steps


def rate_holds(measured: float, theory: float, steps: int) -> bool:
    """Measured rate within the Jordan-block bias (x1.5, plus 2% of |log ρ| for oscillation)."""
    gap = math.log(measured) - math.log(theory)
    return abs(gap) <= 1.5 * prefactor_bias(steps) + 0.02 * abs(math.log(theory))


@dataclass
class Method:
    label: str
    cls: type[torch.optim.Optimizer]
    lr: float
    momentum: float
    rate: float  # theoretical (asymptotic) rate of ‖x_t‖
    nesterov: bool = False


def quadratic_methods(problem: Problem) -> list[Method]:
    """GD, heavy ball and Nesterov with the classical tunings for ``μ``, ``L`` of the problem."""
    mu, big_l = problem.mu, problem.beta
    kappa = big_l / mu
    sq = math.sqrt(kappa)
    hb_rate = (sq - 1.0) / (sq + 1.0)
    return [
        Method("GD", PolyakSGD, 1.0 / big_l, 0.0, 1.0 - mu / big_l),
        Method(
            "heavy ball",
            PolyakSGD,
            4.0 / (math.sqrt(big_l) + math.sqrt(mu)) ** 2,
            hb_rate**2,
            hb_rate,
        ),
        Method("Nesterov", NesterovSGD, 1.0 / big_l, hb_rate, 1.0 - 1.0 / sq, nesterov=True),
    ]


def descent_ratio(problem: Problem, xs: Tensor) -> Tensor:
    """``(f(x_t) − f(x_{t+1})) / (‖∇f(x_t)‖²/(2β))`` per step: the descent lemma says ``≥ 1``."""
    values = problem.f(xs)
    grad_sq = problem.grad(xs[:-1]).square().sum(-1)
    return (values[:-1] - values[1:]) / (grad_sq / (2.0 * problem.beta))


def stationarity(
    problem: Problem, xs: Tensor, horizons: list[int]
) -> list[tuple[int, float, float]]:
    """``(T, min_{t<T} ‖∇f(x_t)‖², 2β(f(x_0) − f*)/T)`` for each horizon T."""
    grad_sq = problem.grad(xs[:-1]).square().sum(-1)
    gap = problem.f(xs[0]).item() - problem.f_star
    return [
        (t, grad_sq[:t].min().item(), 2.0 * problem.beta * gap / t)
        for t in horizons
        if t <= len(grad_sq)
    ]


@dataclass
class Row:
    problem: str
    method: str
    check: str
    theory: float
    measured: float
    holds: bool
    lr: float = float("nan")
    momentum: float = float("nan")
    ref_diff: float = float("nan")


def run_quadratic(kappa: float, steps: int) -> tuple[list[Row], dict[str, Tensor], Problem]:
    problem = quadratic_problem(kappa)
    rows: list[Row] = []
    norms: dict[str, Tensor] = {}
    for m in quadratic_methods(problem):
        xs = run_optimizer(problem, m.cls, m.lr, m.momentum, steps)
        ref = velocity_form_reference(problem, m.lr, m.momentum, steps, m.nesterov)
        diff = max_relative_difference(xs, ref)
        n = xs.norm(dim=-1)
        norms[m.label] = n / n[0]
        common = dict(lr=m.lr, momentum=m.momentum, ref_diff=diff)
        measured = fitted_rate(n)
        rows.append(
            Row(
                problem.name,
                m.label,
                "rate of ‖x_t‖ (tail fit)",
                m.rate,
                measured,
                rate_holds(measured, m.rate, steps),
                **common,
            )
        )
        if m.label == "GD":
            t = torch.arange(len(n), dtype=DTYPE)
            ratio = (n / (n[0] * m.rate**t)).max().item()
            rows.append(
                Row(
                    problem.name,
                    m.label,
                    "max_t ‖x_t‖/((1−ημ)^t‖x_0‖) ≤ 1",
                    1.0,
                    ratio,
                    ratio <= 1.0 + BOUND_RTOL,
                    **common,
                )
            )
            dr = descent_ratio(problem, xs).min().item()
            rows.append(
                Row(
                    problem.name,
                    m.label,
                    "min_t descent / (‖∇f‖²/2β) ≥ 1",
                    1.0,
                    dr,
                    dr >= 1.0 - BOUND_RTOL,
                    **common,
                )
            )
    return rows, norms, problem


def run_nonconvex(steps: int) -> tuple[list[Row], list[tuple[int, float, float]]]:
    problem = nonconvex_problem()
    lr = 1.0 / problem.beta
    xs = run_optimizer(problem, PolyakSGD, lr, 0.0, steps)
    ref = velocity_form_reference(problem, lr, 0.0, steps, nesterov=False)
    common = dict(lr=lr, momentum=0.0, ref_diff=max_relative_difference(xs, ref))
    dr = descent_ratio(problem, xs).min().item()
    rows = [
        Row(
            problem.name,
            "GD",
            "min_t descent / (‖∇f‖²/2β) ≥ 1",
            1.0,
            dr,
            dr >= 1.0 - BOUND_RTOL,
            **common,
        )
    ]
    horizons = sorted({h for h in (1, 3, 10, 30, 100, 300, 1000, 3000, steps) if h <= steps})
    curve = stationarity(problem, xs, horizons)
    for t, got, bound in curve:
        if t in (10, 100, steps):
            rows.append(
                Row(
                    problem.name,
                    "GD",
                    f"min_(t<{t}) ‖∇f‖² ≤ 2β(f0−f*)/T",
                    bound,
                    got,
                    got <= bound * (1.0 + BOUND_RTOL),
                    **common,
                )
            )
    return rows, curve


def make_figure(
    curves: list[tuple[Problem, dict[str, Tensor]]],
    stationarity_curve: list[tuple[int, float, float]],
    steps: int,
) -> Figure:
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, len(curves) + 1)
    colours = {"GD": "tab:blue", "heavy ball": "tab:orange", "Nesterov": "tab:green"}
    t = torch.arange(steps + 1, dtype=DTYPE)
    for ax, (problem, norms) in zip(axes, curves, strict=False):
        for m in quadratic_methods(problem):
            ax.semilogy(t, norms[m.label], color=colours[m.label], label=f"{m.label} (ours)")
            ax.semilogy(
                t,
                m.rate**t,
                color=colours[m.label],
                linestyle="--",
                linewidth=1,
                label=f"theory {m.rate:.4f}^t",
            )
        ax.set_title(f"½xᵀAx, d={DIM}, κ={problem.extra['kappa']:g}")
        ax.set_xlabel("step t")
        ax.set_ylabel("‖x_t‖ / ‖x_0‖ (log scale)")
        ax.set_ylim(float(min(v.min() for v in norms.values())) / 10, 10.0)
        ax.legend(fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    ax = axes[-1]
    ts = [c[0] for c in stationarity_curve]
    ax.loglog(ts, [c[1] for c in stationarity_curve], "o-", label="min_{t<T} ‖∇g(x_t)‖² (GD, ours)")
    ax.loglog(ts, [c[2] for c in stationarity_curve], "k--", label="bound 2β(g(x_0) − g*)/T")
    ax.set_title("nonconvex g(x) = Σ log(1+(Bx)_j²), η = 1/β")
    ax.set_xlabel("T")
    ax.set_ylabel("squared gradient norm")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r.problem,
                    r.method,
                    r.check,
                    repr(r.theory),
                    repr(r.measured),
                    r.holds,
                    repr(r.lr),
                    repr(r.momentum),
                    repr(r.ref_diff),
                ]
            )


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], "runs/quadratic/")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 1000)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (300 if args.quick else 1000)
    if steps < 10:
        parser.error("--steps must be at least 10")
    out = prepare_out(args.out)
    torch.set_num_threads(1)  # d = 100: threads only add overhead (and spin on a busy machine)

    start = time.perf_counter()
    rows: list[Row] = []
    curves = []
    for kappa in KAPPAS:
        r, norms, problem = run_quadratic(kappa, steps)
        rows += r
        curves.append((problem, norms))
    r, stationarity_curve = run_nonconvex(steps)
    rows += r
    elapsed = time.perf_counter() - start

    header = ["problem", "method", "lr", "momentum", "check", "theory", "measured", "holds"]
    header.append("vs ref")
    table = [
        [
            r.problem,
            r.method,
            f"{r.lr:.4g}",
            f"{r.momentum:.4g}",
            r.check,
            f"{r.theory:.5g}",
            f"{r.measured:.5g}",
            "yes" if r.holds else "NO",
            f"{r.ref_diff:.1e}",
        ]
        for r in rows
    ]
    print(f"T = {steps} steps, float64, d = {DIM}; {elapsed:.1f} s")
    print(format_table(header, table))
    print(
        "rate: exp(slope of log‖x_t‖ over t ≥ T/2); momentum rates carry a t·ρ^t prefactor "
        f"(expected log-rate bias ≈ {prefactor_bias(steps):.1e}). "
        "vs ref: max_t ‖x_t − x_t^ref‖/‖x_t^ref‖ against the plain velocity-form loop."
    )

    write_csv(rows, out / "summary.csv")
    fig = make_figure(curves, stationarity_curve, steps)
    png = out / "quadratic.png"
    fig.savefig(png, dpi=110)
    published = publish_figure(png, "quadratic.png", args.quick)
    print(f"wrote {out / 'summary.csv'}, {png}" + (f", {published}" if published else ""))
    failed = [r for r in rows if not r.holds]
    if failed:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
