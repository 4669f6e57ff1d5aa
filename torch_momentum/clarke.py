r"""Clarke subgradients of nonsmooth functions by gradient sampling.

Mathematics
-----------
Let :math:`f:\mathbb{R}^d\to\mathbb{R}` be locally Lipschitz. By Rademacher's theorem it is
differentiable almost everywhere, and its **Clarke subdifferential** at :math:`x` is

.. math::
    \partial f(x) = \operatorname{conv}\{\, s : \exists\, x_i \to x,\ x_i \in D_f,\
    \nabla f(x_i) \to s \,\},

the convex hull of the limits of gradients taken at nearby points of differentiability
:math:`D_f`. ``x`` is *Clarke stationary* when :math:`0\in\partial f(x)`.

Autograd does not compute this set. At a kink it applies the chain rule with a fixed
convention (``relu'(0) = 0``), and the result need not be a subgradient at all: for
:math:`f(x) = \mathrm{relu}(x) - \mathrm{relu}(-x) = x`, autograd returns 0 at 0 although
:math:`\partial f(0) = \{1\}` (Kakade & Lee, *Provably correct automatic subdifferentiation for
qualified programs*, NeurIPS 2018).

Gradients at random points are safe: a point drawn from a ball lies in :math:`D_f` with
probability one, and there autograd returns the true gradient (for the programs autograd can
differentiate at all). The **Goldstein ε-subdifferential**

.. math::
    \partial_\varepsilon f(x) = \operatorname{conv} \bigcup_{\|y-x\|\le\varepsilon} \partial f(y)

contains the convex hull of the gradients sampled in the ball :math:`B(x,\varepsilon)`, and it
shrinks to :math:`\partial f(x)` as :math:`\varepsilon\to0` (outer semicontinuity of the Clarke
subdifferential). The **minimum-norm element** of the sampled hull,

.. math::
    g^\star = \operatorname*{arg\,min}_{g \in \operatorname{conv}\{s_1,\dots,s_k\}} \|g\|_2,

is the search direction of the gradient sampling method of Burke, Lewis & Overton (*A robust
gradient sampling algorithm for nonsmooth, nonconvex optimization*, SIAM J. Optim. 2005):
:math:`-g^\star` is a descent direction of :math:`f` whenever :math:`g^\star \neq 0`, and
:math:`g^\star = 0` certifies approximate (Goldstein) stationarity. :func:`min_norm_element`
computes it exactly with Wolfe's active-set algorithm (Wolfe, *Finding the nearest point in a
polytope*, Math. Programming 1976).

The estimate is of the Goldstein set, not of the Clarke set: at a point closer than the radius
to a kink, gradients from the other side of the kink are sampled too (see the tests).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import mul
from typing import Union

import torch
from torch import Tensor

__all__ = ["ClarkeSubgradient", "clarke_subgradient", "min_norm_element"]

TensorOrDict = Union[Tensor, dict[str, Tensor]]  # noqa: UP007  (used at runtime in dataclass)

# Default number of samples: 2 (d + 1), clamped to [_MIN_SAMPLES, _MAX_SAMPLES] (see docstring).
_MIN_SAMPLES = 64
_MAX_SAMPLES = 256

# Wolfe's tolerances, relative to max_j ||s_j||^2 (the samples are rescaled to that norm 1).
# Optimality: stop when every sample satisfies <x, s_j> >= ||x||^2 - _TOL_OPT.
_TOL_OPT = 1e-12
# A weight at or below _TOL_WEIGHT leaves the active set (moves x by at most this much).
_TOL_WEIGHT = 1e-12
# A new point whose lifted distance^2 to the active affine hull is below this is dependent.
_TOL_PIVOT = 1e-20


@dataclass(frozen=True)
class ClarkeSubgradient:
    """Result of :func:`clarke_subgradient`.

    Attributes:
        samples: gradients at the sample points, leading dimension ``k`` (a dict of such
            tensors when ``x`` was a dict).
        points: the sample points, leading dimension ``k``, same structure as ``samples``.
        weights: ``k`` convex weights (non-negative, summing to one) with
            ``min_norm = sum_i weights[i] * samples[i]``.
        min_norm: the minimum-norm element of the convex hull of the samples, shaped like
            ``x`` (a dict when ``x`` was a dict). Zero certifies (Goldstein) stationarity;
            otherwise ``-min_norm`` is the gradient-sampling descent direction.
        radius: the radius of the sampling ball that was used.
    """

    samples: TensorOrDict
    points: TensorOrDict
    weights: Tensor
    min_norm: TensorOrDict
    radius: float


# --------------------------------------------------------------------------------------------
# Flattening of tensors and dicts of tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    names: tuple[str, ...] | None  # None: x was a single tensor
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]


def _check_x(x: object) -> tuple[_Spec, Tensor]:
    """Validate ``x`` and return its spec and a detached flat copy (``x`` is never mutated)."""
    if isinstance(x, Tensor):
        items: list[tuple[str | None, Tensor]] = [(None, x)]
    elif isinstance(x, Mapping):
        if len(x) == 0:
            raise ValueError("x is an empty dict; it must map names to floating-point tensors")
        items = []
        for name, value in x.items():
            if not isinstance(name, str):
                raise TypeError(f"x must have str keys, got key {name!r} of type {type(name)}")
            if not isinstance(value, Tensor):
                raise TypeError(f"x[{name!r}] must be a Tensor, got {type(value).__name__}")
            items.append((name, value))
    else:
        raise TypeError(f"x must be a Tensor or a dict of name -> Tensor, got {type(x).__name__}")
    first = items[0][1]
    for name, value in items:
        label = "x" if name is None else f"x[{name!r}]"
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"{label} must be a real floating-point tensor, got dtype {value.dtype}; "
                "Clarke subgradients are defined for real functions of real variables"
            )
        if value.dtype != first.dtype or value.device != first.device:
            raise TypeError(
                f"all tensors of x must share one dtype and device; {label} is "
                f"{value.dtype} on {value.device}, the first is {first.dtype} on {first.device}"
            )
        if value.layout != torch.strided:
            raise TypeError(f"{label} must be a dense (strided) tensor, got {value.layout}")
    flat = torch.cat([value.detach().reshape(-1) for _, value in items])
    if flat.numel() == 0:
        raise ValueError("x has no entries; there is nothing to differentiate")
    names = None if isinstance(x, Tensor) else tuple(name for name, _ in items)  # type: ignore[misc]
    spec = _Spec(
        names=names,
        shapes=tuple(value.shape for _, value in items),
        numels=tuple(value.numel() for _, value in items),
    )
    return spec, flat


def _unflatten(flat: Tensor, spec: _Spec, lead: tuple[int, ...] = ()) -> TensorOrDict:
    """Inverse of the flattening, with optional leading (batch) dimensions."""
    if spec.names is None:
        return flat.reshape((*lead, *spec.shapes[0]))
    parts = flat.split(list(spec.numels), dim=-1)
    return {
        name: part.reshape((*lead, *shape))
        for name, part, shape in zip(spec.names, parts, spec.shapes, strict=True)
    }


def _flatten_batch(tree: TensorOrDict, spec: _Spec, k: int) -> Tensor:
    if spec.names is None:
        return tree.reshape(k, -1)  # type: ignore[union-attr]
    return torch.cat([tree[name].reshape(k, -1) for name in spec.names], dim=1)  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _scalar_output(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def f_scalar(z: TensorOrDict) -> Tensor:
        return f(z).reshape(())

    return f_scalar


def _check_value(value: object) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"f must return a real scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"f must return a real scalar tensor, got a tensor of shape {tuple(value.shape)}; "
            "reduce it (e.g. .sum() or .mean()) inside f"
        )
    if not value.dtype.is_floating_point:
        raise TypeError(f"f must return a real scalar tensor, got dtype {value.dtype}")


def _default_radius(flat: Tensor) -> float:
    eps = torch.finfo(flat.dtype).eps
    return math.sqrt(eps) * max(1.0, float(flat.double().norm()))


def _default_num_samples(d: int) -> int:
    return max(_MIN_SAMPLES, min(2 * (d + 1), _MAX_SAMPLES))


def _count_nonfinite_rows(flat: Tensor) -> int:
    """Rows of ``flat`` with a NaN or inf; one cheap reduction when there are none."""
    if math.isfinite(float(flat.sum(dtype=torch.float64))):
        return 0  # a NaN or inf entry would make the sum NaN or inf
    return int((~torch.isfinite(flat).all(dim=1)).sum())


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


# --------------------------------------------------------------------------------------------
# Gradients at the sample points
# --------------------------------------------------------------------------------------------


def _grads_vmap(f_scalar: Callable[..., Tensor], points: Tensor, spec: _Spec) -> Tensor:
    """``vmap(grad(f))`` over the sample points; halves the chunk size on out-of-memory."""
    k = points.shape[0]
    tree = _unflatten(points, spec, (k,))
    grad_fn = torch.func.grad(f_scalar)
    chunk: int | None = None
    while True:
        try:
            out = torch.func.vmap(grad_fn, chunk_size=chunk)(tree)
            return _flatten_batch(out, spec, k)
        except RuntimeError as err:
            if not _is_oom(err) or chunk == 1:
                raise
            chunk = max(1, (k if chunk is None else chunk) // 2)


def _grads_loop(f_scalar: Callable[..., Tensor], points: Tensor, spec: _Spec) -> Tensor:
    """One ``torch.autograd.grad`` call per sample point."""
    out = torch.empty_like(points)
    for i in range(points.shape[0]):
        leaves = [
            part.detach().clone().requires_grad_(True)
            for part in points[i].split(list(spec.numels))
        ]
        if spec.names is None:
            z: TensorOrDict = leaves[0].reshape(spec.shapes[0])
        else:
            z = {n: t.reshape(s) for n, t, s in zip(spec.names, leaves, spec.shapes, strict=True)}
        with torch.enable_grad():
            value = f_scalar(z)
            grads = (
                torch.autograd.grad(value, leaves, allow_unused=True)
                if value.requires_grad
                else [None] * len(leaves)
            )
        out[i] = torch.cat(
            [
                torch.zeros_like(leaf) if g is None else g.reshape(-1)
                for leaf, g in zip(leaves, grads, strict=True)
            ]
        )
    return out


# --------------------------------------------------------------------------------------------
# Minimum-norm point of a convex hull: Wolfe's algorithm
# --------------------------------------------------------------------------------------------


def _forward_sub(rows: list[list[float]], b: list[float]) -> list[float]:
    """Solve ``L y = b`` for lower-triangular ``L`` stored as rows (row i has i + 1 entries)."""
    y: list[float] = []
    for row, bi in zip(rows, b, strict=True):
        y.append((bi - sum(map(mul, row, y))) / row[-1])
    return y


def _back_sub(cols: list[list[float]], y: list[float]) -> list[float]:
    """Solve ``L^T u = y``; ``cols[i] = [L[i][i], L[i+1][i], ...]`` (column i from the diagonal)."""
    m = len(y)
    u = [0.0] * m
    for i in range(m - 1, -1, -1):
        col = cols[i]
        u[i] = (y[i] - sum(map(mul, col[1:], u[i + 1 :]))) / col[0]
    return u


def _cholesky(mat: list[list[float]]) -> list[list[float]] | None:
    """Cholesky factor (rows) of a small symmetric positive definite matrix; None if not PD."""
    rows: list[list[float]] = []
    for i, mi in enumerate(mat):
        row: list[float] = []
        for j in range(i):
            rj = rows[j]
            row.append((mi[j] - sum(map(mul, row, rj))) / rj[-1])
        dd = mi[i] - sum(map(mul, row, row))
        if not dd > _TOL_PIVOT:
            return None
        row.append(math.sqrt(dd))
        rows.append(row)
    return rows


def _wolfe(gram: Tensor, j0: int) -> tuple[list[int], list[float]]:
    """Wolfe's algorithm on a Gram matrix ``G = P P^T`` (float64, CPU, max diagonal 1).

    Minimises ``w^T G w`` over the simplex. The active set ``S`` holds affinely independent
    points; the affine minimiser of ``S`` solves ``(e e^T + G_S) u = e``, ``w = u / sum(u)``
    (nonsingular exactly when ``S`` is affinely independent), via a Cholesky factor that is
    bordered when a point enters and refactored when points leave. It starts from the point
    ``j0`` of smallest norm. Returns ``S`` and the weights on it.
    """
    k = gram.shape[0]
    row_cache: dict[int, list[float]] = {}

    def row(j: int) -> list[float]:
        r = row_cache.get(j)
        if r is None:
            r = row_cache[j] = gram[j].tolist()
        return r

    active = [j0]
    w = [1.0]
    lrows = [[math.sqrt(row(j0)[j0] + 1.0)]]
    lcols = [[lrows[0][0]]]
    y = [1.0 / lrows[0][0]]  # L^{-1} e, kept up to date when bordering
    gact = gram[:, j0 : j0 + 1]
    max_iter = 50 * k + 100
    for _ in range(max_iter):
        gw = torch.mv(gact, torch.tensor(w, dtype=gram.dtype)).tolist()
        xx = sum(map(mul, map(gw.__getitem__, active), w))  # ||x||^2
        gmin = min(gw)
        j = gw.index(gmin)
        if gmin > xx - _TOL_OPT or j in active:
            break  # optimal: <x, p_j> >= ||x||^2 (up to the tolerance) for every j
        rj = row(j)
        r = _forward_sub(lrows, [rj[s] + 1.0 for s in active])
        pivot = rj[j] + 1.0 - sum(map(mul, r, r))
        if not pivot > _TOL_PIVOT:
            break  # p_j numerically in the affine hull of the active set: nothing to gain
        r.append(math.sqrt(pivot))
        for i, col in enumerate(lcols):
            col.append(r[i])
        lcols.append([r[-1]])
        y.append((1.0 - sum(map(mul, r[:-1], y))) / r[-1])
        lrows.append(r)
        active.append(j)
        w.append(0.0)
        appended = True
        stalled = dropped = False
        while True:  # minor cycle
            u = _back_sub(lcols, y)
            su = sum(u)
            v = [ui / su for ui in u]
            if min(v) > _TOL_WEIGHT:
                w = v
                break
            # Move from w towards v until the first weight hits zero, drop the zero weights.
            theta, imin = 1.0, -1
            for i, (wi, vi) in enumerate(zip(w, v, strict=True)):
                if vi <= _TOL_WEIGHT:
                    diff = wi - vi
                    t = wi / diff if diff > 0.0 else 0.0
                    if t < theta:
                        theta, imin = t, i
            if appended and theta == 0.0 and imin == len(active) - 1:
                stalled = True  # the new point cannot enter at this precision
            w = [wi + theta * (vi - wi) for wi, vi in zip(w, v, strict=True)]
            if imin >= 0:
                w[imin] = 0.0
            keep = [i for i, wi in enumerate(w) if wi > _TOL_WEIGHT]
            active = [active[i] for i in keep]
            sw = sum(w[i] for i in keep)
            w = [w[i] / sw for i in keep]
            appended = False
            dropped = True
            mat = [[ra[b] + 1.0 for b in active] for ra in map(row, active)]
            factor = _cholesky(mat)
            if factor is None:  # cannot happen for an affinely independent set; be safe
                stalled = True
                break
            lrows = factor
            lcols = [[lrows[i2][i] for i2 in range(i, len(lrows))] for i in range(len(lrows))]
            y = _forward_sub(lrows, [1.0] * len(active))
            if stalled:
                break
        if stalled:
            break
        gact = gram[:, active] if dropped else torch.cat((gact, gram[:, j : j + 1]), dim=1)
    else:
        warnings.warn(
            f"min_norm_element: Wolfe's algorithm stopped after {max_iter} iterations without "
            "meeting its optimality test; the result may be inaccurate",
            RuntimeWarning,
            stacklevel=3,
        )
    return active, w


def _min_norm(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Min-norm point of the hull of the rows of ``flat`` and its convex weights, in float64."""
    k = flat.shape[0]
    if k == 1 or bool((flat == flat[0]).all()):  # a smooth point: all gradients equal
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=flat.device)
        return flat[0].to(torch.float64), weights
    p64 = flat.to(torch.float64)
    gram = (p64 @ p64.T).cpu()
    diag = gram.diagonal().tolist()
    scale = max(diag)
    active, w = _wolfe(gram / scale, diag.index(min(diag)))
    wlist = [0.0] * k
    for j, wj in zip(active, w, strict=True):
        wlist[j] = wj
    weights = torch.tensor(wlist, dtype=torch.float64, device=flat.device)
    return weights @ p64, weights


