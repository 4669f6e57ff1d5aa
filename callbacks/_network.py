"""The default mode of LayerBalanceMonitor: the model's symmetries, found at the first batch.

Private module of :mod:`torch_momentum.callbacks.monitor` (Lightning glue only: the arithmetic is
:class:`torch_momentum.balance.watch.NetworkWatch`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from torch_momentum.balance import BalanceLedger, find_symmetries
from torch_momentum.balance._dtensor import is_dtensor
from torch_momentum.balance.groups import OTHER_GROUP, weight_groups
from torch_momentum.balance.symmetry import Symmetry, SymmetryList
from torch_momentum.balance.watch import NetworkWatch

LossFn = Callable[[LightningModule, Any], Tensor]


class NetworkMode:
    """Discovery, the watch, and their state across fits and checkpoints (the monitor's hooks
    call it; :class:`~torch_momentum.callbacks._layers.LayerMode` has the same interface)."""

    #: the mode a checkpoint's state records
    name = "default"

    def __init__(
        self,
        per_layer: bool,
        neurons: bool,
        ledger: bool,
        loss_fn: LossFn | None,
        track_grad_norm: bool = True,
    ) -> None:
        self.per_layer, self.neurons, self.ledger = per_layer, neurons, ledger
        self.loss_fn, self.track_grad_norm = loss_fn, track_grad_norm
        self.watch: NetworkWatch | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the symmetries, the origin and the details: the next fit starts anew."""
        self.close()
        self.watch = None
        self.symmetries: list[Symmetry] | None = None
        self.restored: dict[str, Any] | None = None
        self.sharded = False
        #: per logging step: ``{"step", "groups": {G: change}, "charges": {S: max |dQ|},
        #: "kinds": {S: kind}, "ledger": {S: term sums}}``, kept for the figures (not logged)
        self.details: list[dict[str, Any]] = []

    @property
    def names(self) -> list[str]:
        """Empty: the monitored layers are the layer mode's."""
        return []

    @property
    def balance_ledger(self) -> BalanceLedger | None:
        return None if self.watch is None else self.watch.ledger

    @property
    def unit_drift(self) -> dict[str, Tensor]:
        return {} if self.watch is None else self.watch.unit_drift

    @property
    def unit_ledger(self) -> dict[str, dict[str, Tensor]]:
        return {} if self.watch is None else self.watch.unit_ledger

    # ------------------------------------------------------------------------------------------
    # start
    # ------------------------------------------------------------------------------------------

    def start(self, trainer: Trainer, module: LightningModule, step: int) -> str:
        """At ``on_train_start``: ``"restored"`` (checkpoint), ``"continued"`` (a later fit of
        the same model) or ``"new"`` (discovery waits for the first batch)."""
        previous = None if self.watch is None else self.watch.state_dict()
        if self.watch is not None:
            self.watch.close()
        self.watch = None
        self.sharded = any(is_dtensor(p) for p in module.parameters())
        restored, self.restored = self.restored, None
        if restored is not None and restored.get("symmetries") is not None:
            symmetries = [Symmetry.from_state(s) for s in restored["symmetries"]]
            if self._resume(trainer, module, symmetries, restored.get("watch")):
                return "restored"
            return "new"
        if previous is not None and step != 0 and self.symmetries is not None:
            if self._resume(trainer, module, self.symmetries, previous):
                return "continued"
        self.symmetries = None
        self.details = []
        return "new"

    def _resume(
        self, trainer: Trainer, module: LightningModule, symmetries: list[Symmetry], state: Any
    ) -> bool:
        try:  # the saved symmetries may name parameters this model does not have
            self._build(trainer, module, symmetries)
            assert self.watch is not None
            self.watch.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as err:
            rank_zero_warn(
                f"`LayerBalanceMonitor`: {err}; the series starts afresh.", category=RuntimeWarning
            )
            if self.watch is not None:
                self.watch.close()
            self.watch, self.symmetries = None, None
            return False
        return True

    def _build(self, trainer: Trainer, module: LightningModule, symmetries: list[Symmetry]) -> None:
        self.symmetries = symmetries
        self.watch = NetworkWatch(
            module,
            list(trainer.optimizers),
            symmetries,
            per_layer=self.per_layer,
            ledger=self.ledger,
            neurons=self.neurons,
        )
        if self.watch.ledger is not None:
            self.watch.ledger.active = trainer.is_global_zero

    def first_batch(self, trainer: Trainer, module: LightningModule, batch: Any) -> None:
        """Discover the symmetries on this batch (rank zero; other ranks of a replicated run
        do not compute) and record the origin, unless the series was resumed."""
        if self.watch is not None:
            return
        symmetries: list[Symmetry] = []
        if trainer.is_global_zero and not self.sharded:
            symmetries = self._discover(module, batch)
        self._build(trainer, module, symmetries)
        assert self.watch is not None
        if trainer.is_global_zero or self.sharded:
            self.watch.start()

    def _discover(self, module: LightningModule, batch: Any) -> list[Symmetry]:
        from torch_momentum.callbacks.stationarity import training_step_loss

        loss_fn = self.loss_fn
        if loss_fn is None and not module.automatic_optimization:
            rank_zero_warn(
                "`LayerBalanceMonitor`: under manual optimisation the default loss (the module's"
                " training_step) would step the optimiser; pass `loss_fn=` to find the model's"
                " symmetries. Logging weight and gradient norms only.",
                category=RuntimeWarning,
            )
            return []
        modes = {m: m.training for m in module.modules()}
        try:
            with warnings.catch_warnings(record=True) as caught, torch.random.fork_rng():
                warnings.simplefilter("always")
                loss = cast(Callable[[nn.Module, Any], Tensor], loss_fn or training_step_loss)
                found = find_symmetries(module, loss, [batch], perturbed_batches=1)
        except Exception as err:  # a model discovery cannot run: say so, keep the norms
            rank_zero_warn(
                f"`LayerBalanceMonitor`: finding the model's symmetries failed ({err}); logging"
                " weight and gradient norms only. Pass `layers=[...]` for the layer-balance"
                " metrics of chosen layers.",
                category=RuntimeWarning,
            )
            return []
        finally:
            for m, mode in modes.items():
                m.training = mode
        for w in caught:
            rank_zero_warn(f"`LayerBalanceMonitor`: {w.message}", category=RuntimeWarning)
        self._warn_uncovered(module, found)
        return list(found)

    def _warn_uncovered(self, module: LightningModule, found: SymmetryList) -> None:
        """Say once which weight matrices no layer-balance law covers, and why."""
        covered = {p.param for s in found if s.kind == "rescale" for p in s.parts}
        scaled = {p.param for s in found if s.kind == "scale" for p in s.parts}
        rejected: dict[str, float] = {}
        for s in found.rejected:
            if s.kind == "rescale":
                for p in s.parts:
                    rejected[p.param] = min(rejected.get(p.param, float("inf")), s.residual)
        lines = []
        for group, params in weight_groups(module).items():
            names = [n for n, _ in params]
            if group == OTHER_GROUP or any(n in covered for n in names):
                continue
            if any(n in scaled for n in names):
                reason = "a normalisation layer follows it: its scale symmetry is tracked instead"
            elif any(n in rejected for n in names):
                residual = min(rejected[n] for n in names if n in rejected)
                reason = (
                    "no positively homogeneous path to a next layer (a GELU/tanh, a residual add"
                    f" or a second reader; best candidate's residual {residual:.1e})"
                )
            else:
                reason = "no layer reads its outputs unit by unit (the output layer, or a stream)"
            lines.append(f"{group}: {reason}")
        if lines:
            shown = lines[:12] + ([f"... and {len(lines) - 12} more"] if len(lines) > 12 else [])
            rank_zero_warn(
                "`LayerBalanceMonitor`: the layer-balance law (a rescale symmetry) does not"
                f" apply to {len(lines)} weight matrices, whose pair metrics are not logged:\n  "
                + "\n  ".join(shown),
                category=RuntimeWarning,
            )

    # ------------------------------------------------------------------------------------------
    # logging
    # ------------------------------------------------------------------------------------------

    def metrics(
        self, trainer: Trainer, module: LightningModule, step: int, with_grads: bool, scale: float
    ) -> dict[str, float] | None:
        """The metrics of ``step`` on rank zero (None elsewhere); every rank calls it when
        sharded (the norms are summed over ranks)."""
        watch = self.watch
        if watch is None or not (trainer.is_global_zero or self.sharded):
            return None
        metrics = watch.metrics(with_grads and self.track_grad_norm, scale)
        if not trainer.is_global_zero:
            return None
        summary = watch.summary
        self.details.append(
            {
                "step": step,
                "groups": dict(summary.last_groups),
                "charges": dict(summary.last_charges),
                "kinds": {
                    label: s.kind
                    for label, s in zip(summary.labels, summary.symmetries, strict=True)
                },
                "ledger": dict(watch.last_ledger),
            }
        )
        return metrics

    def before_step(self) -> bool:
        """At a logging step, before the update: whether :meth:`after_step` has an angle."""
        if self.watch is None:
            return False
        self.watch.before_step()
        return True

    def after_step(self) -> dict[str, float]:
        """The angle of the update just taken (after :meth:`before_step`)."""
        return {} if self.watch is None else self.watch.after_step()

    def figures(self, history: list[dict[str, float]]) -> dict[str, Any]:
        """The balance of the network and, with the ledger, the ledger of the charges that
        moved most."""
        from torch_momentum.callbacks.network_plots import plot_network, plot_network_ledger

        figures = {"balance": plot_network((history, self.details))}
        if self.ledger and any(d.get("ledger") for d in self.details):
            figures["ledger"] = plot_network_ledger((history, self.details))
        return figures

    def state_dict(self) -> dict[str, Any]:
        """The symmetries and the watch's origin and ledger, under ``"network"``."""
        if self.watch is None or self.symmetries is None:
            return {"network": None}
        return {
            "network": {
                "symmetries": [s.to_state() for s in self.symmetries],
                "watch": self.watch.state_dict(),
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's state (:meth:`state_dict`'s) for :meth:`start`."""
        self.restored = state.get("network")

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
