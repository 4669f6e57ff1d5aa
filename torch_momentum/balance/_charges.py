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

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from torch_momentum.balance import _dtensor
from torch_momentum.balance._gram import GRAD_SLOT, Row, acc_dtype
from torch_momentum.balance._parts import part_values, unit_view
from torch_momentum.balance.rules import GRAM_ENTRIES, LEDGER_TERMS

_ENTRY_A = [a for a, _ in GRAM_ENTRIES]
_ENTRY_B = [b for _, b in GRAM_ENTRIES]
# positions in GRAM_ENTRIES of <x,x>, <x,dx>, <dx,dx>, <x,e>, <dx,e>, <e,e>
_XX, _XDX, _DXDX, _XE, _DXE, _EE = 0, 4, 5, 6, 7, 8


class Part(NamedTuple):
    """A :class:`SymmetryPart` of tracked tensor ``tracked`` (the ledger's index).

    ``dim`` None: the whole tensor is unit ``unit_offset``. Otherwise the indices
    ``[start, start + length)`` along ``dim``, in blocks of ``block`` consecutive indices: block
    ``u`` (all other dimensions summed) is unit ``unit_offset + u``. ``sign``: +1 or -1.
    """

    tracked: int
    dim: int | None
    start: int
    length: int
    block: int
    sign: float
    unit_offset: int

    @property
    def units(self) -> int:
        """The number of units of this part."""
        return 1 if self.dim is None else self.length // self.block


class Charge(NamedTuple):
    """A per-unit charge: ``kind`` is ``"units"`` (a hidden layer's per-unit balance),
    ``"scale"``, ``"rescale"``, ``"translation"`` or ``"zero_gradient"``."""

    name: str
    kind: str
    units: int
    parts: list[Part]

    @property
    def linear(self) -> bool:
        """Whether the charge is linear (translation, zero gradient) rather than quadratic."""
        return self.kind not in ("units", "scale", "rescale")


