"""Benchmark clarke_subgradient: vmapped gradients vs a Python loop of torch.autograd.grad.

Cases (k = 64 sample points each):
  pl10 kink        f(x) = max_i (a_i . x + b_i) + 0.1 ||x||_1 in R^10 at a point where three
                   pieces of the max tie and two coordinates are 0 (not stationary)
  pl10 stationary  f(x) = max_i (a_i . x) + ||x||_1 at x = 0, where 0 is in the Clarke set: the
                   min-norm solve needs d + 1 = 11 active points (worst case for Wolfe)
  mlp small        mean squared error of a 3-layer MLP (10-32-32-1, with biases, float32) on a
                   batch of 64 points, as a function of its 1441 parameters at initialisation
  mlp wide         the same for 20-64-64-1 on 128 points (5569 parameters): four times the
                   arithmetic per gradient, so that the loop's per-call overhead matters less

Stages, each timed on its own (medians over interleaved repetitions, so that load on the
machine hits every variant alike):
  sampling    gradients at the k points: torch.func.vmap(torch.func.grad(f)) as
              clarke_subgradient runs it, vs a plain loop of torch.autograd.grad
  min-norm    min_norm_element(samples): Wolfe's algorithm (Gram matrix + active set)
  end to end  clarke_subgradient(f, x, num_samples=64) vs the same with vectorize=False

Stationarity profile (stationarity_profile, k = 64 samples per radius, 4 radii):
  profile     on an MLP 64-300-256-10 (99,126 float32 parameters), mean cross-entropy over 1024
              examples; against 4 x vmap(grad(f)) over 64 points (the same 256 plain batched
              gradient evaluations, nothing else) and against a Python loop of 256
              torch.autograd.grad calls. Interleaved rounds; paired per-round ratios.
  chunked     memory="recompute", chunk_size=8, k = 64, one radius, on an MLP 256-3200-3200-10
              (11.1M float32 parameters; the k x d sample matrix would be 2.8 GB) over 32
              examples, each mode in a fresh subprocess: time and peak resident memory above the
              process's memory before the call (ru_maxrss high-water marks), against the
              in-memory mode (memory="device") on the same model.

StationarityMonitor on reference models (``--parts monitor``): an MLP 10-32-1 on 256 examples,
a CNN (two 3x3 convolutions of 8 channels with BatchNorm, 1x8x8 inputs, 10 classes) on 128
examples and a one-layer LSTM language model (vocabulary 50, embedding 16, hidden 32) over 160
sequences of 12 tokens, float32, batches of 32, radii (1e-3, 1e-2). Three epochs with the
default certificate (sized to one epoch of the data: ``certificate_sizes``): per epoch the
training time (on_train_epoch_start to the end of the epoch) and the certificate's time that
follows it, and the same with the previous defaults (64 samples over up to 1024 examples,
vectorised); for the LSTM also one certificate with vmap forced on every block
(``vectorize=True`` of the first release: ``torch.func.vmap(torch.func.grad(f))`` on one block).

The MLPs are ``torch_momentum.demos.ReluMLP`` and the language model is
``torch_momentum.demos.LSTMLanguageModel``.

Run: python benchmarks/clarke.py [--reps 30] [--threads 1] [--quick]
                                [--parts clarke,profile,chunked,monitor]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.func import functional_call

from torch_momentum import clarke_subgradient
from torch_momentum.clarke import min_norm_element
from torch_momentum.demos import LSTMLanguageModel, ReluMLP
from torch_momentum.stationarity import stationarity_profile

K = 64


def pl10_kink() -> tuple[Callable, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 10, generator=g, dtype=torch.float64)
    x0 = torch.randn(10, generator=g, dtype=torch.float64)
    x0[:2] = 0.0
    b = torch.randn(8, generator=g, dtype=torch.float64) - 5.0  # pieces 3.. are far below
    b[:3] = -(a[:3] @ x0)  # pieces 0, 1, 2 tie (at value 0) at x0

    def f(x):
        return (a @ x + b).max() + 0.1 * x.abs().sum()

    return f, x0


def pl10_stationary() -> tuple[Callable, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 10, generator=g, dtype=torch.float64)

    def f(x):
        return (a @ x).max() + x.abs().sum()

    return f, torch.zeros(10, dtype=torch.float64)


def mlp(width_in: int, hidden: int, batch: int) -> tuple[Callable, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = ReluMLP(width_in, (hidden, hidden), 1)
    data, target = torch.randn(batch, width_in), torch.randn(batch, 1)

    def f(p):
        return (functional_call(net, p, (data,)) - target).pow(2).mean()

    return f, {n: p.detach() for n, p in net.named_parameters()}


Points = torch.Tensor | dict[str, torch.Tensor]  # k points: leading dimension k


def flat_rows(points: Points) -> torch.Tensor:
    """``k`` points (a tensor or a dict of tensors, leading dimension ``k``) as a ``(k, d)``
    matrix, the dict's tensors concatenated in its order."""
    if isinstance(points, dict):
        return torch.cat([p.flatten(1) for p in points.values()], dim=1)
    return points.flatten(1)


