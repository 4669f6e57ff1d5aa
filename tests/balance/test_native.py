"""The ledger's C kernel (``_native``): it builds wherever a C compiler is at hand, once per
source and compiler; its per-row Gram matrices and sums equal a float64 loop for float32 and
float64 slots on every kind of row; it refuses slots it cannot read; and where it cannot be had
(no compiler, a failing one, switched off) the ledger keeps its torch paths. The ledger with it
against the stacked ledger on the reference networks: ``test_flat``."""

from __future__ import annotations

import copy
import os
import platform
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.balance.test_flat import SHAPES, USES, _rows, calls_of, use_path
from tests.balance.test_symmetry_models import ce, images
from tests.helpers.ledger import train_with_ledger
from torch_momentum import PolyakSGD
from torch_momentum.balance import _native, find_symmetries
from torch_momentum.balance._flat import FLAT_CAP, FlatRows
from torch_momentum.balance._native import (
    NativeRows,
    NativeUnitSum,
    build,
    compiler,
    library,
    load,
)
from torch_momentum.balance._unit_sum import UnitSum
from torch_momentum.demos import ResNetCNN


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """``library()`` decided again inside the test, and again after it (the build is cached on
    disk: the second decision only loads it)."""
    library.cache_clear()
    yield
    library.cache_clear()


