"""The ledger where it used to be silently wrong: GradScaler with optimisers that unscale and skip
themselves, low-precision parameters, dampening, a parameter in two layers, sparse gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.balance import LEDGER_TERMS, BalanceLedger, pair_units
from torch_momentum.balance.rules import TorchSGD, rule_for

MOM, WD, SYM, DISC, OTHER, ROUND = (LEDGER_TERMS.index(t) for t in LEDGER_TERMS)


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g).to(dtype), torch.randn(32, 3, generator=g).to(dtype)


def _layers(net: nn.Sequential) -> dict[str, list[torch.Tensor]]:
    return {"0": [net[0].weight, net[0].bias], "2": [net[2].weight, net[2].bias]}


def _scale(out: dict) -> float:
    return float(out["D0"].abs().max()) + float(out["D"].abs().max())


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
    ],
    ids=["sgd-fused", "sgd-fused-wd", "adam-fused"],
)
def test_grad_scaler_with_optimisers_that_unscale_and_skip_themselves(make) -> None:
    """GradScaler calls step() of a `_step_supports_amp_scaling` optimiser with scaled (and on
    overflow infinite) gradients and lets the kernel unscale and skip. The ledger must read the
    gradients unscaled and leave skipped steps out: its sums stayed NaN after the first overflow
    (12 steps, 2 forced overflows) and counted scaled gradients before."""
    net = _mlp()
    opt = make(net.parameters())
    assert getattr(opt, "_step_supports_amp_scaling", False)
    units = pair_units(net)
    ledger = BalanceLedger(_layers(net), opt, units=units, module=net)
    ledger.attach()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = _data()
    skipped = 0
    for step in range(12):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        if step in (3, 7):
            loss = loss * math.inf  # forced overflow: GradScaler skips the step
        before = [p.detach().clone() for p in net.parameters()]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
        skipped += not moved
    assert skipped == 2
    out = ledger.read()
    assert bool(torch.isfinite(out["sums"]).all())
    # float64, 10 applied steps of O(1)-term sums: 1e-12 of the scale is far above round-off
    # and far below any mis-scaled gradient (the scale is 2**10)
    assert float(out["closure"].abs().max()) <= 1e-12 * _scale(out)
    for name, row in ledger.read_units().items():
        assert bool(torch.isfinite(row["sums"]).all()), name
        scale = float(row["D0"].abs().max() + row["D"].abs().max())
        assert float(row["closure"].abs().max()) <= 1e-12 * scale, name
    if isinstance(opt, torch.optim.SGD):  # a known rule: nothing unexplained
        assert float(out["sums"][:, OTHER].abs().max()) <= 1e-12 * _scale(out)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    ],
    ids=["sgd-fused", "adam-fused", "sgd"],
)
def test_grad_scaler_leaves_the_terms_as_without_it(make) -> None:
    """A power-of-two GradScaler changes nothing in float64: the parameters are bit for bit
    those of the run without it, and so must be the terms. Fused optimisers unscale the
    gradients in place; the ledger divided them by the scale once more (the symmetry term
    came out 1024x too small, momentum half), which the closure alone cannot see."""

    def run(scaled: bool) -> tuple[dict, dict]:
        net = _mlp()
        opt = make(net.parameters())
        ledger = BalanceLedger(_layers(net), opt, units=pair_units(net), module=net)
        ledger.attach()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        x, y = _data()
        for _ in range(6):
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        return ledger.read(), ledger.read_units()["0"]

    (pair, unit), (pair0, unit0) = run(True), run(False)
    assert torch.equal(pair["D"], pair0["D"])  # the same trajectory
    # the same float64 numbers up to the order of a few sums: 1e-12 relative
    torch.testing.assert_close(pair["sums"], pair0["sums"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(unit["sums"], unit0["sums"], rtol=1e-12, atol=1e-15)


def _bf16_run(ledger_on: bool, steps: int = 50) -> tuple[nn.Sequential, BalanceLedger | None]:
    net = _mlp(torch.bfloat16)
    opt = PolyakSGD(net.parameters(), lr=0.005, momentum=0.9)
    ledger = BalanceLedger(_layers(net), opt) if ledger_on else None
    if ledger is not None:
        ledger.attach()
    x, y = _data(torch.bfloat16)
    for _ in range(steps):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    return net, ledger


def test_low_precision_rounding_is_a_term_and_closure_is_round_off() -> None:
    """bfloat16 PolyakSGD, 50 steps at lr 0.005: the rounding of p + lr v (and lost updates) is
    most of the drift. It used to land in the closure (closure ~ the drift, sign wrong on one
    pair); now the `rounding` term carries it and the closure is float64 round-off."""
    _, ledger = _bf16_run(True)
    assert ledger is not None
    out = ledger.read()
    drift = out["D"] - out["D0"]
    rounding = out["sums"][:, ROUND]
    assert float(rounding.abs().max()) > 0.1 * float(drift.abs().max())  # it matters here
    # float64 accumulation of bfloat16 values (each exact in float64) over 50 steps
    assert float(out["closure"].abs().max()) <= 1e-12 * _scale(out)
    assert float(out["sums"][:, OTHER].abs().max()) <= 1e-12 * _scale(out)


LOOKAHEAD = {
    "polyak": lambda ps: PolyakSGD(ps, lr=0.05, momentum=0.9),
    "nesterov": lambda ps: NesterovSGD(ps, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(LOOKAHEAD))
def test_low_precision_pairs_split_as_their_units_and_look_ahead_closes(
    name: str, dtype: torch.dtype
) -> None:
    """A bias-free pair's D is the sum of its hidden units' D_i, so its terms are the sums of
    theirs. In bf16/fp16 the pair put momentum and discretisation into `rounding` (its step
    matrix was cached from the first step, which has no pre-step velocity), and under
    look-ahead optimisers the iterate was rounded to the parameter's dtype: closure 2.7e-3 of
    the charge (units) and 1.2e-2 (pair) instead of round-off."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    net = net.to(dtype)
    opt = LOOKAHEAD[name](net.parameters())
    layers = {"a": [net[0].weight], "b": [net[2].weight]}
    ledger = BalanceLedger(layers, opt, units=pair_units(net), module=net)
    ledger.attach()
    x, y = _data(dtype)
    x = torch.cat([x, x[:, :1]], 1)  # 6 inputs
    for _ in range(6):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    pair, units = ledger.read(), ledger.read_units()["0"]
    # float64 sums of bf16/fp16 values, each exact in float64: round-off ~1e-16 of the scale
    torch.testing.assert_close(pair["sums"][0], units["sums"].sum(0), rtol=1e-12, atol=1e-15)
    assert float(pair["closure"].abs().max()) <= 1e-12 * _scale(pair)
    assert float((units["closure"].abs() / units["scale"]).max()) <= 1e-12
    assert float(pair["sums"][0, MOM].abs()) > 0.0  # momentum is booked as momentum


