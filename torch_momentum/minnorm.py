r"""The minimum-norm point of a convex hull by Wolfe's algorithm (the gradient sampling solver).

.. math::
    g^\star = \sum_i w_i s_i, \qquad
    w = \operatorname*{arg\,min}_{w \in \Delta_k} \Big\|\sum_i w_i s_i\Big\|_2,

over the probability simplex :math:`\Delta_k`. Wolfe (*Finding the nearest point in a polytope*,
Math. Programming 1976) keeps an affinely independent *active set* :math:`S` and the minimiser
:math:`g` of the norm over :math:`\operatorname{conv} S`. A *major step* adds the point
:math:`s_j` with the smallest :math:`\langle g, s_j\rangle`, unless
:math:`\langle g, s_j\rangle \ge \|g\|^2` for every :math:`j` (the optimality condition);
*minor steps* move :math:`g` towards the affine minimiser of :math:`S` and drop the points whose
weight reaches zero. Everything works on the Gram matrix :math:`G = P P^\top` of the points, so
the points themselves may live anywhere (see
:func:`~torch_momentum.stationarity.stationarity_profile`'s chunked modes).
"""

from __future__ import annotations

import math
import warnings
from operator import mul

import torch
from torch import Tensor

__all__ = ["min_norm_element"]

# Wolfe's tolerances, relative to max_j ||s_j||^2 (the Gram matrix is rescaled to max diagonal 1).
# Optimality: stop when every sample satisfies <x, s_j> >= ||x||^2 - _TOL_OPT.
_TOL_OPT = 1e-12
# A weight at or below _TOL_WEIGHT leaves the active set (moves x by at most this much).
_TOL_WEIGHT = 1e-12
# A new point whose lifted distance^2 to the active affine hull is below this is dependent.
_TOL_PIVOT = 1e-20


# --------------------------------------------------------------------------------------------
# Small dense linear algebra on Python lists (k is at most a few hundred; the active set is small)
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


# --------------------------------------------------------------------------------------------
# Wolfe's algorithm, one named step per method
# --------------------------------------------------------------------------------------------


