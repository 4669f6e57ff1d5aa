"""Generic optimiser conformance, modelled on PyTorch's ``TestOptimRenewed`` (test/test_optim.py).

Every test runs for both optimisers over the configurations and paths of the table in
tests/helpers/optim_db.py (like an ``OptimizerInfo``'s ``optim_inputs``); the first test checks
the table itself.
"""

from __future__ import annotations

import copy
import importlib
import io
import pkgutil

import pytest
import torch
from torch import nn

import tests.optim
from tests.helpers.optim_db import (
    CLASSES,
    CONFIGS,
    F64_RTOL,
    OPTIMIZERS,
    PATHS,
    config_id,
    max_rel_diff,
)
from torch_momentum import NesterovSGD


def _optim_test_names() -> set[str]:
    """The names of the test functions of tests/optim/ (modules that skip at import: none)."""
    names: set[str] = set()
    for found in pkgutil.iter_modules(tests.optim.__path__):
        try:
            module = importlib.import_module(f"tests.optim.{found.name}")
        except pytest.skip.Exception:  # e.g. test_cli.py without jsonargparse
            continue
        names |= {name for name in vars(module) if name.startswith("test_")}
    return names


def test_the_table_is_what_the_constructors_do() -> None:
    """Every implementation the table lists is accepted, ``differentiable=True`` exactly where the
    table says so (elsewhere a ValueError naming it), and every known skip names an existing
    test of tests/optim/ and a supported implementation, with a reason."""
    names = _optim_test_names()
    assert "test_paths_agree" in names  # the scan sees the tests
    for info in OPTIMIZERS:
        assert set(info.supported_impls) == set(PATHS)
        assert set(info.differentiable_impls) <= set(info.supported_impls)
        for impl in info.supported_impls:
            opt = info.cls([nn.Parameter(torch.zeros(2))], lr=0.1, **PATHS[impl])
            assert all(opt.param_groups[0][flag] is on for flag, on in PATHS[impl].items())
            params = [nn.Parameter(torch.zeros(2))]
            if impl in info.differentiable_impls:
                info.cls(params, lr=0.1, differentiable=True, **PATHS[impl])
            else:
                with pytest.raises(ValueError, match="differentiable"):
                    info.cls(params, lr=0.1, differentiable=True, **PATHS[impl])
        for skip in info.skips:
            assert skip.test in names, f"{info}: known skip of a test that does not exist: {skip}"
            assert set(skip.impls) <= set(info.supported_impls) and skip.reason, skip


def params_with_frozen_and_scalar() -> list[torch.Tensor]:
    """A weight, a frozen (no-grad) bias, a 0-dim parameter and one that never gets a gradient."""
    torch.manual_seed(7)
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    frozen = torch.randn(4, dtype=torch.float64, requires_grad=False)
    scalar = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    return [weight, frozen, scalar, unused]


def objective(params: list[torch.Tensor], t: int) -> torch.Tensor:
    weight, frozen, scalar, _ = params
    x = torch.linspace(-1, 1, 3, dtype=weight.dtype) * (1 + 0.1 * t)
    return ((weight @ x + frozen) * scalar).tanh().pow(2).sum() + scalar**2


