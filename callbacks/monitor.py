r"""LayerBalanceMonitor: the balance of a network and its conserved quantities, from Lightning.

Gradient flow conserves a quantity for every symmetry of the loss (Kunin et al. 2021): the
squared norm of weights right before a normalisation layer (scale), the difference of squared
norms of a homogeneous unit's incoming and outgoing weights (rescale; summed over a layer, the
layer-balance law :math:`\|W_h\|^2 - \|W_{h+1}\|^2` of Du, Hu & Lee 2018), the sum of a softmax
classifier's column (translation). The monitor logs how far training moves them: by default the
symmetries the model really has, found and verified at the first batch, summarised in a fixed,
small set of keys; with ``layers=`` the per-layer norms, differences and ratios of chosen layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from torch_momentum.balance import BalanceLedger, check_layers_spec
from torch_momentum.balance.symmetry import Symmetry
from torch_momentum.callbacks._layers import LayerMode
from torch_momentum.callbacks._network import LossFn, NetworkMode
from torch_momentum.callbacks._trainer import is_last_step, logging_step, loss_scale
from torch_momentum.callbacks.plotting import log_figure, save_figures

__all__ = ["LayerBalanceMonitor"]

#: 3: the state names its mode (``"mode"``); before, ``layers=None`` meant the layer mode with
#: discovered layers and saved a layer-mode state under the default mode's key
_STATE_VERSION = 3


class LayerBalanceMonitor(Callback):
    r"""Log the balance of a network: its symmetries' charges, or chosen layers' norms.

    **Default mode** (no ``layers=``). At the first training batch the monitor finds the model's
    symmetries (:func:`~torch_momentum.balance.find_symmetries` on ``loss_fn``, default the
    module's ``training_step``; rank zero; the RNG and the module's state are left as they were)
    and logs, whatever the depth, at most 25 keys (see
    :class:`~torch_momentum.balance.summary.BalanceSummary` and
    :class:`~torch_momentum.balance.watch.NetworkWatch`): ``grad_norm/total``,
    ``balance/sq_norm/total``, ``balance/sq_norm_change/max``, ``balance/drift`` (the
    layer-balance drift where a rescale symmetry makes it a law), per kind (scale, rescale,
    translation) ``charge/{kind}/max``, ``charge/{kind}/median`` and ``charge/{kind}/worst``
    (an index into the kind's names), for scale-invariant groups ``angle/mean`` (the angle
    between :math:`x_t` and :math:`x_{t+1}`), ``angle/prediction``
    (:math:`\sqrt{2\eta\lambda/(1+\mu)}`, heavy ball with weight decay) and
    ``effective_lr/median`` (:math:`\eta/\|x_A\|^2`); with ``ledger=True`` the terms of every
    charge's ledger summed over the quadratic charges (``ledger/{term}``) and the largest
    relative closure (``ledger/closure``); with ``neurons=True`` ``balance/unit_drift_max``
    and ``balance/unit_symmetry_max`` over the units of the rescale symmetries. ``per_layer=True``
    adds one key per weight matrix and per symmetry (names without wrapper prefixes such as
    ``model.``, block indices zero-padded so that they sort). One warning names the weight
    matrices no balance law covers and why (a normalisation layer after it, a GELU, a residual
    add). ``symmetries`` holds what was found; ``details`` the per-group values the figures draw
    (:func:`~torch_momentum.callbacks.plot_network`, heatmaps above ten groups). With sharded
    parameters the monitor logs norms only (discovery needs the full parameters).

    **Layer mode** (``layers=`` a list of module names, or ``{layer: [parameter names]}``): at
    each logging step ``t`` (the optimizer step about to be taken) the monitor reads the weights
    :math:`W_L(t)` and the gradients in ``on_before_optimizer_step``, i.e. after AMP unscaling,
    after gradient accumulation and before gradient clipping, and logs to every configured
    logger, from rank zero:

    ==================================== ===========================================================
    ``balance/sq_norm/{L}``              :math:`\|W_L(t)\|^2` (squared Frobenius norm, all tensors)
    ``balance/sq_norm_change/{L}``       :math:`\|W_L(t)\|^2 - \|W_L(0)\|^2`
    ``balance/sq_norm_diff/{L}-{M}``     :math:`\|W_L(t)\|^2 - \|W_M(t)\|^2`, adjacent L, M
    ``balance/sq_norm_ratio/{L}-{M}``    :math:`\|W_L(t)\|^2 / \|W_M(t)\|^2`
    ``balance/drift``                    :math:`\max_{pairs} |diff(t) - diff(0)|`
    ``grad_norm/{L}``                    :math:`\|\nabla_{W_L}\ell\|_2`
    ``grad_norm/total``                  the same over all layers
    ==================================== ===========================================================

    For a layer-wise 1-homogeneous network, ``balance/drift`` is 0 under gradient flow and, under
    gradient descent with learning rate :math:`\eta`, each step changes ``sq_norm_diff/{L}-{M}`` by
    exactly :math:`\eta^2(\|g_L\|^2 - \|g_M\|^2)` (Du, Hu & Lee 2018).

    The cadence is Lightning's: the values are logged at the same steps and with the same step
    value as ``self.log(...)`` metrics of ``training_step`` (step ``t`` is logged when
    ``(t + 1) % log_every_n_steps == 0`` or the trainer is stopping), and always at the first
    step of a new series and the last optimiser step of ``fit`` (when the end cannot be
    foreseen, e.g. early stopping or ``max_time``, a last row at the step after the last update
    holds the weights and the ledger but no gradient norms). Norms are computed only on those
    steps, all layers in one multi-tensor pass; other steps cost a few integer operations and
    never synchronise with the device. ``history`` holds one dict ``{"step": t, key: value}``
    per logging step on rank zero. ``W(0)`` is recorded when training starts at step 0 (a new
    series), or restored from a checkpoint together with the history and the ledger's sums, so
    that ``ckpt_path=`` resume (also from a mid-epoch checkpoint) continues the same series,
    row for row, whatever the cadence; a checkpoint saved for another layer set is ignored with
    a warning. A second ``fit`` on the same Trainer continues the series of the first (one
    origin for the layer series, the ledger and the per-unit balance); :meth:`reset` starts a
    new one. Under mixed precision with an optimiser that unscales its gradients itself (fused
    kernels), the loss scale is divided out of the gradient norms.

    ``neurons=True`` pairs every hidden unit (output channel of a conv layer) of each monitored
    layer but the last with its incoming weights (row and bias) and outgoing weights (column;
    after a ``Flatten``, the columns of its channel) through chains of Linear/Conv layers with
    ReLU, LeakyReLU, Identity, Dropout, pooling or Flatten between them (see
    :func:`~torch_momentum.balance.pair_units`; other modules are an error naming them), and
    logs, per hidden layer L, at logging steps only:

    ==================================== ===========================================================
    ``balance/unit_drift_max/{L}``        :math:`\max_i |D_i(t) - D_i(0)|`,
                                          :math:`D_i = \|in_i\|^2 - \|out_i\|^2` at the iterate
    ``balance/unit_drift_mean/{L}``       the mean over units of :math:`|D_i(t) - D_i(0)|`
    ``balance/unit_symmetry_max/{L}``     :math:`\max_i |R_i|`, :math:`R_i = \langle in_i,
                                          g\rangle - \langle out_i, g\rangle` (0 when the net is
                                          homogeneous in unit ``i``)
    ==================================== ===========================================================

    ``unit_drift`` then holds :math:`D_i(t) - D_i(0)` per hidden layer (CPU tensors).

    ``ledger=True`` reads every optimiser step (step pre/post hooks on the optimisers, so the
    update actually applied is seen: after accumulation, AMP unscaling and clipping; a step a
    GradScaler skips is not counted) and logs at logging steps, per adjacent pair L-M, the
    cumulative terms over steps :math:`0..t-1` of :class:`~torch_momentum.balance.BalanceLedger`:
    ``ledger/{term}/{L}-{M}`` for term in ``momentum, weight_decay, symmetry, discretisation,
    other``, and ``ledger/closure/{L}-{M}`` :math:`= (D(t) - D(0))` minus their sum (round-off),
    with :math:`D = \|W_L\|^2 - \|W_M\|^2` at the iterate (for look-ahead optimisers not the
    parameters). For heavy-ball optimisers also ``balance/corrected_diff/{L}-{M}``
    :math:`= Q_t = D_t + \tfrac{2\eta\mu}{1-\mu} K_t`, which heavy ball keeps up to
    discretisation. With ``neurons=True`` too, ``unit_ledger`` holds the per-unit ledger (on
    every rank with FSDP2/DTensor: its sums over shards are one collective at logging steps).

    Layers (see :func:`~torch_momentum.callbacks.discover_layers`, whose default grouping is
    every submodule that directly owns trainable parameters): a layer named explicitly (list or
    dict) whose parameters get no gradient (frozen, or unused) contributes a gradient norm of 0.
    Parameters are looked up by name on every logging step, so wrappers that re-register
    parameters (FSDP2) are followed.

    On a step that a GradScaler skips (inf/NaN gradients) the logged gradient norms are inf/NaN,
    as read. The norms are those of the parameters as the model holds them; for
    :class:`~torch_momentum.NesterovSGD` in training mode that is the look-ahead point.

    Distributed: under DDP the parameters and (all-reduced) gradients are replicated and rank
    zero alone computes. With sharded parameters (FSDP2 ``fully_shard`` under
    ``ModelParallelStrategy``, DTensor) every rank computes the squared norms of its shards and
    one ``all_reduce`` per logging step sums them; every rank joins it. FSDP1
    (``FSDPStrategy``) and DeepSpeed flatten parameters and are not supported.

    Args:
        layers: ``None`` (the default mode: the model's symmetries), a list of module names
            (their order defines adjacency), or a dict ``{layer_name: [parameter names]}``.
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses the Trainer's
            ``log_every_n_steps``.
        track_grad_norm: also log ``grad_norm/{L}`` and ``grad_norm/total``.
        save_figure: at the end of training, rank zero saves ``balance.png`` (see
            :func:`~torch_momentum.callbacks.plot_balance`), with ``ledger=True`` also
            ``ledger.png`` (:func:`~torch_momentum.callbacks.plot_ledger`) and with
            ``neurons=True`` ``unit_drift.png``
            (:func:`~torch_momentum.callbacks.plot_unit_drift`), in the first logger's
            directory, or, without a logger or when the logger has no directory, in
            ``trainer.default_root_dir`` (with a warning naming the paths), and logs the
            figures (tags ``balance``, ``ledger``, ``unit_drift``) to loggers that take figures.
            Default ``True``.
        neurons: also log the per-unit balance keys above. Default ``False``.
        ledger: also accumulate and log the balance ledger. Default ``False``.
        per_layer: default mode: also log per weight matrix and per symmetry. Default ``False``.
        loss_fn: default mode: ``loss_fn(module, batch) -> scalar``, the loss whose symmetries
            are looked for (default: the module's ``training_step``; required under manual
            optimisation, where ``training_step`` steps the optimiser).

    Raises:
        TypeError: an argument of the wrong type (``loss_fn`` not callable).
        ValueError: an empty ``layers``, ``log_every_n_steps < 1``; at the start of ``fit``,
            layers that overlap or, with ``neurons=True``, a model whose units cannot be paired.

    Example:

        >>> from torch_momentum.callbacks import LayerBalanceMonitor
        >>> monitor = LayerBalanceMonitor(log_every_n_steps=10, neurons=True, ledger=True)
        >>> monitor.state_key
        "LayerBalanceMonitor{'layers': None}"
    """

    def __init__(
        self,
        layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        log_every_n_steps: int | None = None,
        track_grad_norm: bool = True,
        save_figure: bool = True,
        neurons: bool = False,
        ledger: bool = False,
        *,
        per_layer: bool = False,
        loss_fn: LossFn | None = None,
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
        for arg, value in (
            ("track_grad_norm", track_grad_norm),
            ("save_figure", save_figure),
            ("neurons", neurons),
            ("ledger", ledger),
            ("per_layer", per_layer),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{arg}` must be a bool, got {value!r}")
        self.log_every_n_steps = log_every_n_steps
        self.track_grad_norm = track_grad_norm
        self.save_figure = save_figure
        self.neurons = neurons
        self.ledger = ledger
        self.per_layer = per_layer
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable or None, got {loss_fn!r}")
        self.loss_fn = loss_fn
        # the default mode (no `layers=`): the model's symmetries, found at the first batch;
        # the layer mode (`layers=` given): per-layer norms and adjacent pairs
        self._mode: NetworkMode | LayerMode = (
            NetworkMode(per_layer, neurons, ledger, loss_fn, track_grad_norm)
            if self.layers is None
            else LayerMode(self.layers, neurons, ledger, track_grad_norm)
        )
        self._first_step = 0

        #: one dict per logging step on rank zero: ``{"step": t, key: value, ...}``
        self.history: list[dict[str, float]] = []
        #: where ``balance.png`` was written (rank zero), once training ended
        self.figure_path: str | None = None
        #: every figure written: ``{"balance": path, "ledger": path, "unit_drift": path}``
        self.figure_paths: dict[str, str] = {}
        self._restored = False  # a checkpoint's state was loaded since the last fit started
        self._refused: str | None = None  # why a loaded state cannot continue a series
        self._last_step = -1
        self._started = True
        self._new_series = True
        self._angle_step: int | None = None
        self._pending: dict[str, float] | None = None  # metrics waiting for their angle

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        # The cadence is not part of the key: a resume with another log_every_n_steps continues
        # the same series.
        return self._generate_state_key(
            layers=self.layers if not isinstance(self.layers, Mapping) else dict(self.layers)
        )

    @property
    def details(self) -> list[dict[str, Any]]:
        """Default mode: per logging step, each weight matrix's relative change of its squared
        norm, each symmetry's largest change of a unit's charge, and (``ledger=True``) each
        symmetry's ledger summed over units; for :func:`plot_network` (not logged)."""
        return list(self._mode.details)

    @property
    def symmetries(self) -> list[Symmetry]:
        """The model's symmetries the default mode tracks (known after the first batch)."""
        return list(self._mode.symmetries or [])

    @property
    def layer_names(self) -> list[str]:
        """The monitored layers, in adjacency order (known once training started; the layer
        mode)."""
        return self._mode.names

    @property
    def balance_ledger(self) -> BalanceLedger | None:
        """The :class:`~torch_momentum.balance.BalanceLedger` the monitor keeps: of the layer
        pairs (and units, ``neurons=True``) in the layer mode, of every charge in the default
        mode (``ledger=True``); ``None`` before training starts, without one, and on the ranks
        of the default mode other than zero. Read it, e.g. ``read_charges()``; the monitor
        attaches and detaches it."""
        return self._mode.balance_ledger

    @property
    def sharded(self) -> bool:
        """Whether the monitored parameters are sharded (DTensor: FSDP2, tensor parallelism)."""
        return self._mode.sharded

    @property
    def unit_drift(self) -> dict[str, Tensor]:
        """Per hidden layer (per rescale symmetry in the default mode), :math:`D_i(t) - D_i(0)`
        per unit at the last logging step (``neurons=True``; CPU tensors)."""
        return self._mode.unit_drift

    @property
    def unit_ledger(self) -> dict[str, dict[str, Tensor]]:
        """Per hidden layer (per rescale symmetry in the default mode), the per-unit ledger at
        the last logging step (``neurons=True`` and ``ledger=True``)."""
        return self._mode.unit_ledger

    @override
    def state_dict(self) -> dict[str, Any]:
        """The version, the mode, the history (rank zero's; other ranks hold an empty list) and
        the mode's origin: in the layer mode ``W(0)``'s squared norms, the initial adjacent
        differences, the layer names, the per-unit ``D_i(0)`` and the ledger's cumulative sums;
        in the default mode the symmetries, their charges at the origin and the ledger."""
        return {
            "version": _STATE_VERSION,
            "mode": self._mode.name,
            "history": [dict(row) for row in self.history],
            **self._mode.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``W(0)``, the history and the ledger; applied when training starts. A state
        of the other mode or of an unknown version starts a new series instead (with a warning
        when training starts)."""
        self._restored = True
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self._refused = _refusal(state_dict, self._mode.name)
        if self._refused is None:
            self._mode.load_state_dict(state_dict)

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Find this monitor's state under an older key (one that held the cadence) and warn
        when the checkpoint only holds monitors of other layers."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        name = type(self).__qualname__
        legacy = self.state_key[:-1] + ", 'log_every_n_steps': "
        for key, state in states.items():
            if isinstance(key, str) and key.startswith(legacy):
                self.load_state_dict(state)
                return
        others = [k for k in states if isinstance(k, str) and k.startswith(name)]
        if others:
            rank_zero_warn(
                f"`LayerBalanceMonitor(layers={self.layers!r})`: the checkpoint holds"
                f" LayerBalanceMonitor state only for other layer sets ({others}); this monitor"
                " starts a new series (W(0) from the weights at the resumed step).",
                category=RuntimeWarning,
            )

    def reset(self) -> None:
        """Forget ``W(0)``, the history and the ledger: the next training run starts a new
        series."""
        self.history = []
        self._restored = False
        self._refused = None
        self._last_step = -1
        self.figure_path = None
        self.figure_paths = {}
        self._mode.reset()

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------

    @override
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
                " metrics are kept only in `monitor.history` (and the figure is saved in"
                " `trainer.default_root_dir`). Pass a logger, e.g."
                " `Trainer(logger=CSVLogger('logs'))`, to log them.",
                category=RuntimeWarning,
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = logging_step(trainer)
        restored, self._restored = self._restored, False
        if self._refused is not None:
            rank_zero_warn(
                f"`LayerBalanceMonitor`: the checkpoint's state {self._refused}; this monitor"
                f" starts a new series at step {step} (W(0) from the weights now) and drops the"
                " checkpoint's history.",
                category=RuntimeWarning,
            )
            self._refused = None
        origin = self._mode.start(trainer, pl_module, step)
        if origin == "new" and (restored or step == 0):
            # a new series: rows of the checkpoint's (or a previous fit's) series would mix two
            # origins in one history
            self.history = []
        self._begin(origin, step)

    def _begin(self, origin: str, step: int) -> None:
        # the step counter is final at the first batch (a mid-epoch checkpoint's counter is
        # incremented after this hook): the series' bookkeeping waits for it
        self._started = False
        self._new_series = origin == "new"
        self._first_step = step
        self._last_step = step - 1

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._started:
            return
        self._started = True
        self._mode.first_batch(trainer, pl_module, batch)
        step = logging_step(trainer)
        # a new series logs its first step; a resumed or continued one keeps the cadence
        self._first_step = step if self._new_series else -1
        self._last_step = step - 1
        # a resumed run continues the series after the checkpoint's step
        self.history = [row for row in self.history if row.get("step", -1) < step]

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = logging_step(trainer)
        if step == self._last_step:  # several optimizers step on one batch: log once
            return
        every = self.log_every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]
        on_cadence = every != 0 and (step + 1) % every == 0
        if not (
            on_cadence
            or trainer.should_stop
            or step == self._first_step
            or is_last_step(trainer, step)
        ):
            return
        self._last_step = step
        scale = loss_scale(trainer, optimizer)
        metrics = self._metrics(trainer, pl_module, step, with_grads=True, scale=scale)
        if self._mode.before_step():  # logged with the angle of this step's update, after it
            self._angle_step, self._pending = step, metrics
        else:
            self._emit(trainer, step, metrics)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._flush(trainer)

    def _flush(self, trainer: Trainer) -> None:
        """Log the pending metrics of the last logging step with the angle of its update (one
        row per step in every logger)."""
        step, self._angle_step = self._angle_step, None
        metrics, self._pending = self._pending, None
        if step is None:
            return
        extra = self._mode.after_step()  # the angle of the step just taken
        if metrics is not None:
            metrics.update(extra)
            self.history[-1].update(extra)
        self._emit(trainer, step, metrics)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)  # a step whose batch end never came (an exception, a skip)
        step = logging_step(trainer)
        if self._last_step < step - 1:
            # the last update was not foreseen (early stopping, max_time): record the weights
            # after it, at the next step's index (every rank joins the collectives)
            self._last_step = step
            self._emit(trainer, step, self._metrics(trainer, pl_module, step, with_grads=False))
        self._mode.close()
        if not self.save_figure:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank calls it
        if not trainer.is_global_zero or not self.history:
            return
        try:
            figures = self._mode.figures(self.history)
        except ImportError as err:
            rank_zero_warn(
                f"`LayerBalanceMonitor(save_figure=True)` needs matplotlib ({err}); install"
                " `torch-momentum[lightning]` or pass `save_figure=False`.",
                category=RuntimeWarning,
            )
            return
        directory = log_dir if trainer.loggers and log_dir is not None else None
        if directory is None:
            directory = trainer.default_root_dir
            reason = "has no logger" if not trainer.loggers else "has a logger without log_dir"
        self.figure_paths = save_figures(figures, directory)
        self.figure_path = self.figure_paths["balance"]
        if directory != log_dir or not trainer.loggers:
            rank_zero_warn(
                f"`LayerBalanceMonitor`: the Trainer {reason}; the figures were saved to"
                f" {', '.join(self.figure_paths.values())} (trainer.default_root_dir).",
                category=RuntimeWarning,
            )
        step = int(self.history[-1]["step"])
        for logger in trainer.loggers:
            for name, figure in figures.items():
                log_figure(logger, figure, step, name)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._mode.close()

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------

    def _metrics(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        step: int,
        with_grads: bool,
        scale: float = 1.0,
    ) -> dict[str, float] | None:
        """The metrics of ``step``, appended to the history (None on ranks other than zero);
        ``scale``: the loss scale still in the gradients (divided out of gradient norms and
        per-unit symmetries)."""
        metrics = self._mode.metrics(trainer, pl_module, step, with_grads, scale)
        if metrics is not None:
            self.history.append({"step": step, **metrics})
        return metrics

    @staticmethod
    def _emit(trainer: Trainer, step: int, metrics: dict[str, float] | None) -> None:
        if metrics is None:  # a rank other than zero
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _refusal(state: Mapping[str, Any], mode: str) -> str | None:
    """Why ``state`` cannot continue a series of ``mode`` (``"default"`` or ``"layer"``), or
    ``None``. A state without ``"mode"`` (versions 1 and 2) is of the mode its fields show."""
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version > _STATE_VERSION:
        return f"has version {version!r}, which this monitor (version {_STATE_VERSION}) cannot read"
    saved = state.get("mode") or ("default" if "network" in state else "layer")
    if saved != mode:
        why = (
            " (before version 3 of the state, `layers=None` meant the layer mode with discovered"
            " layers)"
            if saved == "layer" and version < 3
            else ""
        )
        return f"was saved by the {saved} mode{why} and this monitor runs the {mode} mode"
    return None
