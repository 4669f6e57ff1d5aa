"""Time to draw LayerBalanceMonitor's default-mode figures, and their pixel sizes.

For each model a short Lightning fit runs ``LayerBalanceMonitor(ledger=True,
log_every_n_steps=EVERY, save_figure=False)`` (the default mode: no ``layers=``), so that the
monitor holds ROWS logging steps. Then, ROUNDS times each in a shuffled order:

* ``balance``: ``plot_network(monitor)`` built and saved as PNG at 120 dpi (the dpi the monitor
  saves with at the end of fit);
* ``ledger``: ``plot_network_ledger(monitor)`` built and saved likewise;
* ``reference``: a figure of one line of ROWS points built and saved likewise (the machine's
  matplotlib speed: the ratio column divides by it).

Models (``torch_momentum.demos``, float32, random data of the right shape): ``resnet18``
(``ResNetCNN(widths=(64, 128, 256, 512), blocks=2)``: ResNet-18's layout and size, 1x8x8 images),
``vit`` (``TinyViT()``, 12 blocks), ``gpt2`` (``gpt2_tiny(n_layer=4)``). The fit uses small
batches: the figures depend on the logged steps, the weight matrices and the symmetries, not on
the batch size.

Target (issue: figures a person reads): each figure drawn and saved in <= 2 s, at most 2,400
pixels on its longest side.

Usage: python benchmarks/figures.py [--rounds 5] [--rows 100] [--every 1] [--models ...]
[--quick] (--quick: the small ResNet-style CNN, 6 logged steps, 1 round: a smoke test).
"""

from __future__ import annotations

import argparse
import functools
import io
import random
import statistics
import struct
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from torch_momentum.callbacks import LayerBalanceMonitor
from torch_momentum.callbacks.network_plots import plot_network, plot_network_ledger
from torch_momentum.demos import ResNetCNN, TinyViT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import quiet_lightning
from _fit import LossModule, RepeatedBatch, Task, gpt2, images, model_names

TARGET_S = 2.0
MAX_PIXELS = 2400
DPI = 120


MODELS: dict[str, Callable[[], Task]] = {
    "resnet": lambda: images(ResNetCNN(), 8),
    "resnet18": lambda: images(ResNetCNN(widths=(64, 128, 256, 512), blocks=2), 8),
    "vit": lambda: images(TinyViT(), 8),
    "gpt2": lambda: gpt2(4),
}


def _monitored_fit(make: Callable, rows: int, every: int) -> LayerBalanceMonitor:
    """A fit whose monitor holds ``rows`` logging steps (the first step is logged too)."""
    torch.manual_seed(0)
    net, batch, loss = make()
    monitor = LayerBalanceMonitor(ledger=True, log_every_n_steps=every, save_figure=False)
    steps = (rows - 1) * every + 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():  # what the monitor says about the model
        warnings.filterwarnings("ignore", ".*LayerBalanceMonitor.*")
        module = LossModule(net, loss, lr=0.05, momentum=0.9, weight_decay=5e-4)
        trainer.fit(module, DataLoader(RepeatedBatch(batch, steps), batch_size=None))
    return monitor


def _reference(rows: int) -> Figure:
    figure = Figure(figsize=(6, 4))
    figure.add_subplot().plot(range(rows), [r * r for r in range(rows)])
    return figure


def _draw(build: Callable[[], Figure]) -> tuple[float, tuple[int, int]]:
    """Seconds to build and save the figure at :data:`DPI`, and its (width, height) in pixels."""
    start = time.perf_counter()
    figure = build()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png")
    seconds = time.perf_counter() - start
    width, height = struct.unpack(">II", buffer.getvalue()[16:24])  # the PNG's IHDR chunk
    return seconds, (width, height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100, help="logging steps in the monitor")
    parser.add_argument("--every", type=int, default=1, help="the monitor's log_every_n_steps")
    parser.add_argument("--models", default="resnet18,vit,gpt2", help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: small ResNet, 1 round")
    args = parser.parse_args()
    names = model_names(parser, args.models, MODELS)
    if args.quick:
        args.rounds, args.rows, args.every, names = 1, 6, 1, ["resnet"]
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    print(f"matplotlib {matplotlib.__version__}, {args.rounds} rounds, {args.rows} logged steps")
    header = (
        f"{'model':<9} {'figure':<10} {'seconds':>24} {'x reference':>12} {'pixels':>12}"
        f" {'target':>16}"
    )
    print(header)
    print("-" * len(header))
    rng = random.Random(0)
    for name in names:
        monitor = _monitored_fit(MODELS[name], args.rows, args.every)
        builds: dict[str, Callable[[], Any]] = {
            "balance": functools.partial(plot_network, monitor),
            "ledger": functools.partial(plot_network_ledger, monitor),
            "reference": functools.partial(_reference, args.rows),
        }
        times: dict[str, list[float]] = {k: [] for k in builds}
        sizes: dict[str, tuple[int, int]] = {}
        for _ in range(args.rounds):
            order = list(builds)
            rng.shuffle(order)
            for figure in order:
                seconds, sizes[figure] = _draw(builds[figure])
                times[figure].append(seconds)
        for figure in ("balance", "ledger"):
            ts = times[figure]
            ratio = statistics.median(t / r for t, r in zip(ts, times["reference"], strict=True))
            width, height = sizes[figure]
            ok = statistics.median(ts) <= TARGET_S and max(width, height) <= MAX_PIXELS
            print(
                f"{name:<9} {figure:<10} {statistics.median(ts):>8.2f} [{min(ts):.2f},"
                f" {max(ts):.2f}] {ratio:>12.1f} {width:>5} x {height:<5}"
                f" {'<= 2 s, 2400 px':>16}{'' if ok else '  MISSED'}"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
