r"""The balance ledger: where every conserved quantity of training goes, exactly.

:class:`BalanceLedger` reads every optimiser step from step hooks and accumulates, per adjacent
pair of layers, per hidden unit and per unit of every symmetry's charge, the terms of the exact
identity :math:`D_{t+1} - D_t = 2\langle x_t, \Delta x\rangle_\pm + \|\Delta x\|^2_\pm` (for a
linear charge :math:`\langle 1, \Delta x\rangle`) as split by the optimiser's rule
(:mod:`torch_momentum.balance.rules`), so that :math:`D(t) - D(0)` equals the sum of the terms
up to round-off: a ledger that closes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from torch_momentum.balance import _dtensor
from torch_momentum.balance._charges import Charge, ChargeBook
from torch_momentum.balance._dtensor import is_dtensor, local
from torch_momentum.balance._gram import (
    FlatViews,
    Row,
    Slots,
    StepMatrix,
    acc_dtype,
    as_vector,
    entry_values,
    grad_marks,
    inverse_scale,
    step_matrix,
)
from torch_momentum.balance._iterates import Iterates
from torch_momentum.balance.layers import adjacent_pairs, check_disjoint
from torch_momentum.balance.rules import GENERIC_RULE, LEDGER_TERMS, Maps, Rule, is_low_precision
from torch_momentum.balance.symmetry import checked_symmetries
from torch_momentum.balance.units import UnitLayer, unit_parts

__all__ = ["BalanceLedger"]

_N_TERMS = len(LEDGER_TERMS)


class _Plan(NamedTuple):
    """One param group of an optimiser that updates tracked tensors (the group is read from
    ``opt.param_groups`` at every step: ``Optimizer.load_state_dict`` replaces the dicts)."""

    group_index: int  # the group's index in ``opt.param_groups``
    tracked: list[int]  # the tracked tensors it updates


class _Pending(NamedTuple):
    """What the ledger saw of a param group before a step."""

    plan: _Plan
    copies: list[Tensor] | None  # x_t of each tracked tensor (the generic split), else None
    c0: float  # the look-ahead coefficient in force before the step
    low: dict[int, tuple[Tensor, Tensor | None]]  # low-precision tensors: (p_t, v_t) copies
    fresh: frozenset[int]  # tensors without a velocity before the step (rule.fresh groups)


def _dense(t: Tensor) -> Tensor:
    """This rank's shard, densely (sparse gradients and the buffers built from them)."""
    t = local(t)
    return t.to_dense() if t.is_sparse else t


def _terms(t: Tensor) -> Tensor:
    """Saved sums as ``(n, terms)``: states saved before the ``rounding`` term get a zero
    column."""
    if t.dim() != 2:  # no rows
        t = t.reshape(-1, _N_TERMS)
    if t.shape[1] < _N_TERMS:
        t = torch.nn.functional.pad(t, (0, _N_TERMS - t.shape[1]))
    return t


