"""LayerBalanceMonitor with real loggers: what arrives in a TensorBoard event file (read back with
tensorboard's own EventAccumulator) and in a CSVLogger's metrics.csv, alone and both at once.

The documented keys are listed once, in ``DOCUMENTED``, as templates over layers ``{L}`` and
adjacent pairs ``{L}-{M}``; a monitor option that adds keys adds a row (with the option that
turns it on) and every test here checks it.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import (
    DEFAULT_SIZE_GUIDANCE,
    IMAGES,
    SCALARS,
    EventAccumulator,
)

from tests.helpers.trainer import LAYERS, BalanceModel, fit, make_data, make_loader
from torch_momentum.callbacks import LayerBalanceMonitor

pytestmark = pytest.mark.usefixtures("one_thread")

# A full Trainer.fit with a real TensorBoardLogger that renders, logs and decodes the monitor's PNG
# figure: ~1.5 s per test on an idle 2-core machine (a third of the fast loop's logger time).
# These four run in `make test` (CI); the cheaper stationarity test below keeps a real
# TensorBoardLogger in `make test-fast`.
SLOW_FIT = pytest.mark.slow

STEPS, EVERY = 6, 2
PAIRS = [("net.0", "net.2"), ("net.2", "net.4")]
HIDDEN = ["net.0", "net.2"]  # layers whose outputs are hidden units (all but the last)

# (key template, what it runs over, monitor options that produce it): the documented key tables
# of LayerBalanceMonitor. The optimiser here is PolyakSGD (heavy ball), which also gets
# balance/corrected_diff with the ledger.
DOCUMENTED: list[tuple[str, str, dict[str, Any]]] = [
    ("balance/sq_norm/{L}", "layer", {}),
    ("balance/sq_norm_change/{L}", "layer", {}),
    ("balance/sq_norm_diff/{L}-{M}", "pair", {}),
    ("balance/sq_norm_ratio/{L}-{M}", "pair", {}),
    ("balance/drift", "once", {}),
    ("grad_norm/{L}", "layer", {"track_grad_norm": True}),
    ("grad_norm/total", "once", {"track_grad_norm": True}),
    ("balance/unit_drift_max/{L}", "hidden", {"neurons": True}),
    ("balance/unit_drift_mean/{L}", "hidden", {"neurons": True}),
    ("balance/unit_symmetry_max/{L}", "hidden", {"neurons": True}),
    ("ledger/momentum/{L}-{M}", "pair", {"ledger": True}),
    ("ledger/weight_decay/{L}-{M}", "pair", {"ledger": True}),
    ("ledger/symmetry/{L}-{M}", "pair", {"ledger": True}),
    ("ledger/discretisation/{L}-{M}", "pair", {"ledger": True}),
    ("ledger/other/{L}-{M}", "pair", {"ledger": True}),
    ("ledger/rounding/{L}-{M}", "pair", {"ledger": True}),
    ("ledger/closure/{L}-{M}", "pair", {"ledger": True}),
    ("balance/corrected_diff/{L}-{M}", "pair", {"ledger": True}),
]
PREFIXES = ("balance/", "grad_norm/", "ledger/")  # every key the monitor logs starts so


def expected_keys(options: dict[str, Any]) -> set[str]:
    """The documented keys a monitor built with ``options`` logs for this model."""
    keys: set[str] = set()
    for template, over, needs in DOCUMENTED:
        if any(options.get(name, _default(name)) != value for name, value in needs.items()):
            continue
        if over == "layer":
            keys |= {template.format(L=layer) for layer in LAYERS}
        elif over == "hidden":
            keys |= {template.format(L=layer) for layer in HIDDEN}
        elif over == "pair":
            keys |= {template.format(L=a, M=b) for a, b in PAIRS}
        else:
            keys.add(template)
    return keys


def _default(name: str) -> Any:
    import inspect

    return inspect.signature(LayerBalanceMonitor).parameters[name].default


def _monitored(loggers: list[Any], **options: Any) -> LayerBalanceMonitor:
    """The monitor built with ``options`` after a fit of STEPS steps logged to ``loggers``."""
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=EVERY, **options)
    model = BalanceModel(lr=0.05, momentum=0.9)
    fit(model, [monitor], make_loader(*make_data(), repeat=STEPS), max_steps=STEPS, logger=loggers)
    return monitor


def _events(log_dir: str) -> EventAccumulator:
    guidance = dict(DEFAULT_SIZE_GUIDANCE)
    guidance.update({SCALARS: 0, IMAGES: 0})  # 0: keep every event
    files = [f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents")]
    assert files, f"no TensorBoard event file in {log_dir}: {os.listdir(log_dir)}"
    events = EventAccumulator(log_dir, size_guidance=guidance)
    events.Reload()
    return events


def _monitor_history(monitor: LayerBalanceMonitor) -> dict[str, dict[int, float]]:
    values: dict[str, dict[int, float]] = {}
    for row in monitor.history:
        for key, value in row.items():
            if key != "step":
                values.setdefault(key, {})[int(row["step"])] = float(value)
    return values


def _check_tensorboard(log_dir: str, monitor: LayerBalanceMonitor, options: dict) -> None:
    events = _events(log_dir)
    tags = events.Tags()
    logged = {t for t in tags["scalars"] if t.startswith(PREFIXES)}
    assert logged == expected_keys(options)  # exactly the documented names, no more, no less
    history = _monitor_history(monitor)
    assert set(history) == logged
    for key in logged:
        got = {e.step: e.value for e in events.Scalars(key)}
        want = history[key]
        assert sorted(got) == sorted(want), key  # the same steps ...
        for step, value in want.items():
            # ... and values: TensorBoard stores scalars as float32 (relative rounding 6e-8);
            # the monitor's float64 values must survive to that precision
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (key, step)
    # the figure: one image under the tag "balance" at the last logged step, a decodable PNG
    assert "balance" in tags["images"]
    (image,) = events.Images("balance")
    assert image.step == max(int(r["step"]) for r in monitor.history)
    png = image.encoded_image_string
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and image.width > 100 and image.height > 100
    from matplotlib.image import imread

    assert imread(io.BytesIO(png), format="png").shape[:2] == (image.height, image.width)


@SLOW_FIT
def test_tensorboard_logger_receives_scalars_and_figure(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = _monitored([logger])
    # the cadence itself is the monitor's tests' business; here: several steps were logged
    assert len(monitor.history) >= STEPS // EVERY
    _check_tensorboard(logger.log_dir, monitor, {})
    assert monitor.figure_path == os.path.join(logger.log_dir, "balance.png")
    assert os.path.getsize(monitor.figure_path) > 0


@SLOW_FIT
def test_tensorboard_without_grad_norms(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = _monitored([logger], track_grad_norm=False)
    _check_tensorboard(logger.log_dir, monitor, {"track_grad_norm": False})


@SLOW_FIT
def test_tensorboard_ledger_and_unit_keys(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    options = {"ledger": True, "neurons": True}
    monitor = _monitored([logger], **options)
    _check_tensorboard(logger.log_dir, monitor, options)


@SLOW_FIT
def test_csv_and_tensorboard_at_once(tmp_path: Path) -> None:
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = _monitored([csv_logger, tb_logger])
    _check_tensorboard(tb_logger.log_dir, monitor, {})

    with open(os.path.join(csv_logger.log_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {c for c in rows[0] if c.startswith(PREFIXES)}
    assert columns == expected_keys({})
    history = _monitor_history(monitor)
    for key in columns:
        got = {int(r["step"]): float(r[key]) for r in rows if r[key] != ""}
        # CSVLogger writes repr-like decimal strings of float64: exact to ~1e-15 relative
        assert got == pytest.approx(history[key], rel=1e-12, abs=1e-300), key
    # the figure file goes to the first logger's directory (Trainer.log_dir), and to TensorBoard
    assert monitor.figure_path == os.path.join(csv_logger.log_dir, "balance.png")
    assert os.path.isfile(monitor.figure_path)


def test_stationarity_monitor_to_tensorboard(tmp_path: Path) -> None:
    from torch_momentum.callbacks import StationarityMonitor

    radii = [1e-3, 0.1]
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = StationarityMonitor(radii=radii, num_samples=8, subset_size=16)
    torch.manual_seed(0)
    x, y = make_data()
    model = BalanceModel(lr=0.05, momentum=0.9)
    fit(
        model,
        [monitor],
        make_loader(x, y, batch_size=32),
        max_epochs=2,
        max_steps=-1,
        logger=logger,
    )
    events = _events(logger.log_dir)
    logged = {t for t in events.Tags()["scalars"] if t.startswith("stationarity/")}
    # the documented keys: stationarity/min_norm|active/{delta:g}, stationarity/grad_norm,
    # stationarity/num_samples
    expected = {f"stationarity/{k}/{d:g}" for k in ("min_norm", "active") for d in radii}
    assert logged == expected | {"stationarity/grad_norm", "stationarity/num_samples"}
    for tag in logged:
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 2 and all(v >= 0 for v in values), (tag, values)  # one per epoch
