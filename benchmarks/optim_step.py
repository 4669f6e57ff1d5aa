"""Step time, bandwidth and temporary memory of PolyakSGD / NesterovSGD against torch.optim.SGD.

Run: ``python benchmarks/optim_step.py`` (at most about 3 minutes on a 2-core CPU). Options:
``--quick`` (a smoke run of tiny lists, a few seconds), ``--device cuda`` (on a GPU), ``--fsdp``
(the DTensor case below instead of the lists; with ``--quick`` 10 layers), ``--reps`` (rounds),
``--threads`` (intra-op threads of the CPU kernels), ``--clock cpu`` (time CPU steps by process
CPU time instead of wall time). On a machine shared with other jobs, ``--threads 1 --clock cpu``
gives the most stable ratios: with more threads than free cores every OpenMP parallel region of
a kernel waits for a descheduled worker, which inflates the fused kernel (one parallel region per
tensor) far more than the others, and CPU time does not count the time the process waits for a
core.

Method
------
Two parameter lists, float32, gradients pre-filled once with random values (no forward/backward):

* ``resnet50``: the 161 parameter tensors of torchvision's ResNet-50 (conv weights without bias,
  BatchNorm weights and biases, the 1000-way fc), 25,557,032 parameters, written out below.
* ``small``: the same 161 shapes at 13/64 of the width with 100 classes (1,021,757 parameters).
  The number of tensors, hence of kernel calls and of per-tensor Python work, is the same while
  the data is 25x smaller, so per-call and per-tensor overhead (Python, dispatch) dominates.

Candidates, all at ``lr=1e-3, momentum=0.9`` and otherwise default settings:

* ours: ``PolyakSGD`` and ``NesterovSGD``, each through the reference path (``foreach=False``),
  ``foreach=True``, ``fused=True`` and the default (``foreach=None, fused=None``), which is the
  built-in's default path (the for-loop on the CPU, foreach on CUDA) with the built-in's results
  bit for bit, so the fast path is ``fused=True``, on request;
* built-in: ``torch.optim.SGD(momentum=0.9)`` and ``SGD(momentum=0.9, nesterov=True)``, each with
  ``foreach=False`` (the for-loop), ``foreach=True``, ``fused=True`` and the default (on CPU the
  default is the for-loop);
* streaming references moving the same number of counted bytes as one step: ``c.copy_(a)``
  (read+write, 2 x 4 bytes per element), ``torch.add(a, b, out=c)`` and ``a.add_(b)``
  (3 x 4 bytes per element), on buffers sized so that each call moves exactly as many bytes as
  one optimiser step.

Every candidate has its own parameters and state (the gradients are shared and only read). After
two untimed warm-up rounds, each round calls every candidate once, in a new random order; a
sample is the mean of ``inner`` consecutive ``opt.step()`` calls (``inner`` > 1 only for the
small list, chosen so that a sample lasts a few milliseconds). By default 40 rounds for the
ResNet-50 list and 120 for the small one, but no new round starts after 100 s / 40 s, so that a
loaded machine gives fewer rounds rather than a longer run (the header prints the rounds done);
``--reps N`` asks for exactly N (small list: 3N) rounds without that budget. On CUDA each sample
is bracketed by ``torch.cuda.synchronize()`` and timed with CUDA events.

``--fsdp``: parameters sharded by FSDP2 (``fully_shard``), i.e. ``DTensor`` parameters and
gradients: an MLP of 80 ``Linear(64, 64)`` layers (160 parameter tensors), each layer and the whole
model wrapped by ``fully_shard``, gradients from one backward pass. On CPU a single-process
``gloo`` group; on CUDA the NCCL group of ``torchrun --nproc-per-node N benchmarks/optim_step.py
--fsdp --device cuda`` (or a single-process one without ``torchrun``). Our default path (foreach
for DTensor on CUDA, the for-loop on the CPU, as the built-in's) is timed against
``SGD(foreach=True)`` and the built-in default on the same DTensors.

Reading the table
-----------------
``median ms``: median over rounds of the time of one ``step()``; ``p25-p75`` its spread.
``x fused`` / ``x default``: the median over rounds of the ratio of this row's time to the
built-in ``SGD(fused=True)`` / ``SGD()`` time *of the same round* (same ``nesterov`` setting),
so below 1.00 is faster than the built-in. ``GB/s``: achieved bandwidth, 20 bytes per float32
parameter per step (read p, g, v; write p, v); ``% copy``: that bandwidth over the streaming-copy
bandwidth measured in the same run (above 100 % is possible: the step reads everything it writes,
whereas a copy's destination costs an extra read for ownership that is not counted; the
in-place ``add_`` row, which like the step reads every array it writes, is the tighter bound).

The memory table gives, for one step after warm-up, the number of allocations, the bytes they
total and the peak of temporary memory alive at once, for each of our paths next to the built-in
path of the same kind (CPU: allocator events of ``torch.profiler.profile(profile_memory=True)``;
CUDA: the caching allocator's counters and ``max_memory_allocated``).

The ``targets`` block prints PASS or MISS for: our default at most 1.05x the built-in's default
(the same path and arithmetic), our ``fused=True`` at most 1.05x (ResNet-50 list) / 1.1x (small
list) the built-in's ``fused=True`` and at most 0.6x the built-in's default on the CPU, its
bandwidth at least 85 % of ``copy_`` on the large list, and our default's temporary memory at most
the built-in's on the same path. They are benchmark figures, not unit tests, and depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_momentum import NesterovSGD, PolyakSGD

if __package__:
    from ._timing import (
        MemoryUse,
        interleave,
        median,
        operators,
        paired_ratio,
        quantile,
        step_memory,
    )
else:  # run as a script: benchmarks/ is on sys.path
    from _timing import (
        MemoryUse,
        interleave,
        median,
        operators,
        paired_ratio,
        quantile,
        step_memory,
    )

LR = 1e-3
MOMENTUM = 0.9
PATHS = ("default", "fused", "foreach", "reference")
BUILTIN_PATHS = ("default", "fused", "foreach", "for-loop")
STREAMS = ("copy_", "add(out=)", "add_")
STREAM_BYTES_PER_ELEMENT = {"copy_": 2, "add(out=)": 3, "add_": 3}  # arrays touched per element


def resnet50_shapes(width: int = 64, num_classes: int = 1000) -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ``resnet50()`` (``width=64``) in registration order.

    Bottleneck blocks (3, 4, 6, 3) with expansion 4; each block is conv1x1-bn, conv3x3-bn,
    conv1x1-bn, the first block of a stage adds a conv1x1-bn downsample. Convolutions have no
    bias; every BatchNorm has a weight and a bias. 161 tensors, 25,557,032 parameters.
    """
    shapes: list[tuple[int, ...]] = [(width, 3, 7, 7), (width,), (width,)]
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2**stage
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(num_classes, inplanes), (num_classes,)]
    return shapes


