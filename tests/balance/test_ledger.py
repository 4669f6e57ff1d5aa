"""The balance ledger and per-unit balance of torch_momentum.balance, in plain torch (float64).

For any update, D(t+1) - D(t) = 2<x_t, dx>_± + ||dx||^2_± exactly; the ledger splits the first
term by the known update rules. "Closure" is (D(t) - D(0)) minus the five cumulative terms:
float64 round-off only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers.nets import mlp, regression_data
from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.balance import (
    LEDGER_TERMS,
    BalanceLedger,
    discover_layers,
    pair_units,
    unit_balance,
    unit_symmetry,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MOM, WD, SYM, DISC, OTHER = range(5)
assert LEDGER_TERMS == (
    "momentum",
    "weight_decay",
    "symmetry",
    "discretisation",
    "other",
    "rounding",
)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "gd": lambda ps, wd: PolyakSGD(ps, lr=0.05, momentum=0.0, weight_decay=wd),
    "polyak": lambda ps, wd: PolyakSGD(ps, lr=0.05, momentum=0.9, weight_decay=wd),
    "nesterov": lambda ps, wd: NesterovSGD(ps, lr=0.05, momentum=0.9, weight_decay=wd),
    "sgd": lambda ps, wd: torch.optim.SGD(ps, lr=0.05, weight_decay=wd),
    "sgd_momentum": lambda ps, wd: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=wd),
    "sgd_nesterov": lambda ps, wd: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=wd
    ),
}


def _ledger(net: nn.Module, opt: torch.optim.Optimizer, layers: Any = None) -> BalanceLedger:
    found = discover_layers(net, layers)
    units = pair_units(net, layers)
    ledger = BalanceLedger(
        {k: [p for _, p in v] for k, v in found.items()}, opt, units=units, module=net
    )
    ledger.attach()
    ledger.start()
    return ledger


def _run(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    layers: Any = None,
    scheduler: Any = None,
    each: Callable[[BalanceLedger], None] | None = None,
) -> BalanceLedger:
    ledger = _ledger(net, opt, layers)
    after = None if each is None else (lambda: each(ledger))
    _train(net, opt, steps, data, scheduler=scheduler, each=after)
    return ledger


def _train(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    scheduler: Any = None,
    each: Callable[[], Any] | None = None,
) -> None:
    """``steps`` full-batch steps of the square loss (then ``scheduler.step()`` and ``each()``)."""
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if each is not None:
            each()


def _rel(closure: torch.Tensor, d: torch.Tensor, d0: torch.Tensor, sums: torch.Tensor) -> float:
    scale = torch.maximum(torch.maximum(d.abs(), d0.abs()), sums.abs().amax(-1))
    return float((closure.abs() / scale).max())


class _Closure:
    """Checks closure per pair and per unit after every step; records the worst relative error."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_other = 0.0

    def __call__(self, ledger: BalanceLedger) -> None:
        out = ledger.read()
        self.worst = max(self.worst, _rel(out["closure"], out["D"], out["D0"], out["sums"]))
        scale = torch.maximum(out["D"].abs(), out["D0"].abs())
        scale = torch.maximum(scale, out["sums"].abs().amax(-1))
        self.worst_other = max(self.worst_other, float((out["sums"][:, OTHER].abs() / scale).max()))
        for unit in ledger.read_units().values():
            err = _rel(unit["closure"], unit["D"], unit["D0"], unit["sums"])
            self.worst = max(self.worst, err)


# the dict grouping pairs each hidden unit's bias with its incoming weights
GROUPED = {"a": ["0.weight", "0.bias"], "b": ["2.weight", "2.bias"], "c": ["4.weight"]}
SCHEDULES = [False, True]
WEIGHT_DECAYS = [0.0, 0.01]


def _sgd_family_run(
    name: str, schedule: bool, weight_decay: float
) -> tuple[_Closure, BalanceLedger]:
    """20 steps of ``OPTIMIZERS[name]`` (with OneCycleLR if ``schedule``) on :func:`mlp` with the
    ledger of the ``GROUPED`` layers, closure checked after every step."""
    net = mlp()
    opt = OPTIMIZERS[name](net.parameters(), weight_decay)
    plain = name in ("gd", "sgd")
    scheduler = (
        # OneCycleLR also cycles the momentum, which would turn GD into heavy ball
        torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=20, cycle_momentum=not plain
        )
        if schedule
        else None
    )
    check = _Closure()
    ledger = _run(net, opt, 20, regression_data(), layers=GROUPED, scheduler=scheduler, each=check)
    return check, ledger


