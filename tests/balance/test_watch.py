"""NetworkWatch: the default balance metrics of a network in plain torch."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.helpers.nets import mlp
from torch_momentum import NesterovSGD, PolyakSGD
from torch_momentum.balance import find_symmetries
from torch_momentum.balance.summary import BalanceSummary
from torch_momentum.balance.watch import NetworkWatch


def _mlp() -> nn.Sequential:
    return mlp(bias=False)  # float64, 6 -> 8 -> 5 -> 2, ReLU and LeakyReLU: 1-homogeneous units


def _loss(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(m(batch[0]), batch[1])


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (32,), generator=g
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


@pytest.mark.parametrize("ledger", [False, True])
def test_iterate_follows_torch_sgd_nesterov_under_a_scheduler(ledger: bool) -> None:
    """``torch.optim.SGD(nesterov=True)`` builds its parameters y = x + eta_t mu v with the
    step's eta_t; a scheduler then changes lr before the watch reads x. The watch must subtract
    the step's eta_t mu v (recorded after the step), not the new lr's; with or without the
    ledger, and for the parameters the ledger does not track (the last layer's bias here)."""
    net, batch = _mlp(), _batch()
    net.append(nn.Linear(2, 2)).double()
    symmetries = find_symmetries(net, _loss, [batch], kinds=("rescale",))
    mu = 0.9
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=mu, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    watch = NetworkWatch(net, [opt], symmetries, ledger=ledger)
    reference = BalanceSummary(net, symmetries)
    watch.start()
    reference.start({n: p.detach().clone() for n, p in watch.params().items()})
    for _ in range(4):
        opt.zero_grad()
        _loss(net, batch).backward()
        lr = opt.param_groups[0]["lr"]  # the step's lr, before the scheduler halves it
        opt.step()
        schedule.step()
        # x = y + eta_t mu buf (buf = -v): the iterate the parameters were built from
        exact = {
            n: p.detach() + lr * mu * opt.state[p]["momentum_buffer"]
            for n, p in watch.params().items()
        }
        point = watch.iterate()
        for n, x in exact.items():
            # float64: one multiply-add apart at most (~1e-16 relative); the bug is
            # (eta_t - eta_{t+1}) mu |buf| ~ 1e-3 here
            torch.testing.assert_close(point[n], x, rtol=0.0, atol=1e-12, msg=n)
        metrics = watch.metrics(with_grads=False)
        expected = reference.metrics(exact, None, 1.0)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    watch.close()


def test_step_angle_reads_only_the_scale_parameters_found_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """before_step/after_step give the angle between x_t and x_{t+1} of the scale group
    (Linear + BatchNorm: the Linear's weight and bias) from the parameters found when the watch
    was built: neither walks the model again."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    batch = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    symmetries = find_symmetries(net, _loss, [batch], kinds=("scale",))
    assert [s.name for s in symmetries if s.kind == "scale"] == ["0 (per channel)"]
    opt = NesterovSGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    watch = NetworkWatch(net, [opt], symmetries)
    watch.start()

    def walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was walked during a step")

    group = ["0.weight", "0.bias"]
    for _ in range(3):
        opt.zero_grad()
        _loss(net, batch).backward()
        before = torch.cat([watch.iterate()[n].flatten() for n in group])
        with monkeypatch.context() as m:
            for attr in ("named_parameters", "parameters", "named_modules", "modules"):
                m.setattr(net, attr, walk)
            watch.before_step()
            opt.step()
            angle = watch.after_step()["angle/mean"]
        after = torch.cat([watch.iterate()[n].flatten() for n in group])
        cos = torch.dot(before, after) / (before.norm() * after.norm())
        # float64: the watch's atan2 of Gram sums and acos of the cosine agree to ~1e-8 (acos
        # loses half the digits near 0; the angles are ~1e-2)
        assert angle == pytest.approx(float(torch.acos(cos.clamp(-1, 1))), rel=1e-6)
    watch.close()


def test_a_lookahead_state_of_other_optimizers_is_refused_by_name() -> None:
    """The watch's look-ahead rows name optimisers by index: a state saved with two optimisers
    (the second a torch Nesterov SGD) loaded into a watch of one is a ValueError that says so
    (before: IndexError, which the monitor's resume does not catch, so the fit crashed instead
    of starting a new series)."""
    net, batch = _mlp(), _batch()
    first = torch.optim.SGD(net[0].parameters(), lr=0.1, momentum=0.9)
    rest = [p for m in list(net)[1:] for p in m.parameters()]
    second = torch.optim.SGD(rest, lr=0.1, momentum=0.9, nesterov=True)
    saved = NetworkWatch(net, [first, second], [])
    saved.start()
    for opt in (first, second):
        opt.zero_grad()
    _loss(net, batch).backward()
    first.step()
    second.step()
    state = saved.state_dict()
    assert [row[0] for row in state["lookahead"]] == [[1, 0]]
    saved.close()
    one = NetworkWatch(net, [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)], [])
    with pytest.raises(ValueError, match="optimizer 1, param group 0"):
        one.load_state_dict(state)
    one.close()


def test_parameters_frozen_or_unfrozen_after_the_watch_was_built() -> None:
    """Freezing a layer after the watch was built (``requires_grad_(False)``) raised KeyError at
    the next metrics; it stays in the groups, without a gradient. Unfreezing one that was frozen
    then (Lightning's ``BaseFinetuning``) left it out of the gradient norms silently; a warning
    now says so, once."""
    net, batch = _mlp(), _batch()
    first = net[0]
    assert isinstance(first, nn.Linear)
    first.weight.requires_grad_(False)
    opt = PolyakSGD(net.parameters(), lr=0.1, momentum=0.9)
    watch = NetworkWatch(net, [opt], find_symmetries(net, _loss, [batch]))
    watch.start()
    net[2].weight.requires_grad_(False)  # frozen after the watch was built
    first.weight.requires_grad_(True)  # unfrozen after it
    opt.zero_grad()
    _loss(net, batch).backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match=r"1 parameter\(s\) became trainable .*\(0.weight\)"):
        metrics = watch.metrics()
    assert metrics["grad_norm/total"] > 0
    watch.metrics()  # once: no second warning (warnings are errors in this suite)
    watch.close()


def test_a_ledger_added_at_a_resume_is_said() -> None:
    """A state saved without the ledger, restored into a watch with one: the ledger can only
    start now while the charges keep their origin; the two differ silently unless said."""
    net, batch = _mlp(), _batch()
    opt = PolyakSGD(net.parameters(), lr=0.1, momentum=0.9)
    symmetries = find_symmetries(net, _loss, [batch])
    plain = NetworkWatch(net, [opt], symmetries)
    plain.start()
    state = plain.state_dict()
    plain.close()
    with_ledger = NetworkWatch(net, [opt], symmetries, ledger=True)
    with pytest.warns(RuntimeWarning, match="has no ledger: the ledger starts now"):
        with_ledger.load_state_dict(state)
    with_ledger.close()
