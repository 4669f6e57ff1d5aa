"""The gradient sampler behind clarke_subgradient and stationarity_profile: where its warnings
point, that it decides vmap-or-loop only after a successful first block, and the memory check
before the sample arrays are allocated."""

from __future__ import annotations

import warnings

import pytest
import torch

import torch_momentum._sampling as S
from torch_momentum import clarke_subgradient, stationarity_profile

F64 = torch.float64
# torch's words when vmap has no batching rule for an operation (see _sampling._NO_BATCHING_RULE)
NO_RULE = (
    "There is a performance drop because we have not yet implemented the batching rule for "
    "aten::fake_op. Please file us an issue on GitHub so that we can prioritize its "
    "implementation."
)


def _item_f(z):
    scale = 2.0 if z.sum().item() > -1e9 else 0.0  # .item(): not vmappable
    return scale * z.abs().sum()


def _warning_without_rule(monkeypatch):
    """vmap that works but warns as torch does for an operation without a batching rule."""
    real_vmap = torch.func.vmap

    def vmap(fn, *args, **kwargs):
        warnings.warn(NO_RULE, UserWarning, stacklevel=2)
        return real_vmap(fn, *args, **kwargs)

    monkeypatch.setattr(torch.func, "vmap", vmap)


def _ours(record, caller):
    return [w for w in record if str(w.message).startswith(f"{caller}:")]


def test_vmap_failure_warning_points_at_the_caller_of_either_function():
    x = torch.tensor([0.0, 1.0, -1.0], dtype=F64)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        clarke_subgradient(_item_f, x, num_samples=4, generator=gen)
        stationarity_profile(_item_f, x, [0.1], num_samples=4, generator=gen)
    ours = _ours(record, "clarke_subgradient") + _ours(record, "stationarity_profile")
    assert len(ours) == 2 and all("cannot be vmapped" in str(w.message) for w in ours)
    assert [w.filename for w in ours] == [__file__, __file__]


@pytest.mark.parametrize("caller", ["clarke_subgradient", "stationarity_profile"])
def test_no_batching_rule_warning_points_at_the_caller(caller, monkeypatch):
    _warning_without_rule(monkeypatch)
    x = torch.tensor([0.0, 1.0], dtype=F64)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if caller == "clarke_subgradient":
            clarke_subgradient(lambda z: z.abs().sum(), x, num_samples=4, generator=gen)
        else:
            stationarity_profile(lambda z: z.abs().sum(), x, [0.1], num_samples=4, generator=gen)
    ours = _ours(record, caller)
    assert len(ours) == 1 and "no batching rule for aten::fake_op" in str(ours[0].message)
    assert ours[0].filename == __file__


def test_a_first_block_that_runs_out_of_memory_leaves_the_choice_open(monkeypatch):
    """The first block decides vmap or loop only once it succeeds: after an out-of-memory error
    (the caller may retry with fewer points), the next block still makes that decision.

    This test drives the private sampler directly (no public function retries after an error)."""
    x = torch.tensor([0.0, 1.0], dtype=F64)
    spec, flat = S.check_x(x)
    sampler = S.GradientSampler(lambda z: z.abs().sum(), spec, True, "caller")
    points = flat + torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(2))

    def out_of_memory(fn, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.func, "vmap", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        sampler(points)
    monkeypatch.undo()
    _warning_without_rule(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = sampler(points[:2])
    assert [str(w.message)[:7] for w in record] == ["caller:"]  # ours, not torch's
    assert not sampler.vectorize  # decided for the loop, as a first block does
    assert torch.equal(out, S.grads_loop(lambda z: z.abs().sum(), points[:2], spec))


def test_sample_arrays_that_cannot_fit_are_refused_before_allocation():
    # 3 arrays of 10**6 x 10**6 float64 numbers: 24 TB, more than any machine running this
    x = torch.zeros(10**6, dtype=F64)
    with pytest.raises(RuntimeError, match=r"num_samples=1000000 samples of the 1000000 entries"):
        clarke_subgradient(lambda z: z.abs().sum(), x, num_samples=10**6)


def test_memory_check_uses_the_available_memory(monkeypatch):
    assert (S.available_memory(torch.device("cpu")) or 0) > 0
    monkeypatch.setattr(S, "available_memory", lambda device: 2**20)  # 1 MiB
    x = torch.zeros(1000, dtype=F64)
    # 64 samples of 1000 float64: 5 x 64 x 1000 x 8 + 2 x 64^2 x 8 = 2.6 MB > 1 MiB
    with pytest.raises(RuntimeError, match=r"num_samples=64 .* 0\.000977 GiB available on cpu"):
        clarke_subgradient(lambda z: z.abs().sum(), x, num_samples=64)
    # 16 samples: 0.64 MB + 4 kB fits
    clarke_subgradient(lambda z: z.abs().sum(), x, num_samples=16)


def test_memory_check_counts_the_min_norm_solve(monkeypatch):
    """Many samples of a small x: the k x k float64 Gram matrix of the solve, not the k x d
    sample arrays, is what does not fit (before, only the three k x d arrays were counted:
    here 3 x 4000 x 10 x 8 = 0.96 MB passed a 32 MB budget, and the 2 x 4000^2 x 8 = 256 MB of
    the solve then went to the allocator)."""
    monkeypatch.setattr(S, "available_memory", lambda device: 32 * 2**20)
    x = torch.zeros(10, dtype=F64)
    with pytest.raises(RuntimeError, match=r"num_samples=4000 .* 4000 x 4000 matrices"):
        clarke_subgradient(lambda z: z.abs().sum(), x, num_samples=4000)
    assert S.sample_bytes(4000, 10, F64) == 3 * 4000 * 10 * 8 + 2 * 4000 * 10 * 8 + 2 * 4000**2 * 8
    # float32 samples: a third float64 copy (the conversion) in the solve
    assert S.sample_bytes(8, 10, torch.float32) == 3 * 8 * 10 * 4 + 3 * 8 * 10 * 8 + 2 * 8 * 8 * 8


def test_cpu_memory_is_capped_by_the_cgroup_limit(monkeypatch):
    """In a container the host's MemAvailable overstates what the process may take: the
    cgroup's memory.max - memory.current caps it."""
    monkeypatch.setattr(S, "_meminfo_available", lambda: 64 * 2**30)
    monkeypatch.setattr(S, "_cgroup_headroom", lambda: 2**30)
    assert S.available_memory(torch.device("cpu")) == 2**30
    monkeypatch.setattr(S, "_cgroup_headroom", lambda: None)  # no limit
    assert S.available_memory(torch.device("cpu")) == 64 * 2**30


@pytest.mark.parametrize(
    ("cgroup", "files", "expected"),
    [
        ("0::/job\n", {"job/memory.max": "1000", "job/memory.current": "300"}, 700),
        ("0::/job\n", {"job/memory.max": "max", "job/memory.current": "300"}, None),
        (
            "4:memory:/job\n0::/\n",
            {"memory/job/memory.limit_in_bytes": "1000", "memory/job/memory.usage_in_bytes": "1"},
            999,
        ),
        (  # v1 without a limit: a huge number
            "4:memory:/\n",
            {
                "memory/memory.limit_in_bytes": "9223372036854771712",
                "memory/memory.usage_in_bytes": "5",
            },
            None,
        ),
        ("4:memory:/gone\n", {}, None),  # nothing readable
    ],
)
def test_cgroup_headroom_reads_v1_and_v2(tmp_path, cgroup, files, expected):
    (tmp_path / "cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text + "\n")
    got = S._cgroup_headroom(str(tmp_path / "cgroup"), str(tmp_path / "fs"))
    assert got == expected
