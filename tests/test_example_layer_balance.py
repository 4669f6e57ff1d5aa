"""The main job, examples/layer_balance.py, and examples/layer_balance_cnn.py.

The ``--quick`` runs go through a subprocess, as a user runs them, and read back what they wrote
(marked slow); the balanced initialisation is also checked in-process.
"""

from __future__ import annotations

import csv
import importlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TERMS = ("momentum", "weight_decay", "symmetry", "discretisation", "other")
PUBLISHED = ("layer_balance*.png", "ledger*.png", "unit_drift*.png")


def docs_state() -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for g in PUBLISHED for p in (REPO / "docs").glob(g)}


def run_quick(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a timing assertion
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("layer_balance")
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.parametrize("dim", [100, 1000])
def test_balanced_initialisation_is_balanced_at_every_input_dimension(example, dim) -> None:
    # Regression: --quick (dim 100) used to draw W1 with the variance meant for dim 1000, so its
    # "balanced" run started at ‖W1‖² = 0.010 against ‖W2‖² = ‖W3‖² = 0.10.
    model = example.ReLUNet((dim, 100, 100, 10), balanced=True, make_optimizer=None)
    sq = [getattr(model, n).weight.detach().pow(2).sum().item() for n in ("W1", "W2", "W3")]
    # each ‖W_h‖² is a sum of >= 1000 squared Gaussians of mean 0.1/numel: within 15 % of 0.1
    # (4.5 standard deviations for the smallest layer, 1000 entries)
    assert all(abs(s - 0.1) < 0.015 for s in sq), sq
    unbalanced = example.ReLUNet((dim, 100, 100, 10), balanced=False, make_optimizer=None)
    assert unbalanced.W1.weight.pow(2).sum().item() > 5 * sq[0]


@pytest.mark.slow
def test_layer_balance_quick(tmp_path: Path) -> None:
    before = docs_state()
    result = run_quick("layer_balance.py", tmp_path, "--no-progress")
    rows = read_csv(tmp_path / "summary.csv")
    assert {(r["init"], r["optimizer"]) for r in rows} == {
        (init, opt)
        for init in ("balanced", "unbalanced")
        for opt in (
            "gradient descent",
            "PolyakSGD(0.9)",
            "NesterovSGD(0.9)",
            "torch.optim.SGD(0.9)",
        )
    }
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("loss_0", "loss_final", "drift_final"))
        assert float(r["loss_final"]) <= float(r["loss_0"])
        norms = [float(r[f"sq_{n}"]) for n in ("W1", "W2", "W3")]
        assert min(norms) > 0
        if r["init"] == "balanced":  # the label is honest: D(0) ≈ 0 for both pairs
            assert all(abs(float(d)) < 0.02 for d in r["diff_0"].split("/")), r["diff_0"]
        for pair in ("W1-W2", "W2-W3"):
            terms = [float(r[f"{t}_{pair}"]) for t in TERMS]
            drift, closure = float(r[f"drift_{pair}"]), float(r[f"closure_{pair}"])
            # the ledger closes: float32 weights, so round-off relative to the squared norms
            # (~0.1-1 here); 1e-5 allows ~100 float32 ulps accumulated over 30 steps
            assert abs(closure) <= 1e-5 * max(norms), (pair, r)
            assert drift == pytest.approx(sum(terms) + closure, rel=1e-9, abs=1e-12)
            if r["optimizer"] == "gradient descent":  # no momentum, no weight decay
                assert float(r[f"momentum_{pair}"]) == 0.0
            assert float(r[f"weight_decay_{pair}"]) == 0.0
            assert float(r[f"drift_ratio_to_gd_{pair}"]) > 0
        for layer in ("W1", "W2"):
            assert (
                0 <= float(r[f"unit_drift_median_{layer}"]) <= float(r[f"unit_drift_max_{layer}"])
            )
    # PolyakSGD and the built-in run the same float32 arithmetic: the printed difference is
    # rounding at most (relative 1e-5 allows ~100 float32 ulps over 30 steps).
    diffs = re.findall(r"max parameter difference \S+ \(relative (\S+);", result.stdout)
    assert len(diffs) == 2 and all(float(d) < 1e-5 for d in diffs)
    assert "heuristic (1+μ)/(1−μ) = 19" in result.stdout
    # bias variant: the symmetry term is the wrongly counted output bias, and 0 when grouped right
    default, grouped = read_csv(tmp_path / "bias_variant.csv")
    assert (default["grouping"], grouped["grouping"]) == ("default layers", "dict grouping")
    b2 = float(default["b2_sq_norm_change"])
    assert b2 > 0.1  # the output bias moved (targets shifted by +1)
    # first order of −Δ‖b2‖²; the rest is the bias's discretisation η²Σ‖g_b2‖² (<= 50 %)
    assert -1.01 * b2 < float(default["symmetry"]) < -0.5 * b2
    assert abs(float(grouped["symmetry"])) < 1e-4 * b2  # homogeneous grouping: round-off only
    for name in ("figure.png", "optimizers.png", "ledger.png", "unit_drift.png"):
        assert is_png(tmp_path / name), name
    # one CSVLogger directory per run (8 runs + 2 bias variants); the script draws the figures
    # itself, the monitor saves none (save_figure=False)
    assert len(list((tmp_path / "logs").glob("*/version_0/metrics.csv"))) == 10
    assert not list((tmp_path / "logs").glob("*/version_0/*.png"))
    assert docs_state() == before  # --quick never touches docs/


@pytest.mark.slow
def test_layer_balance_cnn_quick(tmp_path: Path) -> None:
    before = docs_state()
    run_quick("layer_balance_cnn.py", tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert [r["optimizer"] for r in rows] == [
        "gradient descent",
        "PolyakSGD(0.9)",
        "NesterovSGD(0.9)",
    ]
    pairs = sorted({k.split("_", 1)[1] for k in rows[0] if k.startswith("closure_")})
    assert pairs == ["net.conv1-net.conv2", "net.conv2-net.fc"]
    for r in rows:
        assert 0.0 <= float(r["train_accuracy"]) <= 1.0
        for pair in pairs:
            terms = [float(r[f"{t}_{pair}"]) for t in TERMS]
            # bias-free ReLU CNN: the symmetry term is round-off, the ledger closes (float32
            # weights of squared norm ~3-11: 1e-4 absolute is ~100 float32 ulps at 10)
            assert abs(float(r[f"symmetry_{pair}"])) < 1e-5
            assert abs(float(r[f"closure_{pair}"])) < 1e-4
            assert float(r[f"drift_{pair}"]) == pytest.approx(
                sum(terms) + float(r[f"closure_{pair}"]), rel=1e-9, abs=1e-12
            )
        for layer in ("net.conv1", "net.conv2"):  # per-channel units of both hidden convs
            assert float(r[f"unit_drift_max_{layer}"]) >= float(r[f"unit_drift_median_{layer}"])
    for name in ("ledger_cnn.png", "unit_drift_cnn.png"):
        assert is_png(tmp_path / name), name
    assert docs_state() == before
