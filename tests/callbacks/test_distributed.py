"""LayerBalanceMonitor with 2 CPU processes (gloo): DDP, FSDP2 (ModelParallelStrategy +
fully_shard) and DTensor parameters give the values of a single-process run, balance, per-unit
and ledger keys alike.

The distributed runs happen in one subprocess, ``python -m tests.scripts.balance_distributed``,
with ``strategy="ddp"`` (Lightning re-launches that module for rank 1; plain ``ddp`` inside
pytest would re-launch pytest). The single-process reference runs here with the same seed and
data: each rank sees half of the full batch with a mean loss, so the averaged gradient equals the
single-process full-batch gradient.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.helpers.processes import run_distributed_script
from tests.helpers.trainer import (
    LAYERS,
    WITHOUT_LOGGER,
    BalanceModel,
    fit,
    make_data,
    make_loader,
    make_net,
)
from torch_momentum.callbacks import LayerBalanceMonitor

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed/gloo",
    ),
    pytest.mark.usefixtures("one_thread"),
    WITHOUT_LOGGER,  # the single-process reference
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("balance_distributed")
    out = workdir / "out.json"
    run_distributed_script("balance_distributed", str(out), str(workdir))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single_monitor() -> LayerBalanceMonitor:
    from tests.scripts.balance_distributed import MOMENTUM, STEPS

    torch.manual_seed(0)
    model = BalanceModel(make_net(), lr=0.05, momentum=MOMENTUM)
    monitor = LayerBalanceMonitor(layers=LAYERS, save_figure=False, ledger=True, neurons=True)
    fit(model, [monitor], make_loader(*make_data(), repeat=STEPS), max_steps=STEPS)
    return monitor


@pytest.fixture(scope="module")
def single(single_monitor: LayerBalanceMonitor) -> list[dict[str, float]]:
    return single_monitor.history


@pytest.fixture(scope="module")
def single_unit_ledger(single_monitor: LayerBalanceMonitor) -> dict[str, dict[str, list]]:
    return {
        name: {key: value.tolist() for key, value in entry.items()}
        for name, entry in single_monitor.unit_ledger.items()
    }


def _assert_same(history: list[dict[str, float]], reference: list[dict[str, float]]) -> None:
    assert [r["step"] for r in history] == [r["step"] for r in reference]
    for a, b in zip(history, reference, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            # float64; the only difference is the order of summation (two half-batch means
            # averaged across ranks; shard-wise squared norms summed by all_reduce): rounding
            # of relative size ~1e-16 per operation, far below 1e-10
            assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-13), (a["step"], key)


def test_ddp_two_processes_match_single_process(
    distributed: dict[str, Any], single: list[dict[str, float]]
) -> None:
    assert any(k.startswith("ledger/momentum/") for k in single[-1])
    assert any(k.startswith("balance/unit_drift_max/") for k in single[-1])
    assert distributed["world_size"] == 2
    assert distributed["ddp_sharded"] is False  # replicated: no collective needed
    _assert_same(distributed["ddp"], single)
    # the figure is saved by rank zero after trainer.log_dir's broadcast on all ranks
    assert distributed["ddp_figure"] and Path(distributed["ddp_figure"]).is_file()


def test_fsdp2_model_parallel_matches_single_process(
    distributed: dict[str, Any], single: list[dict[str, float]]
) -> None:
    assert distributed["fsdp_sharded"] is True  # the parameters really were DTensors
    _assert_same(distributed["fsdp"], single)
    assert distributed["warned"] == {"ddp": False, "fsdp": False}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_per_unit_ledger_matches_single_process(
    distributed: dict[str, Any], single_unit_ledger: dict[str, dict[str, list]], strategy: str
) -> None:
    """FSDP2 shards each layer's rows: every rank accumulates the units it holds and its part of
    the next layer's columns, summed by one all_reduce; DDP keeps whole parameters."""
    got = distributed["unit_ledger"][strategy]
    assert set(got) == set(single_unit_ledger) == {"net.0", "net.2"}
    for name, entry in single_unit_ledger.items():
        for key in ("D", "D0", "sums", "closure"):
            a = torch.tensor(got[name][key], dtype=torch.float64)
            b = torch.tensor(entry[key], dtype=torch.float64)
            scale = max(float(torch.tensor(entry["D0"]).abs().max()), 1.0)
            # float64; only the order of summation differs (shards summed by all_reduce, two
            # half-batch means averaged): ~1e-16 relative per operation
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * scale, msg=(name, key))
        assert float(torch.tensor(entry["sums"]).abs().max()) > 1e-6  # the terms are active


def test_dtensor_norms_match_full_tensors(distributed: dict[str, Any]) -> None:
    checks = distributed["dtensor"]
    # layer 0: Shard(0) with uneven rows + Shard(1); layer 2: Replicate (not counted twice);
    # float64 accumulation: rounding only
    for i in (0, 2):
        assert checks["sharded"][i] == pytest.approx(checks["full"][i], rel=1e-12)
        assert checks["sharded"][i] == pytest.approx(checks["expected"][i], rel=1e-12)
    # layer 1: a replicated float32 tensor, accumulated in float32 (~1e-7 relative)
    assert checks["sharded"][1] == pytest.approx(checks["full"][1], rel=1e-12)
    assert checks["sharded"][1] == pytest.approx(checks["expected"][1], rel=1e-6)


def test_symmetry_charges_under_fsdp2_match_single_process(distributed: dict[str, Any]) -> None:
    """A per-row charge (each rank holds half of its units), a rescale charge (rows and bias of
    a sharded layer against the columns of the next), the same rescale in pairs of rows j and
    j + 4 (slices of the sharded dimension, as attention heads and rotary pairs are), and a
    translation charge (columns, and the whole bias as one unit: partial sums on each rank) of
    an FSDP2-sharded model: every rank accumulates its shards, one all_reduce sums them."""
    got, expected = distributed["charges"]["sharded"], distributed["charges"]["single"]
    gathers = got.pop("gathers")
    assert set(got) == set(expected) == {"0 (per row)", "0/2", "0/2 (pairs)", "2 (softmax)"}
    # a read gathers each tracked parameter once for the charges and their magnitudes together
    assert gathers == {"calls": 4, "tracked": 4}
    for name, entry in expected.items():
        scale = max(float(torch.tensor(entry["D0"]).abs().max()), 1.0)
        for key in ("D", "D0", "sums", "closure"):
            a = torch.tensor(got[name][key], dtype=torch.float64)
            b = torch.tensor(entry[key], dtype=torch.float64)
            # float64, only the order of summation differs (shards, half-batch means)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * scale, msg=(name, key))
        assert float(torch.tensor(entry["sums"]).abs().max()) > 1e-6  # the terms are active


def test_default_mode_under_ddp_matches_single_process(distributed: dict[str, Any]) -> None:
    """The default mode under DDP: rank zero finds the model's symmetries on its first batch
    (the other rank neither discovers nor logs) and logs the same summary as a single process
    (all-reduced gradients: the same trajectory)."""
    torch.manual_seed(0)
    model = BalanceModel(make_net(), lr=0.05, momentum=0.9)
    monitor = LayerBalanceMonitor(save_figure=False, ledger=True, neurons=True)
    fit(model, [monitor], make_loader(*make_data(), repeat=4), max_steps=4)
    assert distributed["default_symmetries"] == [s.name for s in monitor.symmetries]
    assert distributed["default_symmetries"]  # the bias-free MLP's two rescale symmetries
    _assert_same(distributed["default"], monitor.history)
