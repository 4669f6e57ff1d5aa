"""One ledger for every charge: scale, rescale and translation charges close per unit for every
optimiser, the symmetry term is round-off where the symmetry holds, translation is kept exactly
by heavy ball and broken by Adam, and the angular update of a scale-invariant group is read."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers.ledger import train_with_ledger
from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.balance import (
    LEDGER_TERMS,
    BalanceLedger,
    SymmetryPart,
    find_symmetries,
    pair_units,
)

SYM, OTHER = LEDGER_TERMS.index("symmetry"), LEDGER_TERMS.index("other")

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "polyak": lambda ps: PolyakSGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "nesterov": lambda ps: NesterovSGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05),
}


def _net() -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear(classes): every kind of symmetry."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()


def _symmetries() -> list[SimpleNamespace]:
    """Written by hand as find_symmetries reports them (duck-typed: the ledger reads name, kind,
    units and parts)."""
    return [
        SimpleNamespace(  # BatchNorm after the first layer: each channel's row and bias
            name="0 (per channel)",
            kind="scale",
            units=8,
            parts=(
                SymmetryPart("0.weight", 0, 0, 8, 1, 1.0, 0),
                SymmetryPart("0.bias", 0, 0, 8, 1, 1.0, 0),
            ),
        ),
        SimpleNamespace(  # ReLU between BatchNorm's affine output and the head: gain and bias
            name="1-3",  # of channel i against column i
            kind="rescale",
            units=8,
            parts=(
                SymmetryPart("1.weight", 0, 0, 8, 1, 1.0, 0),
                SymmetryPart("1.bias", 0, 0, 8, 1, 1.0, 0),
                SymmetryPart("3.weight", 1, 0, 8, 1, -1.0, 0),
            ),
        ),
        SimpleNamespace(  # softmax cross-entropy: each input column and the bias of the head
            name="3 (softmax)",
            kind="translation",
            units=9,
            parts=(
                SymmetryPart("3.weight", 1, 0, 8, 1, 1.0, 0),
                SymmetryPart("3.bias", None, 0, 0, 1, 1.0, 8),
            ),
        ),
    ]


def _train(name: str, steps: int = 30) -> BalanceLedger:
    net = _net()
    opt = OPTIMIZERS[name](net.parameters())
    ledger = BalanceLedger(None, opt, module=net, symmetries=_symmetries())
    ledger.attach()
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(64, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (64,), generator=g),
    )
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return ledger


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_charge_closes_per_unit(name: str) -> None:
    """(Q(t) - Q(0)) - sum of the terms, per unit of every charge: float64 round-off (30 steps
    of O(10)-term sums: 1e-12 of the charge's scale leaves a factor ~1e3 above round-off)."""
    charges = _train(name).read_charges()
    assert set(charges) == {"0 (per channel)", "1-3", "3 (softmax)"}
    for charge, row in charges.items():
        scale = float(row["D0"].abs().max() + row["D"].abs().max()) + 1.0
        assert float(row["closure"].abs().max()) <= 1e-12 * scale, (name, charge)
        assert row["sums"].shape == (row["D"].numel(), len(LEDGER_TERMS))
        if name not in ("adam", "adamw"):  # known rules: nothing unexplained
            assert float(row["sums"][:, OTHER].abs().max()) <= 1e-12 * scale, (name, charge)


def test_translation_is_kept_exactly_by_heavy_ball_and_broken_by_adam() -> None:
    """Softmax cross-entropy is invariant under adding a constant to all logits: gradient
    descent and heavy ball without weight decay keep every column sum and the bias sum exactly
    (the gradient's sum is 0, and so is the velocity's); Adam's update is not linear in the
    gradient and moves them (the generic split puts it in `other`)."""
    results = {}
    for name, make in {
        "polyak": lambda ps: PolyakSGD(ps, lr=0.5, momentum=0.9),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    }.items():
        OPTIMIZERS["_tmp"] = make
        try:
            row = _train("_tmp", steps=60).read_charges()["3 (softmax)"]
        finally:
            del OPTIMIZERS["_tmp"]
        results[name] = row
    heavy, adam = results["polyak"], results["adam"]
    scale = float(heavy["D0"].abs().max()) + 1.0
    assert float((heavy["D"] - heavy["D0"]).abs().max()) <= 1e-12 * scale
    assert float(heavy["sums"].abs().max()) <= 1e-12 * scale  # every term is round-off
    assert float((adam["D"] - adam["D0"]).abs().max()) > 1e-3  # measured ~0.1
    moved = adam["D"] - adam["D0"]
    torch.testing.assert_close(adam["sums"][:, OTHER], moved, rtol=0, atol=1e-12 * scale)


def test_the_symmetry_term_is_the_verification_made_continuous() -> None:
    """While a symmetry holds its symmetry term is round-off (rescale and translation here);
    BatchNorm's eps breaks the scale symmetry slightly, and the term measures by how much."""
    charges = _train("polyak").read_charges()
    for charge in ("1-3", "3 (softmax)"):
        row = charges[charge]
        scale = float(row["D0"].abs().max()) + 1.0
        assert float(row["sums"][:, SYM].abs().max()) <= 1e-12 * scale, charge
    scale_row = charges["0 (per channel)"]
    broken = float(scale_row["sums"][:, SYM].abs().max())
    drift = float((scale_row["D"] - scale_row["D0"]).abs().max())
    assert 0.0 < broken < 1e-2 * drift  # eps = 1e-5: small but not round-off


def test_angles_of_a_scale_symmetry_are_read_per_step() -> None:
    """The angle between x_t and x_{t+1} of the scale-invariant group, one per step, equal to
    the angle computed from snapshots."""
    net = _net()
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9)
    ledger = BalanceLedger(None, opt, module=net, symmetries=_symmetries())
    ledger.attach()
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(64, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (64,), generator=g),
    )
    expected = []
    for _ in range(7):
        before = torch.cat([net[0].weight.detach().reshape(-1), net[0].bias.detach()])
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        after = torch.cat([net[0].weight.detach().reshape(-1), net[0].bias.detach()])
        cos = (before @ after) / (before.norm() * after.norm())
        expected.append(float(torch.acos(cos.clamp(-1, 1))))
    angles = ledger.read_angles()
    assert list(angles) == ["0 (per channel)"]
    torch.testing.assert_close(
        angles["0 (per channel)"], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9
    )
    assert ledger.read_angles()["0 (per channel)"].numel() == 0  # read and cleared


