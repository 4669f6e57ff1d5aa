"""Smoke test of the main job, examples/layer_balance.py, in its --quick mode."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_layer_balance_quick(tmp_path):
    docs_before = {p: p.stat().st_mtime for p in (REPO / "docs").glob("layer_balance*.png")}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "layer_balance.py"),
            "--quick",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
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
        assert float(r["sq_W1"]) > 0
    # PolyakSGD and the built-in run the same float32 arithmetic: the printed difference is
    # rounding at most (relative 1e-5 allows ~100 float32 ulps over 30 steps).
    diffs = re.findall(r"max parameter difference \S+ \(relative (\S+);", result.stdout)
    assert len(diffs) == 2 and all(float(d) < 1e-5 for d in diffs)
    for name in ("figure.png", "optimizers.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the monitor's own figure lands in each CSVLogger directory
    assert len(list((tmp_path / "logs").glob("*/version_0/balance.png"))) == 8
    assert len(list((tmp_path / "logs").glob("*/version_0/metrics.csv"))) == 8
    docs_after = {p: p.stat().st_mtime for p in (REPO / "docs").glob("layer_balance*.png")}
    assert docs_after == docs_before  # --quick never touches docs/