class _Wolfe:
    """Wolfe's algorithm on a Gram matrix ``G = P P^T`` (float64, CPU, max diagonal 1).

    Minimises ``w^T G w`` over the simplex. The affine minimiser of the active set ``S`` solves
    ``(e e^T + G_S) u = e``, ``w = u / sum(u)`` (nonsingular exactly when ``S`` is affinely
    independent), through a Cholesky factor ``L`` of ``e e^T + G_S`` that is bordered when a point
    enters and refactored when points leave; ``y = L^{-1} e`` is kept with it.
    """

    def __init__(self, gram: Tensor, j0: int) -> None:
        self.gram = gram
        self._rows: dict[int, list[float]] = {}
        self.active = [j0]  # indices of the active set S
        self.w = [1.0]  # convex weights on S
        self.lrows = [[math.sqrt(self.row(j0)[j0] + 1.0)]]  # L by rows
        self.lcols = [[self.lrows[0][0]]]  # L by columns, from the diagonal down
        self.y = [1.0 / self.lrows[0][0]]  # L^{-1} e
        self.gact = gram[:, j0 : j0 + 1]  # the columns of G on S

    def row(self, j: int) -> list[float]:
        r = self._rows.get(j)
        if r is None:
            r = self._rows[j] = self.gram[j].tolist()
        return r

    def most_violating_point(self) -> int | None:
        """The point ``j`` minimising ``<x, p_j>``, or None when ``x`` is optimal:
        ``<x, p_j> >= ||x||^2 - tol`` for every ``j`` (or the minimiser is already active)."""
        gw = torch.mv(self.gact, torch.tensor(self.w, dtype=self.gram.dtype)).tolist()
        xx = sum(map(mul, map(gw.__getitem__, self.active), self.w))  # ||x||^2
        gmin = min(gw)
        j = gw.index(gmin)
        if gmin > xx - _TOL_OPT or j in self.active:
            return None
        return j

    def add_point(self, j: int) -> bool:
        """Border the Cholesky factor with point ``j`` (weight 0); False if ``p_j`` lies
        numerically in the affine hull of the active set (nothing to gain)."""
        rj = self.row(j)
        r = _forward_sub(self.lrows, [rj[s] + 1.0 for s in self.active])
        pivot = rj[j] + 1.0 - sum(map(mul, r, r))
        if not pivot > _TOL_PIVOT:
            return False
        r.append(math.sqrt(pivot))
        for i, col in enumerate(self.lcols):
            col.append(r[i])
        self.lcols.append([r[-1]])
        self.y.append((1.0 - sum(map(mul, r[:-1], self.y))) / r[-1])
        self.lrows.append(r)
        self.active.append(j)
        self.w.append(0.0)
        self.gact = torch.cat((self.gact, self.gram[:, j : j + 1]), dim=1)
        return True

    def affine_minimizer(self) -> list[float]:
        """Weights of the minimum-norm point of the affine hull of the active set."""
        u = _back_sub(self.lcols, self.y)
        su = sum(u)
        return [ui / su for ui in u]

    def step_towards(self, v: list[float]) -> tuple[float, int]:
        """Move ``w`` towards ``v`` by the largest step ``theta <= 1`` that stays in the simplex
        (until the first weight hits zero); return ``theta`` and the index that hit zero (-1)."""
        theta, imin = 1.0, -1
        for i, (wi, vi) in enumerate(zip(self.w, v, strict=True)):
            if vi <= _TOL_WEIGHT:
                diff = wi - vi
                t = wi / diff if diff > 0.0 else 0.0
                if t < theta:
                    theta, imin = t, i
        self.w = [wi + theta * (vi - wi) for wi, vi in zip(self.w, v, strict=True)]
        if imin >= 0:
            self.w[imin] = 0.0
        return theta, imin

    def drop_zero_weights(self) -> bool:
        """Remove the points of weight zero and refactor; False if the factor is not positive
        definite (cannot happen for an affinely independent set; handled to be safe)."""
        keep = [i for i, wi in enumerate(self.w) if wi > _TOL_WEIGHT]
        self.active = [self.active[i] for i in keep]
        sw = sum(self.w[i] for i in keep)
        self.w = [self.w[i] / sw for i in keep]
        mat = [[ra[b] + 1.0 for b in self.active] for ra in map(self.row, self.active)]
        factor = _cholesky(mat)
        if factor is None:
            return False
        self.lrows = factor
        n = len(factor)
        self.lcols = [[factor[i2][i] for i2 in range(i, n)] for i in range(n)]
        self.y = _forward_sub(factor, [1.0] * n)
        self.gact = self.gram[:, self.active]
        return True

    def minor_cycle(self) -> bool:
        """Minor steps after a point entered; False if the algorithm stalled (the new point
        cannot enter at this precision, or a refactorisation failed)."""
        appended = True
        while True:
            v = self.affine_minimizer()
            if min(v) > _TOL_WEIGHT:
                self.w = v
                return True
            theta, imin = self.step_towards(v)
            # the point that just entered leaves at once: it cannot enter at this precision
            stalled = appended and theta == 0.0 and imin == len(self.active) - 1
            if not self.drop_zero_weights() or stalled:
                return False
            appended = False

    def run(self) -> tuple[list[int], list[float]]:
        k = self.gram.shape[0]
        max_iter = 50 * k + 100
        for _ in range(max_iter):
            j = self.most_violating_point()
            if j is None or not self.add_point(j) or not self.minor_cycle():
                break
        else:
            warnings.warn(
                f"min_norm_element: Wolfe's algorithm stopped after {max_iter} iterations "
                "without meeting its optimality test; the result may be inaccurate",
                RuntimeWarning,
                stacklevel=4,
            )
        return self.active, self.w


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _check_samples(samples: object, name: str = "samples") -> Tensor:
    """Validate the points and return them as a detached ``(k, n)`` matrix (same dtype)."""
    if not isinstance(samples, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(samples).__name__}")
    if not samples.dtype.is_floating_point:
        raise TypeError(f"{name} must be a real floating-point tensor, got {samples.dtype}")
    if samples.dim() < 1 or samples.shape[0] < 1:
        raise ValueError(
            f"{name} must have a leading dimension k >= 1, got shape {tuple(samples.shape)}"
        )
    k = samples.shape[0]
    flat = samples.detach().reshape(k, -1)
    bad = count_nonfinite_rows(flat)
    if bad:
        raise ValueError(f"{name} has {bad} of {k} rows with NaN or inf entries")
    return flat


def count_nonfinite_rows(flat: Tensor) -> int:
    """Rows of ``flat`` with a NaN or inf; one cheap reduction when there are none."""
    if math.isfinite(float(flat.sum(dtype=torch.float64))):
        return 0  # a NaN or inf entry would make the sum NaN or inf
    return int((~torch.isfinite(flat).all(dim=1)).sum())


