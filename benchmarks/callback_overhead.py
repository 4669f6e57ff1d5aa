"""Overhead of LayerBalanceMonitor on the training-step time, Lightning on CPU.

Models:
  mlp  the demo's network: bias-free ReLU MLP 1000 -> 100 -> 100 -> 10, square loss, 1000 points,
       full batch (examples/layer_balance.py), float32
  cnn  a small CNN: conv3x3(3->16) ReLU maxpool, conv3x3(16->32) ReLU maxpool, linear(2048->10),
       cross-entropy, a batch of 64 random 32x32 RGB images, float32

Configurations, per model: no monitor (reference), LayerBalanceMonitor(log_every_n_steps=50),
LayerBalanceMonitor(log_every_n_steps=1), LayerBalanceMonitor(log_every_n_steps=50, ledger=True)
(the ledger reads every optimiser step), LayerBalanceMonitor(log_every_n_steps=50, neurons=True);
all with a CSVLogger, Trainer(log_every_n_steps=50), PolyakSGD, save_figure=False.

Method: each round fits every configuration once, in a freshly shuffled order (so that load on a
shared machine hits all alike). A run takes WARMUP untimed steps and then STEPS timed steps; its
time per step is the mean interval between consecutive ``on_train_batch_start`` calls over the
timed steps (everything Lightning does per step, the monitor's logging steps included, amortised).
Two overhead figures are printed:
  direct      the time spent inside the monitor's hook (norms, host transfer, metric dict,
              logger calls) and, with the ledger, inside its optimiser step pre/post hooks,
              amortised over the timed steps, divided by the reference step time (both medians
              over rounds). Robust on a loaded machine: it times only the work the monitor adds.
  end-to-end  the median over rounds of (step time with monitor / reference step time in the same
              round) - 1. Includes indirect effects, but on a shared machine its noise (several
              %) can exceed the effect being measured; read it as a cross-check.

  ledger on/off the ledger's cost measured inside one fit: the ledger is switched on and off in
              alternating blocks of BLOCK steps (its hook returns at once while off), the first
              step of every block (it may carry effects of the other state) and the run's last
              step (it includes the end of training) are dropped, and
              median(step time on) / median(step time off) - 1 is taken per fit (median over
              rounds). Both states share the process, the data and the machine's momentary
              load, so it is less exposed to drift between fits than the end-to-end figure. It
              can be lower than the direct figure: part of the time inside the hook (the first
              kernels after the backward pass run several times slower than warm ones) is a cost
              the code after the step pays anyway when the ledger does not run (measured on the
              demo MLP: close to the direct figure, 4.4-4.7 % against 4.7 %).

Targets: <= 1 % at log_every_n_steps=50 (also with neurons=True), <= 5 % at every step and with
the ledger (every step).

Usage: python benchmarks/callback_overhead.py [--rounds 5] [--steps 150] [--threads N] [--quick]
(--quick: one round of 3 steps of the MLP, a smoke test; its ratios are not meaningful.) On a
shared machine pass --threads 1: oversubscribed intra-op threads make small kernels erratic.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from torch_momentum import PolyakSGD
from torch_momentum.callbacks import LayerBalanceMonitor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import quiet_lightning
from _steptimer import StepTimer


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
CONFIGS: dict[str, dict[str, Any] | None] = {
    "no monitor": None,
    "every 50 steps": {"log_every_n_steps": 50},
    "every step": {"log_every_n_steps": 1},
    "ledger, every 50": {"log_every_n_steps": 50, "ledger": True},
    "neurons, every 50": {"log_every_n_steps": 50, "neurons": True},
}
TARGETS = {"every 50 steps": "1 %", "every step": "5 %", "ledger, every 50": "5 %"}
TARGETS["neurons, every 50"] = "1 %"
BLOCK = 4  # steps per on/off block of the ledger A/B run


class _TimedMonitor(LayerBalanceMonitor):
    """The monitor, with the time spent in its per-step hook recorded (after the warm-up)."""

    def __init__(self, warmup: int, alternate: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warmup = warmup
        self.hook_seconds = 0.0
        self.alternate = alternate  # > 0: ledger on/off in blocks of this many steps
        self.ledger_on: list[bool] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.alternate and self._ledger is not None:
            on = (trainer.global_step // self.alternate) % 2 == 0
            self._ledger.active = on  # while off, its step hook returns at once
            self.ledger_on.append(on)

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, *args)
        self._timed = trainer.global_step >= self.warmup
        if self._timed:
            self.hook_seconds += time.perf_counter() - start

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._timed = False
        ledger = self._ledger
        if ledger is not None and self.ledger:  # time the ledger's optimiser step hooks too
            ledger.detach()
            for name in ("_before", "_after"):
                setattr(ledger, name, self._timing(getattr(ledger, name)))
            ledger.attach()

    def _timing(self, hook: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = hook(*args, **kwargs)
            if self._timed:
                self.hook_seconds += time.perf_counter() - start
            return out

        return timed


def _run(
    make: Callable,
    config: dict[str, Any] | None,
    warmup: int,
    steps: int,
    logdir: str,
    alternate: int = 0,
) -> tuple[float, float]:
    """(seconds per step, seconds per step inside the monitor's hook); with ``alternate``:
    (median step time with the ledger on / off - 1, 0)."""
    torch.manual_seed(0)
    net, batch, loss = make()
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    monitor = None
    if config is not None:
        monitor = _TimedMonitor(warmup, alternate=alternate, save_figure=False, **config)
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
    if alternate:
        assert monitor is not None
        return _on_off_ratio(timer.starts, monitor.ledger_on, warmup, alternate) - 1.0, 0.0
    return timer.seconds_per_step(warmup), (monitor.hook_seconds / steps if monitor else 0.0)


def _on_off_ratio(starts: list[float], on: list[bool], warmup: int, block: int) -> float:
    """median(step time | on) / median(step time | off): step ``i`` lasts from batch start ``i``
    to batch start ``i + 1``; warm-up steps, the first step of every block and the last step
    (it runs to the end of training, epoch-end work included) are dropped."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for i, state in enumerate(on[: len(starts) - 2]):
        if i >= warmup and i % block != 0:
            times[state].append(starts[i + 1] - starts[i])
    if not times[True] or not times[False]:
        raise ValueError(f"need steps in both states after warm-up, got {len(on)} steps")
    return statistics.median(times[True]) / statistics.median(times[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 3 steps, MLP")
    args = parser.parse_args()
    models = MODELS
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
        models = {k: v for k, v in MODELS.items() if k.startswith("mlp")}
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()  # the examples' warning filters and log level

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, lightning {pl.__version__}, threads {threads}")
    print(f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up) per run\n")
    header = (
        f"{'model':<20} {'monitor':<18} {'ms/step':>8} {'hook ms':>8} {'direct':>8}"
        f" {'end-to-end':>11} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as logdir:
        for model_name, make in models.items():
            times: dict[str, list[float]] = {name: [] for name in CONFIGS}
            hooks: dict[str, list[float]] = {name: [] for name in CONFIGS}
            on_off: list[float] = []
            for _ in range(args.rounds):
                order = [*CONFIGS, "ledger on/off"]
                rng.shuffle(order)
                for name in order:
                    if name == "ledger on/off":
                        config, block = CONFIGS["ledger, every 50"], 2 if args.quick else BLOCK
                        steps = max(args.steps, 3 * block)  # both states after the drops
                        on_off.append(_run(make, config, args.warmup, steps, logdir, block)[0])
                        continue
                    step, hook = _run(make, CONFIGS[name], args.warmup, args.steps, logdir)
                    times[name].append(step)
                    hooks[name].append(hook)
            reference = times["no monitor"]
            ref_ms = 1e3 * statistics.median(reference)
            print(f"{model_name:<20} {'no monitor':<18} {ref_ms:>8.2f}")
            for name, config in CONFIGS.items():
                if config is None:
                    continue
                ms = 1e3 * statistics.median(times[name])
                hook_ms = 1e3 * statistics.median(hooks[name])
                paired = statistics.median(
                    t / r for t, r in zip(times[name], reference, strict=True)
                )
                target = TARGETS[name]
                print(
                    f"{model_name:<20} {name:<18} {ms:>8.2f} {hook_ms:>8.3f}"
                    f" {100 * hook_ms / ref_ms:>7.2f}% {100 * (paired - 1):>10.2f}% {target:>7}"
                )
            ratio = 100 * statistics.median(on_off)
            spread = ", ".join(f"{100 * r:+.2f}" for r in on_off)
            print(
                f"{model_name:<20} {'ledger on/off':<18} {'':>8} {'':>8} {'':>8} {ratio:>10.2f}%"
                f" {TARGETS['ledger, every 50']:>7}   (rounds: {spread} %)"
            )


if __name__ == "__main__":
    main()
