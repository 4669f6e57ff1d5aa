"""The classical convergence theorems of momentum methods, checked with PolyakSGD and NesterovSGD.

Self-contained (it does not import ``examples/quadratic.py``, which checks the same theorems at a
larger scale): quadratics ``½ xᵀAx`` with ``A = Q diag(λ) Qᵀ``, ``λ`` evenly spaced in ``[1, κ]``,
and the smooth nonconvex ``g(x) = Σ_j log(1 + (Bx)_j²)`` with ``‖∇²g‖₂ ≤ 2‖B‖₂²`` and ``g* = 0``.
Everything in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from torch_momentum import NesterovSGD, PolyakSGD

DTYPE = torch.float64
DIM = 50
# Relative slack for inequalities that the theorems state exactly: float64 rounding over <= 1000
# steps of a d=50 matrix-vector iteration is ~1e-16 * steps * d ~ 1e-11 relative; 1e-9 leaves margin
# and is still far below the smallest real slack a wrong optimiser would show (>= 1e-3 below).
RTOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """d <= 50: intra-op threads only add overhead (and spin on a busy machine); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def orthogonal(dim: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def quadratic(kappa: float, dim: int = DIM, seed: int = 0) -> tuple[Tensor, float, float, Tensor]:
    """``A`` with eigenvalues evenly spaced in ``[1, κ]``; returns ``A, μ, L, x0`` (A's μ, L)."""
    gen = torch.Generator().manual_seed(seed)
    q = orthogonal(dim, gen)
    a = (q * torch.linspace(1.0, kappa, dim, dtype=DTYPE)) @ q.T
    a = 0.5 * (a + a.T)
    eig = torch.linalg.eigvalsh(a)
    return a, eig[0].item(), eig[-1].item(), torch.randn(dim, generator=gen, dtype=DTYPE)


def half_quadratic(a: Tensor) -> Callable[[Tensor], Tensor]:
    """``x ↦ ½ xᵀAx``, batched over leading dimensions."""
    return lambda x: 0.5 * ((x @ a) * x).sum(-1)


def nonconvex(dim: int = 20, seed: int = 1) -> tuple[Callable[[Tensor], Tensor], float, Tensor]:
    """``g(x) = Σ log(1 + (Bx)_j²)``, its smoothness ``β = 2‖B‖₂²`` and a start where g is concave
    along some directions."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.logspace(0.0, -1.5, dim, dtype=DTYPE)
    b = (orthogonal(dim, gen) * s) @ orthogonal(dim, gen).T
    beta = 2.0 * torch.linalg.matrix_norm(b, ord=2).item() ** 2

    def g(x: Tensor) -> Tensor:
        return torch.log1p((x @ b.T) ** 2).sum(-1)

    return g, beta, 10.0 * torch.randn(dim, generator=gen, dtype=DTYPE)


def run(
    cls: type[torch.optim.Optimizer],
    f: Callable[[Tensor], Tensor],
    x0: Tensor,
    lr: float,
    momentum: float,
    steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Iterates ``x_0..x_T``, values ``f(x_t)``, gradients ``∇f(x_t)`` (t < T) of a training loop.

    NesterovSGD holds the look-ahead point while training; the iterate is read in ``eval()`` mode.
    """
    x = torch.nn.Parameter(x0.clone())
    opt = cls([x], lr=lr, momentum=momentum)
    xs = [x0.clone()]
    for _ in range(steps):
        opt.zero_grad()
        f(x).backward()
        opt.step()
        if isinstance(opt, NesterovSGD):
            opt.eval()
            xs.append(x.detach().clone())
            opt.train()
        else:
            xs.append(x.detach().clone())
    iterates = torch.stack(xs).requires_grad_()
    values = f(iterates)
    (grads,) = torch.autograd.grad(values.sum(), iterates)
    return iterates.detach(), values.detach(), grads[:-1]


def reference(
    grad: Callable[[Tensor], Tensor], x0: Tensor, lr: float, m: float, steps: int, nesterov: bool
) -> Tensor:
    """Velocity form as written: ``v ← −∇f(x [+ η m v]) + m v;  x ← x + η v``."""
    x, v, xs = x0.clone(), torch.zeros_like(x0), [x0.clone()]
    for _ in range(steps):
        v = -grad(x + lr * m * v if nesterov else x) + m * v
        x = x + lr * v
        xs.append(x)
    return torch.stack(xs)


def tail_rate(norms: Tensor) -> float:
    """``exp`` of the least-squares slope of ``log ‖x_t‖`` over the second half of the run."""
    t = torch.arange(len(norms) // 2, len(norms), dtype=DTYPE)
    y = norms[len(norms) // 2 :].log()
    return math.exp((((t - t.mean()) * (y - y.mean())).sum() / ((t - t.mean()) ** 2).sum()).item())


def rate_margin(theory: float, steps: int) -> float:
    """Allowed ``|log measured − log theory|`` for the momentum methods.

    Both tuned iteration matrices have a double eigenvalue of modulus ``ρ`` (a 2x2 Jordan block
    at ``λ = μ``; heavy ball also at ``λ = L``), so ``‖x_t‖ ≈ C·t·ρ^t`` and a tail fit over
    ``[T/2, T]`` reads ``log ρ + ln 2/(T/2)``: that bias (x1.5), plus 2% of ``|log ρ|`` for the
    oscillation of the complex-eigenvalue components. Measured gaps are within 5% of the
    predicted bias.
    """
    return 1.5 * 2.0 * math.log(2.0) / steps + 0.02 * abs(math.log(theory))


@pytest.mark.parametrize("kappa", [100.0, 1000.0])
def test_gd_quadratic_contraction_at_every_step(kappa: float) -> None:
    a, mu, big_l, x0 = quadratic(kappa)
    eta, steps = 1.0 / big_l, 400
    xs, _, _ = run(PolyakSGD, half_quadratic(a), x0, eta, 0.0, steps)
    norms = xs.norm(dim=-1)
    t = torch.arange(steps + 1, dtype=DTYPE)
    bound = (1.0 - eta * mu) ** t * norms[0]
    assert torch.all(norms <= bound * (1.0 + RTOL))
    # The bound is attained (so the check is not vacuous): from the eigenvector of λ_min the norm
    # decays at exactly 1 − ημ, i.e. equality at every t up to rounding.
    v_min = torch.linalg.eigh(a).eigenvectors[:, 0]
    xs, _, _ = run(PolyakSGD, half_quadratic(a), v_min, eta, 0.0, steps)
    torch.testing.assert_close(xs.norm(dim=-1), (1.0 - eta * mu) ** t, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("kappa", [100.0, 1000.0])
def test_descent_lemma_quadratic(kappa: float) -> None:
    a, _, big_l, x0 = quadratic(kappa)
    _, values, grads = run(PolyakSGD, half_quadratic(a), x0, 1.0 / big_l, 0.0, 300)
    decrease = values[:-1] - values[1:]
    # values fall by a factor >= (1 − 1/κ)² per step, so the difference keeps >= 2e-3 of f(x_t)
    # and its rounding error stays ~1e-13 relative: RTOL covers it.
    assert torch.all(decrease >= grads.square().sum(-1) / (2.0 * big_l) * (1.0 - RTOL))


def test_descent_lemma_and_stationarity_nonconvex() -> None:
    g, beta, x0 = nonconvex()
    # The run starts where g is not convex: the Hessian at x0 has a negative eigenvalue.
    assert torch.linalg.eigvalsh(torch.autograd.functional.hessian(g, x0))[0] < 0
    steps = 300
    _, values, grads = run(PolyakSGD, g, x0, 1.0 / beta, 0.0, steps)
    grad_sq = grads.square().sum(-1)
    decrease = values[:-1] - values[1:]
    # Descent lemma at every step. Late differences are small against f(x_t), so the rounding slack
    # is taken relative to f(x_t) (1e-16 * f per evaluation, 1e-9 with margin).
    assert torch.all(decrease >= grad_sq / (2.0 * beta) - RTOL * values[:-1])
    # Stationarity for every horizon T: min_{t<T} ‖∇g‖² ≤ 2β(g(x_0) − g*)/T with g* = 0 ...
    horizons = torch.arange(1, steps + 1, dtype=DTYPE)
    running_min = torch.cummin(grad_sq, dim=0).values
    assert torch.all(running_min <= 2.0 * beta * values[0] / horizons * (1.0 + RTOL))
    # ... and the telescoped inequality it comes from: Σ_{t<T} ‖∇g(x_t)‖² ≤ 2β(g(x_0) − g(x_T)).
    assert torch.all(torch.cumsum(grad_sq, 0) <= 2.0 * beta * (values[0] - values[1:]) + RTOL)
    # GD really moved to a near-stationary point (a stuck optimiser would fail here).
    assert grad_sq[-1] < 1e-2 * grad_sq[0]


@pytest.mark.parametrize("kappa", [100.0, 1000.0])
@pytest.mark.parametrize("method", ["heavy ball", "Nesterov"])
def test_momentum_rates_on_quadratics(kappa: float, method: str) -> None:
    a, mu, big_l, x0 = quadratic(kappa)
    sq = math.sqrt(big_l / mu)
    rho = (sq - 1.0) / (sq + 1.0)
    if method == "heavy ball":
        cls, lr, m, theory = PolyakSGD, 4.0 / (math.sqrt(big_l) + math.sqrt(mu)) ** 2, rho**2, rho
    else:
        cls, lr, m, theory = NesterovSGD, 1.0 / big_l, rho, 1.0 - 1.0 / sq
    steps = 1000
    xs, _, _ = run(cls, half_quadratic(a), x0, lr, m, steps)

    # Our optimiser follows the velocity-form formulas. Compared relative to ‖x_t‖
    # (which falls to ~1e-30):
    # rounding enters relative to the current iterate and is amplified at most ~t by the Jordan
    # block, so ~1e-16 * 1000 * d; 1e-9 is ample.
    ref = reference(lambda x: x @ a, x0, lr, m, steps, nesterov=method == "Nesterov")
    rel = (xs - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max() < 1e-9

    measured = tail_rate(xs.norm(dim=-1))
    assert abs(math.log(measured / theory)) <= rate_margin(theory, steps), (measured, theory)
    # Acceleration: the log-rate is >= 5x gradient descent's log(1 − 1/κ) (theory: ~√κ/2 to √κ x).
    assert math.log(measured) < 5.0 * math.log(1.0 - mu / big_l)


def test_rate_check_rejects_mistuned_momentum() -> None:
    """Negative control: the rate assertion above can fail (heavy ball tuned for κ/10)."""
    a, mu, big_l, x0 = quadratic(1000.0)
    sq = math.sqrt(big_l / mu)
    rho = (sq - 1.0) / (sq + 1.0)
    lr = 4.0 / (math.sqrt(big_l) + math.sqrt(10.0 * mu)) ** 2
    wrong = ((math.sqrt(sq**2 / 10) - 1) / (math.sqrt(sq**2 / 10) + 1)) ** 2
    xs, _, _ = run(PolyakSGD, half_quadratic(a), x0, lr, wrong, 1000)
    assert abs(math.log(tail_rate(xs.norm(dim=-1)) / rho)) > rate_margin(rho, 1000)
