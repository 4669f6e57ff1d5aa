"""The optimiser test table (like PyTorch's ``optim_db``) and helpers shared by the optimiser
tests (tests/optim/).

One :class:`OptimizerInfo` per optimiser: its built-in counterpart, the implementations it
supports, those that accept ``differentiable=True``, and the known skips, each with its reason.
Tests parametrised by :func:`cases` run every supported implementation and report a known skip
as a skipped test with that reason; tests/optim/test_conformance.py checks the table against the
constructors and that every skip names an existing test.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
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


# The implementations (update paths) and their constructor flags. "default" passes none: the
# optimiser picks per tensor and step what the built-in picks on that device and dtype (on the CPU
# the for-loop).
PATHS: dict[str, dict[str, bool]] = {
    "reference": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},
}


@dataclass(frozen=True)
class KnownSkip:
    """One case of a table-driven test that does not run, and why (a ``DecorateInfo`` skip of
    PyTorch's ``optim_db``): ``test`` (the test function's name) on the implementations
    ``impls``. The reason names what would have to change for the case to run."""

    test: str
    impls: tuple[str, ...]
    reason: str


_BF16_FUSED_SKIP = KnownSkip(
    "test_nesterov_bfloat16_rounds_like_the_builtin",
    ("fused",),
    "torch._fused_sgd_ computes wrong bfloat16/float16 values on the CPU, so the built-in's fused"
    " path is no bit-exact reference; ours routes these dtypes to foreach on the CPU"
    " (test_reduced_precision_on_cpu_is_rounding_only checks that route)",
)


@dataclass(frozen=True)
class OptimizerInfo:
    """One of our optimisers, how ``torch.optim.SGD`` expresses the same method, and what it
    supports."""

    cls: type[torch.optim.Optimizer]
    nesterov: bool
    #: the implementations the constructor accepts (keys of ``PATHS``)
    supported_impls: tuple[str, ...] = tuple(PATHS)
    #: the implementations that accept ``differentiable=True`` ("default" resolves to the
    #: reference then; foreach and fused raise ValueError, as the built-in's do)
    differentiable_impls: tuple[str, ...] = ("reference", "default")
    skips: tuple[KnownSkip, ...] = ()

    def builtin(self, params: object, **kwargs: object) -> torch.optim.SGD:
        """``torch.optim.SGD`` with this class's update rule (``nesterov`` when there is momentum;
        with ``momentum=0`` both classes are plain gradient descent)."""
        nesterov = self.nesterov and kwargs.get("momentum", 0) != 0
        return torch.optim.SGD(params, nesterov=nesterov, **kwargs)  # type: ignore[arg-type]

    def skip_reason(self, test: str, impl: str) -> str | None:
        """Why ``test`` does not run on ``impl`` for this optimiser; None where it runs."""
        for skip in self.skips:
            if skip.test == test and impl in skip.impls:
                return skip.reason
        return None

    def __str__(self) -> str:
        return self.cls.__name__


OPTIMIZERS = [
    OptimizerInfo(PolyakSGD, nesterov=False),
    OptimizerInfo(NesterovSGD, nesterov=True, skips=(_BF16_FUSED_SKIP,)),
]
CLASSES = [info.cls for info in OPTIMIZERS]


def info_of(cls: type) -> OptimizerInfo:
    return next(info for info in OPTIMIZERS if info.cls is cls)


def cases(test: str, infos: list[OptimizerInfo] | None = None) -> list:
    """``(info, impl)`` parameters of ``test``: every supported implementation of every optimiser
    in ``infos`` (default: the table), a known skip as a skipped case with its reason."""
    params = []
    for info in OPTIMIZERS if infos is None else infos:
        for impl in info.supported_impls:
            reason = info.skip_reason(test, impl)
            marks = [pytest.mark.skip(reason=reason)] if reason is not None else []
            params.append(pytest.param(info, impl, marks=marks, id=f"{info}-{impl}"))
    return params


# Input configurations (``optim_inputs``): plain, gradient descent, weight decay, maximize and a
# Tensor lr. The Tensor is shared by every test that draws this configuration, and schedulers
# change a Tensor lr in place: a test that steps a scheduler clones it first.
CONFIGS: list[dict[str, object]] = [
    {"lr": 0.05},
    {"lr": 0.05, "momentum": 0.0},
    {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1},
    {"lr": 0.05, "momentum": 0.9, "maximize": True},
    {"lr": torch.tensor(0.05, dtype=torch.float64), "momentum": 0.9},
]


def config_id(kw: dict) -> str:
    return "-".join(f"{k}={v.item() if isinstance(v, torch.Tensor) else v}" for k, v in kw.items())
