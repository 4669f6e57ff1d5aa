"""StationarityMonitor with 2 CPU processes (gloo, ``strategy="ddp"``) equals a single process.

The distributed run happens in a subprocess running
``python -m tests.scripts.stationarity_distributed``
(Lightning re-launches that script for rank 1). The single-process reference runs here with the
same seed, model and data: full batches, so both runs take the same steps, and the monitor's
loss is the mean over the same 41-example subset, split 21 / 20 across the ranks there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch.distributed as dist

from tests.helpers.trainer import make_data, make_loader, trainer_kwargs
from tests.scripts.stationarity_distributed import EPOCHS, SUBSET, make_model, make_monitor

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed/gloo",
    ),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.slow,
]


@pytest.mark.parametrize("optimizer", ["polyak", "nesterov"])
def test_ddp_two_processes_give_every_rank_the_single_process_certificate(
    tmp_path: Path, optimizer: str
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for var in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    prefix = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.scripts.stationarity_distributed", str(prefix), optimizer],
        cwd=ROOT,  # `python -m tests.scripts...` imports the tests package from the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a timing assertion
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{prefix}.{r}").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["indices"] == ranks[1]["indices"] and len(ranks[0]["indices"]) == SUBSET
    assert sorted(r["share"] for r in ranks) == [20 / 41, 21 / 41]
    # every rank computed the same certificate, bit for bit (all-reduced gradients)
    assert ranks[0]["history"] == ranks[1]["history"]

    model = make_model(optimizer)
    monitor = make_monitor()
    x, y = make_data()
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=-1, max_epochs=EPOCHS, logger=False, callbacks=[monitor])
    )
    trainer.fit(model, make_loader(x, y))
    single = monitor.history
    assert len(single) == len(ranks[0]["history"]) == EPOCHS
    assert monitor.subset_indices == ranks[0]["indices"]
    for a, b in zip(ranks[0]["history"], single, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            # float64; the runs differ only in the order of summation (two half-batch means
            # averaged across ranks, two weighted subset shares summed by all_reduce): rounding
            # of ~1e-16 per operation, amplified at most mildly by two training steps and the
            # solve; 1e-9 is far above that and far below any real difference
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-13), key
