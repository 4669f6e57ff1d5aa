"""Overhead of LayerBalanceMonitor on the training-step time, Lightning on CPU.

Models:
  mlp  the demo's network: bias-free ReLU MLP 1000 -> 100 -> 100 -> 10, square loss, 1000 points,
       full batch (examples/layer_balance.py), float32
  cnn  a small CNN: conv3x3(3->16) ReLU maxpool, conv3x3(16->32) ReLU maxpool, linear(2048->10),
       cross-entropy, a batch of 64 random 32x32 RGB images, float32

Configurations, per model: no monitor (reference), LayerBalanceMonitor(log_every_n_steps=50),
LayerBalanceMonitor(log_every_n_steps=1); all with a CSVLogger, Trainer(log_every_n_steps=50),
PolyakSGD, save_figure=False.

Method: each round fits every configuration once, in a freshly shuffled order (so that load on a
shared machine hits all alike). A run takes WARMUP untimed steps and then STEPS timed steps; its
time per step is the mean interval between consecutive ``on_train_batch_start`` calls over the
timed steps (everything Lightning does per step, the monitor's logging steps included, amortised).
Two overhead figures are printed:
  direct      the time spent inside the monitor's hook (norms, host transfer, metric dict,
              logger calls), amortised over the timed steps, divided by the reference step time
              (both medians over rounds). Robust on a loaded machine: it times only the work the
              monitor adds.
  end-to-end  the median over rounds of (step time with monitor / reference step time in the same
              round) - 1. Includes indirect effects, but on a shared machine its noise (several
              %) can exceed the effect being measured; read it as a cross-check.

Targets: <= 1 % at log_every_n_steps=50, <= 5 % at every step.

Usage: python benchmarks/callback_overhead.py [--rounds 5] [--steps 150] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from torch_momentum import PolyakSGD
from torch_momentum.callbacks import LayerBalanceMonitor


class _Repeated(Dataset):
    """The same full batch ``length`` times (full-batch training, one epoch)."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batch


class _Module(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.net, self.loss = net, loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return PolyakSGD(self.parameters(), lr=1e-3, momentum=0.9)


def _mlp() -> tuple[nn.Module, tuple[Tensor, Tensor], Callable[[Tensor, Tensor], Tensor]]:
    net = nn.Sequential(
        nn.Linear(1000, 100, bias=False),
        nn.ReLU(),
        nn.Linear(100, 100, bias=False),
        nn.ReLU(),
        nn.Linear(100, 10, bias=False),
    )
    batch = (torch.randn(1000, 1000), torch.randn(1000, 10))
    return net, batch, lambda out, y: ((out - y) ** 2).mean()


def _cnn() -> tuple[nn.Module, tuple[Tensor, Tensor], Callable[[Tensor, Tensor], Tensor]]:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    batch = (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    return net, batch, nn.functional.cross_entropy


MODELS = {"mlp 1000-100-100-10": _mlp, "cnn 2conv+fc": _cnn}
CONFIGS: dict[str, int | None] = {"no monitor": None, "every 50 steps": 50, "every step": 1}


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        timed = self.starts[self.warmup :]
        return (timed[-1] - timed[0]) / (len(timed) - 1)


class _TimedMonitor(LayerBalanceMonitor):
    """The monitor, with the time spent in its per-step hook recorded (after the warm-up)."""

    def __init__(self, warmup: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warmup = warmup
        self.hook_seconds = 0.0

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, *args)
        if trainer.global_step >= self.warmup:
            self.hook_seconds += time.perf_counter() - start


def _run(
    make: Callable, every: int | None, warmup: int, steps: int, logdir: str
) -> tuple[float, float]:
    """(seconds per step, seconds per step inside the monitor's hook)."""
    torch.manual_seed(0)
    net, batch, loss = make()
    timer = _StepTimer(warmup)
    callbacks: list[pl.Callback] = [timer]
    monitor = None
    if every is not None:
        monitor = _TimedMonitor(warmup, log_every_n_steps=every, save_figure=False)
        callbacks.append(monitor)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        log_every_n_steps=50,
        logger=CSVLogger(logdir),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_Module(net, loss), DataLoader(_Repeated(batch, warmup + steps), batch_size=None))
    return timer.seconds_per_step(), (monitor.hook_seconds / steps if monitor else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, lightning {pl.__version__}, threads {threads}")
    print(f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up) per run\n")
    header = (
        f"{'model':<20} {'monitor':<15} {'ms/step':>8} {'hook ms':>8} {'direct':>8}"
        f" {'end-to-end':>11} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as logdir:
        for model_name, make in MODELS.items():
            times: dict[str, list[float]] = {name: [] for name in CONFIGS}
            hooks: dict[str, list[float]] = {name: [] for name in CONFIGS}
            for _ in range(args.rounds):
                order = list(CONFIGS)
                rng.shuffle(order)
                for name in order:
                    step, hook = _run(make, CONFIGS[name], args.warmup, args.steps, logdir)
                    times[name].append(step)
                    hooks[name].append(hook)
            reference = times["no monitor"]
            ref_ms = 1e3 * statistics.median(reference)
            print(f"{model_name:<20} {'no monitor':<15} {ref_ms:>8.2f}")
            for name, every in CONFIGS.items():
                if every is None:
                    continue
                ms = 1e3 * statistics.median(times[name])
                hook_ms = 1e3 * statistics.median(hooks[name])
                paired = statistics.median(
                    t / r for t, r in zip(times[name], reference, strict=True)
                )
                target = "1 %" if every == 50 else "5 %"
                print(
                    f"{model_name:<20} {name:<15} {ms:>8.2f} {hook_ms:>8.3f}"
                    f" {100 * hook_ms / ref_ms:>7.2f}% {100 * (paired - 1):>10.2f}% {target:>7}"
                )


if __name__ == "__main__":
    main()
