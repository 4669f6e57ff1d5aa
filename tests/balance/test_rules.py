"""Update rules as objects: a rule registered for a new optimiser makes its ledger close with the
known split (momentum, weight decay, symmetry, discretisation) instead of the generic one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.balance import BalanceLedger
from torch_momentum.balance._gram import sums_of_squares
from torch_momentum.balance.rules import (
    GENERIC_RULE,
    HeavyBall,
    Nesterov,
    Rule,
    TorchSGD,
    register_rule,
    rule_for,
)


class ToyHeavyBall(torch.optim.Optimizer):
    """Heavy ball written as a user might: the state keeps ``buf = -v`` under the key "buf",
    ``buf <- mu buf + g + lam p; p <- p - lr buf``."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad).add_(p, alpha=group["weight_decay"])
                p.sub_(buf, alpha=group["lr"])


def _run(opt_factory, steps: int = 25) -> dict:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, bias=False)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    opt = opt_factory(net.parameters())
    ledger = BalanceLedger({"a": [net[0].weight, net[0].bias], "b": [net[2].weight]}, opt)
    ledger.attach()
    for _ in range(steps):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    out = ledger.read()
    ledger.detach()
    return out


def test_a_registered_rule_makes_a_toy_optimiser_close_with_the_known_split() -> None:
    """Without a rule the toy optimiser gets the generic split (its momentum and weight decay
    land in `other`); with HeavyBall("buf", -1) registered, `other` is round-off and the
    momentum and weight-decay terms carry the drift. Either way the ledger closes."""

    def toy(params):
        return ToyHeavyBall(params, lr=0.05, momentum=0.9, weight_decay=0.01)

    generic = _run(toy)
    scale = float(generic["D0"].abs().max())
    assert float(generic["closure"].abs().max()) <= 1e-12 * scale
    assert abs(float(generic["sums"][0, 4])) > 1e-4 * scale  # other: the unexplained part
    register_rule(ToyHeavyBall, HeavyBall("buf", velocity_sign=-1.0))
    known = _run(toy)
    # float64, 25 steps of O(1) roundings each: 1e-12 of the scale is far above round-off and
    # far below any missing term (the momentum term is ~1e-2 of the scale here)
    assert float(known["closure"].abs().max()) <= 1e-12 * scale
    assert abs(float(known["sums"][0, 4])) <= 1e-12 * scale
    assert abs(float(known["sums"][0, 0])) > 1e-4 * scale  # momentum
    assert abs(float(known["sums"][0, 1])) > 1e-6 * scale  # weight decay
    # the same trajectory: D(t) agrees, only the split differs
    torch.testing.assert_close(known["D"], generic["D"], rtol=0, atol=1e-12 * scale)


def test_rule_lookup_is_by_class_with_subclasses_where_allowed() -> None:
    p = nn.Parameter(torch.zeros(2))

    class MyPolyak(PolyakSGD):
        pass

    class MySGD(torch.optim.SGD):
        pass

    assert isinstance(rule_for(PolyakSGD([p])), HeavyBall)
    assert isinstance(rule_for(MyPolyak([p])), HeavyBall)  # a subclass keeps the update
    assert isinstance(rule_for(NesterovSGD([p])), Nesterov)
    assert isinstance(rule_for(torch.optim.SGD([p], lr=0.1)), TorchSGD)
    assert type(rule_for(MySGD([p], lr=0.1))) is Rule  # may change the update: generic
    assert type(rule_for(torch.optim.Adam([p]))) is Rule


def test_register_rule_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="optimizer_type"):
        register_rule(nn.Linear, HeavyBall())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rule"):
        register_rule(ToyHeavyBall, "heavy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="velocity_sign"):
        HeavyBall("buf", velocity_sign=2.0)


def test_attach_starts_the_series() -> None:
    """attach() records D(0) when no series was started: reading after some steps gives the
    terms of those steps (read() used to start the series itself, discarding them)."""

    def polyak(params):
        return PolyakSGD(params, lr=0.05, momentum=0.9)

    out = _run(polyak, steps=5)
    scale = float(out["D0"].abs().max())
    assert abs(float(out["sums"].abs().sum())) > 1e-6 * scale
    assert float((out["D"] - out["D0"]).abs().max()) > 1e-6 * scale
    assert float(out["closure"].abs().max()) <= 1e-12 * scale


def test_unregistered_optimisers_share_the_generic_rule() -> None:
    """Adam (and a subclass of torch.optim.SGD, registered without subclasses) get the one
    stateless generic split, the rule the ledger also uses for groups it copies."""
    p = nn.Parameter(torch.zeros(2))

    class MySGD(torch.optim.SGD):
        pass

    assert rule_for(torch.optim.Adam([p])) is GENERIC_RULE
    assert rule_for(MySGD([p], lr=0.1)) is GENERIC_RULE
    assert type(GENERIC_RULE) is Rule and not GENERIC_RULE.known({"lr": 0.1})


def test_sums_of_squares_accumulates_half_precision_in_float64() -> None:
    """4096 bfloat16 ones sum to 4096 exactly in float64 (a bfloat16 accumulator stops at 256,
    where adding 1 no longer changes it); float32 stays float32."""
    half, single = torch.ones(4096, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float32)
    sums = sums_of_squares([half, half, single])
    assert [t.dtype for t in sums] == [torch.float64, torch.float64, torch.float32]
    assert [float(t) for t in sums] == [4096.0, 4096.0, 3.0]
