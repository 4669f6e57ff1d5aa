"""Overhead of LayerBalanceMonitor on the training-step time, Lightning on CPU.

Models, float32:
  mlp       the demo's network: bias-free ReLU MLP 1000 -> 100 -> 100 -> 10, square loss, 1000
            points, full batch (examples/layer_balance.py)
  cnn       a small CNN: conv3x3(3->16) ReLU maxpool, conv3x3(16->32) ReLU maxpool, linear
            (2048->10), cross-entropy, a batch of 64 random 32x32 RGB images
  resnet    ResNetCNN() of torch_momentum.demos (19,706 parameters: the ResNet-style CNN of the
            symmetry discovery), cross-entropy, a batch of 64 random 1x8x8 images
  resnet18  ResNetCNN(widths=(64, 128, 256, 512), blocks=2): ResNet-18's layout and size (11.2 M
            parameters) on 1x8x8 images, batch 64
  vit       TinyViT() (12 pre-LN blocks, width 32, patches 2x2), 1x8x8 images, batch 64
  gpt2      gpt2_tiny(n_layer=4) (GPT-2 of transformers: width 32, 2 heads, vocabulary 64), 16
            sequences of 32 tokens, next-token cross-entropy

Configurations: mlp and cnn measure the layer mode, each with the layers the monitor found before
it had a default mode (every module owning parameters: ``layers=`` the Linear/Conv modules): no
monitor (reference), every 50 steps, every step, every 50 steps with the ledger (read every
optimiser step), every 50 steps with ``neurons=True``. resnet, resnet18, vit and gpt2 measure the
default mode (no ``layers=``: the model's symmetries, found at the first batch): no monitor, the
monitor at the Trainer's cadence (``log_every_n_steps=50``), and with ``ledger=True`` (every
symmetry's ledger, every optimiser step). All with a CSVLogger, Trainer(log_every_n_steps=50),
PolyakSGD(lr 1e-3, momentum 0.9), save_figure=False.

Method: each round fits every configuration once, in a freshly shuffled order (so that load on a
shared machine hits all alike). A run takes WARMUP untimed steps, then STEPS steps of which all
but the last are timed (the last optimiser step of a fit is always logged: left out, so that with
STEPS a multiple of 50 the logging steps count at their share); its time per step is the mean
interval between consecutive ``on_train_batch_start`` calls over the timed steps (everything
Lightning does per step, the monitor's logging steps included, amortised). Figures,
each as the median over rounds and its range [min, max]:
  direct      the time spent inside the monitor's hooks (norms, host transfer, metric dict,
              logger calls, the angle of a logging step) and, with the ledger, inside its
              optimiser step pre/post hooks (timed from outside by torch's public optimiser
              step hooks registered around them), amortised over the timed steps, divided by
              the reference step time of the same round. Robust on a loaded machine: it times only
              the work the monitor adds.
  end-to-end  (step time with monitor / reference step time in the same round) - 1. Includes
              indirect effects, but on a shared machine its noise (several %) can exceed the
              effect being measured; read it as a cross-check.
  ledger on/off the ledger's cost measured inside one fit: the ledger is switched on and off in
              alternating blocks of BLOCK steps (its hook returns at once while off), the first
              step of every block (it may carry effects of the other state) and the run's last
              step (it includes the end of training) are dropped, and
              median(step time on) / median(step time off) - 1 is taken per fit. Both states
              share the process, the data and the machine's momentary load, so it is less
              exposed to drift between fits than the end-to-end figure. It can be lower than the
              direct figure: part of the time inside the hook (the first kernels after the
              backward pass run several times slower than warm ones) is a cost the code after
              the step pays anyway when the ledger does not run.
  discovery   default mode: the one-time cost at the first batch (``find_symmetries`` on that
              batch and recording the origin), in seconds and in reference steps. It is not in
              the per-step figures (the first batch is a warm-up step).

Targets: layer mode <= 1 % at log_every_n_steps=50 (also with neurons=True), <= 5 % at every step
and with the ledger (every step); default mode <= 2 % at the default cadence, <= 5 % with the
ledger every step.

Usage: python benchmarks/callback_overhead.py [--rounds 5] [--steps 150] [--threads N]
[--models mlp,cnn,...] [--quick] (resnet18 runs 3 rounds of 100 steps unless told otherwise:
about 0.5 s per step)
(--quick: one round of 3 steps of the MLP and the small ResNet, a smoke test; its ratios are not
meaningful.) On a shared machine pass --threads 1: oversubscribed intra-op threads make small
kernels erratic.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from torch_momentum.callbacks import LayerBalanceMonitor
from torch_momentum.demos import ReluMLP, ResNetCNN, TinyViT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import quiet_lightning
from _fit import LossModule, RepeatedBatch, Task, cross_entropy, gpt2, images, model_names
from _steptimer import StepTimer


def _mlp() -> Task:
    net = ReluMLP(1000, (100, 100), 10, bias=False)
    batch = (torch.randn(1000, 1000), torch.randn(1000, 10))
    return net, batch, lambda net, b: ((net(b[0]) - b[1]) ** 2).mean()


def _cnn() -> Task:
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
    return net, batch, cross_entropy


class Model(NamedTuple):
    """A benchmarked model: its maker, configurations (None: the reference), targets, and the
    configuration whose ledger the on/off run switches."""

    make: Callable[[], Task]
    configs: dict[str, dict[str, Any] | None]
    targets: dict[str, str]
    ledger: str
    steps: int = 150  # timed steps per run unless --steps
    rounds: int = 5  # unless --rounds


def _layer_mode(layers: list[str]) -> dict[str, dict[str, Any] | None]:
    """The layer-mode configurations, with the layers the monitor's old default found."""
    return {
        "no monitor": None,
        "every 50 steps": {"layers": layers, "log_every_n_steps": 50},
        "every step": {"layers": layers, "log_every_n_steps": 1},
        "ledger, every 50": {"layers": layers, "log_every_n_steps": 50, "ledger": True},
        "neurons, every 50": {"layers": layers, "log_every_n_steps": 50, "neurons": True},
    }


