"""Rows summed into units (``_unit_sum.UnitSum``): the CSR product (the CPU's path) and the
gather + ``index_add_`` (other devices' path), both run here, against a plain loop, with
repeated (unit, row) pairs, rows no unit reads, units no row reaches and an empty index; and
the ledger on the reference networks with the other devices' path, against the CPU's."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.balance.test_flat import _gpt2, _resnet, assert_same_ledger, float64_case, ledger_reads
from torch_momentum.balance import _charges
from torch_momentum.balance._unit_sum import UnitSum


def _loop(src: Tensor, dst: Tensor, factor: Tensor, values: Tensor, units: int) -> Tensor:
    out = torch.zeros(units, values.shape[1], dtype=torch.float64)
    for s, d, f in zip(src.tolist(), dst.tolist(), factor.tolist(), strict=True):
        out[d] += f * values[s]
    return out


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("width", [1, 3, 9])
def test_unit_sum_matches_a_loop(sparse: bool, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    units, rows = 7, 11
    # unit 6 gets nothing, row 10 goes nowhere; the pair (2, 3) appears twice
    src = torch.tensor([0, 1, 3, 3, 4, 5, 6, 7, 8, 9, 2, 0])
    dst = torch.tensor([0, 0, 2, 2, 1, 3, 3, 4, 5, 5, 1, 5])
    factor = torch.randn(len(src), generator=gen, dtype=torch.float64)
    values = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    found = UnitSum(src, dst, factor, units, rows, sparse=sparse)
    out = torch.full((units, width), float("nan"), dtype=torch.float64)  # old values ignored
    expected = _loop(src, dst, factor, values, units)
    # sums of at most three products: a few ulps of the largest
    torch.testing.assert_close(found(values, out), expected, rtol=0, atol=1e-15)
    assert found(values, out) is out
    values.mul_(2.0)  # the next step, into the same buffer
    torch.testing.assert_close(found(values, out), 2 * expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("sparse", [True, False])
def test_unit_sum_of_no_entries_is_zero(sparse: bool) -> None:
    none = torch.zeros(0, dtype=torch.long)
    found = UnitSum(none, none, torch.zeros(0, dtype=torch.float64), 3, 0, sparse=sparse)
    out = torch.ones(3, 2, dtype=torch.float64)
    assert torch.equal(found(torch.zeros(0, 2, dtype=torch.float64), out), torch.zeros(3, 2))


def test_unit_sum_defaults_to_the_sparse_product_on_the_cpu() -> None:
    one = torch.zeros(1, dtype=torch.long)
    assert UnitSum(one, one, torch.ones(1, dtype=torch.float64), 1, 1).sparse


def test_unit_sum_falls_back_to_index_add_where_the_build_has_no_sparse_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_sparse(*args: object, **kwargs: object) -> Tensor:
        raise NotImplementedError("no sparse CSR addmm in this build")

    monkeypatch.setattr(torch, "addmm", no_sparse)
    src, dst = torch.tensor([0, 1]), torch.tensor([1, 1])
    factor = torch.tensor([2.0, 3.0], dtype=torch.float64)
    found = UnitSum(src, dst, factor, 2, 2)
    assert not found.sparse
    values = torch.tensor([[1.0], [10.0]], dtype=torch.float64)
    out = found(values, torch.empty(2, 1, dtype=torch.float64))
    assert out.tolist() == [[0.0], [32.0]]
    with pytest.raises(NotImplementedError, match="no sparse CSR addmm"):
        UnitSum(src, dst, factor, 2, 2, sparse=True)  # asked for: not silently replaced


def test_unit_sum_rejects_an_index_of_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match=r"`src`, `dst` and `factor`.*\(3,\), \(2,\)"):
        UnitSum(torch.zeros(3), torch.zeros(2), torch.zeros(3, dtype=torch.float64), 1, 1)


@pytest.mark.parametrize("case", [_resnet, _gpt2], ids=["resnet", "gpt2"])
@pytest.mark.parametrize("name", ["polyak", "two-groups"])
def test_the_ledger_by_index_add_equals_the_ledger_by_the_sparse_product(
    case: Callable[[], tuple[nn.Module, Any, Callable[..., Tensor]]],
    name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The path a GPU takes (gather, factors, ``index_add_``), forced on the CPU, books the same
    per-unit terms and angles as the CSR product, through the one-buffer path (heavy ball) and
    the stacked one (two param groups), in float64."""
    model, batch, loss, symmetries = float64_case(case)
    reads = []
    for sparse in (True, False):
        monkeypatch.setattr(_charges, "UnitSum", functools.partial(UnitSum, sparse=sparse))
        reads.append(ledger_reads(model, batch, loss, name, symmetries))
    assert_same_ledger(reads[0], reads[1], symmetries)