@dataclass(frozen=True)
class Case:
    name: str
    shapes: list[tuple[int, ...]]
    rounds: int
    budget_s: float | None  # no new round starts after this many seconds (at least 5 rounds)
    large: bool  # memory-bound case: the <= 1.0x fused and bandwidth targets apply
    max_inner: int = 50  # cap on consecutive steps per sample
    memory: bool = True  # measure the temporary memory (the profiler takes seconds per candidate)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


@dataclass(frozen=True)
class Candidate:
    family: str  # "PolyakSGD", "NesterovSGD" or "SGD"
    path: str
    nesterov: bool

    @property
    def key(self) -> str:
        suffix = "(nesterov)" if self.family == "SGD" and self.nesterov else ""
        return f"{self.family}{suffix}/{self.path}"


OURS = (("PolyakSGD", False), ("NesterovSGD", True))  # our families and their built-in twin


def builtin_key(nesterov: bool, path: str) -> str:
    """The key of ``torch.optim.SGD`` on ``path`` with this ``nesterov``, e.g.
    ``"SGD(nesterov)/fused"``."""
    return Candidate("SGD", path, nesterov).key


def twin_path(path: str) -> str:
    """The built-in's path of the same kind as our ``path`` (our for-loop is ``reference``)."""
    return "for-loop" if path == "reference" else path


