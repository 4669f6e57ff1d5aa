r"""A step's per-row reductions from one buffer: one copy, then one product per row length.

Every step the ledger reduces the three slots :math:`(x, v, g)` of each tracked tensor to the
:math:`3 \times 3` Gram matrix of every *row* (the entries of one unit of one tensor: an output
channel, a column, a whole vector) and, for linear charges, to the slots' sums over the row.
Group by group (:func:`~torch_momentum.balance._parts.row_reducer`: a stack of equally shaped
tensors and a batched product each), a small model costs tens of kernels a step, mostly their
dispatch. :class:`FlatRows` does the same reductions with a few:

* one multi-tensor copy puts the slots of every tensor into a persistent buffer ``P`` of shape
  ``(3, N)``, the tensors ordered by the length of their rows along dim 0, so that all rows of
  one length are one contiguous range of ``P``'s columns;
* their Gram matrices are one strided batched matrix product per length,
  :math:`G_r = P_r P_r^\top` with :math:`P_r` the ``(3, length)`` block of row ``r`` (an
  elementwise outer product for rows of one entry), written in place into a persistent output;
* rows along a later dimension (a matrix's columns, a convolution's input channels) are gathered
  by one ``index_select`` per row length into a persistent buffer first;
* the sums :math:`\sum_i P_{a,r,i}` of the rows that linear charges read are one reduction per
  length, accumulated in float64.

All views are made once, when the layout is planned; a step then runs one copy and one to three
kernels per row length. The products run in the tensors' dtype, as the stacked path does.

Private module: the names here are shared by the ledger's modules, not user API.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

#: The most entries (all three slots together) that :class:`FlatRows` copies into its buffer: a
#: larger model's reductions are bound by memory traffic, not by dispatch, and take the stacked
#: path, which reduces a block at a time in cache.
FLAT_CAP = 1 << 21


class _Op(NamedTuple):
    """The reductions of the rows of one length (see :class:`FlatRows`)."""

    columns: Tensor | None  # gathered rows: the columns of ``P`` they read, row after row
    gathered: Tensor | None  # their persistent buffer (3, rows * length)
    rows: Tensor  # (rows, 3, length), a view of ``P`` or of ``gathered``
    rows_t: Tensor  # its transpose (rows, length, 3)
    outer: bool  # rows of one entry: an elementwise outer product instead of a matrix product
    out: Tensor  # (rows, 3, 3) Gram matrices or (rows, 3) sums: a view of the output


class RowIndex:
    """Where each tensor's rows lie in a step's outputs (:class:`FlatRows`, and the C kernel's
    ``_native.NativeRows``): the rows of tensor ``k`` along ``dim`` are :meth:`count`
    consecutive rows of the Gram matrices from :meth:`first`, or of the sums from
    :meth:`first_sum`."""

    def __init__(self) -> None:
        self._first: dict[tuple[int, int, bool], int] = {}
        self._count: dict[tuple[int, int], int] = {}

    def place(self, k: int, dim: int, linear: bool, first: int, count: int) -> None:
        """Record that tensor ``k``'s ``count`` rows along ``dim`` start at row ``first`` of the
        sums (``linear``) or of the Gram matrices."""
        self._first[(k, dim, linear)] = first
        self._count[(k, dim)] = count

    def first(self, k: int, dim: int) -> int:
        """The first of tensor ``k``'s Gram rows along ``dim`` (a use not marked linear)."""
        return self._first[(k, dim, False)]

    def first_sum(self, k: int, dim: int) -> int:
        """The first of tensor ``k``'s rows along ``dim`` in :attr:`sums` (a use marked
        linear)."""
        return self._first[(k, dim, True)]

    def count(self, k: int, dim: int) -> int:
        """How many rows tensor ``k`` has along ``dim``."""
        return self._count[(k, dim)]


