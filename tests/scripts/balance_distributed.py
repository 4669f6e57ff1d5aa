"""Multi-process checks of LayerBalanceMonitor, run by tests/callbacks/test_distributed.py.

Usage, from the repository root: ``python -m tests.scripts.balance_distributed OUT.json WORKDIR``.
Lightning's ``strategy="ddp"`` launches the second rank by re-running this module (``python -m``
with the same arguments); every rank runs, rank zero writes ``OUT.json``:

The monitor runs with ``ledger=True, neurons=True`` and heavy ball (momentum 0.9).

- ``ddp``: the monitor's history under ``strategy="ddp"``, 2 CPU processes (gloo); each rank sees
  half of the full batch (DistributedSampler, no shuffling) with a mean loss, so the all-reduced
  gradient equals the single-process full-batch gradient.
- ``fsdp``: the same with ``ModelParallelStrategy(data_parallel_size=2)`` and ``fully_shard``
  (FSDP2) in ``configure_model``: parameters and gradients are sharded DTensors.
- ``dtensor``: ``layer_sq_norms`` of DTensors (Shard(0), Shard(1), Replicate, float32 and
  float64) against the squared norms of the full tensors.
- ``default``: the monitor without ``layers=`` (its default mode) under ``strategy="ddp"``: rank
  zero finds the symmetries and logs; the other rank computes nothing.
- ``charges``: a BalanceLedger of symmetry charges (a rescale across a ReLU: rows and bias
  against columns; a translation of a softmax head: columns and the whole bias) on a model
  sharded with ``fully_shard`` (FSDP2), each rank training on half of the batch, against the
  same ledger of the unsharded model on the full batch in the same process.
"""

from __future__ import annotations

import json
import sys
import warnings
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from tests.helpers.trainer import LAYERS, BalanceModel, fit, make_data, make_loader, make_net
from torch_momentum import PolyakSGD
from torch_momentum.balance import BalanceLedger, SymmetryPart
from torch_momentum.callbacks import LayerBalanceMonitor, layer_sq_norms

STEPS = 4
MOMENTUM = 0.9


