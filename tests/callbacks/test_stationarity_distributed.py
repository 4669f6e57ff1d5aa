"""StationarityMonitor with 2 CPU processes (gloo, ``strategy="ddp"``) equals a single process.

The distributed run happens in a subprocess running
``python -m tests.scripts.stationarity_distributed``
(Lightning re-launches that script for rank 1). The single-process reference runs here with the
same seed, model and data: full batches, so both runs take the same steps, and the monitor's
loss is the mean over the same 41-example subset, split 21 / 20 across the ranks there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.helpers.processes import run_distributed_script
from tests.helpers.trainer import fit, make_data, make_loader
from tests.scripts.stationarity_distributed import EPOCHS, SUBSET, make_model, make_monitor

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
    prefix = tmp_path / "out.json"
    run_distributed_script("stationarity_distributed", str(prefix), optimizer)
    ranks = [json.loads(Path(f"{prefix}.{r}").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["indices"] == ranks[1]["indices"] and len(ranks[0]["indices"]) == SUBSET
    assert sorted(r["share"] for r in ranks) == [20 / 41, 21 / 41]
    # every rank computed the same certificate, bit for bit (all-reduced gradients)
    assert ranks[0]["history"] == ranks[1]["history"]

    model = make_model(optimizer)
    monitor = make_monitor()
    fit(model, [monitor], make_loader(*make_data()), max_steps=-1, max_epochs=EPOCHS)
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
