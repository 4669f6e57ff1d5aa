"""By default the optimisers give what ``torch.optim.SGD``'s default gives on the same device and
dtype, bit for bit: on the CPU the built-in's default is its for-loop, in every dtype. The fused
kernel and the CPU foreach kernels round differently (FMA contraction; reduced-precision scalar
products) and stay available on request."""

from __future__ import annotations

import pytest
import torch

from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum import _kernels as K

CLASSES = [PolyakSGD, NesterovSGD]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CONFIGS = {
    "plain": {"lr": 0.05, "momentum": 0.9},
    "no-momentum": {"lr": 0.05, "momentum": 0.0},
    "weight-decay": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "maximize": {"lr": 0.05, "momentum": 0.9, "maximize": True},
    "tensor-lr": {"lr": torch.tensor(0.05), "momentum": 0.9},
    "tensor-lr-f64-decay": {
        "lr": torch.tensor(0.05, dtype=torch.float64),
        "momentum": 0.9,
        "weight_decay": 0.01,
    },
}
# Shapes: a matrix, a vector, a 0-dim tensor, and sizes that are not multiples of the vector
# width (so that the vectorised body and the scalar tail of each kernel are both exercised).
SHAPES = [(37, 19), (19,), (), (1000,), (8, 3, 3, 3), (4099,)]


def run(make, dtype: torch.dtype, steps: int = 10, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in SHAPES]
    opt = make(params)
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in params:  # a fresh gradient every step, depending on the parameter
            p.grad = torch.randn(p.shape, generator=g).to(device, dtype) + 0.1 * p.detach()
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_default_equals_builtin_default_bit_for_bit_on_cpu(cls, dtype, kw):
    nesterov = cls is NesterovSGD and kw["momentum"] != 0
    ref = run(lambda ps: torch.optim.SGD(ps, nesterov=nesterov, **kw), dtype)
    ours = run(lambda ps: cls(ps, **kw), dtype)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_foreach_equals_builtin_foreach_bit_for_bit(cls, dtype, kw):
    """foreach=True rounds as the built-in's foreach path, which is the built-in's default on
    CUDA: checked here with the CPU implementations of the same foreach ops (a host Tensor lr is
    read as a number, as the built-in reads it)."""
    nesterov = cls is NesterovSGD and kw["momentum"] != 0
    ref = run(lambda ps: torch.optim.SGD(ps, nesterov=nesterov, foreach=True, **kw), dtype)
    ours = run(lambda ps: cls(ps, foreach=True, **kw), dtype)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_default_equals_builtin_default_bit_for_bit_on_cuda(cls, dtype, kw):
    """On CUDA both defaults are foreach. (A CUDA Tensor lr is the exception, not tested here:
    the built-in reads it on the host, a synchronisation, and ours multiplies on the device,
    one more rounding per step.)"""
    nesterov = cls is NesterovSGD and kw["momentum"] != 0
    ref = run(lambda ps: torch.optim.SGD(ps, nesterov=nesterov, **kw), dtype, device="cuda")
    ours = run(lambda ps: cls(ps, **kw), dtype, device="cuda")
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_default_equals_builtin_default_on_mixed_dtypes(cls):
    """One param group holding all four dtypes: still the built-in's results exactly."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(33, generator=gen).to(d) for d in DTYPES]
    results = []
    for make in (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=cls is NesterovSGD),
        lambda ps: cls(ps, lr=0.05, momentum=0.9),
    ):
        params = [t.clone().requires_grad_() for t in init]
        opt = make(params)
        for t in range(10):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (t + 1)) + p.detach()
            opt.step()
        results.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("path", [{"fused": True}, {"foreach": True}], ids=["fused", "foreach"])
def test_fast_paths_stay_available_on_request(cls, path, monkeypatch):
    """fused=True / foreach=True still run their kernels, and agree with the default up to
    float64 rounding.

    This test pins which kernel runs; it spies on private functions of
    ``torch_momentum._kernels`` (a renamed kernel fails here, it is never skipped silently)."""
    calls: list[str] = []
    for name in ("_fused_momentum_sgd", "_multi_tensor_momentum_sgd"):
        real = getattr(K, name)
        monkeypatch.setattr(
            K, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1]
        )
    ours = run(lambda ps: cls(ps, lr=0.05, momentum=0.9, **path), torch.float64)
    ref = run(lambda ps: cls(ps, lr=0.05, momentum=0.9), torch.float64)
    expected = "_fused_momentum_sgd" if "fused" in path else "_multi_tensor_momentum_sgd"
    assert calls == [expected] * 10
    for a, b in zip(ours, ref, strict=True):
        # float64, 10 steps of O(1) roundings each (2**-53 ≈ 1.1e-16 relative); a wrong term
        # would be O(lr) = 5e-2
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