def candidates() -> list[Candidate]:
    out: list[Candidate] = []
    for ours, nesterov in OURS:
        out += [Candidate(ours, path, nesterov) for path in PATHS]
        out += [Candidate("SGD", path, nesterov) for path in BUILTIN_PATHS]
    return out


def _flags(path: str) -> dict[str, bool]:
    return {
        "default": {},
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "reference": {"foreach": False},
        "for-loop": {"foreach": False},
    }[path]


def build(cand: Candidate, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    flags = _flags(cand.path)
    foreach, fused = flags.get("foreach"), flags.get("fused")
    if cand.family == "SGD":
        return torch.optim.SGD(
            params, lr=LR, momentum=MOMENTUM, nesterov=cand.nesterov, foreach=foreach, fused=fused
        )
    cls = PolyakSGD if cand.family == "PolyakSGD" else NesterovSGD
    return cls(params, lr=LR, momentum=MOMENTUM, foreach=foreach, fused=fused)


def resolved_default(cand: Candidate, opt: torch.optim.Optimizer) -> str:
    """The path that ``foreach=None, fused=None`` took in one ``opt.step()`` (which it takes),
    read from the operators it ran: ``fused`` (a ``_fused_`` operator), ``foreach`` (a
    ``_foreach_`` operator), else the for-loop (``"for-loop"`` for the built-in, ``"reference"``
    for ours)."""
    names = operators(opt.step)
    if any("_fused_" in name for name in names):
        return "fused"
    if any("_foreach_" in name for name in names):
        return "foreach"
    return "for-loop" if cand.family == "SGD" else "reference"


@dataclass
class CaseResult:
    case: Case
    device: torch.device
    inner: int
    times: dict[str, list[float]]
    memory: dict[str, MemoryUse]
    default_paths: dict[str, str]


def _make_params(
    shapes: list[tuple[int, ...]], device: torch.device, gen: torch.Generator
) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen).mul_(0.05).to(device) for s in shapes]


def _stream_ops(numel: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """Streaming kernels that each move as many counted bytes as one step (5 arrays x numel)."""
    pool = torch.ones(5 * numel, device=device)
    half, third = (5 * numel) // 2, (5 * numel) // 3
    a2, c2 = pool[:half], pool[half : 2 * half]
    a3, b3, c3 = pool[:third], pool[third : 2 * third], pool[2 * third : 3 * third]
    return {
        "copy_": lambda: c2.copy_(a2),
        "add(out=)": lambda: torch.add(a3, b3, out=c3),
        "add_": lambda: a3.add_(b3, alpha=1e-9),
    }


def _stream_elements(name: str, numel: int) -> int:
    return (5 * numel) // 2 if name == "copy_" else (5 * numel) // 3


def run_case(case: Case, device: torch.device, seed: int, clock: str = "wall") -> CaseResult:
    gen = torch.Generator().manual_seed(seed)
    master = _make_params(case.shapes, device, gen)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in master]
    opts: dict[str, torch.optim.Optimizer] = {}
    default_paths: dict[str, str] = {}
    for cand in candidates():
        params = [torch.nn.Parameter(p.clone()) for p in master]
        # Gradients are shared and read-only, except for the built-in's Nesterov foreach path,
        # which adds momentum * buf into them in place: it gets copies of its own.
        writes_grads = (
            cand.family == "SGD" and cand.nesterov and cand.path in ("foreach", "default")
        )
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone() if writes_grads else g
        opts[cand.key] = build(cand, params)
        if cand.path == "default":
            default_paths[cand.key] = resolved_default(cand, opts[cand.key])
    fns: dict[str, Callable[[], object]] = {key: opt.step for key, opt in opts.items()}
    fns.update(_stream_ops(case.numel, device))

    # Calibrate: enough consecutive steps per sample that one sample lasts >= ~5 ms.
    probe = opts["SGD/fused"].step
    for _ in range(3):
        probe()
    t = interleave({"probe": probe}, rounds=5, warmup=0, device=device, clock=clock)["probe"]
    inner = max(1, min(case.max_inner, math.ceil(5e-3 / max(median(t), 1e-7))))

    times = interleave(
        fns,
        rounds=case.rounds,
        inner=inner,
        warmup=2,
        device=device,
        seed=seed,
        budget_s=case.budget_s,
        clock=clock,
    )
    memory = (
        {key: step_memory(opt.step, device) for key, opt in opts.items()} if case.memory else {}
    )
    return CaseResult(case, device, inner, times, memory, default_paths)


