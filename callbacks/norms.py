r"""Plain-torch arithmetic behind :class:`~torch_momentum.callbacks.LayerBalanceMonitor`.

Nothing here needs Lightning: every function takes modules, parameters or tensors and returns
tensors or floats, so it can be called from any training loop and is tested without a Trainer.

The mathematics (Du, Hu & Lee 2018). Let a network be 1-homogeneous in each layer's weights
:math:`W_h` (bias-free linear, ReLU or leaky-ReLU layers): scaling :math:`W_h` by
:math:`\alpha > 0` scales the output by :math:`\alpha`. Euler's identity for homogeneous functions
then gives, for every layer,

.. math::
    \langle \nabla_{W_h} \ell, W_h \rangle = \langle \nabla_{\hat y} \ell, \hat y \rangle ,

the same number for all :math:`h`. Hence under gradient flow
:math:`\tfrac{d}{dt}\|W_h\|^2 = -2\langle \nabla_{W_h}\ell, W_h\rangle` is the same for every layer
and :math:`\|W_h(t)\|^2 - \|W_{h'}(t)\|^2` is conserved. One gradient-descent step
:math:`W_h \leftarrow W_h - \eta g_h` changes it by exactly

.. math::
    \Delta\big(\|W_h\|^2 - \|W_{h'}\|^2\big) = \eta^2 \big(\|g_h\|^2 - \|g_{h'}\|^2\big),

because the cross terms :math:`-2\eta\langle g_h, W_h\rangle` cancel between the two layers. With
biases the per-unit identity is :math:`\langle g_{W_h}, W_h\rangle + \langle g_{b_h}, b_h\rangle =
\langle g_{W_{h+1}}, W_{h+1}\rangle`: the conserved quantity is
:math:`\|W_h\|^2 + \|b_h\|^2 - \|W_{h+1}\|^2` (the bias of layer :math:`h+1` is not part of it).

Sharded parameters. A :class:`~torch.distributed.tensor.DTensor` (FSDP2 ``fully_shard``, tensor
parallelism) contributes the squared norm of its local shard; those contributions are summed over
ranks by one ``all_reduce`` of the vector of per-layer values, so every rank must call the
function with the same layers on the same steps. A rank whose shard is replicated on ``k`` ranks
weights its contribution by ``1/k``, so replicated mesh dimensions are not counted twice. Plain
tensors are assumed replicated (DDP) and are not reduced.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ROOT_LAYER_NAME",
    "adjacent_pairs",
    "balance_metrics",
    "discover_layers",
    "layer_grad_sq_norms",
    "layer_sq_norms",
    "layer_sq_norms_host",
    "layer_sq_norms_many",
]

#: Name used for parameters owned directly by the root module (whose module name is ``""``).
ROOT_LAYER_NAME = "root"

LayerParams = dict[str, list[tuple[str, nn.Parameter]]]


def discover_layers(
    module: nn.Module,
    layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
) -> LayerParams:
    """Find the layers of ``module`` and their parameters.

    Args:
        module: the model.
        layers: ``None`` (default): every submodule that directly owns trainable parameters, in
            registration order (for ``nn.Sequential`` stacks that is forward order); a layer's
            tensors are its own trainable parameters (weight and bias), so a frozen module is not
            a layer. A list of module names: those modules, in that order (the order defines
            adjacency); a named layer's tensors are all parameters of that module, recursively,
            frozen ones included (their gradient norm is 0). A dict ``{layer_name: [parameter
            names]}``: exactly those parameters, e.g. ``{"hidden": ["0.weight", "0.bias"],
            "out": ["2.weight"]}``.

    Returns:
        ``{layer_name: [(parameter_name, parameter), ...]}`` in layer order.

    Raises:
        TypeError: ``layers`` is not ``None``, a sequence of strings or a mapping.
        ValueError: an unknown module or parameter name, a duplicate, or an empty layer.
    """
    spec = check_layers_spec(layers)
    if spec is None:
        return _default_layers(module)
    if isinstance(spec, dict):
        return _layers_from_mapping(module, spec)
    return _layers_from_module_names(module, spec)


def check_layers_spec(
    layers: Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> list[str] | dict[str, list[str]] | None:
    """Validate the shape of a ``layers=`` argument (no model needed) and return a copy.

    Raises:
        TypeError: not ``None``, a sequence of module names or a dict of parameter-name lists.
        ValueError: empty, a name given twice, or a layer without parameters.
    """
    if layers is None:
        return None
    if isinstance(layers, Mapping):
        if not layers:
            raise ValueError("`layers` is an empty dict: name at least two layers")
        out: dict[str, list[str]] = {}
        for key, names in layers.items():
            if not isinstance(key, str):
                raise TypeError(f"`layers` dict keys must be str, got {key!r}")
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise TypeError(
                    f"`layers[{key!r}]` must be a list of parameter names, got {names!r}"
                )
            if not all(isinstance(n, str) for n in names):
                raise TypeError(
                    f"`layers[{key!r}]` must contain parameter names (str), got {names!r}"
                )
            if not names:
                raise ValueError(
                    f"`layers[{key!r}]` is empty: a layer needs at least one parameter"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"`layers[{key!r}]` names a parameter twice: {list(names)!r}")
            out[key] = list(names)
        return out
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(
            "`layers` must be None, a list of module names or a dict {layer: [parameter names]},"
            f" got {layers!r}"
        )
    if not layers:
        raise ValueError("`layers` is an empty list: name at least two modules")
    if not all(isinstance(n, str) for n in layers):
        raise TypeError(f"`layers` must contain module names (str), got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"`layers` names a module twice: {list(layers)!r}")
    return list(layers)


def _default_layers(module: nn.Module) -> LayerParams:
    found: LayerParams = {}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        params = []
        for p_name, p in mod.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append((f"{mod_name}.{p_name}" if mod_name else p_name, p))
        if params:
            found[mod_name or ROOT_LAYER_NAME] = params
    return found


def _layers_from_module_names(module: nn.Module, names: Sequence[str]) -> LayerParams:
    modules = dict(module.named_modules())
    found: LayerParams = {}
    for name in names:
        if name not in modules:
            raise ValueError(
                f"`layers` names the module {name!r}, which the model does not have; modules that"
                f" own parameters: {_modules_with_params(module)}"
            )
        params = [
            (f"{name}.{p_name}" if name else p_name, p)
            for p_name, p in modules[name].named_parameters()
        ]
        if not params:
            raise ValueError(f"`layers` names the module {name!r}, which has no parameters")
        found[name] = params
    return found


def _layers_from_mapping(module: nn.Module, spec: Mapping[str, Sequence[str]]) -> LayerParams:
    params = dict(module.named_parameters(remove_duplicate=False))
    found: LayerParams = {}
    for layer, p_names in spec.items():
        entries = []
        for p_name in p_names:
            if p_name not in params:
                raise ValueError(
                    f"`layers[{layer!r}]` names the parameter {p_name!r}, which the model does not"
                    f" have; its parameters: {list(params)}"
                )
            entries.append((p_name, params[p_name]))
        found[layer] = entries
    return found


def _modules_with_params(module: nn.Module) -> list[str]:
    return [
        name or ROOT_LAYER_NAME
        for name, mod in module.named_modules()
        if any(True for _ in mod.parameters(recurse=False))
    ]


def adjacent_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """The adjacent layer pairs ``(L, M)`` in order: ``[(names[0], names[1]), ...]``."""
    return list(itertools.pairwise(names))


# ----------------------------------------------------------------------------------------------
# squared norms in one multi-tensor pass
# ----------------------------------------------------------------------------------------------


_DTENSOR: list[type | None] = []


def _is_dtensor(t: Tensor) -> bool:
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed support
            DTensor = None
        _DTENSOR.append(DTensor)
    cls = _DTENSOR[0]
    return cls is not None and isinstance(t, cls)


def _local_and_weight(t: Tensor) -> tuple[Tensor, float]:
    """The tensor whose squared norm this rank contributes, and its weight in the sum over ranks.

    Plain tensors: themselves, weight 1, not reduced. DTensors: the local shard, weighted by
    ``(number of distinct shards) / world_size``: each distinct shard lives on ``world_size /
    shards`` ranks, so the weighted sum over all ranks counts every element once.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate

    placements = list(t.placements)
    if any(p.is_partial() for p in placements):
        # A pending reduction: resolve it (a collective every rank joins, as all ranks hold the
        # same parameters), then treat the result as replicated along those mesh dimensions.
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
                if _is_dtensor(t):
                    t, weight = _local_and_weight(t)
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
                bucket[0].append(t.detach())
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
            import torch.distributed as dist

            sharded = out[total:].contiguous()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
            out = out[:total] + sharded
    return [out[offsets[k] : offsets[k + 1]] for k in range(len(groups))]


