"""Timing and memory helpers shared by the benchmark scripts.

Everything here is written for noisy, shared machines:

* :func:`interleave` runs every candidate once per round, in a freshly shuffled order each round,
  so that slow drifts of the machine (other processes, frequency changes) hit all candidates
  alike. It returns one time per round and candidate, so that callers can form *paired* ratios
  (candidate / reference within the same round) and take their median, which is much less
  sensitive to load spikes than a ratio of two independent medians.
* On CUDA each sample is bracketed by ``torch.cuda.synchronize()`` and timed with CUDA events.
* :func:`step_memory` measures what one call allocates: on CPU from the allocator events recorded
  by ``torch.profiler.profile(profile_memory=True)``, on CUDA from the caching allocator's
  statistics (``max_memory_allocated`` and the allocation counter).
* :func:`operators` names the operators one call runs (from ``torch.profiler``), e.g. to see
  which kernel path an optimiser step took.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "CLOCKS",
    "MemoryUse",
    "interleave",
    "median",
    "operators",
    "paired_ratio",
    "quantile",
    "step_memory",
    "synchronize",
]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], int]] = {
    "wall": time.perf_counter_ns,
    # CPU time of all threads of this process: insensitive to being descheduled by other
    # processes (with one intra-op thread it is the work done; with more it also counts the time
    # worker threads spin while waiting).
    "cpu": time.process_time_ns,
}


def _time_cpu(fn: Callable[[], object], inner: int, clock: Callable[[], int]) -> float:
    start = clock()
    for _ in range(inner):
        fn()
    return (clock() - start) * 1e-9 / inner


def _time_cuda(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1e-3 / inner


def interleave(
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int,
    inner: int = 1,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    seed: int = 0,
    budget_s: float | None = None,
    min_rounds: int = 5,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Time every candidate ``rounds`` times, round-robin in a shuffled order per round.

    Each sample is the mean over ``inner`` consecutive calls (seconds per call). ``warmup`` untimed
    rounds come first. With ``budget_s``, no new round starts once that many seconds have passed
    (counted from the first warm-up call) and at least ``min_rounds`` rounds are done, so that a
    heavily loaded machine shortens the run instead of stretching it. Returns
    ``{name: [seconds per call, one per round]}``; index ``r`` of every list belongs to round ``r``.
    ``clock`` (CPU devices only): ``"wall"`` or ``"cpu"``, see :data:`CLOCKS`; CUDA uses events.
    """
    device = torch.device(device)
    names = list(candidates)
    rng = random.Random(seed)
    started = time.perf_counter()
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for done in range(rounds):
        if budget_s is not None and done >= min_rounds and time.perf_counter() - started > budget_s:
            break
        order = names[:]
        rng.shuffle(order)
        for name in order:
            fn = candidates[name]
            if device.type == "cuda":
                times[name].append(_time_cuda(fn, inner, device))
            else:
                times[name].append(_time_cpu(fn, inner, CLOCKS[clock]))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[r] / den[r]`` (both timed in the same round)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


@dataclass(frozen=True)
class MemoryUse:
    """Memory one call allocated: ``count`` allocations, ``allocated`` bytes in total, ``peak``
    bytes alive at once above what was alive before the call (temporary memory)."""

    count: int
    allocated: int
    peak: int


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++-level log lines (the profiler prints start/stop notices on fd 2)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _cpu_memory(fn: Callable[[], object]) -> MemoryUse:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is not None:  # the allocator's own events: +bytes on alloc, -bytes on free
        sizes = [(e.start_ns(), e.nbytes()) for e in kineto.events() if e.name() == "[memory]"]
    else:  # older profilers: per-operator self memory
        sizes = [
            (int(e.time_range.start), int(e.self_cpu_memory_usage))
            for e in prof.events()
            if e.self_cpu_memory_usage
        ]
    sizes.sort(key=lambda item: item[0])
    live = peak = allocated = count = 0
    for _, nbytes in sizes:
        live += nbytes
        peak = max(peak, live)
        if nbytes > 0:
            count += 1
            allocated += nbytes
    return MemoryUse(count=count, allocated=allocated, peak=peak)


def _cuda_memory(fn: Callable[[], object], device: torch.device) -> MemoryUse:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    after = torch.cuda.memory_stats(device)
    key_count, key_bytes = "allocation.all.allocated", "allocated_bytes.all.allocated"
    return MemoryUse(
        count=after.get(key_count, 0) - before.get(key_count, 0),
        allocated=after.get(key_bytes, 0) - before.get(key_bytes, 0),
        peak=torch.cuda.max_memory_allocated(device) - base,
    )


def step_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> MemoryUse:
    """Allocations made by one call of ``fn`` (see :class:`MemoryUse`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_memory(fn, device)
    return _cpu_memory(fn)


def operators(fn: Callable[[], object]) -> set[str]:
    """The names of the operators one call of ``fn`` runs (``torch.profiler`` CPU events, which
    record every dispatched ``aten::`` operator on any device)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}
