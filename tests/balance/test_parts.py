"""The stacked per-unit reductions of the ledger's charges (``_parts.reduce_rows`` and its
per-layout specialisation ``row_reducer``) against a plain loop, on every branch: whole tensors,
rows along dim 0 (one entry per row too), and units along a later dimension of a matrix
(columns) and of a convolution (input channels, whose kernel entries take a batched matrix
product), small enough for one block and large enough for several."""

from __future__ import annotations

import math

import pytest
import torch

from torch_momentum.balance._parts import (
    CHUNK_CAP,
    UnitGroup,
    reduce_rows,
    row_reducer,
    row_split,
)

SHAPES = [
    ((10, 32), None),  # a whole tensor: one unit
    ((16, 16, 3, 3), 0),  # a convolution's output channels
    ((16,), 0),  # a norm layer's gain: one entry per row
    ((10, 32), 1),  # a matrix's columns
    ((32, 16, 3, 3), 1),  # a convolution's input channels (kernel entries: the bmm branch)
    ((16, 8, 2, 2), 1),
    ((64, 64, 1, 1), 1),  # a 1x1 convolution: one entry per kernel
    ((512, 256, 3, 3), 1),  # larger than one block (CHUNK_CAP)
]


def _reference(tensors: list[torch.Tensor], dim: int | None, r: int) -> torch.Tensor:
    """``(n, members, r * r)``: per index along ``dim`` and member, the Gram matrix of the
    member's ``r`` slots, in float64, one row at a time."""
    rows = [
        t.reshape(1, -1) if dim is None else t.movedim(dim, 0).reshape(t.shape[dim], -1)
        for t in tensors
    ]
    n, k = rows[0].shape[0], len(tensors) // r
    out = torch.zeros(n, k, r * r, dtype=torch.float64)
    for m in range(k):
        slots = [rows[m * r + a].double() for a in range(r)]
        for a in range(r):
            for b in range(r):
                out[:, m, a * r + b] = (slots[a] * slots[b]).sum(1)
    return out


@pytest.mark.parametrize(("shape", "dim"), SHAPES)
@pytest.mark.parametrize("members", [1, 2])
def test_gram_rows_equal_a_loop(shape: tuple[int, ...], dim: int | None, members: int) -> None:
    torch.manual_seed(0)
    r = 3
    tensors = [torch.randn(shape, dtype=torch.float64) for _ in range(members * r)]
    n, s = row_split(shape, dim)
    assert s == 1  # rows not cut into sub-rows at these sizes
    group = UnitGroup(None, dim, False, n, s, math.prod(shape), list(range(members)))
    if shape == (512, 256, 3, 3):
        assert members * r * group.numel > CHUNK_CAP  # the blocked branch
    got = reduce_rows(tensors, group, r, "gram")
    # float64 sums of at most 4608 products of O(1) entries in another order: ~1e-13 absolute
    torch.testing.assert_close(
        got.reshape(n, members, r * r), _reference(tensors, dim, r), rtol=1e-12, atol=1e-11
    )


@pytest.mark.parametrize(("shape", "dim"), SHAPES)
@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("op", ["gram", "sum"])
def test_row_reducer_equals_a_loop(
    shape: tuple[int, ...], dim: int | None, members: int, op: str
) -> None:
    # the specialised layouts (whole tensor, rows along dim 0) and the fallback to reduce_rows
    # give the same per-row values, flattened to (rows * members, values)
    torch.manual_seed(0)
    r = 3
    tensors = [torch.randn(shape, dtype=torch.float64) for _ in range(members * r)]
    n, s = row_split(shape, dim)
    group = UnitGroup(None, dim, op == "sum", n, s, math.prod(shape), list(range(members)))
    got = row_reducer(group, r, op)(tensors)
    if op == "gram":
        want = _reference(tensors, dim, r).reshape(n * members, r * r)
    else:
        rows = [
            t.reshape(1, -1) if dim is None else t.movedim(dim, 0).reshape(t.shape[dim], -1)
            for t in tensors
        ]
        want = torch.stack([row.sum(1) for row in rows], 1).reshape(n * members, r)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)


def test_index_units_keeps_each_charge_in_place_when_its_parts_hold_some_units() -> None:
    """One rank's shards of a charge may hold only some of its units (FSDP2 shards the rows of a
    per-row charge): the next charge's units still start after all of its units (they started
    after the units held, and its sums landed on the wrong units before the sum over ranks)."""
    from torch_momentum.balance._parts import SymmetryPart, index_units

    held = SymmetryPart("a", 0, 0, 4, 1, 1.0, 0)  # units 0-3 of the 8 of the first charge
    nxt = SymmetryPart("b", 1, 0, 3, 1, 1.0, 0)
    index = index_units(
        [(8, False, [held]), (3, False, [nxt])],
        lambda part: part.param,
        lambda key: ((key,), (4, 5) if key == "a" else (2, 3)),
    )
    assert index.dst.tolist() == [0, 1, 2, 3, 8, 9, 10]
