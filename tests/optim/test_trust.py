"""Regression tests for the optimiser defects of the "trust first" review: memory layouts, state
dict migration from and to ``torch.optim.SGD``, hypergradients, per-group validation, the meta
device, DTensor parameters, the path cache, signatures, ``iterate`` and bfloat16 rounding."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

import torch_momentum._kernels as K
from tests.helpers.optim_db import F64_RTOL, OPTIMIZERS, PATHS, cases, info_of, max_rel_diff
from torch_momentum import NesterovSGD, PolyakSGD, to_sgd_state_dict

ids = str

# --------------------------------------------------------------------------- layouts
# Each case: (storage, parameter view of it) and the gradient's layout at step t. The fused
# kernel walks p, g and v as flat blocks, so any difference of layout used to scramble or
# overwrite memory. Everything around the parameter must stay untouched too.


def _values(shape: tuple[int, ...], t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _storage(case: str) -> torch.Tensor:
    """The storage the parameter lives in (channels-last for that case)."""
    g = torch.Generator().manual_seed(7)
    shape = {
        "sliced-param": (4, 8),
        "transposed-param": (4, 6),
        "channels-last-param": (2, 3, 4, 5),
    }
    base = torch.randn(shape.get(case, (4, 4)), generator=g, dtype=torch.float64)
    if case == "channels-last-param":
        base = base.contiguous(memory_format=torch.channels_last)
    return base


def _view(case: str, base: torch.Tensor) -> torch.Tensor:
    if case == "sliced-param":
        return base[:, ::2]  # every other column: not dense
    if case == "transposed-param":
        return base.t()  # dense, column-major
    return base


def _grad(case: str, shape: tuple[int, ...], t: int) -> torch.Tensor:
    if case == "expanded-grad":
        return _values((1, *shape[1:]), t).expand(shape)  # stride 0 along the first dim
    if case == "grad-changes-layout" and t % 2 == 1:
        return _values(shape[::-1], t).t()  # a transposed gradient on odd steps only
    return _values(shape, t)  # contiguous


LAYOUTS = [
    "sliced-param",
    "transposed-param",
    "channels-last-param",
    "expanded-grad",
    "grad-changes-layout",
]


def _run_layout(case: str, make_opt, steps: int = 4) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = _storage(case)
    p = nn.Parameter(_view(case, base))  # shares the storage of base
    assert p.data_ptr() == base.data_ptr()
    opt = make_opt([p])
    for t in range(steps):
        p.grad = _grad(case, tuple(p.shape), t)
        opt.step()
    state = opt.state[p]
    velocity = state["velocity"] if "velocity" in state else -state["momentum_buffer"]
    return base, [velocity]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", LAYOUTS)
def test_every_layout_on_every_path_matches_builtin_for_loop(info, path, case):
    """The whole storage (parameter and neighbours) and the velocity equal SGD(foreach=False)."""
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}
    ours_base, ours_v = _run_layout(case, lambda ps: info.cls(ps, **kw, **PATHS[path]))
    ref_base, ref_v = _run_layout(case, lambda ps: info.builtin(ps, **kw, foreach=False))
    # Same float64 operations in the same order up to rounding (see F64_RTOL).
    assert max_rel_diff([ours_base], [ref_base]) < F64_RTOL
    assert max_rel_diff(ours_v, ref_v) < F64_RTOL
    if case == "sliced-param":  # the columns between the parameter's are not a parameter
        assert torch.equal(ours_base[:, 1::2], _storage(case)[:, 1::2])


def test_issue_repro_sliced_parameter():
    base = torch.zeros(4, 8)
    p = nn.Parameter(base[:, ::2])
    opt = PolyakSGD([p], lr=1.0, momentum=0.0)
    (p * torch.arange(16.0).reshape(4, 4)).sum().backward()
    opt.step()
    assert torch.equal(p.detach(), -torch.arange(16.0).reshape(4, 4))
    assert torch.equal(base[:, 1::2], torch.zeros(4, 4))


def test_layout_check_keeps_the_matching_tensors_on_the_fused_kernel(monkeypatch):
    """Only the mismatched tensor leaves the fused kernel; the others still take it.

    This test pins which kernel runs; it spies on a private torch API (``torch._fused_sgd_``)."""
    seen: list[int] = []
    real = torch._fused_sgd_

    def spy(params, *args, **kwargs):
        seen.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_sgd_", spy)
    ps = [nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    opt = PolyakSGD(ps, lr=0.1, fused=True)
    for p in ps:
        p.grad = torch.randn(3, 4)
    ps[1].grad = torch.randn(4, 3).t()
    opt.step()
    assert seen == [2]


# ------------------------------------------------------------------------- migration


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _groups(model: nn.Module) -> list[dict]:
    ps = list(model.parameters())
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03, "weight_decay": 0.01}]


_X = torch.randn(32, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
_Y = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        ((model(_X) - _Y) ** 2).mean().backward()
        opt.step()


KW = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_migrate_from_builtin_continues_exactly(info):
    migrated, never = _mlp(), _mlp()
    sgd = info.builtin(_groups(migrated), **KW)
    _train(migrated, sgd, 3)
    ours = info.cls(_groups(migrated), **KW)
    ours.load_state_dict(sgd.state_dict())
    _train(migrated, ours, 30)
    reference = info.builtin(_groups(never), **KW)
    _train(never, reference, 33)
    # float64, different rounding order only (see F64_RTOL); losing the momentum is O(1e-2).
    error = max_rel_diff(list(migrated.parameters()), list(never.parameters()))
    assert error < F64_RTOL


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_migrate_to_builtin_continues_exactly(info):
    migrated, never = _mlp(), _mlp()
    ours = info.cls(_groups(migrated), **KW)
    _train(migrated, ours, 3)
    sgd = info.builtin(_groups(migrated), **KW)
    sgd.load_state_dict(to_sgd_state_dict(ours))
    _train(migrated, sgd, 30)
    reference = info.cls(_groups(never), **KW)
    _train(never, reference, 33)
    error = max_rel_diff(list(migrated.parameters()), list(never.parameters()))
    assert error < F64_RTOL  # as above
    assert sgd.param_groups[1]["lr"] == 0.03 and sgd.param_groups[1]["nesterov"] is info.nesterov


def _sgd_state(nesterov: bool = False, **kw) -> tuple[nn.Module, dict]:
    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, **kw)
    _train(model, sgd, 2)
    return model, sgd.state_dict()


@pytest.mark.parametrize(
    ("cls", "nesterov", "extra", "key"),
    [
        (PolyakSGD, True, {}, "'nesterov'"),
        (NesterovSGD, False, {}, "'nesterov'"),
        (PolyakSGD, False, {"dampening": 0.1}, "'dampening'"),
    ],
)
def test_migration_mismatch_names_the_key_and_changes_nothing(cls, nesterov, extra, key):
    model, state = _sgd_state(nesterov, **extra)
    opt = cls(model.parameters(), lr=0.3, momentum=0.5)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(state)
    assert opt.state_dict() == before


def test_migration_rejects_invalid_momentum_and_foreign_state():
    model, state = _sgd_state()
    state["param_groups"][0]["momentum"] = 1.5  # SGD accepts it, we do not
    opt = PolyakSGD(model.parameters())
    with pytest.raises(ValueError, match=r"Invalid momentum: 1\.5"):
        opt.load_state_dict(state)
    adam = torch.optim.Adam(model.parameters())
    _train(model, adam, 1)
    with pytest.raises(ValueError, match="'exp_avg"):
        opt.load_state_dict(adam.state_dict())
    assert len(opt.state) == 0


def test_nesterov_state_refused_by_polyak():
    model = _mlp()
    opt = NesterovSGD(model.parameters())
    with pytest.raises(ValueError, match="'train_mode'"):
        PolyakSGD(model.parameters()).load_state_dict(opt.state_dict())


def test_to_sgd_state_dict_in_eval_mode_raises_and_warns_on_a_pending_rebase():
    model = _mlp()
    opt = NesterovSGD(model.parameters(), lr=0.05)
    _train(model, opt, 2)
    opt.eval()
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        to_sgd_state_dict(opt)
    opt.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_sgd_state_dict(opt)  # no change of lr * momentum: exact, no warning
    opt.param_groups[0]["lr"] = 0.01
    with pytest.warns(UserWarning, match="re-base"):
        to_sgd_state_dict(opt)
    with pytest.raises(TypeError, match="PolyakSGD or NesterovSGD"):
        to_sgd_state_dict(torch.optim.SGD(model.parameters(), lr=0.1))


def test_loaded_velocity_takes_the_parameter_layout():
    """A momentum buffer cloned from a transposed gradient is stored in the parameter's layout, so
    the fused kernel can keep the tensor."""
    p = nn.Parameter(torch.randn(3, 4))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(4, 3).t()
    sgd.step()
    assert sgd.state[p]["momentum_buffer"].stride() != p.stride()
    opt = PolyakSGD([p], lr=0.1)
    opt.load_state_dict(sgd.state_dict())
    assert opt.state[p]["velocity"].stride() == p.stride()
    assert torch.equal(opt.state[p]["velocity"], -sgd.state[p]["momentum_buffer"])


# --------------------------------------------------------------------- hypergradients


def _one_step(cls_or_info, p, grad, v, lr, momentum, weight_decay):
    """One differentiable step from (p, grad, v); returns the new parameter (and velocity)."""
    p = p.clone()
    p.grad = grad
    if isinstance(cls_or_info, type):
        opt = cls_or_info(
            [p], lr=lr, momentum=momentum, weight_decay=weight_decay, differentiable=True
        )
        if momentum:
            opt.state[p]["velocity"] = v.clone()
        opt.step()
        return (p, opt.state[p]["velocity"]) if momentum else (p,)
    opt = cls_or_info.builtin(
        [p], lr=lr, momentum=momentum, weight_decay=weight_decay, differentiable=True
    )
    if momentum:
        opt.state[p]["momentum_buffer"] = -v.clone()
    opt.step()
    return (p, -opt.state[p]["momentum_buffer"]) if momentum else (p,)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p, grad, v = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    lr = torch.tensor(0.1, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (p, grad, v, lr)]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_gradcheck_one_step(info, momentum):
    """Like PyTorch's differentiable-optimiser tests: gradcheck over p, grad, v and lr."""
    p, grad, v, lr = _inputs()
    assert torch.autograd.gradcheck(
        lambda p, grad, v, lr: _one_step(info.cls, p, grad, v, lr, momentum, 0.01),
        (p, grad, v, lr),
    )


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_hypergradients_equal_builtin(info, momentum):
    p, grad, v, lr = _inputs(1)
    weights = torch.randn(5, dtype=torch.float64)
    results = []
    for which in (info.cls, info):
        outs = _one_step(which, p, grad, v, lr, momentum, 0.01)
        total = sum((o * weights).sum() for o in outs)
        results.append(torch.autograd.grad(total, (p, grad, v, lr), allow_unused=True))
    for ours, theirs in zip(*results, strict=True):
        if theirs is None:
            assert ours is None or not ours.any()
        else:
            torch.testing.assert_close(ours, theirs, rtol=F64_RTOL, atol=1e-15)  # rounding


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_gradcheck_unrolled_steps_over_lr(info, momentum):
    """Hypergradient of the parameters after 3 steps on a quadratic with respect to lr (the
    velocity of one step is saved for the backward pass of the next)."""
    target = torch.linspace(-1, 1, 4, dtype=torch.float64)

    def unrolled(p0, lr):
        p = p0.clone()
        opt = info.cls([p], lr=lr, momentum=momentum, weight_decay=0.01, differentiable=True)
        for _ in range(3):
            p.grad = 2 * (p - target) * torch.arange(1, 5, dtype=torch.float64)
            opt.step()
        return p

    p0 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(unrolled, (p0, lr))