def test_angle_buffer_is_bounded() -> None:
    """Never calling read_angles keeps at most ``angle_steps`` steps (memory bounded, not one
    buffer per step): the most recent ones, in order, equal to an unbounded reader's; a read
    clears it; a skipped step (found_inf) reads NaN."""
    net = _net()
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9)
    small = BalanceLedger(None, opt, module=net, symmetries=_symmetries(), angle_steps=8)
    large = BalanceLedger(None, opt, module=net, symmetries=_symmetries(), angle_steps=64)
    small.attach()
    large.attach()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (64,))

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    name = "0 (per channel)"
    for total in (21, 8, 3):  # wrapped (not at a multiple of 8), exactly full, partly full
        for _ in range(total):
            step()
        every, kept = large.read_angles()[name], small.read_angles()[name]
        assert every.shape == (total,) and kept.shape == (min(total, 8),)
        assert every.isfinite().all() and (every > 0).all()
        torch.testing.assert_close(kept, every[-8:], rtol=0, atol=0)
    assert small.read_angles()[name].numel() == 0
    opt.found_inf = torch.ones(1)  # type: ignore[attr-defined]  # as a GradScaler sets it
    step()
    del opt.found_inf  # type: ignore[attr-defined]
    assert small.read_angles()[name].isnan().all()
    with pytest.raises(ValueError, match="angle_steps"):
        BalanceLedger(None, opt, module=net, symmetries=_symmetries(), angle_steps=0)


def test_state_saved_before_the_first_step_restores() -> None:
    """A state saved before start() (no origins yet) restores to a ledger that starts its series
    on first use, as a fresh one: read_charges works and, after the same steps, equals the
    ledger that was never saved."""
    net = _net()
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9)
    state = BalanceLedger(None, opt, module=net, symmetries=_symmetries()).state_dict()
    assert state["charge_D0"] is None
    resumed = BalanceLedger(None, opt, module=net, symmetries=_symmetries())
    resumed.load_state_dict(state)
    first = resumed.read_charges()  # starts the series at the current point
    assert set(first) == {s.name for s in _symmetries()}
    for row in first.values():
        assert float((row["D"] - row["D0"]).abs().max()) == 0.0
    fresh = BalanceLedger(None, opt, module=net, symmetries=_symmetries())
    fresh.attach()
    resumed.attach()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (64,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    a, b = fresh.read_charges(), resumed.read_charges()
    for name in a:
        for key in ("D", "D0", "sums"):  # the same sums of the same steps, in the same order
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=0)


