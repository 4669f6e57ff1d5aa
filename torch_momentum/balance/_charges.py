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
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from torch_momentum.balance import _dtensor
from torch_momentum.balance._gram import GRAD_SLOT, Row, acc_dtype
from torch_momentum.balance._parts import (
    PartSums,
    SymmetryPart,
    UnitIndex,
    index_units,
    row_reducer,
)
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
    add up over ranks); a shard along the part's dimension holds a range of units, which must
    be whole blocks of a part covering the whole dimension.

    Raises:
        ValueError: ``p`` sharded along the part's dimension otherwise.
    """
    if part.dim is None or not _dtensor.sharded_along(p, part.dim):
        return part
    size = p.shape[part.dim]
    first, count = _dtensor.shard_range(p, part.dim, size)
    if part.start != 0 or part.length != size or first % part.block or count % part.block:
        raise ValueError(
            f"per-unit ledger terms need {name!r} (shape {tuple(p.shape)}) unsharded along"
            f" dim {part.dim}, or sharded in whole units; got placements {p.placements}"
        )
    if count == 0:
        return None
    return dataclasses.replace(
        part, length=count, unit_offset=part.unit_offset + first // part.block
    )


class _Layout(NamedTuple):
    """The cached layout of a step's charge rows (see :meth:`ChargeBook.accumulate`)."""

    units: UnitIndex
    present: list[tuple[int, ...]]  # per group: the slots its members have
    dtype: list[torch.dtype]  # per group: the dtype of its slots (stacked as they are)
    acc: list[torch.dtype]  # per group: the accumulation dtype
    convert: list[bool]  # per group: converted to the accumulation dtype before stacking
    complex: list[bool]  # per group: complex tensors, read as real
    angle_dst: Tensor  # per entry of the index: its scale charge's position (or a dump row)
    reducers: list[Callable[[list[Tensor]], Tensor]]  # per group: its rows' reductions


class ChargeBook:
    """The per-unit sums of every charge's ledger terms, accumulated on the device.

    Each step's terms are linear in the per-unit Gram matrices (quadratic charges) or sums
    (linear charges) of each tensor's slots. Tensors of one layout are stacked and reduced
    together (:func:`~torch_momentum.balance._parts.reduce_rows`: one copy, one batched
    matrix product per block of rows), the per-index values are mapped to the terms by the
    coefficients of each tensor's rule, and one ``index_add_`` sums them into the units: a
    few kernels per group of equally shaped tensors, not per part.

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
        self._angle_offset: Tensor | None = None  # restored unread steps, summed over ranks
        self._layouts: dict[Any, _Layout] = {}
        self._coefs: dict[tuple[Any, ...], tuple[Any, Tensor]] = {}
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
        values = None if cached is None else self._step_values(cached, rows, inv_scale)
        if cached is None or values is None:  # a new layout (or the dtypes changed under it)
            if len(self._layouts) > 16:
                self._layouts.clear()
            cached = self._layouts[key] = self._layout(rows)
            values = self._step_values(cached, rows, inv_scale)
            assert values is not None
        layout = cached
        index = layout.units
        terms = values.index_select(0, index.src) * index.factor[:, None]  # (entries, 9)
        if found_inf is not None:  # a step the optimiser skipped: nothing happened
            terms = torch.where(found_inf.to(terms.device) > 0, 0.0, terms)
        n_terms = len(LEDGER_TERMS)
        self._flat.index_add_(0, index.dst, terms[:, :n_terms])
        if self._scale:
            angle = self._ring[self._angle_count % len(self._ring)]
            angle.zero_().index_add_(0, layout.angle_dst, terms[:, n_terms:])
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
        # the scale charge of every entry (len(self._scale): not a scale charge)
        charge_of_unit = torch.repeat_interleave(
            torch.arange(len(self.charges)), torch.tensor(self.sizes, dtype=torch.long)
        )
        scale_pos = torch.full((len(self.charges) + 1,), len(self._scale), dtype=torch.long)
        scale_pos[self._scale] = torch.arange(len(self._scale))
        angle_dst = scale_pos[charge_of_unit[index.dst]] if len(index.dst) else index.dst
        device = self.device
        return _Layout(
            index._replace(
                src=index.src.to(device), dst=index.dst.to(device), factor=index.factor.to(device)
            ),
            present,
            dtype,
            acc,
            convert,
            cplx,
            angle_dst.to(device),
            [
                row_reducer(group, len(present[g]), "sum" if group.linear else "gram")
                for g, group in enumerate(index.groups)
            ],
        )

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
        for g, group in enumerate(layout.units.groups):
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
            return pieces[0].to(self.device)
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
        self,
        iterate: Callable[[int], Tensor],
        first: int = 0,
        stop: int | None = None,
        magnitude: bool = False,
    ) -> list[Tensor]:
        """Charges ``first..stop`` now, from the full iterate of every tensor (a gather when
        sharded); with ``magnitude`` their magnitudes instead (see :class:`PartSums`)."""
        sums = self._values.get((first, stop, magnitude))
        if sums is None:
            sums = self._values[(first, stop, magnitude)] = PartSums(
                [(c.units, c.linear, c.parts) for c in self.charges[first:stop]],
                lambda part: self._position[part.param],
                magnitude,
            )
        return [v.to(self.device) for v in sums(iterate)]

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
    return x.to(torch.float64) @ coef


def _slot(row: Row, k: int, acc: torch.dtype, inv_scale: Tensor | None) -> Tensor:
    """Slot ``k`` of ``row`` as a real tensor of the accumulation dtype (the gradient unscaled)."""
    t = cast(Tensor, row.slots[k])
    t = torch.view_as_real(t) if t.is_complex() else t
    t = t.to(acc)
    if k == GRAD_SLOT and inv_scale is not None:
        t = t * inv_scale.to(t.device, acc)
    return t
