"""Per-unit balance in plain torch: ``pair_units`` (which hidden units pair across two layers, and
the clear errors for models that do not pair), ``unit_balance`` and ``unit_symmetry``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.nets import cnn, mlp, regression_data
from torch_momentum.balance import pair_units, unit_balance, unit_symmetry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_unit_conservation_in_the_gradient_flow_limit(kind: str) -> None:
    """GD: per-unit drift is second order in lr; lr -> lr/10 over the same time: ~10x less."""
    lr, time = (0.05, 1.0) if kind == "mlp" else (0.02, 0.4)
    drifts = []
    for rate in (lr, lr / 10):
        net = mlp(bias=True) if kind == "mlp" else cnn()
        units = pair_units(net)
        d0 = unit_balance(net, units)
        opt = torch.optim.SGD(net.parameters(), lr=rate)
        x, y = regression_data(kind)
        for _ in range(round(time / rate)):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
        d = unit_balance(net, units)
        drifts.append(max(float((d[k] - d0[k]).abs().max()) for k in d))
        change = max(float(d0[k].abs().max()) for k in d)
        assert drifts[-1] < 0.05 * change or rate < lr  # small drift vs the balance itself
    ratio = drifts[0] / drifts[1]
    # first order in lr (sum over time/lr steps of lr^2 terms): ratio ~10; 6..14 allows the
    # higher-order terms and the trajectory's own dependence on lr
    assert 6 < ratio < 14, ratio


def test_unit_symmetry_zero_for_homogeneous_units() -> None:
    net = cnn()
    x, y = regression_data("cnn")
    ((net(x) - y) ** 2).mean().backward()
    units = pair_units(net)
    assert [(u.name, u.units, u.next_weight) for u in units] == [
        ("0", 3, "3.weight"),
        ("3", 4, "7.weight"),
    ]
    r = unit_symmetry(net, units)
    scale = max(float(p.grad.abs().max()) for p in net.parameters())
    # Euler's identity per unit; float64 rounding of a few hundred products
    assert all(float(v.abs().max()) < 1e-12 * scale for v in r.values())


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x)


@pytest.mark.parametrize(
    ("net", "match"),
    [
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), r"'1'.*BatchNorm1d"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), r"'1'.*Tanh"),
        (nn.Sequential(nn.Linear(3, 4), _Residual(), nn.Linear(4, 2)), r"'1'.*_Residual"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1)), "groups"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Linear(4, 2)), r"'0'.*'2'"),
    ],
)
def test_unpairable_models_are_clear_errors(net: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pair_units(net)


def test_layers_restrict_pairing_to_a_pairable_part() -> None:
    net = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)
    )
    units = pair_units(net, ["0", "2"])
    assert [(u.name, u.next_name, u.bias) for u in units] == [("0", "2", "0.bias")]


def test_custom_blocks_elsewhere_do_not_block_a_restricted_pairing() -> None:
    """A residual block or a torch.compile'd submodule elsewhere in the model used to make the
    chain walk raise before `layers=` was looked at; now only a block BETWEEN paired layers is an
    error (issue 20 item 4)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), _Residual(), nn.Linear(4, 2))
    assert [u.name for u in pair_units(net, ["0", "2"])] == ["0"]
    with pytest.raises(ValueError, match=r"'3'.*_Residual.*own forward"):
        pair_units(net, ["2", "4"])
    compiled = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), torch.compile(_Residual())
    )
    assert [u.name for u in pair_units(compiled, ["0", "2"])] == ["0"]


def test_flatten_must_flatten_every_dimension_after_the_channels() -> None:
    """Flatten(1, 2) after a Conv2d groups each channel's rows, not its positions: it used to be
    accepted and mis-paired channels with columns (R_i = 0.43); now refused. Flatten(-3) on the
    4-d output is Flatten(1) and pairs exactly as it."""

    def net(flatten: nn.Flatten) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.ReLU(), flatten, nn.Linear(3 * 4 * 4, 2)
        ).double()

    with pytest.raises(ValueError, match=r"Flatten '2'.*end_dim=2"):
        pair_units(net(nn.Flatten(1, 2)))
    reference, negative = net(nn.Flatten(1)), net(nn.Flatten(-3))
    assert pair_units(negative) == pair_units(reference)
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    negative(x).square().sum().backward()
    r = unit_symmetry(negative, pair_units(negative))["0"]
    assert float(r.abs().max()) < 1e-12  # correctly paired: the symmetry holds unit by unit
