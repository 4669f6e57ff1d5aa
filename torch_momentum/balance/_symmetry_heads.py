r"""Candidate rescale symmetries of attention heads: grouped-query and rotary attention.

Private helper of :mod:`torch_momentum.balance._symmetry_candidates`; like everything proposed
there, these are only candidates, reported once the gradients verify them.

Attention reads its projections head by head: a query head :math:`i` of dimension :math:`d`
meets the key head it shares, and the value head it reads feeds the output projection's columns
of head :math:`i`. With :math:`H` query heads and :math:`K` key/value heads (grouped-query
attention: :math:`G = H / K` query heads share one key/value head),

* scaling dimension :math:`j` of key head :math:`h` by :math:`1/a` and dimension :math:`j` of
  every query head that reads it (heads :math:`hG \dots hG + G - 1`) by :math:`a` leaves every
  score :math:`q_i \cdot k_h` unchanged: one unit per key dimension, charge
  :math:`\sum_{i \in h} \|W^Q_{i,j}\|^2 - \|W^K_{h,j}\|^2` (rows with their biases);
* scaling dimension :math:`j` of value head :math:`h` by :math:`a` and the columns of dimension
  :math:`j` of every head of the group in the output projection by :math:`1/a` leaves the output
  unchanged;
* with rotary position embeddings each head's dimensions are rotated in pairs, so only a scale
  common to both dimensions of a pair commutes with the rotation: one unit per pair, the pairs
  being :math:`(j, j + r/2)` ("rotate half", the convention of ``transformers``' Llama, Mistral,
  Qwen, Phi, GPT-NeoX) or :math:`(2j, 2j + 1)` (interleaved, as in GPT-J and the original
  RoPE) for :math:`j < r/2`, where :math:`r \le d` dimensions of each head are rotated (the
  module's ``rotary_ndims`` or ``rotary_dim``, or its config's ``partial_rotary_factor``; all by
  default); each dimension past :math:`r` is a unit of its own.

A projection of H query and K key/value heads packed in one is read two ways: in blocks
(``[q | k | v]``: GPT-2's ``c_attn``, whose thirds come with the sibling candidates where K =
H, GPT-BigCode's multi-query ``c_attn``) and group by group (``[q_{g,1} .. q_{g,G} | k_g |
v_g]`` for every key/value head g: GPT-NeoX's ``query_key_value`` with G = 1, Falcon's), whose
candidates are named "per-head packing".

Equal head counts (:math:`G = 1`) without rotation are the per-dimension q/k and v/o pairs the
sibling candidates already propose (except for a projection packed by head). A rotary candidate
is a coarser version of the per-dimension one (it ties two of its units), so it carries the
per-dimension candidate's key in ``unless`` and is reported only where that one fails: on GPT-2
the per-dimension pair holds and the rotary ones are not reported; on Llama only the rotary one
holds.

The head dimension is read from the attention module (``head_dim``, ``attention_head_size`` or
``head_size``, the names ``transformers`` uses); a module without one gets no head candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import nn

from torch_momentum.balance._symmetry_proposal import (
    PartsKey,
    PartSpec,
    Proposal,
    overlaps,
    parts_key,
)

#: the attributes that hold an attention module's head dimension
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
#: the attributes that hold how many dimensions of a head its rotary embedding turns
ROTARY_ATTRS = ("rotary_ndims", "rotary_dim")


def _positive_int(module: nn.Module, attrs: tuple[str, ...]) -> int | None:
    for attr in attrs:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _rotated(module: nn.Module, d: int) -> int:
    """How many of a head's ``d`` dimensions its rotary embedding turns: the module's
    ``rotary_ndims`` or ``rotary_dim``, else its config's ``partial_rotary_factor`` or
    ``rotary_pct`` (transformers keeps it there for Nemotron, GLM and others) times ``d``, else
    all of them."""
    r = _positive_int(module, ROTARY_ATTRS)
    if r is not None:
        return min(r, d)
    config = getattr(module, "config", None)
    rope = getattr(config, "rope_parameters", None)
    for factor in (
        getattr(config, "partial_rotary_factor", None),
        getattr(config, "rotary_pct", None),
        rope.get("partial_rotary_factor") if isinstance(rope, dict) else None,
    ):
        if isinstance(factor, float) and 0.0 < factor < 1.0:
            return max(int(d * factor), 1)
    return d


def head_dim(module: nn.Module) -> int | None:
    """The head dimension an attention module declares, or None.

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_heads import head_dim
        >>> module = torch.nn.Module()
        >>> module.head_dim = 8
        >>> head_dim(module), head_dim(torch.nn.Linear(2, 2))
        (8, None)
    """
    return _positive_int(module, HEAD_DIM_ATTRS)


class Side(NamedTuple):
    """One side of a head-wise candidate: ``rows`` rows (or columns) numbered along ``parts``,
    each part covering rows ``[unit_offset, unit_offset + length)``. ``packed``: a projection
    of q, k and v together; ``by_head``: q, k or v rows gathered head by head from one (no
    sibling candidate covers them)."""

    label: str
    rows: int
    parts: tuple[PartSpec, ...]
    packed: bool = False  # q, k and v projections packed in one (more outputs than inputs)
    by_head: bool = False
    inputs: int = 0  # a packed projection's input features


class _Heads(NamedTuple):
    """The head layout: dimension ``d``, of which the first ``rotary`` are rotated in pairs."""

    d: int
    rotary: int

    def units(self, pairs: str | None) -> int:
        """Units per head: one per dimension, or (``pairs``) one per rotary pair and one per
        dimension past the rotated ones."""
        return self.d if pairs is None else self.d - self.rotary // 2


def _unit_parts(
    p: PartSpec, start: int, first: int, heads: _Heads, pairs: str | None
) -> list[PartSpec]:
    """Head ``d`` rows of part ``p`` from ``start``, as parts whose units start at ``first``:
    a unit per row, or per rotary pair (``"half"``: rows ``j`` and ``j + r/2``;
    ``"interleaved"``: ``2j`` and ``2j + 1``) and per row past the rotated ones."""
    d, r = heads
    if pairs is None:
        return [p._replace(start=start, length=d, unit_offset=first)]
    if pairs == "half":
        rotated = [
            p._replace(start=start + s * r // 2, length=r // 2, unit_offset=first) for s in (0, 1)
        ]
    else:
        rotated = [p._replace(start=start, length=r, block=2, unit_offset=first)]
    if r == d:
        return rotated
    return [*rotated, p._replace(start=start + r, length=d - r, unit_offset=first + r // 2)]


def _headwise(
    side: Side, heads: _Heads, group: int, sign: float, pairs: str | None
) -> tuple[PartSpec, ...] | None:
    """``side``'s parts unit by unit: its head ``i`` joins the units of head ``i // group``.
    None where a part is not a slice along one dimension made of whole heads."""
    d = heads.d
    if any(p.dim is None or p.block != 1 or p.unit_offset % d or p.length % d for p in side.parts):
        return None
    if pairs is None and group == 1:  # a unit per row: the parts as they are
        return tuple(p._replace(sign=sign) for p in side.parts)
    per_head = heads.units(pairs)
    out: list[PartSpec] = []
    for p in side.parts:
        for k in range(p.length // d):
            head = p.unit_offset // d + k
            first = head // group * per_head
            out += _unit_parts(p._replace(sign=sign), p.start + k * d, first, heads, pairs)
    return tuple(out)


def _pair(
    name: str, a: Side, b: Side, heads: _Heads, pairs: str | None, unless: PartsKey | None = None
) -> Proposal | None:
    """Side ``a``, of ``group`` times as many heads as ``b``, against ``b`` (its signs
    negative), unit by unit; None where the sides share an entry or are not made of heads."""
    left = _headwise(a, heads, a.rows // b.rows, 1.0, pairs)
    right = _headwise(b, heads, 1, -1.0, pairs)
    if not left or not right or overlaps(left + right):
        return None
    return Proposal("rescale", name, left + right, b.rows // heads.d * heads.units(pairs), unless)


def _suffix(a: Side, b: Side, kind: str) -> str:
    return f"{kind}, per-head packing" if a.by_head or b.by_head else kind


def _query_key(parent: str, a: Side, b: Side, heads: _Heads) -> list[Proposal]:
    """``a`` (the query side) against ``b`` (the key side): per key dimension where ``a`` has
    more heads or is packed by head (an equal count is a sibling candidate already), and per
    rotary pair."""
    base = f"{parent} {a.label}/{b.label}".strip()
    fine = _pair(f"{base} ({_suffix(a, b, 'per key dimension')})", a, b, heads, None)
    if fine is None:
        return []
    found = [fine] if a.rows > b.rows or a.by_head else []
    if heads.rotary % 2 == 0:
        key = parts_key(fine.parts)
        pairings = [("half", "rotary pairs"), ("interleaved", "interleaved rotary pairs")]
        # two rotated dimensions make one pair either way: the same candidate twice
        for pairs, label in pairings[: 1 if heads.rotary == 2 else 2]:
            rotary = _pair(f"{base} ({_suffix(a, b, label)})", a, b, heads, pairs, key)
            if rotary is not None:
                found.append(rotary)
    return found


def _narrowed(side: Side, pieces: list[tuple[int, int]], label: str, by_head: bool) -> Side:
    """The rows ``[start, start + length)`` of each of ``pieces`` of a packed ``side``, one
    after the other (units numbered along them), as a side of its own."""
    parts, first = [], 0
    for start, length in pieces:
        parts += [
            p._replace(start=p.start + start, length=length, unit_offset=first) for p in side.parts
        ]
        first += length
    return Side(label, first, tuple(parts), by_head=by_head)


def _unpacked(side: Side, d: int) -> list[Side]:
    """The q, k and v rows of a projection packing them in one, of H query and K key/value
    heads of dimension ``d`` (``H d`` its input features, ``(H + 2K) d`` its output), as
    sides: in three blocks ``[q | k | v]`` where K < H (GPT-BigCode's multi-query ``c_attn``;
    K = H is the thirds of the sibling candidates) and group by group, ``[q_{g,1} .. q_{g,G} |
    k_g | v_g]`` for each key/value head g (GPT-NeoX's ``query_key_value`` with G = 1, Falcon's
    with G = H / K), the latter marked ``by_head``."""
    if not side.packed or side.inputs % d or side.rows % d:
        return []
    if any(p.dim is None or p.unit_offset for p in side.parts):
        return []
    h = side.inputs // d
    rest = side.rows // d - h
    if rest <= 0 or rest % 2 or h % (rest // 2):
        return []
    k = rest // 2
    g = h // k
    found = []
    if k < h:
        blocks = (("q", 0, h), ("k", h, k), ("v", h + k, k))
        found += [_narrowed(side, [(s * d, n * d)], lb, False) for lb, s, n in blocks]
    step = (g + 2) * d
    for label, offset, size in (("q", 0, g), ("k", g, 1), ("v", g + 1, 1)):
        pieces = [(grp * step + offset * d, size * d) for grp in range(k)]
        found.append(_narrowed(side, pieces, label, True))
    return found


def _value_output(parent: str, a: Side, c: Side, heads: _Heads) -> Proposal | None:
    """Value side ``a`` against the columns ``c`` of the output projection, per value
    dimension, where ``c`` has more heads or ``a`` is packed by head."""
    if not (c.rows > a.rows or (a.by_head and c.rows == a.rows)) or c.rows % a.rows:
        return None
    name = f"{parent} {a.label}/{c.label} ({_suffix(a, c, 'per value dimension')})".strip()
    proposal = _pair(name, c, a, heads, None)
    if proposal is None:
        return None
    # the value side is the A side: flip the signs
    return proposal._replace(parts=tuple(p._replace(sign=-p.sign) for p in proposal.parts))


def head_rescales(
    parent: str, module: nn.Module, outs: Sequence[Side], ins: Sequence[Side]
) -> list[Proposal]:
    """Grouped-query and rotary rescale candidates among the unlinked leaf children of one
    attention module ``module`` named ``parent``: ``outs`` the producers (their output rows, a
    packed q/k/v projection's thirds included), ``ins`` the consumers that read their siblings'
    outputs through functional code (their input columns): the output projection. Query, key
    and value sides are the producers that are not such a consumer. A packed projection (more
    outputs than inputs) is also read in blocks and group by group.

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_heads import Side, head_rescales
        >>> from torch_momentum.balance._symmetry_proposal import PartSpec
        >>> attn = torch.nn.Module()
        >>> attn.head_dim = 4
        >>> q = Side("q", 8, (PartSpec("q.weight", 0, 0, 8),))  # two query heads
        >>> k = Side("k", 4, (PartSpec("k.weight", 0, 0, 4),))  # one key head they share
        >>> for p in head_rescales("attn", attn, [q, k], []):
        ...     print(p.name, p.units)
        attn q/k (per key dimension) 4
        attn q/k (rotary pairs) 2
        attn q/k (interleaved rotary pairs) 2
    """
    d = head_dim(module)
    if d is None:
        return []
    heads = _Heads(d, _rotated(module, d))
    # the projections of q, k and v read a recorded module's output; one that reads the
    # attention's own functional output (the output projection) is no query, key or value
    reading = {c.label for c in ins}
    sides = [a for a in outs if a.label not in reading]
    sides += [side for a in sides for side in _unpacked(a, d)]
    found: list[Proposal] = []
    for i, a in enumerate(sides):
        if a.rows % d:
            continue
        for j, b in enumerate(sides):  # equal sizes: each unordered pair once, in module order
            if a.by_head != b.by_head or b.rows % d or a.rows % b.rows:
                continue
            if a.rows > b.rows or (a.rows == b.rows and i < j):
                found += _query_key(parent, a, b, heads)
        for c in ins:
            proposal = _value_output(parent, a, c, heads)
            if proposal is not None:
                found.append(proposal)
    return found
