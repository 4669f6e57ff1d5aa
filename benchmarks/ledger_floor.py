"""The ledger's cost per optimiser step against the floor of its design, on the CPU.

The ledger of every symmetry reduces, each step, the weight, velocity and gradient of every unit
to their per-unit Gram matrices: tensors of one layout (shape, and the dimension that holds the
units) are stacked and reduced by one batched matrix product, then mapped to the ledger's terms
and summed into the units. This script asks how much of the ledger's time is that irreducible
part, on the reference models of the symmetry discovery, in float32, one thread:

* ``step``: ``zero_grad`` + forward + backward + ``PolyakSGD.step`` (lr 1e-3, momentum 0.9),
  without the ledger: the reference;
* ``ledger``: ``opt.step()`` with a ``BalanceLedger`` of every symmetry ``find_symmetries``
  reports attached, minus ``opt.step()`` without it (both on the same gradients);
* ``floor``: only the stacks and batched products, written from the symmetries' public parts:
  per layout group, one ``torch.stack`` of the members' (weight, velocity, gradient) and one
  ``torch.bmm`` (an elementwise product for one entry per row, a sum for a linear charge); no
  mapping to terms, no sums into units, no Python bookkeeping;
* with ``--compile``: the floor under ``torch.compile`` (needs a C++ compiler; compiling takes
  10-20 s a model, not timed).

Rounds interleave all candidates in a shuffled order (``_timing.interleave``, CPU clock); the
table shows each as a share of the step time of the same round, median and range over rounds.

Measured on the 2-core development machine (shared; ``--rounds 5 --compile``), median [min,
max] over rounds:

=========  ========  =====================  =====================  =====================
model      step ms   ledger                 floor                  floor, compiled
=========  ========  =====================  =====================  =====================
resnet     9.60      7.6 % [6.9, 8.0]       3.2 % [3.0, 3.9]       3.8 % [3.6, 4.3]
gpt2       14.61     7.1 % [6.3, 7.9]       4.0 % [3.5, 4.0]       5.6 % [5.1, 6.5]
=========  ========  =====================  =====================  =====================

The floor alone is 3-4 % of the step; the rest of the ledger (mapping the Gram entries to the
terms, summing them into the units, the angle statistics, the Python that reads each step's
slots) costs about as much again. Compiled, the floor is slower than eager: its guards check
every tensor argument on each call, more than the kernels it saves.

Usage: python benchmarks/ledger_floor.py [--rounds 5] [--models resnet,gpt2] [--compile]
[--quick] (``--quick``: 2 rounds of the ResNet, a smoke test).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from torch_momentum import PolyakSGD
from torch_momentum.balance import BalanceLedger, find_symmetries
from torch_momentum.demos import ResNetCNN

try:
    from ._fit import Task, gpt2, images, model_names
    from ._timing import interleave, quantile
except ImportError:
    from _fit import Task, gpt2, images, model_names
    from _timing import interleave, quantile

TARGET = 0.05


def cases() -> dict[str, Callable[[], Task]]:
    """The models and batches of ``benchmarks/callback_overhead.py``'s resnet and gpt2 rows."""
    return {"resnet": lambda: images(ResNetCNN(), 64), "gpt2": lambda: gpt2(16)}


def layout_groups(
    model: nn.Module, symmetries: list[Any]
) -> list[tuple[list[nn.Parameter], int | None, bool]]:
    """``(members, dim, linear)`` per layout: the parameters whose units lie along ``dim``
    (None: the whole tensor), grouped by shape, as the ledger stacks them."""
    params = dict(model.named_parameters())
    groups: dict[tuple[Any, ...], list[nn.Parameter]] = {}
    for symmetry in symmetries:
        linear = symmetry.kind in ("translation", "zero_gradient")
        for part in symmetry.parts:
            p = params[part.param]
            members = groups.setdefault((tuple(p.shape), part.dim, linear), [])
            if all(q is not p for q in members):
                members.append(p)
    return [(members, key[1], key[2]) for key, members in groups.items()]


