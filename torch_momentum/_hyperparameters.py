"""Validation of the optimisers' hyper-parameters (constructor arguments and param groups),
shared by :class:`~torch_momentum.PolyakSGD` and :class:`~torch_momentum.NesterovSGD` (not user
API)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor


def _check_real(name: str, value: Any, where: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where}{name} must be a real number, got {type(value).__name__}: {value!r}"
        )
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{where}Invalid {name}: {value}")
    return value


def _check_lr(lr: Any, where: str = "") -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"{where}Invalid lr: a Tensor lr must have exactly one element, got shape "
                f"{tuple(lr.shape)}"
            )
        if lr.is_complex() or not lr.is_floating_point():
            raise TypeError(f"{where}lr must be a real floating point Tensor, got dtype {lr.dtype}")
        value = float(lr.detach().cpu().reshape(()))  # construction time: a sync is fine here
    else:
        value = _check_real("lr", lr, where)
    if not value >= 0.0 or math.isinf(value):
        raise ValueError(f"{where}Invalid lr: {value} (the learning rate must be finite and >= 0)")


def check_hyperparameters(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Validate the hyper-parameters present in ``values`` (constructor arguments or one param
    group, ``where`` says which); return the numbers normalised to ``float``. Raises before
    anything is changed."""
    out: dict[str, Any] = {}
    if "lr" in values:
        _check_lr(values["lr"], where)
    if "momentum" in values:
        momentum = out["momentum"] = _check_real("momentum", values["momentum"], where)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"{where}Invalid momentum: {momentum} (must satisfy 0 <= momentum < 1)"
            )
    if "weight_decay" in values:
        weight_decay = _check_real("weight_decay", values["weight_decay"], where)
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(
                f"{where}Invalid weight_decay: {weight_decay} (must be finite and >= 0)"
            )
        out["weight_decay"] = weight_decay
    for name in ("maximize", "differentiable"):
        flag = values.get(name, False)
        if not isinstance(flag, bool):
            raise TypeError(f"{where}{name} must be a bool, got {type(flag).__name__}: {flag!r}")
    for name in ("foreach", "fused"):
        flag = values.get(name)
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{where}{name} must be a bool or None, got {flag!r}")
    fused, foreach = values.get("fused"), values.get("foreach")
    differentiable = values.get("differentiable", False)
    if fused and foreach:
        raise ValueError(f"{where}fused=True and foreach=True cannot be used together; choose one")
    if fused and differentiable:
        raise ValueError(
            f"{where}fused=True does not support differentiable=True; use the default path"
        )
    if foreach and differentiable:
        raise ValueError(
            f"{where}foreach=True does not support differentiable=True; use the default path"
        )
    return out
