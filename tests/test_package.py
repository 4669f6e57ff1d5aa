"""Packaging contract: the core imports torch only; the public names exist."""

from __future__ import annotations

import subprocess
import sys

import torch_momentum


def test_core_does_not_import_lightning_or_plotting():
    code = (
        "import sys, torch_momentum\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'torchmetrics', 'matplotlib')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api():
    assert set(torch_momentum.__all__) == {
        "ClarkeSubgradient",
        "NesterovSGD",
        "PolyakSGD",
        "clarke_subgradient",
    }
    from torch_momentum.callbacks import LayerBalanceMonitor, OptimizerModeSwitch, plot_balance

    assert callable(plot_balance) and LayerBalanceMonitor and OptimizerModeSwitch
