r"""The balance ledger: where the balance of adjacent layers (and of hidden units) goes, exactly.

:class:`BalanceLedger` reads every optimiser step from step hooks and accumulates, per adjacent
pair of layers (and per hidden unit), the terms of the exact identity
:math:`D_{t+1} - D_t = 2\langle x_t, \Delta x\rangle_\pm + \|\Delta x\|^2_\pm` as split by the
optimiser's rule (:mod:`torch_momentum.balance.rules`), so that :math:`D(t) - D(0)` equals the sum
of the terms up to round-off: a ledger that closes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from torch_momentum.balance import _dtensor
from torch_momentum.balance._dtensor import is_dtensor, local, shard_range, sharded_along
from torch_momentum.balance._gram import (
    Row,
    StepMatrix,
    acc_dtype,
    as_vector,
    step_matrix,
    sums_of_squares,
)
from torch_momentum.balance.layers import adjacent_pairs
from torch_momentum.balance.rules import (
    GRAM_ENTRIES,
    LEDGER_TERMS,
    Maps,
    Rule,
    rule_for,
)
from torch_momentum.balance.units import UnitLayer, unit_sq

__all__ = ["BalanceLedger"]

_GENERIC = Rule()


class _Plan(NamedTuple):
    """One param group of an optimiser that updates tracked tensors."""

    group_index: int  # the group's index in ``opt.param_groups``
    group: dict[str, Any]
    tracked: list[int]  # the tracked tensors it updates


class _Pending(NamedTuple):
    """What the ledger saw of a param group before a step."""

    plan: _Plan
    copies: list[Tensor] | None  # x_t of each tracked tensor (the generic split), else None
    c0: float  # the look-ahead coefficient in force before the step


class _UnitPart(NamedTuple):
    """A tensor's share in the units of one hidden layer."""

    tracked: int
    kind: str  # "rows" (incoming weight), "entries" (incoming bias), "cols" (outgoing weight)
    sign: float