def test_charges_survive_state_dict() -> None:
    """A ledger restored from state_dict continues the same sums and origins."""
    net = _net()
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9)
    ledger = BalanceLedger(None, opt, module=net, symmetries=_symmetries())
    ledger.attach()
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(64, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (64,), generator=g),
    )

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    state = ledger.state_dict()
    ledger.detach()
    resumed = BalanceLedger(None, opt, module=net, symmetries=_symmetries())
    resumed.load_state_dict(state)
    resumed.attach()
    ledger.attach()
    for _ in range(5):
        step()
    a, b = ledger.read_charges(), resumed.read_charges()
    for name in a:
        torch.testing.assert_close(a[name]["sums"], b[name]["sums"], rtol=0, atol=1e-14)
        torch.testing.assert_close(a[name]["D0"], b[name]["D0"], rtol=0, atol=0)


def test_a_layer_tensor_and_a_parameter_of_the_same_name_stay_apart() -> None:
    """Layers ``{"h": [W]}`` name their tensor ``h[0]``; a module parameter literally named
    ``h[0]`` is another tensor: the charge on it reads that parameter, not ``W``."""
    net = _net()
    extra = nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=torch.float64))
    net.register_parameter("h[0]", extra)
    charge = SimpleNamespace(
        name="extra",
        kind="translation",
        units=1,
        parts=(SymmetryPart("h[0]", None, 0, 0, 1, 1.0, 0),),
    )
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9)
    layers = {"h": [net[0].weight], "k": [net[3].weight]}
    ledger = BalanceLedger(layers, opt, module=net, symmetries=[charge])
    ledger.attach()
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        opt.zero_grad()
        (net(x).square().mean() + (extra - 0.3).square().sum()).backward()
        opt.step()
    row = ledger.read_charges()["extra"]
    torch.testing.assert_close(row["D"], extra.detach().sum().reshape(1), rtol=0, atol=1e-15)
    assert float(row["closure"].abs().max()) < 1e-14


ALL_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    **OPTIMIZERS,
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
}


def _resnet_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 10, (32,), generator=g)


@pytest.mark.slow  # 7 optimisers x 12 steps of a float64 ResNet with every charge: ~10 s
@pytest.mark.parametrize("name", list(ALL_OPTIMIZERS))
def test_discovered_charges_close_per_unit_for_every_optimizer(name: str) -> None:
    """Every symmetry find_symmetries reports on a ResNet-style CNN (scale per channel, rescale
    across BatchNorm, translation of the head, zero-gradient biases): per unit, (Q(t) - Q(0)) -
    sum of the terms <= 1e-12 of the charge's scale in float64 after 12 steps, for PolyakSGD,
    NesterovSGD, torch SGD (momentum, nesterov, dampening), Adam and AdamW."""
    from torch_momentum.balance import find_symmetries
    from torch_momentum.demos import ResNetCNN

    torch.manual_seed(0)
    model = ResNetCNN(conv_bias=True).double()
    batch = _resnet_batch()

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    found = find_symmetries(model, loss, [batch])
    assert {s.kind for s in found} == {"scale", "rescale", "translation", "zero_gradient"}
    opt = ALL_OPTIMIZERS[name](model.parameters())
    charges = train_with_ledger(model, loss, batch, opt, found, 12).read_charges()
    assert len(charges) == len(found)
    for charge, row in charges.items():
        scale = float(row["D0"].abs().max() + row["D"].abs().max()) + 1e-300
        # 12 steps of O(100)-term float64 sums: 1e-12 is ~1e3 above round-off
        assert float(row["closure"].abs().max()) <= 1e-12 * scale, (name, charge)


