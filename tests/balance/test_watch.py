"""NetworkWatch: the default balance metrics of a network in plain torch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_momentum import NesterovSGD
from torch_momentum.balance import find_symmetries
from torch_momentum.balance.watch import NetworkWatch


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8, bias=False),
        nn.ReLU(),
        nn.Linear(8, 6, bias=False),
        nn.ReLU(),
        nn.Linear(6, 3, bias=False),
    ).double()


def _loss(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(m(batch[0]), batch[1])


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (32,), generator=g
    )


def test_unit_symmetry_is_round_off_under_nesterov() -> None:
    """A bias-free ReLU unit's <w, g> in minus out is 0 at the point where the gradient was
    taken (Euler's identity for the 1-homogeneous ReLU). Under Nesterov that point is the
    look-ahead parameters, not the iterate x = y - c v: the per-unit symmetry metric must be
    round-off, not the momentum's c <v, g> (~1e-3 here)."""
    net, batch = _mlp(), _batch()
    symmetries = find_symmetries(net, _loss, [batch], kinds=("rescale",))
    assert sum(s.kind == "rescale" for s in symmetries) == 2
    opt = NesterovSGD(net.parameters(), lr=0.1, momentum=0.9)
    watch = NetworkWatch(net, [opt], symmetries, neurons=True)
    watch.start()
    for _ in range(5):
        opt.zero_grad()
        _loss(net, batch).backward()
        opt.step()
    opt.zero_grad()
    _loss(net, batch).backward()  # the gradient at the parameters (the look-ahead point)
    metrics = watch.metrics()
    # float64 sums of ~50 products of O(1) entries with O(0.1) gradients: round-off ~1e-16;
    # the iterate's error is c <v, g> = eta mu <v, g>, ~1e-3 after 5 steps
    assert metrics["balance/unit_symmetry_max"] < 1e-12, metrics["balance/unit_symmetry_max"]
    watch.close()