def pow2_exponent(flat: Tensor) -> int:
    """``e`` with ``2**e <= max|flat| < 2**(e + 1)`` (0 for an all-zero tensor): dividing by
    ``2**e`` is exact and brings the entries to at most 2 in magnitude, so that their products
    neither overflow nor underflow whatever the scale of the points."""
    top = float(flat.abs().max()) if flat.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 0
    return math.frexp(top)[1] - 1


def scale_pow2(t: Tensor, e: int) -> Tensor:
    """``t * 2**e``, exact (two power-of-two factors, each representable for ``|e| <= 2046``)."""
    e1 = e // 2
    return t * 2.0**e1 * 2.0 ** (e - e1)


def scaled_norm(t: Tensor) -> float:
    """``||t||_2`` in float64 whatever its scale: the entries are divided by a power of two
    first (exact), so that their squares neither underflow (entries of 1e-200: the plain norm is
    0) nor overflow (1e160: the plain norm is inf). NaN or inf entries give NaN or inf."""
    e = pow2_exponent(t)
    return math.ldexp(float(scale_pow2(t.to(torch.float64), -e).norm()), e)


def weights_from_gram(gram: Tensor) -> Tensor:
    """Convex weights of the min-norm point from the Gram matrix of the points (float64, CPU).

    Any positive rescaling of ``gram`` gives the same weights (it is normalised to max diagonal
    1 here). All-zero points give the first point weight 1.
    """
    gram = gram.to(torch.float64).cpu()
    k = gram.shape[0]
    diag = gram.diagonal().tolist()
    scale = max(diag)
    weights = [0.0] * k
    if not scale > 0.0:
        weights[0] = 1.0
        return torch.tensor(weights, dtype=torch.float64)
    active, w = _Wolfe(gram / scale, diag.index(min(diag))).run()
    for j, wj in zip(active, w, strict=True):
        weights[j] = wj
    return torch.tensor(weights, dtype=torch.float64)


def min_norm_of_rows(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Min-norm point of the hull of the rows of ``flat`` and its convex weights, in float64
    (``flat`` unchecked: :func:`min_norm_element` validates first).

    The rows are rescaled by a power of two (exact) BEFORE the Gram matrix is formed, so that the
    result does not depend on the scale of the points (no overflow above ~1e154, no underflow
    below ~1e-154)."""
    k = flat.shape[0]
    if k == 1 or bool((flat == flat[0]).all()):  # a smooth point: all gradients equal
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=flat.device)
        return flat[0].to(torch.float64), weights
    p64 = scale_pow2(flat.to(torch.float64), -pow2_exponent(flat))
    weights = weights_from_gram(p64 @ p64.T).to(flat.device)
    return weights @ flat.to(torch.float64), weights


def min_norm_element(samples: Tensor) -> tuple[Tensor, Tensor]:
    r"""The minimum-norm point of the convex hull of ``k`` points, and its convex weights.

    Solves :math:`\min_{w \in \Delta_k} \|\sum_i w_i s_i\|_2` with Wolfe's exact active-set
    algorithm, in float64 whatever the input dtype. It terminates after finitely many steps in
    exact arithmetic; in float64 the optimality test
    :math:`\langle g, s_j\rangle \ge \|g\|^2` holds to ``1e-12 * max_j ||s_j||^2``. The points are
    rescaled by a power of two before their Gram matrix is formed, so the answer scales with the
    points (tested from ``1e-200`` to ``1e200``).

    Accuracy: the point agrees with an independent exact solver to ``1e-10 * max|s|``. The one
    hard case is a cluster of near-duplicates of diameter ``δ`` with
    ``1e-10 ≲ δ / max|s| ≲ 1e-7``: float64 inner products resolve the geometry inside the cluster
    only to ``eps / δ²`` relative, so the point is exact up to about ``δ`` (gradient sampling with
    a float64 default radius produces such clusters; there this error is below the ``O(radius)``
    bias of the estimate itself).

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

    Raises:
        TypeError: ``samples`` is not a real floating-point tensor.
        ValueError: ``samples`` has no rows, or rows with NaN or inf.

    Example:

        >>> import torch
        >>> from torch_momentum.clarke import min_norm_element
        >>> point, weights = min_norm_element(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        >>> [round(v, 6) + 0.0 for v in point.tolist()], [round(v, 6) for v in weights.tolist()]
        ([1.0, 0.0], [0.5, 0.5])

    """
    flat = _check_samples(samples)
    point, weights = min_norm_of_rows(flat)
    return point.to(samples.dtype).reshape(samples.shape[1:]), weights.to(samples.dtype)
