"""Tests for min_norm_element: the minimum-norm point of the convex hull of k points.

Checked against independent solvers (scipy's SLSQP and Lawson-Hanson NNLS, test-only), on exact
cases and at extreme scales; every float tolerance carries a comment saying where it comes from.
"""

from __future__ import annotations

import math

import pytest
import torch

from torch_momentum.clarke import min_norm_element

np = pytest.importorskip("numpy")
scipy_optimize = pytest.importorskip("scipy.optimize")

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------
# Against independent solvers (scipy SLSQP and NNLS, test-only dependency)
# ------------------------------------------------------------------------------------------


def _slsqp(points):
    """Min-norm point of conv(points) by SLSQP on the weights (a general NLP solver)."""
    scale = np.abs(points).max()
    points = points / scale  # SLSQP's tolerances are absolute: solve at unit scale
    k = points.shape[0]
    gram = points @ points.T
    res = scipy_optimize.minimize(
        lambda w: w @ gram @ w,
        np.full(k, 1.0 / k),
        jac=lambda w: 2.0 * gram @ w,
        bounds=[(0.0, None)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    w = np.clip(res.x, 0.0, None)
    return (w / w.sum()) @ points * scale


def _nnls(points):
    """Exact min-norm point by Lawson-Hanson NNLS (scipy), via least-distance duality.

    u = argmin_{u >= 0} ||P^T u||^2 + (1^T u - 1)^2 satisfies <p_j, P^T u> + (1^T u - 1) >= 0
    with equality where u_j > 0, so x = P^T u / 1^T u obeys <p_j, x> >= ||x||^2 for all j with
    equality on the support: the optimality conditions of min ||x|| over conv(P).
    """
    scale = np.abs(points).max()
    q = points / scale
    e = np.vstack([q.T, np.ones(len(q))])
    rhs = np.zeros(len(e))
    rhs[-1] = 1.0
    u, _ = scipy_optimize.nnls(e, rhs, maxiter=50 * len(q))
    return q.T @ u / u.sum() * scale


def _instances():
    rng = np.random.default_rng(0)
    cases = {
        "generic k<d": rng.standard_normal((6, 20)) + 0.5,
        "k>d outside": rng.standard_normal((40, 4)) + 1.5,
        "k>d origin inside": rng.standard_normal((40, 4)),
        "k=d+1 simplex around 0": np.vstack([np.eye(3), -np.ones((1, 3))]),
        "duplicates": np.repeat(rng.standard_normal((5, 3)) + 1.0, 4, axis=0),
        "collinear segment": np.outer(np.linspace(1.0, 3.0, 7), [1.0, -2.0, 0.5]),
        "segment through 0": np.outer(np.linspace(-1.0, 3.0, 9), [1.0, 2.0]),
        "square face (affinely dependent support)": np.array(
            [[1.0, a, b] for a in (-1.0, 0.5, 1.0) for b in (-1.0, 0.5, 1.0)]
            + [[3.0, 0.2, 0.1], [2.0, 1.5, -1.5]]
        ),
        # Wolfe reaches (1, 0, 0), optimal for the first two points, and must still see that the
        # third is 1e-8 inside the plane x1 = 1: the answer is (1, 0, 1e-8) to first order, so a
        # solver with a loose optimality tolerance fails the 1e-10 comparison.
        "barely violating point": np.array(
            [[1.0, -0.5, 0.0], [1.0, 0.5, 0.0], [1.0 - 1e-8, 0.0, 1.0]]
        ),
        "single point": rng.standard_normal((1, 5)),
        "tiny scale": 1e-9 * (rng.standard_normal((12, 3)) + 1.0),
        "large scale": 1e9 * (rng.standard_normal((12, 3)) + 1.0),
        "many in R^10": rng.standard_normal((64, 10)) + 0.3,
    }
    for i in range(6):  # random sizes with random offsets, origin in or out
        k, d = int(rng.integers(2, 40)), int(rng.integers(1, 12))
        cases[f"random {i} (k={k}, d={d})"] = rng.standard_normal((k, d)) + rng.normal(0, 1, d)
    return cases


@pytest.mark.parametrize("name", list(_instances()))
def test_min_norm_element_matches_slsqp(name):
    points = _instances()[name]
    scale = np.abs(points).max()
    point, weights = min_norm_element(torch.from_numpy(points))
    x = point.numpy()
    w = weights.numpy()
    # A convex combination that reproduces the point: both sides are float64 sums of k <= 64
    # terms, equal up to a few dozen ulps (1e-14 relative).
    assert w.min() >= 0.0 and abs(w.sum() - 1.0) <= 1e-14
    assert np.abs(w @ points - x).max() <= 1e-14 * scale
    # Optimality certificate: <x, p_j> >= ||x||^2 for all j, up to the solver's tolerance
    # (1e-12 of max ||p_j||^2) plus rounding of the inner products.
    assert (points @ x).min() >= x @ x - 2e-12 * (points**2).sum(1).max()
    # Never worse than SLSQP (whose own objective is accurate to about its ftol).
    approx = _slsqp(points)
    assert x @ x <= approx @ approx + 1e-12 * scale**2
    # The exact answer by an independent active-set method: agreement to 1e-10 relative.
    assert np.linalg.norm(x - _nnls(points)) <= 1e-10 * scale


@pytest.mark.parametrize("delta", [1e-5, 1e-8])
def test_min_norm_element_on_clusters_of_near_duplicates(delta):
    # Gradient sampling produces clusters: gradients of one smooth piece differ by O(radius).
    rng = np.random.default_rng(2)  # an instance where delta = 1e-8 does cost ~2e-9
    vertices = rng.standard_normal((3, 4)) + 1.0
    points = vertices[rng.integers(0, 3, 60)] + delta * rng.standard_normal((60, 4))
    scale = np.abs(points).max()
    x = min_norm_element(torch.from_numpy(points))[0].numpy()
    err = np.linalg.norm(x - _nnls(points)) / scale
    # Inside a cluster of diameter delta, float64 Gram entries resolve the geometry only to
    # eps / delta^2 relative: exact to 1e-10 for delta = 1e-5, to about delta for delta = 1e-8.
    assert err <= (1e-10 if delta > 1e-6 else 2 * delta)


def test_min_norm_element_origin_inside_is_zero():
    points = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0], [5.0, 5.0]], dtype=F64)
    point, weights = min_norm_element(points)
    assert point.abs().max().item() <= 1e-15  # 2x2 solve on unit-size data: ulps
    assert weights[3].item() == 0.0  # the far point is not needed