def _slots(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    slots = [torch.randn(shape, dtype=dtype) for _ in range(3) for shape in SHAPES]
    # a view into a larger storage (an FSDP2 shard, a DDP bucket view): read from its offset
    k = len(SHAPES) + 3
    slots[k] = torch.randn(100, dtype=dtype)[17 : 17 + slots[k].numel()].view(slots[k].shape)
    assert slots[k].storage_offset() == 17
    return slots


def test_the_kernel_builds_where_a_compiler_is(tmp_path: Path) -> None:
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    path = build(cc, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert build(cc, tmp_path) == path and path.stat().st_mtime_ns == mtime  # built once
    assert path.stat().st_mode & 0o044  # readable by whoever shares the cache
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    lib = load(path)
    assert lib.tm_rows_f32 and lib.tm_rows_f64
    # and the ledgers of this machine take it (CI runs where a compiler is)
    assert library() is not None


def test_a_damaged_build_is_built_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None
) -> None:
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    path = build(cc, tmp_path)
    path.write_bytes(b"not a shared library")  # e.g. a disk that filled up under another tool
    monkeypatch.setenv(_native.ENV_CACHE, str(tmp_path))
    assert library() is not None
    assert path.read_bytes()[:4] == b"\x7fELF" or platform.system() != "Linux"


def test_cc_may_carry_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``CC="ccache gcc"`` or ``CC="gcc -Wall"`` names a command of several words: the first is
    looked up, the rest passed on, and the whole command keys the build."""
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("CC", f"{os.path.basename(cc[0])} -Wall")
    assert compiler() == [cc[0], "-Wall"]
    with_flag = build([cc[0], "-Wall"], tmp_path)
    assert with_flag != build(cc, tmp_path)
    load(with_flag)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert compiler() is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_rows_equal_a_loop(dtype: torch.dtype) -> None:
    if library() is None:
        pytest.skip("no C compiler: the kernel is not built")
    rows = NativeRows(SHAPES, USES, dtype)
    slots = _slots(dtype)
    assert rows(slots)
    assert rows.gram.dtype == rows.sums.dtype == torch.float64
    n = len(SHAPES)
    for k, dim, linear in USES:
        per_row = torch.stack([_rows(slots[a * n + k].double(), dim) for a in range(3)], 1)
        count = rows.count(k, dim)
        assert count == per_row.shape[0]
        # accumulated in float64 from the slots' exact values (a float32 product is exact in
        # float64): sums of at most 60 products of O(1) entries in another order, ~1e-15
        if linear:
            first = rows.first_sum(k, dim)
            got, want = rows.sums[first : first + count], per_row.sum(-1)
        else:
            first = rows.first(k, dim)
            got = rows.gram[first : first + count]
            want = torch.einsum("ral,rbl->rab", per_row, per_row)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_native_rows_refuse_slots_they_cannot_read() -> None:
    if library() is None:
        pytest.skip("no C compiler: the kernel is not built")
    rows = NativeRows(SHAPES, USES, torch.float64)
    slots = _slots(torch.float64)
    assert rows(slots)
    before = rows.gram.clone()
    conv = 2 * len(SHAPES) + 4  # the convolution's gradient
    changes = {
        0: slots[0].float(),  # another dtype
        3: torch.zeros(3, 2, dtype=torch.float64),  # another shape of as many entries
        conv: slots[conv].contiguous(memory_format=torch.channels_last),  # not contiguous
        len(SHAPES) + 2: torch.randn(3, 4, dtype=torch.float64).T,  # a transposed view
        # no memory behind it (what torch uses for gradients known to be zero)
        2 * len(SHAPES) + 3: torch._efficientzerotensor(2, 3, dtype=torch.float64),
        # a neg-bit view: its memory holds -t (torch resolves it lazily)
        2: torch._neg_view(torch.randn(4, 3, dtype=torch.float64)),
    }
    for k, changed in changes.items():
        assert changed.shape == slots[k].shape or k == 3
        assert not rows([changed if j == k else t for j, t in enumerate(slots)])
        assert torch.equal(rows.gram, before)  # nothing computed
        assert _native.pointers([changed], [changed.shape], torch.float64) is None or k == 3
    with pytest.raises(ValueError, match="non-empty"):
        NativeRows([(2, 0), (3,)], [(1, 0, False)], torch.float64)
    for uses in ([(len(SHAPES), 0, False)], [(2, 2, False)], [(0, 1, True)], [(2, -1, False)]):
        with pytest.raises(ValueError, match="`uses`"):
            NativeRows(SHAPES, uses, torch.float64)


def _failing_compiler(tmp_path: Path) -> str:
    script = tmp_path / "failing-cc"
    script.write_text("#!/bin/sh\necho 'error: no such compiler' >&2\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_failing_compiler_leaves_the_torch_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None
) -> None:
    cc = _failing_compiler(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"failed on _rows.c \(exit 3\): error: no such"):
        build([cc], cache)
    assert list(cache.iterdir()) == []  # its temporary file removed
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv(_native.ENV_CACHE, str(cache))
    assert library() is None
    _assert_ledger_on_torch_paths(monkeypatch)


@pytest.mark.parametrize("value", ["0", "off"])
def test_the_switch_turns_the_kernel_off(
    value: str, monkeypatch: pytest.MonkeyPatch, fresh_library: None
) -> None:
    monkeypatch.setenv(_native.ENV_SWITCH, value)
    assert library() is None
    with pytest.raises(RuntimeError, match="not available"):
        NativeRows([(2,)], [(0, 0, False)], torch.float64)
    _assert_ledger_on_torch_paths(monkeypatch)


def _small_ledger_run(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[bool], list[bool], float]:
    """3 heavy-ball steps of a Linear-ReLU-Linear net of ``width`` hidden units, float64: the
    calls of each one-pass path and the largest closure relative to the charge's scale."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)).double()
    batch = (torch.randn(8, width, dtype=torch.float64), torch.randint(0, 3, (8,)))
    symmetries = list(find_symmetries(net, ce, [batch]))
    assert any(s.kind == "rescale" for s in symmetries)
    native, flat = calls_of(NativeRows, monkeypatch), calls_of(FlatRows, monkeypatch)
    opt = PolyakSGD(net.parameters(), lr=0.01, momentum=0.9)
    ledger = train_with_ledger(net, ce, batch, opt, symmetries, steps=3)
    worst = max(
        float((row["closure"].abs() / row["scale"]).max()) for row in ledger.read_charges().values()
    )
    return native, flat, worst


def _assert_ledger_on_torch_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    native, flat, worst = _small_ledger_run(8, monkeypatch)
    assert native == [] and flat == [True] * 3
    assert worst <= 1e-12  # float64 round-off of the charge's scale


def test_a_model_past_the_buffer_cap_takes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """One buffer copies every slot and stops at ``FLAT_CAP`` entries; the kernel reads the slots
    where they lie, whatever the model's size: a 1024-wide hidden layer (3.2 M slot entries)."""
    if library() is None:
        pytest.skip("no C compiler: the kernel is not built")
    assert 3 * (1024 * 1024 + 1024) > FLAT_CAP
    native, flat, worst = _small_ledger_run(1024, monkeypatch)
    assert native == [True] * 3 and flat == []
    assert worst <= 1e-12


def test_the_cache_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_native.ENV_CACHE, "/some/where")
    assert _native.cache_dir() == Path("/some/where")
    monkeypatch.delenv(_native.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert _native.cache_dir() == Path("/xdg/torch_momentum")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _native.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "torch_momentum"


def test_a_float32_ledger_takes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 slots, float64 accumulation: the kernel's ledger of the ResNet-style CNN closes
    and books what the stacked path books (which accumulates in float32) up to float32
    round-off of the charges."""
    if library() is None:
        pytest.skip("no C compiler: the kernel is not built")
    torch.manual_seed(0)
    model, batch = ResNetCNN(), images(1)[0]
    symmetries = list(find_symmetries(model, ce, [batch]))
    calls = calls_of(NativeRows, monkeypatch)
    reads = {}
    for path in ("native", "stacked"):
        use_path(path, monkeypatch)
        net = copy.deepcopy(model)
        opt = PolyakSGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        reads[path] = train_with_ledger(net, ce, batch, opt, symmetries, steps=4).read_charges()
    assert calls == [True] * 4
    for name, row in reads["native"].items():
        scale = float(row["scale"].max())
        # the two paths' Gram sums differ by float32 round-off of rows of up to 1,152 entries
        # (measured: at most 3e-9 of the charge's scale); the closure is the float32 rounding of
        # the charges themselves, the same on both paths (at most 2.9e-7 here)
        torch.testing.assert_close(
            row["sums"], reads["stacked"][name]["sums"], rtol=0, atol=1e-7 * scale
        )
        assert float(row["closure"].abs().max()) <= 1e-6 * scale, name


def test_native_unit_sum_equals_the_unit_sum() -> None:
    """The kernel's sums of rows into units (duplicate entries, units no row reaches, a width of
    9 and of 3) against ``UnitSum``'s sparse product; out-of-range indices and wrongly shaped
    buffers are refused before any pointer reaches C."""
    if library() is None:
        pytest.skip("no C compiler: the kernel is not built")
    torch.manual_seed(0)
    rows, units, entries = 40, 25, 90
    src, dst = torch.randint(0, rows, (entries,)), torch.randint(0, units - 3, (entries,))
    src[:5], dst[:5] = 7, 4  # the same (unit, row) pair five times
    factor = torch.randn(entries, dtype=torch.float64)
    native, reference = (
        NativeUnitSum(src, dst, factor, units, rows),
        UnitSum(src, dst, factor, units, rows),
    )
    for width in (9, 3):
        values = torch.randn(rows, width, dtype=torch.float64)
        out = torch.full((units, width), float("nan"), dtype=torch.float64)  # overwritten
        got = native(values, out)
        assert got is out and bool((out[-3:] == 0).all())
        want = reference(values, torch.empty(units, width, dtype=torch.float64))
        # float64 sums of at most ~10 products in another order
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="`dst`: indices must lie in"):
        NativeUnitSum(src, dst + units, factor, units, rows)
    with pytest.raises(ValueError, match="`src`: indices must lie in"):
        NativeUnitSum(src - 8, dst, factor, units, rows)
    with pytest.raises(ValueError, match="one length"):
        NativeUnitSum(src, dst[:-1], factor, units, rows)
    values = torch.randn(rows, 9, dtype=torch.float64)
    for bad in (values.float(), values[:-1], values.T.contiguous().T):
        with pytest.raises(ValueError, match="`values` must be"):
            native(bad, torch.empty(units, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="`out` must be"):
        native(values, torch.empty(units, 3, dtype=torch.float64))
    # no entries (a ledger without linear charges has no sums rows): zeros, nothing read
    none = torch.zeros(0, dtype=torch.long)
    empty = NativeUnitSum(none, none, none.double(), units, 0)
    out = torch.ones(units, 3, dtype=torch.float64)
    assert bool((empty(torch.zeros(0, 3, dtype=torch.float64), out) == 0).all())
