"""The optimiser test table and helpers shared by the optimiser tests (test_optim*.py,
test_conformance.py, test_cuda.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torch_momentum import NesterovSGD, PolyakSGD

# float64 tolerance for "the same arithmetic up to rounding": each step does O(1) roundings of
# relative size 2**-53 ≈ 1.1e-16; after ~100 steps on a well-conditioned problem the accumulated
# relative difference stays far below 1e-12 (we measure ~1e-15), so 1e-12 fails on any real bug
# (a wrong sign or a missing term is O(lr) ≈ 1e-2) while never failing on rounding.
F64_RTOL = 1e-12


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max(max|b|, tiny)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        scale = max(y.abs().max().item(), 1e-300)
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst


# ------------------------------------------------------------------ optimiser test table
# One OptimizerInfo-style table (as PyTorch's ``optim_db``): the classes with their built-in
# counterpart, the input configurations every generic test runs over and the update paths. Every
# optimiser test (tests/test_optim*.py, tests/test_conformance.py) draws from it.


@dataclass(frozen=True)
class OptimizerInfo:
    """One of our optimisers and how ``torch.optim.SGD`` expresses the same method."""

    cls: type[torch.optim.Optimizer]
    nesterov: bool

    def builtin(self, params: object, **kwargs: object) -> torch.optim.SGD:
        """``torch.optim.SGD`` with this class's update rule (``nesterov`` when there is momentum;
        with ``momentum=0`` both classes are plain gradient descent)."""
        nesterov = self.nesterov and kwargs.get("momentum", 0) != 0
        return torch.optim.SGD(params, nesterov=nesterov, **kwargs)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.cls.__name__


OPTIMIZERS = [OptimizerInfo(PolyakSGD, nesterov=False), OptimizerInfo(NesterovSGD, nesterov=True)]
CLASSES = [info.cls for info in OPTIMIZERS]

# The update paths: constructor flags of each (the default resolves per tensor and step).
PATHS: dict[str, dict[str, bool]] = {
    "reference": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},
}

# Input configurations (``optim_inputs``): plain, gradient descent, weight decay, maximize and a
# Tensor lr.
CONFIGS: list[dict[str, object]] = [
    {"lr": 0.05},
    {"lr": 0.05, "momentum": 0.0},
    {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1},
    {"lr": 0.05, "momentum": 0.9, "maximize": True},
    {"lr": torch.tensor(0.05, dtype=torch.float64), "momentum": 0.9},
]


def config_id(kw: dict) -> str:
    return "-".join(f"{k}={v.item() if isinstance(v, torch.Tensor) else v}" for k, v in kw.items())


def info_of(cls: type) -> OptimizerInfo:
    return next(info for info in OPTIMIZERS if info.cls is cls)
