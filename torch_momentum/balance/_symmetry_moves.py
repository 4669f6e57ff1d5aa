r"""The finite check of a verified symmetry: the loss is unchanged under a large move along it.

The gradient test of :mod:`~torch_momentum.balance._symmetry_verify` shows
:math:`\langle\nabla\ell, \xi\rangle = 0` at the current and at a nearby point. A function that is
homogeneous only where it does not clamp (ReLU6, Hardtanh, a clamped logit) passes it wherever
no unit reaches the clamp, which at a small initialisation is everywhere. A symmetry is a group
action: :math:`\ell(g \cdot x) = \ell(x)` for every element :math:`g`, not only near the identity.
So every found symmetry is also moved far along its group, all at once (a composition of
symmetries is one), and the loss must not change beyond round-off:

* scale and rescale: each unit's entries times :math:`e^{\pm s_u}` (the sign of the part: the
  rescale's B side is divided), :math:`|s_u|` between :math:`\log 10` and :math:`\log 1000`,
  random signs;
* translation: each unit's entries plus :math:`\pm c_u`, :math:`c_u` between 10 and 100 times
  the rms of the symmetry's parameters;
* zero gradient: the slice plus 10 times its rms (at least the parameters') in N(0, 1) noise.

Each move is made twice: with a random direction per unit, and with every unit moved the same
way (up, or to the right). A symmetry broken only along the common direction (a shift of all
of a layer's channels that a LayerNorm removes on one path but a branch scaled by a small
LayerScale still sees, as in ConvNeXt's downsampling layers) changes the loss under the second
even where the random signs of the first cancel its effect.

If the loss changes, each symmetry is moved alone and the ones that change it are rejected,
with the relative change of the loss as their residual. Private helper of
:mod:`torch_momentum.balance.symmetry`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torch_momentum.balance._parts import SymmetryPart
from torch_momentum.balance._symmetry_verify import QUADRATIC

#: a unit's multiplicative move lies between these powers of 10 (either way): far enough that a
#: tanh-like unit initialised at 1e-4 leaves its linear range
_DECADES = (1.0, 3.0)
#: a unit's translation lies between these powers of 10 times the parameter's rms (a shift of
#: logits amplifies the loss's round-off by its size)
_SHIFT_DECADES = (1.0, 2.0)


def tolerance(rtol: float, *dtypes: torch.dtype) -> float:
    """The relative change of the loss a true symmetry may show: far below ``rtol`` (a false
    symmetry moved this far changes the loss at first order), above the round-off of the least
    precise of ``dtypes`` (the evaluation's and the loss's; moves by factors of 100 amplify
    it)."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    return max(1e-3 * rtol, 1e3 * eps)


def _rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _target(t: Tensor, part: SymmetryPart) -> tuple[Tensor, list[int]]:
    """A view of the part's entries of ``t`` with the units along one axis, and the shape that
    broadcasts one value per unit over it."""
    if part.dim is None:
        return t, [1] * t.dim()
    view = t.narrow(part.dim, part.start, part.length).unflatten(part.dim, (part.units, part.block))
    shape = [1] * view.dim()
    shape[part.dim] = part.units
    return view, shape


def move(
    point: dict[str, Tensor],
    symmetry: Any,
    name: Callable[[str], str],
    gen: torch.Generator,
    origin: Mapping[str, Tensor],
    overall: float,
    aligned: bool = False,
) -> None:
    """Move ``point`` (in place) far along ``symmetry``'s group; ``name`` maps a part's
    parameter name to the key of ``point``. Sizes come from ``origin`` (the unmoved point, so
    that moves made before this one do not scale it) and ``overall`` (its rms over all
    tensors, for all-zero tensors). ``aligned``: every unit moves the same way (up, or to
    the right), not each its own random way."""
    units = symmetry.units
    size = torch.rand(units, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(units, generator=gen) < 0.5, -1.0, 1.0).double()
    if aligned:
        sign = torch.ones_like(sign)
    # one size per unit for all parts: a unit spanning two tensors (bias_ih/bias_hh) moves by
    # the same amount in both
    tensors = [origin[name(n)] for n in dict.fromkeys(p.param for p in symmetry.parts)]
    scale = math.sqrt(sum(_rms(t) ** 2 for t in tensors) / len(tensors)) or overall
    for part in symmetry.parts:
        t = point[name(part.param)]
        view, shape = _target(t, part)
        values = sign[part.unit_offset : part.unit_offset + part.units] * part.sign
        magnitude = size[part.unit_offset : part.unit_offset + part.units]
        if symmetry.kind in QUADRATIC:
            exponent = (_DECADES[0] + (_DECADES[1] - _DECADES[0]) * magnitude) * math.log(10.0)
            factor = torch.exp(values * exponent)
            view.mul_((factor[0] if part.dim is None else factor.view(shape)).to(t))
        elif symmetry.kind == "translation":
            decades = _SHIFT_DECADES[0] + (_SHIFT_DECADES[1] - _SHIFT_DECADES[0]) * magnitude
            shift = values * torch.pow(10.0, decades) * scale
            view.add_((shift[0] if part.dim is None else shift.view(shape)).to(t))
        else:  # zero gradient: any move
            noise = torch.randn(view.shape, generator=gen, dtype=torch.float64)
            rms = _rms(_target(origin[name(part.param)], part)[0])
            view.add_((10.0 * (rms or overall) * noise).to(t))


def confirm(
    symmetries: Sequence[Any],
    point: Mapping[str, Tensor],
    loss: Callable[[Mapping[str, Tensor]], Tensor],
    name: Callable[[str], str],
    rtol: float,
    seed: int,
) -> tuple[list[Any], list[Any]]:
    """``(kept, rejected)``: the symmetries under whose finite moves ``loss`` (at ``point``,
    moved copies of it) stays within :func:`tolerance` relative under both moves; the rejected
    ones carry the larger relative change as ``residual``. Two evaluations when all hold, two
    more per symmetry otherwise."""
    if not symmetries:
        return [], []
    first = loss(point)
    base = float(first)
    dtypes = {t.dtype for t in point.values() if t.is_floating_point()} | {first.dtype}
    tol = tolerance(rtol, *dtypes)
    overall = math.sqrt(sum(_rms(t) ** 2 for t in point.values()) / max(len(point), 1)) or 1.0

    def change(chosen: Sequence[Any]) -> float:
        worst = 0.0
        for aligned in (False, True):
            gen = torch.Generator().manual_seed(seed)
            moved = {k: t.clone() for k, t in point.items()}
            for symmetry in chosen:
                move(moved, symmetry, name, gen, point, overall, aligned)
            after = float(loss(moved))
            if not math.isfinite(after):
                return math.inf
            tiny = torch.finfo(torch.float64).tiny
            worst = max(worst, abs(after - base) / max(abs(base), abs(after), tiny))
        return worst

    if change(symmetries) <= tol:
        return list(symmetries), []
    kept, rejected = [], []
    for symmetry in symmetries:
        rel = change([symmetry])
        if rel <= tol:
            kept.append(symmetry)
        else:
            rejected.append(dataclasses.replace(symmetry, residual=rel))
    return kept, rejected
