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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from torch_momentum.balance import (
    LEDGER_TERMS,
    BalanceLedger,
    balance_metrics,
    check_layers_spec,
    discover_layers,
    layer_sq_norms_host,
    pair_units,
    unit_balance,
    unit_symmetry,
)
from torch_momentum.balance._dtensor import is_dtensor
from torch_momentum.callbacks._trainer import is_last_step, logging_step, loss_scale
from torch_momentum.callbacks.plotting import (
    log_figure,
    plot_balance,
    plot_ledger,
    plot_unit_drift,
    save_figures,
)

__all__ = ["LayerBalanceMonitor"]

_STATE_VERSION = 2


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

    Raises:
        TypeError: an argument of the wrong type.
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
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{arg}` must be a bool, got {value!r}")
        self.log_every_n_steps = log_every_n_steps
        self.track_grad_norm = track_grad_norm
        self.save_figure = save_figure
        self.neurons = neurons
        self.ledger = ledger
        #: per hidden layer, :math:`D_i(t) - D_i(0)` at the last logging step (``neurons=True``)
        self.unit_drift: dict[str, Tensor] = {}
        #: per hidden layer, the per-unit ledger at the last logging step (both flags)
        self.unit_ledger: dict[str, dict[str, Tensor]] = {}
        self._units: list[Any] = []
        self._unit_d0: dict[str, Tensor] | None = None
        self._ledger: BalanceLedger | None = None
        self._first_step = 0

        #: one dict per logging step on rank zero: ``{"step": t, key: value, ...}``
        self.history: list[dict[str, float]] = []
        #: where ``balance.png`` was written (rank zero), once training ended
        self.figure_path: str | None = None
        #: every figure written: ``{"balance": path, "ledger": path, "unit_drift": path}``
        self.figure_paths: dict[str, str] = {}
        self._names: list[str] = []
        self._refs: list[list[tuple[nn.Module, str]]] = []
        self._sharded = False
        self._sq0: list[float] | None = None
        self._restored: dict[str, Any] | None = None
        self._last_step = -1
        self._started = True
        self._new_series = True

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
    def layer_names(self) -> list[str]:
        """The monitored layers, in adjacency order (known once training started)."""
        return list(self._names)

    @override
    def state_dict(self) -> dict[str, Any]:
        """``W(0)``'s squared norms, the initial adjacent differences, the layer names, the
        history (rank zero's; other ranks hold an empty list), the per-unit ``D_i(0)`` and the
        ledger's cumulative sums."""
        sq0 = None if self._sq0 is None else list(self._sq0)
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "layer_names": list(self._names),
            "sq_norms0": sq0,
            "sq_norm_diffs0": None if sq0 is None else [a - b for a, b in itertools.pairwise(sq0)],
            "history": [dict(row) for row in self.history],
            "unit_d0": None
            if self._unit_d0 is None
            else {k: v.tolist() for k, v in self._unit_d0.items()},
            "ledger": None,
        }
        if self._ledger is not None and self.ledger and self._ledger.D0 is not None:
            state["ledger"] = self._ledger.state_dict()  # a collective when sharded
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``W(0)``, the history and the ledger; applied when training starts."""
        self._restored = dict(state_dict)
        self.history = [dict(row) for row in state_dict.get("history", [])]

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
        self._sq0 = None
        self._unit_d0 = None
        self._restored = None
        self._last_step = -1
        self.figure_path = None
        self.figure_paths = {}
        self.unit_drift = {}
        self.unit_ledger = {}

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
        previous = self._names, self._ledger_state()
        self._resolve(pl_module)
        step = logging_step(trainer)
        restored, self._restored = self._restored, None
        self._build_ledger(trainer, pl_module)
        origin = self._restore(restored, step, previous[0])
        if self._ledger is not None:
            state = {"restored": (restored or {}).get("ledger"), "continued": previous[1]}
            self._start_ledger(state.get(origin), step)
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
        step = logging_step(trainer)
        # a new series logs its first step; a resumed or continued one keeps the cadence
        self._first_step = step if self._new_series else -1
        self._last_step = step - 1
        # a resumed run continues the series after the checkpoint's step
        self.history = [row for row in self.history if row.get("step", -1) < step]

    def _ledger_state(self) -> dict[str, Any] | None:
        """The state of the ledger of a previous ``fit`` (a second fit continues its series)."""
        if self._ledger is None or self._ledger.D0 is None or not self.ledger:
            return None
        return self._ledger.state_dict()

    def _restore(self, restored: dict[str, Any] | None, step: int, names: list[str]) -> str:
        """Set ``W(0)`` and the per-unit ``D_i(0)``. ``"restored"``: from the checkpoint's state
        saved for these layers; ``"continued"``: a later ``fit`` of the same model keeps the
        series of the previous one (one origin for every series); ``"new"``: from the weights now
        (a collective when sharded)."""
        origin = "new"
        if restored is not None and restored.get("sq_norms0") is not None:
            if list(restored.get("layer_names", [])) == self._names:
                self._sq0 = [float(v) for v in restored["sq_norms0"]]
                origin = "restored"
            else:
                rank_zero_warn(
                    "`LayerBalanceMonitor`: the checkpoint's layers"
                    f" {restored.get('layer_names')} differ from the model's {self._names};"
                    f" W(0) is recorded afresh from the weights at step {step}.",
                    category=RuntimeWarning,
                )
                self.history = []
        elif step != 0 and self._sq0 is not None and names == self._names:
            origin = "continued"
        if origin == "new":
            # every rank joins (the sum over shards is a collective)
            self._sq0 = layer_sq_norms_host([self._params()], reduce=self._sharded)[0]
        if origin == "restored":
            saved = (restored or {}).get("unit_d0") or {}
            self._unit_d0 = None
            if self._units and set(saved) == {u.name for u in self._units}:
                self._unit_d0 = {k: torch.tensor(v, dtype=torch.float64) for k, v in saved.items()}
        elif (
            origin == "new"
            or not self._units
            or set(self._unit_d0 or {}) != {u.name for u in self._units}
        ):
            self._unit_d0 = None
        if self._units and self._unit_d0 is None:
            self._unit_d0 = {k: v.cpu() for k, v in self._unit_values().items()}
        return origin

    def _start_ledger(self, state: dict[str, Any] | None, step: int) -> None:
        """Continue the ledger from a checkpoint's ``state`` (or start it), then attach it."""
        assert self._ledger is not None
        if state is not None:
            try:
                self._ledger.load_state_dict(state)
            except ValueError as err:
                rank_zero_warn(
                    f"`LayerBalanceMonitor`: {err}; the ledger starts afresh at step {step}.",
                    category=RuntimeWarning,
                )
                state = None
        if state is None:
            self._ledger.start()
        if self.ledger:
            self._ledger.attach()

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
        self._log(trainer, pl_module, step, with_grads=True, scale=loss_scale(trainer, optimizer))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = logging_step(trainer)
        if self._refs and self._last_step < step - 1:
            # the last update was not foreseen (early stopping, max_time): record the weights
            # after it, at the next step's index (every rank joins the collectives)
            self._last_step = step
            self._log(trainer, pl_module, step, with_grads=False)
        if self._ledger is not None:
            self._ledger.detach()
        if not self.save_figure:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank calls it
        if not trainer.is_global_zero or not self.history:
            return
        try:
            figures = self._figures()
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

    def _figures(self) -> dict[str, Any]:
        """The figures saved at the end of training: the balance, and the ledger and per-unit
        drift when they were tracked."""

        figures = {"balance": plot_balance(self.history)}
        if self.ledger and any(k.startswith("ledger/") for k in self.history[-1]):
            figures["ledger"] = plot_ledger(self.history)
        if self.neurons and self.unit_drift:
            figures["unit_drift"] = plot_unit_drift(self.unit_drift)
        return figures

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._ledger is not None:
            self._ledger.detach()

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------

    def _log(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        step: int,
        with_grads: bool,
        scale: float = 1.0,
    ) -> None:
        """Compute and log the metrics of ``step``; ``scale``: the loss scale still in the
        gradients (divided out of gradient norms and per-unit symmetries)."""
        if not self._sharded and not trainer.is_global_zero:
            return  # replicated: rank zero alone computes and logs
        if not self._refs:
            self._resolve(pl_module)
        params = self._params()
        if self._sq0 is None:  # used without on_train_start (e.g. called directly)
            self._sq0 = layer_sq_norms_host([params], reduce=self._sharded)[0]
        if self.track_grad_norm and with_grads:
            grads = [[p.grad for p in layer] for layer in params]
            sq, grad_sq = layer_sq_norms_host([params, grads], reduce=self._sharded)
            if scale != 1.0:
                grad_sq = [g / (scale * scale) for g in grad_sq]
        else:
            (sq,), grad_sq = layer_sq_norms_host([params], reduce=self._sharded), None
        extra: dict[str, float] = {}
        if self._ledger is not None and self.ledger:
            extra.update(self._ledger_metrics())  # every rank joins (sharded)
        if self._units:
            extra.update(self._unit_metrics(pl_module, with_grads, scale))
        if not trainer.is_global_zero:
            return
        metrics = balance_metrics(sq, self._sq0, grad_sq, self._names)
        metrics.update(extra)
        self.history.append({"step": step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _ledger_metrics(self) -> dict[str, float]:
        assert self._ledger is not None
        out = self._ledger.read()
        values = torch.cat(
            [out["sums"].reshape(-1), out["closure"]] + ([out["Q"]] if out["Q"] is not None else [])
        ).tolist()
        pairs = out["pairs"]
        n_terms = len(LEDGER_TERMS)
        metrics: dict[str, float] = {}
        for k, pair in enumerate(pairs):
            for j, term in enumerate(LEDGER_TERMS):
                metrics[f"ledger/{term}/{pair}"] = values[k * n_terms + j]
        base = len(pairs) * n_terms
        for k, pair in enumerate(pairs):
            metrics[f"ledger/closure/{pair}"] = values[base + k]
        if out["Q"] is not None:
            for k, pair in enumerate(pairs):
                metrics[f"balance/corrected_diff/{pair}"] = values[base + len(pairs) + k]
        if self._units:
            self.unit_ledger = {
                name: {key: value.cpu() for key, value in entry.items()}
                for name, entry in self._ledger.read_units().items()
            }
        return metrics

    def _unit_values(self) -> dict[str, Tensor]:
        ledger = self._ledger
        assert ledger is not None

        def iterate(name: str, p: Tensor) -> Tensor:
            return ledger.iterate(p) if ledger.tracks(p) else p

        return unit_balance(self._module, self._units, iterate)

    def _unit_metrics(
        self, pl_module: LightningModule, with_grads: bool, scale: float
    ) -> dict[str, float]:
        values = self._unit_values()
        assert self._unit_d0 is not None
        symmetry = unit_symmetry(self._module, self._units) if with_grads else {}
        names = list(values)
        # one host transfer for every layer's D_i and R_i; the statistics over units in Python
        parts = [values[k] for k in names] + [symmetry[k] for k in names if k in symmetry]
        device = parts[0].device
        host = torch.cat([t.to(device) for t in parts]).cpu()
        metrics: dict[str, float] = {}
        self.unit_drift = {}
        offset = 0
        for name in names:
            n = values[name].numel()
            drift = host[offset : offset + n] - self._unit_d0[name]
            offset += n
            self.unit_drift[name] = drift
            magnitudes = [abs(v) for v in drift.tolist()]
            metrics[f"balance/unit_drift_max/{name}"] = max(magnitudes)
            metrics[f"balance/unit_drift_mean/{name}"] = sum(magnitudes) / n
        for name in names:
            if name in symmetry:
                n = symmetry[name].numel()
                r = host[offset : offset + n].tolist()
                offset += n
                metrics[f"balance/unit_symmetry_max/{name}"] = max(abs(v) for v in r) / scale
        return metrics

    def _build_ledger(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._ledger is not None:
            self._ledger.detach()
        self._ledger = None
        self._units = []
        self._module = pl_module
        if self.neurons:
            self._units = pair_units(pl_module, self._unit_spec())
        if not (self.ledger or self.neurons):
            return
        layers = {name: self._layer_params(k) for k, name in enumerate(self._names)}
        ledger = BalanceLedger(
            layers,
            list(trainer.optimizers),
            units=self._units if self.ledger else None,
            module=pl_module,
        )
        ledger.active = self._sharded or trainer.is_global_zero
        self._ledger = ledger

    def _unit_spec(self) -> Any:
        if self.layers is not None:
            return self.layers
        # default layers: the modules that own the monitored parameters
        return [name if name != "root" else "" for name in self._names]

    def _layer_params(self, k: int) -> list[Tensor]:
        return [_param(mod, attr) for mod, attr in self._refs[k]]

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
        self._sharded = any(is_dtensor(p) for params in found.values() for _, p in params)

    def _params(self) -> list[list[Tensor]]:
        return [[_param(mod, attr) for mod, attr in layer] for layer in self._refs]


def _param(module: nn.Module, attr: str) -> Tensor:
    """The parameter registered as ``attr`` now (wrappers such as FSDP2 re-register them)."""
    p = module._parameters[attr]
    assert p is not None
    return p


def _owner(root: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = param_name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), attr
