"""The layer mode of LayerBalanceMonitor (``layers=`` given): per-layer norms, adjacent pairs,
hidden units and their ledger.

Private module of :mod:`torch_momentum.callbacks.monitor` (Lightning glue only: the arithmetic is
plain torch in :mod:`torch_momentum.balance`).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from torch_momentum.balance import (
    BalanceLedger,
    balance_metrics,
    discover_layers,
    layer_sq_norms_host,
    pair_units,
    unit_balance,
    unit_symmetry,
)
from torch_momentum.balance._dtensor import is_dtensor
from torch_momentum.balance.symmetry import Symmetry
from torch_momentum.balance.watch import pair_ledger_metrics, unit_metrics


class LayerMode:
    """The state and metrics of the layer mode (the monitor's hooks call it;
    :class:`~torch_momentum.callbacks._network.NetworkMode` has the same interface)."""

    #: the mode a checkpoint's state records
    name = "layer"

    def __init__(self, layers: Any, neurons: bool, ledger: bool, track_grad_norm: bool) -> None:
        self.layers, self.neurons, self.ledger = layers, neurons, ledger
        self.track_grad_norm = track_grad_norm
        #: per hidden layer, :math:`D_i(t) - D_i(0)` at the last logging step (``neurons=True``)
        self.unit_drift: dict[str, Tensor] = {}
        #: per hidden layer, the per-unit ledger at the last logging step (both flags)
        self.unit_ledger: dict[str, dict[str, Tensor]] = {}
        self.restored: dict[str, Any] | None = None
        self._units: list[Any] = []
        self._unit_d0: dict[str, Tensor] | None = None
        self._ledger: BalanceLedger | None = None
        self._names: list[str] = []
        self._refs: list[list[tuple[nn.Module, str]]] = []
        self.sharded = False
        self._sq0: list[float] | None = None

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def symmetries(self) -> list[Symmetry] | None:
        """None: the layer mode watches chosen layers, not the model's symmetries."""
        return None

    @property
    def details(self) -> list[dict[str, Any]]:
        """Empty: the per-group details are the default mode's."""
        return []

    @property
    def balance_ledger(self) -> BalanceLedger | None:
        """The ledger of the layer pairs (and units), once training started."""
        return self._ledger

    def start(self, trainer: Trainer, pl_module: LightningModule, step: int) -> str:
        """At ``on_train_start``: ``"restored"``, ``"continued"`` or ``"new"`` (see
        :meth:`_restore`)."""
        previous = self._names, self._ledger_state()
        self._resolve(pl_module)
        restored, self.restored = self.restored, None
        self._build_ledger(trainer, pl_module)
        origin = self._restore(restored, step, previous[0])
        if self._ledger is not None:
            state = {"restored": (restored or {}).get("ledger"), "continued": previous[1]}
            self._start_ledger(state.get(origin), step)
        return origin

    def state_dict(self) -> dict[str, Any]:
        """``W(0)``'s squared norms, the initial adjacent differences, the layer names, the
        per-unit ``D_i(0)`` and the ledger's cumulative sums."""
        sq0 = None if self._sq0 is None else list(self._sq0)
        state: dict[str, Any] = {
            "layer_names": list(self._names),
            "sq_norms0": sq0,
            "sq_norm_diffs0": None if sq0 is None else [a - b for a, b in itertools.pairwise(sq0)],
            "unit_d0": None
            if self._unit_d0 is None
            else {k: v.tolist() for k, v in self._unit_d0.items()},
            "ledger": None,
        }
        if self._ledger is not None and self.ledger and self._ledger.D0 is not None:
            state["ledger"] = self._ledger.state_dict()  # a collective when sharded
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's state (:meth:`state_dict`'s) for :meth:`start`."""
        self.restored = dict(state)

    def reset(self) -> None:
        self._sq0 = None
        self._unit_d0 = None
        self.restored = None
        self.unit_drift = {}
        self.unit_ledger = {}

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.detach()

    def first_batch(self, trainer: Trainer, module: LightningModule, batch: Any) -> None:
        """Nothing to discover: the layers are known at :meth:`start`."""

    def before_step(self) -> bool:
        """No angle is measured across the update in the layer mode."""
        return False

    def after_step(self) -> dict[str, float]:
        return {}

    def figures(self, history: list[dict[str, float]]) -> dict[str, Any]:
        """The four balance panels and, when tracked, the ledger and the per-unit drift."""
        from torch_momentum.callbacks.plotting import plot_balance, plot_ledger, plot_unit_drift

        figures = {"balance": plot_balance(history)}
        if self.ledger and any(k.startswith("ledger/") for k in history[-1]):
            figures["ledger"] = plot_ledger(history)
        if self.neurons and self.unit_drift:
            figures["unit_drift"] = plot_unit_drift(self.unit_drift)
        return figures

    def metrics(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        step: int,
        with_grads: bool,
        scale: float,
    ) -> dict[str, float] | None:
        """The metrics now on rank zero (None elsewhere); every rank calls it when sharded."""
        if not self.sharded and not trainer.is_global_zero:
            return None  # replicated: rank zero alone computes and logs
        if not self._refs:
            self._resolve(pl_module)
        params = self._params()
        if self._sq0 is None:  # used without on_train_start (e.g. called directly)
            self._sq0 = layer_sq_norms_host([params], reduce=self.sharded)[0]
        if self.track_grad_norm and with_grads:
            grads = [[p.grad for p in layer] for layer in params]
            sq, grad_sq = layer_sq_norms_host([params, grads], reduce=self.sharded)
            if scale != 1.0:
                grad_sq = [g / (scale * scale) for g in grad_sq]
        else:
            (sq,), grad_sq = layer_sq_norms_host([params], reduce=self.sharded), None
        extra: dict[str, float] = {}
        unit_d: dict[str, Tensor] | None = None
        if self._ledger is not None and self.ledger:
            extra.update(self._ledger_metrics())  # every rank joins (sharded)
            # the ledger just read the per-unit D_i(t) of the iterate: not computed a second time
            unit_d = {name: entry["D"] for name, entry in self.unit_ledger.items()}
        if self._units:
            extra.update(self._unit_metrics(with_grads, scale, unit_d or self._unit_values()))
        if not trainer.is_global_zero:
            return None
        metrics = balance_metrics(sq, self._sq0, grad_sq, self._names)
        metrics.update(extra)
        return metrics

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
        elif step != 0 and self._sq0 is not None and names == self._names:
            origin = "continued"
        if origin == "new":
            # every rank joins (the sum over shards is a collective)
            self._sq0 = layer_sq_norms_host([self._params()], reduce=self.sharded)[0]
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

    def _ledger_metrics(self) -> dict[str, float]:
        assert self._ledger is not None
        metrics = pair_ledger_metrics(self._ledger)
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
        self, with_grads: bool, scale: float, values: dict[str, Tensor]
    ) -> dict[str, float]:
        """The per-unit drift of ``values`` (:math:`D_i(t)` per hidden layer) and, with the
        gradients, the per-unit symmetry :math:`R_i`."""
        assert self._unit_d0 is not None
        symmetry = unit_symmetry(self._module, self._units) if with_grads else {}
        metrics, self.unit_drift = unit_metrics(values, self._unit_d0, symmetry, scale)
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
        ledger.active = self.sharded or trainer.is_global_zero
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
        self.sharded = any(is_dtensor(p) for params in found.values() for _, p in params)

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
