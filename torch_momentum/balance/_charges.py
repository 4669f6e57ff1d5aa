r"""Per-unit charges in the ledger: hidden units and the symmetries of a model.

A *charge* is a vector of per-unit quantities of the parameters: quadratic,
:math:`Q_u = \sum_{parts} \pm \|x_{part,u}\|^2` (per-unit balance; scale and rescale symmetries),
or linear, :math:`Q_u = \sum_{parts} \langle 1, x_{part,u}\rangle` (translation symmetries). A
*part* is a slice of one tensor whose entries are split into units along one dimension (or the
whole tensor as one unit). For every step the ledger splits each unit's change exactly into the
terms of the optimiser's rule, from the per-unit Gram matrices (quadratic) or sums (linear) of
the tensor's slots.

Private module: the names here are shared by the ledger's modules, not user API.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from torch_momentum.balance import _dtensor, _native
from torch_momentum.balance._flat import FLAT_CAP, FlatRows
from torch_momentum.balance._gram import GRAD_SLOT, Row, acc_dtype
from torch_momentum.balance._native import NativeRows, NativeUnitSum
from torch_momentum.balance._parts import (
    PartSums,
    SymmetryPart,
    UnitGroup,
    index_units,
    part_units,
    row_reducer,
)
from torch_momentum.balance._unit_sum import UnitSum
from torch_momentum.balance.rules import GRAM_ENTRIES, LEDGER_TERMS, SLOTS

_ENTRY_A = [a for a, _ in GRAM_ENTRIES]
_ENTRY_B = [b for _, b in GRAM_ENTRIES]
# positions in GRAM_ENTRIES of <x,x>, <x,dx>, <dx,dx>, <x,e>, <dx,e>, <e,e>
_XX, _XDX, _DXDX, _XE, _DXE, _EE = 0, 4, 5, 6, 7, 8
# the angle statistics of a scale charge as combinations of GRAM_ENTRIES: |x|^2, <x, d> and
# |d|^2 of the applied update d = dx + e
_ANGLE_ROWS = torch.zeros(3, len(GRAM_ENTRIES), dtype=torch.float64)
_ANGLE_ROWS[0, _XX] = 1.0
_ANGLE_ROWS[1, _XDX] = _ANGLE_ROWS[1, _XE] = 1.0
_ANGLE_ROWS[2, _DXDX] = _ANGLE_ROWS[2, _EE] = 1.0
_ANGLE_ROWS[2, _DXE] = 2.0
# per row of a step: the terms (LEDGER_TERMS) and the angle statistics
_VALUES = len(LEDGER_TERMS) + 3


class Charge(NamedTuple):
    """A per-unit charge: ``kind`` is ``"units"`` (a hidden layer's per-unit balance),
    ``"scale"``, ``"rescale"``, ``"translation"`` or ``"zero_gradient"``."""

    name: str
    kind: str
    units: int
    parts: list[SymmetryPart]  # ``param``: the tracked tensor's name in the ledger

    @property
    def linear(self) -> bool:
        """Whether the charge is linear (translation, zero gradient) rather than quadratic."""
        return self.kind not in ("units", "scale", "rescale")


def localize(part: SymmetryPart, p: Any, name: str) -> SymmetryPart | None:
    """The part as this rank's shard of ``p`` sees it (``None``: it holds none of its units).

    A shard along another dimension than the part's sees all units (its sums are partial and
    add up over ranks); a shard along the part's dimension holds the part's indices in its
    range, in local coordinates: whole blocks of the part (its units), from the unit the first
    of them belongs to. A head of attention, or a rotary pair's half, is such a slice.

    Raises:
        ValueError: ``p`` sharded along the part's dimension through a unit (a block).

    Example:
        >>> import torch
        >>> from torch_momentum.balance import SymmetryPart
        >>> from torch_momentum.balance._charges import localize
        >>> part = SymmetryPart("w", 0, 2, 4, 1, 1.0, 0)
        >>> localize(part, torch.zeros(8, 3), "w") is part  # a plain tensor: all of it
        True
    """
    if part.dim is None or not _dtensor.sharded_along(p, part.dim):
        return part
    first, count = _dtensor.shard_range(p, part.dim, p.shape[part.dim])
    lo, hi = max(part.start, first), min(part.start + part.length, first + count)
    if hi <= lo:
        return None
    if (lo - part.start) % part.block or (hi - lo) % part.block:
        raise ValueError(
            f"per-unit ledger terms need {name!r} (shape {tuple(p.shape)}) unsharded along"
            f" dim {part.dim}, or sharded in whole units (blocks of {part.block}); got"
            f" placements {p.placements}"
        )
    return dataclasses.replace(
        part,
        start=lo - first,
        length=hi - lo,
        unit_offset=part.unit_offset + (lo - part.start) // part.block,
    )


#: The stacked path pays a few kernels per group of equally shaped tensors and stacks each group
#: with one kernel; :class:`FlatRows` pays one copy per tensor (about 1 us each on a CPU) and a
#: few kernels per row length. Where the groups hold more tensors than this on average (a
#: network of many identical blocks), the stacked path is the cheaper: measured on the CPU, the
#: one buffer took 0.58x the stacked path's time on the ResNet-style CNN (1.3 tensors a group),
#: 0.89-0.94x on GPT-2 tiny (5.7) and 0.93-1.09x on the 12-block TinyViT (19).
FLAT_GROUP_SIZE = 8

#: Whether a CPU ledger's steps take the C kernel (:class:`~torch_momentum.balance._native.
#: NativeRows`: one pass over the slots where they lie, no copy, whatever the model's size or
#: the groups' sizes) where it is available; the other paths stay for accelerators, other
#: dtypes and machines without a C compiler (tests switch it off to compare the paths).
NATIVE = True


class _Flat(NamedTuple):
    """The layout's reductions by :class:`~torch_momentum.balance._flat.FlatRows`, for steps
    whose rows all have the three slots (p, v, g) of one dtype and one rule map: the per-row
    Gram entries (quadratic charges) and sums (linear ones), times each part's factor, are
    summed into the units first (``raw``: 9 Gram entries, and 3 sums, per unit of every
    charge), then mapped to the terms and angle statistics once per unit. Every buffer
    persists, and so do the views a step reads."""

    rows: FlatRows | NativeRows
    keys: list[int]  # the tracked tensors, in the plan's order
    gram_rows: Tensor  # (Gram rows, 9): a view of ``rows.gram``
    wide: Tensor | None  # float32 Gram rows: their float64 copy
    sum_gram: UnitSum | NativeUnitSum  # Gram rows into units, times each part's factor
    sum_sums: UnitSum | NativeUnitSum  # sums rows into units
    raw: tuple[Tensor, Tensor]  # per unit, the summed Gram entries (9) and sums (3)
    raw_t: tuple[Tensor, Tensor]  # their transposes (views)
    terms_t: Tensor  # (9, units): the terms and angle statistics of every unit
    terms: Tensor  # (units, 9): its transpose (a view)


class _Layout(NamedTuple):
    """The cached layout of a step's charge rows (see :meth:`ChargeBook.accumulate`)."""

    groups: list[UnitGroup]  # the tensors reduced together (``index_units``)
    present: list[tuple[int, ...]]  # per group: the slots its members have
    dtype: list[torch.dtype]  # per group: the dtype of its slots (stacked as they are)
    acc: list[torch.dtype]  # per group: the accumulation dtype
    convert: list[bool]  # per group: converted to the accumulation dtype before stacking
    complex: list[bool]  # per group: complex tensors, read as real
    reducers: list[Callable[[list[Tensor]], Tensor]]  # per group: its rows' reductions
    unit_sum: UnitSum  # the groups' rows into the units
    terms: Tensor  # (units, 9): per unit, the step's terms and angle statistics
    flat: _Flat | None  # the same reductions from one buffer, where the layout allows


