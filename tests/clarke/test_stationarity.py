"""Tests for stationarity_profile: exact Goldstein profiles, the chunked memory modes, errors.

Float64 throughout; every tolerance says where it comes from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from torch_momentum import StationarityProfile, stationarity_profile

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_l1_norm_near_a_kink_exact_profile():
    # f = |x1| + |x2| at (0.05, 0): within 0.01 only x1 > 0 is sampled, x2 takes both signs:
    # the hull is the segment {1} x [-1, 1], min-norm (1, 0), eps_hat = 1 exactly (2x2 solve on
    # +-1 entries; the tolerance covers a few ulps). Within 0.1 all four sign patterns occur:
    # 0 is in the hull.
    res = stationarity_profile(
        lambda z: z.abs().sum(), t64(0.05, 0.0), [0.01, 0.1], generator=gen(0)
    )
    assert isinstance(res, StationarityProfile)
    assert res.radii == (0.01, 0.1) and res.num_samples == 64
    assert res.eps_hat[0] == pytest.approx(1.0, abs=1e-14)
    assert res.eps_hat[1] <= 1e-14
    assert res.active == (2, res.active[1]) and 2 <= res.active[1] <= 4  # opposite corners: 2
    assert res.grad_norm == 1.0  # autograd at x: sign(0) = 0, gradient (1, 0)


def test_smooth_quadratic_tends_to_the_gradient_norm_and_is_bounded_below():
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=F64)
    x = t64(1.0, -2.0, 0.5)

    def f(z):
        return 0.5 * z @ a @ z

    radii = [1e-8, 1e-5, 1e-2]
    res = stationarity_profile(f, x, radii, generator=gen(1))
    g = (a @ x).norm().item()
    assert res.grad_norm == pytest.approx(g, rel=1e-15)  # one matrix-vector product
    lip = torch.linalg.matrix_norm(a, ord=2).item()
    for delta, e in zip(radii, res.eps_hat, strict=True):
        # Samples are A (x + p) with |p| <= delta: eps_hat is within ||A|| delta of ||A x||
        # (plus float64 rounding of the solve, 1e-13 relative here).
        assert abs(e - g) <= lip * delta + 1e-13 * g
    # Larger radii: for A = 2 I every sample is 2 (x + p), so eps_hat >= 2 (|x| - delta), the
    # distance from 0 to the image of the ball, and <= 2 |x| (the hull is inside that ball).
    two = 2 * torch.eye(3, dtype=F64)
    wide = stationarity_profile(lambda z: z @ two @ z / 2, x, [0.5, 1.0, 2.0], generator=gen(2))
    for delta, e in zip(wide.radii, wide.eps_hat, strict=True):
        assert 2 * (x.norm().item() - delta) - 1e-12 <= e <= 2 * x.norm().item()
    # ... and strictly decreases with delta here (the shared directions shrink together).
    assert wide.eps_hat[0] > wide.eps_hat[1] > wide.eps_hat[2]


def test_max_of_affine_pieces_known_goldstein_sets():
    # f = max(x1 + x2, -x1 + x2, -x2) at (0.5, 1): piece 1 is active at x; piece 2 (x1 <= 0) is
    # 0.5 away; piece 3 (x2 <= -|x1| / 2) is sqrt(1.25) = 1.118 away.
    def f(z):
        return torch.stack((z[0] + z[1], -z[0] + z[1], -z[1])).max()

    res = stationarity_profile(f, t64(0.5, 1.0), [0.25, 1.0, 3.0], generator=gen(3))
    # delta = 0.25: {(1, 1)}, eps = sqrt 2. delta = 1: conv{(1, 1), (-1, 1)}, min-norm (0, 1).
    # delta = 3: conv{(1, 1), (-1, 1), (0, -1)} contains 0. Each region covers >= 19% of its
    # ball, so 64 samples miss one with probability < 1e-5 (and the seed is fixed). The solves
    # are 2x2 / 3x3 on small integers: exact to a few ulps.
    assert res.eps_hat[0] == pytest.approx(math.sqrt(2), abs=1e-14)
    assert res.eps_hat[1] == pytest.approx(1.0, abs=1e-14)
    assert res.eps_hat[2] <= 1e-14
    assert res.active == (1, 2, 3)
    assert res.grad_norm == pytest.approx(math.sqrt(2), abs=1e-15)


def _mlp_problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 12),
        torch.nn.ReLU(),
        torch.nn.Linear(12, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 1),
    ).double()
    data = torch.randn(40, 5, generator=gen(4), dtype=F64)
    target = torch.randn(40, 1, generator=gen(5), dtype=F64)

    def f(p):
        return (functional_call(net, p, (data,)) - target).abs().mean()  # kinks in loss and net

    return f, {n: p.detach() for n, p in net.named_parameters()}


@pytest.mark.parametrize(("memory", "chunk"), [("host", 5), ("recompute", 7)])
def test_chunked_modes_equal_the_in_memory_mode(memory, chunk):
    f, params = _mlp_problem()
    radii = [1e-3, 1e-2, 1e-1]
    ref = stationarity_profile(f, params, radii, num_samples=23, generator=gen(6))
    got = stationarity_profile(
        f, params, radii, num_samples=23, generator=gen(6), memory=memory, chunk_size=chunk
    )
    assert got.active == ref.active and got.grad_norm == ref.grad_norm
    # The same samples (the same seeds, the same vmapped batches up to their size); only the
    # order of the float64 Gram sums differs (blocks vs one product): 1e-12 holds with margin.
    for a, b in zip(got.eps_hat, ref.eps_hat, strict=True):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15)
    assert ref.eps_hat[0] > ref.eps_hat[2]  # the profile is not flat: a real comparison


def test_reproducible_and_vectorize_false_agrees():
    f, params = _mlp_problem()
    a = stationarity_profile(f, params, [1e-2, 1e-1], num_samples=16, generator=gen(7))
    b = stationarity_profile(f, params, [1e-2, 1e-1], num_samples=16, generator=gen(7))
    assert a == b
    loop = stationarity_profile(
        f, params, [1e-2, 1e-1], num_samples=16, generator=gen(7), vectorize=False
    )
    # the same gradients batched or one at a time: float64 rounding of the same formulas
    for x, y in zip(loop.eps_hat, a.eps_hat, strict=True):
        assert x == pytest.approx(y, rel=1e-12)


def test_reduce_grads_is_applied_to_every_gradient():
    calls = []

    def double(g):
        calls.append(tuple(g.shape))
        return 2 * g

    x = t64(0.05, 0.0)
    res = stationarity_profile(
        lambda z: z.abs().sum(),
        x,
        [0.01],
        generator=gen(0),
        reduce_grads=double,
        memory="host",
        chunk_size=16,
    )
    assert res.grad_norm == 2.0 and res.eps_hat[0] == pytest.approx(2.0, abs=1e-14)
    assert calls == [(2,)] + [(16, 2)] * 4


def test_graph_breaking_f_raises():
    with pytest.raises(ValueError, match="does not depend on x through autograd"):
        stationarity_profile(lambda z: z.detach().sum(), t64(1.0), [0.1])


def test_argument_errors_name_the_argument():
    x = t64(1.0, 2.0)

    def f(z):
        return z.sum()

    with pytest.raises(ValueError, match="radii is empty"):
        stationarity_profile(f, x, [])
    with pytest.raises(ValueError, match=r"radii\[1\]=-1"):
        stationarity_profile(f, x, [0.1, -1.0])
    with pytest.raises(TypeError, match="radii must be a sequence"):
        stationarity_profile(f, x, "0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory must be one of"):
        stationarity_profile(f, x, [0.1], memory="disk")
    with pytest.raises(ValueError, match="chunk_size=0"):
        stationarity_profile(f, x, [0.1], chunk_size=0)
    with pytest.raises(TypeError, match="reduce_grads"):
        stationarity_profile(f, x, [0.1], reduce_grads=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples=0"):
        stationarity_profile(f, x, [0.1], num_samples=0)
    # numpy scalars and a single number are accepted
    res = stationarity_profile(f, x, np.float32(0.5), num_samples=np.int64(4), generator=gen())
    assert res.radii == (0.5,) and res.num_samples == 4
    assert res.eps_hat[0] == pytest.approx(math.sqrt(2), rel=1e-15)  # smooth: the gradient (1, 1)