# ----------------------------------------------------------------------------- reporting


def _fmt_ratio(x: float) -> str:
    return f"{x:6.2f}x"


def _sgd_label(nesterov: bool, arg: str = "") -> str:
    args = ", ".join(a for a in ("nesterov=True" if nesterov else "", arg) if a)
    return f"SGD({args})"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(res: CaseResult) -> list[tuple[str, bool | None, str]]:
    """Print the tables of one case; return its target lines (text, verdict or None, detail)."""
    case, times = res.case, res.times
    step_bytes = 20 * case.numel
    copy_bw = 2 * 4 * _stream_elements("copy_", case.numel) / median(times["copy_"])
    print(
        f"\n== {case.name}: {len(case.shapes)} tensors, {case.numel:,} float32 parameters "
        f"({step_bytes / 1e6:.0f} MB moved per step), device={res.device.type}, "
        f"{len(times['copy_'])} rounds x {res.inner} step(s)"
    )
    header = (
        f"{'optimizer':<24}{'path':<20}{'median ms':>10}{'p25-p75 ms':>16}"
        f"{'x fused':>9}{'x default':>11}{'GB/s':>8}{'% copy':>8}"
    )
    print(header)
    print("-" * len(header))
    for cand in candidates():
        fused_ref = times[builtin_key(cand.nesterov, "fused")]
        default_ref = times[builtin_key(cand.nesterov, "default")]
        ts = times[cand.key]
        med = median(ts)
        path = cand.path
        if path == "default":
            path = f"default ({res.default_paths[cand.key]})"
        family = cand.family + (" nesterov" if cand.family == "SGD" and cand.nesterov else "")
        bw = step_bytes / med
        print(
            f"{family:<24}{path:<20}{med * 1e3:10.2f}"
            f"{f'{quantile(ts, 0.25) * 1e3:.2f}-{quantile(ts, 0.75) * 1e3:.2f}':>16}"
            f"{_fmt_ratio(paired_ratio(ts, fused_ref)):>9}"
            f"{_fmt_ratio(paired_ratio(ts, default_ref)):>11}"
            f"{bw / 1e9:8.1f}{100 * bw / copy_bw:7.0f}%"
        )
        if cand.family == "SGD" and cand.path == "for-loop" and not cand.nesterov:
            print()
    print()
    for name in STREAMS:
        ts = times[name]
        bw = 4 * STREAM_BYTES_PER_ELEMENT[name] * _stream_elements(name, case.numel) / median(ts)
        print(
            f"{'stream':<24}{name:<20}{median(ts) * 1e3:10.2f}"
            f"{f'{quantile(ts, 0.25) * 1e3:.2f}-{quantile(ts, 0.75) * 1e3:.2f}':>16}"
            f"{'':>9}{'':>11}{bw / 1e9:8.1f}{100 * bw / copy_bw:7.0f}%"
        )

    _print_memory(res)
    return _targets(res, copy_bw)


def _print_memory(res: CaseResult) -> None:
    unit = "CUDA allocator" if res.device.type == "cuda" else "profiler allocator events"
    if res.memory:
        print(f"\nTemporary memory of one step ({unit}); ours vs the built-in path of that kind:")
        mheader = (
            f"{'optimizer / path':<32}{'allocs':>8}{'alloc MB':>10}{'peak MB':>9}   "
            f"{'built-in':<30}{'allocs':>8}{'alloc MB':>10}{'peak MB':>9}  peak<=built-in"
        )
        print(mheader)
        print("-" * len(mheader))
    else:
        print("\nTemporary memory: not measured with --quick")
    for cand in candidates():
        if cand.family == "SGD" or not res.memory:
            continue
        twin = builtin_key(cand.nesterov, twin_path(cand.path))
        ours, theirs = res.memory[cand.key], res.memory[twin]
        ok = ours.peak <= theirs.peak
        print(
            f"{cand.family + ' / ' + cand.path:<32}{ours.count:8d}{ours.allocated / 1e6:10.2f}"
            f"{ours.peak / 1e6:9.2f}   {twin.replace('/', ' / '):<30}{theirs.count:8d}"
            f"{theirs.allocated / 1e6:10.2f}{theirs.peak / 1e6:9.2f}  {_verdict(ok)}"
        )


