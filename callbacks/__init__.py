"""Lightning integration for torch-momentum (installed as ``torch_momentum.callbacks``).

- :class:`LayerBalanceMonitor`: per-layer squared norms, their adjacent differences and ratios
  (Du, Hu & Lee 2018) and gradient norms, logged through Lightning's loggers.
- :func:`plot_balance`: the four-panel figure of those series.
- :class:`OptimizerModeSwitch`: validation/test/prediction at the iterate for optimisers with
  ``train()``/``eval()`` (NesterovSGD, schedule-free).
- The arithmetic lives in plain torch in :mod:`torch_momentum.balance` (no Lightning needed);
  its layer functions are re-exported here.
- :class:`StationarityMonitor`: (δ, ε)-Goldstein stationarity certificates of the training loss.

This package imports Lightning; ``import torch_momentum`` does not. Without Lightning (or
torchmetrics, matplotlib) installed, importing it raises a ``ModuleNotFoundError`` that names the
``[lightning]`` extra.
"""

# first: without the [lightning] extra this raises an error that says to install it
import torch_momentum.callbacks._extra  # noqa: F401
from torch_momentum.balance import (
    adjacent_pairs,
    balance_metrics,
    check_layers_spec,
    discover_layers,
    layer_grad_sq_norms,
    layer_sq_norms,
    layer_sq_norms_host,
    layer_sq_norms_many,
)
from torch_momentum.callbacks.mode_switch import OptimizerModeSwitch, has_train_eval
from torch_momentum.callbacks.monitor import LayerBalanceMonitor
from torch_momentum.callbacks.network_plots import plot_network, plot_network_ledger
from torch_momentum.callbacks.plotting import (
    LEDGER_TERMS,
    ledger_series,
    load_history,
    plot_balance,
    plot_ledger,
    plot_unit_drift,
    series,
)
from torch_momentum.callbacks.stationarity import StationarityMonitor, training_step_loss

__all__ = [
    "LEDGER_TERMS",
    "LayerBalanceMonitor",
    "OptimizerModeSwitch",
    "StationarityMonitor",
    "adjacent_pairs",
    "balance_metrics",
    "check_layers_spec",
    "discover_layers",
    "has_train_eval",
    "layer_grad_sq_norms",
    "layer_sq_norms",
    "layer_sq_norms_host",
    "layer_sq_norms_many",
    "ledger_series",
    "load_history",
    "plot_balance",
    "plot_ledger",
    "plot_network",
    "plot_network_ledger",
    "plot_unit_drift",
    "series",
    "training_step_loss",
]