class BalanceLedger:
    r"""The balance ledger: where :math:`D = \|W_L\|^2 - \|W_M\|^2` of adjacent layers goes.

    For any update :math:`x_{t+1} = x_t + \Delta x`, exactly,
    :math:`D_{t+1} - D_t = 2\langle x_t, \Delta x\rangle_\pm + \|\Delta x\|^2_\pm` with
    :math:`\langle a, b\rangle_\pm = \langle a_L, b_L\rangle - \langle a_M, b_M\rangle`. For
    heavy ball (``PolyakSGD``; ``torch.optim.SGD`` with :math:`v = -`\ ``momentum_buffer``;
    :math:`d_t = g_t + \lambda x_t`, :math:`v_{t+1} = \mu v_t - d_t`,
    :math:`x_{t+1} = x_t + \eta v_{t+1}`) the first-order part splits into

    .. math::
        2\eta\mu K_t - 2\eta\lambda D_t - 2\eta R_t, \qquad
        K_t = \langle x_t, v_t\rangle_\pm,\ R_t = \langle x_t, g_t\rangle_\pm,

    (momentum, weight decay, symmetry) and the discretisation term is
    :math:`\|\Delta x\|^2_\pm = \eta^2\|v_{t+1}\|^2_\pm`. For Nesterov (``NesterovSGD``,
    ``SGD(nesterov=True)``) :math:`D` is taken at the iterate :math:`x = y - c\,v` (``y`` the
    parameters, ``c`` the look-ahead coefficient the parameters were built with), the gradient at
    ``y``: momentum :math:`2\eta\mu K_t + 2\eta c\langle v_t, g_t\rangle_\pm`, weight decay
    :math:`-2\eta\lambda(D_t + cK_t)`, symmetry :math:`-2\eta\langle y_t, g_t\rangle_\pm` (for the
    built-in under a changing :math:`\eta\mu` its implied iterate also moves by
    :math:`(c_t - \eta\mu)v_t`, counted as momentum). Any other optimiser gets the generic split:
    symmetry :math:`-2\eta R_t` (the gradient's share, :math:`\eta` the group's ``lr``), the rest
    of the first-order part in ``other``. For the SGD family ``other`` is round-off. Every
    update that is applied is read, from optimiser step hooks: for the known rules the
    pre-step iterate and velocity are recovered exactly from the parameters, velocity and
    gradient after the step (no copies); any other optimiser gets a copy of the parameters
    before the step. Clipping, AMP unscaling and gradient accumulation are thus seen as applied,
    and a step skipped by a GradScaler is not counted.

    The terms are accumulated on the device without host synchronisation: per tensor, the
    entries of the Gram matrix of the parameters, velocity and gradient that the terms need (at
    most six dot products; four for heavy ball), mapped to the sums by one cached matrix. With
    sharded (DTensor) parameters every rank accumulates its shards and :meth:`read` sums them
    with one ``all_reduce`` (every rank must call it); per-unit sums likewise, each rank adding
    the units of its row shard (the next layer's weight must not be sharded along its columns).

    Args:
        layers: ``{layer name: [parameters]}`` in adjacency order (e.g. from
            :func:`discover_layers`, values as tensors).
        optimizers: the optimiser (or optimisers) that update them.
        units: optional :class:`UnitLayer` list (from :func:`pair_units`) for per-unit terms.
        module: the model; required with ``units`` (to find the unit parameters by name).

    Example:

        >>> import torch
        >>> from torch import nn
        >>> from torch_momentum import PolyakSGD
        >>> from torch_momentum.balance import BalanceLedger
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(),
        ...                     nn.Linear(4, 2, bias=False)).double()
        >>> opt = PolyakSGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> ledger = BalanceLedger({"a": [net[0].weight], "b": [net[2].weight]}, opt)
        >>> ledger.attach()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     ((net(x) - y) ** 2).mean().backward()
        ...     _ = opt.step()
        >>> out = ledger.read()
        >>> drift = out["D"] - out["D0"]
        >>> bool(abs(drift - out["sums"].sum(1)).max() < 1e-12 * (1 + abs(out["D0"]).max()))
        True
        >>> ledger.detach()
    """

    #: sums of squares as one multi-tensor reduction (True) or dot products (False); None: by
    #: device (multi-tensor except on the CPU). Both give the same values up to rounding.
    _split_squares: bool | None = None

    def __init__(
        self,
        layers: Mapping[str, Sequence[Tensor]],
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        units: Sequence[UnitLayer] | None = None,
        module: nn.Module | None = None,
    ) -> None:
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self.names = list(layers)
        if len(self.names) < 2:
            raise ValueError(f"the ledger needs at least two layers, got {self.names}")
        self.pairs = [f"{a}-{b}" for a, b in adjacent_pairs(self.names)]
        self.optimizers = list(optimizers)
        self.units = list(units or [])
        if self.units and module is None:
            raise ValueError("`units` needs `module` to find the unit parameters by name")
        self._tracked: list[Tensor] = []
        self._index: dict[int, int] = {}
        layer_of = [
            (self._track(p), layer) for layer, params in enumerate(layers.values()) for p in params
        ]
        self._unit_parts = self._track_units(module)
        self._sharded = any(is_dtensor(p) for p in self._tracked)
        self.device = local(self._tracked[0]).device
        self._multi_device = any(local(p).device != self.device for p in self._tracked)
        self._unit_set = {part.tracked for parts in self._unit_parts for part in parts}
        self._sign = self._pair_signs(layer_of).to(self.device)
        self._weights = [_dtensor.weight(p) for p in self._tracked]
        self._allocate_sums()
        self.D0: Tensor | None = None
        self.unit_D0: list[Tensor] | None = None
        self.steps = 0  # optimiser steps accumulated by this process (since start/restore)
        #: whether this process accumulates (replicated data parallel: rank zero only)
        self.active = True
        self._sgd_c: dict[tuple[int, int], float] = {}  # the rules' memory (look-ahead records)
        self._pending: dict[int, list[_Pending]] = {}
        self._maps: dict[tuple[Any, ...], Maps] = {}
        self._matrices: dict[Any, StepMatrix] = {}
        self._handles: list[Any] = []
        self._static: dict[int, list[_Pending]] = {}
        self._views: dict[tuple[int, int], tuple[int, int, Tensor]] = {}
        self._owner: dict[int, tuple[torch.optim.Optimizer, _Plan]] = {}
        self._plans: dict[int, list[_Plan]] = {}
        self._rule_of: dict[int, Rule] = {id(opt): rule_for(opt) for opt in self.optimizers}
        self._locate()

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------

    def _track(self, p: Tensor) -> int:
        if id(p) not in self._index:
            self._index[id(p)] = len(self._tracked)
            self._tracked.append(p)
        return self._index[id(p)]

    def _track_units(self, module: nn.Module | None) -> list[list[_UnitPart]]:
        out: list[list[_UnitPart]] = []
        if not self.units:
            return out
        assert module is not None  # checked in __init__
        named = dict(module.named_parameters(remove_duplicate=False))
        for unit in self.units:
            parts = [_UnitPart(self._track(named[unit.weight]), "rows", 1.0)]
            if unit.bias is not None:
                parts.append(_UnitPart(self._track(named[unit.bias]), "entries", 1.0))
            parts.append(_UnitPart(self._track(named[unit.next_weight]), "cols", -1.0))
            out.append(parts)
        return out

    def _pair_signs(self, layer_of: list[tuple[int, int]]) -> Tensor:
        """``sign[pair, tensor]``: +1 for layer L, -1 for layer M of pair L-M."""
        n_pairs = len(self.pairs)
        sign = torch.zeros(n_pairs, len(self._tracked), dtype=torch.float64)
        for t, layer in layer_of:
            if layer < n_pairs:
                sign[layer, t] += 1.0
            if layer > 0:
                sign[layer - 1, t] -= 1.0
        return sign

    def _allocate_sums(self) -> None:
        n_terms = len(LEDGER_TERMS)
        self._local_sums = torch.zeros(len(self.pairs), n_terms, dtype=torch.float64).to(
            self.device
        )
        self._offset = torch.zeros_like(self._local_sums)
        self._unit_sums = [
            torch.zeros(u.units, n_terms, dtype=torch.float64).to(self.device) for u in self.units
        ]
        self._unit_offset = [torch.zeros_like(t) for t in self._unit_sums]
        # per unit part: (first unit, number of units) of this rank's shard (all units unless
        # the unit axis itself is sharded)
        self._unit_slices = {
            (u, part.tracked): self._unit_slice(unit, part)
            for u, (unit, parts) in enumerate(zip(self.units, self._unit_parts, strict=True))
            for part in parts
        }

    def _unit_slice(self, unit: UnitLayer, part: _UnitPart) -> tuple[int, int]:
        """``(first unit, number of units)`` of this rank's shard of a unit part. The column
        axis of the next layer's weight must not be sharded (a unit's columns would span ranks at
        unknown offsets).

        Raises:
            ValueError: the next layer's weight sharded along its columns.
        """
        p: Any = self._tracked[part.tracked]
        if part.kind == "cols":
            if sharded_along(p, 1):
                raise ValueError(
                    f"per-unit ledger terms need the next layer's weight {unit.next_weight!r}"
                    f" (shape {tuple(p.shape)}) unsharded along its columns; got placements"
                    f" {p.placements}"
                )
            return 0, unit.units
        return shard_range(p, 0, unit.units)

    def _locate(self) -> None:
        ids = {id(p): i for i, p in enumerate(self._tracked)}
        self._owner = {}
        self._plans = {}
        for opt in self.optimizers:
            plans = []
            for g, group in enumerate(opt.param_groups):
                idx = [ids[id(p)] for p in group["params"] if id(p) in ids]
                plan = _Plan(g, group, idx)
                for i in idx:
                    self._owner[i] = (opt, plan)
                if idx:
                    plans.append(plan)
            self._plans[id(opt)] = plans

    def _iterate(self, i: int, *, local: bool = True) -> Tensor:
        """The iterate of tracked tensor ``i`` (a view of the parameter when it is the iterate)."""
        p = self._tracked[i]
        owner = self._owner.get(i)
        if owner is None:
            x = p.detach()
        else:
            opt, plan = owner
            x = self._rule_of[id(opt)].iterate(opt, plan.group_index, p, self._sgd_c)
        return _dtensor.local(x) if local else x

    def tracks(self, p: Tensor) -> bool:
        """Whether the ledger tracks the tensor ``p`` (a layer's or a unit's parameter)."""
        return id(p) in self._index

    def iterate(self, p: Tensor) -> Tensor:
        """The iterate :math:`x_t` of a tracked parameter as the ledger reads it (for look-ahead
        optimisers not the parameter itself; a view when it is the parameter).

        Raises:
            ValueError: ``p`` is not tracked by this ledger.
        """
        i = self._index.get(id(p))
        if i is None:
            raise ValueError(
                f"iterate: the tensor of shape {tuple(p.shape)} is not tracked by this ledger"
            )
        return self._iterate(i, local=False)

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register step pre/post hooks on the optimisers (idempotent); records :math:`D(0)`
        first (:meth:`start`) unless a series was started or restored."""
        if self._handles:
            return
        if self.D0 is None:
            self.start()
        for opt in self.optimizers:
            if not self._rule_of[id(opt)].pre_step:
                # heavy ball needs nothing from before the step: the post-step state determines
                # the pre-step iterate and velocity
                self._static[id(opt)] = [
                    _Pending(plan, None, 0.0) for plan in self._plans.get(id(opt), [])
                ]
            else:
                self._handles.append(opt.register_step_pre_hook(self._before))
            self._handles.append(opt.register_step_post_hook(self._after))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = {}
        self._static = {}
        self._views = {}

    @torch.no_grad()
    def _before(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        # Known rules need only the look-ahead coefficient in force now (the pre-step iterate and
        # velocity are recovered exactly from the state after the step); other optimisers get a
        # copy of the parameters.
        if not self.active:
            return
        rule = self._rule_of[id(opt)]
        pending = []
        for plan in self._plans.get(id(opt), []):
            if rule.known(plan.group):
                pending.append(
                    _Pending(plan, None, rule.lookahead(opt, plan.group_index, self._sgd_c))
                )
            else:
                copies = [local(self._tracked[i].detach()).clone() for i in plan.tracked]
                pending.append(_Pending(plan, copies, 0.0))
        self._pending[id(opt)] = pending

    def _maps_of(self, rule: Rule, opt: torch.optim.Optimizer, entry: _Pending) -> Maps:
        """The (cached) maps of this step of one param group."""
        if entry.copies is not None:
            rule = _GENERIC
        key, build = rule.maps(opt, entry.plan.group_index, entry.plan.group, entry.c0, self._sgd_c)
        maps = self._maps.get(key)
        if maps is None:
            if len(self._maps) > 256:  # a scheduler changes lr every step
                self._maps.clear()
            maps = self._maps[key] = build()
        return maps

    @torch.no_grad()
    def _after(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        # One pass collects, per updated tensor, its post-step rows (first, second, gradient):
        # (p, v_{t+1}, g_t) for a known rule (v_{t+1} absent for plain gradient descent; the
        # built-in's momentum_buffer read as is, its sign folded into the map), (x_t, p, g_t) for
        # the generic split. The terms are linear in the rows' Gram entries; only the entries
        # with a non-zero coefficient are computed (one dot product each), and one cached matrix
        # maps them to the per-pair sums (one matrix-vector product).
        pending = self._pending.pop(id(opt), None)
        if pending is None:
            pending = self._static.get(id(opt))
        if not self.active or pending is None:
            return
        rows = self._collect(opt, pending)
        if not rows:
            return
        self.steps += 1
        self._accumulate_pairs(rows)
        unit_rows = {
            row.tracked: self._unit_row(row) for row in rows if row.tracked in self._unit_set
        }
        if unit_rows:
            self._accumulate_units(unit_rows)

    def _collect(self, opt: torch.optim.Optimizer, pending: list[_Pending]) -> list[Row]:
        rule = self._rule_of[id(opt)]
        vkey = rule.velocity_key
        state = opt.state
        tracked, sharded = self._tracked, self._sharded
        rows: list[Row] = []
        for entry in pending:
            maps = self._maps_of(rule, opt, entry)
            for k, i in enumerate(entry.plan.tracked):
                p = tracked[i]
                grad = p.grad
                if grad is None:
                    continue  # not updated by this step
                if entry.copies is not None:
                    parts: tuple[Tensor, Tensor | None, Tensor] = (entry.copies[k], p, grad)
                    plain = False
                else:
                    st = state.get(p)
                    v = st.get(vkey) if st and vkey is not None else None
                    parts, plain = (p, v, grad), v is None
                if sharded:
                    first, second, g = parts
                    parts = (local(first), None if second is None else local(second), local(g))
                rows.append(Row(i, parts, maps, plain))
        return rows

    def _accumulate_pairs(self, rows: list[Row]) -> None:
        key = tuple((row.tracked, row.maps.key, row.plain) for row in rows)
        cached = self._matrices.get(key)
        if cached is None:
            if len(self._matrices) > 64:  # a scheduler changes lr every step
                self._matrices.clear()
            cached = self._matrices[key] = step_matrix(
                rows, self._sign, self._weights, self.device, self._split_squares_here()
            )
        dots = []
        dot = torch.dot
        for row, (needed, pairs) in zip(rows, cached.entries, strict=True):
            vecs = self._vectors(row, needed)
            for a, b in pairs:
                dots.append(dot(vecs[a], vecs[b]))
        for k, positions in enumerate(cached.squares):
            if positions:
                squares = [cast(Tensor, rows[pos].parts[k]) for pos in positions]
                dots.extend(sums_of_squares(squares))
        if dots:
            if self._multi_device:
                dots = [d.to(self.device) for d in dots]
            # stack, then cast into the float64 buffer: stack(out=) across dtypes is ~4x slower
            flat = cached.buffer.copy_(torch.stack(dots))
            self._local_sums.view(-1).addmv_(cached.matrix, flat)

    def _vectors(self, row: Row, needed: frozenset[int]) -> dict[int, Tensor]:
        """The row's tensors as flat vectors of the accumulation dtype, for the rows ``needed``."""
        i, parts = row.tracked, row.parts
        acc = acc_dtype(parts[0])
        views = self._views
        vecs: dict[int, Tensor] = {}
        for k in needed:
            t = cast(Tensor, parts[k])  # needed rows are present
            if k == 2 or (k == 0 and not isinstance(t, nn.Parameter)):
                vecs[k] = as_vector(t, acc)
                continue
            # parameters and velocities persist across steps: reuse their flat views while
            # they still view the same memory (a copy, e.g. a dtype conversion, never does)
            hit = views.get((i, k))
            if hit is None or hit[0] != t.data_ptr() or hit[1] != t.numel():
                vec = as_vector(t, acc)
                n = vec.numel() // (2 if t.is_complex() else 1)
                views[(i, k)] = hit = (vec.data_ptr(), n, vec)
            vecs[k] = hit[2]
        return vecs

    def _unit_row(self, row: Row) -> tuple[Tensor, list[list[float]], list[list[float]]]:
        """The stacked rows of one tensor for the per-unit Gram matrices (velocity in the slide
        sign), the map of those rows and the term coefficients."""
        first, second, grad = row.parts
        if row.maps.negate_velocity and second is not None:
            second = torch.neg(second)  # the built-in's buffer is -v
        acc = acc_dtype(first)
        present = [
            t.detach().to(acc) if not t.is_complex() else t.detach()
            for t in (first, second, grad)
            if t is not None
        ]
        m = torch.stack(present)
        if m.is_complex():
            # real and imaginary parts as a trailing axis: a unit's entries stay together
            m = torch.view_as_real(m).to(acc)
        cmap = row.maps.plain if row.plain else row.maps.with_velocity
        return m, cmap, row.maps.terms

    def _split_squares_here(self) -> bool:
        # On an accelerator the squares of all tensors take one multi-tensor reduction per row;
        # on the CPU that reduction loops over the tensors and costs more than a dot product each
        return self.device.type != "cpu" if self._split_squares is None else self._split_squares

    def _accumulate_units(
        self, unit_rows: dict[int, tuple[Tensor, list[list[float]], list[list[float]]]]
    ) -> None:
        for u, (unit, parts) in enumerate(zip(self.units, self._unit_parts, strict=True)):
            for part in parts:
                if part.tracked not in unit_rows:
                    continue
                m, cmap, terms = unit_rows[part.tracked]
                first, count = self._unit_slices[(u, part.tracked)]
                r = m.shape[0]
                if part.kind == "cols":
                    n = unit.units
                    per_unit = m.reshape(r, m.shape[1], n, -1).permute(2, 0, 1, 3).reshape(n, r, -1)
                else:  # rows and bias entries: the unit axis leads
                    per_unit = m.reshape(r, count, -1).transpose(0, 1)
                gram = (per_unit @ per_unit.transpose(1, 2)).to(torch.float64)
                if r == 2:  # no velocity: put a zero row in its place
                    gram = torch.nn.functional.pad(gram, (0, 1, 0, 1))[:, [0, 2, 1]][
                        :, :, [0, 2, 1]
                    ]
                c = torch.tensor(cmap, dtype=torch.float64).to(gram.device)
                gram4 = c @ gram @ c.T
                q = gram4.reshape(count, 16)[:, list(GRAM_ENTRIES)]
                coef = torch.tensor(terms, dtype=torch.float64).to(q.device)
                value = (part.sign * self._weights[part.tracked]) * (q @ coef.T)
                self._unit_sums[u][first : first + count] += value.to(self.device)

    def _unit_sums_now(self) -> list[Tensor]:
        """The per-unit sums over all ranks (one all_reduce when sharded: every rank calls it)."""
        sums = self._unit_sums
        if self._sharded and sums:
            flat = _dtensor.all_reduce_sum(torch.cat([t.reshape(-1) for t in sums]))
            sums = [t.reshape(-1, len(LEDGER_TERMS)) for t in flat.split([t.numel() for t in sums])]
        return [off + t for off, t in zip(self._unit_offset, sums, strict=True)]

    # ------------------------------------------------------------------------------------------
    # reading, state
    # ------------------------------------------------------------------------------------------

    def _pair_values(self, corrected: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(D, Q or None, reduced sums)`` per pair; one all_reduce when sharded."""
        n = len(self._tracked)
        xx = torch.zeros(n, dtype=torch.float64, device=self.device)
        qk = torch.zeros(n, dtype=torch.float64, device=self.device)
        heavy = corrected
        with torch.no_grad():
            for i in range(n):
                xf = as_vector(self._iterate(i), acc_dtype(self._tracked[i]))
                xx[i] = (xf @ xf).to(torch.float64) * self._weights[i]
                if heavy:
                    heavy = self._add_k(i, xf, qk)
            local_values = torch.cat(
                [self._local_sums.reshape(-1), self._sign @ xx, self._sign @ qk]
            )
            if self._sharded:
                _dtensor.all_reduce_sum(local_values)
        k = self._local_sums.numel()
        p = len(self.pairs)
        sums = self._offset + local_values[:k].reshape(self._local_sums.shape)
        d = local_values[k : k + p]
        q = d + local_values[k + p :] if heavy else None
        return d, q, sums

    def _add_k(self, i: int, xf: Tensor, qk: Tensor) -> bool:
        """Add tensor ``i``'s share of :math:`\\tfrac{2\\eta\\mu}{1-\\mu} K` to ``qk``; False where
        :math:`Q_t` does not apply (a look-ahead optimiser or the generic split)."""
        owner = self._owner.get(i)
        if owner is None:
            return True
        opt, plan = owner
        rule = self._rule_of[id(opt)]
        if not (rule.known(plan.group) and rule.corrected(plan.group)):
            return False
        h = rule.hyper(plan.group)
        v = rule.velocity(opt, self._tracked[i])
        if v is None or h.momentum == 0.0:
            return True
        vf = as_vector(local(v), xf.dtype)
        coef = 2 * h.lr * h.momentum / (1 - h.momentum)
        qk[i] = (xf @ vf).to(torch.float64) * self._weights[i] * coef
        return True

    def start(self) -> None:
        """Record :math:`D(0)` (and per-unit :math:`D_i(0)`) at the current iterate and zero the
        sums: a new series. Every rank calls it when sharded."""
        self._local_sums.zero_()
        self._offset.zero_()
        for sums in self._unit_sums:
            sums.zero_()
        for sums in self._unit_offset:
            sums.zero_()
        self.steps = 0
        self.D0 = self._pair_values(False)[0].clone()
        self.unit_D0 = self._unit_d() if self.units else None

    def _unit_d(self) -> list[Tensor]:
        out = []
        for unit, parts in zip(self.units, self._unit_parts, strict=True):
            total: Tensor | None = None
            for part in parts:
                x = self._iterate(part.tracked, local=False)
                value = part.sign * unit_sq(x, part.kind, unit.units)
                total = value if total is None else total + value
            assert total is not None
            out.append(total.to(self.device))
        return out

    def read(self) -> dict[str, Any]:
        r"""The ledger now (at step t, before it is taken).

        Returns:
            ``{"pairs": [...], "D": D(t), "D0": D(0), "sums": (pairs, 5) cumulative terms in
            the order of :data:`LEDGER_TERMS`, "closure": (D(t) - D(0)) - sums.sum(1), "Q":
            Q_t or None}`` as float64 tensors; ``Q_t = D_t + 2\eta\mu/(1-\mu) K_t`` is given
            for heavy-ball optimisers only. Every rank calls it when sharded.
        """
        if self.D0 is None:
            self.start()
        assert self.D0 is not None
        d, q, sums = self._pair_values(True)
        return {
            "pairs": list(self.pairs),
            "D": d,
            "D0": self.D0,
            "sums": sums,
            "closure": (d - self.D0) - sums.sum(1),
            "Q": q,
        }

    def read_units(self) -> dict[str, dict[str, Tensor]]:
        """Per hidden layer: ``{"D": D_i(t), "D0": D_i(0), "sums": (units, 5), "closure":
        (D_i(t) - D_i(0)) - sums.sum(1)}`` (float64); empty without ``units``."""
        if not self.units:
            return {}
        if self.unit_D0 is None:
            self.start()
        assert self.unit_D0 is not None
        out = {}
        for unit, d, d0, sums in zip(
            self.units, self._unit_d(), self.unit_D0, self._unit_sums_now(), strict=True
        ):
            out[unit.name] = {"D": d, "D0": d0, "sums": sums, "closure": (d - d0) - sums.sum(1)}
        return out

    def state_dict(self) -> dict[str, Any]:
        """``D(0)``, the cumulative sums (summed over ranks: every rank calls it when
        sharded), the per-unit values and the look-ahead coefficients of the built-in SGD."""
        _, _, sums = self._pair_values(False)
        return {
            "pairs": list(self.pairs),
            "D0": None if self.D0 is None else self.D0.tolist(),
            "sums": sums.tolist(),
            "units": [u.name for u in self.units],
            "unit_D0": None if self.unit_D0 is None else [t.tolist() for t in self.unit_D0],
            "unit_sums": [t.tolist() for t in self._unit_sums_now()],
            "sgd_lookahead": [[self._plan_index(key), value] for key, value in self._sgd_c.items()],
        }

    def _plan_index(self, key: tuple[int, int]) -> list[int]:
        opt_id, g = key
        return [next(k for k, o in enumerate(self.optimizers) if id(o) == opt_id), g]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a series: restore ``D(0)`` and the sums (see :meth:`state_dict`).

        Raises:
            ValueError: the state was saved for other pairs or units.
        """
        if list(state["pairs"]) != self.pairs or list(state["units"]) != [
            u.name for u in self.units
        ]:
            raise ValueError(
                f"ledger state for pairs {state['pairs']} / units {state['units']} does not match"
                f" pairs {self.pairs} / units {[u.name for u in self.units]}"
            )

        def as_tensor(v: Any) -> Tensor:
            return torch.tensor(v, dtype=torch.float64).to(self.device)

        self.D0 = None if state["D0"] is None else as_tensor(state["D0"])
        self._offset = as_tensor(state["sums"]).reshape(self._local_sums.shape)
        self._local_sums.zero_()
        self.unit_D0 = (
            None if state["unit_D0"] is None else [as_tensor(v) for v in state["unit_D0"]]
        )
        saved = [as_tensor(v).reshape(-1, len(LEDGER_TERMS)) for v in state["unit_sums"]]
        if self._sharded:  # the saved totals are added once, after the sum over ranks
            self._unit_offset = saved
            self._unit_sums = [torch.zeros_like(t) for t in saved]
        else:  # continue the same sums in the same order
            self._unit_offset = [torch.zeros_like(t) for t in saved]
            self._unit_sums = saved
        self._sgd_c = {
            (id(self.optimizers[o]), g): float(value) for (o, g), value in state["sgd_lookahead"]
        }
