"""Smoke tests: every benchmark runs end to end with ``--quick`` (so that none can rot).

No timing is asserted (absolute times mean nothing on a shared machine); a benchmark passes when it
exits 0 and prints its results table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ["optim_step.py", "callback_overhead.py", "clarke.py", "symmetry_discovery.py"]


def test_every_benchmark_is_smoke_tested() -> None:
    found = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert found == sorted(BENCHMARKS)


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_quick(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        cwd=tmp_path,  # whatever a benchmark writes lands here, not in the tree
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, (
        f"{script} --quick exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    )
    # a results table: several lines, at least one with a ratio against the built-in reference
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) >= 3, proc.stdout
    assert any(ch.isdigit() for line in lines for ch in line), proc.stdout