# ------------------------------------------------------------------------- validation

BAD_GROUPS = [
    ({"momentum": 1.5}, ValueError),
    ({"lr": -0.1}, ValueError),
    ({"weight_decay": -1.0}, ValueError),
    ({"momentum": "0.9"}, TypeError),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError),
    ({"fused": True, "foreach": True}, ValueError),
]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize(("bad", "error"), BAD_GROUPS, ids=lambda x: str(x)[:30])
def test_per_group_hyperparameters_validated_like_arguments(info, bad, error):
    with pytest.raises(error) as as_argument:
        info.cls([nn.Parameter(torch.zeros(2))], **bad)
    message = str(as_argument.value)
    with pytest.raises(error) as in_constructor:
        info.cls([{"params": [nn.Parameter(torch.zeros(2))], **bad}])
    assert str(in_constructor.value) == f"param group 0: {message}"
    opt = info.cls([nn.Parameter(torch.zeros(2))], lr=0.1)
    group = {"params": [nn.Parameter(torch.zeros(3))], **bad}
    before = dict(group)
    with pytest.raises(error) as added:
        opt.add_param_group(group)
    assert str(added.value) == f"param group 1: {message}"
    assert len(opt.param_groups) == 1 and group == before  # nothing changed


# ----------------------------------------------------------------------- meta device


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_fused_on_meta_device_is_checked_at_step(info):
    with torch.device("meta"):
        model = nn.Linear(4, 3, dtype=torch.float64)
    opt = info.cls(model.parameters(), lr=0.1, fused=True)  # builds, like the built-in
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keep the Parameter objects
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert all(
        p is q for p, q in zip(model.parameters(), opt.param_groups[0]["params"], strict=True)
    )
    reference = nn.Linear(4, 3, dtype=torch.float64)
    model.load_state_dict(reference.state_dict())
    ref_opt = info.builtin(reference.parameters(), lr=0.1, momentum=0.9, fused=True)
    x = torch.randn(8, 4, dtype=torch.float64)
    for m, o in ((model, opt), (reference, ref_opt)):
        for _ in range(3):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    # The same fused kernel on the same data (see F64_RTOL).
    assert max_rel_diff(list(model.parameters()), list(reference.parameters())) < F64_RTOL

    with torch.device("meta"):
        meta = nn.Linear(4, 3)
    opt = info.cls(meta.parameters(), lr=0.1, fused=True)
    for p in meta.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.step()
    assert len(opt.state) == 0


