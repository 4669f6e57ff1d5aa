"""Cost of ``find_symmetries`` per batch given, against one training step of the same model.

Models (``torch_momentum.demos``), float32, random data of the right shape:

* ``resnet``: ``ResNetCNN()`` (19,706 parameters) on a batch of 64 images 1x8x8, 10 classes,
  cross-entropy;
* ``gpt2``: ``gpt2_tiny()`` (GPT-2 from transformers, 2 layers, width 32, vocabulary 64) on a
  batch of 8 sequences of 32 tokens, next-token cross-entropy computed from the logits.

Reference: one training step, ``zero_grad`` + forward + backward + ``torch.optim.SGD.step``, on
the same model and batch. Candidates, each ``find_symmetries(model, loss_fn, [batch] * B)``
divided by ``B`` (the batches given; B = 4 by default):

* ``float64``: the default, every batch verified in float64 at the current and at the perturbed
  point (two float64 forward/backward passes per batch, one more on the first batch, and one
  with the norm layers' real eps);
* ``float64, perturbed_batches=1``: the perturbed point on the first batch only;
* ``float32, rtol=1e-4, perturbed_batches=1``: verification in the model's dtype.

Rounds interleave all candidates in a shuffled order (``_timing.interleave``); the ratio of a
round is (candidate time / B) / (step time of the same round); the table shows the median over
rounds and the 25-75 % range. The issue's target is a ratio <= 3.

Why float64 costs what it costs on a CPU: a float64 forward + backward pass of the ResNet takes
about 3x a float32 training step (convolutions have oneDNN kernels for float32 only; float64
falls back to im2col + GEMM per sample), of GPT-2 tiny about 1.5-2x (the model is small enough
that Python overhead dominates). The verification arithmetic itself (inner products, zero-slice
checks) is measured separately as the difference to the gradient evaluations.

Measured on the 2-core development machine (shared, ``--clock cpu``, 1 thread), median ratio
[25-75 %], B = 4 / B = 16:

=========  ==========================  ============================  ========================
model      float64 (default)           float64, perturbed_batches=1  float32, rtol=1e-4, pb=1
=========  ==========================  ============================  ========================
resnet     7.9x [7.1, 9.0] / 6.4x      5.9x [5.5, 6.1] / 3.5x        2.5x [2.3, 2.6] / 1.5x
gpt2       6.1x [5.8, 6.4] / 4.4x      4.6x [4.3, 4.8] / 2.6x        3.7x [3.5, 4.0] / 2.1x
=========  ==========================  ============================  ========================

(3 rounds each, with the finite moves along every found symmetry: two forward passes more per
discovery.) The default (every batch at both points, float64) does not reach 3x on a CPU: it
runs two float64 passes per batch. The target is met with ``perturbed_batches=1`` at 16 batches
for GPT-2, and with float32 verification at 16 batches for both (at 4 for the CNN).

Run: python benchmarks/symmetry_discovery.py [--rounds 7] [--batches 4] [--threads 1]
[--clock wall|cpu] [--device cpu|cuda] [--quick]. On a machine shared with other jobs,
``--clock cpu`` (process CPU time, one thread) gives the most stable ratios.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_momentum.balance.symmetry import find_symmetries
from torch_momentum.demos import ResNetCNN, gpt2_tiny

try:
    from ._timing import interleave, paired_ratio, quantile
except ImportError:
    from _timing import interleave, paired_ratio, quantile

TARGET = 3.0


def image_loss(model: nn.Module, batch: Any) -> Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def token_loss(model: nn.Module, ids: Tensor) -> Tensor:
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def cases(
    quick: bool, device: torch.device
) -> dict[str, tuple[nn.Module, Callable[..., Tensor], Any]]:
    torch.manual_seed(0)
    size = 16 if quick else 64
    images = (
        torch.randn(size, 1, 8, 8, device=device),
        torch.randint(0, 10, (size,), device=device),
    )
    ids = torch.randint(0, 64, (4 if quick else 8, 32), device=device)
    return {
        "resnet": (ResNetCNN().to(device), image_loss, images),
        "gpt2": (gpt2_tiny().to(device), token_loss, ids),
    }


VARIANTS: dict[str, dict[str, Any]] = {
    "float64": {},
    "float64, perturbed_batches=1": {"perturbed_batches": 1},
    "float32, rtol=1e-4, perturbed_batches=1": {
        "dtype": torch.float32,
        "rtol": 1e-4,
        "perturbed_batches": 1,
    },
}


def jobs(
    model: nn.Module, loss_fn: Callable[..., Tensor], batch: Any, count: int
) -> dict[str, Callable[[], object]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()

    def discovery(options: dict[str, Any]) -> Callable[[], object]:
        return lambda: find_symmetries(model, loss_fn, [batch] * count, **options)

    out: dict[str, Callable[[], object]] = {"step": step}
    out |= {name: discovery(options) for name, options in VARIANTS.items()}
    return out


def check(model: nn.Module, loss_fn: Callable[..., Tensor], batch: Any) -> str:
    """The variants find the same symmetries (else the timing compares different work)."""
    found = [
        [(s.kind, s.name) for s in find_symmetries(model, loss_fn, [batch], **options)]
        for options in VARIANTS.values()
    ]
    assert all(f == found[0] for f in found), "the variants disagree"
    return f"{len(found[0])} symmetries"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=4, help="batches given (B)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, insensitive to other jobs on a shared machine (1 thread)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, B = 2")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: CUDA events time")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rounds, count = (2, 2) if args.quick else (args.rounds, args.batches)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="transformers")
    print(f"find_symmetries per batch given (B = {count}) / one SGD training step, same model and")
    print(
        f"batch; {rounds} interleaved rounds, {args.threads} thread(s), {args.clock} clock,"
        f" target <= {TARGET:g}x"
    )
    print(f"{'model':<8} {'variant':<42} {'ms/batch':>9} {'step ms':>8} {'ratio':>7}  25-75 %")
    for name, (model, loss_fn, batch) in cases(args.quick, device).items():
        what = check(model, loss_fn, batch)
        times = interleave(
            jobs(model, loss_fn, batch, count),
            rounds=rounds,
            warmup=1,
            clock=args.clock,
            device=device,
        )
        step = times["step"]
        for variant in VARIANTS:
            per_batch = [t / count for t in times[variant]]
            ratios = [a / b for a, b in zip(per_batch, step, strict=True)]
            print(
                f"{name:<8} {variant:<42} {1e3 * sorted(per_batch)[len(per_batch) // 2]:9.1f}"
                f" {1e3 * sorted(step)[len(step) // 2]:8.2f} {paired_ratio(per_batch, step):6.2f}x"
                f"  [{quantile(ratios, 0.25):.2f}, {quantile(ratios, 0.75):.2f}]"
            )
        print(f"{'':<8} ({what}, the same for every variant)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