def floor_step(
    groups: list[tuple[list[nn.Parameter], int | None, bool]],
    opt: torch.optim.Optimizer,
    compile_it: bool = False,
) -> Callable[[], list[Tensor]]:
    """The stacks and batched products of one ledger step, nothing else (compiled: the
    reductions, with the step's tensors passed in, so that new gradients do not recompile)."""
    layout = [
        (len(members), tuple(members[0].shape), dim, linear) for members, dim, linear in groups
    ]

    def reduce(tensors: list[list[Tensor]]) -> list[Tensor]:
        out = []
        for (k, shape, dim, linear), group in zip(layout, tensors, strict=True):
            d = 0 if dim is None else dim
            n = 1 if dim is None else shape[d]
            if d == 0:
                y = torch.stack(group, 1 if dim is not None else 0).view(n * k, 3, -1)
            else:  # units along a later dimension: moved to the front (a copy)
                y = torch.stack(group).movedim(d + 1, 0).reshape(n * k, 3, -1)
            if linear:
                out.append(y.sum(2, dtype=torch.float64))
            elif y.shape[-1] == 1:
                out.append(y * y.transpose(1, 2))
            else:
                out.append(torch.bmm(y, y.transpose(1, 2)))
        return out

    kernel = torch.compile(reduce, dynamic=False) if compile_it else reduce

    def run() -> list[Tensor]:
        tensors = [
            [
                t
                for p in members
                for t in (p.detach(), opt.state[p]["velocity"], cast(Tensor, p.grad))
            ]
            for members, _, _ in groups
        ]
        return kernel(tensors)

    return run


def candidates(name: str, compile_floor: bool) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    model, batch, loss_fn = cases()[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notices about the loss type
        symmetries = list(find_symmetries(model, loss_fn, [batch]))
    opt = PolyakSGD(model.parameters(), lr=1e-3, momentum=0.9)
    ledger = BalanceLedger(None, opt, module=model, symmetries=symmetries)

    def train_step() -> None:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    ledger.attach()
    train_step()  # the velocities exist
    train_step()

    def with_ledger() -> None:
        ledger.active = True
        opt.step()

    def without_ledger() -> None:
        ledger.active = False  # its step hooks return at once
        opt.step()

    found: dict[str, Callable[[], object]] = {
        "step": train_step,
        "with ledger": with_ledger,
        "without ledger": without_ledger,
        "floor": floor_step(layout_groups(model, symmetries), opt),
    }
    if compile_floor:
        compiled = floor_step(layout_groups(model, symmetries), opt, compile_it=True)
        with torch.no_grad():
            compiled()  # compile once, untimed
        found["floor, compiled"] = compiled
    return found


def share(times: dict[str, list[float]], num: str, den: str | None = None) -> str:
    """``num`` (minus ``den``) over the step time of the same round: median [min, max]."""
    ratios = sorted(
        (a - (times[den][r] if den else 0.0)) / times["step"][r] for r, a in enumerate(times[num])
    )
    return f"{100 * quantile(ratios, 0.5):.1f} % [{100 * ratios[0]:.1f}, {100 * ratios[-1]:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="resnet,gpt2")
    parser.add_argument("--compile", action="store_true", help="also the compiled floor")
    parser.add_argument("--quick", action="store_true", help="2 rounds of the ResNet")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = ["resnet"] if args.quick else model_names(parser, args.models, cases())
    rounds = 2 if args.quick else args.rounds
    print(f"torch {torch.__version__}, 1 thread, {rounds} rounds, share of the step time")
    print(f"{'model':8s} {'step ms':>8s}  {'ledger':22s} {'floor':22s} floor, compiled")
    for name in models:
        jobs = candidates(name, args.compile)
        times = interleave(jobs, rounds=rounds, inner=20, clock="cpu")
        step_ms = 1e3 * quantile(times["step"], 0.5)
        ledger = share(times, "with ledger", "without ledger")
        compiled = share(times, "floor, compiled") if "floor, compiled" in times else "-"
        print(f"{name:8s} {step_ms:8.2f}  {ledger:22s} {share(times, 'floor'):22s} {compiled}")
    print(f"target of the ledger: {100 * TARGET:.0f} % of the step")


if __name__ == "__main__":
    main()
