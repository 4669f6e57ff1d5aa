"""LayerBalanceMonitor(ledger=True, neurons=True) under a real single-process Lightning Trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from tests.helpers.trainer import BalanceModel, make_data, make_loader, make_net, trainer_kwargs
from torch_momentum.callbacks import LayerBalanceMonitor

PAIRS = ["net.0-net.2", "net.2-net.4"]
TERMS = ["momentum", "weight_decay", "symmetry", "discretisation", "other"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(monitor: LayerBalanceMonitor, model: pl.LightningModule, **kwargs: Any) -> pl.Trainer:
    loader = kwargs.pop("loader", None) or make_loader(*make_data(), repeat=64)
    kwargs.setdefault("logger", False)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], **kwargs))
    trainer.fit(model, loader)
    return trainer


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
    monitor = LayerBalanceMonitor(save_figure=False, ledger=True, neurons=True)
    _fit(monitor, BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer=optimizer), max_steps=8)
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


def test_clipping_ledger_uses_the_update_applied() -> None:
    """With clipping the applied update is the clipped one; reading the gradient before clipping
    would leave an O(1) unexplained part in ``other``."""
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(save_figure=False, ledger=True)
    _fit(
        monitor,
        BalanceModel(make_net(), lr=0.1, momentum=0.9),
        max_steps=6,
        gradient_clip_val=0.05,
        gradient_clip_algorithm="norm",
    )
    assert monitor.history[0]["grad_norm/total"] > 5 * 0.05  # clipping active
    assert _max_rel(monitor.history, "closure") < 1e-10  # float64 round-off
    assert _max_rel(monitor.history, "other") < 1e-10


def test_gradient_accumulation_matches_full_batch() -> None:
    x, y = make_data()
    torch.manual_seed(0)
    full = LayerBalanceMonitor(save_figure=False, ledger=True)
    _fit(full, BalanceModel(make_net(), momentum=0.9), max_steps=4)
    torch.manual_seed(0)
    acc = LayerBalanceMonitor(save_figure=False, ledger=True)
    _fit(
        acc,
        BalanceModel(make_net(), momentum=0.9),
        loader=make_loader(x, y, batch_size=len(x) // 2),
        max_steps=4,
        accumulate_grad_batches=2,
    )
    assert [r["step"] for r in acc.history] == [0, 1, 2, 3]
    for a, b in zip(acc.history, full.history, strict=True):
        for pair in PAIRS:
            for term in TERMS:
                key = f"ledger/{term}/{pair}"
                # two half-batch means vs one full mean: float64 rounding only
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-14), key


def test_mixed_precision_reads_unscaled_gradients() -> None:
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    monitor = LayerBalanceMonitor(save_figure=False, ledger=True)
    _fit(
        monitor,
        BalanceModel(make_net(dtype=torch.float32), lr=0.05, momentum=0.9),
        loader=make_loader(*make_data(dtype=torch.float32), repeat=6),
        max_steps=6,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    )
    assert scaler.get_scale() == 2.0**12  # no step skipped
    # float32 parameters: D, dx and the Gram matrices carry ~1e-7 relative rounding; a scaled
    # gradient (x4096) in the symmetry term would leave an O(1) part in ``other``
    assert _max_rel(monitor.history, "closure") < 1e-5
    assert _max_rel(monitor.history, "other") < 1e-4


def test_neurons_with_unpairable_model_is_a_clear_error() -> None:
    net = nn.Sequential(
        nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.Linear(16, 3, bias=False)
    ).double()
    with pytest.raises(ValueError, match=r"'net\.1'.*BatchNorm1d"):
        _fit(LayerBalanceMonitor(neurons=True, save_figure=False), BalanceModel(net), max_steps=1)
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
    _fit(monitor, BalanceModel(net), max_steps=2)
    assert "balance/unit_drift_max/net.0" in monitor.history[-1]


def test_ledger_checkpoint_holds_the_sums(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(save_figure=False, ledger=True)
    trainer = _fit(monitor, BalanceModel(make_net(), momentum=0.9), max_steps=3)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=False)["callbacks"][monitor.state_key]
    assert state["ledger"]["pairs"] == PAIRS and len(state["ledger"]["sums"]) == 2


@pytest.mark.slow  # TensorBoard import and event file: ~3 s
def test_ledger_and_unit_drift_figures_saved_and_logged(tmp_path: Path) -> None:
    """With ledger=True and neurons=True the monitor also writes ledger.png and unit_drift.png
    next to balance.png and sends all three to TensorBoard (tags balance, ledger, unit_drift)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import (
        IMAGES,
        EventAccumulator,
    )

    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = LayerBalanceMonitor(ledger=True, neurons=True, log_every_n_steps=2)
    model = BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer="polyak")
    _fit(monitor, model, max_steps=6, logger=logger)
    names = ("balance", "ledger", "unit_drift")
    assert monitor.figure_paths == {n: os.path.join(logger.log_dir, f"{n}.png") for n in names}
    assert monitor.figure_path == monitor.figure_paths["balance"]
    for path in monitor.figure_paths.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (events_file,) = [f for f in os.listdir(logger.log_dir) if f.startswith("events.out")]
    events = EventAccumulator(os.path.join(logger.log_dir, events_file), size_guidance={IMAGES: 0})
    events.Reload()
    assert set(names) <= set(events.Tags()["images"])


