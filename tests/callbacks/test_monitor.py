"""LayerBalanceMonitor and plot_balance under a real (single-process, CPU) Lightning Trainer."""

from __future__ import annotations

import csv
import itertools
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
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
from torch_momentum.balance import discover_layers
from torch_momentum.callbacks import LayerBalanceMonitor, plot_balance

PAIRS = ["net.0-net.2", "net.2-net.4"]

# a Trainer fit that renders and saves the balance figure (matplotlib: 0.6-1.2 s each): run by
# `make test`, left out of `make test-fast`
FIGURE_FIT = pytest.mark.slow


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# the theory
# ------------------------------------------------------------------------------------------------


def test_exact_discrete_identity(tmp_path: Path) -> None:
    """Between consecutive logged steps, diff changes by lr^2 (g_L^2 - g_M^2), in float64."""
    lr = 0.1
    torch.manual_seed(0)
    model = BalanceModel(make_net(), lr=lr, momentum=0.0)  # PolyakSGD(momentum=0): plain GD
    monitor = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=1, save_figure=False)
    fit(model, [monitor], logger=CSVLogger(tmp_path), max_steps=6)
    history = monitor.history
    assert [row["step"] for row in history] == list(range(6))
    scale = max(row[f"balance/sq_norm/{name}"] for row in history for name in LAYERS)
    for pair in PAIRS:
        first, second = pair.split("-")
        for now, nxt in itertools.pairwise(history):
            # metrics of step t are read before optimizer step t, so the change from row t to
            # row t + 1 is caused by step t, whose gradient is the one logged in row t
            change = nxt[f"balance/sq_norm_diff/{pair}"] - now[f"balance/sq_norm_diff/{pair}"]
            predicted = lr**2 * (now[f"grad_norm/{first}"] ** 2 - now[f"grad_norm/{second}"] ** 2)
            assert abs(predicted) > 1e-6  # not vacuous; a mis-paired step is off by ~1e-6
            # float64: each logged squared norm is exact to ~1e-15 relative (sums of a few hundred
            # squares), so the difference of two diffs is exact to ~1e-15 * ||W||^2; 1e-12 * scale
            # leaves room for that and is far below any modelling error (>= 1e-8 here).
            assert change == pytest.approx(predicted, rel=0, abs=1e-12 * scale)
    # the same series reaches the configured logger, with the same step values
    rows = _csv_rows(tmp_path)
    logged = {
        int(r["step"]): float(r["balance/sq_norm_diff/net.0-net.2"])
        for r in rows
        if r.get("balance/sq_norm_diff/net.0-net.2")
    }
    assert logged == {int(r["step"]): r["balance/sq_norm_diff/net.0-net.2"] for r in history}