def _targets(res: CaseResult, copy_bw: float) -> list[tuple[str, bool | None, str]]:
    """The target lines of one case: (text, verdict or None, detail)."""
    case, times = res.case, res.times
    step_bytes = 20 * case.numel
    targets: list[tuple[str, bool | None, str]] = []
    # Targets. The default path is the built-in's default (bit for bit, so the same work): it
    # must cost what the built-in's default costs. The speed is on request: fused=True.
    is_cpu = res.device.type == "cpu"
    for ours, nesterov in OURS:
        r_same = paired_ratio(times[f"{ours}/default"], times[builtin_key(nesterov, "default")])
        targets.append(
            (
                f"[{case.name}] {ours} default <= 1.05 x {_sgd_label(nesterov)} default",
                r_same <= 1.05,
                f"{r_same:.2f}x ({res.default_paths[f'{ours}/default']} vs "
                f"{res.default_paths[builtin_key(nesterov, 'default')]})",
            )
        )
        ts = times[f"{ours}/fused"]
        r_fused = paired_ratio(ts, times[builtin_key(nesterov, "fused")])
        limit = 1.05 if case.large else 1.1
        targets.append(
            (
                f"[{case.name}] {ours} fused <= {limit:.2f} x {_sgd_label(nesterov, 'fused=True')}",
                r_fused <= limit,
                f"{r_fused:.2f}x",
            )
        )
        r_default = paired_ratio(ts, times[builtin_key(nesterov, "default")])
        targets.append(
            (
                f"[{case.name}] {ours} fused <= 0.6 x {_sgd_label(nesterov)} default"
                + ("" if is_cpu else " (a CPU target)"),
                (r_default <= 0.6) if is_cpu else None,
                f"{r_default:.2f}x",
            )
        )
        if case.large:
            bw = step_bytes / median(ts)
            targets.append(
                (
                    f"[{case.name}] {ours} fused bandwidth >= 85% of copy_",
                    bw >= 0.85 * copy_bw,
                    f"{100 * bw / copy_bw:.0f}% ({bw / 1e9:.1f} of {copy_bw / 1e9:.1f} GB/s)",
                )
            )
        if not res.memory:
            continue
        builtin_path = twin_path(res.default_paths[f"{ours}/default"])
        mine = res.memory[f"{ours}/default"]
        theirs = res.memory[builtin_key(nesterov, builtin_path)]
        targets.append(
            (
                f"[{case.name}] {ours} default temp memory <= "
                f"{_sgd_label(nesterov)} {builtin_path}",
                mine.peak <= theirs.peak,
                f"peak {mine.peak / 1e6:.2f} vs {theirs.peak / 1e6:.2f} MB, "
                f"{mine.count} vs {theirs.count} allocations",
            )
        )
    return targets


FSDP_LAYERS = 80  # 160 parameter tensors
FSDP_WIDTH = 64


