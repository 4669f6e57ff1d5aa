"""Smoke tests: ``examples/quadratic.py`` and ``examples/compare_sgd.py`` with ``--quick``.

Each example runs in a subprocess (as a user would run it) with ``--out`` in a temporary folder;
the assertions read what it wrote.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def run_example(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<script> --quick --out <out>`` from the repository root."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a timing assertion
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def docs_state(name: str) -> float | None:
    path = REPO / "docs" / name
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.mark.slow  # example subprocess
def test_quadratic_quick(tmp_path: Path) -> None:
    before = docs_state("quadratic.png")
    proc = run_example("quadratic.py", tmp_path, "--steps", "300")
    assert docs_state("quadratic.png") == before, "--quick must not touch docs/"
    assert (tmp_path / "quadratic.png").stat().st_size > 10_000
    rows = read_csv(tmp_path / "summary.csv")
    assert rows and all(r["holds"] == "True" for r in rows), proc.stdout

    rates = {(r["problem"], r["method"]): r for r in rows if r["check"].startswith("rate")}
    for kappa in ("100", "1000"):
        for method in ("GD", "heavy ball", "Nesterov"):
            row = rates[(f"quadratic κ={kappa}", method)]
            # the printed theory is the lecture's formula for this κ
            k, theory = float(kappa), float(row["theory"])
            expected = {
                "GD": 1 - 1 / k,
                "heavy ball": (k**0.5 - 1) / (k**0.5 + 1),
                "Nesterov": 1 - 1 / k**0.5,
            }[method]
            assert theory == pytest.approx(expected, rel=1e-6)  # A's eigvalsh vs exact 1 and κ
            # every trajectory matches the independent slide-form loop (float64)
            assert float(row["ref_diff"]) < 1e-9
    # the stationarity bound was checked on the nonconvex problem, at T = 10, 100 and 300
    stationarity = [r for r in rows if r["check"].startswith("min_(t<")]
    assert len(stationarity) == 3
    assert all(float(r["measured"]) <= float(r["theory"]) for r in stationarity)


@pytest.mark.slow  # example subprocess (four Lightning runs)
def test_compare_sgd_quick(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    before = docs_state("compare_sgd.png")
    proc = run_example("compare_sgd.py", tmp_path)
    assert docs_state("compare_sgd.png") == before, "--quick must not touch docs/"
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000

    diffs = read_csv(tmp_path / "differences.csv")
    assert {(d["pair"], d["compared"]) for d in diffs} == {
        ("PolyakSGD vs SGD(momentum)", "parameters"),
        ("NesterovSGD vs SGD(nesterov)", "parameters (= y_t)"),
        ("NesterovSGD vs SGD(nesterov)", "iterates x_t"),
    }
    for d in diffs:
        assert int(d["steps"]) == 46  # 2 epochs x 23 batches of 64 out of 1437
        # float32 rounding only: eps = 1.2e-7 per operation, growing over 46 steps to a few 1e-7
        # (measured ~3e-7); a wrong update rule differs at ~lr * |grad| ~ 1e-2 after one step.
        assert float(d["max_rel_diff"]) < 1e-5, proc.stdout

    runs = {r["run"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert set(runs) == {"SGD(momentum)", "PolyakSGD", "SGD(nesterov)", "NesterovSGD"}
    for ours, builtin in (("PolyakSGD", "SGD(momentum)"), ("NesterovSGD", "SGD(nesterov)")):
        # same trajectory and same evaluation point: same validation numbers (loss to float32
        # rounding; accuracy may flip at most one of the 360 validation images on a near-tie)
        a, b = runs[ours], runs[builtin]
        assert float(a["val_loss_x"]) == pytest.approx(float(b["val_loss_x"]), rel=1e-4)
        assert abs(float(a["val_acc_x"]) - float(b["val_acc_x"])) <= 1 / 360 + 1e-9
        assert float(a["val_acc_x"]) > 0.5  # it trains: chance is 0.1
    # the Nesterov runs also report the look-ahead point, the others do not have one
    assert runs["NesterovSGD"]["val_acc_y"] != "nan"
    assert runs["PolyakSGD"]["val_acc_y"] == "nan"

    for name in ("SGD_momentum", "PolyakSGD", "SGD_nesterov", "NesterovSGD"):
        metrics = read_csv(tmp_path / "logs" / name / "metrics.csv")
        assert any(m.get("train_loss") for m in metrics)
        assert any(m.get("val_acc") for m in metrics)