def _csv_rows(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.rglob("metrics.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("init", ["balanced", "unbalanced"])
def test_drift_small_relative_to_growth(tmp_path: Path, init: str) -> None:
    lr, steps = 0.04, 50
    x, _ = make_data()
    torch.manual_seed(5)
    teacher = make_net(scales=(2.0, 2.0, 2.0))  # the target needs larger weights
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(0)
    net = make_net()
    targets = (2.0, 2.0, 2.0) if init == "balanced" else (4.0, 2.0, 0.5)
    with torch.no_grad():
        for layer, target in zip(net[::2], targets, strict=True):
            layer.weight.mul_((target / layer.weight.square().sum()).sqrt())
    monitor = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=1, save_figure=False)
    fit(
        BalanceModel(net, lr=lr),
        [monitor],
        loader=make_loader(x, y, repeat=steps),
        logger=CSVLogger(tmp_path),
        max_steps=steps,
    )
    last = monitor.history[-1]
    growth = max(abs(last[f"balance/sq_norm_change/{name}"]) for name in LAYERS)
    assert growth > 0.1  # the norms really moved
    # gradient flow would keep diff(t) == diff(0); GD departs by sum_t lr^2 (g_L^2 - g_M^2), second
    # order in lr against first-order growth: here about 0.5 % of it. 2 % fails if the norms of a
    # layer were read at another step or the wrong W(0) were used (both O(1) of the growth).
    assert last["balance/drift"] < 0.02 * growth
    # the logged drift is exactly the accumulated lr^2 terms (float64 rounding only, as above)
    accumulated = [
        sum(
            lr**2 * (r[f"grad_norm/{a}"] ** 2 - r[f"grad_norm/{b}"] ** 2)
            for r in monitor.history[:-1]
        )
        for a, b in (p.split("-") for p in PAIRS)
    ]
    assert last["balance/drift"] == pytest.approx(max(abs(v) for v in accumulated), rel=1e-9)
    first = monitor.history[0]
    assert first["balance/drift"] == 0.0  # step 0 is W(0) itself
    if init == "balanced":
        # equal squared norms at init (up to float64 rounding of the rescaling)
        assert all(abs(first[f"balance/sq_norm_diff/{p}"]) < 1e-12 for p in PAIRS)
    else:
        assert first["balance/sq_norm_diff/net.0-net.2"] == pytest.approx(2.0, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Lightning mechanics
# ------------------------------------------------------------------------------------------------


def test_cadence_matches_lightning_and_no_work_off_logging_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor logs on Lightning's logging steps (and the first and last step) and computes
    norms on those steps only.

    This test pins where the work happens: it spies on ``layer_sq_norms_host`` as the monitor
    module imports it (a moved call fails the count here, it is never skipped silently)."""
    import torch_momentum.callbacks._layers as monitor_module  # the layer mode of the monitor

    calls: list[int] = []
    real = monitor_module.layer_sq_norms_host

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "layer_sq_norms_host", spy)
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(
        layers=LAYERS, save_figure=False
    )  # the Trainer's log_every_n_steps
    fit(
        BalanceModel(make_net()),
        [monitor],
        logger=CSVLogger(tmp_path),
        max_steps=10,
        log_every_n_steps=3,
    )
    steps = [row["step"] for row in monitor.history]
    loss_steps = [int(r["step"]) for r in _csv_rows(tmp_path) if r.get("train_loss")]
    assert loss_steps == [2, 5, 8]  # Lightning logs step t when (t + 1) % 3 == 0
    # the monitor logs on the same steps, plus the first step and the last optimiser step of fit
    assert steps == [0, 2, 5, 8, 9]
    assert len(calls) == 1 + len(steps)  # W(0) once, then on logging steps only

    torch.manual_seed(0)
    override = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=4, save_figure=False)
    fit(
        BalanceModel(make_net()),
        [override],
        logger=CSVLogger(tmp_path / "o"),
        max_steps=10,
        log_every_n_steps=1,
    )
    assert [row["step"] for row in override.history] == [0, 3, 7, 9]


def test_gradient_clipping_logs_pre_clip_norms(tmp_path: Path) -> None:
    lr, clip, steps = 0.1, 0.05, 4
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    fit(
        BalanceModel(make_net(), lr=lr),
        [monitor],
        logger=CSVLogger(tmp_path),
        max_steps=steps,
        gradient_clip_val=clip,
        gradient_clip_algorithm="norm",
    )
    torch.manual_seed(0)
    reference = reference_sgd(make_net(), lr, steps, clip=clip)
    for row, ref in zip(monitor.history, reference, strict=True):
        assert row["grad_norm/total"] > 5 * clip  # clipping was active
        for i, name in enumerate(LAYERS):
            # float64, same arithmetic in another order: rounding only
            assert row[f"grad_norm/{name}"] == pytest.approx(ref["grad"][i], rel=1e-10)
            # the weights follow the clipped trajectory
            assert row[f"balance/sq_norm/{name}"] == pytest.approx(ref["sq"][i], rel=1e-10)


def test_frozen_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = make_net()
    net[2].requires_grad_(False)
    # discover_layers: a frozen module is not a layer, the trainable layers around it are
    # compared directly (the monitor's layers when it is given the discovered ones)
    discovered = list(discover_layers(BalanceModel(net)))
    assert discovered == ["net.0", "net.4"]
    default = LayerBalanceMonitor(layers=discovered, save_figure=False)
    fit(BalanceModel(net), [default], logger=CSVLogger(tmp_path / "d"), max_steps=3)
    assert default.layer_names == ["net.0", "net.4"]
    assert "balance/sq_norm_diff/net.0-net.4" in default.history[0]

    torch.manual_seed(0)
    net = make_net()
    net[2].requires_grad_(False)
    named = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    fit(BalanceModel(net), [named], logger=CSVLogger(tmp_path / "n"), max_steps=3)
    for row in named.history:
        assert row["grad_norm/net.2"] == 0.0  # no gradient: counted as 0
        assert row["balance/sq_norm_change/net.2"] == 0.0  # never updated
        assert row["grad_norm/net.0"] > 0.0


def test_without_gradient_norms(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, track_grad_norm=False, save_figure=False)
    fit(BalanceModel(make_net()), [monitor], logger=CSVLogger(tmp_path), max_steps=2)
    assert monitor.history and not any(k.startswith("grad_norm/") for k in monitor.history[0])
    fig = plot_balance(monitor)
    assert fig.axes[3].get_legend() is None  # panel (d) says "not logged"


class _NamedModel(BalanceModel):
    def __init__(self) -> None:
        super().__init__(net=nn.Identity())
        self.encoder = nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU()).double()
        self.hidden = nn.Linear(16, 8, bias=False).double()
        self.head = nn.Linear(8, 3, bias=False).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.encoder(x))))


def test_explicitly_named_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _NamedModel()
    w0 = {
        n: float(m.weight.detach().square().sum())
        for n, m in [("head", model.head), ("encoder", model.encoder[0])]
    }
    monitor = LayerBalanceMonitor(layers=["head", "hidden", "encoder"], save_figure=False)
    fit(model, [monitor], logger=CSVLogger(tmp_path), max_steps=2)
    assert monitor.layer_names == ["head", "hidden", "encoder"]
    first = monitor.history[0]
    assert {k for k in first if "diff" in k} == {
        "balance/sq_norm_diff/head-hidden",
        "balance/sq_norm_diff/hidden-encoder",
    }
    # float64 norms of the initial weights computed two ways: rounding only
    assert first["balance/sq_norm/head"] == pytest.approx(w0["head"], rel=1e-12)
    assert first["balance/sq_norm/encoder"] == pytest.approx(w0["encoder"], rel=1e-12)


def test_layers_dict_monitors_bias_conservation(tmp_path: Path) -> None:
    """With biases, ||W_h||^2 + ||b_h||^2 - ||W_{h+1}||^2 obeys the exact GD identity."""
    lr, steps = 0.1, 4

    def model() -> BalanceModel:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        return BalanceModel(net, lr=lr)

    def gaps(monitor: LayerBalanceMonitor, pair: str) -> list[float]:
        first, second = pair.split("-")
        h = monitor.history
        return [
            (b[f"balance/sq_norm_diff/{pair}"] - a[f"balance/sq_norm_diff/{pair}"])
            - lr**2 * (a[f"grad_norm/{first}"] ** 2 - a[f"grad_norm/{second}"] ** 2)
            for a, b in itertools.pairwise(h)
        ]

    exact = LayerBalanceMonitor(
        layers={"hidden": ["net.0.weight", "net.0.bias"], "out": ["net.2.weight"]},
        save_figure=False,
    )
    fit(model(), [exact], logger=CSVLogger(tmp_path / "dict"), max_steps=steps)
    scale = exact.history[0]["balance/sq_norm/hidden"]
    # float64 rounding only, as in test_exact_discrete_identity
    assert max(abs(g) for g in gaps(exact, "hidden-out")) < 1e-12 * scale

    # the modules' own parameters: layers (W0, b0) and (W2, b2)
    default = LayerBalanceMonitor(layers=["net.0", "net.2"], save_figure=False)
    fit(model(), [default], logger=CSVLogger(tmp_path / "default"), max_steps=steps)
    # including the output bias breaks the identity by 2 lr <g_b2, b2>: far above rounding
    assert max(abs(g) for g in gaps(default, "net.0-net.2")) > 1e-6


def test_checkpoint_resume_continues_the_same_series(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whole = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    fit(BalanceModel(make_net()), [whole], logger=CSVLogger(tmp_path / "whole"), max_steps=6)

    torch.manual_seed(0)
    first = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    trainer = fit(
        BalanceModel(make_net()), [first], logger=CSVLogger(tmp_path / "first"), max_steps=3
    )
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert len(state["sq_norms0"]) == 3 and len(state["history"]) == 3

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    fit(
        BalanceModel(make_net()),
        [resumed],
        logger=CSVLogger(tmp_path / "resumed"),
        max_steps=6,
        ckpt_path=ckpt,
    )
    assert [r["step"] for r in resumed.history] == list(range(6))
    for a, b in zip(resumed.history, whole.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            # same floats, same order of operations: identical up to float64 rounding
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15), (a["step"], key)


# ------------------------------------------------------------------------------------------------
# configuration errors
# ------------------------------------------------------------------------------------------------


def test_fewer_than_two_layers(tmp_path: Path) -> None:
    model = BalanceModel(nn.Sequential(nn.Linear(12, 3, bias=False)).double())
    with pytest.raises(MisconfigurationException, match="no adjacent pairs"):
        fit(
            model,
            [LayerBalanceMonitor(layers=["net.0"], save_figure=False)],
            logger=CSVLogger(tmp_path),
            max_steps=1,
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": "net.0"}, TypeError, "layers"),
        ({"layers": []}, ValueError, "layers"),
        ({"layers": ["a", "a"]}, ValueError, "twice"),
        ({"layers": [1, 2]}, TypeError, "layers"),
        ({"layers": {"a": "net.0.weight"}}, TypeError, r"layers\['a'\]"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps.*0"),
        ({"log_every_n_steps": 2.0}, TypeError, "log_every_n_steps"),
        ({"log_every_n_steps": True}, TypeError, "log_every_n_steps"),
        ({"track_grad_norm": 1}, TypeError, "track_grad_norm"),
        ({"save_figure": "yes"}, TypeError, "save_figure"),
    ],
)
def test_argument_validation(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LayerBalanceMonitor(**kwargs)


def test_layer_spec_errors_fail_before_training(tmp_path: Path) -> None:
    """An unknown layer name and overlapping layers (``net`` contains ``net.0``) are the
    ``discover_layers`` errors (tests/balance/test_layers.py), raised by the monitor when the fit
    starts, before any step."""
    with pytest.raises(ValueError, match=r"'net\.7'.*net\.0"):
        fit(
            BalanceModel(make_net()),
            [LayerBalanceMonitor(layers=["net.0", "net.7"])],
            logger=CSVLogger(tmp_path),
            max_steps=1,
        )
    with pytest.raises(ValueError, match=r"overlap.*'net\.0\.weight'.*'net'.*'net\.0'"):
        fit(
            BalanceModel(make_net()),
            [LayerBalanceMonitor(layers=["net", "net.0"], save_figure=False)],
            logger=CSVLogger(tmp_path),
            max_steps=1,
        )


# ------------------------------------------------------------------------------------------------
# issue 9 regressions: resume with another cadence, short runs
# ------------------------------------------------------------------------------------------------


def test_resume_with_another_cadence_continues_the_series(tmp_path: Path) -> None:
    """Regression: the cadence was part of ``state_key``, so W(0), the history (and now the
    ledger) were silently dropped when resuming with another ``log_every_n_steps``."""
    torch.manual_seed(0)
    whole = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True)
    fit(
        BalanceModel(make_net(), momentum=0.9),
        [whole],
        logger=CSVLogger(tmp_path / "whole"),
        max_steps=8,
    )

    torch.manual_seed(0)
    first = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=2, save_figure=False, ledger=True)
    trainer = fit(
        BalanceModel(make_net(), momentum=0.9),
        [first],
        logger=CSVLogger(tmp_path / "first"),
        max_steps=4,
    )
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    torch.manual_seed(123)  # a different init: W(0) must come from the checkpoint
    resumed = LayerBalanceMonitor(
        layers=LAYERS, log_every_n_steps=3, save_figure=False, ledger=True
    )
    fit(
        BalanceModel(make_net(), momentum=0.9),
        [resumed],
        logger=CSVLogger(tmp_path / "resumed"),
        max_steps=8,
        ckpt_path=ckpt,
    )
    steps = [r["step"] for r in resumed.history]
    # before the checkpoint: the first run's rows (0, 1, 3); after it: the new cadence and the
    # last step (a resumed series keeps its cadence: no extra row at the first resumed step)
    assert steps == [0, 1, 3, 5, 7]
    reference = {r["step"]: r for r in whole.history}
    for row in resumed.history:
        ref = reference[row["step"]]
        assert row.keys() == ref.keys()
        for key in row:
            # same floats, same operations (the ledger's sums restored from the checkpoint and
            # continued): float64 rounding only
            assert row[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-14), (row["step"], key)


def test_resume_with_another_layer_set_warns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    trainer = fit(
        BalanceModel(make_net()), [first], logger=CSVLogger(tmp_path / "first"), max_steps=3
    )
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    other = LayerBalanceMonitor(layers=["net.0", "net.2"], save_figure=False)
    with pytest.warns(RuntimeWarning, match=r"other layer sets.*new series"):
        fit(
            BalanceModel(make_net()),
            [other],
            logger=CSVLogger(tmp_path / "r"),
            max_steps=5,
            ckpt_path=ckpt,
        )
    assert [r["step"] for r in other.history] == [3, 4]
    assert other.history[0]["balance/drift"] == 0.0  # a new series from the resumed weights


@FIGURE_FIT
@pytest.mark.parametrize("every", [None, 50])
def test_short_run_records_first_and_last_step(tmp_path: Path, every: int | None) -> None:
    """Regression: a run shorter than log_every_n_steps logged nothing and saved no figure."""
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, log_every_n_steps=every)
    trainer = fit(
        BalanceModel(make_net()),
        [monitor],
        logger=CSVLogger(tmp_path),
        max_steps=3,
        log_every_n_steps=50,
    )
    assert [r["step"] for r in monitor.history] == [0, 2]
    assert "grad_norm/total" in monitor.history[-1]
    assert monitor.figure_path == os.path.join(trainer.log_dir, "balance.png")
    assert os.path.isfile(monitor.figure_path)


def test_fast_dev_run_records_its_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True)
    fit(
        BalanceModel(make_net()),
        [monitor],
        logger=CSVLogger(tmp_path),
        fast_dev_run=True,
        max_steps=-1,
        log_every_n_steps=50,
    )
    assert [r["step"] for r in monitor.history] == [0]


class _StopAfter(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@WITHOUT_LOGGER
def test_unforeseen_stop_records_the_weights_after_the_last_update(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(
        layers=LAYERS, log_every_n_steps=50, save_figure=False, ledger=True
    )
    model = BalanceModel(make_net())
    trainer = fit(model, [monitor, _StopAfter(3)], max_steps=100, log_every_n_steps=50)
    assert trainer.global_step == 3
    assert [r["step"] for r in monitor.history] == [0, 3]
    last = monitor.history[-1]
    assert "grad_norm/total" not in last  # read after the last update: no gradient of step 3
    # the ledger closes over steps 0..2; float64 round-off only
    assert abs(last["ledger/closure/net.0-net.2"]) < 1e-12
    w = [float(p.detach().square().sum()) for p in model.net.parameters()]
    # float64 norms computed two ways: rounding only
    assert last["balance/sq_norm/net.0"] == pytest.approx(w[0], rel=1e-12)