def localize(part: Part, p: Any, name: str) -> Part | None:
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
    return part._replace(length=count, unit_offset=part.unit_offset + first // part.block)


class ChargeBook:
    """The per-unit sums of every charge's ledger terms, accumulated on the device.

    Args:
        charges: the charges (global parts).
        tracked: the tracked tensors (parameters), indexed by the parts.
        names: a name per tracked tensor, for error messages.
        weights: per tracked tensor, the weight of this rank's shard in sums over ranks.
        device: where the sums live.
    """

    def __init__(
        self,
        charges: Sequence[Charge],
        tracked: Sequence[Tensor],
        names: Sequence[str],
        weights: Sequence[float],
        device: torch.device,
    ) -> None:
        self.charges = list(charges)
        self.device = device
        self._weights = list(weights)
        self._local: list[list[Part]] = []
        for charge in self.charges:
            parts = [localize(p, tracked[p.tracked], names[p.tracked]) for p in charge.parts]
            self._local.append([p for p in parts if p is not None])
        self.needs = {p.tracked for parts in self._local for p in parts}
        n_terms = len(LEDGER_TERMS)
        self.sums = [
            torch.zeros(c.units, n_terms, dtype=torch.float64, device=device) for c in charges
        ]
        self.offset = [torch.zeros_like(t) for t in self.sums]
        self._scale = [k for k, c in enumerate(self.charges) if c.kind == "scale"]
        self._angles: list[Tensor] = []  # per step: (scale charges, 3) = |x|^2, <x, d>, |d|^2

    def zero(self) -> None:
        for t in (*self.sums, *self.offset):
            t.zero_()
        self._angles = []

    def accumulate(
        self, rows: dict[int, Row], inv_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        """Add one step's terms (``rows``: the step's rows by tracked tensor)."""
        stacks: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        angle = torch.zeros(len(self._scale), 3, dtype=torch.float64, device=self.device)
        for k, (charge, parts) in enumerate(zip(self.charges, self._local, strict=True)):
            for part in parts:
                row = rows.get(part.tracked)
                if row is None:
                    continue
                if part.tracked not in stacks:
                    stacks[part.tracked] = _stack(row, inv_scale)
                m, cmap, terms, linear = stacks[part.tracked]
                v = unit_view(m, part)  # (units, slots, rest)
                weight = part.sign * self._weights[part.tracked]
                if charge.linear:
                    canon = v.sum(-1).to(torch.float64) @ cmap.T  # (units, 5)
                    value = weight * (canon @ linear.T)
                else:
                    gram = (v @ v.transpose(1, 2)).to(torch.float64)
                    entries = (cmap @ gram @ cmap.T)[:, _ENTRY_A, _ENTRY_B]  # (units, 9)
                    value = weight * (entries @ terms.T)
                    if charge.kind == "scale":
                        angle[self._scale.index(k)] += weight * _angle_stats(entries)
                if found_inf is not None:  # a step the optimiser skipped: nothing happened
                    value = torch.where(found_inf.to(value.device) > 0, 0.0, value)
                first = part.unit_offset
                self.sums[k][first : first + part.units] += value.to(self.device)
        if self._scale:
            if found_inf is not None:
                angle = torch.where(found_inf.to(angle.device) > 0, math.nan, angle)
            self._angles.append(angle)

    def reduced(self, sharded: bool) -> list[Tensor]:
        """The sums over all ranks plus the restored offsets (one all_reduce when sharded)."""
        sums = self.sums
        if sharded and sums:
            flat = _dtensor.all_reduce_sum(torch.cat([t.reshape(-1) for t in sums]))
            sums = [t.reshape(-1, len(LEDGER_TERMS)) for t in flat.split([t.numel() for t in sums])]
        return [off + t for off, t in zip(self.offset, sums, strict=True)]

    def values(
        self, iterate: Callable[[int], Tensor], first: int = 0, stop: int | None = None
    ) -> list[Tensor]:
        """Charges ``first..stop`` now, from the full iterate of every tensor (a gather when
        sharded)."""
        out = []
        for charge in self.charges[first:stop]:
            total = torch.zeros(charge.units, dtype=torch.float64, device=self.device)
            for part in charge.parts:
                value = part.sign * part_values(iterate(part.tracked), part, charge.linear)
                first = part.unit_offset
                total[first : first + part.units] += value.to(self.device)
            out.append(total)
        return out

    def angles(self, sharded: bool) -> Tensor:
        """Per step since the last call, the angle between :math:`x_t` and :math:`x_{t+1}` of
        every scale charge (all its units together), ``(steps, scale charges)``; the buffer is
        cleared. Skipped steps are left out (NaN)."""
        if not self._angles:
            return torch.zeros(0, len(self._scale), dtype=torch.float64)
        stats = torch.stack(self._angles)  # (steps, charges, 3)
        self._angles = []
        if sharded:
            _dtensor.all_reduce_sum(stats)
        xx, xd, dd = stats.unbind(-1)
        cross = (xx * dd - xd * xd).clamp_min(0.0).sqrt()
        return torch.atan2(cross, xx + xd).cpu()

    def restore(self, saved: list[Tensor], sharded: bool) -> None:
        """Continue from saved totals (per charge ``(units, terms)``)."""
        if sharded:  # the saved totals are added once, after the sum over ranks
            self.offset = saved
            self.sums = [torch.zeros_like(t) for t in saved]
        else:  # continue the same sums in the same order
            self.offset = [torch.zeros_like(t) for t in saved]
            self.sums = saved


def _angle_stats(entries: Tensor) -> Tensor:
    """``(|x|^2, <x, d>, |d|^2)`` summed over units, ``d = dx + e`` the applied update."""
    e = entries.sum(0)
    xd = e[_XDX] + e[_XE]
    dd = e[_DXDX] + 2.0 * e[_DXE] + e[_EE]
    return torch.stack([e[_XX], xd, dd])


def _stack(row: Row, inv_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The row's present slots stacked ``(r, *shape[, 2])`` in the accumulation dtype (the
    gradient unscaled), the slot map restricted to them, and the term coefficients."""
    present = [k for k, t in enumerate(row.slots) if t is not None]
    first = row.slots[present[0]]
    assert first is not None
    acc = acc_dtype(first)
    tensors = []
    for k in present:
        t = row.slots[k]
        assert t is not None
        t = t.detach()
        if t.is_sparse:
            t = t.to_dense()
        t = torch.view_as_real(t) if t.is_complex() else t
        t = t.to(acc)
        if k == GRAD_SLOT and inv_scale is not None:
            t = t * inv_scale.to(t.device, acc)
        tensors.append(t)
    m = torch.stack(tensors)
    cmap = row.slot_map()[:, present].to(m.device)
    terms = torch.tensor(row.maps.terms, dtype=torch.float64, device=m.device)
    linear = torch.tensor(row.maps.linear, dtype=torch.float64, device=m.device)
    return m, cmap, terms, linear
