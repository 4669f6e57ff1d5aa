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
    # 3 x 64 x 1000 float64 = 1.5 MB > 1 MiB
    with pytest.raises(RuntimeError, match=r"num_samples=64 .* 0\.000977 GiB available on cpu"):
        clarke_subgradient(lambda z: z.abs().sum(), x, num_samples=64)
    clarke_subgradient(lambda z: z.abs().sum(), x, num_samples=32)  # 0.77 MB fits
