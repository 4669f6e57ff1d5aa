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
  being :math:`(j, j + d/2)` ("rotate half", the convention of ``transformers``' Llama, Mistral,
  Qwen, GPT-NeoX) or :math:`(2j, 2j + 1)` (interleaved, as in GPT-J and the original RoPE).

Equal head counts (:math:`G = 1`) without rotation are the per-dimension q/k and v/o pairs the
sibling candidates already propose. A rotary candidate is a coarser version of the per-dimension
one (it ties two of its units), so it carries the per-dimension candidate's key in ``unless``
and is reported only where that one fails: on GPT-2 the per-dimension pair holds and the rotary
ones are not reported; on Llama only the rotary one holds.

The head dimension is read from the attention module (``head_dim``, ``attention_head_size`` or
``head_size``, the names ``transformers`` uses); a module without one gets no head candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    for attr in HEAD_DIM_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


Side = tuple[str, int, tuple[PartSpec, ...]]  # (label, rows or columns, parts along them)


def _headwise(
    parts: tuple[PartSpec, ...], d: int, group: int, sign: float, pairs: str | None
) -> tuple[PartSpec, ...] | None:
    """The parts of one side, unit by unit: head ``i`` of dimension ``d`` joins the units of head
    ``i // group``; ``pairs`` None (a unit per dimension), ``"half"`` (dimensions ``j`` and
    ``j + d/2``) or ``"interleaved"`` (``2j`` and ``2j + 1``). None where a part is not a slice
    along one dimension made of whole heads."""
    if any(p.dim is None or p.block != 1 or p.unit_offset or p.length % d for p in parts):
        return None
    if pairs is None and group == 1:  # a unit per row: the parts as they are
        return tuple(p._replace(sign=sign) for p in parts)
    out: list[PartSpec] = []
    half = d // 2
    for p in parts:
        for i in range(p.length // d):
            start = p.start + i * d
            if pairs is None:
                out.append(p._replace(start=start, length=d, sign=sign, unit_offset=i // group * d))
            elif pairs == "half":
                offset = i // group * half
                out += [
                    p._replace(start=start + s * half, length=half, sign=sign, unit_offset=offset)
                    for s in (0, 1)
                ]
            else:
                out.append(
                    p._replace(
                        start=start, length=d, block=2, sign=sign, unit_offset=i // group * half
                    )
                )
    return tuple(out)


def _pair(
    name: str, a: Side, b: Side, d: int, pairs: str | None, unless: PartsKey | None = None
) -> Proposal | None:
    """Side ``a``, of ``group`` times as many heads as ``b``, against ``b`` (its signs
    negative), unit by unit; None where the sides share an entry or are not made of heads."""
    left = _headwise(a[2], d, a[1] // b[1], 1.0, pairs)
    right = _headwise(b[2], d, 1, -1.0, pairs)
    if not left or not right or overlaps(left + right):
        return None
    units = b[1] if pairs is None else b[1] // 2
    return Proposal("rescale", name, left + right, units, unless)


def _query_key(parent: str, a: Side, b: Side, d: int) -> list[Proposal]:
    """``a`` (the query side) against ``b`` (the key side): per key dimension where ``a`` has
    more heads (an equal count is a sibling candidate already), and per rotary pair."""
    base = f"{parent} {a[0]}/{b[0]}".strip()
    fine = _pair(f"{base} (per key head)", a, b, d, None)
    if fine is None:
        return []
    found = [fine] if a[1] > b[1] else []
    if d % 2 == 0:
        key = parts_key(fine.parts)
        for pairs, label in (("half", "rotary pairs"), ("interleaved", "interleaved rotary pairs")):
            rotary = _pair(f"{base} ({label})", a, b, d, pairs, key)
            if rotary is not None:
                found.append(rotary)
    return found


def head_rescales(
    parent: str, module: nn.Module, outs: Sequence[Side], ins: Sequence[Side]
) -> list[Proposal]:
    """Grouped-query and rotary rescale candidates among the unlinked leaf children of one
    attention module ``module`` named ``parent``: ``outs`` the producers (their output rows, a
    packed q/k/v projection's thirds included), ``ins`` the consumers (their input columns),
    each ``(label, count, parts)``. Query, key and value sides are the producers that are not
    also consumers here; the output projection is a consumer.

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_heads import head_rescales
        >>> from torch_momentum.balance._symmetry_proposal import PartSpec
        >>> attn = torch.nn.Module()
        >>> attn.head_dim = 4
        >>> q = ("q", 8, (PartSpec("q.weight", 0, 0, 8),))  # two query heads
        >>> k = ("k", 4, (PartSpec("k.weight", 0, 0, 4),))  # one key head they share
        >>> [(p.name, p.units) for p in head_rescales("attn", attn, [q, k], [])]
        [('attn q/k (per key head)', 4), ('attn q/k (rotary pairs)', 2), \
('attn q/k (interleaved rotary pairs)', 2)]
    """
    d = head_dim(module)
    if d is None:
        return []
    found: list[Proposal] = []
    # the projections of q, k and v read a recorded module's output; one that reads the
    # attention's own functional output (the output projection) is no query, key or value
    reading = {c[0] for c in ins}
    outs = [a for a in outs if a[0] not in reading]
    for i, a in enumerate(outs):
        if a[1] % d:
            continue
        for j, b in enumerate(outs):  # equal sizes: each unordered pair once, in module order
            if not b[1] % d and not a[1] % b[1] and (a[1] > b[1] or (a[1] == b[1] and i < j)):
                found += _query_key(parent, a, b, d)
        for c in ins:  # value heads against the output projection's columns
            if c[1] > a[1] and not c[1] % a[1]:
                name = f"{parent} {a[0]}/{c[0]} (per value head)".strip()
                proposal = _pair(name, c, a, d, None)
                if proposal is not None:  # the value side is the A side: flip the signs
                    flipped = tuple(p._replace(sign=-p.sign) for p in proposal.parts)
                    found.append(proposal._replace(parts=flipped))
    return found
