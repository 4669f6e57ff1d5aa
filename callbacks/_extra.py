"""The check that the ``[lightning]`` extra is installed, run when ``torch_momentum.callbacks``
is imported: without it, a ``ModuleNotFoundError`` that says what to install, instead of a bare
``No module named 'lightning'`` from deep inside a callback module."""

from __future__ import annotations

import importlib.util

#: what ``pip install "torch-momentum[lightning]"`` adds to the core (pyproject.toml)
EXTRA_MODULES = ("lightning", "torchmetrics", "matplotlib")


def _absent(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a finder that refuses the name: not importable either
        return True


def check_extra() -> None:
    """Raise ``ModuleNotFoundError`` naming the missing modules and the ``[lightning]`` extra."""
    missing = [name for name in EXTRA_MODULES if _absent(name)]
    if missing:
        raise ModuleNotFoundError(
            f"torch_momentum.callbacks needs {', '.join(missing)}, not installed here: install"
            ' the [lightning] extra, pip install "torch-momentum[lightning]" (in a clone:'
            ' pip install -e ".[lightning]"); the core, import torch_momentum, needs torch only',
            name=missing[0],
        )


check_extra()
