r"""Which entries of a parameter form which unit of a charge, and per-unit sums over them.

Private module: :class:`SymmetryPart` is public through :mod:`torch_momentum.balance`; the
functions are shared by the symmetry, unit and ledger modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from torch_momentum.balance import _dtensor


@dataclass(frozen=True)
class SymmetryPart:
    """Which entries of one parameter belong to which unit of a :class:`Symmetry`.

    Take parameter ``param``. If ``dim`` is None the whole tensor is one unit, index
    ``unit_offset``. Otherwise narrow it along ``dim`` to ``[start, start + length)`` and view that
    axis as ``(length // block, block)``: unit ``u`` of this part (``0 <= u < length // block``) is
    every entry whose index along ``dim`` falls in block ``u`` (all other dimensions included),
    and it is unit ``unit_offset + u`` of the symmetry. ``sign`` is ``+1`` for the A side and
    ``-1`` for the B side of a rescale (and of the ``bias_ih``/``bias_hh`` translation of a
    recurrent layer).

    Example:
        >>> import torch
        >>> from torch_momentum.balance import SymmetryPart
        >>> # the columns of a (3, 4) classifier, one unit per column
        >>> part = SymmetryPart("fc.weight", 1, 0, 4, 1, 1.0, 0)
        >>> part.units
        4
        >>> part.entries(torch.arange(12.0).reshape(3, 4)).sum(1)
        tensor([12., 15., 18., 21.])
    """

    param: str
    dim: int | None
    start: int
    length: int
    block: int
    sign: float
    unit_offset: int

    @property
    def units(self) -> int:
        """How many units this part contributes to."""
        return 1 if self.dim is None else self.length // self.block

    def entries(self, tensor: Tensor) -> Tensor:
        """The part's entries of ``tensor`` (shaped like the parameter) as ``(units, -1)``."""
        return unit_view(tensor.unsqueeze(0), self)[:, 0]


def unit_view(m: Tensor, part: Any) -> Tensor:
    """``m`` of shape ``(lead, *shape[, 2])`` as ``(units, lead, rest)`` for the part's units."""
    lead = m.shape[0]
    if part.dim is None:
        return m.reshape(1, lead, -1)
    d = part.dim + 1
    x = m.narrow(d, part.start, part.length).unflatten(d, (part.units, part.block))
    return x.movedim(d, 0).reshape(part.units, lead, -1)


def part_values(t: Tensor, part: Any, linear: bool, other: Tensor | None = None) -> Tensor:
    """Per-unit :math:`\\sum x^2` (:math:`\\sum x y` with ``other``; :math:`\\sum x` when
    ``linear``) over the part's entries, float64 (complex tensors as real vectors; a sharded
    tensor is gathered: a collective every rank joins)."""

    def units(x: Tensor) -> Tensor:
        x = _dtensor.full(x).detach()
        x = x.to_dense() if x.is_sparse else x
        x = torch.view_as_real(x) if x.is_complex() else x
        return unit_view(x.unsqueeze(0), part)[:, 0]  # (units, rest)

    v = units(t)
    if linear:
        return v.sum(1, dtype=torch.float64)
    if other is not None:
        return (v.to(torch.float64) * units(other).to(torch.float64)).sum(1)
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64).square()


def signed_sum(
    parts: Iterable[Any],
    units: int,
    value: Callable[[Any], Tensor | None],
    signed: bool = True,
) -> Tensor:
    """``out[u] = sum over parts of sign * value(part)[u - unit_offset]`` (float64, ``units``
    long; without the signs when ``signed`` is False); ``None`` values count 0."""
    out = torch.zeros(units, dtype=torch.float64)
    for part in parts:
        v = value(part)
        if v is None:
            continue
        if out.device != v.device:
            out = out.to(v.device)
        out[part.unit_offset : part.unit_offset + part.units] += part.sign * v if signed else v
    return out


# ------------------------------------------------------------------------------------------------
# many parts at once: tensors of one layout are stacked and reduced together
# ------------------------------------------------------------------------------------------------

#: The longest row (elements) of a stacked view: a tensor reduced along dim 0 or as a whole has
#: its rows cut into sub-rows of at most this length where the size allows.
ROW_CAP = 1 << 15
#: Elements per stacked chunk: a larger group is stacked and reduced a block of rows at a time,
#: so that the temporary copy stays in cache (and small: fresh large allocations page-fault).
CHUNK_CAP = 1 << 18


