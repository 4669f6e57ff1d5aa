"""The ledger's cost per optimiser step, by each of its paths, against the floor of the stacked one.

The ledger of every symmetry reduces, each step, the weight, velocity and gradient of every unit
to their per-unit Gram matrices, in one of three ways. The C kernel (``_native.NativeRows``, the
default on the CPU where a C compiler builds it): one call reads every tensor's slots once where
they lie. One buffer (``_flat.FlatRows``): one multi-tensor copy of every tensor into a
persistent buffer, one strided batched product per row length. In both, the Gram entries are
summed into the units and mapped to the terms once per unit. Stacked: tensors of one layout
(shape, and the dimension that holds the units) are stacked and reduced by one batched matrix
product, then mapped to the ledger's terms and summed into the units. This script measures the
three on the reference models of the symmetry discovery, in float32, one thread:

* ``step``: ``zero_grad`` + forward + backward + ``PolyakSGD.step`` (lr 1e-3, momentum 0.9),
  without the ledger: the reference;
* ``ledger``: ``opt.step()`` with a ``BalanceLedger`` of every symmetry ``find_symmetries``
  reports attached, minus ``opt.step()`` without it (both on the same gradients): the path the
  ledger chooses (the C kernel where it is built);
* ``ledger, one buffer`` and ``ledger, stacked``: the same on copies of the model whose ledgers
  were planned with the C kernel off, and with the one buffer off too (the stacked path);
* ``floor``: only the stacks and batched products of the stacked path, written from the
  symmetries' public parts: per layout group, one ``torch.stack`` of the members' (weight,
  velocity, gradient) and one ``torch.bmm`` (an elementwise product for one entry per row, a sum
  for a linear charge); no mapping to terms, no sums into units, no Python bookkeeping;
* with ``--compile``: the floor under ``torch.compile`` (needs a C++ compiler; compiling takes
  10-20 s a model, not timed).

Rounds interleave all candidates in a shuffled order (``_timing.interleave``, CPU clock); the
table shows each as a share of the step time of the same round, median and range over rounds.

Measured on the 2-core development machine (shared), ``--rounds 5``, median [min, max] over
rounds:

=========  ========  ==================  ==================  ==================  ==================
model      step ms   ledger (C kernel)   one buffer          stacked             floor
=========  ========  ==================  ==================  ==================  ==================
resnet     8.67      2.9 % [2.5, 3.2]    4.1 % [3.9, 4.4]    8.3 % [7.9, 9.1]    3.2 % [3.1, 3.4]
gpt2       13.37     3.1 % [2.7, 3.6]    5.8 % [5.7, 6.6]    7.4 % [7.0, 7.8]    4.1 % [4.1, 4.6]
vit        45.11     2.4 % [2.1, 4.3]    5.5 % [5.0, 11.9]   5.4 % [5.0, 7.7]    4.2 % [4.0, 5.8]
=========  ========  ==================  ==================  ==================  ==================

(the ViT's one-buffer ledger runs the stacked path: its groups hold 19 tensors on average, more
than ``FLAT_GROUP_SIZE``.) The whole ledger by the C kernel costs less than the stacked path's
reductions alone. Earlier, ``--rounds 5 --compile`` on the stacked path alone: ResNet 7.6 %
[6.9, 8.0] with a floor of 3.2 % and a compiled floor of 3.8 %; GPT-2 7.1 % with 4.0 % and
5.6 %: compiled, the floor is slower than eager (its guards check every tensor argument on each
call, more than the kernels it saves).

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
    paths = {
        # the C kernel where it is built (else the one buffer), the one buffer, the stacked path
        "with ledger": (model, _charges.NATIVE, _charges.FLAT_CAP),
        "one buffer": (copy.deepcopy(model), False, _charges.FLAT_CAP),
        "stacked": (copy.deepcopy(model), False, 0),
    }
    ledgers: dict[str, tuple[BalanceLedger, torch.optim.Optimizer]] = {}
    for key, (net, native, cap) in paths.items():
        optimizer = PolyakSGD(net.parameters(), lr=1e-3, momentum=0.9)
        led = BalanceLedger(None, optimizer, module=net, symmetries=symmetries)
        led.attach()
        # the layout is planned at the first step, under the path's settings; the velocities
        # exist after it
        saved = _charges.NATIVE, _charges.FLAT_CAP
        _charges.NATIVE, _charges.FLAT_CAP = native, cap
        try:
            for _ in range(2):
                optimizer.zero_grad()
                loss_fn(net, batch).backward()
                optimizer.step()
        finally:
            _charges.NATIVE, _charges.FLAT_CAP = saved
        ledgers[key] = (led, optimizer)
    opt = ledgers["with ledger"][1]

    def train_step() -> None:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    def step_of(
        led: BalanceLedger, optimizer: torch.optim.Optimizer, on: bool
    ) -> Callable[[], None]:
        def run() -> None:
            led.active = on  # off: its step hooks return at once
            optimizer.step()

        return run

    found: dict[str, Callable[[], object]] = {"step": train_step}
    for key, (led, optimizer) in ledgers.items():
        found[key] = step_of(led, optimizer, True)
        found[f"without {key}"] = step_of(led, optimizer, False)
    found["floor"] = floor_step(layout_groups(model, symmetries), opt)
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
        f"{'model':8s} {'step ms':>8s}  {'ledger':22s} {'ledger, one buffer':22s}"
        f" {'ledger, stacked':22s} {'floor':22s} floor, compiled"
    )
    for name in models:
        jobs = candidates(name, args.compile)
        times = interleave(jobs, rounds=rounds, inner=20, clock="cpu")
        step_ms = 1e3 * quantile(times["step"], 0.5)
        ledger = share(times, "with ledger", "without with ledger")
        buffer = share(times, "one buffer", "without one buffer")
        stacked = share(times, "stacked", "without stacked")
        compiled = share(times, "floor, compiled") if "floor, compiled" in times else "-"
        floor = share(times, "floor")
        print(
            f"{name:8s} {step_ms:8.2f}  {ledger:22s} {buffer:22s} {stacked:22s} {floor:22s}"
            f" {compiled}"
        )
    print(f"target of the ledger: {100 * TARGET:.0f} % of the step")


if __name__ == "__main__":
    main()
