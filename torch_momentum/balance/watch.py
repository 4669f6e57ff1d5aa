r"""Watching a real network train: its symmetries' charges, their ledger and angular updates.

:class:`NetworkWatch` is what :class:`~torch_momentum.callbacks.LayerBalanceMonitor` does by
default, in plain torch: given a model, its optimisers and its symmetries (from
:func:`~torch_momentum.balance.find_symmetries`), it records the origin, and at any step reports
the fixed summary of :class:`~torch_momentum.balance.summary.BalanceSummary`, and optionally

* the ledger of every charge (``ledger=True``): the terms summed over the quadratic charges
  (``ledger/{term}``) and the largest relative closure over all charges (``ledger/closure``);
* the angular update of the scale-invariant groups: the angle between :math:`x_t` and
  :math:`x_{t+1}` of the update a logging step takes (``angle/mean``, averaged over the scale
  symmetries; with the ledger, which records every step's, also over the steps since the last
  report), its equilibrium under heavy ball with weight decay,
  :math:`\sqrt{2\eta\lambda/(1+\mu)}` (``angle/prediction``; Wan, Zhu, Zhang & Sun 2021), and
  the effective learning rate :math:`\eta/\|x_A\|^2` (``effective_lr/median``);
* per-unit detail of the rescale symmetries (``neurons=True``): ``balance/unit_drift_max``
  (:math:`\max_u |D_u(t) - D_u(0)|`) and ``balance/unit_symmetry_max``
  (:math:`\max_u |\langle y, g\rangle_{\pm,u}|` at the parameters :math:`y`, where the gradient
  is taken: 0 up to round-off while the symmetry holds, also under Nesterov).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_momentum.balance._iterates import Iterates
from torch_momentum.balance._parts import PartSums
from torch_momentum.balance.groups import clean_names
from torch_momentum.balance.ledger import BalanceLedger
from torch_momentum.balance.rules import LEDGER_TERMS, HeavyBall
from torch_momentum.balance.summary import BalanceSummary
from torch_momentum.balance.symmetry import Symmetry

__all__ = ["NetworkWatch", "pair_ledger_metrics", "unit_metrics"]


class NetworkWatch:
    """The default balance metrics of a network (see the module docstring).

    Args:
        module: the model.
        optimizers: the optimisers that update it.
        symmetries: its symmetries.
        per_layer: per-group and per-symmetry keys too.
        ledger: keep the ledger of every charge (step hooks on the optimisers).
        neurons: per-unit detail of the rescale symmetries.

    Example:

        >>> import torch
        >>> from torch import nn
        >>> from torch_momentum import PolyakSGD
        >>> from torch_momentum.balance import find_symmetries
        >>> from torch_momentum.balance.watch import NetworkWatch
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> opt = PolyakSGD(net.parameters(), lr=0.1)
        >>> watch = NetworkWatch(net, [opt], find_symmetries(net, loss, [(x, y)]), ledger=True)
        >>> watch.start()
        >>> for _ in range(3):
        ...     opt.zero_grad(); loss(net, (x, y)).backward(); _ = opt.step()
        >>> m = watch.metrics()
        >>> m["charge/translation/max"] < 1e-6, m["ledger/closure"] < 1e-5
        (True, True)
        >>> watch.close()
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        symmetries: Sequence[Symmetry],
        *,
        per_layer: bool = False,
        ledger: bool = False,
        neurons: bool = False,
    ) -> None:
        self.module = module
        self._params: dict[str, Tensor] = {
            n: p for n, p in module.named_parameters() if p.requires_grad
        }
        self._warned_unfrozen = False
        self.optimizers = list(optimizers)
        self.symmetries = list(symmetries)
        self.summary = BalanceSummary(module, self.symmetries, per_layer=per_layer)
        self.neurons = neurons
        self.ledger = (
            BalanceLedger(None, self.optimizers, module=module, symmetries=self.symmetries)
            if ledger and self.symmetries
            else None
        )
        # the iterates as the ledger reads them (its look-ahead records, kept by its hooks)
        self._iterates = Iterates(self.optimizers) if self.ledger is None else self.ledger.iterates
        #: per symmetry name, its label (the summary's, padded alike for the other kinds)
        self._labels = clean_names((s.name for s in self.symmetries), module=module)
        self._scale = [s for s in self.symmetries if s.kind == "scale"]
        self._rescale = [s for s in self.symmetries if s.kind == "rescale"]
        named = dict(module.named_parameters(remove_duplicate=False))
        #: the parameters of the scale symmetries by name, found once (the angle of a step
        #: reads only these)
        self._scale_params: dict[str, Tensor] = {}
        for s in self._scale:
            for part in s.parts:
                if part.param not in named:
                    raise ValueError(
                        f"symmetries: {s.name!r} names the parameter {part.param!r}, which the"
                        " module does not have"
                    )
                self._scale_params[part.param] = named[part.param]
        #: per scale symmetry, its first parameter (whose optimiser gives the equilibrium)
        self._scale_first = [self._scale_params[s.parts[0].param] for s in self._scale]
        self._snapshot: dict[str, Tensor] | None = None
        self._scale_sums = PartSums(
            [(s.units, False, s.parts) for s in self._scale], lambda p: p.param
        )
        #: after :meth:`metrics` with the ledger: per symmetry, the change of its charge summed
        #: over units (``"change"``) and each term summed over units
        self.last_ledger: dict[str, dict[str, float]] = {}
        #: ``neurons=True``: per rescale symmetry, :math:`D_u(t) - D_u(0)` per unit (CPU)
        self.unit_drift: dict[str, Tensor] = {}
        #: ``neurons=True`` and the ledger: per rescale symmetry, its per-unit ledger
        self.unit_ledger: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------------------------------
    # points
    # ------------------------------------------------------------------------------------------

    def params(self) -> dict[str, Tensor]:
        """The parameters trainable when the watch was built, by name (the ones its groups and
        symmetries cover; frozen since, they stay, without gradients)."""
        return self._params

    def iterate(self) -> dict[str, Tensor]:
        """The iterate :math:`x_t` of every trainable parameter (the parameters themselves unless
        an optimiser keeps a look-ahead point; ``torch.optim.SGD(nesterov=True)``'s coefficient
        as recorded after each step since :meth:`start`)."""
        return {name: self._iterates.iterate(p) for name, p in self.params().items()}

    def start(self) -> None:
        """Record the origin and attach the step hooks (the ledger's, or the look-ahead
        records')."""
        self.summary.start(self.iterate())
        self._attach(restored=False)

    def _attach(self, restored: bool) -> None:
        if self.ledger is None:
            self._iterates.attach()
            return
        if not restored:
            self.ledger.start()
        self.ledger.attach()

    def close(self) -> None:
        """Remove the step hooks."""
        if self.ledger is not None:
            self.ledger.detach()
        self._iterates.detach()

    # ------------------------------------------------------------------------------------------
    # metrics
    # ------------------------------------------------------------------------------------------

    def metrics(self, with_grads: bool = True, grad_scale: float = 1.0) -> dict[str, float]:
        """The metrics now (gradient norms and per-unit symmetries from ``.grad`` when
        ``with_grads``, divided by ``grad_scale``)."""
        self._check_unfrozen()
        point = self.iterate()
        params = self.params() if with_grads else None
        out = self.summary.metrics(point, params, grad_scale)
        if self._scale:
            out.update(self._angle_metrics())
        if self.ledger is not None:
            out.update(self._ledger_metrics())
        if self.neurons and self._rescale:
            out.update(self._unit_metrics(params, grad_scale))
        return out

    def _check_unfrozen(self) -> None:
        """Warn once if parameters became trainable after the watch was built (e.g. Lightning's
        ``BaseFinetuning``): its groups, symmetries and gradient norms do not cover them."""
        if self._warned_unfrozen:
            return
        new = [n for n, p in self.module.named_parameters() if p.requires_grad]
        new = [n for n in new if n not in self._params]
        if new:
            self._warned_unfrozen = True
            shown = ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            warnings.warn(
                f"{len(new)} parameter(s) became trainable after the balance watch was built"
                f" ({shown}): its groups, symmetries and gradient norms cover only the"
                f" {len(self._params)} trainable then; start a new watch (a new monitor) to"
                " include them",
                RuntimeWarning,
                stacklevel=3,
            )

    def _ledger_metrics(self) -> dict[str, float]:
        assert self.ledger is not None
        charges = self.ledger.read_charges()
        rows = list(charges.values())
        n_terms = len(LEDGER_TERMS)
        if not rows:
            return {f"ledger/{t}": 0.0 for t in LEDGER_TERMS} | {"ledger/closure": 0.0}
        # every symmetry's change, term sums and relative closure from one host transfer
        sizes = torch.tensor([row["D"].numel() for row in rows], dtype=torch.long)
        d, d0 = torch.cat([row["D"] for row in rows]), torch.cat([row["D0"] for row in rows])
        sums = torch.cat([row["sums"] for row in rows])
        closure = torch.cat([row["closure"] for row in rows])
        scale = torch.cat([row["scale"] for row in rows])  # the charges' magnitudes
        flat = torch.cat([(d - d0)[:, None], sums, scale[:, None]], 1).cpu()
        closure = closure.abs().cpu()
        segment = torch.repeat_interleave(torch.arange(len(rows)), sizes)
        zeros = torch.zeros(len(rows), dtype=torch.float64)
        totals = zeros[:, None].repeat(1, 1 + n_terms).index_add(0, segment, flat[:, : 1 + n_terms])
        scale = zeros.scatter_reduce(0, segment, flat[:, 1 + n_terms], "amax")
        worst = zeros.scatter_reduce(0, segment, closure, "amax")
        relative = (worst / scale.clamp_min(1e-300)).tolist()
        table = totals.tolist()
        labels = self._labels
        self.last_ledger = {
            labels[name]: {"change": total[0], **dict(zip(LEDGER_TERMS, total[1:], strict=True))}
            for name, total in zip(charges, table, strict=True)
        }
        terms = [0.0] * n_terms
        for row, total in zip(rows, table, strict=True):
            if row["kind"] in ("scale", "rescale"):
                terms = [a + b for a, b in zip(terms, total[1:], strict=True)]
        if self.neurons:
            self.unit_ledger = {
                labels[name]: {k: v.cpu() for k, v in row.items() if k != "kind"}
                for name, row in charges.items()
                if row["kind"] == "rescale"
            }
        out = {f"ledger/{t}": v for t, v in zip(LEDGER_TERMS, terms, strict=True)}
        out["ledger/closure"] = max(relative)
        return out

    def before_step(self) -> None:
        """Snapshot the scale-invariant groups before an optimiser step (for the angle of that
        step when there is no ledger to give every step's)."""
        if self._scale and self.ledger is None:
            point = self._scale_iterate()
            copies = torch._foreach_add(list(point.values()), 0)  # one pass
            self._snapshot = dict(zip(point, copies, strict=True))

    def after_step(self) -> dict[str, float]:
        """After the step :meth:`before_step` prepared: ``{"angle/mean": ...}`` of that step
        (with the ledger: the mean over the steps since the last call, this one included)."""
        if self._snapshot is None:
            return self._ledger_angle() if self.ledger is not None and self._scale else {}
        before, self._snapshot = self._snapshot, None
        now = self._scale_iterate()
        names = list(before)
        # |x_t|^2, |x_{t+1}|^2 and |x_{t+1} - x_t|^2 per part (float64 sums), then <x_t, d> from
        # them: |x_{t+1}|^2 = |x_t|^2 + 2<x_t, d> + |d|^2
        diffs = torch._foreach_sub([now[n] for n in names], [before[n] for n in names])
        step = dict(zip(names, diffs, strict=True))
        stats = [
            torch.stack([q.sum() for q in self._scale_sums(x.__getitem__)])
            for x in (before, now, step)
        ]
        xx, yy, dd = torch.stack(stats).cpu()
        xd = (yy - xx - dd) / 2
        cross = (xx * dd - xd * xd).clamp_min(0.0).sqrt()
        angles = torch.atan2(cross, xx + xd)
        return {"angle/mean": float(angles.mean())}

    def _scale_iterate(self) -> dict[str, Tensor]:
        """The iterate of the scale symmetries' parameters."""
        return {n: self._iterates.iterate(p).detach() for n, p in self._scale_params.items()}

    def _ledger_angle(self) -> dict[str, float]:
        """The ledger's angles of the steps since the last read, averaged (skipped steps out)."""
        assert self.ledger is not None
        per_step = self.ledger.read_angles()
        values = torch.cat([a[~torch.isnan(a)] for a in per_step.values()])
        return {"angle/mean": float(values.mean())} if values.numel() else {}

    def _angle_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        # |x_A|^2 of every scale symmetry: the charges the summary just computed at this point
        charge_of = dict(zip(self.summary.symmetries, self.summary.last_values, strict=True))
        norms = torch.stack([charge_of[s].sum() for s in self._scale]).tolist()
        predictions, lrs = [], []
        for p, norm in zip(self._scale_first, norms, strict=True):
            hyper = self._hyper(p)
            if hyper is None:
                continue
            lr, momentum, decay = hyper
            lrs.append(lr / norm if norm > 0 else math.inf)
            if decay > 0:
                predictions.append(math.sqrt(2 * lr * decay / (1 + momentum)))
        if predictions:
            out["angle/prediction"] = statistics.median(predictions)
        if lrs:
            out["effective_lr/median"] = statistics.median(lrs)
        return out

    def _hyper(self, p: Tensor) -> tuple[float, float, float] | None:
        """``(lr, momentum, weight decay)`` of the heavy-ball group updating ``p`` (None for
        other rules: the equilibrium is a heavy-ball result)."""
        owner = self._iterates.owner(p)
        if owner is None:
            return None
        opt, g = owner
        rule, group = self._iterates.rules[id(opt)], opt.param_groups[g]
        if not (isinstance(rule, HeavyBall) and rule.known(group) and not rule.nesterov(group)):
            return None
        h = rule.hyper(group)
        return h.lr, h.momentum, h.weight_decay

    def _unit_metrics(
        self, params: dict[str, Tensor] | None, grad_scale: float
    ) -> dict[str, float]:
        r"""Per-unit drift, and :math:`\max_u |\langle y, g\rangle_{\pm,u}|` at the parameters
        :math:`y`, where the gradient was taken (the look-ahead point under Nesterov, not the
        iterate): by Euler's identity 0 up to round-off while the rescale symmetry holds."""
        index = [self.summary.symmetries.index(s) for s in self._rescale]
        deltas = self.summary.last_deltas  # of this step's summary
        self.unit_drift = {self.summary.labels[k]: deltas[k] for k in index}
        out = {"balance/unit_drift_max": max(float(deltas[k].abs().max()) for k in index)}
        if params is not None:
            grads = {n: p.grad for n, p in params.items() if p.grad is not None}
            at = {n: params[n].detach() for n in grads}
            sym = [
                s.inner(grads, at)
                for s in self._rescale
                if all(part.param in grads for part in s.parts)
            ]
            if sym:
                out["balance/unit_symmetry_max"] = (
                    max(float(r.abs().max()) for r in sym) / grad_scale
                )
        return out

    def state_dict(self) -> dict[str, Any]:
        """The origin, the ledger's sums and the look-ahead records."""
        ledger = None if self.ledger is None or self.ledger.D0 is None else self.ledger.state_dict()
        return {
            "summary": self.summary.state_dict(),
            "ledger": ledger,
            "lookahead": self._iterates.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a series (see :meth:`state_dict`); call instead of :meth:`start`.

        Raises:
            ValueError: the state was saved for other groups or symmetries.
        """
        self.summary.load_state_dict(state["summary"])
        self._iterates.load_state_dict(state.get("lookahead", []))
        restored = False
        if self.ledger is not None and state.get("ledger") is not None:
            self.ledger.load_state_dict(state["ledger"])
            restored = True
        elif self.ledger is not None:
            warnings.warn(
                "the restored balance state has no ledger: the ledger starts now, while the"
                " charges and norms continue from the series' origin (its terms explain the"
                " change since now only); start a new series to have one origin",
                RuntimeWarning,
                stacklevel=2,
            )
        self._attach(restored)


def pair_ledger_metrics(ledger: BalanceLedger) -> dict[str, float]:
    """The ledger of the layer pairs as logged keys (one host transfer):
    ``ledger/{term}/{L}-{M}``, ``ledger/closure/{L}-{M}`` and, for heavy-ball optimisers,
    ``balance/corrected_diff/{L}-{M}`` (:math:`Q_t`). Every rank calls it when sharded.

    Example:

        >>> import torch
        >>> from torch import nn
        >>> from torch_momentum import PolyakSGD
        >>> from torch_momentum.balance import BalanceLedger
        >>> from torch_momentum.balance.watch import pair_ledger_metrics
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> ledger = BalanceLedger({"a": [net[0].weight], "b": [net[2].weight]},
        ...                        PolyakSGD(net.parameters()))
        >>> sorted(pair_ledger_metrics(ledger))[:2]
        ['balance/corrected_diff/a-b', 'ledger/closure/a-b']
    """
    out = ledger.read()
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
    return metrics


def unit_metrics(
    values: dict[str, Tensor],
    origin: dict[str, Tensor],
    symmetry: dict[str, Tensor],
    grad_scale: float = 1.0,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Per hidden layer ``L``: ``balance/unit_drift_max/{L}`` and ``balance/unit_drift_mean/{L}``
    (over units, :math:`|D_i(t) - D_i(0)|`) and ``balance/unit_symmetry_max/{L}``
    (:math:`\\max_i |R_i|`, divided by ``grad_scale``), and the drifts :math:`D_i(t) - D_i(0)`
    per layer (CPU); ``values``: :math:`D_i(t)`, ``origin``: :math:`D_i(0)`, ``symmetry``:
    :math:`R_i` where known. One host transfer.

    Example:

        >>> import torch
        >>> from torch_momentum.balance.watch import unit_metrics
        >>> d = {"h": torch.tensor([1.0, 3.0], dtype=torch.float64)}
        >>> d0 = {"h": torch.tensor([1.0, 1.0], dtype=torch.float64)}
        >>> unit_metrics(d, d0, {})[0]
        {'balance/unit_drift_max/h': 2.0, 'balance/unit_drift_mean/h': 1.0}
    """
    names = list(values)
    parts = [values[k] for k in names] + [symmetry[k] for k in names if k in symmetry]
    # gathered on the accelerator where any part is there (the ledger's D_i may already be on
    # the host): one transfer to the host, not one per part
    device = next((t.device for t in parts if t.device.type != "cpu"), parts[0].device)
    host = torch.cat([t.to(device) for t in parts]).cpu()
    metrics: dict[str, float] = {}
    drift_of: dict[str, Tensor] = {}
    offset = 0
    for name in names:
        n = values[name].numel()
        drift = host[offset : offset + n] - origin[name]
        offset += n
        drift_of[name] = drift
        magnitudes = [abs(v) for v in drift.tolist()]
        metrics[f"balance/unit_drift_max/{name}"] = max(magnitudes)
        metrics[f"balance/unit_drift_mean/{name}"] = sum(magnitudes) / n
    for name in names:
        if name in symmetry:
            n = symmetry[name].numel()
            r = host[offset : offset + n].tolist()
            offset += n
            metrics[f"balance/unit_symmetry_max/{name}"] = max(abs(v) for v in r) / grad_scale
    return metrics, drift_of