def run(cls, kw, impl, dtype=torch.float64, steps=12):
    """``steps`` steps in ``dtype`` on an MLP (6 -> 16 -> 16 -> 3, tanh, square loss) plus
    :func:`objective` of the four tensors of :func:`params_with_frozen_and_scalar`. Two groups
    (the second with its own lr and weight decay), StepLR halving lr every 4 steps, and at step 4
    a step in which no parameter has a gradient. Returns the MLP's parameters and the four
    tensors (NesterovSGD's in eval mode: the iterates) and the optimiser."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    weights = list(mlp.to(dtype).parameters())
    extra = [
        p.detach().to(dtype).requires_grad_(p.requires_grad)
        for p in params_with_frozen_and_scalar()
    ]
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(64, n, generator=g, dtype=dtype) for n in (6, 3))
    groups = [
        {"params": weights[:2] + extra[:2]},
        {"params": weights[2:] + extra[2:], "lr": 0.02, "weight_decay": 1e-3},
    ]
    # a Tensor lr of the table is shared by every test: the scheduler changes lr in place
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    opt = cls(groups, **kw, **impl)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    for t in range(steps):
        opt.zero_grad()
        if t != 4:  # at t = 4 no parameter has a gradient
            (((mlp(x) - y) ** 2).mean() + objective(extra, t)).backward()
        opt.step()
        sched.step()
    if cls is NesterovSGD:
        opt.eval()
    return weights + extra, opt


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_paths_agree(cls, kw, dtype):
    """Every path (foreach, fused, default) gives the reference path's parameters: an MLP, a
    frozen tensor, a 0-dim parameter, one that never gets a gradient, a step without gradients,
    two groups and a scheduler, over the table's configurations, in float64 and float32."""
    ref, _ = run(cls, kw, PATHS["reference"], dtype)
    # float64: rounding only (see F64_RTOL). float32: the fused kernel computes d, v and p in one
    # expression (possibly contracted to FMAs) while the others round after each operation, so
    # each step may differ by a few float32 ulps (2**-24 ≈ 6e-8 relative); over 12 steps of a
    # non-expansive update that stays below ~12 * 4 * 6e-8 ≈ 3e-6, so 2e-5 bounds rounding
    # while a real bug (O(lr)) is 1e-2.
    tol = F64_RTOL if dtype == torch.float64 else 2e-5
    for impl in (PATHS["foreach"], PATHS["fused"], PATHS["default"]):
        got, opt = run(cls, kw, impl, dtype)
        assert max_rel_diff(got, ref) < tol, impl
        *_, frozen, _, unused = got
        assert unused.grad is None
        assert frozen not in opt.state and unused not in opt.state  # they carry no state


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
@pytest.mark.parametrize("path", PATHS)
def test_complex_equals_view_as_real(cls, kw, path):
    """Every update is real-linear: a complex parameter moves like its real view."""
    torch.manual_seed(2)
    z = torch.randn(3, 2, dtype=torch.complex128, requires_grad=True)
    r = torch.view_as_real(z.detach().clone()).requires_grad_(True)
    opt_z, opt_r = cls([z], **kw, **PATHS[path]), cls([r], **kw, **PATHS[path])
    for t in range(8):
        for opt, value in ((opt_z, lambda: z), (opt_r, lambda: torch.view_as_complex(r))):
            opt.zero_grad()
            w = value()
            (w.abs().pow(2).sum() + (w * (1 + 1j) * t).real.sum()).backward()
            opt.step()
    assert max_rel_diff([torch.view_as_real(z.detach())], [r.detach()]) < F64_RTOL


@pytest.mark.parametrize("cls", CLASSES)
def test_per_group_hyperparameters(cls):
    """Two groups with different lr/weight decay == two separate optimisers."""
    torch.manual_seed(0)
    a1, a2 = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    p1, p2 = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    q1, q2 = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    joint = cls([{"params": [p1]}, {"params": [p2], "lr": 0.01, "weight_decay": 0.3}], lr=0.1)
    sep1, sep2 = cls([q1], lr=0.1), cls([q2], lr=0.01, weight_decay=0.3)
    for _ in range(10):
        for opts, (x, y) in (((joint,), (p1, p2)), ((sep1, sep2), (q1, q2))):
            for o in opts:
                o.zero_grad()
            (x.sin().sum() * y.cos().sum()).backward()
            for o in opts:
                o.step()
    assert max_rel_diff([p1, p2], [q1, q2]) == 0.0