@pytest.mark.slow  # a fit that renders and saves the balance figure: ~0.8 s
def test_no_ledger_figure_without_the_ledger(tmp_path: Path) -> None:
    monitor = LayerBalanceMonitor(log_every_n_steps=2)
    model = BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer="polyak")
    with pytest.warns(RuntimeWarning, match="figures were saved to .*balance.png"):
        _fit(monitor, model, max_steps=4, default_root_dir=str(tmp_path))
    assert monitor.figure_paths == {"balance": str(tmp_path / "balance.png")}
    assert not (tmp_path / "ledger.png").exists()


def test_plot_balance_ledger_and_units_views_of_a_monitor() -> None:
    """plot_balance(monitor, view=...) draws the monitor's own ledger and per-unit drift: the
    same lines as plot_ledger and plot_unit_drift, and the per-unit curves are the sorted
    |D_i(T) - D_i(0)| the monitor holds (drawn as floats: exact)."""
    import numpy as np

    from torch_momentum.callbacks import plot_balance, plot_ledger

    monitor = LayerBalanceMonitor(ledger=True, neurons=True, log_every_n_steps=2, save_figure=False)
    model = BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer="polyak")
    _fit(monitor, model, max_steps=4)

    ledger_view, direct = plot_balance(monitor, view="ledger"), plot_ledger(monitor)
    assert [ax.get_title() for ax in ledger_view.axes] == PAIRS
    for ax, ref in zip(ledger_view.axes, direct.axes, strict=True):
        assert [line.get_label() for line in ax.lines] == [line.get_label() for line in ref.lines]
        for line, ref_line in zip(ax.lines, ref.lines, strict=True):
            np.testing.assert_array_equal(line.get_ydata(), ref_line.get_ydata())

    units = plot_balance(monitor, view="units")
    assert len(units.axes) == len(monitor.unit_drift) == 2  # two hidden layers
    for ax, values in zip(units.axes, monitor.unit_drift.values(), strict=True):
        expected = np.sort(values.abs().double().numpy())[::-1]
        np.testing.assert_array_equal(ax.lines[0].get_ydata(), expected)
    # several runs overlaid: one curve per run in every panel
    both = plot_balance({"a": monitor, "b": monitor}, view="units")
    assert [len(ax.lines) for ax in both.axes] == [2, 2]

    plain = LayerBalanceMonitor(log_every_n_steps=2, save_figure=False)
    _fit(plain, BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer="polyak"), max_steps=2)
    with pytest.raises(ValueError, match="neurons=True"):
        plot_balance(plain, view="units")
    with pytest.raises(ValueError, match="no ledger metrics"):
        plot_balance(plain, view="ledger")