def _adam_run() -> tuple[_Closure, BalanceLedger]:
    """30 steps of Adam (weight decay 0.01): the generic split, closure checked every step."""
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=0.01)
    check = _Closure()
    return check, _run(net, opt, 30, regression_data(), layers=GROUPED, each=check)


@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_closure_every_step_sgd_family(name: str, schedule: bool, weight_decay: float) -> None:
    plain = name in ("gd", "sgd")
    check, ledger = _sgd_family_run(name, schedule, weight_decay)
    # The ledger recovers x_t from the state after each step with the optimiser's rule, so a wrong
    # rule leaves an O(1) closure error. float64: D and the terms are sums of O(100) products,
    # each step adds ~1e-16 relative rounding; 20 steps stay far below 1e-10 (measured ~1e-15)
    assert check.worst < 1e-10
    # the SGD family has no unexplained first-order part: round-off only, relative to the size
    # of D and the terms (measured <= 1e-12); the split itself is checked against an independent
    # computation in test_terms_match_an_independent_per_step_computation
    assert check.worst_other < 1e-10
    sums = ledger.read()["sums"]
    assert (sums[:, MOM].abs().max() > 1e-4) == (not plain)
    assert (sums[:, WD].abs().max() > 1e-4) == (weight_decay > 0)
    assert sums[:, DISC].abs().max() > 1e-4
    ledger.detach()


def test_adam_generic_split_closes_with_other_nonzero() -> None:
    check, ledger = _adam_run()
    assert check.worst < 1e-10  # float64 round-off, as above
    sums = ledger.read()["sums"]
    assert float(sums[:, OTHER].abs().max()) > 1e-3  # preconditioning: not explained
    assert float(sums[:, MOM].abs().max()) == 0.0 and float(sums[:, WD].abs().max()) == 0.0


def test_nesterov_ledger_is_at_the_iterate() -> None:
    """D is read at x (opt.iterate), not at the look-ahead parameters y."""
    net = mlp(bias=False)
    opt = NesterovSGD(net.parameters(), lr=0.05, momentum=0.9)
    ledger = _run(net, opt, 10, regression_data())
    out = ledger.read()
    xs = [opt.iterate(p) for p in net.parameters()]
    sq = torch.stack([x.square().sum() for x in xs])
    expected = sq[:-1] - sq[1:]
    # float64 norms of the same tensors: rounding only
    torch.testing.assert_close(out["D"], expected, rtol=1e-12, atol=0)
    ys = torch.stack([p.detach().square().sum() for p in net.parameters()])
    assert float((ys[:-1] - ys[1:] - expected).abs().max()) > 1e-6  # y really differs


def test_symmetry_term_zero_for_homogeneous_groupings() -> None:
    # bias-free: every unit homogeneous, and so every layer pair
    net = mlp(bias=False)
    ledger = _run(net, PolyakSGD(net.parameters(), lr=0.05, momentum=0.9), 20, regression_data())
    sums = ledger.read()["sums"]
    # R = 0 exactly in exact arithmetic; float64 rounding of O(100)-term inner products
    assert float((sums[:, SYM].abs() / sums.abs().amax(-1)).max()) < 1e-12
    # biased, correctly grouped (each hidden unit's bias with its incoming weights; the
    # output bias is not part of the one pair)
    torch.manual_seed(0)
    net2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    layers = {"h": ["0.weight", "0.bias"], "o": ["2.weight"]}
    ledger2 = _run(
        net2,
        PolyakSGD(net2.parameters(), lr=0.05, momentum=0.9),
        20,
        regression_data(),
        layers=layers,
    )
    sums2 = ledger2.read()["sums"]
    assert float((sums2[:, SYM].abs() / sums2.abs().amax(-1)).max()) < 1e-12


def test_symmetry_term_equals_the_bias_term_of_the_wrong_grouping() -> None:
    """Default layers (W_h, b_h): the pair h, h+1 wrongly counts b_{h+1}; under GD the
    symmetry term is then exactly sum_t 2 lr <b_{h+1}, g_{b_{h+1}}>."""
    lr = 0.05
    net = mlp(bias=True)
    opt = PolyakSGD(net.parameters(), lr=lr, momentum=0.0)
    expected = torch.zeros(2, dtype=torch.float64)
    biases = [net[2].bias, net[4].bias]

    ledger = _ledger(net, opt)
    x, y = regression_data()
    for _ in range(20):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        for k, b in enumerate(biases):
            expected[k] += 2 * lr * float((b.detach() * b.grad).sum())
        opt.step()
    sums = ledger.read()["sums"]
    assert float(expected.abs().min()) > 1e-4  # not vacuous
    # float64 rounding of a few hundred products per step
    torch.testing.assert_close(sums[:, SYM], expected, rtol=1e-10, atol=0)