class FlatRows(RowIndex):
    """The per-row Gram matrices and sums of the slots of many tensors, computed together.

    Args:
        shapes: per tensor ``k``, its shape (every tensor non-empty).
        uses: ``(k, dim, linear)`` for every way a tensor is read: its rows along ``dim`` (0: the
            leading dimension, whose rows also make up the whole tensor; a later ``dim``: the
            slices at each of its indices), as Gram matrices (``linear`` False) or as sums.
        dtype: the slots' dtype (float32 or float64).
        device: where the slots live.

    After a call, :attr:`gram` ``(rows, 3, 3)`` holds the Gram matrix of every row read as such
    (in the slots' dtype) and :attr:`sums` ``(rows, 3)`` the sums of every row read as such
    (float64). Tensor ``k``'s rows along ``dim`` are the :meth:`count` consecutive rows of
    :attr:`gram` from :meth:`first`, and of :attr:`sums` from :meth:`first_sum`.

    Example:
        >>> import torch
        >>> from torch_momentum.balance._flat import FlatRows
        >>> a, b = torch.ones(2, 3), torch.arange(4.0)
        >>> flat = FlatRows([(2, 3), (4,)], [(0, 1, False), (1, 0, True)], torch.float32, "cpu")
        >>> flat([a, b, 2 * a, b, a, b])
        True
        >>> flat.gram[flat.first(0, 1) : flat.first(0, 1) + 3, 0, 1]  # <a, 2a> per column
        tensor([4., 4., 4.])
        >>> flat.sums[flat.first_sum(1, 0) : flat.first_sum(1, 0) + 4, 0]  # b: one entry a row
        tensor([0., 1., 2., 3.], dtype=torch.float64)
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        uses: Iterable[tuple[int, int, bool]],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        numel = [math.prod(s) for s in self.shapes]
        if not all(numel):
            raise ValueError(f"`shapes`: every tensor must be non-empty, got {shapes}")
        uses = list(uses)
        lead = [s[0] if len(s) else 1 for s in self.shapes]
        rows0 = {k for k, d, linear in uses if d == 0 and not linear}
        # the tensors whose rows along dim 0 are Gram rows first, by row length: each length's
        # rows are one range of P's columns
        order = sorted(range(len(numel)), key=lambda k: (k not in rows0, numel[k] // lead[k]))
        starts = itertools.accumulate((numel[k] for k in order), initial=0)
        offset = dict(zip(order, starts, strict=False))
        #: the slots' buffer ``P``
        self.buffer = torch.zeros(3, sum(numel), dtype=dtype, device=device)
        self._targets = [
            self.buffer[a, offset[k] : offset[k] + numel[k]].view(self.shapes[k])
            for a in range(3)
            for k in range(len(numel))
        ]
        self._offset = offset
        super().__init__()
        spans = [(*span, False) for span in self._leading_spans([k for k in order if k in rows0])]
        later = {(k, d) for k, d, linear in uses if d > 0 and not linear}
        spans += self._gathered(later, False, sum(n for _, n, _, _, _ in spans), device)
        summed = {(k, d) for k, d, linear in uses if linear}
        spans += self._gathered(summed, True, 0, device)
        #: ``(rows, 3, 3)``: the Gram matrix of every row read as one
        self.gram = torch.zeros(
            sum(n for _, n, _, _, lin in spans if not lin), 3, 3, dtype=dtype, device=device
        )
        #: ``(rows, 3)``: the slots' sums of every row read as such (float64)
        self.sums = torch.zeros(
            sum(n for _, n, _, _, lin in spans if lin), 3, dtype=torch.float64, device=device
        )
        self._ops = [self._op(*span) for span in spans]

    def _leading_spans(self, order: list[int]) -> list[tuple[int, int, int | Tensor, int]]:
        """``(first row, rows, first column of P, length)`` per run of ``order`` whose rows along
        dim 0 have one length (consecutive in ``P``)."""
        spans: list[tuple[int, int, int | Tensor, int]] = []
        rows = 0
        for length, run in _runs(order, [math.prod(s[1:]) for s in self.shapes]):
            for k in run:
                first = rows + (self._offset[k] - self._offset[run[0]]) // length
                self.place(k, 0, False, first, self.shapes[k][0] if self.shapes[k] else 1)
            count = sum(math.prod(self.shapes[k]) for k in run) // length
            spans.append((rows, count, self._offset[run[0]], length))
            rows += count
        return spans

    def _gathered(
        self, pairs: set[tuple[int, int]], linear: bool, rows: int, device: torch.device | str
    ) -> list[tuple[int, int, int | Tensor, int, bool]]:
        """``(first row, rows, gathered columns of P, length, linear)`` per row length of the
        ``(tensor, dim)`` ``pairs``, their rows numbered from ``rows``."""
        by_length: dict[int, list[tuple[int, int, Tensor]]] = {}
        for k, d in sorted(pairs):
            shape = self.shapes[k] or torch.Size([1])  # a 0-dim tensor: one row of one entry
            n = shape[d]
            idx = torch.arange(math.prod(shape)).view(shape).movedim(d, 0).reshape(n, -1)
            by_length.setdefault(idx.shape[1], []).append((k, d, idx + self._offset[k]))
        spans: list[tuple[int, int, int | Tensor, int, bool]] = []
        for length, items in by_length.items():
            first = rows
            for k, d, idx in items:
                self.place(k, d, linear, rows, idx.shape[0])
                rows += idx.shape[0]
            index = torch.cat([idx.reshape(-1) for _, _, idx in items]).to(device, torch.int32)
            spans.append((first, rows - first, index, length, linear))
        return spans

    def _op(self, first: int, count: int, where: int | Tensor, length: int, linear: bool) -> _Op:
        """The views and buffers of one span's reductions."""
        columns = gathered = None
        if isinstance(where, Tensor):
            columns = where
            gathered = self.buffer.new_zeros(3, count * length)
            block = gathered
        else:
            block = self.buffer[:, where : where + count * length]
        rows = block.view(3, count, length).transpose(0, 1)
        out = (self.sums if linear else self.gram)[first : first + count]
        return _Op(columns, gathered, rows, rows.transpose(1, 2), length == 1, out)

    def __call__(self, slots: Sequence[Tensor]) -> bool:
        """Reduce the step's slots: ``x`` of every tensor in order, then ``v``, then ``g``.

        Returns False, computing nothing, where a slot no longer has the planned dtype or shape
        (the caller plans again).
        """
        dtype = self.buffer.dtype
        for t, target in zip(slots, self._targets, strict=True):
            if t.dtype is not dtype or t.shape != target.shape:
                return False
        torch._foreach_copy_(self._targets, list(slots))
        buffer = self.buffer
        for op in self._ops:
            if op.columns is not None:
                torch.index_select(buffer, 1, op.columns, out=op.gathered)
            if op.out.dim() == 2:  # sums
                torch.sum(op.rows, -1, dtype=torch.float64, out=op.out)
            elif op.outer:
                torch.mul(op.rows, op.rows_t, out=op.out)
            else:
                torch.bmm(op.rows, op.rows_t, out=op.out)
        return True


def _runs(order: list[int], length: list[int]) -> list[tuple[int, list[int]]]:
    """``order`` cut into runs of tensors whose rows have one length: ``(length, run)``."""
    runs: list[tuple[int, list[int]]] = []
    for k in order:
        if runs and runs[-1][0] == length[k]:
            runs[-1][1].append(k)
        else:
            runs.append((length[k], [k]))
    return runs
