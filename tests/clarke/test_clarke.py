"""Tests for clarke_subgradient (the min-norm solver itself: test_min_norm.py).

Exact answers are Clarke subdifferentials worked out by hand; every float tolerance carries a
comment saying where it comes from. Everything runs in float64 unless a test is about float32.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import functional_call

from tests.helpers.cuda import requires_cuda
from torch_momentum import ClarkeSubgradient, clarke_subgradient

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ------------------------------------------------------------------------------------------
# Kinks with exact answers
# ------------------------------------------------------------------------------------------


def test_abs_at_zero_samples_are_signs_and_min_norm_is_zero():
    res = clarke_subgradient(torch.abs, torch.zeros((), dtype=F64), generator=gen())
    assert isinstance(res, ClarkeSubgradient)
    assert res.samples.shape == (64,) and res.points.shape == (64,)
    assert res.min_norm.shape == ()
    # d|x|/dx = sign(x) exactly at every nonzero sample point.
    assert set(res.samples.tolist()) == {-1.0, 1.0}
    assert torch.equal(res.samples, torch.sign(res.points))
    # 0 = (1 + (-1)) / 2 is computed from two exactly representable numbers: exact.
    assert res.min_norm.item() == 0.0
    assert res.weights.sum().item() == pytest.approx(1.0, abs=1e-15)  # rounding of a sum of k
    assert bool((res.weights >= 0).all())


def test_relu_at_zero_hull_is_unit_interval():
    res = clarke_subgradient(torch.relu, torch.zeros((), dtype=F64), generator=gen(1))
    # Both sides are sampled, so the hull of the samples is conv{0, 1} = [0, 1].
    assert set(res.samples.tolist()) == {0.0, 1.0}
    assert res.samples.min().item() == 0.0 and res.samples.max().item() == 1.0
    assert res.min_norm.item() == 0.0  # 0 is a sample: exact


def test_relu_minus_relu_of_minus_is_identity_where_autograd_says_zero():
    def f(z):
        return torch.relu(z) - torch.relu(-z)  # = z for every z

    x = torch.zeros((), dtype=F64, requires_grad=True)
    (plain,) = torch.autograd.grad(f(x), x)
    assert plain.item() == 0.0  # autograd's relu'(0) = 0 convention: not a subgradient
    res = clarke_subgradient(f, x.detach(), generator=gen(2))
    assert torch.equal(res.samples, torch.ones(64, dtype=F64))
    assert res.min_norm.item() == 1.0  # every sample is exactly 1


def test_max_at_tie():
    res = clarke_subgradient(torch.max, t64(1.0, 1.0), generator=gen(3))
    rows = {tuple(s) for s in res.samples.tolist()}
    assert rows == {(1.0, 0.0), (0.0, 1.0)}
    # Wolfe's affine step solves a 2x2 system: error a few ulps of 1.
    torch.testing.assert_close(res.min_norm, t64(0.5, 0.5), rtol=0, atol=1e-14)


def test_euclidean_norm_at_origin_in_r5_is_stationary():
    res = clarke_subgradient(torch.linalg.vector_norm, torch.zeros(5, dtype=F64), generator=gen(4))
    norms = res.samples.norm(dim=1)
    # Gradients x/|x| are unit vectors up to rounding of a 5-term norm.
    torch.testing.assert_close(norms, torch.ones(64, dtype=F64), rtol=0, atol=1e-15)
    # 64 directions surround 0 in R^5 except with probability ~1e-13 (Wendel); the solver
    # reaches 0 to its float64 accuracy (a few ulps times the unit sample norm).
    assert res.min_norm.norm().item() < 1e-13


def test_abs_difference_is_nonconvex_stationary():
    res = clarke_subgradient(
        lambda z: z[0].abs() - z[1].abs(), torch.zeros(2, dtype=F64), generator=gen(5)
    )
    assert {tuple(s) for s in res.samples.tolist()} == {(1, -1), (1, 1), (-1, -1), (-1, 1)}
    assert res.min_norm.abs().max().item() < 1e-15  # 0 = mean of the square's corners: ulps


def test_max_of_two_planes():
    def f(z):
        return torch.maximum(z[0] + z[1], -z[0] + z[1])

    res = clarke_subgradient(f, torch.zeros(2, dtype=F64), generator=gen(6))
    assert {tuple(s) for s in res.samples.tolist()} == {(1.0, 1.0), (-1.0, 1.0)}
    torch.testing.assert_close(res.min_norm, t64(0.0, 1.0), rtol=0, atol=1e-14)  # 2x2 solve


def test_inf_norm_with_two_active_coordinates():
    def f(z):
        return torch.linalg.vector_norm(z, ord=math.inf)

    res = clarke_subgradient(f, t64(1.0, -1.0, 0.5), generator=gen(7))
    assert {tuple(s) for s in res.samples.tolist()} == {(1.0, 0.0, 0.0), (0.0, -1.0, 0.0)}
    torch.testing.assert_close(res.min_norm, t64(0.5, -0.5, 0.0), rtol=0, atol=1e-14)  # 2x2


def test_lasso_at_zero():
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=F64)
    b = t64(1.0, -2.0, 0.5)

    def f(w):
        return 0.5 * (a @ w - b).pow(2).sum() + w.abs().sum()

    res = clarke_subgradient(f, torch.zeros(2, dtype=F64), generator=gen(8))
    # Clarke set at 0: -A^T b + [-1, 1]^2 = (4.75, -4.25) + [-1, 1]^2; nearest corner to 0:
    # (3.75, -3.25), the unique minimiser (the other corners are O(1) worse). Samples from that
    # corner's quadrant are (3.75, -3.25) + A^T A p with |p| <= radius, and min_norm lies in
    # their hull: off by at most ||A^T A||_2 * radius.
    bound = torch.linalg.matrix_norm(a.T @ a, ord=2).item() * res.radius
    err = (res.min_norm - t64(3.75, -3.25)).norm().item()
    assert err <= bound
    assert bound < 1e-6  # and the default radius makes that bias small (radius ~ 1.5e-8)


def test_goldstein_set_near_but_not_at_a_kink():
    # |x| at x0 > 0 is differentiable with gradient 1, but a ball of radius > x0 reaches over
    # the kink at 0: the estimate is of the Goldstein set conv{-1, 1}, whose min-norm is 0.
    x0 = torch.tensor(1e-6, dtype=F64)
    plain = torch.func.grad(torch.abs)(x0)
    assert plain.item() == 1.0
    wide = clarke_subgradient(torch.abs, x0, radius=2e-6, generator=gen(9))
    assert set(wide.samples.tolist()) == {-1.0, 1.0}
    assert wide.min_norm.item() == 0.0
    narrow = clarke_subgradient(torch.abs, x0, radius=5e-7, generator=gen(9))
    assert set(narrow.samples.tolist()) == {1.0}
    assert narrow.min_norm.item() == 1.0


# ------------------------------------------------------------------------------------------
# Homogeneity lemma on a bias-free ReLU network
# ------------------------------------------------------------------------------------------


def _relu_net_at_a_kink():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(4, 4, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(4, 1, bias=False),
    ).double()
    data = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [2.0, 0.0, 1.0]], dtype=F64)
    with torch.no_grad():
        # Dyadic weights, so that pre-activations are computed exactly; unit 0 of layer 1
        # has pre-activation exactly 0 on the first input: theta sits on a kink.
        net[0].weight.copy_(
            torch.tensor([[2.0, -1.0, 0.0], [1.0, 0.5, 0.25], [-0.5, 1.0, 1.0], [0.25, -0.75, 0.5]])
        )
        net[2].weight.copy_(
            torch.tensor(
                [
                    [1.0, -0.5, 0.75, 0.5],
                    [0.5, 1.0, -0.25, 1.0],
                    [-1.0, 0.5, 0.5, 0.25],
                    [0.75, 0.25, 1.0, -0.5],
                ]
            )
        )
        net[4].weight.copy_(torch.tensor([[1.0, -1.5, 0.5, 2.0]]))
    assert (data[0] @ net[0].weight[0]).item() == 0.0

    def F(params):
        return functional_call(net, params, (data,)).sum()

    return net, F


def test_homogeneity_lemma_on_bias_free_relu_net():
    net, F = _relu_net_at_a_kink()
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    L = 3  # three layers, each 1-homogeneous: F(a theta) = a^3 F(theta) for a >= 0
    res = clarke_subgradient(F, dict(net.named_parameters()), generator=gen(10))
    assert set(res.samples) == set(theta) and set(res.min_norm) == set(theta)
    k = res.weights.shape[0]
    for i in range(k):
        point = {n: res.points[n][i] for n in theta}
        s = {n: res.samples[n][i] for n in theta}
        inner = sum((s[n] * point[n]).sum() for n in theta)
        value = F(point)
        scale = sum((s[n] * point[n]).abs().sum() for n in theta).item()
        # Euler's identity at a point of differentiability; both sides are sums of ~60
        # products, so they agree to a few hundred ulps of the sum of absolute terms.
        assert abs(inner.item() - L * value.item()) <= 256 * EPS64 * scale
    # At the kink itself the lemma holds for the Clarke subgradient: each sample is off by
    # <s_i, theta - theta_i> + L (F(theta_i) - F(theta)), i.e. at most (1 + L) Lip * radius,
    # with Lip estimated by the largest sample norm (factor 2 of slack for the estimate).
    inner = sum((res.min_norm[n] * theta[n]).sum() for n in theta).item()
    lip = max(
        math.sqrt(sum(res.samples[n][i].pow(2).sum().item() for n in theta)) for i in range(k)
    )
    assert abs(inner - L * F(theta).item()) <= 2 * (1 + L) * lip * res.radius
    # The net really has a kink there: the samples are not all equal.
    assert any(res.samples[n].std(dim=0).max().item() > 0.1 for n in theta)
    # x was not modified and no gradient was accumulated on it.
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), theta[n]) and p.grad is None


# ------------------------------------------------------------------------------------------
# Sampling, structure, reproducibility
# ------------------------------------------------------------------------------------------


def test_points_are_uniform_in_the_ball():
    x = t64(1.0, -2.0, 0.5)
    res = clarke_subgradient(lambda z: z.sum(), x, radius=0.5, num_samples=4000, generator=gen(11))
    r = (res.points - x).norm(dim=1) / 0.5
    assert r.max().item() <= 1.0 + 1e-12  # inside the ball, up to rounding of x + offset
    # Uniform in a ball in R^3: P(|p - x| <= radius / 2) = 1/8; 4000 draws, 5 sigma.
    frac = (r <= 0.5).double().mean().item()
    assert abs(frac - 1 / 8) <= 5 * math.sqrt(1 / 8 * 7 / 8 / 4000)
    # E|p - x| / radius = d / (d + 1) = 3/4; standard deviation of r is ~0.19, 5 sigma.
    assert abs(r.mean().item() - 0.75) <= 5 * 0.2 / math.sqrt(4000)
    # Directions are isotropic: the mean offset is 0 (per coordinate sd ~0.29 * radius).
    assert (res.points - x).mean(0).abs().max().item() <= 5 * 0.5 * 0.3 / math.sqrt(4000)


def test_generator_reproduces_and_x_is_untouched():
    x = t64(0.0, 1.0)
    x_before = x.clone()

    def f(z):
        return z.abs().sum()

    a = clarke_subgradient(f, x, generator=gen(12))
    b = clarke_subgradient(f, x, generator=gen(12))
    c = clarke_subgradient(f, x, generator=gen(13))
    assert torch.equal(a.points, b.points) and torch.equal(a.samples, b.samples)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.min_norm, b.min_norm)
    assert not torch.equal(a.points, c.points)
    assert torch.equal(x, x_before)
    assert not a.min_norm.requires_grad and not a.samples.requires_grad


def test_default_radius_moves_points_by_many_ulps():
    for dtype in (torch.float32, F64):
        x = torch.full((10,), 3.0, dtype=dtype)
        res = clarke_subgradient(lambda z: z.sum(), x, generator=gen(14))
        eps = torch.finfo(dtype).eps
        expected = math.sqrt(eps) * max(1.0, x.double().norm().item())
        assert res.radius == pytest.approx(expected, rel=1e-12)  # the documented formula
        ulps = (res.points - x).abs() / (eps * 3.0)
        assert ulps.median().item() > 100  # typical move is 1/sqrt(eps)/sqrt(d) ulps
        assert res.points.dtype == dtype and res.samples.dtype == dtype


def test_default_num_samples():
    for d, k in ((1, 64), (40, 82), (1000, 256)):
        res = clarke_subgradient(lambda z: z.sum(), torch.zeros(d, dtype=F64), generator=gen())
        assert res.weights.shape == (k,)  # 2 (d + 1) clamped to [64, 256]
        # A smooth point: k equal gradients, uniform weights, and min_norm is the gradient
        # itself, exactly (not a float64 sum of k copies times 1/k).
        assert torch.equal(res.min_norm, torch.ones(d, dtype=F64))


def test_one_element_output_and_autograd_inside_f():
    a = t64(1.0, -2.0)

    def f(z):  # shape (1, 1), like a network's output on one input
        return torch.relu(z @ a).reshape(1, 1)

    res = clarke_subgradient(f, t64(2.0, 1.0), generator=gen(24))  # on the kink z @ a = 0
    torch.testing.assert_close(res.min_norm, t64(0.0, 0.0), rtol=0, atol=0)  # 0 is a sample

    def g(z):  # f may itself use autograd: |grad h| with h(u) = sum(u^3 / 3 - u)
        return torch.func.grad(lambda u: (u**3 / 3 - u).sum())(z).abs().sum()  # sum |u_i^2 - 1|

    res = clarke_subgradient(g, t64(1.0, 0.0), generator=gen(25))
    # Samples are (+-2 z_0, -2 z_1) at points within the radius (~2e-8) of (1, 0): the hull
    # contains (0, -2 z_1) with |z_1| <= radius, so min_norm is 0 up to 2 * radius.
    assert res.min_norm.abs().max().item() <= 2 * res.radius
    assert set(torch.sign(res.samples[:, 0]).tolist()) == {-1.0, 1.0}  # both sides of the kink


def test_float32_works_and_tiny_radius_warns():
    def f(z):
        return torch.relu(z) - torch.relu(-z)

    x = torch.ones((), dtype=torch.float32)
    res = clarke_subgradient(f, x - 1.0, generator=gen(15))
    assert res.min_norm.item() == 1.0 and res.min_norm.dtype == torch.float32
    # A radius of a fraction of an ulp of |x| = 1 rounds every point back onto x.
    with pytest.warns(UserWarning, match="ulps"):
        tiny = clarke_subgradient(torch.abs, x, radius=1e-9, generator=gen(15))
    assert torch.equal(tiny.points, torch.ones(64))


def test_dict_in_dict_out_matches_flat_tensor():
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5, bias=True), torch.nn.ReLU(), torch.nn.Linear(5, 2)
    ).double()
    data = torch.randn(8, 3, dtype=F64, generator=gen(16))
    params = dict(net.named_parameters())

    def F(p):
        return functional_call(net, p, (data,)).pow(2).mean()

    res = clarke_subgradient(F, params, generator=gen(17))
    assert list(res.samples) == list(params) == list(res.points) == list(res.min_norm)
    for n, p in params.items():
        # d = 32 entries: default k = 2 (d + 1) = 66.
        assert res.samples[n].shape == (66, *p.shape) and res.min_norm[n].shape == p.shape
    # The same computation on the flattened vector gives the same numbers.
    shapes = [p.shape for p in params.values()]

    def F_flat(v):
        parts = v.split([math.prod(s) for s in shapes])
        return F({n: t.reshape(s) for n, t, s in zip(params, parts, shapes, strict=True)})

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    ref = clarke_subgradient(F_flat, flat, generator=gen(17))
    got = torch.cat([res.min_norm[n].reshape(-1) for n in params])
    torch.testing.assert_close(got, ref.min_norm, rtol=0, atol=1e-14)  # same ops, same order


@requires_cuda
def test_cuda_tensors_with_cpu_or_cuda_generator():
    def f(z):
        return torch.maximum(z[0] + z[1], -z[0] + z[1])

    x = torch.zeros(2, dtype=F64)
    cpu = clarke_subgradient(f, x, generator=gen(26))
    on_cpu_gen = clarke_subgradient(f, x.cuda(), generator=gen(26))
    assert on_cpu_gen.min_norm.device.type == "cuda" and on_cpu_gen.weights.device.type == "cuda"
    # Same points (drawn on the CPU generator, then moved); the exact answer (0, 1) up to the
    # few ulps of a 2x2 solve.
    assert torch.equal(on_cpu_gen.points.cpu(), cpu.points)
    torch.testing.assert_close(on_cpu_gen.min_norm.cpu(), t64(0.0, 1.0), rtol=0, atol=1e-14)
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    on_cuda_gen = clarke_subgradient(f, x.cuda(), generator=cuda_gen)
    torch.testing.assert_close(on_cuda_gen.min_norm.cpu(), t64(0.0, 1.0), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------
# Vectorisation and the fallback loop
# ------------------------------------------------------------------------------------------


def _loop_without_warnings(f, x, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vectorize=False: no fallback warning
        return clarke_subgradient(f, x, generator=gen(seed), vectorize=False)


def test_vmap_and_loop_agree():
    def f(z):
        return torch.maximum(z[0] + z[1], -z[0] + z[1]) + z.pow(2).sum()

    x = torch.zeros(2, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the vectorised path must not warn here
        fast = clarke_subgradient(f, x, generator=gen(18))
    loop = _loop_without_warnings(f, x, 18)
    # Same gradient formulas evaluated batched or one by one: equal up to an ulp of numbers <= 3.
    torch.testing.assert_close(fast.samples, loop.samples, rtol=0, atol=1e-15)
    torch.testing.assert_close(fast.min_norm, loop.min_norm, rtol=0, atol=1e-15)


def _item_f(z):
    scale = 2.0 if z.sum().item() > -1e9 else 0.0  # .item(): not vmappable
    return scale * z.abs().sum()


def _inplace_f(z):
    buf = torch.zeros(3, dtype=z.dtype)
    buf.add_(z)  # in-place update of an unbatched tensor with a batched one
    return buf.abs().sum()


@pytest.mark.parametrize(("f", "why"), [(_item_f, "item()"), (_inplace_f, "shape")])
def test_fallback_warns_once_and_says_why(f, why):
    x = t64(0.0, 1.0, -1.0)
    with pytest.warns(UserWarning) as record:
        res = clarke_subgradient(f, x, generator=gen(19))
    msgs = [str(r.message) for r in record]
    assert len(msgs) == 1, msgs
    assert "cannot be vmapped" in msgs[0] and why in msgs[0]
    assert "vectorize=False" in msgs[0]
    loop = _loop_without_warnings(f, x, 19)
    assert torch.equal(res.samples, loop.samples)
    scale = 2.0 if f is _item_f else 1.0
    # |z_1|, |z_2| are smooth near +-1; z_0 = 0 is a kink: min-norm (0, s, -s), from a 2x2 solve
    # on numbers of size s: a few ulps.
    torch.testing.assert_close(res.min_norm, t64(0.0, scale, -scale), rtol=0, atol=1e-14)


def test_batchnorm_in_train_mode_falls_back():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU()
    ).double()
    net.train()
    data = torch.randn(6, 2, dtype=F64, generator=gen(20))

    def F(p):
        return functional_call(net, p, (data,)).sum()

    with pytest.warns(UserWarning, match="cannot be vmapped") as record:
        res = clarke_subgradient(F, dict(net.named_parameters()), num_samples=8, generator=gen(21))
    assert len(record) == 1
    assert res.samples["0.weight"].shape == (8, 3, 2)


def test_vmap_retries_in_chunks_when_out_of_memory(monkeypatch):
    real_vmap = torch.func.vmap
    chunk_sizes = []

    def fake_vmap(fn, *args, chunk_size=None, **kwargs):
        chunk_sizes.append(chunk_size)
        if chunk_size is None or chunk_size > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_vmap(fn, *args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(torch.func, "vmap", fake_vmap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # running out of memory is not a reason to warn
        res = clarke_subgradient(
            lambda z: z.abs().sum(), torch.zeros(3, dtype=F64), generator=gen(22)
        )
    assert chunk_sizes == [None, 32, 16]
    assert res.min_norm.abs().max().item() == 0.0


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_errors_name_the_argument_and_value():
    x = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        clarke_subgradient(lambda z: z * 2, x)
    with pytest.raises(TypeError, match=r"real scalar.*float"):
        clarke_subgradient(lambda z: 1.0, x)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match=r"real scalar.*complex128"):
        clarke_subgradient(lambda z: z.sum().to(torch.complex128), x)
    with pytest.raises(TypeError, match="int64"):
        clarke_subgradient(torch.sum, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="complex64"):
        clarke_subgradient(lambda z: z.abs().sum(), torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"x\['b'\].*int32"):
        clarke_subgradient(torch.sum, {"a": x, "b": torch.zeros(2, dtype=torch.int32)})
    with pytest.raises(TypeError, match="x must be a Tensor or a dict"):
        clarke_subgradient(torch.sum, [0.0, 1.0])  # type: ignore[arg-type]
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"radius={bad}"):
            clarke_subgradient(torch.sum, x, radius=bad)
    with pytest.raises(ValueError, match="num_samples=0"):
        clarke_subgradient(torch.sum, x, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        clarke_subgradient(torch.sum, x, num_samples=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator"):
        clarke_subgradient(torch.sum, x, generator=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="f must be callable"):
        clarke_subgradient(None, x)  # type: ignore[arg-type]


def test_nonfinite_gradients_are_counted():
    x = torch.zeros((), dtype=F64)
    probe = clarke_subgradient(lambda z: z, x, generator=gen(23))
    negative = int((probe.points < 0).sum())
    assert 0 < negative < 64
    # sqrt has a NaN gradient at the negative sample points (and is NaN there).
    with pytest.raises(RuntimeError, match=f"{negative} of 64 sampled gradients"):
        clarke_subgradient(torch.sqrt, x, generator=gen(23))
    with pytest.raises(RuntimeError, match="64 of 64"):
        clarke_subgradient(lambda z: z * math.inf, x, generator=gen(23))


# ------------------------------------------------------------------------------------------
# Regression tests: false certificates, numpy scalars
# ------------------------------------------------------------------------------------------

_W = torch.nn.Parameter(torch.ones(2, dtype=F64))  # requires grad, but f below ignores z


@pytest.mark.parametrize(
    "f",
    [
        lambda z: torch.tensor(max(z.tolist()), dtype=F64),  # leaves autograd via Python floats
        lambda z: z.detach().abs().sum(),
        lambda z: (_W * 0 + z.detach()).sum(),  # has a graph, but not to z
    ],
    ids=["tolist", "detach", "graph-to-another-leaf"],
)
@pytest.mark.parametrize("vectorize", [True, False])
def test_graph_breaking_f_raises_instead_of_a_false_certificate(f, vectorize):
    # Before the fix: min_norm == 0 (every sampled "gradient" was 0), a false certificate.
    x = t64(0.5, -1.0)
    with pytest.raises(ValueError, match="does not depend on x through autograd"):
        clarke_subgradient(f, x, generator=gen(30), vectorize=vectorize)
    with pytest.raises(ValueError, match="does not depend on x through autograd"):
        clarke_subgradient(lambda p: f(p["a"]), {"a": x}, generator=gen(30), vectorize=vectorize)


def test_partially_unused_dict_entries_are_fine():
    x = {"used": t64(1.0, -2.0), "unused": t64(3.0)}
    res = clarke_subgradient(lambda p: p["used"].abs().sum(), x, generator=gen(31))
    assert torch.equal(res.min_norm["unused"], t64(0.0))  # really zero gradient there
    assert torch.equal(res.min_norm["used"], t64(1.0, -1.0))


def test_numpy_scalars_for_radius_and_num_samples():
    np = pytest.importorskip("numpy")
    x = t64(0.0, 1.0)

    def f(z):
        return z.abs().sum()

    ref = clarke_subgradient(f, x, radius=0.25, num_samples=8, generator=gen(34))
    for radius, k in ((np.float64(0.25), np.int64(8)), (np.float32(0.25), np.int32(8))):
        got = clarke_subgradient(f, x, radius=radius, num_samples=k, generator=gen(34))
        assert got.radius == 0.25 and isinstance(got.radius, float)  # 0.25 exact in float32
        assert torch.equal(got.points, ref.points) and torch.equal(got.min_norm, ref.min_norm)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        clarke_subgradient(f, x, num_samples=np.float64(8.0))
    with pytest.raises(ValueError, match=r"radius=-1\.0"):
        clarke_subgradient(f, x, radius=np.float64(-1.0))