def layer_sq_norms_host(
    groups: Sequence[Sequence[Sequence[Tensor | None]]], *, reduce: bool | None = None
) -> list[list[float]]:
    """:func:`layer_sq_norms_many` as Python floats, for logging: one host transfer in all.

    Without sharded tensors the per-tensor norms (one ``torch._foreach_norm`` per bucket) are
    moved to the host in one transfer and summed per layer there, which costs far fewer small
    kernel launches than summing on the device; with sharded tensors (or ``reduce=True``) the
    device path with its single ``all_reduce`` runs first.
    """
    buckets, offsets, any_sharded, _ = _bucket(groups)
    if any_sharded or reduce:
        flat = torch.cat(layer_sq_norms_many(groups, reduce=reduce)).tolist()
        return [flat[offsets[k] : offsets[k + 1]] for k in range(len(groups))]
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
    """
    return layer_sq_norms_many([layer_tensors], reduce=reduce)[0]


def layer_grad_sq_norms(
    layer_params: Sequence[Sequence[Tensor]], *, reduce: bool | None = None
) -> Tensor:
    r"""``out[l] = \sum_{p \in layer_l} \|p.grad\|_F^2``; parameters without ``.grad`` count 0."""
    grads = [[p.grad for p in layer] for layer in layer_params]
    if reduce is None:
        reduce = any(_is_dtensor(p) for layer in layer_params for p in layer)
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
    r"""The balance metrics of DESIGN.md as Python floats (at most one host transfer).

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
    """
    names = list(names)
    n = len(names)
    if n < 2:
        raise ValueError(
            f"balance metrics need at least two layers (differences and ratios of adjacent layers);"
            f" got {n} ({names}), so there are no adjacent pairs"
        )
    sq, sq0, g = _floats([sq_norms, sq_norms0, grad_sq])
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
