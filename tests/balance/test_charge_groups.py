"""The ledger's grouped per-unit reductions: every layout of a part (rows, columns of a 4-d
weight, whole tensors, slices in blocks), tensors of one shape in param groups with different
rules, and blocks of rows small enough to force chunking, give the charges and the terms that the
part-by-part definitions give.

The charges here are written by hand and need not be symmetries: the ledger's identity
:math:`Q(t) - Q(0) = \\sum` terms holds for any partition of entries into units, so closure
checks every reduction and every coefficient of the grouped path.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from torch_momentum import PolyakSGD
from torch_momentum.balance import LEDGER_TERMS, BalanceLedger, SymmetryPart, _parts
from torch_momentum.balance._parts import part_values, signed_sum

OTHER = LEDGER_TERMS.index("other")


class _Net(nn.Module):
    """conv (2->6, 3x3) ReLU, flatten (96), lin1 (96->8) ReLU, lin2, lin3 (8->8) ReLU, head (4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.lin1, self.lin2, self.lin3 = nn.Linear(96, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        x = torch.relu(self.lin2(torch.relu(self.lin1(x))))
        return self.head(torch.relu(self.lin3(x)))


def _charge(name: str, kind: str, units: int, *parts: SymmetryPart) -> SimpleNamespace:
    return SimpleNamespace(name=name, kind=kind, units=units, parts=parts)


def _charges() -> list[SimpleNamespace]:
    p = SymmetryPart
    return [
        # rows of two equally shaped weights (and their biases) in different param groups
        *(
            _charge(f"{m} rows", "scale", 8, p(f"{m}.weight", 0, 0, 8, 1, 1.0, 0),
                    p(f"{m}.bias", 0, 0, 8, 1, 1.0, 0))
            for m in ("lin2", "lin3")
        ),
        # input channels of the conv (dim 1 of a 4-d weight) against a slice of lin1's columns
        # in blocks of 16 (one channel's 4x4 outputs)
        _charge(
            "conv/lin1", "rescale", 2,
            p("conv.weight", 1, 0, 2, 1, 1.0, 0), p("lin1.weight", 1, 16, 32, 16, -1.0, 0),
        ),
        _charge("lin1 whole", "scale", 1, p("lin1.weight", None, 0, 0, 1, 1.0, 0)),
        _charge("conv kernel rows", "rescale", 3, p("conv.weight", 2, 0, 3, 1, 1.0, 0)),
        _charge(
            "head columns", "translation", 9,
            p("head.weight", 1, 0, 8, 1, 1.0, 0), p("head.bias", None, 0, 0, 1, 1.0, 8),
        ),
        _charge("conv rows, linear", "translation", 6, p("conv.weight", 0, 0, 6, 1, 1.0, 0)),
    ]  # fmt: skip


def _train(
    optimizer: Callable[[_Net], torch.optim.Optimizer], steps: int = 12
) -> tuple[_Net, BalanceLedger]:
    torch.manual_seed(0)
    net = _Net().double()
    opt = optimizer(net)
    ledger = BalanceLedger(None, opt, module=net, symmetries=_charges())
    ledger.attach()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, ledger


def _two_groups(net: _Net) -> torch.optim.Optimizer:
    first = [*net.conv.parameters(), *net.lin1.parameters(), *net.lin2.parameters()]
    second = [*net.lin3.parameters(), *net.head.parameters()]
    return PolyakSGD(
        [
            {"params": first, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
            {"params": second, "lr": 0.02, "momentum": 0.8},
        ]
    )


OPTIMIZERS: dict[str, Callable[[_Net], torch.optim.Optimizer]] = {
    "polyak, two param groups": _two_groups,
    "adam (generic split)": lambda net: torch.optim.Adam(net.parameters(), lr=0.01),
}


@pytest.mark.parametrize("small", [False, True], ids=["one block", "many blocks"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grouped_charges_close_and_match_the_parts(
    name: str, small: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per unit of every charge: Q(t) equals the part-by-part sums (float64, 1e-13 relative:
    a few hundred products summed in another order), the terms close (12 steps of O(10)-term
    sums: 1e-12 of the charge's scale), and for the known rule nothing is left in ``other``."""
    if small:  # blocks of a few rows, rows cut in pieces: every chunked path runs
        monkeypatch.setattr(_parts, "CHUNK_CAP", 40)
        monkeypatch.setattr(_parts, "ROW_CAP", 7)
    net, ledger = _train(OPTIMIZERS[name])
    named = dict(net.named_parameters())
    charges = ledger.read_charges()
    for charge in _charges():
        row = charges[charge.name]
        linear = charge.kind == "translation"

        def value(part: SymmetryPart, linear: bool = linear) -> Tensor:
            return part_values(named[part.param], part, linear)

        expected = signed_sum(charge.parts, charge.units, value)
        scale = float(expected.abs().max()) + 1.0
        torch.testing.assert_close(row["D"], expected, rtol=0, atol=1e-13 * scale)
        assert float(row["closure"].abs().max()) <= 1e-12 * scale, charge.name
        if name.startswith("polyak"):
            assert float(row["sums"][:, OTHER].abs().max()) <= 1e-12 * scale, charge.name


def test_chunked_reductions_give_the_same_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    """The terms do not depend on how the rows are blocked (float64: 1e-12 relative)."""
    _, whole = _train(_two_groups)
    monkeypatch.setattr(_parts, "CHUNK_CAP", 40)
    monkeypatch.setattr(_parts, "ROW_CAP", 7)
    _, blocked = _train(_two_groups)
    a, b = whole.read_charges(), blocked.read_charges()
    for name in a:
        scale = float(a[name]["sums"].abs().max()) + 1e-30
        torch.testing.assert_close(b[name]["sums"], a[name]["sums"], rtol=0, atol=1e-12 * scale)
