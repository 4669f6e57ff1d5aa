"""LayerBalanceMonitor resumed from a checkpoint that cannot continue its series: a state saved by
the other mode (before this version, ``layers=None`` meant the layer mode with discovered layers,
under the same state key as today's default mode), or a default-mode state that no longer fits
the model. The monitor then starts a new series and must drop the checkpoint's history with it:
rows of two series in one history mix two origins."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.trainer import LAYERS, WITHOUT_LOGGER, BalanceModel, fit, make_net
from torch_momentum.callbacks import LayerBalanceMonitor

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

pytestmark = [WITHOUT_LOGGER, pytest.mark.usefixtures("one_thread")]

DEFAULT_KEY = LayerBalanceMonitor().state_key
LAYER_KEY = LayerBalanceMonitor(layers=LAYERS).state_key


def _checkpoint(tmp_path: Path, monitor: LayerBalanceMonitor, steps: int = 3) -> dict[str, Any]:
    """Fit ``monitor`` for ``steps`` steps and return the checkpoint's contents."""
    torch.manual_seed(0)
    trainer = fit(BalanceModel(make_net(), momentum=0.9), [monitor], max_steps=steps)
    assert [r["step"] for r in monitor.history] == list(range(steps))
    path = tmp_path / "saved.ckpt"
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=False)


def _resume(
    tmp_path: Path, checkpoint: dict[str, Any], monitor: LayerBalanceMonitor, match: str
) -> None:
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match=match):
        fit(BalanceModel(make_net(), momentum=0.9), [monitor], max_steps=5, ckpt_path=path)


def _move(checkpoint: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    states = checkpoint["callbacks"]
    states[new] = states.pop(old)
    return states[new]


def test_a_layer_mode_state_does_not_mix_into_the_default_mode(tmp_path: Path) -> None:
    """A layer-mode state under the default mode's key (what ``layers=None`` saved before, with
    version 2 and no mode): the default mode starts a new series at the resumed step, and its
    history holds that series only (before: the layer rows 0-2 stayed, beside default-mode rows
    3-4, and nothing said why)."""
    checkpoint = _checkpoint(tmp_path, LayerBalanceMonitor(layers=LAYERS, save_figure=False))
    state = _move(checkpoint, LAYER_KEY, DEFAULT_KEY)
    state["version"] = 2  # as saved before the mode was recorded
    state.pop("mode", None)
    monitor = LayerBalanceMonitor(save_figure=False)
    _resume(tmp_path, checkpoint, monitor, r"saved by the layer mode.*new series")
    assert [r["step"] for r in monitor.history] == [3, 4]
    assert all("balance/sq_norm/net.0" not in row for row in monitor.history)
    assert monitor.history[0]["balance/sq_norm_change/max"] == 0.0  # W(0): the resumed weights


def test_a_default_mode_state_does_not_mix_into_the_layer_mode(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, LayerBalanceMonitor(save_figure=False))
    _move(checkpoint, DEFAULT_KEY, LAYER_KEY)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    _resume(tmp_path, checkpoint, monitor, r"saved by the default mode.*new series")
    assert [r["step"] for r in monitor.history] == [3, 4]
    assert all("balance/sq_norm/total" not in row for row in monitor.history)
    assert monitor.history[0]["balance/drift"] == 0.0


def test_a_state_of_an_unknown_version_starts_a_new_series(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, LayerBalanceMonitor(layers=LAYERS, save_figure=False))
    checkpoint["callbacks"][LAYER_KEY]["version"] = 99
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False)
    _resume(tmp_path, checkpoint, monitor, r"version 99.*new series")
    assert [r["step"] for r in monitor.history] == [3, 4]
    assert monitor.history[0]["balance/drift"] == 0.0


def test_a_default_mode_resume_that_cannot_continue_clears_the_history(tmp_path: Path) -> None:
    """The default mode's state no longer fits (here: saved for other weight groups): the watch
    refuses it and the series starts afresh at the resumed step; the checkpoint's rows 0-2,
    relative to the old origin, were kept before."""
    checkpoint = _checkpoint(tmp_path, LayerBalanceMonitor(save_figure=False, ledger=True))
    summary = checkpoint["callbacks"][DEFAULT_KEY]["network"]["watch"]["summary"]
    summary["groups"] = ["another"]
    monitor = LayerBalanceMonitor(save_figure=False, ledger=True)
    _resume(tmp_path, checkpoint, monitor, r"does not match.*starts afresh")
    assert [r["step"] for r in monitor.history] == [3, 4]
    assert monitor.history[0]["balance/sq_norm_change/max"] == 0.0
    assert monitor.history[0]["ledger/closure"] == 0.0


def test_saved_symmetries_naming_missing_parameters_start_a_new_series(tmp_path: Path) -> None:
    """The checkpoint's symmetries name a parameter this model does not have (the model was
    wrapped or renamed since): the watch refuses them when it is built, and the fit goes on
    with a new series and a warning (before: the ValueError escaped from ``on_train_start``
    and the fit crashed)."""
    from torch_momentum.balance import Symmetry, SymmetryPart

    checkpoint = _checkpoint(tmp_path, LayerBalanceMonitor(save_figure=False))
    ghost = SymmetryPart("ghost.weight", None, 0, 0, 1, 1.0, 0)
    saved = checkpoint["callbacks"][DEFAULT_KEY]["network"]["symmetries"]
    saved.append(Symmetry("scale", "ghost", ("ghost.weight",), 1, (ghost,), 0.0).to_state())
    monitor = LayerBalanceMonitor(save_figure=False)
    _resume(tmp_path, checkpoint, monitor, r"ghost\.weight.*starts afresh")
    assert [r["step"] for r in monitor.history] == [3, 4]
    assert monitor.history[0]["balance/sq_norm_change/max"] == 0.0
    assert all("ghost" not in s.name for s in monitor.symmetries or [])
