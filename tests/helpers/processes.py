"""Running Python in a subprocess, as a user runs an example or a benchmark, and as the
multi-process DDP tests start their scripts (``python -m tests.scripts.<name>``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root

# Variables a launcher of a distributed run may have set; a DDP script must start from none of
# them (Lightning would otherwise join that run instead of launching its own second rank).
_DISTRIBUTED_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR")


def run_python(
    args: Sequence[str],
    *,
    timeout: float,
    cwd: Path = ROOT,
    env: Mapping[str, str | None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` with this interpreter in ``cwd``, stdout and stderr captured as text.

    ``env`` updates this process's environment (a ``None`` value removes the variable);
    ``timeout`` (seconds) is a hang guard, never a timing assertion.
    """
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_distributed_script(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tests.scripts.<module> ARGS`` from the repository root, on one intra-op thread
    per process, with no inherited distributed settings; Lightning's ``strategy="ddp"`` re-runs
    the same module for rank 1. Fails the calling test with the output's tail if it fails."""
    env: dict[str, str | None] = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.update(dict.fromkeys(_DISTRIBUTED_VARIABLES))
    proc = run_python(["-m", f"tests.scripts.{module}", *args], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
