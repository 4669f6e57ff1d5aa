"""The figures of LayerBalanceMonitor: where they are saved (logger directory, default_root_dir
without one), what reaches the loggers that take figures (TensorBoard), and what plot_balance
draws from a monitor, its history and its CSV file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from tests.helpers.trainer import LAYERS, WITHOUT_LOGGER, BalanceModel, fit, make_net
from torch_momentum.callbacks import LayerBalanceMonitor, plot_balance

PAIRS = ["net.0-net.2", "net.2-net.4"]

# a Trainer fit that renders and saves the balance figure (matplotlib: 0.6-1.2 s each): run by
# `make test`, left out of `make test-fast`
FIGURE_FIT = pytest.mark.slow


pytestmark = pytest.mark.usefixtures("one_thread")


class _FigureLogger(Logger):
    """A logger whose experiment takes figures, like TensorBoard's SummaryWriter."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[tuple[str, Any, int]] = []

    @property
    def name(self) -> str:
        return "figures"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> Any:
        return self

    def add_figure(self, tag: str, figure: Any, global_step: int, close: bool = True) -> None:
        self.figures.append((tag, figure, global_step))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


@FIGURE_FIT
def test_figure_saved_and_logged_and_plot_sources(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    torch.manual_seed(0)
    net = make_net(scales=(10.0, 1.0, 0.1))  # ratios spanning decades
    figures = _FigureLogger()
    monitor = LayerBalanceMonitor(layers=LAYERS)
    trainer = fit(BalanceModel(net), [monitor], max_steps=4, logger=[CSVLogger(tmp_path), figures])
    assert monitor.figure_path == os.path.join(trainer.log_dir, "balance.png")
    assert os.path.getsize(monitor.figure_path) > 10_000
    ((tag, logged, step),) = figures.figures
    assert tag == "balance" and isinstance(logged, Figure) and step == 3

    (csv_path,) = tmp_path.rglob("metrics.csv")
    for source in (monitor, monitor.history, str(csv_path), csv_path):
        fig = plot_balance(source)
        axes = fig.axes
        assert len(axes) == 4
        labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
        assert labels[0] == PAIRS and labels[1] == PAIRS
        assert labels[2] == LAYERS and labels[3] == [*LAYERS, "total"]
        assert axes[1].get_yscale() == "log"  # ratios of ~50 and ~500: decades away from 1
        assert all(ax.get_xlabel() == "step" for ax in axes)
        xs = axes[0].get_lines()[0].get_xdata()
        assert list(xs) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no balance metrics"):
        plot_balance([{"step": 0, "train_loss": 1.0}])
    with pytest.raises(TypeError, match="source"):
        plot_balance(42)


@FIGURE_FIT
def test_no_logger_warns_keeps_history_and_saves_figure_in_root_dir(tmp_path: Path) -> None:
    """Regression (figures without a logger directory): the figure used to be silently dropped."""
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS)
    with pytest.warns(RuntimeWarning) as record:
        fit(
            BalanceModel(make_net()),
            [monitor],
            max_steps=2,
            logger=False,
            default_root_dir=tmp_path,
        )
    messages = [str(w.message) for w in record]
    assert any("no logger" in m and "CSVLogger" in m for m in messages)
    assert len(monitor.history) == 2
    expected = str(tmp_path / "balance.png")
    assert monitor.figure_path == expected and os.path.getsize(expected) > 10_000
    assert any(expected in m and "default_root_dir" in m for m in messages)


@FIGURE_FIT
def test_logger_without_log_dir_saves_figure_in_root_dir(tmp_path: Path) -> None:
    torch.manual_seed(0)
    figures = _FigureLogger()  # a logger whose log_dir is None
    monitor = LayerBalanceMonitor(layers=LAYERS)
    with pytest.warns(RuntimeWarning, match=r"without log_dir.*balance\.png"):
        fit(
            BalanceModel(make_net()),
            [monitor],
            max_steps=2,
            logger=figures,
            default_root_dir=tmp_path / "root",
        )
    assert monitor.figure_path == str(tmp_path / "root" / "balance.png")
    assert os.path.isfile(monitor.figure_path)
    assert len(figures.figures) == 1  # still logged to the logger that takes figures


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
    monitor = LayerBalanceMonitor(layers=LAYERS, ledger=True, neurons=True, log_every_n_steps=2)
    model = BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer="polyak")
    fit(model, [monitor], max_steps=6, logger=logger)
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
    monitor = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=2)
    model = BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer="polyak")
    # no logger, on purpose: the monitor says so, and where the figure went
    with (
        pytest.warns(RuntimeWarning, match="has no logger"),
        pytest.warns(RuntimeWarning, match="figures were saved to .*balance.png"),
    ):
        fit(model, [monitor], max_steps=4, default_root_dir=str(tmp_path))
    assert monitor.figure_paths == {"balance": str(tmp_path / "balance.png")}
    assert not (tmp_path / "ledger.png").exists()


@WITHOUT_LOGGER
def test_plot_balance_ledger_and_units_views_of_a_monitor() -> None:
    """plot_balance(monitor, view=...) draws the monitor's own ledger and per-unit drift: the
    same lines as plot_ledger and plot_unit_drift, and the per-unit curves are the sorted
    |D_i(T) - D_i(0)| the monitor holds (drawn as floats: exact)."""
    import numpy as np

    from torch_momentum.callbacks import plot_balance, plot_ledger

    monitor = LayerBalanceMonitor(
        layers=LAYERS, ledger=True, neurons=True, log_every_n_steps=2, save_figure=False
    )
    model = BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer="polyak")
    fit(model, [monitor], max_steps=4)

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

    plain = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=2, save_figure=False)
    fit(BalanceModel(make_net(), lr=0.05, momentum=0.9, optimizer="polyak"), [plain], max_steps=2)
    with pytest.raises(ValueError, match="neurons=True"):
        plot_balance(plain, view="units")
    with pytest.raises(ValueError, match="no ledger metrics"):
        plot_balance(plain, view="ledger")