@pytest.mark.parametrize("cls", CLASSES)
def test_printable(cls):
    opt = cls([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.8)
    text = repr(opt)
    assert text.startswith(cls.__name__) and "weight_decay: 0.0" in text
    assert "momentum: 0.8" in text and "lr: 0.1" in text
    assert opt.defaults["momentum"] == 0.8


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
def test_deterministic_state_dict(cls, kw):
    """A state dict saved with torch.save and loaded (weights_only) into a fresh optimiser with
    other hyper-parameters, on a copy of the parameters, continues bit for bit."""
    params = params_with_frozen_and_scalar()
    opt = cls(params, **kw)
    for t in range(3):
        opt.zero_grad()
        objective(params, t).backward()
        opt.step()
    copies = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    opt2 = cls(copies, lr=1.0, momentum=0.1)  # the hyper-parameters come from the state dict
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for t in range(3, 6):
        for o, ps in ((opt, params), (opt2, copies)):
            o.zero_grad()
            objective(ps, t).backward()
            o.step()
    assert max_rel_diff(copies, params) == 0.0


@pytest.mark.parametrize("cls", CLASSES)
def test_named_state_dict(cls):
    """Parameters given as named_parameters() keep their names in the state dict."""
    model = nn.Linear(3, 2).double()
    opt = cls(model.named_parameters(), lr=0.1)
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    state = opt.state_dict()
    assert state["param_groups"][0]["param_names"] == ["weight", "bias"]
    other = nn.Linear(3, 2).double()
    opt2 = cls(other.named_parameters(), lr=0.1)
    opt2.load_state_dict(state)
    assert torch.equal(opt2.state[other.weight]["velocity"], opt.state[model.weight]["velocity"])


@pytest.mark.parametrize("cls", CLASSES)
def test_weights_only_save_and_load(cls):
    params = params_with_frozen_and_scalar()
    opt = cls(params, lr=torch.tensor(0.05), momentum=0.9)
    objective(params, 0).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    opt2 = cls(params_with_frozen_and_scalar(), lr=0.05)
    opt2.load_state_dict(loaded)
    assert torch.equal(opt2.state_dict()["state"][0]["velocity"], opt.state[params[0]]["velocity"])


@pytest.mark.parametrize("cls", CLASSES)
def test_hook_order_and_removal(cls):
    params = params_with_frozen_and_scalar()
    opt = cls(params, lr=0.05)
    order = []
    handles = [
        opt.register_step_pre_hook(lambda *_: order.append("pre1")),
        opt.register_step_pre_hook(lambda *_: order.append("pre2")),
        opt.register_step_post_hook(lambda *_: order.append("post1")),
        opt.register_step_post_hook(lambda *_: order.append("post2")),
        opt.register_state_dict_pre_hook(lambda *_: order.append("sd_pre")),
        opt.register_load_state_dict_post_hook(lambda *_: order.append("load_post")),
    ]
    objective(params, 0).backward()
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert order == ["pre1", "pre2", "post1", "post2", "sd_pre", "load_post"]
    for h in handles:
        h.remove()
    opt.step()
    assert len(order) == 6


@pytest.mark.parametrize("cls", CLASSES)
def test_deepcopy_keeps_attributes_and_continues_identically(cls):
    params = params_with_frozen_and_scalar()
    opt = cls(params, lr=0.05, momentum=0.8)
    objective(params, 0).backward()
    opt.step()
    dup = copy.deepcopy(opt)
    copies = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    opt2 = cls(copies, lr=1.0)
    opt2.load_state_dict(copy.deepcopy(opt).state_dict())
    for t in range(1, 4):
        for o, ps in ((opt, params), (opt2, copies)):
            o.zero_grad()
            objective(ps, t).backward()
            o.step()
    assert max_rel_diff(copies, params) == 0.0
    assert dup.defaults == opt.defaults
    assert type(dup) is cls
    for g1, g2 in zip(dup.param_groups, opt.param_groups, strict=True):
        assert {k: v for k, v in g1.items() if k != "params"} == {
            k: v for k, v in g2.items() if k != "params"
        }
    assert len(dup.state) == len(opt.state)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
def test_state_non_empty_after_step(cls, kw):
    params = params_with_frozen_and_scalar()
    opt = cls(params, **kw)
    assert len(opt.state) == 0
    objective(params, 0).backward()
    opt.step()
    momentum = kw.get("momentum", 0.9)
    if momentum:
        assert set(opt.state) == {params[0], params[2]}
        assert all(torch.is_tensor(s["velocity"]) for s in opt.state.values())
    else:  # plain gradient descent keeps no velocity
        assert all("velocity" not in s for s in opt.state.values())


@pytest.mark.parametrize("cls", CLASSES)
def test_lr_scheduler_and_add_param_group(cls):
    params = params_with_frozen_and_scalar()
    opt = cls(params[:1], lr=0.1)
    opt.add_param_group({"params": [params[2]], "lr": 0.01})
    assert opt.param_groups[1]["momentum"] == 0.9
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.2, 0.02], total_steps=10)
    for t in range(10):
        opt.zero_grad()
        objective(params, t).backward()
        opt.step()
        sched.step()
    # OneCycleLR cycles "momentum" too (our defaults have the key, as SGD's do).
    assert 0.9 < opt.param_groups[0]["momentum"] <= 0.95  # annealed back towards max_momentum
    assert all(torch.isfinite(p).all() for p in params)
