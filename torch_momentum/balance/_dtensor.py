"""Sharded (DTensor) parameters: local shards, their weights in sums over ranks, one all_reduce.

A :class:`~torch.distributed.tensor.DTensor` (FSDP2 ``fully_shard``, tensor parallelism)
contributes the values of its local shard; contributions are summed over ranks by one
``all_reduce``, so every rank must make the same calls on the same steps. A rank whose shard is
replicated on ``k`` ranks weights its contribution by ``1/k``, so replicated mesh dimensions are
not counted twice. Plain tensors are assumed replicated (DDP) and are never reduced.

Private module: the names here are shared by the balance modules, not user API.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

_DTENSOR: list[type | None] = []


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (``torch.distributed.tensor`` imported lazily, once)."""
    if not _DTENSOR:
        cls: type | None
        try:
            from torch.distributed.tensor import DTensor as cls
        except ImportError:  # torch built without distributed support
            cls = None
        _DTENSOR.append(cls)
    return _DTENSOR[0] is not None and isinstance(t, _DTENSOR[0])


def local(t: Any) -> Tensor:
    """This rank's shard of a DTensor; a plain tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Any) -> Tensor:
    """The whole tensor (a DTensor gathered: a collective every rank joins)."""
    return t.full_tensor() if is_dtensor(t) else t


def local_and_weight(t: Any) -> tuple[Tensor, float]:
    """The tensor whose values this rank contributes, and its weight in the sum over ranks.

    Plain tensors: themselves, weight 1, not reduced. DTensors: the local shard, weighted by
    ``(number of distinct shards) / world_size``: each distinct shard lives on ``world_size /
    shards`` ranks, so the weighted sum over all ranks counts every element once. A pending
    (``Partial``) placement is resolved first (a collective every rank joins).
    """
    if not is_dtensor(t):
        return t, 1.0
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate

    placements = list(t.placements)
    if any(p.is_partial() for p in placements):
        t = t.redistribute(
            t.device_mesh, [Replicate() if p.is_partial() else p for p in placements]
        )
        placements = list(t.placements)
    mesh = t.device_mesh
    shards = 1
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            shards *= mesh.size(dim)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return t.to_local(), shards / world


def weight(t: Tensor) -> float:
    """The weight of this rank's shard of ``t`` in sums over ranks (1 for plain tensors)."""
    return local_and_weight(t)[1] if is_dtensor(t) else 1.0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (nothing outside an initialised process group); returns it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sharded_along(p: Any, dim: int) -> bool:
    """Whether ``p`` is a DTensor sharded along ``dim``."""
    return is_dtensor(p) and any(pl.is_shard() and pl.dim == dim for pl in p.placements)


def shard_range(p: Any, dim: int, n: int) -> tuple[int, int]:
    """``(first index, count)`` along ``dim`` (of size ``n``) of this rank's shard of ``p``: all
    ``n`` unless ``p`` is a DTensor sharded along ``dim``."""
    if not sharded_along(p, dim):
        return 0, n
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[dim]), int(shape[dim])