def test_min_norm_element_keeps_dtype_and_shape():
    samples = torch.randn(7, 2, 3) + 2.0
    point, weights = min_norm_element(samples)
    assert point.shape == (2, 3) and point.dtype == torch.float32
    assert weights.shape == (7,) and weights.dtype == torch.float32
    ref, _ = min_norm_element(samples.double())
    # float32 samples are solved in float64 (exactly the same problem), then rounded once.
    assert torch.equal(point, ref.float())


def test_min_norm_element_errors():
    with pytest.raises(TypeError, match="samples"):
        min_norm_element([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int64"):
        min_norm_element(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="k >= 1"):
        min_norm_element(torch.ones(0, 2))
    with pytest.raises(ValueError, match="1 of 3 rows"):
        min_norm_element(torch.tensor([[1.0], [math.nan], [2.0]]))


# ------------------------------------------------------------------------------------------
# Scale invariance (regression: the Gram matrix over/underflowed)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_min_norm_element_is_scale_invariant(scale):
    # Before the fix the Gram matrix over/underflowed above ~1e155 / below ~1e-155 and the
    # solver returned a vertex.
    base = torch.randn(20, 3, generator=gen(32), dtype=F64) + 1.0
    ref_point, ref_weights = min_norm_element(base)
    point, weights = min_norm_element(base * scale)
    # The scaled inputs differ from scale * base by one rounding (1.1e-16 relative); the solve is
    # well conditioned here (3 active points in R^3), so the answers agree to 1e-12 relative.
    torch.testing.assert_close(point / scale, ref_point, rtol=0, atol=1e-12)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-12)
    vertex_dist = (base - ref_point).norm(dim=1).min().item()  # not a vertex: an interior answer
    assert vertex_dist > 1e-3


def test_min_norm_element_large_scale_from_the_issue():
    points = (torch.randn(20, 3, generator=gen(33), dtype=F64) + 1) * 1e160
    point, weights = min_norm_element(points)
    assert torch.isfinite(point).all() and (weights > 0).sum().item() >= 2
    ref, _ = min_norm_element(points / 1e160)
    torch.testing.assert_close(point / 1e160, ref, rtol=0, atol=1e-12)  # as above