def test_restore_checks_the_saved_totals_against_the_charges() -> None:
    """The per-unit totals are restored by name (``unit_sums``, ``charge_sums``) and checked:
    a total of another shape was broadcast into the sums before (a (1, terms) row copied into
    every unit: a silent wrong series); now a ValueError naming it, and the ledger unchanged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (64,))

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    symmetries = find_symmetries(net, loss, [(x, y)], kinds=("rescale", "translation"))
    assert [(s.name, s.units) for s in symmetries] == [("0/2", 8), ("2 (columns + bias)", 9)]
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9)
    units = pair_units(net)

    def new_ledger() -> BalanceLedger:
        return BalanceLedger(None, opt, units=units, module=net, symmetries=symmetries)

    ledger = new_ledger()
    ledger.attach()
    for _ in range(3):
        opt.zero_grad()
        loss(net, (x, y)).backward()
        opt.step()
    state = ledger.state_dict()
    ledger.detach()
    assert [len(t) for t in state["unit_sums"]] == [8]
    assert [len(t) for t in state["charge_sums"]] == [8, 9]
    bad = [state["charge_sums"][0][:1], *state["charge_sums"][1:]]
    cases = {
        r"`charge_sums\[0\]` \('0/2'\) has shape \(1, 6\), expected \(8, 6\)": {"charge_sums": bad},
        r"`charge_sums`: 0 saved totals for the 2 charges": {"charge_sums": []},
        r"`unit_sums`: 0 saved totals for the 1 charges": {"unit_sums": []},
        # the unread steps' angle statistics: one row per scale charge (there is none here)
        r"angle statistics have shape \(1, 1, 3\), expected \(steps, 0, 3\)": {
            "angle_stats": [[[1.0, 0.0, 0.0]]]
        },
    }
    for message, change in cases.items():
        resumed = new_ledger()
        with pytest.raises(ValueError, match=message):
            resumed.load_state_dict({**state, **change})
        assert resumed.D0 is None and resumed.unit_D0 is None  # nothing restored
    resumed.load_state_dict(state)
    a, b = ledger.read_charges(), resumed.read_charges()
    for name in a:  # restored through Python floats: exact
        torch.testing.assert_close(a[name]["sums"], b[name]["sums"], rtol=0, atol=0)
    for name, row in ledger.read_units().items():
        torch.testing.assert_close(row["sums"], resumed.read_units()[name]["sums"], rtol=0, atol=0)


def test_scale_is_the_charges_magnitude_also_where_the_charge_is_zero() -> None:
    """``read_charges()[name]["scale"]``: the charge with its signs dropped (|x| for a linear
    one), so that ``closure / scale`` is relative even for a charge that stays 0 (a ViT's
    zero-initialised class token under heavy ball: its sum is 0 at every step)."""
    from torch_momentum.balance import find_symmetries
    from torch_momentum.demos import TinyViT

    torch.manual_seed(0)
    model = TinyViT(depth=1).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(8))

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    found = find_symmetries(model, loss, [batch])
    opt = PolyakSGD(model.parameters(), lr=0.05, momentum=0.9)
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    charges = train_with_ledger(model, loss, batch, opt, found, 3).read_charges()
    now = {n: p.detach() for n, p in model.named_parameters()}
    cls = charges["cls_token"]
    assert float(cls["D0"].abs().max()) == 0.0  # zero-initialised
    assert torch.equal(cls["scale"], now["cls_token"].abs().sum().reshape(1))
    assert float(cls["scale"].min()) > 0.0  # it moved off 0 (its sum did not)
    rescale = next(s for s in found if s.kind == "rescale")

    def unsigned(params: dict[str, torch.Tensor]) -> torch.Tensor:
        units = [part.entries(params[part.param]).square().sum(1) for part in rescale.parts]
        return torch.stack(units).sum(0)

    # the larger of the magnitudes now and at the origin, unit by unit
    want = torch.maximum(unsigned(now), unsigned(origin))
    torch.testing.assert_close(charges[rescale.name]["scale"], want, rtol=1e-14, atol=0.0)
    for name, row in charges.items():
        assert bool((row["scale"] >= row["D"].abs()).all()), name
        # 3 float64 steps: round-off ~1e-16 of the magnitude; 1e-12 leaves a margin
        assert float((row["closure"].abs() / row["scale"]).max()) <= 1e-12, name


@pytest.mark.parametrize("optimizer", ["polyak", "sgd"])
def test_charges_of_a_channels_last_model_close(optimizer: str) -> None:
    """``model.to(memory_format=torch.channels_last)``: weights, gradients and velocities are
    strided, their stacks too; the per-unit reductions read them in logical order (the ledger
    raised at its first step before). Same charges and sums as the contiguous model."""
    from torch_momentum.balance import find_symmetries
    from torch_momentum.demos import ResNetCNN

    def run(channels_last: bool) -> dict[str, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = ResNetCNN().double()
        x, y = _resnet_batch()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return nn.functional.cross_entropy(m(b[0]), b[1])

        found = find_symmetries(model, loss, [(x, y)])
        opt = ALL_OPTIMIZERS[optimizer](model.parameters())
        return train_with_ledger(model, loss, (x, y), opt, found, 4).read_charges()

    strided, plain = run(True), run(False)
    assert list(strided) == list(plain)
    for name, row in strided.items():
        # 4 float64 steps: round-off ~1e-16 of the magnitude; 1e-12 leaves a margin
        assert float((row["closure"].abs() / row["scale"]).max()) <= 1e-12, name
        # the convolutions differ in their order of summation: ~1e-15 relative
        torch.testing.assert_close(row["sums"], plain[name]["sums"], rtol=1e-9, atol=1e-12)


def test_scale_keeps_the_magnitude_at_the_origin() -> None:
    """A charge that starts as a cancelling sum of large entries and decays under weight decay:
    the round-off of its first steps stays in the closure while its magnitude shrinks by
    (1 - lr wd)^t, so against today's magnitude the relative closure grew without bound
    (8e-10 after 300 steps); against the origin's it stays round-off, also across a restore."""
    from torch_momentum.balance.symmetry import Symmetry, SymmetryPart

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            b = torch.linspace(1.0, 2.0, 16, dtype=torch.float64) * torch.tensor([1.0, -1.0] * 8)
            self.b = nn.Parameter(b - b.mean())  # entries ~1, sum ~0
            self.w = nn.Parameter(torch.randn(4, dtype=torch.float64))

    def step() -> None:
        opt.zero_grad()
        ((model.w**2).sum() + 0.0 * model.b.sum()).backward()  # b gets a zero gradient
        opt.step()

    torch.manual_seed(0)
    model = Model()
    part = SymmetryPart("b", None, 0, 0, 1, 1.0, 0)
    zero = Symmetry("zero_gradient", "b", ("b",), 1, (part,), 0.0)
    opt = PolyakSGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.5)
    ledger = BalanceLedger(None, opt, module=model, symmetries=[zero])
    ledger.attach()
    for _ in range(150):
        step()
    state = ledger.state_dict()
    ledger.detach()
    ledger = BalanceLedger(None, opt, module=model, symmetries=[zero])
    ledger.load_state_dict(state)
    ledger.attach()
    for _ in range(150):
        step()
    row = ledger.read_charges()["b"]
    assert float(model.b.detach().abs().sum()) < 1e-6 * 24  # it decayed
    # 300 float64 steps of O(1) terms: round-off ~1e-15 of the origin's magnitude (24)
    assert float((row["closure"].abs() / row["scale"]).max()) <= 1e-12


