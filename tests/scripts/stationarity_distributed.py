"""StationarityMonitor under DDP with 2 CPU processes (gloo), run by
tests/callbacks/test_stationarity_distributed.py.

Usage, from the repository root:
``python -m tests.scripts.stationarity_distributed OUT_PREFIX OPTIMIZER``. Lightning's
``strategy="ddp"`` launches the second rank by re-running this module. Each rank sees half of the
full batch with a mean loss (the all-reduced gradient is the full-batch gradient), and the
monitor's fixed subset of 41 examples is split 21 / 20 across the ranks. Every rank writes its
history to ``OUT_PREFIX.<rank>``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from tests.helpers.trainer import BalanceModel, fit, make_data, make_loader, make_net
from torch_momentum.callbacks import StationarityMonitor

RADII = (1e-3, 1e-2, 1e-1)
EPOCHS = 2
SUBSET = 41  # odd: the ranks hold unequal shares


def make_monitor() -> StationarityMonitor:
    return StationarityMonitor(RADII, num_samples=12, subset_size=SUBSET)


def make_model(optimizer: str) -> BalanceModel:
    torch.manual_seed(0)
    return BalanceModel(make_net(bias=True), lr=0.05, momentum=0.9, optimizer=optimizer)


def main() -> None:
    out, optimizer = sys.argv[1], sys.argv[2]
    model = make_model(optimizer)
    monitor = make_monitor()
    x, y = make_data()
    loader = make_loader(x, y, batch_size=len(x) // 2)
    fit(model, [monitor], loader, strategy="ddp", devices=2, max_steps=-1, max_epochs=EPOCHS)
    rank = dist.get_rank()
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(
            {
                "world_size": dist.get_world_size(),
                "history": monitor.history,
                "indices": monitor.subset_indices,
                "share": monitor._share,
            },
            fh,
        )
    dist.barrier()


if __name__ == "__main__":
    main()
