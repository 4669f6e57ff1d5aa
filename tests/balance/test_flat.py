"""The ledger's reductions from one buffer (``_flat.FlatRows``): per-row Gram matrices and sums
against a plain loop on every kind of row (whole tensors of one entry, rows along dim 0 that
share a length across tensors, a matrix's columns, a convolution's input channels, a later
dimension of a 3-D tensor, a channels_last slot); and the ledger with them, and with the C
kernel (``_native.NativeRows``), against the ledger with the stacked per-group reductions, on
the reference networks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.balance.test_symmetry_models import ce, images, lm, tokens
from tests.helpers.ledger import train_with_ledger
from torch_momentum import PolyakSGD
from torch_momentum.balance import _charges, _native, find_symmetries
from torch_momentum.balance._flat import FLAT_CAP, FlatRows
from torch_momentum.balance._native import NativeRows
from torch_momentum.demos import ResNetCNN, TinyViT, gpt2_tiny

SHAPES = [(), (5,), (4, 3), (2, 3), (6, 2, 3, 3), (3, 4, 5), (7,), (7, 3)]
# (tensor, dim, linear): Gram rows along dim 0 of every tensor but one read only as sums; later
# dims of the matrix, the convolution and the 3-D tensor; sums of some rows also read as Gram
# rows, and of a 0-dim tensor
USES = [(k, 0, False) for k in range(len(SHAPES)) if k != 1] + [
    (1, 0, True),
    (5, 0, True),
    (0, 0, True),
    (2, 1, True),
    (2, 1, False),
    (4, 1, False),
    (5, 2, True),
    (5, 1, False),
    (7, 1, False),  # the columns of a matrix of 7 rows (the C kernel takes 4 rows at a time)
]


def _rows(t: Tensor, dim: int) -> Tensor:
    """``t``'s rows along ``dim`` as ``(n, entries)`` (a 0-dim tensor: one row)."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


def _slots(dtype: torch.dtype) -> list[Tensor]:
    torch.manual_seed(0)
    slots = [torch.randn(shape, dtype=dtype) for _ in range(3) for shape in SHAPES]
    # a channels_last gradient of the convolution: read in its logical order
    conv = 2 * len(SHAPES) + 4
    slots[conv] = slots[conv].contiguous(memory_format=torch.channels_last)
    return slots


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_rows_equal_a_loop(dtype: torch.dtype) -> None:
    flat = FlatRows(SHAPES, USES, dtype, "cpu")
    slots = _slots(dtype)
    assert flat(slots)
    assert flat.gram.dtype == dtype and flat.sums.dtype == torch.float64
    n = len(SHAPES)
    for k, dim, linear in USES:
        rows = torch.stack([_rows(slots[a * n + k].double(), dim) for a in range(3)], 1)
        gram = torch.einsum("ral,rbl->rab", rows, rows)
        count = flat.count(k, dim)
        assert count == rows.shape[0]
        # float64: sums of at most 60 products of O(1) entries in another order, ~1e-15; float32
        # products and sums: ~60 * 6e-8 relative of the entries' sizes
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        if linear:
            first = flat.first_sum(k, dim)
            got, want = flat.sums[first : first + count], rows.sum(-1)
        else:
            first = flat.first(k, dim)
            got, want = flat.gram[first : first + count].double(), gram
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_flat_rows_refuse_changed_slots_and_empty_tensors() -> None:
    flat = FlatRows(SHAPES, USES, torch.float64, "cpu")
    slots = _slots(torch.float64)
    assert flat(slots)
    before = flat.gram.clone()
    for k, changed in ((0, slots[0].float()), (3, torch.zeros(3, 2, dtype=torch.float64))):
        # another dtype, or another shape of as many entries: nothing is computed
        assert not flat([changed if j == k else t for j, t in enumerate(_slots(torch.float32))])
        assert not flat([changed if j == k else t for j, t in enumerate(slots)])
        assert torch.equal(flat.gram, before)
    with pytest.raises(ValueError, match="non-empty"):
        FlatRows([(2, 0), (3,)], [(1, 0, False)], torch.float64, "cpu")


