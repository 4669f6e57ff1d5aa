"""Certificates take numpy arrays and numpy 0-d arrays where they take sequences and numbers,
and give the right answer at any float64 scale of the gradients (no false 'exactly stationary'
at 1e-200, no false 'not finite' at 1e160)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torch_momentum import clarke_subgradient, stationarity_profile
from torch_momentum.minnorm import scaled_norm


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


X = torch.tensor([0.05, 0.0, 0.3], dtype=torch.float64)


def kinked(scale: float):
    return lambda z: scale * (z.abs().sum() + (z**2).sum())


def test_numpy_radii_and_numbers_are_accepted():
    f = kinked(1.0)
    ref = stationarity_profile(f, X, [1e-3, 1e-2, 1e-1], num_samples=16, generator=gen())
    for radii in (np.logspace(-3, -1, 3), np.array([[1e-3, 1e-2, 1e-1]])):
        got = stationarity_profile(f, X, radii, num_samples=np.array(16), generator=gen())
        assert got.radii == pytest.approx(ref.radii, rel=1e-15)
        assert got.eps_hat == pytest.approx(ref.eps_hat, rel=1e-12)  # the same samples
    one = stationarity_profile(f, X, np.array(0.1), num_samples=16, generator=gen())
    assert one.radii == (0.1,)
    a = clarke_subgradient(f, X, radius=np.array(0.1), num_samples=16, generator=gen())
    b = clarke_subgradient(f, X, radius=0.1, num_samples=16, generator=gen())
    assert a.radius == 0.1 and torch.equal(a.min_norm, b.min_norm)


def test_numpy_arrays_of_the_wrong_kind_are_refused_by_name():
    f = kinked(1.0)
    with pytest.raises(ValueError, match="radii is empty"):
        stationarity_profile(f, X, np.array([]))
    with pytest.raises(ValueError, match=r"radii\[1\]=-1"):
        stationarity_profile(f, X, np.array([0.1, -1.0]))
    with pytest.raises(TypeError, match=r"radii\[0\] must be a positive number, got str"):
        stationarity_profile(f, X, np.array(["a"]))
    with pytest.raises(TypeError, match="radius must be a positive number, got complex"):
        clarke_subgradient(f, X, radius=np.array(0.1 + 1j))
    with pytest.raises(TypeError, match="radius must be a positive number, got ndarray"):
        clarke_subgradient(f, X, radius=np.array([0.1, 0.2]))


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160, 1e300])
def test_profile_scales_with_the_gradients(scale):
    """eps_hat and grad_norm are homogeneous of degree 1 in f: at any scale they equal the
    profile of the unscaled f times the scale (the same samples, exact power-of-two rescalings:
    only the final multiplication rounds, 1e-14 relative holds with a wide margin)."""
    radii = [1e-2, 1e-1]
    ref = stationarity_profile(kinked(1.0), X, radii, num_samples=16, generator=gen())
    got = stationarity_profile(kinked(scale), X, radii, num_samples=16, generator=gen())
    assert got.grad_norm == pytest.approx(scale * ref.grad_norm, rel=1e-14)
    for e, r in zip(got.eps_hat, ref.eps_hat, strict=True):
        assert e > 0.0 and math.isfinite(e)
        assert e == pytest.approx(scale * r, rel=1e-12)
    assert got.active == ref.active


def test_nonfinite_gradient_at_x_is_refused_before_any_sampling():
    calls = []

    def f(z):
        calls.append(1)
        return torch.where(z[0] == 0.05, torch.tensor(math.inf, dtype=z.dtype), 1.0) * z.sum()

    with pytest.raises(RuntimeError, match="gradient at x is not finite"):
        stationarity_profile(f, X, [0.1], num_samples=16, generator=gen(), vectorize=False)
    assert len(calls) == 1  # only the evaluation at x


@pytest.mark.parametrize("scale", [1e-200, 1e160])
def test_clarke_subgradient_at_extreme_scales(scale):
    ref = clarke_subgradient(kinked(1.0), X, radius=0.01, num_samples=16, generator=gen())
    got = clarke_subgradient(kinked(scale), X, radius=0.01, num_samples=16, generator=gen())
    # the same samples and weights; the weighted sums round differently once the samples are
    # scaled (a coordinate near a kink cancels to 5e-4 of the largest): 1e-12 of the largest
    expected = scale * ref.min_norm
    atol = 1e-12 * float(expected.abs().max())
    torch.testing.assert_close(got.min_norm, expected, rtol=0.0, atol=atol)


def test_default_radius_of_a_huge_x_is_finite():
    """The default radius sqrt(eps) * ||x||: ||x|| of entries 1e160 used to overflow to inf."""
    x = torch.full((4,), 1e160, dtype=torch.float64)
    res = clarke_subgradient(lambda z: (z / 1e160).abs().sum(), x, num_samples=8, generator=gen())
    assert res.radius == pytest.approx(math.sqrt(2.0**-52) * 2e160, rel=1e-12)
    assert torch.isfinite(res.min_norm).all()


@pytest.mark.parametrize("scale", [0.0, 1e-300, 1e-200, 1.0, 1e200, 1e300])
def test_scaled_norm(scale):
    t = torch.tensor([3.0, 4.0], dtype=torch.float64) * scale
    assert scaled_norm(t) == pytest.approx(5.0 * scale, rel=1e-15)
    assert math.isnan(scaled_norm(torch.tensor([1.0, math.nan])))