def test_corrected_diff_heavy_ball() -> None:
    """Q_{t+1} - Q_t = lr^2 (1+mu)/(1-mu) E_{t+1} at every step (heavy ball, no decay)."""
    lr, mu = 0.05, 0.9
    net = mlp(bias=False)
    opt = PolyakSGD(net.parameters(), lr=lr, momentum=mu)
    rows: list[dict[str, torch.Tensor]] = []
    _run(net, opt, 25, regression_data(), each=lambda led: rows.append(led.read()))
    first = _ledger(mlp(bias=False), PolyakSGD(mlp(bias=False).parameters(), lr=lr))
    assert first.read()["Q"] is not None
    for a, b in itertools.pairwise(rows):
        change = b["Q"] - a["Q"]
        disc = b["sums"][:, DISC] - a["sums"][:, DISC]  # lr^2 E_{t+1}
        predicted = (1 + mu) / (1 - mu) * disc
        assert float(predicted.abs().min()) > 1e-8  # not vacuous
        # float64: Q is D plus a K term of size ~|x|^2; rounding ~1e-15 of it
        scale = float(a["D"].abs().max() + b["Q"].abs().max())
        torch.testing.assert_close(change, predicted, rtol=0, atol=1e-12 * scale)


def test_q_not_given_for_look_ahead_optimisers() -> None:
    net = mlp(bias=False)
    ledger = _run(net, NesterovSGD(net.parameters(), lr=0.05), 2, regression_data())
    assert ledger.read()["Q"] is None