LAYER_TARGETS = {
    "every 50 steps": "1 %",
    "every step": "5 %",
    "ledger, every 50": "5 %",
    "neurons, every 50": "1 %",
}
DEFAULT_MODE: dict[str, dict[str, Any] | None] = {
    "no monitor": None,
    "default, every 50": {},
    "ledger, every step": {"ledger": True},
}
DEFAULT_TARGETS = {"default, every 50": "2 %", "ledger, every step": "5 %"}

MODELS = {
    "mlp": Model(_mlp, _layer_mode(["net.0", "net.2", "net.4"]), LAYER_TARGETS, "ledger, every 50"),
    "cnn": Model(_cnn, _layer_mode(["net.0", "net.3", "net.7"]), LAYER_TARGETS, "ledger, every 50"),
    "resnet": Model(
        lambda: images(ResNetCNN(), 64), DEFAULT_MODE, DEFAULT_TARGETS, "ledger, every step"
    ),
    "resnet18": Model(  # ~0.5 s per step: fewer steps and rounds by default (~12 minutes)
        lambda: images(ResNetCNN(widths=(64, 128, 256, 512), blocks=2), 64),
        DEFAULT_MODE,
        DEFAULT_TARGETS,
        "ledger, every step",
        steps=100,
        rounds=3,
    ),
    "vit": Model(
        lambda: images(TinyViT(), 64), DEFAULT_MODE, DEFAULT_TARGETS, "ledger, every step"
    ),
    "gpt2": Model(lambda: gpt2(16), DEFAULT_MODE, DEFAULT_TARGETS, "ledger, every step"),
}
BLOCK = 4  # steps per on/off block of the ledger A/B run


