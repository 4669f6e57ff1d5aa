"""LayerBalanceMonitor(ledger=True, neurons=True) under a real single-process Lightning Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from tests.helpers.trainer import (
    LAYERS,
    WITHOUT_LOGGER,
    BalanceModel,
    fit,
    make_data,
    make_loader,
    make_net,
    reference_sgd,
)
from torch_momentum.callbacks import LayerBalanceMonitor

PAIRS = ["net.0-net.2", "net.2-net.4"]
TERMS = ["momentum", "weight_decay", "symmetry", "discretisation", "other"]

pytestmark = [pytest.mark.usefixtures("one_thread"), WITHOUT_LOGGER]


def _scale(row: dict[str, float], pair: str) -> float:
    a, b = pair.split("-")
    return max(
        row[f"balance/sq_norm/{a}"],
        row[f"balance/sq_norm/{b}"],
        *(abs(row[f"ledger/{t}/{pair}"]) for t in TERMS),
    )


def _max_rel(history: list[dict[str, float]], term: str) -> float:
    return max(abs(r[f"ledger/{term}/{p}"]) / _scale(r, p) for r in history for p in PAIRS)


@pytest.mark.parametrize("optimizer", ["polyak", "nesterov", "sgd"])
def test_keys_closure_and_units(optimizer: str) -> None:
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True, neurons=True)
    fit(
        BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer=optimizer), [monitor], max_steps=8
    )
    history = monitor.history
    assert [r["step"] for r in history] == list(range(8))
    keys = set(history[-1])
    for pair in PAIRS:
        assert {f"ledger/{t}/{pair}" for t in [*TERMS, "closure"]} <= keys
        assert (f"balance/corrected_diff/{pair}" in keys) == (optimizer != "nesterov")
    for layer in ("net.0", "net.2"):
        for key in ("unit_drift_max", "unit_drift_mean", "unit_symmetry_max"):
            assert f"balance/{key}/{layer}" in keys
        assert history[-1][f"balance/unit_drift_max/{layer}"] > 0
        # bias-free ReLU net: R_i = 0 (Euler); float64 rounding of ~100 products
        assert history[-1][f"balance/unit_symmetry_max/{layer}"] < 1e-12
    assert "balance/unit_drift_max/net.4" not in keys  # the output layer has no units
    assert monitor.balance_ledger is not None and monitor.balance_ledger.pairs == PAIRS
    # float64 round-off only (measured ~1e-16)
    assert _max_rel(history, "closure") < 1e-10
    assert _max_rel(history, "other") < 1e-10
    assert _max_rel(history[1:], "momentum") > 1e-6
    # per-unit drift of the last logging step, and the per-unit ledger closes too
    assert set(monitor.unit_drift) == {"net.0", "net.2"}
    for name, entry in monitor.unit_ledger.items():
        drift = entry["D"] - entry["D0"]
        torch.testing.assert_close(drift, monitor.unit_drift[name], rtol=0, atol=1e-13)
        scale = float(entry["D0"].abs().max() + entry["sums"].abs().max())
        assert float(entry["closure"].abs().max()) < 1e-10 * scale


@pytest.mark.parametrize("ledger", [True, False])
def test_unit_balance_is_computed_once_a_logged_step(
    ledger: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the ledger tracking the units, the per-unit D_i(t) it reads is the one the drift
    uses: the layer mode computed it a second time (unit_balance) at every logged step."""
    from torch_momentum.callbacks import _layers

    calls: list[int] = []
    original = _layers.unit_balance

    def counting(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_layers, "unit_balance", counting)
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=ledger, neurons=True)
    fit(BalanceModel(make_net(), lr=0.05, momentum=0.9), [monitor], max_steps=8)
    assert [r["step"] for r in monitor.history] == list(range(8))
    # one call for D_i(0) at the start; without the ledger's units one more per logged step
    assert len(calls) == (1 if ledger else 1 + 8)
    if ledger:  # the drift is the ledger's own D_i(t) - D_i(0), bit for bit
        for name, entry in monitor.unit_ledger.items():
            torch.testing.assert_close(
                entry["D"] - entry["D0"], monitor.unit_drift[name], rtol=0, atol=0
            )


def test_clipping_ledger_uses_the_update_applied() -> None:
    """With clipping the applied update is the clipped one; reading the gradient before clipping
    would leave an O(1) unexplained part in ``other``."""
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True)
    fit(
        BalanceModel(make_net(), lr=0.1, momentum=0.9),
        [monitor],
        max_steps=6,
        gradient_clip_val=0.05,
        gradient_clip_algorithm="norm",
    )
    assert monitor.history[0]["grad_norm/total"] > 5 * 0.05  # clipping active
    assert _max_rel(monitor.history, "closure") < 1e-10  # float64 round-off
    assert _max_rel(monitor.history, "other") < 1e-10