def test_low_precision_ledger_does_not_change_the_trajectory() -> None:
    """The pre-step copies are read only: the bfloat16 parameters are bit for bit those of a run
    without the ledger."""
    with_ledger, _ = _bf16_run(True, steps=10)
    without, _ = _bf16_run(False, steps=10)
    for a, b in zip(with_ledger.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_dampening_is_a_known_rule(weight_decay: float) -> None:
    """torch.optim.SGD(dampening=0.3): v <- mu v - (1 - tau) d, except at the first step
    (v_1 = -d_0). It fell back to the generic split silently; now it is known: `other` is
    round-off and the ledger closes."""
    net = _mlp()
    opt = torch.optim.SGD(
        net.parameters(), lr=0.05, momentum=0.9, dampening=0.3, weight_decay=weight_decay
    )
    assert isinstance(rule_for(opt), TorchSGD) and rule_for(opt).known(opt.param_groups[0])
    ledger = BalanceLedger(_layers(net), opt, units=pair_units(net), module=net)
    ledger.attach()
    x, y = _data()
    for _ in range(20):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    out = ledger.read()
    scale = _scale(out)
    assert float(out["closure"].abs().max()) <= 1e-12 * scale
    assert float(out["sums"][:, OTHER].abs().max()) <= 1e-12 * scale
    assert float(out["sums"][:, MOM].abs().max()) > 1e-6 * scale
    assert out["Q"] is None  # the heavy-ball correction does not apply with dampening
    for row in ledger.read_units().values():
        unit_scale = float(row["D0"].abs().max() + row["D"].abs().max())
        assert float(row["closure"].abs().max()) <= 1e-12 * unit_scale
        assert float(row["sums"][:, OTHER].abs().max()) <= 1e-12 * unit_scale


def test_a_parameter_in_two_layers_is_an_error() -> None:
    """discover_layers rejects layers that share a parameter; the ledger accepted them silently
    (counting the tensor in both layers). Same ValueError now."""
    net = _mlp()
    opt = PolyakSGD(net.parameters(), lr=0.1)
    layers = {"a": [net[0].weight], "b": [net[0].weight, net[2].weight]}
    with pytest.raises(ValueError, match=r"overlap.*'a'.*'b'"):
        BalanceLedger(layers, opt)


def test_sparse_gradients() -> None:
    """nn.Embedding(sparse=True) stepped by torch.optim.SGD(momentum=...): the ledger reads the
    sparse gradient densely and closes."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, sparse=True).double()
    head = nn.Linear(6, 1, bias=False).double()
    opt_e = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    opt_h = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    ledger = BalanceLedger({"emb": [emb.weight], "head": [head.weight]}, [opt_e, opt_h])
    ledger.attach()
    idx = torch.randint(0, 20, (16,), generator=torch.Generator().manual_seed(2))
    target = torch.randn(16, 1, dtype=torch.float64)
    for _ in range(10):
        opt_e.zero_grad()
        opt_h.zero_grad()
        ((head(emb(idx)) - target) ** 2).mean().backward()
        assert emb.weight.grad.is_sparse
        opt_e.step()
        opt_h.step()
    out = ledger.read()
    assert float(out["closure"].abs().max()) <= 1e-12 * _scale(out)
    assert float(out["sums"][:, OTHER].abs().max()) <= 1e-12 * _scale(out)