class UnitGroup(NamedTuple):
    """Tensors of one layout reduced together along one dimension.

    ``members`` (the tensors' keys, in stacking order) share ``signature`` (whatever the
    caller's ``describe`` returns: shape, dtypes, device, ...) and have ``numel`` entries and
    ``n`` indices along ``dim`` (1 for ``dim`` None: the whole tensor), each cut into ``s`` rows.
    ``linear`` tells sums from sums of products.
    """

    signature: Any
    dim: int | None
    linear: bool
    n: int
    s: int
    numel: int
    members: list[Any]

    @property
    def rows(self) -> int:
        """Rows per member of the stacked view: ``n * s``."""
        return self.n * self.s


class UnitIndex(NamedTuple):
    """Where every unit of every charge takes its values from: the groups' per-row values,
    concatenated (group by group, each ``(rows, members)`` row-major), are summed into ``dst``
    (the units of all charges, one charge after another) from ``src`` times ``factor``."""

    groups: list[UnitGroup]
    src: Tensor
    dst: Tensor
    factor: Tensor


def row_split(shape: Sequence[int], dim: int | None) -> tuple[int, int]:
    """``(n, s)``: ``n`` indices along ``dim`` (1 for None), each cut into ``s`` rows of at most
    :data:`ROW_CAP` entries where ``dim`` is None or 0 (a divisor of the row length)."""
    numel = math.prod(shape)
    n = 1 if dim is None else shape[dim]
    if dim not in (None, 0) or n == 0 or numel // n <= ROW_CAP:
        return n, 1
    rest = numel // n
    return n, next(s for s in range(-(-rest // ROW_CAP), rest + 1) if rest % s == 0)


def part_units(part: Any, first: int) -> tuple[Tensor, Tensor]:
    """The part's indices along its ``dim`` (a whole-tensor part: index 0) and the unit each
    falls in, the part's charge numbering its units from ``first``."""
    if part.dim is None:
        j = torch.zeros(1, dtype=torch.long)
    else:
        j = torch.arange(part.start, part.start + part.length)
    return j, first + part.unit_offset + (j - part.start) // part.block


def index_units(
    charges: Sequence[tuple[int, bool, Sequence[Any]]],
    key: Callable[[Any], Any],
    describe: Callable[[Any], tuple[Any, Sequence[int]] | None],
    factor: Callable[[Any], float] = lambda part: part.sign,
    order: Callable[[UnitGroup], Any] | None = None,
) -> UnitIndex:
    """Group the parts of ``charges`` (``(units, linear, parts)`` each) by the layout of their
    tensors and index their units (the charges' units follow one another, ``units`` each: a
    charge whose parts hold only some of its units, e.g. one rank's shards, keeps its place).
    ``describe(key(part))`` gives ``(signature, shape)`` of the tensor, or ``None`` to leave
    the part out; tensors of one signature reduced along one dimension
    (sums or sums of products) form one group. ``order``: a sort key of the groups (default:
    first seen first)."""
    groups: dict[tuple[Any, int | None, bool], UnitGroup] = {}
    member_of: dict[tuple[Any, int | None, bool], dict[Any, int]] = {}
    entries = []  # (group key, member, part, first unit of its charge)
    base = 0
    for units, linear, parts in charges:
        for part in parts:
            found = describe(key(part))
            if found is None:
                continue
            signature, shape = found
            gkey = (signature, part.dim, linear)
            if gkey not in groups:
                n, s = row_split(shape, part.dim)
                groups[gkey] = UnitGroup(signature, part.dim, linear, n, s, math.prod(shape), [])
                member_of[gkey] = {}
            members = member_of[gkey]
            if key(part) not in members:
                members[key(part)] = len(members)
                groups[gkey].members.append(key(part))
            entries.append((gkey, members[key(part)], part, base))
        base += units
    if order is not None:
        groups = dict(sorted(groups.items(), key=lambda item: order(item[1])))
    offsets, start = {}, 0
    for gkey, group in groups.items():
        offsets[gkey] = start
        start += group.rows * len(group.members)
    src, dst, fac = [], [], []
    for gkey, member, part, first in entries:
        group = groups[gkey]
        j, unit = part_units(part, first)
        rows = (j[:, None] * group.s + torch.arange(group.s)).reshape(-1)
        src.append(offsets[gkey] + rows * len(group.members) + member)
        dst.append(unit.repeat_interleave(group.s))
        fac.append(torch.full((len(rows),), float(factor(part)), dtype=torch.float64))
    if not src:
        none = torch.zeros(0, dtype=torch.long)
        return UnitIndex([], none, none, torch.zeros(0, dtype=torch.float64))
    return UnitIndex(list(groups.values()), torch.cat(src), torch.cat(dst), torch.cat(fac))


def reduce_rows(tensors: Sequence[Tensor], group: UnitGroup, per_member: int, op: str) -> Tensor:
    """Per row of the group's view and per member, a reduction over the row's entries.

    ``tensors``: the members' tensors in order, ``per_member`` consecutive ones (slots) per
    member, each of the group's layout. ``op``: ``"gram"``, the products of the member's slots,
    ``(rows, members, per_member ** 2)`` in the tensors' dtype (one batched matrix product);
    ``"sum"``, ``"sumabs"`` or ``"sumsq"``, the sums, sums of absolute values or sums of
    squares of each slot, ``(rows, members,
    per_member)`` in float64. The tensors are stacked (one copy) in blocks of about
    :data:`CHUNK_CAP` entries, so that the copy stays small and in cache.
    """
    count = len(tensors)
    k = count // per_member
    d = group.dim
    if d is not None and d > 0:  # blocks along dim 0, summed
        shape = tensors[0].shape
        pre, n = math.prod(shape[:d]), shape[d]
        post = group.numel // (pre * n)
        if op == "gram" and count * group.numel <= CHUNK_CAP:
            x = torch.stack(list(tensors)).reshape(k, per_member, pre, n, post)
            if post >= 4:  # a convolution's kernel entries: dim to the front, one bmm
                return _reduce(x.permute(3, 0, 1, 2, 4), op)
            # a matrix's columns: the products of all slot pairs at once (moving dim to the
            # front would be a strided copy costlier than these products)
            g = (x.unsqueeze(2) * x.unsqueeze(1)).sum((3, 5))  # (k, r, r, n)
            return g.permute(3, 0, 1, 2).reshape(n, k, per_member * per_member)
        step = max(1, CHUNK_CAP // max(1, count * group.numel // pre))
        flat = list(tensors) if step >= pre else [t.flatten(0, d - 1) for t in tensors]
        out: Tensor | None = None
        for a in range(0, pre, step):
            views = flat if step >= pre else [t[a : a + step] for t in flat]
            x = torch.stack(views).reshape(k, per_member, -1, n, group.numel // (pre * n))
            x = _reduce(x.permute(3, 0, 1, 2, 4), op)
            out = x if out is None else out + x
        assert out is not None
        return out
    if d is None and group.s == 1:
        return _reduce(torch.stack(list(tensors)).reshape(1, k, per_member, -1), op)
    rows = group.rows
    views = list(tensors) if group.s == 1 else [t.reshape(rows, -1) for t in tensors]
    block = max(1, CHUNK_CAP * rows // max(1, count * group.numel))
    if block >= rows:
        return _reduce(torch.stack(views, 1).reshape(rows, k, per_member, -1), op)
    length = group.numel // rows  # entries per row
    blocks = []
    for a in range(0, rows, block):
        x = torch.stack([v[a : a + block] for v in views], 1)
        blocks.append(_reduce(x.reshape(-1, k, per_member, length), op))
    return torch.cat(blocks)


def row_reducer(group: UnitGroup, per_member: int, op: str) -> Callable[[list[Tensor]], Tensor]:
    """:func:`reduce_rows` for this group's layout as a function of the tensors, its result
    flattened to ``(rows * members, values)``. The common layouts (rows along dim 0 or the
    whole tensor, stacked in one block) are decided once: per call, one stack and one kernel."""
    count = len(group.members) * per_member
    rows, k = group.rows, len(group.members)
    e = per_member * per_member if op == "gram" else per_member
    one_block = group.s == 1 and count * group.numel <= CHUNK_CAP
    if group.dim not in (None, 0) or not one_block:
        return lambda tensors: reduce_rows(tensors, group, per_member, op).reshape(-1, e)
    axis, shape = (0 if group.dim is None else 1), (rows, k, per_member, -1)

    def reduce(tensors: list[Tensor]) -> Tensor:
        return _reduce(torch.stack(tensors, axis).reshape(shape), op).view(-1, e)

    return reduce


def _reduce(x: Tensor, op: str) -> Tensor:
    """``x`` ``(rows, members, slots, ...)`` reduced over the trailing dimensions, with the
    fewest kernels: the slots' products by one batched matrix product (outer products for one
    entry per row; a strided ``x``, permuted or channels_last, is copied first), or one sum."""
    rows, k, r = x.shape[:3]
    if op == "gram":
        y = x.reshape(rows * k, r, -1)
        g = y * y.transpose(1, 2) if y.shape[-1] == 1 else torch.bmm(y, y.transpose(1, 2))
        return g.view(rows, k, r * r)
    dims = tuple(range(3, x.dim()))
    if op == "sum":
        return x.sum(dims, dtype=torch.float64)
    if op == "sumabs":
        return x.abs().sum(dims, dtype=torch.float64)
    return torch.linalg.vector_norm(x, dim=dims, dtype=torch.float64).square()


class PartSums:
    """Per-unit values of many charges at one point, a group of tensors of one layout at a time.

    ``charges``: ``(units, linear, parts)`` each; ``key(part)`` names the part's tensor. Called
    with ``lookup(key) -> Tensor``, it gives per charge :math:`\\sum_{parts} sign \\sum_{unit}
    x^2` (:math:`\\sum x` for linear charges), float64 ``(units,)``: what :func:`part_values` and
    :func:`signed_sum` give part by part (up to the order of the float64 sums), in a few stacked
    reductions. A sharded tensor is gathered (a collective every rank joins).

    With ``magnitude``: :math:`\\sum_{parts} \\sum_{unit} x^2` and :math:`\\sum_{parts}
    \\sum_{unit} |x|`, signs dropped: the size of the numbers whose sum the charge is, the scale
    of its round-off (a charge that is zero, e.g. the sum of a zero-initialised class token,
    still has one).
    """

    def __init__(
        self,
        charges: Sequence[tuple[int, bool, Sequence[Any]]],
        key: Callable[[Any], Any],
        magnitude: bool = False,
    ) -> None:
        self.charges = [(units, linear, list(parts)) for units, linear, parts in charges]
        self.key = key
        self.magnitude = magnitude
        self.keys = list(dict.fromkeys(key(p) for _, _, parts in self.charges for p in parts))
        self.sizes = [units for units, _, _ in self.charges]
        self._index: UnitIndex | None = None
        self._layout: dict[Any, tuple[Any, tuple[int, ...]]] = {}

    def _plan(self, tensors: dict[Any, Tensor]) -> UnitIndex:
        layout = {k: ((t.shape, t.dtype, t.device), tuple(t.shape)) for k, t in tensors.items()}
        if self._index is None or layout != self._layout:
            index = index_units(
                self.charges,
                self.key,
                layout.get,
                (lambda part: abs(part.sign)) if self.magnitude else (lambda part: part.sign),
            )
            device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
            self._layout = layout
            self._index = index._replace(
                src=index.src.to(device), dst=index.dst.to(device), factor=index.factor.to(device)
            )
        return self._index

    def __call__(self, lookup: Callable[[Any], Tensor]) -> list[Tensor]:
        tensors = {}
        for k in self.keys:
            t = _dtensor.full(lookup(k)).detach()
            t = t.to_dense() if t.is_sparse else t
            tensors[k] = torch.view_as_real(t) if t.is_complex() else t
        index = self._plan(tensors)
        if not index.groups:
            return [torch.zeros(n, dtype=torch.float64) for n in self.sizes]
        linear_op = "sumabs" if self.magnitude else "sum"
        values = torch.cat(
            [
                reduce_rows(
                    [tensors[k] for k in group.members],
                    group,
                    1,
                    linear_op if group.linear else "sumsq",
                ).reshape(-1)
                for group in index.groups
            ]
        )
        out = torch.zeros(sum(self.sizes), dtype=torch.float64, device=values.device)
        out.index_add_(0, index.dst, values.index_select(0, index.src) * index.factor)
        return list(out.split(self.sizes))