def test_fused_integer_parameter_raises_at_step_before_any_state():
    p = torch.zeros(3, dtype=torch.int64)
    opt = PolyakSGD([p], lr=0.1, fused=True)
    p.grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(p, torch.zeros(3, dtype=torch.int64))


# ------------------------------------------------------------------------ path cache


def test_path_cache_does_not_survive_a_layout_change():
    """After a step on the fused kernel the parameter becomes transposed-dense with contiguous
    gradients: still correct (the built-in does the same changes)."""
    results = []
    makers = (
        lambda ps: PolyakSGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    )
    for make in makers:
        p = nn.Parameter(torch.arange(12.0, dtype=torch.float64).reshape(3, 4))
        opt = make([p])
        p.grad = _values((3, 4), 0)
        opt.step()
        p.data = p.data.t().contiguous().t()  # same values, column-major
        for t in (1, 2):
            p.grad = _values((3, 4), t)
            opt.step()
        results.append(p.detach().clone())
    assert max_rel_diff(results[:1], results[1:]) < F64_RTOL  # rounding only (see F64_RTOL)


def test_path_cache_does_not_survive_a_dtype_change():
    """A float parameter turned into an integer one leaves the fused kernel (no fused integer
    kernel): the step runs like the built-in's."""
    results = []
    makers = (lambda ps: PolyakSGD(ps, lr=1, momentum=0.0), lambda ps: torch.optim.SGD(ps, lr=1))
    for make in makers:
        p = torch.ones(3)  # a leaf that does not require grad may change dtype in place
        opt = make([p])
        p.grad = torch.ones(3)
        opt.step()
        p.data = torch.tensor([5, 6, 7])
        p.grad = torch.tensor([1, 2, 3])
        opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], torch.tensor([4, 4, 4]))
    assert torch.equal(results[0], results[1])