class BalanceLedger:
    r"""The balance ledger: where :math:`D = \|W_L\|^2 - \|W_M\|^2` of adjacent layers, each
    hidden unit's :math:`D_i`, and each symmetry's charge go, term by term, exactly.

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
    :math:`(c_t - \eta\mu)v_t`, counted as momentum). ``torch.optim.SGD`` with dampening
    :math:`\tau` scales the gradient and decay terms by :math:`1 - \tau` (not at a tensor's first
    step, as the built-in). Any other optimiser gets the generic split: symmetry
    :math:`-2\eta R_t` (the gradient's share, :math:`\eta` the group's ``lr``), the rest of the
    first-order part in ``other``. For the SGD family ``other`` is round-off. The rules are
    objects (:mod:`torch_momentum.balance.rules`); ``register_rule`` adds one.

    Linear charges (translation symmetries, :math:`Q = \langle 1, x_A\rangle`) have no
    discretisation term; heavy ball splits :math:`Q_{t+1} - Q_t = \eta\mu\langle 1, v_t\rangle
    - \eta\lambda Q_t - \eta\langle 1, g_t\rangle`. For bfloat16/float16 parameters of a known
    rule the ledger copies parameter and velocity before each step and books the rounding of the
    applied update (applied minus exact) as ``rounding``, so that closure stays the round-off of
    the float64 accumulation; this costs a copy of those tensors per step. Every update that is
    applied is read, from optimiser step hooks: clipping, AMP unscaling and gradient accumulation
    are seen as applied; a step a GradScaler skips is not counted, also when the optimiser
    unscales and skips itself (fused kernels: ``grad_scale`` and ``found_inf``).

    The terms are accumulated on the device without host synchronisation: per tensor, the
    entries of the Gram matrix of its slots (parameter, velocity, gradient) that the terms need,
    mapped to the per-pair sums by one cached matrix; per unit, batched Gram matrices of the
    unit's slices. With sharded (DTensor) parameters every rank accumulates its shards and
    the reads sum them with one ``all_reduce`` (every rank must call them).

    Args:
        layers: ``{layer name: [parameters]}`` in adjacency order (e.g. from
            :func:`discover_layers`, values as tensors): 0 or at least 2 layers, disjoint.
        optimizers: the optimiser (or optimisers) that update them.
        units: optional :class:`UnitLayer` list (from :func:`pair_units`) for per-unit terms.
        module: the model; required with ``units`` or ``symmetries`` (parameters by name).
        symmetries: optional symmetries (from
            :func:`~torch_momentum.balance.find_symmetries`): a ledger per unit of each charge.
        angle_steps: how many steps :meth:`read_angles` keeps between reads (memory stays
            bounded when it is never called).

    Raises:
        ValueError: one layer, nothing to track, a parameter in two layers, ``units`` or
            ``symmetries`` without ``module``, ``angle_steps`` < 1.

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
        layers: Mapping[str, Sequence[Tensor]] | None,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        units: Sequence[UnitLayer] | None = None,
        module: nn.Module | None = None,
        symmetries: Sequence[Any] | None = None,
        angle_steps: int = 1024,
    ) -> None:
        if isinstance(angle_steps, bool) or not isinstance(angle_steps, int) or angle_steps < 1:
            raise ValueError(f"`angle_steps` must be a positive int, got {angle_steps!r}")
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        layers = dict(layers or {})
        self.names = list(layers)
        self.units = list(units or [])
        self.symmetries = checked_symmetries(symmetries)
        self._check(layers, module)
        self.pairs = [f"{a}-{b}" for a, b in adjacent_pairs(self.names)]
        self.optimizers = list(optimizers)
        self._tracked: list[Tensor] = []
        self._tensor_names: list[str] = []
        self._index: dict[int, int] = {}
        layer_of = [
            (self._track(p, f"{layer}[{k}]"), j)
            for j, (layer, params) in enumerate(layers.items())
            for k, p in enumerate(params)
        ]
        charges = self._charges(module)
        self._sharded = any(is_dtensor(p) for p in self._tracked)
        self.device = local(self._tracked[0]).device
        self._multi_device = any(local(p).device != self.device for p in self._tracked)
        self._sign = self._pair_signs(layer_of).to(self.device)
        self._in_pairs = sorted({i for i, _ in layer_of})
        self._weights = [_dtensor.weight(p) for p in self._tracked]
        n_pairs = len(self.pairs)
        self._local_sums = torch.zeros(n_pairs, _N_TERMS, dtype=torch.float64, device=self.device)
        self._offset = torch.zeros_like(self._local_sums)
        self._book = ChargeBook(
            charges, self._tracked, self._tensor_names, self._weights, self.device, angle_steps
        )
        self.D0: Tensor | None = None
        self.unit_D0: list[Tensor] | None = None
        self._charge0: list[Tensor] | None = None
        self._mag0: list[Tensor] | None = None  # every charge's magnitude at the origin
        self.steps = 0  # optimiser steps whose hooks ran (since start/restore)
        #: whether this process accumulates (replicated data parallel: rank zero only)
        self.active = True
        self._init_hooks()

    def _init_hooks(self) -> None:
        """The state of the step hooks: rules, plans, caches."""
        #: who updates each tracked tensor, and the iterate the ledger reads (shared with
        #: :class:`~torch_momentum.balance.watch.NetworkWatch`)
        self.iterates = Iterates(self.optimizers)
        self._rule_of = self.iterates.rules
        self._pending: dict[int, list[_Pending]] = {}
        self._maps: dict[tuple[Any, ...], Maps] = {}
        self._matrices: dict[Any, StepMatrix] = {}
        self._handles: list[Any] = []
        self._static: dict[int, list[_Pending]] = {}
        self._vectors = FlatViews()
        self._plans: dict[int, list[_Plan]] = {}
        self._marks: dict[int, Tensor | None] = {}  # gradient norms before a scaled step
        self._locate()

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------

    def _check(self, layers: dict[str, Sequence[Tensor]], module: nn.Module | None) -> None:
        if len(self.names) == 1 or not (self.names or self.units or self.symmetries):
            raise ValueError(
                f"the ledger needs at least two layers (or units or symmetries), got {self.names}"
            )
        if (self.units or self.symmetries) and module is None:
            raise ValueError("`units` and `symmetries` need `module` to find parameters by name")
        check_disjoint(
            {
                layer: [(f"{layer}[{k}] (shape {tuple(p.shape)})", p) for k, p in enumerate(ps)]
                for layer, ps in layers.items()
            }
        )

    def _charges(self, module: nn.Module | None) -> list[Charge]:
        """The charges of the units and the symmetries (their tensors tracked)."""
        named = dict(module.named_parameters(remove_duplicate=False)) if module else {}
        charges = [
            self._charge(
                u.name, "units", u.units, unit_parts(u, named[u.next_weight].shape[1]), named
            )
            for u in self.units
        ]
        return charges + [
            self._charge(s.name, s.kind, s.units, s.parts, named) for s in self.symmetries
        ]

    def _track(self, p: Tensor, name: str) -> int:
        if id(p) not in self._index:
            self._index[id(p)] = len(self._tracked)
            self._tracked.append(p)
            while name in self._tensor_names:  # another tensor has this name already
                name += "'"
            self._tensor_names.append(name)
        return self._index[id(p)]

    def _charge(self, name: str, kind: str, units: int, specs: Any, named: Any) -> Charge:
        """A charge whose parts name parameters of the module (tracked here)."""
        parts = []
        for spec in specs:
            if spec.param not in named:
                raise ValueError(
                    f"{kind} {name!r} names the parameter {spec.param!r}, which the module does"
                    " not have"
                )
            i = self._track(named[spec.param], spec.param)
            parts.append(dataclasses.replace(spec, param=self._tensor_names[i]))
        return Charge(name, kind, units, parts)

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

    def _locate(self) -> None:
        """Per optimiser, its param groups that update tracked tensors (the steps read)."""
        ids = {id(p): i for i, p in enumerate(self._tracked)}
        self._plans = {}
        for opt in self.optimizers:
            plans = []
            for g, group in enumerate(opt.param_groups):
                idx = [ids[id(p)] for p in group["params"] if id(p) in ids]
                if idx:
                    plans.append(_Plan(g, idx))
            self._plans[id(opt)] = plans

    def _iterate(self, i: int, *, local: bool = True) -> Tensor:
        """The iterate of tracked tensor ``i`` (a view of the parameter when it is the iterate)."""
        x = self.iterates.iterate(self._tracked[i])
        return _dtensor.local(x) if local else x

    def tracks(self, p: Tensor) -> bool:
        """Whether the ledger tracks the tensor ``p`` (a layer's, a unit's or a charge's)."""
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
        """Register step pre/post hooks on the optimisers (idempotent); records the origin
        first (:meth:`start`) unless a series was started or restored."""
        if self._handles:
            return
        if self.D0 is None:
            self.start()
        self.iterates.attach()
        for opt in self.optimizers:
            rule = self._rule_of[id(opt)]
            plans = self._plans.get(id(opt), [])
            low = any(is_low_precision(self._tracked[i]) for pl in plans for i in pl.tracked)
            if (
                rule.pre_step
                or low
                or any(rule.fresh(opt.param_groups[pl.group_index]) for pl in plans)
            ):
                self._handles.append(opt.register_step_pre_hook(self._before))
            else:
                # heavy ball needs nothing from before the step: the post-step state determines
                # the pre-step iterate and velocity
                self._static[id(opt)] = [_Pending(pl, None, 0.0, {}, frozenset()) for pl in plans]
            self._handles.append(opt.register_step_post_hook(self._after))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.iterates.detach()
        self._pending = {}
        self._static = {}
        self._vectors = FlatViews()

    @torch.no_grad()
    def _before(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        # Known rules need only the look-ahead coefficient in force now (the pre-step iterate and
        # velocity are recovered exactly from the state after the step), and copies of the
        # low-precision tensors whose rounding they measure; other optimisers get a copy of the
        # parameters.
        if not self.active:
            return
        if getattr(opt, "grad_scale", None) is not None:  # does the step unscale in place?
            self._marks[id(opt)] = grad_marks(self._tensors_of(opt))
        rule = self._rule_of[id(opt)]
        pending = []
        for plan in self._plans.get(id(opt), []):
            tensors = [self._tracked[i] for i in plan.tracked]
            group = opt.param_groups[plan.group_index]
            if not rule.known(group):
                copies = [local(p.detach()).clone() for p in tensors]
                pending.append(_Pending(plan, copies, 0.0, {}, frozenset()))
                continue
            c0 = rule.lookahead(opt, plan.group_index, self.iterates.memory)
            low = {}
            for i, p in zip(plan.tracked, tensors, strict=True):
                if is_low_precision(p):
                    v = opt.state.get(p, {}).get(rule.velocity_key) if rule.velocity_key else None
                    low[i] = (local(p.detach()).clone(), None if v is None else local(v).clone())
            fresh: frozenset[int] = frozenset()
            if rule.fresh(group):
                key = rule.velocity_key
                fresh = frozenset(
                    i
                    for i, p in zip(plan.tracked, tensors, strict=True)
                    if key not in opt.state.get(p, {})
                )
            pending.append(_Pending(plan, None, c0, low, fresh))
        self._pending[id(opt)] = pending

    def _maps_of(
        self, rule: Rule, opt: torch.optim.Optimizer, entry: _Pending, first_step: bool = False
    ) -> Maps:
        """The (cached) maps of this step of one param group."""
        if entry.copies is not None:
            rule = GENERIC_RULE  # the group was copied: its rule does not explain it
        plan = entry.plan
        g = plan.group_index
        memory = self.iterates.memory
        key, build = rule.maps(opt, g, opt.param_groups[g], entry.c0, memory, first_step)
        maps = self._maps.get(key)
        if maps is None:
            if len(self._maps) > 256:  # a scheduler changes lr every step
                self._maps.clear()
            maps = self._maps[key] = build()
        return maps

    @torch.no_grad()
    def _after(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        # One pass collects, per updated tensor, its slots; the terms are linear in the slots'
        # Gram entries; only the entries with a non-zero coefficient are computed (one dot
        # product each), and one cached matrix maps them to the per-pair sums (one
        # matrix-vector product). The charges take batched per-unit Gram matrices.
        pending = self._pending.pop(id(opt), None)
        if pending is None:
            pending = self._static.get(id(opt))
        if not self.active or pending is None:
            return
        rows = self._collect(opt, pending)
        if not rows:
            return
        self.steps += 1
        # a GradScaler lets optimisers with `_step_supports_amp_scaling` unscale (in place or
        # not) and skip themselves; a step with found_inf did nothing
        inv, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
        if inv is not None:  # the factor that unscales the gradients read here
            inv = inverse_scale(inv, self._marks.pop(id(opt), None), self._tensors_of(opt))
        if self.pairs:
            self._accumulate_pairs(rows, inv, found_inf)
        charge_rows = {row.tracked: row for row in rows if row.tracked in self._book.needs}
        if charge_rows:
            self._book.accumulate(charge_rows, inv, found_inf)

    def _tensors_of(self, opt: torch.optim.Optimizer) -> list[Tensor]:
        return [self._tracked[i] for plan in self._plans.get(id(opt), []) for i in plan.tracked]

    def _collect(self, opt: torch.optim.Optimizer, pending: list[_Pending]) -> list[Row]:
        rule = self._rule_of[id(opt)]
        vkey = rule.velocity_key
        state = opt.state
        rows: list[Row] = []
        for entry in pending:
            maps = self._maps_of(rule, opt, entry)
            first = self._maps_of(rule, opt, entry, True) if entry.fresh else maps
            for k, i in enumerate(entry.plan.tracked):
                p = self._tracked[i]
                grad = p.grad
                if grad is None:
                    continue  # not updated by this step
                slots: Slots
                v = None
                low = False
                if entry.copies is not None:
                    slots, plain, mask = (entry.copies[k], p, grad, None, None), False, 0b111
                else:
                    st = state.get(p)
                    v = st.get(vkey) if st and vkey is not None else None
                    plain = v is None
                    if i in entry.low:
                        p0, v0 = entry.low[i]
                        slots, low = (p0, v0, grad, p, v), True
                        mask = 0b01101 | (0 if v0 is None else 0b10) | (0 if plain else 0b10000)
                    else:
                        slots, mask = (p, v, grad, None, None), 0b101 if plain else 0b111
                if self._sharded or grad.is_sparse or (v is not None and v.is_sparse):
                    slots = cast(Slots, tuple(None if t is None else _dense(t) for t in slots))
                rows.append(Row(i, slots, first if i in entry.fresh else maps, plain, low, mask))
        return rows

    def _accumulate_pairs(
        self, rows: list[Row], inv_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        key = tuple((row.tracked, row.maps.key, row.plain, row.low, row.mask) for row in rows)
        cached = self._matrices.get(key)
        if cached is None:
            if len(self._matrices) > 64:  # a scheduler changes lr every step
                self._matrices.clear()
            split = (
                self.device.type != "cpu" if self._split_squares is None else self._split_squares
            )
            # on an accelerator the squares of all tensors take one multi-tensor reduction per
            # slot; on the CPU that reduction loops over the tensors and costs more than a dot
            # product each
            cached = self._matrices[key] = step_matrix(
                rows, self._sign, self._weights, self.device, split
            )
        dots = entry_values(rows, cached, self._vectors)
        if not dots:
            return
        if self._multi_device:
            dots = [d.to(self.device) for d in dots]
        # stack, then cast into the float64 buffer: stack(out=) across dtypes is ~4x slower
        flat = cached.buffer.copy_(torch.stack(dots))
        if inv_scale is not None:
            flat.mul_(inv_scale.to(flat.device).pow(cached.grad_powers))
        if found_inf is not None:  # a step the optimiser skipped: nothing happened
            flat = torch.where(found_inf.to(flat.device) > 0, 0.0, flat)
        self._local_sums.view(-1).addmv_(cached.matrix, flat)

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
            for i in self._in_pairs:
                xf = as_vector(self._iterate(i), acc_dtype(self._tracked[i]))
                xx[i] = (xf @ xf).to(torch.float64) * self._weights[i]
                if heavy:
                    heavy = self._add_k(i, xf, qk)
            values = torch.cat([self._local_sums.reshape(-1), self._sign @ xx, self._sign @ qk])
            if self._sharded:
                _dtensor.all_reduce_sum(values)
        k = self._local_sums.numel()
        p = len(self.pairs)
        sums = self._offset + values[:k].reshape(self._local_sums.shape)
        d = values[k : k + p]
        q = d + values[k + p :] if heavy else None
        return d, q, sums

    def _add_k(self, i: int, xf: Tensor, qk: Tensor) -> bool:
        """Add tensor ``i``'s share of :math:`\\tfrac{2\\eta\\mu}{1-\\mu} K` to ``qk``; False where
        :math:`Q_t` does not apply (a look-ahead optimiser, dampening or the generic split)."""
        owner = self.iterates.owner(self._tracked[i])
        if owner is None:
            return True
        opt, g = owner
        rule, group = self._rule_of[id(opt)], opt.param_groups[g]
        if not (rule.known(group) and rule.corrected(group)):
            return False
        h = rule.hyper(group)
        v = rule.velocity(opt, self._tracked[i])
        if v is None or h.momentum == 0.0:
            return True
        vf = as_vector(_dense(v), xf.dtype)
        coef = 2 * h.lr * h.momentum / (1 - h.momentum)
        qk[i] = (xf @ vf).to(torch.float64) * self._weights[i] * coef
        return True

    def _charge_values(self, first: int, stop: int | None) -> tuple[list[Tensor], list[Tensor]]:
        return self._book.values(lambda i: self._iterate(i, local=False), first, stop)

    def start(self) -> None:
        """Record :math:`D(0)` (per pair, per unit, per charge) at the current iterate and zero
        the sums: a new series. Every rank calls it when sharded."""
        self._local_sums.zero_()
        self._offset.zero_()
        self._book.zero()
        self.steps = 0
        self.D0 = self._pair_values(False)[0].clone()
        values, self._mag0 = self._charge_values(0, None)  # and the magnitudes at the origin
        self.unit_D0 = values[: len(self.units)] if self.units else None
        self._charge0 = values[len(self.units) :]

    def read(self) -> dict[str, Any]:
        r"""The ledger of the layer pairs now (at step t, before it is taken).

        Returns:
            ``{"pairs": [...], "D": D(t), "D0": D(0), "sums": (pairs, 6) cumulative terms in
            the order of :data:`LEDGER_TERMS`, "closure": (D(t) - D(0)) - sums.sum(1), "Q":
            Q_t or None}`` as float64 tensors; ``Q_t = D_t + 2\eta\mu/(1-\mu) K_t`` is given
            for heavy-ball optimisers only. Every rank calls it when sharded.
        """
        if self.D0 is None:
            self.start()
        assert self.D0 is not None
        d, q, sums = self._pair_values(True)
        closure = (d - self.D0) - sums.sum(1)
        return dict(pairs=list(self.pairs), D=d, D0=self.D0, sums=sums, closure=closure, Q=q)

    def _read_charges(self, first: int, stop: int, origin: list[Tensor]) -> list[dict[str, Any]]:
        values, mag = self._charge_values(first, stop)
        sums, out = self._book.reduced(self._sharded)[first:stop], []
        mag0 = self._mag0[first:stop] if self._mag0 is not None else [d.abs() for d in origin]
        for d, d0, s, m, m0 in zip(values, origin, sums, mag, mag0, strict=True):
            scale = torch.stack([m, m0, d.abs(), d0.abs()]).amax(0)
            out.append({"D": d, "D0": d0, "sums": s, "closure": d - d0 - s.sum(1), "scale": scale})
        return out

    def read_units(self) -> dict[str, dict[str, Tensor]]:
        """Per hidden layer, :meth:`read_charges`' entries (without ``kind``) of the per-unit
        balance :math:`D_i`; empty without ``units``."""
        if not self.units:
            return {}
        if self.unit_D0 is None:
            self.start()
        assert self.unit_D0 is not None
        rows = self._read_charges(0, len(self.units), self.unit_D0)
        return {unit.name: row for unit, row in zip(self.units, rows, strict=True)}

    def read_charges(self) -> dict[str, dict[str, Any]]:
        """Per symmetry: ``{"kind", "D": Q(t), "D0": Q(0), "sums": (units, 6), "closure": (Q(t) -
        Q(0)) - sums.sum(1), "scale"}`` (float64, per unit); ``scale``: the charge's magnitude
        (signs dropped, :math:`|x|` for a linear charge) now or at the origin, or
        :math:`|Q(t)|, |Q(0)|`, the largest: the size of its round-off (``closure / scale`` is
        relative even for a zero or decaying charge).
        Empty without ``symmetries``; every rank calls it when sharded."""
        if not self.symmetries:
            return {}
        if self._charge0 is None:
            self.start()
        assert self._charge0 is not None
        n = len(self.units)
        rows = self._read_charges(n, n + len(self.symmetries), self._charge0)
        return {
            s.name: {"kind": s.kind, **row} for s, row in zip(self.symmetries, rows, strict=True)
        }

    def read_angles(self) -> dict[str, Tensor]:
        """Per scale symmetry, the angle between :math:`x_t` and :math:`x_{t+1}` (all its units
        together) of every step since the last call, in order, at most the last ``angle_steps``
        (steps a GradScaler skipped are NaN)."""
        names = [c.name for c in self._book.charges if c.kind == "scale"]
        angles = self._book.angles(self._sharded)
        return {name: angles[:, k] for k, name in enumerate(names)}

    def state_dict(self) -> dict[str, Any]:
        """The origins, the cumulative sums (summed over ranks: every rank calls it when
        sharded), per unit and per charge, and the look-ahead records of the built-in SGD."""
        _, _, sums = self._pair_values(False)
        unit_sums, charge_sums = self._book.split(self._book.reduced(self._sharded))
        return {
            "pairs": list(self.pairs),
            "D0": None if self.D0 is None else self.D0.tolist(),
            "sums": sums.tolist(),
            "units": [u.name for u in self.units],
            "unit_D0": None if self.unit_D0 is None else [t.tolist() for t in self.unit_D0],
            "unit_sums": [t.tolist() for t in unit_sums],
            "charges": [s.name for s in self.symmetries],
            "charge_D0": None if self._charge0 is None else [t.tolist() for t in self._charge0],
            "charge_sums": [t.tolist() for t in charge_sums],
            "magnitude0": None if self._mag0 is None else [t.tolist() for t in self._mag0],
            "sgd_lookahead": self.iterates.state_dict(),
            # the scale charges' angle statistics of the steps no read_angles() has seen yet
            "angle_stats": self._book.angle_stats(self._sharded).tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a series: restore the origins and the sums (see :meth:`state_dict`).

        Raises:
            ValueError: the state was saved for other pairs, units or charges, or holds totals
                of other shapes than theirs.
        """
        charges = list(state.get("charges", []))
        mine = ([u.name for u in self.units], [s.name for s in self.symmetries])
        if list(state["pairs"]) != self.pairs or (list(state["units"]), charges) != mine:
            raise ValueError(
                f"ledger state for pairs {state['pairs']} / units {state['units']} / charges"
                f" {charges} does not match pairs {self.pairs} / units {mine[0]} / charges"
                f" {mine[1]}"
            )

        def as_tensor(v: Any) -> Tensor:
            return torch.tensor(v, dtype=torch.float64).to(self.device)

        # the per-unit totals (and the unread steps' angle statistics) first: they are checked
        # against the charges before anything changes
        self._book.restore(
            [_terms(as_tensor(v)) for v in state["unit_sums"]],
            [_terms(as_tensor(v)) for v in state.get("charge_sums", [])],
            self._sharded,
            as_tensor(state["angle_stats"]) if state.get("angle_stats") else None,
        )
        self.D0 = None if state["D0"] is None else as_tensor(state["D0"])
        self._offset = _terms(as_tensor(state["sums"])).reshape(self._local_sums.shape)
        self._local_sums.zero_()
        self.unit_D0 = (
            None if state["unit_D0"] is None else [as_tensor(v) for v in state["unit_D0"]]
        )
        charge0 = state.get("charge_D0")
        # None: saved before start() (read_charges then starts the series, as a fresh ledger)
        self._charge0 = None if charge0 is None else [as_tensor(v) for v in charge0]
        mag0 = state.get("magnitude0")  # None: saved before start() or by an older version
        self._mag0 = None if mag0 is None else [as_tensor(v) for v in mag0]
        self.iterates.load_state_dict(state["sgd_lookahead"])
