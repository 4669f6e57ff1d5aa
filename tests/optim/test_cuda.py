"""CUDA paths of the optimisers: same results as on the CPU, and no host synchronisation in a
step or in ``eval()``/``train()``. Skipped without a GPU (the norm arithmetic's CUDA test is in
tests/balance/test_norms.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tests.helpers.cuda import no_host_sync, requires_cuda
from tests.helpers.optim_db import CLASSES, OPTIMIZERS, PATHS, max_rel_diff
from torch_momentum import NesterovSGD

pytestmark = requires_cuda


def run(cls, device, lr, path, steps=12, complex_=False):
    torch.manual_seed(0)
    dtype = torch.complex64 if complex_ else torch.float32
    w = torch.randn(64, 32, dtype=dtype).to(device).requires_grad_(True)
    b = torch.randn(32, dtype=dtype).to(device).requires_grad_(True)
    x = torch.randn(16, 64, dtype=dtype).to(device)
    opt = cls([w, b], lr=lr, momentum=0.9, weight_decay=1e-3, **PATHS[path])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for _ in range(steps):
        loss = ((x @ w + b).abs() ** 2).mean()  # computed outside the sync check
        opt.zero_grad()
        loss.backward()
        ctx = no_host_sync() if device == "cuda" else contextlib.nullcontext()
        with ctx:
            opt.step()
        sched.step()
    ctx = no_host_sync() if device == "cuda" else contextlib.nullcontext()
    if cls is NesterovSGD:
        with ctx:
            opt.eval()
            opt.train()
            opt.eval()
    return [w.detach().cpu(), b.detach().cpu()]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lr_kind", ["float", "cpu-tensor", "cuda-tensor"])
@pytest.mark.parametrize("complex_", [False, True])
def test_cuda_matches_cpu_without_host_sync(cls, path, lr_kind, complex_):
    lr = {
        "float": 0.05,
        "cpu-tensor": torch.tensor(0.05),
        "cuda-tensor": torch.tensor(0.05, device="cuda"),
    }[lr_kind]
    got = run(cls, "cuda", lr, path, complex_=complex_)
    ref = run(cls, "cpu", 0.05, path, complex_=complex_)
    # float32 on two devices: different reduction orders in the loss and FMA contraction; 12
    # steps of a few ulps each (6e-8) stay far below 1e-4, while a wrong update is O(lr) = 5e-2.
    assert max_rel_diff(got, ref) < 1e-4


def test_module_on_cuda_trains_like_cpu():
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    gpu = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for model, xx, yy in ((cpu, x, y), (gpu, x.cuda(), y.cuda())):
        opt = NesterovSGD(model.parameters(), lr=0.05)
        for _ in range(10):
            opt.zero_grad()
            ((model(xx) - yy) ** 2).mean().backward()
            opt.step()
        opt.eval()
    # float32 on two devices (see above)
    assert (
        max_rel_diff(
            [p.detach().cpu() for p in gpu.parameters()], [p.detach() for p in cpu.parameters()]
        )
        < 1e-4
    )


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_mismatched_layouts_match_builtin_for_loop(info, path, dtype):
    """A sliced parameter, a transposed gradient and an expanded gradient on CUDA: the fused
    kernel only gets matching layouts, so every path equals the built-in's for-loop up to
    rounding, and the columns between the sliced parameter's stay untouched."""
    results = []
    makers = (
        lambda ps: info.cls(ps, lr=0.1, momentum=0.9, weight_decay=0.01, **PATHS[path]),
        lambda ps: info.builtin(ps, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False),
    )
    for make in makers:
        torch.manual_seed(0)
        base = torch.randn(8, 16, device="cuda", dtype=dtype)
        sliced = nn.Parameter(base[:, ::2])
        plain = nn.Parameter(torch.randn(8, 8, device="cuda", dtype=dtype))
        other = nn.Parameter(torch.randn(8, 8, device="cuda", dtype=dtype))
        opt = make([sliced, plain, other])
        for t in range(3):
            g = torch.Generator(device="cuda").manual_seed(t)
            sliced.grad = torch.randn(8, 8, device="cuda", generator=g).to(dtype)
            plain.grad = torch.randn(8, 8, device="cuda", generator=g).to(dtype).t()
            other.grad = torch.randn(1, 8, device="cuda", generator=g).to(dtype).expand(8, 8)
            opt.step()
        results.append([base.float().cpu(), plain.detach().float().cpu()])
    # float32: a few ulps per step (FMA contraction in the fused kernel); bfloat16: the fused
    # kernel rounds once per step instead of after each operation, a few bfloat16 ulps (2**-8
    # relative each) over 3 steps; a misplaced update is O(lr) = 0.1.
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert max_rel_diff(results[0], results[1]) < tol
