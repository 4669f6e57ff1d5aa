r"""LayerBalanceMonitor: per-layer norm balance and gradient norms, logged from Lightning.

For a network that is 1-homogeneous in each layer's weights (bias-free linear, ReLU, leaky ReLU),
:math:`\langle\nabla_{W_h}\ell, W_h\rangle` is the same for every layer, so gradient flow conserves
:math:`\|W_h\|^2 - \|W_{h'}\|^2` (Du, Hu & Lee 2018), and one gradient-descent step with learning
rate :math:`\eta` changes the difference of adjacent layers by exactly
:math:`\eta^2(\|g_h\|^2 - \|g_{h+1}\|^2)`. With biases the conserved quantity is
:math:`\|W_h\|^2 + \|b_h\|^2 - \|W_{h+1}\|^2`; pass ``layers={...}`` to monitor it. The monitor
logs these quantities so that the law (and how far an optimiser departs from it) can be watched.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from torch_momentum.callbacks.norms import (
    _is_dtensor,
    balance_metrics,
    check_layers_spec,
    discover_layers,
    layer_sq_norms_host,
)

__all__ = ["LayerBalanceMonitor"]

_STATE_VERSION = 1


class LayerBalanceMonitor(Callback):
    r"""Log per-layer squared norms, their adjacent differences and ratios, and gradient norms.

    At each logging step ``t`` (the optimizer step about to be taken) the monitor reads the
    weights :math:`W_L(t)` and the gradients in ``on_before_optimizer_step``, i.e. after AMP
    unscaling, after gradient accumulation and before gradient clipping, and logs to every
    configured logger, from rank zero:

    ==================================== ===========================================================
    ``balance/sq_norm/{L}``              :math:`\|W_L(t)\|^2` (squared Frobenius norm, all tensors)
    ``balance/sq_norm_change/{L}``       :math:`\|W_L(t)\|^2 - \|W_L(0)\|^2`
    ``balance/sq_norm_diff/{L}-{M}``     :math:`\|W_L(t)\|^2 - \|W_M(t)\|^2`, adjacent L, M
    ``balance/sq_norm_ratio/{L}-{M}``    :math:`\|W_L(t)\|^2 / \|W_M(t)\|^2`
    ``balance/drift``                    :math:`\max_{pairs} |diff(t) - diff(0)|`
    ``grad_norm/{L}``, ``grad_norm/total`` :math:`\|\nabla_{W_L}\ell\|_2` and over all layers
    ==================================== ===========================================================

    For a layer-wise 1-homogeneous network, ``balance/drift`` is 0 under gradient flow and, under
    gradient descent with learning rate :math:`\eta`, each step changes ``sq_norm_diff/{L}-{M}`` by
    exactly :math:`\eta^2(\|g_L\|^2 - \|g_M\|^2)` (Du, Hu & Lee 2018).

    The cadence is Lightning's: the values are logged at the same steps and with the same step
    value as ``self.log(...)`` metrics of ``training_step`` (step ``t`` is logged when
    ``(t + 1) % log_every_n_steps == 0`` or the trainer is stopping). Norms are computed only on
    those steps, all layers in one multi-tensor pass; other steps cost a few integer operations
    and never synchronise with the device. ``history`` holds one dict ``{"step": t, key: value}``
    per logging step on rank zero. ``W(0)`` is recorded when training starts at step 0 (a new
    series), or restored from a checkpoint together with the history, so that ``ckpt_path=``
    resume continues the same series.

    Layers: see :func:`~torch_momentum.callbacks.discover_layers`. By default every submodule
    that directly owns trainable parameters, in registration order; a frozen module is not a
    layer. A layer named explicitly (list or dict) whose parameters get no gradient (frozen, or
    unused) contributes a gradient norm of 0. Parameters are looked up by name on every logging
    step, so wrappers that re-register parameters (FSDP2) are followed.

    On a step that a GradScaler skips (inf/NaN gradients) the logged gradient norms are inf/NaN,
    as read. The norms are those of the parameters as the model holds them; for
    :class:`~torch_momentum.NesterovSGD` in training mode that is the look-ahead point.

    Distributed: under DDP the parameters and (all-reduced) gradients are replicated and rank
    zero alone computes. With sharded parameters (FSDP2 ``fully_shard`` under
    ``ModelParallelStrategy``, DTensor) every rank computes the squared norms of its shards and
    one ``all_reduce`` per logging step sums them; every rank joins it. FSDP1
    (``FSDPStrategy``) and DeepSpeed flatten parameters and are not supported.

    Args:
        layers: ``None`` (discover), a list of module names (their order defines adjacency), or a
            dict ``{layer_name: [parameter names]}``.
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses the Trainer's
            ``log_every_n_steps``.
        track_grad_norm: also log ``grad_norm/{L}`` and ``grad_norm/total``.
        save_figure: at the end of training, rank zero saves ``balance.png`` (see
            :func:`~torch_momentum.callbacks.plot_balance`) in the logger's directory and logs
            the figure to loggers that take figures.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an empty ``layers`` or ``log_every_n_steps < 1``.
    """

    def __init__(
        self,
        layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        log_every_n_steps: int | None = None,
        track_grad_norm: bool = True,
        save_figure: bool = True,
    ) -> None:
        super().__init__()
        self.layers = check_layers_spec(layers)
        if log_every_n_steps is not None:
            if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int):
                raise TypeError(
                    f"`log_every_n_steps` must be an int or None, got {log_every_n_steps!r}"
                )
            if log_every_n_steps < 1:
                raise ValueError(f"`log_every_n_steps` must be >= 1, got {log_every_n_steps}")
        for arg, value in (("track_grad_norm", track_grad_norm), ("save_figure", save_figure)):
            if not isinstance(value, bool):
                raise TypeError(f"`{arg}` must be a bool, got {value!r}")
        self.log_every_n_steps = log_every_n_steps
        self.track_grad_norm = track_grad_norm
        self.save_figure = save_figure

        #: one dict per logging step on rank zero: ``{"step": t, key: value, ...}``
        self.history: list[dict[str, float]] = []
        #: where ``balance.png`` was written (rank zero), once training ended
        self.figure_path: str | None = None
        self._names: list[str] = []
        self._refs: list[list[tuple[nn.Module, str]]] = []
        self._sharded = False
        self._sq0: list[float] | None = None
        self._restored: dict[str, Any] | None = None
        self._last_step = -1

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layers if not isinstance(self.layers, Mapping) else dict(self.layers),
            log_every_n_steps=self.log_every_n_steps,
        )

    @property
    def layer_names(self) -> list[str]:
        """The monitored layers, in adjacency order (known once training started)."""
        return list(self._names)

    def state_dict(self) -> dict[str, Any]:
        """``W(0)``'s squared norms, the initial adjacent differences, the layer names and the
        history (rank zero's; other ranks hold an empty list)."""
        sq0 = None if self._sq0 is None else list(self._sq0)
        return {
            "version": _STATE_VERSION,
            "layer_names": list(self._names),
            "sq_norms0": sq0,
            "sq_norm_diffs0": None if sq0 is None else [a - b for a, b in itertools.pairwise(sq0)],
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``W(0)`` and the history; applied when training starts."""
        self._restored = dict(state_dict)
        self.history = [dict(row) for row in state_dict.get("history", [])]

    def reset(self) -> None:
        """Forget ``W(0)`` and the history: the next training run starts a new series."""
        self.history = []
        self._sq0 = None
        self._restored = None
        self._last_step = -1
        self.figure_path = None

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy in ("FSDPStrategy", "DeepSpeedStrategy"):
            raise MisconfigurationException(
                f"`LayerBalanceMonitor` does not support `{strategy}`: it flattens parameters, so"
                " per-layer norms cannot be read from the module. Use `strategy='ddp'`, or"
                " `ModelParallelStrategy` with `fully_shard` (FSDP2) in `configure_model`."
            )
        if not trainer.loggers:
            rank_zero_warn(
                "`LayerBalanceMonitor` is used with a `Trainer` that has no logger: the balance"
                " metrics are kept only in `monitor.history` and no figure is saved. Pass a"
                " logger, e.g. `Trainer(logger=CSVLogger('logs'))`, to log them.",
                category=RuntimeWarning,
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resolve(pl_module)
        step = _logging_step(trainer)
        restored, self._restored = self._restored, None
        if restored is not None and restored.get("sq_norms0") is not None:
            if list(restored.get("layer_names", [])) == self._names:
                self._sq0 = [float(v) for v in restored["sq_norms0"]]
            else:
                rank_zero_warn(
                    "`LayerBalanceMonitor`: the checkpoint's layers"
                    f" {restored.get('layer_names')} differ from the model's {self._names};"
                    f" W(0) is recorded afresh from the weights at step {step}.",
                    category=RuntimeWarning,
                )
                self._sq0 = None
        elif step == 0:
            self._sq0 = None  # a new run from step 0: a new series
        if self._sq0 is None:
            # every rank joins (the sum over shards is a collective)
            self._sq0 = layer_sq_norms_host([self._params()], reduce=self._sharded)[0]
        # a resumed run continues the series after the checkpoint's step
        self.history = [row for row in self.history if row.get("step", -1) < step]
        self._last_step = step - 1

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = _logging_step(trainer)
        if step == self._last_step:  # several optimizers step on one batch: log once
            return
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if every == 0 or ((step + 1) % every != 0 and not trainer.should_stop):
            return
        self._last_step = step
        if not self._sharded and not trainer.is_global_zero:
            return  # replicated: rank zero alone computes and logs
        if not self._refs:
            self._resolve(pl_module)
        params = self._params()
        if self._sq0 is None:  # used without on_train_start (e.g. called directly)
            self._sq0 = layer_sq_norms_host([params], reduce=self._sharded)[0]
        if self.track_grad_norm:
            grads = [[p.grad for p in layer] for layer in params]
            sq, grad_sq = layer_sq_norms_host([params, grads], reduce=self._sharded)
        else:
            (sq,), grad_sq = layer_sq_norms_host([params], reduce=self._sharded), None
        if not trainer.is_global_zero:
            return
        metrics = balance_metrics(sq, self._sq0, grad_sq, self._names)
        self.history.append({"step": step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.save_figure or not trainer.loggers:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank calls it
        if not trainer.is_global_zero or not self.history:
            return
        try:
            from torch_momentum.callbacks.plotting import plot_balance

            figure = plot_balance(self.history)
        except ImportError as err:
            rank_zero_warn(
                f"`LayerBalanceMonitor(save_figure=True)` needs matplotlib ({err}); install"
                " `torch-momentum[lightning]` or pass `save_figure=False`.",
                category=RuntimeWarning,
            )
            return
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self.figure_path = os.path.join(log_dir, "balance.png")
            figure.savefig(self.figure_path, dpi=120)
        step = int(self.history[-1]["step"])
        for logger in trainer.loggers:
            _log_figure(logger, figure, step)

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------

    def _resolve(self, pl_module: nn.Module) -> None:
        found = discover_layers(pl_module, self.layers)
        if len(found) < 2:
            hint = (
                " Pass `layers=[...]` naming at least two modules, or"
                " `layers={name: [parameter names]}`."
            )
            raise MisconfigurationException(
                f"`LayerBalanceMonitor` found {len(found)} layer(s) {list(found)} in"
                f" {type(pl_module).__name__}: the balance metrics compare adjacent layers, and"
                f" with fewer than two layers there are no adjacent pairs.{hint}"
            )
        self._names = list(found)
        self._refs = [
            [_owner(pl_module, p_name) for p_name, _ in params] for params in found.values()
        ]
        self._sharded = any(_is_dtensor(p) for params in found.values() for _, p in params)

    def _params(self) -> list[list[Tensor]]:
        return [[mod._parameters[attr] for mod, attr in layer] for layer in self._refs]


def _owner(root: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = param_name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), attr


def _logging_step(trainer: Trainer) -> int:
    """The step Lightning logs ``training_step`` metrics with (batches that stepped so far)."""
    loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(loop, "epoch_loop", None)
    step = getattr(epoch_loop, "_batches_that_stepped", None)
    return int(trainer.global_step if step is None else step)


def _log_figure(logger: Any, figure: Any, step: int) -> None:
    """Log a matplotlib figure to loggers that take figures (TensorBoard, MLflow); skip others."""
    try:
        experiment = logger.experiment
    except Exception:  # a logger whose experiment cannot be created here
        return
    if callable(getattr(experiment, "add_figure", None)):  # TensorBoard (and tensorboardX)
        experiment.add_figure("balance", figure, global_step=step, close=False)
    elif callable(getattr(experiment, "log_figure", None)) and hasattr(logger, "run_id"):
        experiment.log_figure(logger.run_id, figure, "balance.png")  # MLflow