def calls_of(cls: type[FlatRows] | type[NativeRows], monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What every call of ``cls`` (a step's reductions) returns from now on (True: it reduced
    the step)."""
    calls: list[bool] = []
    call = cls.__call__

    def counted(self: Any, slots: Any) -> bool:
        calls.append(call(self, slots))
        return calls[-1]

    monkeypatch.setattr(cls, "__call__", counted)
    return calls


#: the ledger's paths on the CPU: (``_charges.NATIVE``, ``_charges.FLAT_CAP``)
PATHS = {"native": (True, FLAT_CAP), "flat": (False, FLAT_CAP), "stacked": (False, 0)}


def use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the ledgers built from now on take ``path`` where their steps allow it (skipped for
    ``"native"`` where the C kernel cannot be built: ``test_native`` fails then if a compiler
    is at hand)."""
    if path == "native" and _native.library() is None:
        pytest.skip("no C compiler: the ledger's C kernel is not built")
    native, cap = PATHS[path]
    monkeypatch.setattr(_charges, "NATIVE", native)
    monkeypatch.setattr(_charges, "FLAT_CAP", cap)


def _resnet() -> tuple[nn.Module, Any, Callable[..., Tensor]]:
    return ResNetCNN(), images(1)[0], ce


def _gpt2() -> tuple[nn.Module, Any, Callable[..., Tensor]]:
    return gpt2_tiny(), tokens(64, 1)[0], lm


def _vit() -> tuple[nn.Module, Any, Callable[..., Tensor]]:
    return TinyViT(depth=2), images(1)[0], ce


def _optimizers(model: nn.Module) -> dict[str, torch.optim.Optimizer]:
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    return {
        "polyak": PolyakSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
        "adamw": torch.optim.AdamW(model.parameters(), lr=1e-3),  # the generic split
        # two groups, two rule maps: every step takes the stacked path
        "two-groups": PolyakSGD(
            [{"params": decay, "weight_decay": 1e-3}, {"params": rest}], lr=0.05, momentum=0.9
        ),
    }


def float64_case(
    case: Callable[[], tuple[nn.Module, Any, Callable[..., Tensor]]],
) -> tuple[nn.Module, Any, Callable[..., Tensor], list[Any]]:
    """The case's model and batch in float64, its loss and its symmetries."""
    torch.manual_seed(0)
    model, batch, loss = case()
    model = model.double()
    if isinstance(batch, tuple):
        batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    return model, batch, loss, list(find_symmetries(model, loss, [batch]))


def ledger_reads(
    model: nn.Module, batch: Any, loss: Callable[..., Tensor], name: str, symmetries: list[Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The charges and angles of 4 steps of optimiser ``name`` on a copy of ``model``."""
    copied = copy.deepcopy(model)
    opt = _optimizers(copied)[name]
    ledger = train_with_ledger(copied, loss, batch, opt, symmetries, steps=4)
    return ledger.read_charges(), ledger.read_angles()


def assert_same_ledger(
    a: tuple[dict[str, Any], dict[str, Tensor]],
    b: tuple[dict[str, Any], dict[str, Tensor]],
    symmetries: list[Any],
) -> None:
    """Two float64 ledgers of the same training book the same per-unit terms, charges and
    angles up to round-off."""
    (charges, angles), (other, other_angles) = a, b
    assert charges.keys() == other.keys() and len(charges) == len(symmetries)
    for key, row in charges.items():
        scale = row["scale"]
        for field in ("D", "D0", "sums", "closure"):
            # float64; only the order of the sums differs: ~1e-16 of the charge's scale per
            # operation
            torch.testing.assert_close(
                row[field], other[key][field], rtol=1e-12, atol=1e-12 * float(scale.max())
            )
    assert angles.keys() == other_angles.keys()
    for key, found in angles.items():
        torch.testing.assert_close(found, other_angles[key], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", [_resnet, _gpt2, _vit], ids=["resnet", "gpt2", "vit"])
@pytest.mark.parametrize("name", ["polyak", "adamw", "two-groups"])
@pytest.mark.parametrize("path", ["native", "flat"])
def test_one_pass_ledger_equals_the_stacked_ledger(
    case: Callable[[], tuple[nn.Module, Any, Callable[..., Tensor]]],
    name: str,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same training twice in float64, every symmetry booked: the ledger whose steps take
    the C kernel (``native``) or the one-buffer reductions (``flat``), and the ledger restricted
    to the stacked ones, give the same per-unit terms, charges and angles up to round-off."""
    model, batch, loss, symmetries = float64_case(case)
    calls = calls_of(NativeRows if path == "native" else FlatRows, monkeypatch)
    reads = []
    for taken in (path, "stacked"):
        use_path(taken, monkeypatch)
        reads.append(ledger_reads(model, batch, loss, name, symmetries))
        # every step in one pass (heavy ball's first step too: the velocity exists after it,
        # read with the first step's map), except where two rule maps share a step; none on the
        # stacked path
        assert calls == ([] if name == "two-groups" else [True] * 4)
    assert_same_ledger(reads[0], reads[1], symmetries)


def test_many_identical_blocks_keep_the_stacked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """24 identical Linear-ReLU blocks: the stacked path's 6 groups of equally shaped tensors
    hold 12 tensors on average (more than ``FLAT_GROUP_SIZE``), where one stack per group costs
    less than one copy per tensor: without the C kernel no step takes the one-buffer path, and
    the ledger closes."""
    use_path("flat", monkeypatch)
    torch.manual_seed(0)
    blocks = [m for _ in range(24) for m in (nn.Linear(8, 8), nn.ReLU())]
    net = nn.Sequential(*blocks, nn.Linear(8, 3)).double()
    batch = (torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,)))
    symmetries = list(find_symmetries(net, ce, [batch]))
    assert sum(s.kind == "rescale" for s in symmetries) == 24  # across each ReLU
    calls = calls_of(FlatRows, monkeypatch)
    opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9)
    ledger = train_with_ledger(net, ce, batch, opt, symmetries, steps=3)
    assert calls == []
    for name, row in ledger.read_charges().items():
        # float64 round-off of the charge's scale
        assert bool((row["closure"].abs() <= 1e-12 * row["scale"]).all()), name
