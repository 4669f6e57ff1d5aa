r"""A fixed, small set of balance metrics for a real network, whatever its depth.

A ResNet, a ViT or a GPT has hundreds of parameter tensors; logging every layer and every pair
gives hundreds of columns, most of them meaningless (no conservation law connects a convolution
and the BatchNorm after it). :class:`BalanceSummary` reports instead what the model's symmetries
(:func:`~torch_momentum.balance.find_symmetries`) make meaningful, summarised per kind:

=================================  ==========================================================
``grad_norm/total``                :math:`\|\nabla\ell\|` over all trainable parameters
``balance/sq_norm/total``          :math:`\sum_G \|W_G\|^2` over the weight matrices
``balance/sq_norm_change/max``     :math:`\max_G |\|W_G(t)\|^2 - \|W_G(0)\|^2|`
``balance/drift``                  :math:`\max` over rescale symmetries of
                                   :math:`|\sum_u Q_u(t) - Q_u(0)|` (the layer-balance drift
                                   of Du, Hu & Lee where a rescale symmetry makes it a law)
``charge/{kind}/max``              :math:`\max` over the kind's symmetries and units of
                                   :math:`|Q_u(t) - Q_u(0)|`
``charge/{kind}/median``           the median over the kind's symmetries of their largest
                                   :math:`|Q_u(t) - Q_u(0)|`
``charge/{kind}/worst``            the index of the symmetry with the largest change in
                                   :attr:`BalanceSummary.names` ``[kind]``
=================================  ==========================================================

with ``kind`` each of ``scale``, ``rescale``, ``translation`` the model has. Under gradient flow
every charge is conserved; the logged changes measure how far an optimiser departs from the flow.
``per_layer=True`` adds one key per weight matrix (``balance/sq_norm/{G}``,
``balance/sq_norm_change/{G}``, ``grad_norm/{G}``) and per symmetry (``charge/{S}``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_momentum.balance._parts import PartSums
from torch_momentum.balance.groups import OTHER_GROUP, clean_names, weight_groups
from torch_momentum.balance.norms import layer_sq_norms_host
from torch_momentum.balance.symmetry import KINDS, Symmetry

__all__ = ["BalanceSummary"]


class BalanceSummary:
    """The summary metrics of a network's balance: weight groups and symmetry charges.

    Args:
        module: the model.
        symmetries: its symmetries (from :func:`~torch_momentum.balance.find_symmetries`;
            ``zero_gradient`` entries are ignored here).
        per_layer: also give one key per weight matrix and per symmetry.
        groups: ``{group: [(parameter name, parameter)]}``; default
            :func:`~torch_momentum.balance.groups.weight_groups`.

    Example:

        >>> import torch
        >>> from torch import nn
        >>> from torch_momentum.balance.summary import BalanceSummary
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> summary = BalanceSummary(net)
        >>> summary.start(dict(net.named_parameters()))
        >>> sorted(summary.metrics(dict(net.named_parameters())))
        ['balance/sq_norm/total', 'balance/sq_norm_change/max']
    """

    def __init__(
        self,
        module: nn.Module,
        symmetries: Sequence[Symmetry] = (),
        *,
        per_layer: bool = False,
        groups: Mapping[str, Sequence[tuple[str, Tensor]]] | None = None,
    ) -> None:
        found = weight_groups(module) if groups is None else groups
        self.groups = {name: [n for n, _ in params] for name, params in found.items()}
        self.symmetries = [s for s in symmetries if s.kind in KINDS]
        self.kinds = [k for k in KINDS if any(s.kind == k for s in self.symmetries)]
        clean = clean_names((s.name for s in self.symmetries), module=module)
        self.labels = [clean[s.name] for s in self.symmetries]
        #: per kind, the symmetries' names (``charge/{kind}/worst`` indexes this list)
        self.names = {
            k: [lab for lab, s in zip(self.labels, self.symmetries, strict=True) if s.kind == k]
            for k in self.kinds
        }
        self.per_layer = per_layer
        self._sums = PartSums(
            [(s.units, not s.quadratic, s.parts) for s in self.symmetries], lambda p: p.param
        )
        #: after :meth:`charges` (and :meth:`metrics`): every symmetry's charge at that point
        self.last_values: list[Tensor] = []
        self.sq0: list[float] | None = None
        self.q0: list[Tensor] | None = None
        self._q0_flat: Tensor | None = None
        #: after :meth:`metrics`: each group's relative change of its squared norm
        self.last_groups: dict[str, float] = {}
        #: after :meth:`metrics`: each symmetry's largest :math:`|Q_u(t) - Q_u(0)|`
        self.last_charges: dict[str, float] = {}
        #: after :meth:`metrics`: :math:`Q(t) - Q(0)` per symmetry (CPU)
        self.last_deltas: list[Tensor] = []

    @property
    def matrices(self) -> list[str]:
        """The weight-matrix groups (every group but ``other``)."""
        return [g for g in self.groups if g != OTHER_GROUP]

    def _tensors(self, named: Mapping[str, Tensor], grads: bool = False) -> list[list[Any]]:
        if grads:
            return [[named[n].grad for n in names] for names in self.groups.values()]
        return [[named[n] for n in names] for names in self.groups.values()]

    def charges(self, named: Mapping[str, Tensor]) -> list[Tensor]:
        """Every symmetry's charge at the point ``named`` (float64, on the parameters' device):
        :meth:`Symmetry.charge` of each, computed for all of them at once (one stacked
        reduction per group of equally shaped tensors)."""
        with torch.no_grad():
            values = self._sums(lambda name: _lookup(named, name))
        self.last_values = values
        return values

    def start(self, named: Mapping[str, Tensor]) -> None:
        """Record the origin: the groups' squared norms and the charges at ``named``."""
        self.sq0 = layer_sq_norms_host([self._tensors(named)])[0]
        self.q0 = [q.cpu() for q in self.charges(named)]
        self._q0_flat = None

    def metrics(
        self,
        named: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None = None,
        grad_scale: float = 1.0,
    ) -> dict[str, float]:
        """The summary at the point ``named`` (e.g. the iterate). With ``params`` (the
        parameters holding ``.grad``), gradient norms too, divided by ``grad_scale``.

        Raises:
            RuntimeError: :meth:`start` was not called.
        """
        if self.sq0 is None or self.q0 is None:
            raise RuntimeError("BalanceSummary.metrics() before start(): no origin recorded")
        groups = [self._tensors(named)]
        if params is not None:
            groups.append(self._tensors(params, grads=True))
        norms = layer_sq_norms_host(groups)
        out = self._group_metrics(norms[0], None if params is None else norms[1], grad_scale)
        out.update(self._charge_metrics(self.charges(named)))
        return out

    def _group_metrics(
        self, sq: list[float], grad_sq: list[float] | None, grad_scale: float
    ) -> dict[str, float]:
        assert self.sq0 is not None
        names = list(self.groups)
        matrix = [k for k, g in enumerate(names) if g != OTHER_GROUP]
        change = [sq[k] - self.sq0[k] for k in range(len(names))]
        self.last_groups = {
            names[k]: change[k] / self.sq0[k] if self.sq0[k] > 0 else 0.0 for k in range(len(names))
        }
        out: dict[str, float] = {}
        if grad_sq is not None:
            out["grad_norm/total"] = math.sqrt(sum(grad_sq)) / grad_scale
        if matrix:
            out["balance/sq_norm/total"] = sum(sq[k] for k in matrix)
            out["balance/sq_norm_change/max"] = max(abs(change[k]) for k in matrix)
        if self.per_layer:
            for k, name in enumerate(names):
                out[f"balance/sq_norm/{name}"] = sq[k]
                out[f"balance/sq_norm_change/{name}"] = change[k]
                if grad_sq is not None:
                    out[f"grad_norm/{name}"] = math.sqrt(grad_sq[k]) / grad_scale
        return out

    def changes(self, charges: Sequence[Tensor]) -> list[Tensor]:
        """``Q(t) - Q(0)`` per symmetry, on the host (one transfer)."""
        return list(self._flat_changes(charges).split([q.numel() for q in charges]))

    def _flat_changes(self, charges: Sequence[Tensor]) -> Tensor:
        """``Q(t) - Q(0)`` of all symmetries, concatenated, on the host (one transfer)."""
        assert self.q0 is not None
        if not charges:
            return torch.zeros(0, dtype=torch.float64)
        flat = torch.cat([q.reshape(-1) for q in charges]).cpu()
        if self._q0_flat is None or self._q0_flat.numel() != flat.numel():
            self._q0_flat = torch.cat([q.reshape(-1) for q in self.q0]).to(flat.dtype)
        return flat - self._q0_flat

    def _charge_metrics(self, charges: Sequence[Tensor]) -> dict[str, float]:
        flat = self._flat_changes(charges)
        sizes = [q.numel() for q in charges]
        self.last_deltas = list(flat.split(sizes))
        n = len(charges)
        segment = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes, dtype=torch.long))
        zeros = torch.zeros(n, dtype=torch.float64)
        largest = zeros.scatter_reduce(0, segment, flat.abs(), "amax").tolist()
        totals = zeros.index_add(0, segment, flat).tolist()
        self.last_charges = dict(zip(self.labels, largest, strict=True))
        out: dict[str, float] = {}
        drifts = [
            abs(total)
            for total, s in zip(totals, self.symmetries, strict=True)
            if s.kind == "rescale"
        ]
        if drifts:
            out["balance/drift"] = max(drifts)
        for kind in self.kinds:
            values = [m for m, s in zip(largest, self.symmetries, strict=True) if s.kind == kind]
            worst = max(range(len(values)), key=values.__getitem__)
            out[f"charge/{kind}/max"] = values[worst]
            out[f"charge/{kind}/median"] = statistics.median(values)
            out[f"charge/{kind}/worst"] = float(worst)
        if self.per_layer:
            for label, m in zip(self.labels, largest, strict=True):
                out[f"charge/{label}"] = m
        return out

    def state_dict(self) -> dict[str, Any]:
        """The origin (``sq0``, ``q0``)."""
        return {
            "groups": list(self.groups),
            "symmetries": list(self.labels),
            "sq0": self.sq0,
            "q0": None if self.q0 is None else [q.tolist() for q in self.q0],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved origin.

        Raises:
            ValueError: it was saved for other groups or symmetries.
        """
        if list(state["groups"]) != list(self.groups) or list(state["symmetries"]) != self.labels:
            raise ValueError(
                f"balance summary state for groups {state['groups']} / symmetries"
                f" {state['symmetries']} does not match {list(self.groups)} / {self.labels}"
            )
        self.sq0 = None if state["sq0"] is None else [float(v) for v in state["sq0"]]
        q0 = state["q0"]
        self.q0 = None if q0 is None else [torch.tensor(v, dtype=torch.float64) for v in q0]
        self._q0_flat = None


def _lookup(named: Mapping[str, Tensor], name: str) -> Tensor:
    try:
        return named[name]
    except KeyError:
        raise ValueError(
            f"named has no parameter {name!r}, which a monitored symmetry touches"
        ) from None