def run(
    strategy: object, fsdp: bool, workdir: str, name: str, layers: list[str] | None = LAYERS
) -> tuple[LayerBalanceMonitor, bool, bool]:
    """The monitor after STEPS steps on 2 ranks, whether it saw sharded parameters, and whether
    it warned about the ledger (``layers=None``: the default mode)."""
    torch.manual_seed(0)
    model = BalanceModel(make_net(), lr=0.05, momentum=MOMENTUM, fsdp=fsdp)
    x, y = make_data()
    monitor = LayerBalanceMonitor(
        layers=layers, save_figure=(name == "ddp"), ledger=True, neurons=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            model,
            [monitor],
            make_loader(x, y, batch_size=len(x) // 2),
            strategy=strategy,
            devices=2,
            max_steps=STEPS,
            logger=CSVLogger(workdir, name=name),
        )
    warned = any("ledger" in str(w.message) for w in caught)
    return monitor, monitor.sharded, warned


def _unit_ledger(monitor: LayerBalanceMonitor) -> dict[str, dict[str, list]]:
    return {
        name: {key: value.tolist() for key, value in entry.items()}
        for name, entry in monitor.unit_ledger.items()
    }


def dtensor_checks() -> dict[str, list[float]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(3)
    full = [
        torch.randn(7, 5, generator=g, dtype=torch.float64),  # 7 rows: uneven Shard(0)
        torch.randn(4, 9, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float32),
        torch.randn(3, 3, generator=g, dtype=torch.float64),
    ]
    sharded = [
        distribute_tensor(full[0], mesh, [Shard(0)]),
        distribute_tensor(full[1], mesh, [Shard(1)]),
        distribute_tensor(full[2], mesh, [Replicate()]),
        distribute_tensor(full[3], mesh, [Replicate()]),
    ]
    layers_full = [[full[0], full[1]], [full[2]], [full[3]]]
    layers_sharded = [[sharded[0], sharded[1]], [sharded[2]], [sharded[3]]]
    return {
        "sharded": layer_sq_norms(layers_sharded).tolist(),
        "full": layer_sq_norms(layers_full).tolist(),
        "expected": [sum(float(t.double().square().sum()) for t in layer) for layer in layers_full],
    }


def _symmetries() -> list[SimpleNamespace]:
    return [
        # first, and with every unit along the dimension FSDP2 shards: each rank holds only some
        # of its units (the next charges' units must still start after all of its units)
        SimpleNamespace(
            name="0 (per row)",
            kind="scale",
            units=8,
            parts=(
                SymmetryPart("0.weight", 0, 0, 8, 1, 1.0, 0),
                SymmetryPart("0.bias", 0, 0, 8, 1, 1.0, 0),
            ),
        ),
        SimpleNamespace(
            name="0/2",
            kind="rescale",
            units=8,
            parts=(
                SymmetryPart("0.weight", 0, 0, 8, 1, 1.0, 0),
                SymmetryPart("0.bias", 0, 0, 8, 1, 1.0, 0),
                SymmetryPart("2.weight", 1, 0, 8, 1, -1.0, 0),
            ),
        ),
        # slices of the sharded dimension, as a rotary pair's halves (rows j and j + 4 one
        # unit): each rank holds one of the two slices of every unit
        SimpleNamespace(
            name="0/2 (pairs)",
            kind="rescale",
            units=4,
            parts=tuple(
                SymmetryPart(param, dim, start, 4, 1, sign, 0)
                for param, dim, sign in (
                    ("0.weight", 0, 1.0),
                    ("0.bias", 0, 1.0),
                    ("2.weight", 1, -1.0),
                )
                for start in (0, 4)
            ),
        ),
        SimpleNamespace(
            name="2 (softmax)",
            kind="translation",
            units=9,
            parts=(
                SymmetryPart("2.weight", 1, 0, 8, 1, 1.0, 0),
                SymmetryPart("2.bias", None, 0, 0, 1, 1.0, 8),
            ),
        ),
    ]


def _charges(sharded: bool) -> dict[str, Any]:
    """The charges' ledger after STEPS heavy-ball steps, FSDP2-sharded or not, and (sharded)
    how many parameters a second read gathers (``full_tensor`` calls) of how many tracked."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(4)
    x, y = (
        torch.randn(16, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (16,), generator=g),
    )
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for module in (net[0], net[2], net):
            fully_shard(module)
        x, y = x[dist.get_rank() :: 2], y[dist.get_rank() :: 2]
    opt = PolyakSGD(net.parameters(), lr=0.1, momentum=MOMENTUM, weight_decay=0.01)
    ledger = BalanceLedger(None, opt, module=net, symmetries=_symmetries())
    ledger.attach()
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    found: dict[str, Any] = {
        name: {k: v.tolist() for k, v in row.items() if k != "kind"}
        for name, row in ledger.read_charges().items()
    }
    if sharded:
        from torch.distributed.tensor import DTensor

        gathered, full_tensor = [], DTensor.full_tensor

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            gathered.append(tuple(self.shape))
            return full_tensor(self, *args, **kwargs)

        DTensor.full_tensor = counted  # type: ignore[method-assign]
        try:
            ledger.read_charges()  # the origin is recorded: one read
        finally:
            DTensor.full_tensor = full_tensor  # type: ignore[method-assign]
        found["gathers"] = {"calls": len(gathered), "tracked": len(ledger._tracked)}
    return found


def main() -> None:
    out, workdir = sys.argv[1], sys.argv[2]
    ddp, ddp_sharded, ddp_warned = run("ddp", False, workdir, "ddp")
    figure = ddp.figure_path
    fsdp, fsdp_sharded, fsdp_warned = run(
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), True, workdir, "fsdp"
    )
    default, _, _ = run("ddp", False, workdir, "ddp_default", layers=None)
    checks = dtensor_checks()
    charges = {"sharded": _charges(True), "single": _charges(False)}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "world_size": dist.get_world_size(),
                    "ddp": ddp.history,
                    "ddp_sharded": ddp_sharded,
                    "ddp_figure": figure,
                    "fsdp": fsdp.history,
                    "fsdp_sharded": fsdp_sharded,
                    "warned": {"ddp": ddp_warned, "fsdp": fsdp_warned},
                    "unit_ledger": {"ddp": _unit_ledger(ddp), "fsdp": _unit_ledger(fsdp)},
                    "dtensor": checks,
                    "charges": charges,
                    "default": default.history,
                    "default_symmetries": [s.name for s in default.symmetries],
                },
                f,
            )
    else:
        # only rank zero keeps a history
        assert not ddp.history and not fsdp.history, "non-zero rank logged"
        assert not default.history and not default.symmetries, "non-zero rank discovered"
    dist.barrier()


if __name__ == "__main__":
    main()
