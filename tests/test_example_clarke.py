"""Smoke test: ``examples/clarke.py --quick`` in a subprocess, checking the numbers it writes."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_clarke_example_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "clarke.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a timing assertion
    )
    assert proc.returncode == 0, f"examples/clarke.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Part 1" in proc.stdout and "Part 2" in proc.stdout
    with (tmp_path / "table.csv").open(newline="") as fh:
        rows = {r["check"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 12
    assert all(r["holds"] == "True" for r in rows.values()), rows
    assert all(float(r["error"]) <= float(r["tolerance"]) for r in rows.values())

    def vec(text: str) -> list[float]:
        return [float(v) for v in text.split()]

    # Kakade & Lee's example: autograd says 0, the derivative of relu(x) - relu(-x) = x is 1.
    row = rows["relu(x) - relu(-x) at 0"]
    assert vec(row["autograd at x"]) == [0.0] and vec(row["clarke min_norm"]) == [1.0]
    # The table's numbers are the hand-computed answers (printed to 6 decimals).
    expected = {
        "|x| at 0": [0.0],
        "relu(x) at 0 (hull [0, 1])": [0.0],
        "max(x1, x2) at (1, 1)": [0.5, 0.5],
        "||x||_2 at 0 in R^5": [0.0] * 5,
        "|x1| - |x2| at 0": [0.0, 0.0],
        "max(x1 + x2, -x1 + x2) at 0": [0.0, 1.0],
        "||x||_inf at (1, -1, 0.5)": [0.5, -0.5, 0.0],
        "lasso 1/2||Aw-b||^2 + ||w||_1 at 0": [3.75, -3.25],
        "|x| at 1e-6, radius 2e-6 (Goldstein set; Clarke: 1)": [0.0],
    }
    for check, value in expected.items():
        assert vec(rows[check]["exact"]) == value, check
        assert vec(rows[check]["clarke min_norm"]) == value, check
    # Autograd at the lasso's kink takes sign(0) = 0: -A^T b = (4.75, -4.25), not a minimum-norm
    # subgradient.
    assert vec(rows["lasso 1/2||Aw-b||^2 + ||w||_1 at 0"]["autograd at x"]) == [4.75, -4.25]
    # Homogeneity lemma, L = 3: <min_norm, θ> = 3 F(θ) up to the O(radius) tolerance, plus 1e-6
    # for printing both to 6 decimals. Plain autograd satisfies it too (relu(z) = relu'(z) z).
    lemma = rows["<g, θ> = L F(θ) at the kink"]
    slack = 1e-6 + float(lemma["tolerance"])
    assert abs(float(lemma["clarke min_norm"]) - float(lemma["exact"])) <= slack
    assert abs(float(lemma["autograd at x"]) - float(lemma["exact"])) <= slack
    euler = rows["Euler <s_i, θ_i> = L F(θ_i) at all samples (relative)"]
    assert float(euler["error"]) <= 1e-13  # float64 rounding of sums of ~100 products
