"""Smoke test: ``examples/stationarity.py --quick`` in a subprocess, checking what it writes."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_stationarity_example_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "stationarity.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a timing assertion
    )
    assert proc.returncode == 0, f"examples/stationarity.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "stationarity.png").is_file()
    with (tmp_path / "profiles.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 3 optimisers x 2 checkpoints x 2 radii in the quick run
    assert len(rows) == 12
    assert {r["optimizer"] for r in rows} == {"GD", "PolyakSGD", "NesterovSGD"}
    for r in rows:
        eps, grad = float(r["eps_hat"]), float(r["grad_norm"])
        assert 0 <= eps and grad > 0
        if float(r["delta"]) == 1e-3:
            # at a small radius the loss is smooth at the scale of the ball: the hull's min-norm
            # is within Lip(grad f) * delta of ||grad f|| (a few percent here)
            assert abs(eps - grad) <= 0.05 * grad
    # all three optimisers start at the same point with the same certificate
    start = [r for r in rows if r["step"] == "0" and float(r["delta"]) == 1e-3]
    assert len({r["grad_norm"] for r in start}) == 1 and len({r["eps_hat"] for r in start}) == 1
