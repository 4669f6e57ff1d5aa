r"""Which entries of a parameter form which unit of a charge, and per-unit sums over them.

Private module: :class:`SymmetryPart` is public through :mod:`torch_momentum.balance`; the
functions are shared by the symmetry, unit and ledger modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torch_momentum.balance import _dtensor


@dataclass(frozen=True)
class SymmetryPart:
    """Which entries of one parameter belong to which unit of a :class:`Symmetry`.

    Take parameter ``param``. If ``dim`` is None the whole tensor is one unit, index
    ``unit_offset``. Otherwise narrow it along ``dim`` to ``[start, start + length)`` and view that
    axis as ``(length // block, block)``: unit ``u`` of this part (``0 <= u < length // block``) is
    every entry whose index along ``dim`` falls in block ``u`` (all other dimensions included),
    and it is unit ``unit_offset + u`` of the symmetry. ``sign`` is ``+1`` for the A side and
    ``-1`` for the B side of a rescale (and of the ``bias_ih``/``bias_hh`` translation of a
    recurrent layer).

    Example:
        >>> import torch
        >>> from torch_momentum.balance import SymmetryPart
        >>> # the columns of a (3, 4) classifier, one unit per column
        >>> part = SymmetryPart("fc.weight", 1, 0, 4, 1, 1.0, 0)
        >>> part.units
        4
        >>> part.entries(torch.arange(12.0).reshape(3, 4)).sum(1)
        tensor([12., 15., 18., 21.])
    """

    param: str
    dim: int | None
    start: int
    length: int
    block: int
    sign: float
    unit_offset: int

    @property
    def units(self) -> int:
        """How many units this part contributes to."""
        return 1 if self.dim is None else self.length // self.block

    def entries(self, tensor: Tensor) -> Tensor:
        """The part's entries of ``tensor`` (shaped like the parameter) as ``(units, -1)``."""
        return unit_view(tensor.unsqueeze(0), self)[:, 0]


def unit_view(m: Tensor, part: Any) -> Tensor:
    """``m`` of shape ``(lead, *shape[, 2])`` as ``(units, lead, rest)`` for the part's units."""
    lead = m.shape[0]
    if part.dim is None:
        return m.reshape(1, lead, -1)
    d = part.dim + 1
    x = m.narrow(d, part.start, part.length).unflatten(d, (part.units, part.block))
    return x.movedim(d, 0).reshape(part.units, lead, -1)


def part_values(t: Tensor, part: Any, linear: bool, other: Tensor | None = None) -> Tensor:
    """Per-unit :math:`\\sum x^2` (:math:`\\sum x y` with ``other``; :math:`\\sum x` when
    ``linear``) over the part's entries, float64 (complex tensors as real vectors; a sharded
    tensor is gathered: a collective every rank joins)."""

    def units(x: Tensor) -> Tensor:
        x = _dtensor.full(x).detach()
        x = x.to_dense() if x.is_sparse else x
        x = torch.view_as_real(x) if x.is_complex() else x
        return unit_view(x.unsqueeze(0), part)[:, 0]  # (units, rest)

    v = units(t)
    if linear:
        return v.sum(1, dtype=torch.float64)
    if other is not None:
        return (v.to(torch.float64) * units(other).to(torch.float64)).sum(1)
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64).square()


def signed_sum(
    parts: Iterable[Any],
    units: int,
    value: Callable[[Any], Tensor | None],
    signed: bool = True,
) -> Tensor:
    """``out[u] = sum over parts of sign * value(part)[u - unit_offset]`` (float64, ``units``
    long; without the signs when ``signed`` is False); ``None`` values count 0."""
    out = torch.zeros(units, dtype=torch.float64)
    for part in parts:
        v = value(part)
        if v is None:
            continue
        if out.device != v.device:
            out = out.to(v.device)
        out[part.unit_offset : part.unit_offset + part.units] += part.sign * v if signed else v
    return out