class _TimedMonitor(LayerBalanceMonitor):
    """The monitor, with the time spent in its hooks recorded (after the warm-up), and the time
    of its first batch (the default mode's discovery).

    With ``ledger=True`` the time of the ledger's optimiser step hooks is recorded too, from
    outside, by torch's public optimiser hooks. ``Optimizer.step`` runs the global pre-hooks, then
    the optimiser's own pre-hooks in registration order, the step (with Lightning's closure:
    forward, backward, ``on_before_optimizer_step``), the optimiser's own post-hooks in
    registration order, then the global post-hooks. The monitor attaches the ledger's hooks at the
    start of training (layer mode) or at the first batch (default mode); this class registers its
    post-hook before that and its pre-hook after, so that the ledger's pre-hook is what runs
    between the global pre-hook and this pre-hook, and its post-hook what runs between this
    post-hook and the global one. Call :meth:`remove_hooks` after the fit (the global hooks
    would see every later optimiser step of the process)."""

    def __init__(self, warmup: int, stop: int, alternate: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warmup, self.stop = warmup, stop
        self.hook_seconds = 0.0
        self.first_batch_seconds: float | None = None
        self.alternate = alternate  # > 0: ledger on/off in blocks of this many steps
        self.ledger_on: list[bool] = []
        self.timed = False  # whether the current step is a timed one
        self.marks: dict[str, float] = {}  # perf_counter() at the last "start" and "post" mark
        self.handles: list[RemovableHandle] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ledger:  # before the monitor attaches the ledger (layer mode: in this hook)
            self.handles += [
                register_optimizer_step_pre_hook(self.mark("start")),
                trainer.optimizers[0].register_step_post_hook(self.mark("post")),
                register_optimizer_step_post_hook(self.add_since("post")),
            ]
        super().on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_start(trainer, *args)
        if self.first_batch_seconds is None:
            self.first_batch_seconds = time.perf_counter() - start
            if self.ledger:  # the ledger is attached by now: this pre-hook runs after its one
                pre = trainer.optimizers[0].register_step_pre_hook(self.add_since("start"))
                self.handles.append(pre)
        self.timed = self.warmup <= trainer.global_step < self.stop
        ledger = self.balance_ledger
        if self.alternate and ledger is not None:
            on = (trainer.global_step // self.alternate) % 2 == 0
            ledger.active = on  # while off, its step hooks return at once
            self.ledger_on.append(on)

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, *args)
        if self.timed:
            self.hook_seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(trainer, *args)  # the angle of a logging step
        if self.timed:
            self.hook_seconds += time.perf_counter() - start

    def remove_hooks(self) -> None:
        """Remove the optimiser hooks this class registered."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def mark(self, key: str) -> Callable[..., None]:
        """An optimiser hook that records the time as ``marks[key]``."""

        def mark(*args: Any) -> None:
            self.marks[key] = time.perf_counter()

        return mark

    def add_since(self, key: str) -> Callable[..., None]:
        """An optimiser hook that adds the time since ``marks[key]`` to ``hook_seconds`` (timed
        steps only)."""

        def add(*args: Any) -> None:
            if self.timed:
                self.hook_seconds += time.perf_counter() - self.marks[key]

        return add


class _Result(NamedTuple):
    step: float  # seconds per step
    hook: float  # seconds per step inside the monitor's hooks
    first_batch: float | None  # seconds of the monitor's first batch (default mode: discovery)
    on_off: float | None  # the on/off run: median step time on / off - 1


def _run(
    make: Callable,
    config: dict[str, Any] | None,
    warmup: int,
    steps: int,
    logdir: str,
    alternate: int = 0,
) -> _Result:
    torch.manual_seed(0)
    net, batch, loss = make()
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    monitor = None
    if config is not None:
        monitor = _TimedMonitor(
            warmup, warmup + steps - 1, alternate=alternate, save_figure=False, **config
        )
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
    with warnings.catch_warnings():  # what the monitor says about the model, once per fit
        warnings.filterwarnings("ignore", ".*LayerBalanceMonitor.*")
        loader = DataLoader(RepeatedBatch(batch, warmup + steps), batch_size=None)
        try:
            trainer.fit(LossModule(net, loss, lr=1e-3, momentum=0.9), loader)
        finally:
            if monitor is not None:
                monitor.remove_hooks()
    if alternate:
        assert monitor is not None
        ratio = _on_off_ratio(timer.starts, monitor.ledger_on, warmup, alternate) - 1.0
        return _Result(0.0, 0.0, None, ratio)
    # the timed steps: warmup .. warmup + steps - 2; the last step (logged whatever the cadence,
    # as the end of fit) is left out, so that the logging steps count at their share
    starts = timer.starts
    step = (starts[warmup + steps - 1] - starts[warmup]) / (steps - 1)
    if monitor is None:
        return _Result(step, 0.0, None, None)
    first = monitor.first_batch_seconds if monitor.layers is None else None
    return _Result(step, monitor.hook_seconds / (steps - 1), first, None)


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


def _spread(values: list[float]) -> str:
    """``median [min, max]`` of percentages."""
    return f"{statistics.median(values):6.2f} [{min(values):.2f}, {max(values):.2f}]"


def _measure(
    model: Model, rounds: int, warmup: int, steps: int, block: int, logdir: str, rng: random.Random
) -> dict[str, list[_Result]]:
    """Every configuration of ``model`` (and its ledger on/off run) once per round, shuffled."""
    results: dict[str, list[_Result]] = {name: [] for name in [*model.configs, "ledger on/off"]}
    for _ in range(rounds):
        order = list(results)
        rng.shuffle(order)
        for name in order:
            if name == "ledger on/off":
                on_off_steps = max(steps, 3 * block)  # both states after the drops
                config = model.configs[model.ledger]
                results[name].append(_run(model.make, config, warmup, on_off_steps, logdir, block))
            else:
                results[name].append(_run(model.make, model.configs[name], warmup, steps, logdir))
    return results


def _report(name: str, model: Model, results: dict[str, list[_Result]]) -> None:
    reference = [r.step for r in results["no monitor"]]
    ref_ms = 1e3 * statistics.median(reference)
    print(f"{name:<9} {'no monitor':<19} {ref_ms:>8.2f}")
    firsts: list[float] = []
    for config, runs in results.items():
        if config in ("no monitor", "ledger on/off"):
            continue
        ms = 1e3 * statistics.median(r.step for r in runs)
        hook_ms = 1e3 * statistics.median(r.hook for r in runs)
        direct = [100 * r.hook / ref for r, ref in zip(runs, reference, strict=True)]
        paired = [100 * (r.step / ref - 1) for r, ref in zip(runs, reference, strict=True)]
        print(
            f"{name:<9} {config:<19} {ms:>8.2f} {hook_ms:>8.3f} {_spread(direct):>24}"
            f" {_spread(paired):>24} {model.targets[config]:>7}"
        )
        firsts += [r.first_batch for r in runs if r.first_batch is not None]
    on_off = [100 * r.on_off for r in results["ledger on/off"] if r.on_off is not None]
    print(
        f"{name:<9} {'ledger on/off':<19} {'':>8} {'':>8} {'':>24} {_spread(on_off):>24}"
        f" {model.targets[model.ledger]:>7}"
    )
    if firsts:
        seconds = statistics.median(firsts)
        print(
            f"{name:<9} {'discovery (once)':<19} first batch {seconds:.2f} s [{min(firsts):.2f},"
            f" {max(firsts):.2f}] = {1e3 * seconds / ref_ms:.1f} reference steps (not in the"
            " per-step figures)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (resnet18: 3)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per run, default 150 (resnet18: 100)"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 3 steps")
    args = parser.parse_args()
    names = model_names(parser, args.models, MODELS)
    block = BLOCK
    if args.quick:
        args.rounds, args.steps, args.warmup, block = 1, 3, 1, 2
        names = ["mlp", "resnet"]
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()  # the examples' warning filters and log level

    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, threads {torch.get_num_threads()}"
    )
    if args.rounds is not None or args.steps is not None:
        print(f"{args.rounds or 'default'} rounds x {args.steps or 'default'} steps per run")
    print(f"{args.warmup} warm-up steps per run, then the timed ones (all but the last)")
    print("direct and end-to-end: % of the reference step, median [min, max] over rounds\n")
    header = (
        f"{'model':<9} {'monitor':<19} {'ms/step':>8} {'hook ms':>8} {'direct %':>24}"
        f" {'end-to-end %':>24} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as logdir:
        for name in names:
            model = MODELS[name]
            rounds, steps = args.rounds or model.rounds, args.steps or model.steps
            results = _measure(model, rounds, args.warmup, steps, block, logdir, rng)
            _report(name, model, results)
            print(f"{'':<9} ({rounds} rounds x {steps} steps per run)")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