def test_gradient_accumulation_matches_full_batch() -> None:
    """accumulate_grad_batches=2 on two half batches (Lightning divides each loss by 2): the
    accumulated gradient is the full-batch gradient, read once per optimizer step, so every
    logged key (norms, gradient norms, the ledger's terms) equals the full-batch run's."""
    x, y = make_data()
    torch.manual_seed(0)
    full = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True)
    fit(BalanceModel(make_net(), momentum=0.9), [full], max_steps=4)
    torch.manual_seed(0)
    acc = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True)
    fit(
        BalanceModel(make_net(), momentum=0.9),
        [acc],
        loader=make_loader(x, y, batch_size=len(x) // 2),
        max_steps=4,
        accumulate_grad_batches=2,
    )
    assert [r["step"] for r in acc.history] == [0, 1, 2, 3]
    assert {f"ledger/{t}/{p}" for t in TERMS for p in PAIRS} <= full.history[-1].keys()
    for a, b in zip(acc.history, full.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            # sums of two half-batch means vs one full mean: float64 rounding only, in the
            # values of one step (rel 1e-10) and in the ledger's sums over the steps (rel 1e-9)
            rel, tol = (1e-9, 1e-14) if key.startswith("ledger/") else (1e-10, 1e-13)
            assert a[key] == pytest.approx(b[key], rel=rel, abs=tol), key


def test_mixed_precision_reads_unscaled_gradients() -> None:
    """fp16 autocast with a GradScaler on the CPU (Lightning's MixedPrecision plugin), heavy
    ball: the logged gradient norms are the unscaled ones, the weights follow the plain-torch
    reference, and the ledger closes with nothing unexplained."""
    lr, momentum, steps, scale = 0.05, 0.9, 6, 2.0**12
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True)
    fit(
        BalanceModel(make_net(dtype=torch.float32), lr=lr, momentum=momentum),
        [monitor],
        loader=make_loader(*make_data(dtype=torch.float32), repeat=steps),
        max_steps=steps,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    )
    assert scaler.get_scale() == scale  # no overflow: every step was taken
    torch.manual_seed(0)
    reference = reference_sgd(
        make_net(dtype=torch.float32),
        lr,
        steps,
        momentum=momentum,
        scaler=torch.amp.GradScaler("cpu", init_scale=scale),
    )
    for row, ref in zip(monitor.history, reference, strict=True):
        for i, name in enumerate(["net.0", "net.2", "net.4"]):
            # the same fp16 autocast computation, norms accumulated in float32 (~1e-7); reading
            # the scaled gradient would be off by a factor 4096
            assert row[f"grad_norm/{name}"] == pytest.approx(ref["grad"][i], rel=1e-5)
            assert row[f"balance/sq_norm/{name}"] == pytest.approx(ref["sq"][i], rel=1e-5)
    # float32 parameters: D, dx and the Gram matrices carry ~1e-7 relative rounding; a scaled
    # gradient (x4096) in the symmetry term would leave an O(1) part in ``other``
    assert _max_rel(monitor.history, "closure") < 1e-5
    assert _max_rel(monitor.history, "other") < 1e-4


def test_neurons_with_unpairable_model_is_a_clear_error() -> None:
    net = nn.Sequential(
        nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.Linear(16, 3, bias=False)
    ).double()
    with pytest.raises(ValueError, match=r"'net\.1'.*BatchNorm1d"):
        fit(
            BalanceModel(net),
            # every module owning parameters, BatchNorm included
            [
                LayerBalanceMonitor(
                    layers=["net.0", "net.1", "net.2"], neurons=True, save_figure=False
                )
            ],
            max_steps=1,
        )
    # restricted by layers= to a pairable part: fine
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 16, bias=False),
        nn.ReLU(),
        nn.Linear(16, 8, bias=False),
        nn.BatchNorm1d(8),
        nn.Linear(8, 3, bias=False),
    ).double()
    monitor = LayerBalanceMonitor(layers=["net.0", "net.2"], neurons=True, save_figure=False)
    fit(BalanceModel(net), [monitor], max_steps=2)
    assert "balance/unit_drift_max/net.0" in monitor.history[-1]


def test_ledger_checkpoint_holds_the_sums(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True)
    trainer = fit(BalanceModel(make_net(), momentum=0.9), [monitor], max_steps=3)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=False)["callbacks"][monitor.state_key]
    assert state["ledger"]["pairs"] == PAIRS and len(state["ledger"]["sums"]) == 2
