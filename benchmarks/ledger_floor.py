"""The ledger's cost per optimiser step, by both of its paths, against the floor of the stacked one.

The ledger of every symmetry reduces, each step, the weight, velocity and gradient of every unit
to their per-unit Gram matrices, in one of two ways. Stacked: tensors of one layout (shape, and
the dimension that holds the units) are stacked and reduced by one batched matrix product, then
mapped to the ledger's terms and summed into the units. One buffer (``_flat.FlatRows``, where it
applies): one multi-tensor copy of every tensor into a persistent buffer, one strided batched
product per row length, the Gram entries summed into the units and mapped once per unit. This
script measures both on the reference models of the symmetry discovery, in float32, one thread:

* ``step``: ``zero_grad`` + forward + backward + ``PolyakSGD.step`` (lr 1e-3, momentum 0.9),
  without the ledger: the reference;
* ``ledger``: ``opt.step()`` with a ``BalanceLedger`` of every symmetry ``find_symmetries``
  reports attached, minus ``opt.step()`` without it (both on the same gradients): the path the
  ledger chooses (one buffer for the ResNet-style CNN and GPT-2; stacked for the 12-block ViT,
  whose groups hold 19 tensors on average);
* ``ledger, stacked``: the same on a copy of the model whose ledger keeps the stacked path;
* ``floor``: only the stacks and batched products of the stacked path, written from the
  symmetries' public parts: per layout group, one ``torch.stack`` of the members' (weight,
  velocity, gradient) and one ``torch.bmm`` (an elementwise product for one entry per row, a sum
  for a linear charge); no mapping to terms, no sums into units, no Python bookkeeping;
* with ``--compile``: the floor under ``torch.compile`` (needs a C++ compiler; compiling takes
  10-20 s a model, not timed).

Rounds interleave all candidates in a shuffled order (``_timing.interleave``, CPU clock); the
table shows each as a share of the step time of the same round, median and range over rounds.

Measured on the 2-core development machine (shared, and slow at the time: the steps took twice
as long as in quieter hours), ``--rounds 7``, median [min, max] over rounds:

=========  ========  =====================  =====================  =====================
model      step ms   ledger                 ledger, stacked        floor
=========  ========  =====================  =====================  =====================
resnet     17.79     4.6 % [4.4, 5.5]       8.7 % [8.0, 9.5]       4.2 % [3.6, 4.8]
gpt2       26.71     5.3 % [4.6, 7.8]       8.0 % [5.4, 8.8]       4.0 % [2.6, 4.8]
vit        60.04     7.3 % [7.0, 9.9]       7.8 % [5.5, 9.1]       4.1 % [3.7, 5.0]
=========  ========  =====================  =====================  =====================

(the ViT's two columns run the same path). Earlier, ``--rounds 5 --compile`` on the stacked path
alone: ResNet 7.6 % [6.9, 8.0] with a floor of 3.2 % and a compiled floor of 3.8 %; GPT-2 7.1 %
with 4.0 % and 5.6 %: compiled, the floor is slower than eager (its guards check every tensor
argument on each call, more than the kernels it saves). The whole ledger by one buffer now
costs about what the stacked path's reductions alone cost.

Usage: python benchmarks/ledger_floor.py [--rounds 5] [--models resnet,gpt2,vit] [--compile]
[--quick] (``--quick``: 2 rounds of the ResNet, a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from torch_momentum import PolyakSGD
from torch_momentum.balance import BalanceLedger, _charges, find_symmetries
from torch_momentum.demos import ResNetCNN, TinyViT

try:
    from ._fit import Task, gpt2, images, model_names
    from ._timing import interleave, quantile
except ImportError:
    from _fit import Task, gpt2, images, model_names
    from _timing import interleave, quantile

TARGET = 0.05


def cases() -> dict[str, Callable[[], Task]]:
    """The models and batches of ``benchmarks/callback_overhead.py``'s resnet, gpt2 and vit
    rows."""
    return {
        "resnet": lambda: images(ResNetCNN(), 64),
        "gpt2": lambda: gpt2(16),
        "vit": lambda: images(TinyViT(), 64),
    }


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
    stacked_model = copy.deepcopy(model)
    opt = PolyakSGD(model.parameters(), lr=1e-3, momentum=0.9)
    ledger = BalanceLedger(None, opt, module=model, symmetries=symmetries)

    def train_step() -> None:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    ledger.attach()
    train_step()  # the velocities exist
    train_step()
    # the same on a copy whose ledger keeps the stacked path: its layout is planned (at the
    # first step) with the one-buffer path off
    stacked_opt = PolyakSGD(stacked_model.parameters(), lr=1e-3, momentum=0.9)
    stacked = BalanceLedger(None, stacked_opt, module=stacked_model, symmetries=symmetries)
    stacked.attach()
    cap, _charges.FLAT_CAP = _charges.FLAT_CAP, 0
    try:
        for _ in range(2):
            stacked_opt.zero_grad()
            loss_fn(stacked_model, batch).backward()
            stacked_opt.step()
    finally:
        _charges.FLAT_CAP = cap

    def step_of(
        led: BalanceLedger, optimizer: torch.optim.Optimizer, on: bool
    ) -> Callable[[], None]:
        def run() -> None:
            led.active = on  # off: its step hooks return at once
            optimizer.step()

        return run

    found: dict[str, Callable[[], object]] = {
        "step": train_step,
        "with ledger": step_of(ledger, opt, True),
        "without ledger": step_of(ledger, opt, False),
        "stacked": step_of(stacked, stacked_opt, True),
        "without stacked": step_of(stacked, stacked_opt, False),
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
    parser.add_argument("--models", default="resnet,gpt2,vit")
    parser.add_argument("--compile", action="store_true", help="also the compiled floor")
    parser.add_argument("--quick", action="store_true", help="2 rounds of the ResNet")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = ["resnet"] if args.quick else model_names(parser, args.models, cases())
    rounds = 2 if args.quick else args.rounds
    print(f"torch {torch.__version__}, 1 thread, {rounds} rounds, share of the step time")
    print(
        f"{'model':8s} {'step ms':>8s}  {'ledger':22s} {'ledger, stacked':22s} {'floor':22s}"
        " floor, compiled"
    )
    for name in models:
        jobs = candidates(name, args.compile)
        times = interleave(jobs, rounds=rounds, inner=20, clock="cpu")
        step_ms = 1e3 * quantile(times["step"], 0.5)
        ledger = share(times, "with ledger", "without ledger")
        stacked = share(times, "stacked", "without stacked")
        compiled = share(times, "floor, compiled") if "floor, compiled" in times else "-"
        floor = share(times, "floor")
        print(f"{name:8s} {step_ms:8.2f}  {ledger:22s} {stacked:22s} {floor:22s} {compiled}")
    print(f"target of the ledger: {100 * TARGET:.0f} % of the step")


if __name__ == "__main__":
    main()