class ChargeBook:
    """The per-unit sums of every charge's ledger terms, accumulated on the device.

    Each step's terms are linear in the per-unit Gram matrices (quadratic charges) or sums
    (linear charges) of each tensor's slots. Tensors of one layout are stacked and reduced
    together (:func:`~torch_momentum.balance._parts.reduce_rows`: one copy, one batched
    matrix product per block of rows), the per-index values are mapped to the terms by the
    coefficients of each tensor's rule, and one sparse product
    (:class:`~torch_momentum.balance._unit_sum.UnitSum`) sums them into the units: a few
    kernels per group of equally shaped tensors, not per part.

    Args:
        charges: the charges (global parts, each naming its tracked tensor in ``param``): the
            hidden layers' per-unit balances (kind ``"units"``) first, then the symmetries'.
        tracked: the tracked tensors (parameters).
        names: a distinct name per tracked tensor (the parts' ``param``).
        weights: per tracked tensor, the weight of this rank's shard in sums over ranks.
        device: where the sums live.
        angle_steps: how many steps of angle statistics of the scale charges are kept (a ring
            buffer preallocated on the device: memory stays bounded however long
            :meth:`angles` is not called).
    """

    def __init__(
        self,
        charges: Sequence[Charge],
        tracked: Sequence[Tensor],
        names: Sequence[str],
        weights: Sequence[float],
        device: torch.device,
        angle_steps: int = 1024,
    ) -> None:
        self.charges = list(charges)
        #: how many leading charges are hidden layers' per-unit balances
        self.n_units = sum(c.kind == "units" for c in self.charges)
        if any(c.kind == "units" for c in self.charges[self.n_units :]):
            raise ValueError(
                "`charges`: the per-unit balances (kind 'units') must come first, got kinds"
                f" {[c.kind for c in self.charges]}"
            )
        self.device = device
        self._weights = list(weights)
        position = {name: i for i, name in enumerate(names)}
        if len(position) != len(names):
            raise ValueError(f"the tracked tensors' `names` must be distinct, got {list(names)}")
        self._position = position
        self._local: list[list[SymmetryPart]] = []
        for charge in self.charges:
            parts = [localize(p, tracked[position[p.param]], p.param) for p in charge.parts]
            self._local.append([p for p in parts if p is not None])
        self.needs = {position[p.param] for parts in self._local for p in parts}
        n_terms = len(LEDGER_TERMS)
        self.sizes = [c.units for c in self.charges]
        self._flat = torch.zeros(sum(self.sizes), n_terms, dtype=torch.float64, device=device)
        self.sums = list(self._flat.split(self.sizes))
        self.offset = [torch.zeros_like(t) for t in self.sums]
        self._scale = [k for k, c in enumerate(self.charges) if c.kind == "scale"]
        # per step, |x|^2, <x, d>, |d|^2 of each scale charge (and a dump row for the others),
        # written in place at row (steps seen % angle_steps)
        self._ring = torch.zeros(
            angle_steps if self._scale else 0,
            len(self._scale) + 1,
            3,
            dtype=torch.float64,
            device=device,
        )
        self._angle_count = 0  # steps written since the last read
        # per unit of every charge: its scale charge's place in the angle statistics
        self._unit_angle = self._angle_places()
        self._angle_offset: Tensor | None = None  # restored unread steps, summed over ranks
        self._layouts: dict[Any, _Layout] = {}
        self._coefs: dict[tuple[Any, ...], tuple[Any, Tensor]] = {}
        self._coefs_t_cache: dict[
            tuple[int, int], tuple[Tensor, Tensor, tuple[Tensor, Tensor]]
        ] = {}
        self._values: dict[tuple[int, int | None, bool], PartSums] = {}

    def zero(self) -> None:
        self._flat.zero_()
        for t in self.offset:
            t.zero_()
        self._angle_count, self._angle_offset = 0, None

    def accumulate(
        self, rows: dict[int, Row], inv_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        """Add one step's terms (``rows``: the step's rows by tracked tensor)."""
        key = (tuple(rows), tuple([row.mask for row in rows.values()]))
        cached = self._layouts.get(key)
        terms = None if cached is None else self._values_of(cached, rows, inv_scale)
        if terms is None:  # a new layout (or the dtypes or shapes changed under it)
            if len(self._layouts) > 16:
                self._layouts.clear()
            cached = self._layouts[key] = self._layout(rows)
            terms = self._values_of(cached, rows, inv_scale)
            assert terms is not None  # (units, 9)
        if found_inf is not None:  # a step the optimiser skipped: nothing happened
            terms = torch.where(found_inf.to(terms.device) > 0, 0.0, terms)
        n_terms = len(LEDGER_TERMS)
        self._flat.add_(terms[:, :n_terms])
        if self._scale:
            angle = self._ring[self._angle_count % len(self._ring)]
            angle.zero_().index_add_(0, self._unit_angle, terms[:, n_terms:])
            if found_inf is not None:
                angle.masked_fill_(found_inf.to(angle.device) > 0, math.nan)
            self._angle_count += 1

    def _layout(self, rows: dict[int, Row]) -> _Layout:
        """Group the charge parts of the tensors in ``rows`` by layout and index their units."""

        def describe(i: int) -> tuple[Any, tuple[int, ...]] | None:
            row = rows.get(i)
            if row is None:
                return None
            slots = [t for t in row.slots if t is not None]
            shape = tuple(slots[0].shape) + ((2,) if slots[0].is_complex() else ())
            dtypes = tuple(t.dtype for t in slots)
            return (shape, dtypes, slots[0].device, row.mask, row.low, row.plain), shape

        weights, position = self._weights, self._position
        index = index_units(
            [
                (c.units, c.linear, parts)
                for c, parts in zip(self.charges, self._local, strict=True)
            ],
            lambda part: position[part.param],
            describe,
            lambda part: part.sign * weights[position[part.param]],
            # groups that share a rule map and slots next to each other: one mapping for all
            lambda group: (group.linear, repr(group.signature[1:])),
        )
        present, dtype, acc, convert, cplx = [], [], [], [], []
        for group in index.groups:
            _, dtypes, _, mask, _, _ = group.signature
            present.append(tuple(k for k in range(SLOTS) if mask >> k & 1))
            first = torch.empty(0, dtype=dtypes[0])
            acc.append(acc_dtype(first))
            cplx.append(first.is_complex())
            real = torch.view_as_real(first).dtype if first.is_complex() else first.dtype
            dtype.append(real)
            convert.append(real != acc[-1] or any(d != dtypes[0] for d in dtypes))
        device, units = self.device, sum(self.sizes)
        values = sum(group.rows * len(group.members) for group in index.groups)
        src, dst, factor = (t.to(device) for t in (index.src, index.dst, index.factor))
        return _Layout(
            index.groups,
            present,
            dtype,
            acc,
            convert,
            cplx,
            [
                row_reducer(group, len(present[g]), "sum" if group.linear else "gram")
                for g, group in enumerate(index.groups)
            ],
            UnitSum(src, dst, factor, units, values),
            torch.zeros(units, _VALUES, dtype=torch.float64, device=device),
            self._flat_layout(rows, index.groups),
        )

    def _angle_places(self) -> Tensor:
        """Per unit of every charge: the position of its scale charge in the angle statistics
        (``len(self._scale)``, a dump row, for the other charges)."""
        charge_of_unit = torch.repeat_interleave(
            torch.arange(len(self.charges)), torch.tensor(self.sizes, dtype=torch.long)
        )
        scale_pos = torch.full((len(self.charges) + 1,), len(self._scale), dtype=torch.long)
        scale_pos[self._scale] = torch.arange(len(self._scale))
        return scale_pos[charge_of_unit].to(self.device)

    def _flat_layout(self, rows: dict[int, Row], groups: list[UnitGroup]) -> _Flat | None:
        """The reductions of ``rows`` in one pass (:class:`~torch_momentum.balance._native.
        NativeRows`, on the CPU where the C kernel is available and the slots contiguous) or from
        one buffer (:class:`FlatRows`, where the model is small enough (:data:`FLAT_CAP`) and
        the stacked path's ``groups`` hold at most :data:`FLAT_GROUP_SIZE` tensors on average),
        where every row has the slots (p, v, g), dense, of one float dtype on one device; None
        otherwise."""
        keys = list(rows)
        slots = [rows[i].slots[:3] for i in keys]
        t0 = cast(Tensor, slots[0][0])
        dtype, device = t0.dtype, t0.device
        if dtype not in (torch.float32, torch.float64) or any(
            rows[i].mask != 0b111 or rows[i].low or rows[i].plain for i in keys
        ):
            return None
        shapes = [cast(Tensor, s[0]).shape for s in slots]
        for shape, triple in zip(shapes, slots, strict=True):
            for t in cast(tuple[Tensor, ...], triple):
                if t.dtype is not dtype or t.device != device or t.is_sparse or t.shape != shape:
                    return None
        if not all(math.prod(s) for s in shapes):
            return None
        native = NATIVE and _native.supports(
            (cast(Tensor, t) for triple in slots for t in triple), dtype
        )
        if not native and (
            sum(len(g.members) for g in groups) > FLAT_GROUP_SIZE * len(groups)
            or 3 * sum(map(math.prod, shapes)) > FLAT_CAP
        ):
            return None
        k_of = {i: k for k, i in enumerate(keys)}
        entries: list[tuple[SymmetryPart, int, int, bool, int]] = []
        bases = itertools.accumulate(self.sizes, initial=0)  # each charge's first unit
        for charge, parts, base in zip(self.charges, self._local, bases, strict=False):
            for part in parts:
                k = k_of.get(self._position[part.param])
                if k is not None:
                    dim = 0 if part.dim is None else part.dim
                    entries.append((part, k, dim, charge.linear, base))
        if not entries:
            return None
        uses = [(k, d, lin) for _, k, d, lin, _ in entries]
        flat: FlatRows | NativeRows = (
            NativeRows(shapes, uses, dtype) if native else FlatRows(shapes, uses, dtype, device)
        )
        units = sum(self.sizes)
        sum_gram, sum_sums = self._flat_sums(flat, entries, units, device)

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        raw = (zeros(units, 9), zeros(units, 3))
        terms_t = zeros(_VALUES, units)
        return _Flat(
            flat,
            keys,
            flat.gram.view(-1, 9),
            None if flat.gram.dtype == torch.float64 else zeros(len(flat.gram), 9),
            sum_gram,
            sum_sums,
            raw,
            (raw[0].T, raw[1].T),
            terms_t,
            terms_t.T,
        )

    def _flat_sums(
        self,
        flat: FlatRows | NativeRows,
        entries: list[tuple[SymmetryPart, int, int, bool, int]],
        units: int,
        device: Any,
    ) -> tuple[UnitSum | NativeUnitSum, UnitSum | NativeUnitSum]:
        """The sums of ``flat``'s Gram rows, and of its sums rows, into the ``units``, each row
        times its part's factor, from ``entries`` ``(part, tensor, dim, linear, first unit of
        its charge)``."""
        index: dict[bool, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {
            False: ([], [], []),
            True: ([], [], []),
        }
        for part, k, d, linear, base in entries:
            j, unit = part_units(part, base)
            if part.dim is None:  # every row of the tensor, into its one unit
                j = torch.arange(flat.count(k, d))
                unit = unit.expand(len(j))
            src, dst, factor = index[linear]
            src.append((flat.first_sum(k, d) if linear else flat.first(k, d)) + j)
            dst.append(unit)
            weight = part.sign * self._weights[self._position[part.param]]
            factor.append(torch.full((len(j),), float(weight), dtype=torch.float64))

        def cat(tensors: list[Tensor], dtype: torch.dtype = torch.long) -> Tensor:
            found = torch.cat(tensors) if tensors else torch.zeros(0)
            return found.to(device, dtype)

        summer = NativeUnitSum if isinstance(flat, NativeRows) else UnitSum
        gram, sums = (
            summer(cat(src), cat(dst), cat(factor, torch.float64), units, rows)
            for (src, dst, factor), rows in (
                (index[False], len(flat.gram)),
                (index[True], len(flat.sums)),
            )
        )
        return gram, sums

    def _values_of(
        self, layout: _Layout, rows: dict[int, Row], inv_scale: Tensor | None
    ) -> Tensor | None:
        """Per unit of every charge: this step's 6 terms and 3 angle statistics (float64,
        ``(units, 9)``, a persistent buffer); None where the layout no longer fits."""
        flat = layout.flat
        if flat is not None and inv_scale is None:
            first = rows[flat.keys[0]]
            if all(rows[i].maps is first.maps for i in flat.keys):
                if not self._flat_units(flat, rows, first):
                    return None
                return flat.terms
        values = self._step_values(layout, rows, inv_scale)
        if values is None:
            return None
        return layout.unit_sum(values, layout.terms)

    def _flat_units(self, flat: _Flat, rows: dict[int, Row], first: Row) -> bool:
        """Fill ``flat.terms_t``: per unit, the 6 terms and 3 angle statistics of this step
        (float64); False where a slot's dtype or shape changed (nothing computed). Every
        buffer persists: fresh ones of these sizes cost page faults every step."""
        if not flat.rows([cast(Tensor, rows[i].slots[a]) for a in range(3) for i in flat.keys]):
            return False
        x = flat.gram_rows if flat.wide is None else flat.wide.copy_(flat.gram_rows)  # float64
        flat.sum_gram(x, flat.raw[0])
        flat.sum_sums(flat.rows.sums, flat.raw[1])
        # transposed: a (9, units) product is ~2x faster than (units, 9) on the CPU
        quadratic_t, linear_t = self._coefs_t(first, x.device)
        torch.mm(quadratic_t, flat.raw_t[0], out=flat.terms_t)
        flat.terms_t.addmm_(linear_t, flat.raw_t[1])
        return True

    def _coefs_t(self, row: Row, device: Any) -> tuple[Tensor, Tensor]:
        """``(9, 9)`` and ``(9, 3)``: the terms and angle statistics of a unit from its 9 Gram
        entries (quadratic charges) or its 3 sums (linear charges) of the slots (p, v, g),
        transposed (:meth:`_coef`'s maps)."""
        present = (0, 1, 2)
        quadratic = self._coef(row, False, present, device)
        linear = self._coef(row, True, present, device)
        key = (id(quadratic), id(linear))
        hit = self._coefs_t_cache.get(key)
        if hit is None or hit[0] is not quadratic or hit[1] is not linear:
            if len(self._coefs_t_cache) > 256:  # a scheduler changes lr every step
                self._coefs_t_cache.clear()
            pair = (quadratic.T.contiguous(), linear.T.contiguous())
            hit = self._coefs_t_cache[key] = (quadratic, linear, pair)
        return hit[2]

    def _step_values(
        self, layout: _Layout, rows: dict[int, Row], inv_scale: Tensor | None
    ) -> Tensor | None:
        """Per row of every group, the 6 terms and 3 angle statistics (``(rows, 9)``, float64,
        unweighted); None when a group's tensors no longer have the layout's dtype. Consecutive
        groups whose tensors share one rule map are mapped to the terms together."""
        pieces: list[Tensor] = []
        run: list[Tensor] = []  # reductions of consecutive groups with one coefficient matrix
        run_key: tuple[Any, ...] | None = None
        run_coef: Tensor | None = None
        plain = inv_scale is None
        for g, group in enumerate(layout.groups):
            present = layout.present[g]
            members = [rows[i] for i in group.members]
            if layout.complex[g] or layout.convert[g] or not plain:
                acc = layout.acc[g]
                tensors = [_slot(row, k, acc, inv_scale) for row in members for k in present]
            else:  # the present slots as they are
                tensors = [cast(Tensor, row.slots[k]) for row in members for k in present]
                if tensors[0].dtype is not layout.dtype[g]:
                    return None
            x = layout.reducers[g](tensors)  # (rows * members, values)
            first = members[0]
            maps = first.maps
            key = None
            if all(row.maps is maps for row in members):
                key = (id(maps), first.plain, first.low, present, group.linear, x.dtype)
            if run and key != run_key:  # the run ends
                pieces.append(_map_run(run, cast(Tensor, run_coef)))
                run = []
            if key is None:  # several rule maps in one group: per member
                x = x.to(torch.float64).view(-1, len(members), x.shape[-1])
                pieces.append(self._apply(x, members, group.linear, present))
                continue
            if not run:
                run_key, run_coef = key, self._coef(first, group.linear, present, x.device)
            run.append(x)
        if run:
            pieces.append(_map_run(run, cast(Tensor, run_coef)))
        if not pieces:
            return torch.zeros(0, _VALUES, dtype=torch.float64, device=self.device)
        if len(pieces) == 1:
            return pieces[0].to(self.device).contiguous()  # the units' sum reads its rows
        return torch.cat([p.to(self.device) for p in pieces])

    def _apply(
        self, x: Tensor, members: list[Row], linear: bool, present: tuple[int, ...]
    ) -> Tensor:
        """The terms and angle statistics of per-row reductions ``x`` ``(rows, K, e)`` whose
        members follow several rule maps."""
        coefs = torch.stack([self._coef(row, linear, present, x.device) for row in members])
        return torch.einsum("nke,ket->nkt", x, coefs).reshape(-1, _VALUES)

    def _coef(self, row: Row, linear: bool, present: tuple[int, ...], device: Any) -> Tensor:
        """``(e, 9)``: the row's terms and angle statistics as combinations of the reductions of
        its present slots (cached per rule map; the map is kept so that its id stays unique)."""
        key = (id(row.maps), row.plain, row.low, present, linear, device)
        hit = self._coefs.get(key)
        if hit is not None and hit[0] is row.maps:
            return hit[1]
        cmap = row.slot_map()[:, list(present)]  # (5 canonical, r)
        if linear:
            terms = torch.tensor(row.maps.linear, dtype=torch.float64) @ cmap  # (6, r)
            coef = torch.cat([terms, torch.zeros(_VALUES - len(terms), len(present))]).T
        else:
            table = torch.cat([torch.tensor(row.maps.terms, dtype=torch.float64), _ANGLE_ROWS])
            a, b = cmap[_ENTRY_A], cmap[_ENTRY_B]  # (9 entries, r)
            coef = torch.einsum("te,ea,eb->abt", table, a, b).reshape(-1, _VALUES)
        if len(self._coefs) > 256:  # a scheduler changes lr every step
            self._coefs.clear()
        self._coefs[key] = (row.maps, coef.to(device))
        return self._coefs[key][1]

    def reduced(self, sharded: bool) -> list[Tensor]:
        """The sums over all ranks plus the restored offsets (one all_reduce when sharded)."""
        sums = self.sums
        if sharded and sums:
            flat = _dtensor.all_reduce_sum(self._flat.clone())
            sums = list(flat.split(self.sizes))
        return [off + t for off, t in zip(self.offset, sums, strict=True)]

    def values(
        self, iterate: Callable[[int], Tensor], first: int = 0, stop: int | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Charges ``first..stop`` now and their magnitudes (see :class:`PartSums`), from the
        full iterate of every tensor, gathered once when sharded (a collective per tensor)."""
        full = functools.cache(lambda i: _dtensor.full(iterate(i)))
        found = []
        for magnitude in (False, True):
            sums = self._values.get((first, stop, magnitude))
            if sums is None:
                sums = self._values[(first, stop, magnitude)] = PartSums(
                    [(c.units, c.linear, c.parts) for c in self.charges[first:stop]],
                    lambda part: self._position[part.param],
                    magnitude,
                )
            found.append([v.to(self.device) for v in sums(full)])
        return found[0], found[1]

    def angle_stats(self, sharded: bool) -> Tensor:
        r"""The unread steps' :math:`\|x\|^2, \langle x, d\rangle, \|d\|^2` per scale charge,
        ``(steps, scale charges, 3)``, in order, summed over ranks (a collective when sharded),
        after the ones restored by :meth:`restore`; nothing is cleared."""
        count, capacity = self._angle_count, len(self._ring)
        # the oldest kept step is at count % capacity once the ring has wrapped
        ring = self._ring[:count] if count <= capacity else self._ring.roll(-(count % capacity), 0)
        stats = ring[:, :-1].clone()  # the dump row dropped
        if sharded and len(self._scale):
            _dtensor.all_reduce_sum(stats)
        if self._angle_offset is not None:
            stats = torch.cat([self._angle_offset.to(stats.device), stats])
        return stats[-capacity:] if capacity else stats

    def angles(self, sharded: bool) -> Tensor:
        """Per step since the last call, at most the last ``angle_steps``, in order: the angle
        between :math:`x_t` and :math:`x_{t+1}` of every scale charge (all its units together),
        ``(steps, scale charges)``; the buffer is cleared. Skipped steps are NaN."""
        stats = self.angle_stats(sharded)
        self._angle_count, self._angle_offset = 0, None
        xx, xd, dd = stats.unbind(-1)
        cross = (xx * dd - xd * xd).clamp_min(0.0).sqrt()
        return torch.atan2(cross, xx + xd).cpu()

    def check_angle_stats(self, stats: Tensor) -> None:
        """Raise ``ValueError`` unless ``stats`` is ``(steps, scale charges, 3)``."""
        if stats.dim() != 3 or tuple(stats.shape[1:]) != (len(self._scale), 3):
            raise ValueError(
                f"the saved angle statistics have shape {tuple(stats.shape)}, expected (steps,"
                f" {len(self._scale)}, 3) for the {len(self._scale)} scale charges"
            )

    def split(self, sums: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(unit_sums, charge_sums)``: a list over all charges (:meth:`reduced`) as the
        hidden layers' per-unit balances and the symmetries' charges."""
        return list(sums[: self.n_units]), list(sums[self.n_units :])

    def restore(
        self,
        unit_sums: Sequence[Tensor],
        charge_sums: Sequence[Tensor],
        sharded: bool,
        angle_stats: Tensor | None = None,
    ) -> None:
        """Continue from saved totals (:meth:`split` of :meth:`reduced`): per hidden layer and
        per symmetry, ``(units, terms)``; and from the unread steps' angle statistics
        (:meth:`angle_stats`) where saved.

        Raises:
            ValueError: a list has another length, or a total another shape, than the book's
                charges; the angle statistics are not ``(steps, scale charges, 3)``. Nothing is
                changed then.
        """
        saved = _checked("unit_sums", unit_sums, self.charges[: self.n_units])
        saved += _checked("charge_sums", charge_sums, self.charges[self.n_units :])
        if angle_stats is not None:
            self.check_angle_stats(angle_stats)
        self._angle_count, self._angle_offset = 0, angle_stats
        if sharded:  # the saved totals are added once, after the sum over ranks
            self.offset = saved
            self._flat.zero_()
        else:  # continue the same sums in the same order
            self.offset = [torch.zeros_like(t) for t in saved]
            for t, v in zip(self.sums, saved, strict=True):
                t.copy_(v)


def _checked(what: str, saved: Sequence[Tensor], charges: Sequence[Charge]) -> list[Tensor]:
    """``saved``, after checking that it holds one ``(units, terms)`` total per charge."""
    if len(saved) != len(charges):
        raise ValueError(
            f"`{what}`: {len(saved)} saved totals for the {len(charges)} charges"
            f" {[c.name for c in charges]}"
        )
    for k, (t, c) in enumerate(zip(saved, charges, strict=True)):
        if tuple(t.shape) != (c.units, len(LEDGER_TERMS)):
            raise ValueError(
                f"`{what}[{k}]` ({c.name!r}) has shape {tuple(t.shape)}, expected"
                f" {(c.units, len(LEDGER_TERMS))}"
            )
    return list(saved)


def _map_run(run: list[Tensor], coef: Tensor) -> Tensor:
    """Reductions ``(rows, e)`` of groups sharing ``coef`` ``(e, 9)``, mapped to the terms and
    angle statistics (float64)."""
    x = run[0] if len(run) == 1 else torch.cat(run)
    # transposed, (9, e) @ (e, rows): 2.4x faster than (rows, e) @ (e, 9) on the CPU for
    # thousands of rows (64 against 153 us for the 12-block ViT's 5,856); a transposed view
    return torch.mm(coef.T, x.to(torch.float64).T).T


def _slot(row: Row, k: int, acc: torch.dtype, inv_scale: Tensor | None) -> Tensor:
    """Slot ``k`` of ``row`` as a real tensor of the accumulation dtype (the gradient unscaled)."""
    t = cast(Tensor, row.slots[k])
    t = torch.view_as_real(t) if t.is_complex() else t
    t = t.to(acc)
    if k == GRAD_SLOT and inv_scale is not None:
        t = t * inv_scale.to(t.device, acc)
    return t
