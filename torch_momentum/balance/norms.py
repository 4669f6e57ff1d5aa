r"""Squared norms of many layers in one multi-tensor pass, and the logged balance metrics.

Per layer :math:`L` the squared Frobenius norm :math:`\|W_L\|^2 = \sum_{t \in L} \|t\|_F^2` over its
tensors, computed for all layers (and their gradients) with one ``torch._foreach_norm`` per
(device, accumulation dtype) and no host synchronisation; :func:`balance_metrics` turns the
vectors into the logged quantities. Sharded (DTensor) tensors contribute their local shards,
summed over ranks by a single ``all_reduce`` (see :mod:`torch_momentum.balance`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from torch_momentum.balance._dtensor import all_reduce_sum, is_dtensor, local_and_weight

__all__ = [
    "balance_metrics",
    "layer_grad_sq_norms",
    "layer_sq_norms",
    "layer_sq_norms_host",
    "layer_sq_norms_many",
]


def _acc_dtype(t: Tensor) -> torch.dtype:
    # Accumulate float64 in float64 and everything else (fp32, bf16, fp16) in float32: the norm
    # of a float32 tensor is not more accurate than its entries, and float32 keeps the
    # multi-tensor kernels on their fast path.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_INDEX_CACHE: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}


def _index(device: torch.device, idx: tuple[int, ...]) -> Tensor:
    key = (device, idx)
    cached = _INDEX_CACHE.get(key)
    if cached is None:
        if len(_INDEX_CACHE) > 64:
            _INDEX_CACHE.clear()
        cached = torch.tensor(idx, dtype=torch.long).to(device)
        _INDEX_CACHE[key] = cached
    return cached


_Buckets = dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int], list[float]]]


def _bucket(
    groups: Sequence[Sequence[Sequence[Tensor | None]]],
) -> tuple[_Buckets, list[int], bool, torch.device | None]:
    """Sort all tensors by (device, accumulation dtype); slot ``total + s`` marks sharded ones."""
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + len(group))
    total = offsets[-1]
    buckets: _Buckets = {}
    any_sharded = False
    first_device: torch.device | None = None
    for k, group in enumerate(groups):
        for layer, tensors in enumerate(group):
            slot = offsets[k] + layer
            for t in tensors:
                if t is None:
                    continue
                weight = 1.0
                index = slot
                if is_dtensor(t):
                    t, weight = local_and_weight(t)
                    any_sharded = True
                    index = total + slot
                if t.is_sparse:
                    t = t.coalesce().values()
                if t.is_complex():
                    t = torch.view_as_real(t)
                if first_device is None:
                    first_device = t.device
                key = (t.device, _acc_dtype(t))
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = ([], [], [])
                bucket[0].append(t)  # read under no_grad by both callers: no detach needed
                bucket[1].append(index)
                bucket[2].append(weight)
    return buckets, offsets, any_sharded, first_device


def layer_sq_norms_many(
    groups: Sequence[Sequence[Sequence[Tensor | None]]],
    *,
    reduce: bool | None = None,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    r"""Squared Frobenius norms per layer for several groups of layers, in one pass.

    ``groups[k][l]`` is the list of tensors of layer ``l`` in group ``k`` (e.g. group 0: the
    parameters, group 1: their gradients); ``None`` entries (a parameter without gradient) count
    as zero. Returns one float64 vector per group, ``out[k][l] = sum_t ||t||^2``, on ``device``
    (default: the device of the first tensor). No host synchronisation.

    All tensors go through ``torch._foreach_norm`` once per (device, accumulation dtype); complex
    tensors are viewed as real pairs. Sharded (DTensor) contributions of all groups are summed
    over ranks by a single ``all_reduce``. ``reduce=None`` decides from the tensors (any DTensor);
    pass it explicitly when ``None`` entries might differ between ranks, since every rank must
    join the same collective.

    Example:

        >>> import torch
        >>> from torch_momentum.balance import layer_sq_norms_many
        >>> w, g = torch.ones(2, 2), torch.full((3,), 2.0)
        >>> out = layer_sq_norms_many([[[w], [g]], [[None], [w, g]]])  # float64 vectors
        >>> [[round(v, 5) for v in t.tolist()] for t in out]
        [[4.0, 12.0], [0.0, 16.0]]
    """
    buckets, offsets, any_sharded, first_device = _bucket(groups)
    total = offsets[-1]
    out_device = torch.device(device) if device is not None else first_device
    if out_device is None:
        out_device = torch.device("cpu")
    do_reduce = any_sharded if reduce is None else reduce
    if any_sharded and not do_reduce:
        raise ValueError("sharded (DTensor) tensors need reduce=True (or None)")
    out = torch.zeros(2 * total if do_reduce else total, dtype=torch.float64, device=out_device)
    with torch.no_grad():
        for (dev, acc), (tensors, idx, weights) in buckets.items():
            norms = torch._foreach_norm(tensors, 2, dtype=acc)
            sq = torch.stack(norms).to(torch.float64).square()
            if any(w != 1.0 for w in weights):
                sq = sq * torch.tensor(weights, dtype=torch.float64).to(dev)
            out.index_add_(0, _index(out_device, tuple(idx)), sq.to(out_device))
        if do_reduce:
            out = out[:total] + all_reduce_sum(out[total:].contiguous())
    return [out[offsets[k] : offsets[k + 1]] for k in range(len(groups))]


def layer_sq_norms_host(
    groups: Sequence[Sequence[Sequence[Tensor | None]]], *, reduce: bool | None = None
) -> list[list[float]]:
    """:func:`layer_sq_norms_many` as Python floats, for logging: one host transfer in all.

    Without sharded tensors the per-tensor norms (one ``torch._foreach_norm`` per bucket) are
    moved to the host in one transfer and summed per layer there, which costs far fewer small
    kernel launches than summing on the device; with sharded tensors (or ``reduce=True``) the
    device path with its single ``all_reduce`` runs first.

    Example:

        >>> import torch
        >>> from torch_momentum.balance import layer_sq_norms_host
        >>> [[round(v, 5) for v in layer] for layer in layer_sq_norms_host([[[torch.ones(2, 2)],
        ...                                                                  [torch.ones(3)]]])]
        [[4.0, 3.0]]
    """
    sharded = any(is_dtensor(t) for group in groups for layer in group for t in layer)
    if sharded or reduce:
        # the device path buckets the tensors itself: bucketing here too would resolve Partial
        # placements (a collective) twice
        parts = layer_sq_norms_many(groups, reduce=reduce)
        flat = torch.cat(parts).tolist()  # one host transfer
        bounds = list(itertools.accumulate((len(p) for p in parts), initial=0))
        return [flat[a:b] for a, b in itertools.pairwise(bounds)]
    buckets, offsets, _, _ = _bucket(groups)
    sums = [0.0] * offsets[-1]
    if buckets:
        with torch.no_grad():
            parts, order = [], []
            for (_, acc), (tensors, idx, _) in buckets.items():
                norms = torch._foreach_norm(tensors, 2, dtype=acc)
                parts.append(torch.stack(norms).to(device="cpu", dtype=torch.float64))
                order.extend(idx)
            values = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
        for slot, value in zip(order, values, strict=True):
            sums[slot] += value * value
    return [sums[offsets[k] : offsets[k + 1]] for k in range(len(groups))]


def layer_sq_norms(
    layer_tensors: Sequence[Sequence[Tensor | None]], *, reduce: bool | None = None
) -> Tensor:
    r"""``out[l] = \sum_{t \in layer_l} \|t\|_F^2`` as a float64 vector (one multi-tensor pass).

    Sharded (DTensor) tensors contribute their local shards, summed over ranks (see the module
    docstring). No host synchronisation.

    Example:

        >>> import torch
        >>> from torch_momentum.balance import layer_sq_norms
        >>> out = layer_sq_norms([[torch.ones(2, 2), torch.ones(2)], [torch.ones(3)]])
        >>> out.dtype, [round(v, 5) for v in out.tolist()]
        (torch.float64, [6.0, 3.0])
    """
    return layer_sq_norms_many([layer_tensors], reduce=reduce)[0]


def layer_grad_sq_norms(
    layer_params: Sequence[Sequence[Tensor]], *, reduce: bool | None = None
) -> Tensor:
    r"""``out[l] = \sum_{p \in layer_l} \|p.grad\|_F^2``; parameters without ``.grad`` count 0.

    Example:

        >>> import torch
        >>> from torch_momentum.balance import layer_grad_sq_norms
        >>> a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
        >>> (3 * a.sum()).backward()
        >>> [round(v, 5) for v in layer_grad_sq_norms([[a], [b]]).tolist()]
        [18.0, 0.0]
    """
    grads = [[p.grad for p in layer] for layer in layer_params]
    if reduce is None:
        reduce = any(is_dtensor(p) for layer in layer_params for p in layer)
    return layer_sq_norms_many([grads], reduce=reduce)[0]


# ----------------------------------------------------------------------------------------------
# the logged quantities
# ----------------------------------------------------------------------------------------------


def balance_metrics(
    sq_norms: Tensor | Sequence[float],
    sq_norms0: Tensor | Sequence[float],
    grad_sq: Tensor | Sequence[float] | None,
    names: Sequence[str],
) -> dict[str, float]:
    r"""The layer balance metrics as Python floats (at most one host transfer).

    Args:
        sq_norms: :math:`\|W_L(t)\|^2` per layer (a tensor, or floats).
        sq_norms0: :math:`\|W_L(0)\|^2` per layer.
        grad_sq: :math:`\|\nabla_{W_L}\ell\|^2` per layer, or ``None`` to leave out gradient norms.
        names: layer names, in adjacency order.

    Returns:
        ``balance/sq_norm/{L}``, ``balance/sq_norm_change/{L}`` (:math:`\|W_L(t)\|^2 -
        \|W_L(0)\|^2`), ``balance/sq_norm_diff/{L}-{M}`` and ``balance/sq_norm_ratio/{L}-{M}``
        for adjacent ``L, M``, ``balance/drift`` (:math:`\max_{pairs}|diff(t) - diff(0)|`, 0 under
        gradient flow for a layer-wise 1-homogeneous network), and, with ``grad_sq``,
        ``grad_norm/{L}`` and ``grad_norm/total``. A zero norm gives an infinite or NaN ratio.

    Raises:
        ValueError: fewer than two layers (no adjacent pairs), or lengths that do not match.

    Example:

        >>> from torch_momentum.balance import balance_metrics
        >>> m = balance_metrics([4.0, 1.0], [2.0, 1.0], None, ["a", "b"])
        >>> m["balance/sq_norm_diff/a-b"], m["balance/sq_norm_ratio/a-b"], m["balance/drift"]
        (3.0, 4.0, 2.0)
    """
    names = list(names)
    n = len(names)
    if n < 2:
        raise ValueError(
            f"balance metrics need at least two layers (differences and ratios of adjacent layers);"
            f" got {n} ({names}), so there are no adjacent pairs"
        )
    sq_, sq0_, g = _floats([sq_norms, sq_norms0, grad_sq])
    assert sq_ is not None and sq0_ is not None
    sq, sq0 = sq_, sq0_
    if len(sq) != n or len(sq0) != n or (g is not None and len(g) != n):
        raise ValueError(
            f"got {n} names but vectors of sizes {len(sq)}, {len(sq0)},"
            f" {None if g is None else len(g)}"
        )
    metrics: dict[str, float] = {}
    for name, value in zip(names, sq, strict=True):
        metrics[f"balance/sq_norm/{name}"] = value
    for name, value, value0 in zip(names, sq, sq0, strict=True):
        metrics[f"balance/sq_norm_change/{name}"] = value - value0
    drift = 0.0
    ratios = {}
    for i in range(n - 1):
        pair = f"{names[i]}-{names[i + 1]}"
        diff = sq[i] - sq[i + 1]
        metrics[f"balance/sq_norm_diff/{pair}"] = diff
        ratios[f"balance/sq_norm_ratio/{pair}"] = _ratio(sq[i], sq[i + 1])
        drift = max(drift, abs(diff - (sq0[i] - sq0[i + 1])))
    metrics.update(ratios)
    metrics["balance/drift"] = drift
    if g is not None:
        for name, value in zip(names, g, strict=True):
            metrics[f"grad_norm/{name}"] = math.sqrt(value)
        metrics["grad_norm/total"] = math.sqrt(sum(g))
    return metrics


def _ratio(a: float, b: float) -> float:
    if b != 0.0:
        return a / b
    return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a)


def _floats(
    values: Sequence[Tensor | Sequence[float] | None],
) -> list[list[float] | None]:
    """Tensors to lists of floats with a single host transfer for all of them."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    flat: list[float] = []
    if tensors:
        flat = torch.cat(
            [t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]
        ).tolist()
    out: list[list[float] | None] = []
    start = 0
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, Tensor):
            out.append(flat[start : start + v.numel()])
            start += v.numel()
        else:
            out.append([float(x) for x in v])
    return out