def _init_process_group(device: torch.device) -> tuple[bool, int]:
    """A process group for FSDP2: torchrun's (NCCL on CUDA) or a single-process one (gloo on CPU).
    Returns whether we created it and this process's rank."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False, dist.get_rank()
    if "RANK" in os.environ:  # launched by torchrun
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return True, dist.get_rank()
    store = os.path.join(tempfile.mkdtemp(prefix="optim_step_fsdp_"), "store")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return True, 0


def _fsdp_model(device: torch.device, seed: int, layers: int) -> torch.nn.Module:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        *[torch.nn.Linear(FSDP_WIDTH, FSDP_WIDTH) for _ in range(layers)]
    ).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(16, FSDP_WIDTH, device=device)
    model(x).pow(2).mean().backward()  # DTensor gradients, kept for every timed step
    return model


def run_fsdp(
    device: torch.device,
    rounds: int,
    budget_s: float | None,
    seed: int,
    clock: str,
    layers: int = FSDP_LAYERS,
) -> int:
    """Time ``step()`` on FSDP2-sharded (DTensor) parameters; print the ratios on rank 0."""
    import torch.distributed as dist

    created, rank = _init_process_group(device)
    try:
        makers = [Candidate(ours, "default", nesterov) for ours, nesterov in OURS]
        makers += [
            Candidate("SGD", path, n) for path in ("foreach", "default") for n in (False, True)
        ]
        opts: dict[str, torch.optim.Optimizer] = {}
        paths: dict[str, str] = {}
        for cand in makers:
            params = list(_fsdp_model(device, seed, layers).parameters())
            opts[cand.key] = build(cand, params)
            if cand.path == "default":
                paths[cand.key] = resolved_default(cand, opts[cand.key])
        kind = type(params[0]).__name__
        times = interleave(
            {k: o.step for k, o in opts.items()},
            rounds=rounds,
            inner=5,
            warmup=2,
            device=device,
            seed=seed,
            budget_s=budget_s,
            clock=clock,
        )
        if rank == 0:
            world = dist.get_world_size()
            print(
                f"\n== fsdp: {layers} x Linear({FSDP_WIDTH}, {FSDP_WIDTH}) under fully_shard, "
                f"{len(params)} {kind} parameters, world size {world} "
                f"({dist.get_backend()}), device={device.type}, "
                f"{len(times['SGD/foreach'])} rounds x 5 steps"
            )
            header = f"{'optimizer / path':<46}{'median ms':>10}{'x SGD foreach':>15}"
            print(header)
            print("-" * len(header))
            for key, ts in times.items():
                label = key + (f" ({paths[key]})" if key in paths else "")
                ratio = paired_ratio(ts, times[builtin_key("esterov" in key, "foreach")])
                print(f"{label:<46}{median(ts) * 1e3:10.3f}{_fmt_ratio(ratio):>15}")
    finally:
        if created:
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="exactly this many rounds for the ResNet-50 list (small: 3x), no time budget",
    )
    parser.add_argument("--quick", action="store_true", help="tiny lists, few rounds (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="CPU timer: wall time, or process CPU time (robust to a loaded machine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fsdp", action="store_true", help="DTensor parameters under FSDP2 (fully_shard) instead"
    )
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.quick:  # tiny tensors: threads only add synchronisation (slow on a loaded machine)
        torch.set_num_threads(1)
    device = torch.device(args.device)

    # (rounds, time budget in seconds or None); an explicit --reps runs exactly that many rounds.
    big: tuple[int, float | None]
    small: tuple[int, float | None]
    if args.quick:
        big, small = (2, 2.0), (3, 2.0)
    else:
        big, small = (40, 100.0), (120, 40.0)
    if args.reps is not None:
        big, small = (args.reps, None), (3 * args.reps, None)
    if args.quick:
        cases = [
            Case("resnet50/8", resnet50_shapes(8, 10), big[0], big[1], True, 2, False),
            Case("small/4", resnet50_shapes(4, 10), small[0], small[1], False, 2, False),
        ]
    else:
        cases = [
            Case("resnet50", resnet50_shapes(64, 1000), big[0], big[1], large=True),
            Case("small", resnet50_shapes(13, 100), small[0], small[1], large=False),
        ]
    print(
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {torch.get_num_threads()} threads, "
        + (f"clock={args.clock}, " if device.type == "cpu" else "CUDA events, ")
        + f"lr={LR}, momentum={MOMENTUM}"
    )
    if args.fsdp:
        rounds = args.reps or (2 if args.quick else 30)
        budget = None if args.reps else (2.0 if args.quick else 60.0)
        layers = 10 if args.quick else FSDP_LAYERS
        return run_fsdp(device, rounds, budget, args.seed, args.clock, layers)
    targets: list[tuple[str, bool | None, str]] = []
    for case in cases:
        res = run_case(case, device, args.seed, args.clock)
        targets += report(res)
        del res
    print("\nTargets (benchmark figures, measured in this run):")
    for text, ok, detail in targets:
        verdict = "    " if ok is None else _verdict(ok)
        print(f"  {verdict}  {text:<62} {detail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