def test_path_cache_does_not_survive_a_device_change(monkeypatch):
    """Moved to a device without fused kernels (meta), the parameter no longer goes to the fused
    kernel; an explicit fused=True says so (the default path on the CPU is the built-in's
    for-loop, which never calls the fused kernel).

    This test pins which kernel runs; it spies on a private torch API (``torch._fused_sgd_``):
    it ran once, for fused=True on the CPU, never on the meta device."""
    devices: list[str] = []
    real = torch._fused_sgd_

    def spy(params, *args, **kwargs):
        devices.extend(p.device.type for p in params)
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_sgd_", spy)
    for flags in ({}, {"fused": True}):
        p = nn.Parameter(torch.ones(3))
        opt = NesterovSGD([p], lr=0.1, **flags)
        p.grad = torch.ones(3)
        opt.step()
        torch.utils.swap_tensors(p, nn.Parameter(p.detach().to("meta")))  # same object
        p.grad = torch.ones(3, device="meta")
        opt.state[p]["velocity"] = opt.state[p]["velocity"].to("meta")
        if flags:
            with pytest.raises(RuntimeError, match="fused=True"):
                opt.step()
        else:
            opt.step()
    assert devices == ["cpu"]


# ------------------------------------------------------------------------- DTensor


@pytest.fixture(scope="module")
def gloo_mesh(tmp_path_factory):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.device_mesh import init_device_mesh

    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_dtensor_parameters_take_the_builtin_default_path_and_match_builtin(
    info, gloo_mesh, monkeypatch
):
    """CPU DTensors: the built-in's default there is its for-loop (no foreach kernels on the
    CPU), so ours takes the reference path, once per step, with the built-in's results.

    This test pins which kernel runs; it spies on private functions of
    ``torch_momentum._kernels`` (``_multi_tensor_momentum_sgd``, ``_single_tensor_momentum_sgd``;
    a renamed kernel fails here, it is never skipped silently)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    calls: list[str] = []
    for name in ("_multi_tensor_momentum_sgd", "_single_tensor_momentum_sgd"):
        real = getattr(K, name)
        monkeypatch.setattr(
            K, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1]
        )
    shapes = [(6, 4), (4,), (3, 3)]
    results = []
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    makers = (lambda ps: info.cls(ps, **kw), lambda ps: info.builtin(ps, **kw, foreach=False))
    for make in makers:
        torch.manual_seed(0)
        values = [torch.randn(s, dtype=torch.float64) for s in shapes]
        params = [nn.Parameter(distribute_tensor(v, gloo_mesh, [Shard(0)])) for v in values]
        opt = make(params)
        for t in range(3):
            for p in params:
                p.grad = distribute_tensor(_values(tuple(p.shape), t), gloo_mesh, [Shard(0)])
            opt.step()
        results.append([p.full_tensor() for p in params])
    assert K.resolve_implementation(params, None, None, differentiable=False) == "forloop"
    assert calls == ["_single_tensor_momentum_sgd"] * 3
    assert max_rel_diff(results[0], results[1]) < F64_RTOL  # rounding only (see F64_RTOL)


# ---------------------------------------------------------------- signature, iterate


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_real_signature(info):
    params = inspect.signature(info.cls).parameters
    assert list(params) == [
        "params",
        "lr",
        "momentum",
        "weight_decay",
        "maximize",
        "foreach",
        "fused",
        "differentiable",
    ]
    assert params["momentum"].default == 0.9
    assert params["fused"].kind is inspect.Parameter.KEYWORD_ONLY


def _iterate_setup(cls):
    model = _mlp()
    opt = cls(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for _ in range(3):
        _train(model, opt, 1)
        sched.step()
    return model, opt


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_iterate_is_the_iterate_in_every_mode(info):
    model, opt = _iterate_setup(info.cls)
    assert opt.param_groups[0]["lr"] == 0.025  # the scheduler changed lr after the last step
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    iterates = [opt.iterate(p) for p in params]
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # nothing moved
    if info.cls is NesterovSGD:
        opt.eval()  # eval() puts the parameters at x_t with the same rounding
    assert all(torch.equal(i, p) for i, p in zip(iterates, params, strict=True))
    copies = [opt.iterate(p) for p in params]  # in eval mode (Polyak: always) a copy of p
    pairs = zip(copies, params, strict=True)
    assert all(torch.equal(c, p) and c.data_ptr() != p.data_ptr() for c, p in pairs)
    if info.cls is NesterovSGD:
        # x_t differs from the look-ahead by c * v with c = lr * momentum of the last step
        v = [opt.state[p]["velocity"] for p in params]
        shifted = [b - 0.05 * 0.9 * vv for b, vv in zip(before, v, strict=True)]
        assert max_rel_diff(iterates, shifted) < F64_RTOL
        assert max_rel_diff(iterates, before) > 1e-6
    with pytest.raises(ValueError, match="not a parameter"):
        opt.iterate(torch.zeros(2))


# --------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize(
    ("info", "path"),
    cases("test_nesterov_bfloat16_rounds_like_the_builtin", [info_of(NesterovSGD)]),
)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_nesterov_bfloat16_rounds_like_the_builtin(info, path, weight_decay):
    """With the built-in's rounding order each path gives the built-in's bfloat16 results with
    the same flags bit for bit (the look-ahead used to be rebuilt from x, or updated in two
    roundings); the fused path is a known skip (the table says why)."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (10, 64)]
    init = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    results = []
    builtin_flags = {"reference": {"foreach": False}}.get(path, PATHS[path])
    kw = {"lr": 0.01, "momentum": 0.9, "weight_decay": weight_decay}
    makers = (
        lambda ps: NesterovSGD(ps, **kw, **PATHS[path]),
        lambda ps: info.builtin(ps, **kw, **builtin_flags),
    )
    for make in makers:
        params = [nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for t in range(5):
            for p in params:
                p.grad = _values(tuple(p.shape), t).to(torch.bfloat16)
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def _ulp(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """The spacing of floating point numbers with ``mantissa_bits`` at each element of ``x``."""
    _, exponent = torch.frexp(x.double().abs().clamp_min(2.0**-14))
    return torch.pow(2.0, (exponent - 1 - mantissa_bits).double())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("path", ["fused"])
@pytest.mark.parametrize(("dtype", "bits"), [(torch.bfloat16, 7), (torch.float16, 10)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_reduced_precision_on_cpu_is_rounding_only(info, path, dtype, bits, weight_decay):
    """torch._fused_sgd_ on the CPU computes wrong bfloat16/float16 values (garbage momentum
    buffers, lost updates). Our fused path takes the foreach path there, so it must round like
    the built-in's foreach path (whose scalar products round differently from the for-loop's in
    these dtypes). The default path is the built-in's for-loop, bit for bit (tests/optim)."""
    torch.manual_seed(0)
    init = [torch.randn(s).to(dtype) for s in [(64, 32), (4096,)]]
    kw = {"lr": 0.01, "momentum": 0.9, "weight_decay": weight_decay}
    results = []
    makers = (
        lambda ps: info.cls(ps, **kw, **PATHS[path]),
        lambda ps: info.builtin(ps, **kw, foreach=True),
    )
    for make in makers:
        params = [nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for t in range(3):
            for p in params:  # a fresh gradient: the built-in's Nesterov foreach writes into it
                p.grad = _values(tuple(p.shape), t).to(dtype)
            opt.step()
        state = [opt.state[p] for p in params]
        velocities = [s["velocity"] if "velocity" in s else -s["momentum_buffer"] for s in state]
        results.append(([p.detach() for p in params], velocities))
    (ours_p, ours_v), (loop_p, loop_v) = results
    # v <- momentum * v - d rounds exactly like the built-in's buf <- momentum * buf + d.
    assert all(torch.equal(a, b) for a, b in zip(ours_v, loop_v, strict=True))
    for ours, loop in zip(ours_p, loop_p, strict=True):
        # Parameters: at most one extra rounding per step (Nesterov's foreach path without
        # weight decay), i.e. within 3 ulps at the scale of the parameters after 3 steps.
        scale = loop.double().abs().clamp_min(1.0)
        assert ((ours.double() - loop.double()).abs() <= 3 * _ulp(scale, bits)).all()