def _resumed(net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> BalanceLedger:
    """A fresh ledger of ``net``'s layers and units, restored from ``state`` and attached."""
    ledger = BalanceLedger(
        {k: [p for _, p in v] for k, v in discover_layers(net).items()},
        opt,
        units=pair_units(net),
        module=net,
    )
    ledger.load_state_dict(state)
    ledger.attach()
    return ledger


def test_state_dict_continues_exactly() -> None:
    data = regression_data()
    net = mlp()
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    whole = _run(net, opt, 10, data)

    net2 = mlp()
    opt2 = PolyakSGD(net2.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    half = _run(net2, opt2, 5, data)
    state = half.state_dict()
    half.detach()
    resumed = _resumed(net2, opt2, state)
    _train(net2, opt2, 5, data)
    a, b = resumed.read(), whole.read()
    # same operations in the same order, sums restored through Python floats (exact)
    torch.testing.assert_close(a["sums"], b["sums"], rtol=1e-13, atol=0)
    ua, ub = resumed.read_units(), whole.read_units()
    for k in ua:
        torch.testing.assert_close(ua[k]["sums"], ub[k]["sums"], rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="pairs"):
        resumed.load_state_dict({**state, "pairs": ["x-y"]})


def test_state_dict_keeps_the_torch_nesterov_lookahead_format() -> None:
    """``sgd_lookahead`` keeps its format, rows ``[[optimizer index, group index], eta mu]`` with
    the last step's eta (a scheduler changed lr since), and a ledger restored from it continues
    the series of an uninterrupted one under ``torch.optim.SGD(nesterov=True)``."""
    data, decay = regression_data(), lambda t: 0.8**t

    def sgd(net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    net = mlp()
    opt = sgd(net)
    whole = _run(net, opt, 10, data, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, decay))
    net2 = mlp()
    opt2 = sgd(net2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt2, decay)
    half = _run(net2, opt2, 5, data, scheduler=schedule)
    state = half.state_dict()
    half.detach()
    # the fifth step ran at 0.05 * 0.8**4, the scheduler has set 0.05 * 0.8**5 since
    assert state["sgd_lookahead"] == [[[0, 0], pytest.approx(0.05 * 0.8**4 * 0.9, rel=1e-12)]]
    resumed = _resumed(net2, opt2, state)
    _train(net2, opt2, 5, data, scheduler=schedule)
    # same operations in the same order, sums restored through Python floats (exact up to the
    # last bits of the restored sums' re-association)
    torch.testing.assert_close(resumed.read()["sums"], whole.read()["sums"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ["polyak", "nesterov", "sgd_nesterov"])
def test_optimizer_load_state_dict_after_the_ledger_is_built(name: str) -> None:
    """The plain-PyTorch resume order: build the ledger, then ``opt.load_state_dict`` (which
    replaces every param-group dict; here with lr 0.01 instead of 0.1). The ledger must read the
    groups the optimiser steps with: before, it kept the dicts it saw when it was built, and
    its terms used the old lr (closure 1.4e-3 against a drift of 2.9e-3: half unexplained)."""
    net = mlp(bias=False)
    make = {
        "polyak": lambda ps: PolyakSGD(ps, lr=0.1, momentum=0.9),
        "nesterov": lambda ps: NesterovSGD(ps, lr=0.1, momentum=0.9),
        "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    }[name]
    opt = make(net.parameters())
    check = _Closure()
    ledger = _ledger(net, opt)
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.01
    opt.load_state_dict(saved)
    _train(net, opt, 20, regression_data(), each=lambda: check(ledger))
    # float64 round-off over 20 steps (measured ~1e-16); the stale lr gave ~0.5 of the drift
    assert check.worst < 1e-10
    sums = ledger.read()["sums"]
    assert sums[:, MOM].abs().max() > 1e-4


def test_skipped_and_gradless_steps() -> None:
    """A parameter without gradient is not updated and contributes nothing."""
    net = mlp(bias=False)
    net[4].weight.requires_grad_(False)
    opt = PolyakSGD([p for p in net.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    check = _Closure()
    _run(net, opt, 10, regression_data(), each=check)
    assert check.worst < 1e-10  # float64 round-off


@pytest.mark.slow  # 25 ledger runs of 20-30 steps: ~1.5 s
def test_closure_is_round_off_for_every_known_rule_and_adam() -> None:
    """The measured closure table: every run of test_closure_every_step_sgd_family and Adam's,
    made here, with the worst relative closure (per pair and per unit, after every step) and the
    SGD family's worst unexplained part ``other``, each below ``BOUND``; the table is the
    failure message."""
    # float64: D and each term are sums of O(100) products (relative rounding ~1e-16 each) over
    # 20-30 steps; measured at most 6.7e-15 (closure) and 5.9e-15 (other), so 1e-13 leaves a
    # 15x margin while a wrong rule or a missed term leaves O(1). The per-case tests above bound
    # the same numbers by 1e-10 only.
    bound = 1e-13
    rows: dict[str, tuple[float, float | None]] = {}
    for name, schedule, weight_decay in itertools.product(OPTIMIZERS, SCHEDULES, WEIGHT_DECAYS):
        check, ledger = _sgd_family_run(name, schedule, weight_decay)
        ledger.detach()
        rows[f"{name} schedule={schedule} wd={weight_decay}"] = (check.worst, check.worst_other)
    check, ledger = _adam_run()
    ledger.detach()
    rows["adam (generic split; other is not round-off)"] = (check.worst, None)
    width = max(map(len, rows))
    table = "\n".join(
        f"{key:<{width}}  closure {closure:.2e}"
        + ("" if other is None else f"  |other| {other:.2e}")
        for key, (closure, other) in rows.items()
    )
    assert len(rows) == 4 * len(OPTIMIZERS) + 1
    assert all(closure < bound for closure, _ in rows.values()), table
    assert all(other is None or other < bound for _, other in rows.values()), table


def _reference_terms(
    net: nn.Module, opt: torch.optim.Optimizer, steps: int, scheduler: Any = None
) -> torch.Tensor:
    """The ledger's terms computed independently: snapshots of x_t, v_t, g_t before each step
    and the update read after it, with the textbook formulas (layers: each Linear's weight and
    bias, the default grouping)."""
    params = list(net.parameters())
    layer_of = [k // 2 for k in range(len(params))]  # (W, b) per Linear
    nesterov = isinstance(opt, NesterovSGD)
    x, y = regression_data()
    sums = torch.zeros(max(layer_of), len(LEDGER_TERMS), dtype=torch.float64)

    def pm(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        dots = torch.zeros(max(layer_of) + 1, dtype=torch.float64)
        for layer, u, w in zip(layer_of, a, b, strict=True):
            dots[layer] += (u * w).sum()
        return dots[:-1] - dots[1:]

    for _ in range(steps):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        group = opt.param_groups[0]
        eta, mu, lam = float(group["lr"]), float(group["momentum"]), group["weight_decay"]
        c = (group["lookahead"] if group["lookahead"] is not None else eta * mu) if nesterov else 0
        x0 = [opt.iterate(p) for p in params]
        v0 = [opt.state.get(p, {}).get("velocity", torch.zeros_like(p)).clone() for p in params]
        g = [p.grad.clone() for p in params]
        y0 = [p.detach().clone() for p in params]
        opt.step()
        if scheduler is not None:
            scheduler.step()
        dx = [opt.iterate(p) - a for p, a in zip(params, x0, strict=True)]
        d, k = pm(x0, x0), pm(x0, v0)
        sums[:, MOM] += 2 * eta * mu * k + 2 * eta * c * pm(v0, g)
        sums[:, WD] += -2 * eta * lam * (d + c * k)
        sums[:, SYM] += -2 * eta * pm(y0, g)
        sums[:, DISC] += pm(dx, dx)
    return sums


@pytest.mark.parametrize("name", ["polyak", "nesterov"])
def test_terms_match_an_independent_per_step_computation(name: str) -> None:
    """The ledger recovers x_t and v_t from the state after each step; here they are
    snapshotted before it instead. Same terms, float64 rounding only."""
    results = []
    for reference in (False, True):
        net = mlp(bias=True)  # default grouping: the symmetry term is active
        opt = OPTIMIZERS[name](net.parameters(), 0.01)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40)
        if reference:
            results.append(_reference_terms(net, opt, 25, scheduler))
        else:
            ledger = _run(net, opt, 25, regression_data(), scheduler=scheduler)
            results.append(ledger.read()["sums"])
    ours, ref = results
    assert float(ref[:, [MOM, WD, SYM, DISC]].abs().min()) > 1e-4  # every term is active
    # float64 rounding of O(100)-term inner products over 25 steps
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_multi_tensor_squares_equal_dot_products(name: str, monkeypatch: Any) -> None:
    """Accelerators take the diagonal Gram entries of all tensors from one multi-tensor sum of
    squares, the CPU from one dot product each: the same sums (forced here on the CPU).

    This test pins which kernel runs; it spies on a private torch API (``torch._foreach_powsum``,
    the multi-tensor sum of squares) and sets the ledger's private switch ``_split_squares``
    (a missing attribute fails here, it is never set silently)."""
    powsum_calls: list[int] = []
    real = torch._foreach_powsum

    def spy(tensors, *args, **kwargs):  # type: ignore[no-untyped-def]
        powsum_calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_powsum", spy)
    results, calls = [], []
    for split in (False, True):
        monkeypatch.setattr(BalanceLedger, "_split_squares", split)
        powsum_calls.clear()
        net = mlp()
        opt = OPTIMIZERS[name](net.parameters(), 0.01)
        ledger = _run(net, opt, 12, regression_data())
        results.append(ledger.read()["sums"])
        calls.append(len(powsum_calls))
        ledger.detach()
    # the routing: dot products only without the switch, the multi-tensor sum at every step with
    # it (the 12 steps' squares of x_t, v_t or dx, whichever the rule needs, one call per row)
    assert calls[0] == 0 and calls[1] >= 12, calls
    dots, squares = results
    assert float(dots[:, DISC].abs().max()) > 1e-4
    # float64: the two reductions sum the same products in a different order
    torch.testing.assert_close(squares, dots, rtol=0, atol=1e-13 * float(dots.abs().max()))


def test_complex_parameters_per_unit_balance_and_closure() -> None:
    """Complex parameters count as real vectors: D_i uses |w|^2 (the old per-unit product summed
    Re(w^2) instead, and the per-unit closure did not hold)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 3, bias=False, dtype=torch.complex128),
        nn.Linear(3, 2, bias=False, dtype=torch.complex128),
    )
    w1, w2 = net[0].weight.detach(), net[1].weight.detach()
    expected = (w1.abs() ** 2).sum(1) - (w2.abs() ** 2).sum(0)
    # float64 sums of 4 and 2 squares
    torch.testing.assert_close(
        unit_balance(net, pair_units(net))["0"], expected, rtol=1e-14, atol=0
    )
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(10, 4, dtype=torch.complex128)
    y = torch.randn(10, 2, dtype=torch.complex128)
    check = _Closure()
    ledger = _ledger(net, opt)
    for _ in range(15):
        opt.zero_grad()
        (net(x) - y).abs().square().mean().backward()
        opt.step()
        check(ledger)
    # float64 round-off over 15 steps, as for real networks
    assert check.worst < 1e-10
    assert float(ledger.read_units()["0"]["sums"][:, DISC].abs().max()) > 1e-6
    # R_i = <in_i, g_in_i> - <out_i, g_out_i> with the real inner product Re(conj(w) g)
    (w1, g1), (w2, g2) = [(m.weight.detach(), m.weight.grad) for m in net]
    r = (w1.conj() * g1).real.sum(1) - (w2.conj() * g2).real.sum(0)
    torch.testing.assert_close(unit_symmetry(net, pair_units(net))["0"], r, rtol=1e-12, atol=1e-14)
    ledger.detach()