@pytest.mark.parametrize(
    ("shards", "part", "expected"),
    [
        # rows 2..5 of 8 held as 0..3 and 4..7: each rank gets its slice in local coordinates,
        # from the unit its first row belongs to
        ([(0, 4), (4, 4)], (2, 4, 1), [(2, 2, 0), (0, 2, 2)]),
        ([(0, 4), (4, 4)], (0, 8, 2), [(0, 4, 0), (0, 4, 2)]),  # interleaved pairs
        ([(0, 4), (4, 4)], (6, 2, 1), [None, (2, 2, 0)]),  # a slice on one rank only
        ([(0, 4), (4, 4)], (2, 4, 4), ValueError),  # the shards split a unit
        ([(0, 3), (3, 3), (6, 2)], (0, 8, 2), ValueError),
    ],
)
def test_localize_cuts_a_slice_of_the_sharded_dimension(
    monkeypatch: pytest.MonkeyPatch, shards: list[tuple[int, int]], part: Any, expected: Any
) -> None:
    """Head-wise symmetries are slices of a projection's rows, the dimension FSDP2 shards: each
    rank books the units of its rows (before, any slice not covering the dimension raised)."""
    from torch_momentum.balance import _charges, _dtensor

    start, length, block = part
    p = SimpleNamespace(shape=(8, 3), placements="Shard(dim=0)")
    whole = SymmetryPart("w", 0, start, length, block, -1.0, 3)
    monkeypatch.setattr(_dtensor, "sharded_along", lambda t, dim: dim == 0)

    def on(shard: tuple[int, int]) -> SymmetryPart | None:
        monkeypatch.setattr(_dtensor, "shard_range", lambda t, dim, n: shard)
        return _charges.localize(whole, p, "w")

    if expected is ValueError:
        with pytest.raises(ValueError, match=r"'w'.*whole units \(blocks of"):
            for shard in shards:
                on(shard)
        return
    for shard, want in zip(shards, expected, strict=True):
        local = on(shard)
        if want is None:
            assert local is None
            continue
        assert local is not None
        assert (local.start, local.length, local.unit_offset) == (want[0], want[1], 3 + want[2])
        assert (local.block, local.sign, local.dim) == (block, -1.0, 0)
