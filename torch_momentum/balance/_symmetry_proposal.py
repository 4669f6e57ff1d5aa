"""The records of candidate symmetries, shared by the modules that propose and verify them.

Private module: :func:`~torch_momentum.balance.symmetry.find_symmetries` turns a verified
:class:`Proposal` into a public :class:`~torch_momentum.balance.symmetry.Symmetry`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class PartSpec(NamedTuple):
    """The fields of :class:`torch_momentum.balance.symmetry.SymmetryPart` (see there)."""

    param: str
    dim: int | None
    start: int
    length: int
    block: int = 1
    sign: float = 1.0
    unit_offset: int = 0


#: the entries a candidate moves, whatever their signs: equal keys, one candidate
PartsKey = frozenset[tuple[str, int | None, int, int, int, int]]


def parts_key(parts: Iterable[PartSpec]) -> PartsKey:
    """Which entries the parts hold and how they form units (signs left out).

    Example:
        >>> from torch_momentum.balance._symmetry_proposal import PartSpec, parts_key
        >>> parts_key([PartSpec("a", 0, 0, 4, sign=-1.0)]) == parts_key([PartSpec("a", 0, 0, 4)])
        True
    """
    return frozenset((p.param, p.dim, p.start, p.length, p.block, p.unit_offset) for p in parts)


def overlaps(parts: Iterable[PartSpec]) -> bool:
    """Whether two of the parts hold a common entry of one parameter.

    Example:
        >>> from torch_momentum.balance._symmetry_proposal import PartSpec, overlaps
        >>> overlaps([PartSpec("w", 0, 0, 4), PartSpec("w", 0, 4, 4)])
        False
        >>> overlaps([PartSpec("w", 0, 0, 4), PartSpec("w", 1, 0, 2)])
        True
    """
    seen: dict[str, list[PartSpec]] = {}
    for p in parts:
        for q in seen.get(p.param, []):
            if p.dim is None or q.dim is None or p.dim != q.dim:
                return True
            if p.start < q.start + q.length and q.start < p.start + p.length:
                return True
        seen.setdefault(p.param, []).append(p)
    return False


class Proposal(NamedTuple):
    """A candidate symmetry: kind, readable name, parts and number of units. ``unless``: the
    :func:`parts_key` of a finer candidate this one coarsens (it ties some of that one's units
    together): where both verify, only the finer one is reported."""

    kind: str
    name: str
    parts: tuple[PartSpec, ...]
    units: int
    unless: PartsKey | None = None


class ZeroSlice(NamedTuple):
    """A parameter (``dim is None``) or a slice of one along ``dim`` that may get no gradient."""

    param: str
    dim: int | None
    start: int
    length: int
    name: str