def as_points(rows: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flat_rows`: ``(k, d)`` rows as points shaped like the tensors of
    ``like``."""
    parts = rows.split([p.numel() for p in like.values()], dim=1)
    return {n: part.reshape(-1, *p.shape) for (n, p), part in zip(like.items(), parts, strict=True)}


def vmap_grads(f: Callable, points: Points) -> torch.Tensor:
    """The gradients of ``f`` at ``k`` points by ``torch.func.vmap(torch.func.grad(f))`` (what
    ``clarke_subgradient`` runs vectorised), as ``(k, d)`` rows."""
    return flat_rows(torch.func.vmap(torch.func.grad(lambda z: f(z).reshape(())))(points))


def loop_grads(f: Callable, points: Points) -> torch.Tensor:
    """The baseline: one torch.autograd.grad call per point, as ``(k, d)`` rows."""
    out = []
    if isinstance(points, dict):
        names = list(points)
        for i in range(len(points[names[0]])):
            leaves = [points[n][i].clone().requires_grad_(True) for n in names]
            grads = torch.autograd.grad(f(dict(zip(names, leaves, strict=True))), leaves)
            out.append(torch.cat([g.reshape(-1) for g in grads]))
    else:
        for i in range(len(points)):
            z = points[i].clone().requires_grad_(True)
            out.append(torch.autograd.grad(f(z), z)[0].reshape(-1))
    return torch.stack(out)


INNER = 5  # back-to-back calls per job and round


def measure(cases: dict[str, tuple[Callable, Any]], reps: int) -> dict[str, dict[str, float]]:
    jobs: dict[tuple[str, str], Callable[[], object]] = {}
    for name, (f, x) in cases.items():
        res = clarke_subgradient(f, x, num_samples=K, generator=torch.Generator().manual_seed(0))
        samples = flat_rows(res.samples)
        points = res.points
        gen = torch.Generator()

        def e2e(f=f, x=x, vectorize=True, gen=gen):
            gen.manual_seed(0)
            return clarke_subgradient(f, x, num_samples=K, generator=gen, vectorize=vectorize)

        jobs[name, "sampling vmap"] = partial(vmap_grads, f, points)
        jobs[name, "sampling loop"] = partial(loop_grads, f, points)
        jobs[name, "min-norm"] = partial(min_norm_element, samples)
        jobs[name, "e2e vmap"] = e2e
        jobs[name, "e2e loop"] = partial(e2e, vectorize=False)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    for job in jobs.values():  # warm up
        job()
        job()
    for _ in range(reps):
        for key, job in jobs.items():
            # INNER back-to-back calls per round (as timeit does), the same for every job: a
            # single sub-millisecond call right after a different job measures cache misses
            t0 = time.perf_counter()
            for _ in range(INNER):
                job()
            times[key].append((time.perf_counter() - t0) / INNER)
    table: dict[str, dict[str, float]] = {}
    for (name, stage), ts in times.items():
        table.setdefault(name, {})[stage] = 1e3 * statistics.median(ts)
    for name, (f, x) in cases.items():
        res = clarke_subgradient(f, x, num_samples=K, generator=torch.Generator().manual_seed(0))
        table[name]["active"] = float((res.weights > 0).sum())
    return table


def profile_case(hidden: tuple[int, int], batch: int) -> tuple[Callable, dict[str, torch.Tensor]]:
    """MLP 64-h1-h2-10, mean cross-entropy over ``batch`` random examples, float32."""
    torch.manual_seed(0)
    net = ReluMLP(64, hidden, 10)
    data, target = torch.randn(batch, 64), torch.randint(0, 10, (batch,))

    def f(p):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (data,)), target)

    return f, {n: p.detach() for n, p in net.named_parameters()}


def measure_profile(quick: bool, reps: int) -> dict[str, float]:
    k, radii = (8, [1e-3, 1e-2, 1e-1, 1.0]) if quick else (64, [1e-3, 1e-2, 1e-1, 1.0])
    f, params = profile_case((32, 32) if quick else (300, 256), 64 if quick else 1024)
    d = sum(p.numel() for p in params.values())
    flat = flat_rows({n: p[None] for n, p in params.items()})[0]
    numels = [p.numel() for p in params.values()]
    gen = torch.Generator()
    points = [
        flat + r * torch.nn.functional.normalize(torch.randn(k, d, generator=gen), dim=1)
        for r in radii
    ]
    names = list(params)

    def profile():
        return stationarity_profile(
            f, params, radii, num_samples=k, generator=torch.Generator().manual_seed(0)
        )

    def batched():
        return [vmap_grads(f, as_points(p, params)) for p in points]

    def loop():
        out = []
        for p in points:
            for i in range(k):
                leaves = [t.clone().requires_grad_(True) for t in p[i].split(numels)]
                tree = {n: t.reshape(params[n].shape) for n, t in zip(names, leaves, strict=True)}
                out.append(torch.autograd.grad(f(tree), leaves))
        return out

    jobs = {"profile": profile, "batched": batched, "loop": loop}
    for job in jobs.values():  # warm up
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(reps):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - t0)
    return {
        "d": float(d),
        "k": float(k),
        "profile": statistics.median(times["profile"]),
        "batched": statistics.median(times["batched"]),
        "loop": statistics.median(times["loop"]),
        "profile/batched": statistics.median(
            a / b for a, b in zip(times["profile"], times["batched"], strict=True)
        ),
        "loop/profile": statistics.median(
            a / b for a, b in zip(times["loop"], times["profile"], strict=True)
        ),
    }


def chunked_run(quick: bool, memory: str) -> dict[str, float]:
    """The profile of a large MLP in one memory mode (run in a fresh process for its memory)."""
    width, batch, k = (256, 8, 16) if quick else (3200, 32, 64)
    torch.manual_seed(0)
    net = ReluMLP(256, (width, width), 10)
    data, target = torch.randn(batch, 256), torch.randint(0, 10, (batch,))
    params = {n: p.detach() for n, p in net.named_parameters()}
    d = sum(p.numel() for p in params.values())

    def f(p):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (data,)), target)

    f(params)  # warm up the model's allocations
    torch.func.vmap(torch.func.grad(lambda z: z.square().sum()))(torch.ones(2, 2))  # lazy imports
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    prof = stationarity_profile(
        f,
        params,
        [1e-2],
        num_samples=k,
        generator=torch.Generator().manual_seed(0),
        memory=memory,
        chunk_size=8 if memory != "device" else None,
    )
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "d": d,
        "k": k,
        "seconds": elapsed,
        "rss_before": before,
        "rss_peak": peak,
        "eps_hat": prof.eps_hat[0],
        "grad_norm": prof.grad_norm,
        "active": prof.active[0],
    }


def measure_chunked(quick: bool, threads: int, memory: str) -> dict[str, float]:
    if quick:  # smoke test: in this process (its memory figures then mean little)
        return chunked_run(quick, memory)
    cmd = [sys.executable, __file__, "--chunked-child", memory, "--threads", str(threads)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# StationarityMonitor on reference models
# ----------------------------------------------------------------------------------------------


def reference_tasks(
    quick: bool,
) -> dict[str, tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]]:
    """name -> (network, loss kind, inputs, targets)."""
    nn = torch.nn
    torch.manual_seed(0)
    scale = 4 if quick else 1
    x = torch.randn(256 // scale, 10)
    mlp_task = (ReluMLP(10, (32,), 1), "mse", x, torch.tanh(x @ torch.randn(10, 1)))
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    cnn_task = (
        cnn,
        "ce",
        torch.randn(128 // scale, 1, 8, 8),
        torch.randint(0, 10, (128 // scale,)),
    )
    tokens = torch.randint(0, 50, (160 // scale, 13))
    lstm_task = (LSTMLanguageModel(50, 16, 32), "ce", tokens[:, :-1], tokens[:, 1:])
    return {"MLP": mlp_task, "CNN+BatchNorm": cnn_task, "LSTM LM": lstm_task}


def _fit_with_monitor(task: tuple, epochs: int, **monitor_kwargs: object) -> list[tuple]:
    """Fit ``epochs`` epochs; per epoch (training s, certificate s, samples, vectorised)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from torch_momentum import PolyakSGD
    from torch_momentum.callbacks import StationarityMonitor

    net, kind, inputs, targets = task

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            out = self.net(batch[0])
            if kind == "mse":
                return ((out - batch[1]) ** 2).mean()
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                     batch[1].reshape(-1))  # fmt: skip

        def configure_optimizers(self):
            return PolyakSGD(self.parameters(), lr=0.05, momentum=0.9)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.marks.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.marks.append(time.perf_counter())

    before, monitor, after = (
        Clock(),
        StationarityMonitor(radii=(1e-3, 1e-2), **monitor_kwargs),
        Clock(),
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[before, monitor, after],
    )  # fmt: skip
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=32)
    trainer.fit(Task(), loader)
    rows = []
    for e, row in enumerate(monitor.history):
        start, end = before.marks[2 * e], before.marks[2 * e + 1]
        rows.append(
            (end - start, after.marks[2 * e + 1] - end, int(row["stationarity/num_samples"]))
        )
    return rows


def report_monitor(quick: bool) -> None:
    import copy
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (configures its loggers on import: quieten after)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners

    epochs = 2 if quick else 3
    print(
        f"\nStationarityMonitor(radii=(1e-3, 1e-2)) on reference models, {epochs} epochs, "
        f"{torch.get_num_threads()} thread(s); per epoch: training s / certificate s (samples)"
    )
    variants = {"default": {}, "previous defaults": {"num_samples": 64, "subset_size": 1024}}
    for name, task in reference_tasks(quick).items():
        for label, kwargs in variants.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = _fit_with_monitor(copy.deepcopy(task), epochs, **kwargs)
            cells = "  ".join(f"{t:.3f}/{c:.3f} ({k})" for t, c, k in rows)
            ratio = statistics.median(c / t for t, c, _ in rows[1:] or rows)
            print(
                f"  {name:<14} {label:<18} {cells}   certificate/epoch after the first {ratio:.1f}x"
            )
    lstm_vmap_vs_loop(reference_tasks(quick)["LSTM LM"])


def lstm_vmap_vs_loop(task: tuple) -> None:
    """The gradients of one block of 8 samples on the LSTM LM: vmap (torch has no batching rule
    for the oneDNN LSTM kernel and runs it sample by sample) against the loop."""
    net, _, inputs, targets = task

    def f(p):
        logits = functional_call(net, p, (inputs,))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1))

    params = {n: p.detach() for n, p in net.named_parameters()}
    flat = flat_rows({n: p[None] for n, p in params.items()})
    noise = 1e-3 * torch.randn(8, flat.shape[1], generator=torch.Generator().manual_seed(0))
    points = as_points(flat + noise, params)
    import warnings

    times: dict[str, list[float]] = {"vmap": [], "loop": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            for name, fn in (("vmap", vmap_grads), ("loop", loop_grads)):
                t0 = time.perf_counter()
                fn(f, points)
                times[name].append(time.perf_counter() - t0)
    first = times["vmap"][0] / times["loop"][0]
    warm = statistics.median(times["vmap"][1:]) / statistics.median(times["loop"][1:])
    print(
        f"  LSTM LM, 8 gradients: vmap {statistics.median(times['vmap'][1:]):.3f} s, loop "
        f"{statistics.median(times['loop'][1:]):.3f} s ({warm:.1f}x; the first vmap call of the "
        f"process {times['vmap'][0]:.2f} s, {first:.0f}x)"
    )


def report_clarke(reps: int) -> None:
    """The clarke_subgradient table: sampling, min-norm and end to end, vmap against the loop."""
    cases = {
        "pl10 kink": pl10_kink(),
        "pl10 stationary": pl10_stationary(),
        "mlp small": mlp(10, 32, 64),
        "mlp wide": mlp(20, 64, 128),
    }
    table = measure(cases, reps)

    print(
        f"clarke_subgradient, k = {K}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), median of {reps} interleaved rounds of {INNER} back-to-back calls, "
        "times in ms"
    )
    head = (
        f"{'case':<16} {'sampling':>9} {'loop':>9} {'speedup':>8} {'min-norm':>9} "
        f"{'solve/smp':>9} {'active':>6} {'e2e':>9} {'e2e loop':>9} {'speedup':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, row in table.items():
        print(
            f"{name:<16} {row['sampling vmap']:>9.3f} {row['sampling loop']:>9.3f} "
            f"{row['sampling loop'] / row['sampling vmap']:>7.1f}x {row['min-norm']:>9.3f} "
            f"{row['min-norm'] / row['sampling vmap']:>9.2f} {int(row['active']):>6d} "
            f"{row['e2e vmap']:>9.3f} {row['e2e loop']:>9.3f} "
            f"{row['e2e loop'] / row['e2e vmap']:>7.1f}x"
        )
    print()
    print("sampling = vmap(grad(f)) at the 64 points; loop = 64 torch.autograd.grad calls;")
    print("solve/smp = min-norm time / vmapped sampling time; active = points with weight > 0;")
    print("e2e = clarke_subgradient(f, x, num_samples=64), e2e loop = the same, vectorize=False.")
    kink, mlp_row = table["pl10 kink"], table["mlp small"]
    checks = [
        ("sampling >= 8x loop, pl10", kink["sampling loop"] / kink["sampling vmap"] >= 8),
        (
            "sampling >= 3x loop, mlp small",
            mlp_row["sampling loop"] / mlp_row["sampling vmap"] >= 3,
        ),
        ("min-norm < vmapped sampling, pl10 kink", kink["min-norm"] < kink["sampling vmap"]),
        (
            "end to end >= 4x vectorize=False, pl10 kink",
            kink["e2e loop"] / kink["e2e vmap"] >= 4,
        ),
    ]
    for label, ok in checks:
        print(f"target {label:<48} {'met' if ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny cases, one round: smoke test")
    parser.add_argument(
        "--parts", default="clarke,profile,chunked,monitor", help="comma-separated parts to run"
    )
    parser.add_argument("--profile-reps", type=int, default=3, help="rounds of the profile case")
    parser.add_argument("--chunked-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.chunked_child:
        print(json.dumps(chunked_run(args.quick, args.chunked_child)))
        return
    parts = set(args.parts.split(","))
    if args.quick:
        args.reps, args.profile_reps = 1, 1
    if "clarke" in parts:
        report_clarke(args.reps)
    if "profile" in parts:
        prof = measure_profile(args.quick, args.profile_reps)
        print(
            f"\nstationarity_profile, k = {int(prof['k'])} per radius, 4 radii, MLP with "
            f"{int(prof['d'])} parameters, median of {args.profile_reps} interleaved rounds (s):"
        )
        print(
            f"  profile {prof['profile']:.3f}   4 x vmap(grad) over k points "
            f"{prof['batched']:.3f}   "
            f"loop of {4 * int(prof['k'])} autograd.grad {prof['loop']:.3f}"
        )
        print(
            f"  profile / batched gradients = {prof['profile/batched']:.2f}x (target <= 1.3x: "
            f"{'met' if prof['profile/batched'] <= 1.3 else 'MISSED'});  loop / profile = "
            f"{prof['loop/profile']:.2f}x (target >= 3x: "
            f"{'met' if prof['loop/profile'] >= 3 else 'MISSED'})"
        )
    if "monitor" in parts:
        report_monitor(args.quick)
    if "chunked" not in parts:
        return
    results = {
        mode: measure_chunked(args.quick, args.threads, mode) for mode in ("recompute", "device")
    }
    for mode, ch in results.items():
        dense = ch["k"] * ch["d"] * 4
        extra = ch["rss_peak"] - ch["rss_before"]
        print(
            f"\nprofile memory={mode!r}"
            + (", chunk_size=8" if mode != "device" else "")
            + f", k = {ch['k']}, d = {ch['d']:,} float32, one radius: {ch['seconds']:.1f} s; "
            f"peak RSS {ch['rss_peak'] / 2**30:.2f} GiB, {extra / 2**30:.2f} GiB above the "
            f"process before the call (the k x d sample matrix: {dense / 2**30:.2f} GiB); "
            f"eps_hat {ch['eps_hat']:.6g}, ||grad f|| {ch['grad_norm']:.6g}, active {ch['active']}"
        )
    a, b = results["recompute"]["eps_hat"], results["device"]["eps_hat"]
    print(f"recompute vs device: |eps_hat difference| / eps_hat = {abs(a - b) / b:.1e}")


if __name__ == "__main__":
    main()