def min_norm_element(samples: Tensor) -> tuple[Tensor, Tensor]:
    r"""The minimum-norm point of the convex hull of ``k`` points, and its convex weights.

    Solves :math:`\min_{w \in \Delta_k} \|\sum_i w_i s_i\|_2` over the probability simplex
    :math:`\Delta_k` with Wolfe's exact active-set algorithm (1976), in float64 whatever the input
    dtype. Wolfe's method keeps an affinely independent active set :math:`S` and the minimiser
    :math:`x` of the norm over :math:`\operatorname{conv} S`; a major step adds the point
    :math:`s_j` with the smallest :math:`\langle x, s_j\rangle`, unless
    :math:`\langle x, s_j\rangle \ge \|x\|^2` for all :math:`j` (the optimality condition of
    the problem), and minor steps move towards the affine minimiser of :math:`S` and drop points
    whose weight reaches zero. It terminates after finitely many steps in exact arithmetic; in
    float64 the optimality test holds to ``1e-12 * max_j ||s_j||^2``.

    Accuracy: the point agrees with an independent exact solver to ``1e-10 * max|s|`` (the tests
    use ``1e-13``-level agreement on random, duplicate, collinear and origin-in-hull instances).
    The one hard case is a cluster of near-duplicates of diameter ``δ`` with
    ``1e-10 ≲ δ / max|s| ≲ 1e-7``: float64 inner products resolve the geometry inside the cluster
    only to ``eps / δ²`` relative, so the point is exact up to about ``δ`` (the size of the
    cluster). Gradient sampling with a float64 default radius produces such clusters (gradients of
    one smooth piece differ by ``O(radius)``), and there this error is below the ``O(radius)``
    bias of the estimate itself.

    Args:
        samples: tensor of shape ``(k, ...)``; row ``i`` is the point ``s_i`` (trailing
            dimensions are flattened).

    Returns:
        ``(point, weights)``: ``point`` has shape ``samples.shape[1:]`` and equals
        ``sum_i weights[i] * samples[i]`` (accumulated in float64; when all samples are equal,
        the weights are uniform and the point is that sample exactly); ``weights`` has shape
        ``(k,)``, is non-negative and sums to one. Both have the dtype of ``samples``. When the
        minimiser is not unique in ``w`` (duplicate points, the origin inside the hull), the
        weights are one valid choice; the point is unique.
    """
    if not isinstance(samples, Tensor):
        raise TypeError(f"samples must be a Tensor, got {type(samples).__name__}")
    if not samples.dtype.is_floating_point:
        raise TypeError(f"samples must be a real floating-point tensor, got {samples.dtype}")
    if samples.dim() < 1 or samples.shape[0] < 1:
        raise ValueError(
            f"samples must have a leading dimension k >= 1, got shape {tuple(samples.shape)}"
        )
    k = samples.shape[0]
    flat = samples.detach().reshape(k, -1)
    bad = _count_nonfinite_rows(flat)
    if bad:
        raise ValueError(f"samples has {bad} of {k} rows with NaN or inf entries")
    point, weights = _min_norm(flat)
    return point.to(samples.dtype).reshape(samples.shape[1:]), weights.to(samples.dtype)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def clarke_subgradient(
    f: Callable[[TensorOrDict], Tensor],
    x: TensorOrDict,
    *,
    radius: float | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
) -> ClarkeSubgradient:
    r"""Estimate the Clarke subdifferential of ``f`` at ``x`` by gradient sampling.

    Draws ``k = num_samples`` points :math:`x_i` uniformly from the Euclidean ball
    :math:`B(x, \varepsilon)` (over all entries of ``x`` together), takes the gradients
    :math:`s_i = \nabla f(x_i)` there with autograd, and returns them with the minimum-norm
    element :math:`g^\star` of :math:`\operatorname{conv}\{s_1, \dots, s_k\}`. The hull is an
    inner approximation of the Goldstein ε-subdifferential
    :math:`\partial_\varepsilon f(x) = \operatorname{conv}\bigcup_{\|y-x\|\le\varepsilon}
    \partial f(y)`, which decreases to the Clarke subdifferential :math:`\partial f(x)` as
    :math:`\varepsilon \to 0`; :math:`-g^\star` is the descent direction of the gradient sampling
    method (Burke, Lewis & Overton 2005). Unlike autograd at a kink (Kakade & Lee 2018), every
    :math:`s_i` is a true gradient: the sample points are almost surely points of
    differentiability.

    Sampling: a direction :math:`u_i/\|u_i\|` with :math:`u_i \sim N(0, I_d)` and a radius
    :math:`\varepsilon\, U_i^{1/d}` with :math:`U_i` uniform on :math:`(0, 1]`, which makes
    :math:`x_i` uniform in the ball. All randomness comes from ``generator`` (or torch's global
    generator), so a seeded generator reproduces the result.

    Args:
        f: maps a point shaped like ``x`` (a tensor, or a dict with the same keys and shapes) to
            a real scalar tensor. For a module, use ``torch.func.functional_call``:
            ``f = lambda p: loss(functional_call(model, p, (data,)), target)`` with
            ``x = dict(model.named_parameters())``. ``f`` is called ``k + 1`` times (once at
            ``x`` to check its output), so side effects such as BatchNorm running statistics
            in training mode happen ``k + 1`` times.
        x: the point, a floating-point tensor or a dict ``name -> tensor`` (one dtype and
            device). It is detached and never modified; it need not require grad.
        radius: :math:`\varepsilon > 0`. Default ``sqrt(eps) * max(1, ||x||_2)`` with ``eps``
            the machine epsilon of ``x``'s dtype: about ``1.5e-8 * max(1, ||x||)`` in float64,
            ``3.5e-4 * max(1, ||x||)`` in float32. The radius is both the bias of the estimate
            (the Goldstein set sees kinks up to ``radius`` away; quantities such as
            ``<g*, x>`` are off by ``O(radius * Lip f)``) and the resolution at which rounding
            stops mattering: a perturbation of ``sqrt(eps) * |x|`` is ``1/sqrt(eps)`` ulps of
            ``|x|`` (6.7e7 ulps in float64, 2.9e3 in float32), so each coordinate of a sample
            point (typical move ``radius / sqrt(d)``) really differs from ``x`` for
            parameter-like ``x`` whose entries are of comparable size. A smaller radius would
            let ``x + delta`` round back to ``x``, so that the "samples" would be autograd at
            the kink itself; a warning is raised when the typical move per coordinate is below
            16 ulps of ``max|x|``.
        num_samples: ``k >= 1``. Default ``2 (d + 1)`` clamped to ``[64, 256]`` for ``d``
            entries. Burke-Lewis-Overton's convergence theory takes ``k >= d + 1`` (by
            Carathéodory, ``d + 1`` points suffice to represent any point of a hull in
            :math:`\mathbb{R}^d`); ``2 (d + 1)`` leaves room for round kinks (for ``||x||_2`` at 0,
            ``k`` random gradients surround 0 only when ``k > d``, with probability 1/2 at
            ``k = 2d`` by Wendel's theorem, and almost surely for ``k >> d``). The floor of 64
            makes missing one side of a two-piece kink a ``2**-63`` event; the cap of 256 bounds
            the cost for parameter vectors, where ``k >= d + 1`` gradients are unaffordable and
            the hull is a coarser inner approximation (pass ``num_samples`` to trade accuracy
            for time and ``2 * k * d`` numbers of memory).
        generator: a ``torch.Generator`` for the sample points.
        vectorize: batch the ``k`` gradients with ``torch.func.vmap(torch.func.grad(f))``
            (in chunks if memory runs out). If ``f`` cannot be vmapped (in-place updates of
            tensors that are not batched, ``.item()`` or other data-dependent Python control
            flow, BatchNorm in training mode, random operations), fall back to a Python loop of
            ``torch.autograd.grad`` calls with one warning that says why. ``False`` uses the loop
            directly.

    Returns:
        A :class:`ClarkeSubgradient`: ``samples`` and ``points`` (leading dimension ``k``),
        ``weights`` (``k`` convex weights) and ``min_norm`` (shaped like ``x``), dicts when
        ``x`` is a dict, in ``x``'s dtype and on its device, plus the ``radius`` used.

    Precision: compute in float64 where kinks matter. In float32, besides the coarser default
    radius (the estimate is of a visibly larger Goldstein set), rounding inside ``f`` can hide
    or move a kink: an intermediate such as ``(x + 1) - 1`` loses the perturbation below
    ``eps * |x + 1|``, and a pre-activation ``w . z`` carries an error of order ``eps |w| |z|``,
    so sample points closer to a kink than that may get the gradient of the wrong side or of a
    flat, rounded-away piece. Use ``x.double()`` (and ``model.double()``) for checks like the
    ones in the tests, which hold to float64 precision.

    Raises:
        TypeError: ``f`` is not callable or does not return a real floating-point tensor;
            ``x`` is not a (dict of) real floating-point tensor(s); bad argument types.
        ValueError: ``f`` returns more than one number; ``radius <= 0`` or not finite;
            ``num_samples < 1``; ``x`` is empty.
        RuntimeError: some sampled gradients contain NaN or inf (the message says how many).

    Example:
        >>> x = torch.zeros((), dtype=torch.float64)
        >>> f = lambda z: torch.relu(z) - torch.relu(-z)  # = z, autograd says 0 at 0
        >>> float(clarke_subgradient(f, x).min_norm)
        1.0
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    spec, flat = _check_x(x)
    d = flat.numel()
    if radius is None:
        radius = _default_radius(flat)
    else:
        if isinstance(radius, bool) or not isinstance(radius, (int, float, Tensor)):
            raise TypeError(f"radius must be a positive number, got {type(radius).__name__}")
        radius = float(radius)
        if not (math.isfinite(radius) and radius > 0.0):
            raise ValueError(f"radius must be a positive finite number, got radius={radius}")
    if num_samples is None:
        num_samples = _default_num_samples(d)
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got num_samples={num_samples}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(vectorize, bool):
        raise TypeError(f"vectorize must be a bool, got {type(vectorize).__name__}")

    dtype, device = flat.dtype, flat.device
    ulp_scale = float(flat.abs().max()) * torch.finfo(dtype).eps
    if radius / math.sqrt(d) < 16.0 * ulp_scale:
        warnings.warn(
            f"clarke_subgradient: radius={radius:.3g} moves each of the {d} entries of x by "
            f"about {radius / math.sqrt(d):.3g}, fewer than 16 ulps of max|x| in {dtype}; sample "
            "points may round back onto x and rounding may hide a kink. Use a larger radius or "
            "float64",
            UserWarning,
            stacklevel=2,
        )

    # Check f once at x: a real scalar, so that vmap failures below are about vmap.
    value = f(_unflatten(flat.clone(), spec))
    _check_value(value)
    f_scalar = f if value.dim() == 0 else _scalar_output(f)  # one-element tensors: reshape

    # Uniform points in the ball B(x, radius).
    k = num_samples
    gen_device = generator.device if generator is not None else device
    direction = torch.randn(k, d, generator=generator, dtype=dtype, device=gen_device)
    u = 1.0 - torch.rand(k, 1, generator=generator, dtype=dtype, device=gen_device)  # (0, 1]
    norm = direction.norm(dim=1, keepdim=True).clamp_min_(torch.finfo(dtype).tiny)
    length = u.pow(1.0 / d).mul_(radius).div_(norm)
    points = flat + direction.mul_(length).to(device)

    if vectorize:
        try:
            samples = _grads_vmap(f_scalar, points, spec)
        except (RuntimeError, NotImplementedError) as err:
            if _is_oom(err):
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            warnings.warn(
                f"clarke_subgradient: f cannot be vmapped ({type(err).__name__}: {reason}); "
                f"falling back to a Python loop of {k} torch.autograd.grad calls, which is "
                "slower. Typical causes: in-place updates of tensors that are not batched, "
                ".item() or data-dependent Python control flow, BatchNorm in training mode, "
                "random operations. Pass vectorize=False to use the loop without this warning",
                UserWarning,
                stacklevel=2,
            )
            samples = _grads_loop(f_scalar, points, spec)
    else:
        samples = _grads_loop(f_scalar, points, spec)
    samples = samples.to(dtype)

    bad = _count_nonfinite_rows(samples)
    if bad:
        raise RuntimeError(
            f"clarke_subgradient: {bad} of {k} sampled gradients contain NaN or inf; f must be "
            f"locally Lipschitz and finite in the ball of radius={radius:.3g} around x"
        )

    min_norm64, weights64 = _min_norm(samples)
    min_norm = min_norm64.to(dtype)
    return ClarkeSubgradient(
        samples=_unflatten(samples, spec, (k,)),
        points=_unflatten(points, spec, (k,)),
        weights=weights64.to(dtype),
        min_norm=_unflatten(min_norm, spec),
        radius=radius,
    )
