r"""Balance arithmetic in plain torch: layer norms, per-unit balance and the balance ledger.

Nothing here imports Lightning: every function takes modules, parameters or tensors and returns
tensors or floats, so it can be called from any training loop; the Lightning callback
:class:`~torch_momentum.callbacks.LayerBalanceMonitor` only calls it.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LEDGER_TERMS",
    "ROOT_LAYER_NAME",
    "BalanceLedger",
    "UnitLayer",
    "adjacent_pairs",
    "balance_metrics",
    "check_layers_spec",
    "discover_layers",
    "layer_grad_sq_norms",
    "layer_sq_norms",
    "layer_sq_norms_host",
    "layer_sq_norms_many",
    "pair_units",
    "unit_balance",
    "unit_symmetry",
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
        ValueError: an unknown module or parameter name, a duplicate, an empty layer, or layers
            that share a parameter (``["net", "net.0"]``).

    Example:

        >>> from torch import nn
        >>> from torch_momentum.balance import discover_layers
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
        >>> {k: [n for n, _ in v] for k, v in discover_layers(net).items()}
        {'0': ['0.weight', '0.bias'], '2': ['2.weight']}
    """
    spec = check_layers_spec(layers)
    if spec is None:
        return _default_layers(module)
    if isinstance(spec, dict):
        found = _layers_from_mapping(module, spec)
    else:
        found = _layers_from_module_names(module, spec)
    _check_disjoint(found)
    return found


def _check_disjoint(found: LayerParams) -> None:
    """A parameter may belong to one layer only (``["net", "net.0"]`` would count it twice)."""
    owner: dict[int, tuple[str, str]] = {}
    for layer, params in found.items():
        for p_name, p in params:
            if id(p) in owner:
                other, _ = owner[id(p)]
                raise ValueError(
                    f"`layers` overlap: the parameter {p_name!r} belongs to both layer {other!r}"
                    f" and layer {layer!r}; name disjoint modules (e.g. not a module and one of"
                    " its submodules)"
                )
            owner[id(p)] = (layer, p_name)


def check_layers_spec(
    layers: Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> list[str] | dict[str, list[str]] | None:
    """Validate the shape of a ``layers=`` argument (no model needed) and return a copy.

    Raises:
        TypeError: not ``None``, a sequence of module names or a dict of parameter-name lists.
        ValueError: empty, a name given twice, or a layer without parameters.

    Example:

        >>> from torch_momentum.balance import check_layers_spec
        >>> check_layers_spec(("enc", "head"))
        ['enc', 'head']
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
    """The adjacent layer pairs ``(L, M)`` in order: ``[(names[0], names[1]), ...]``.

    Example:

        >>> from torch_momentum.balance import adjacent_pairs
        >>> adjacent_pairs(["a", "b", "c"])
        [('a', 'b'), ('b', 'c')]
    """
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

    Example:

        >>> import torch
        >>> from torch_momentum.balance import layer_sq_norms_host
        >>> [[round(v, 5) for v in layer] for layer in layer_sq_norms_host([[[torch.ones(2, 2)],
        ...                                                                  [torch.ones(3)]]])]
        [[4.0, 3.0]]
    """
    sharded = any(_is_dtensor(t) for group in groups for layer in group for t in layer)
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


# ----------------------------------------------------------------------------------------------
# hidden units: pairing incoming and outgoing weights
# ----------------------------------------------------------------------------------------------

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Modules that may sit between two paired layers: positively homogeneous and channel-wise.
_PASS_THROUGH = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class UnitLayer:
    """A hidden layer whose outputs (features, or channels of a conv layer) are the units.

    Unit ``i`` has the incoming weights ``in_i`` = row ``i`` of ``weight`` (output channel ``i``'s
    filter) and ``bias[i]``, and the outgoing weights ``out_i`` = the slice ``i`` of
    ``next_weight`` viewed as ``(out, units, block)`` (a column; an input-channel slice of a conv;
    after a ``Flatten``, the ``block`` columns of channel ``i``'s spatial positions).

    Attributes:
        name: module name of the hidden layer.
        next_name: module name of the layer the units feed.
        weight: parameter name of the incoming weight.
        bias: parameter name of the incoming bias, or ``None``.
        next_weight: parameter name of the outgoing weight.
        units: number of units.

    Example:

        >>> from torch import nn
        >>> from torch_momentum.balance import pair_units
        >>> unit = pair_units(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))[0]
        >>> unit.weight, unit.bias, unit.next_weight, unit.units
        ('0.weight', '0.bias', '2.weight', 4)
    """

    name: str
    next_name: str
    weight: str
    bias: str | None
    next_weight: str
    units: int


def _chain(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules in registration order, descending the root and plain containers."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, mod: nn.Module, is_root: bool) -> None:
        children = list(mod.named_children())
        if not children:
            out.append((prefix, mod))
            return
        if not is_root and not isinstance(mod, _CONTAINERS):
            if isinstance(mod, _WEIGHTED + _PASS_THROUGH):
                out.append((prefix, mod))
                return
            raise ValueError(
                f"per-unit balance cannot pair units through the module {prefix!r}"
                f" ({type(mod).__name__}): it combines submodules in its own forward (a residual"
                " add?), so its units cannot be paired; pass `layers=[...]` naming a chain of"
                " Linear/Conv layers without it, or `neurons=False`"
            )
        if any(True for _ in mod.parameters(recurse=False)) and not is_root:
            raise ValueError(f"the container {prefix!r} owns parameters: cannot pair its units")
        for name, child in children:
            visit(f"{prefix}.{name}" if prefix else name, child, False)

    visit("", module, True)
    return out


def pair_units(
    module: nn.Module,
    layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
) -> list[UnitLayer]:
    r"""Pair every hidden unit with its incoming and outgoing weights.

    The model is read as a chain: its leaf modules in registration order (``nn.Sequential``
    stacks: forward order), through the root and plain containers. Between two paired
    Linear/Conv1d/2d/3d layers only positively homogeneous, channel-wise modules may sit (ReLU,
    LeakyReLU, Identity, Dropout, max/avg pooling, Flatten); then scaling ``in_i`` by
    :math:`\alpha>0` and ``out_i`` by :math:`1/\alpha` leaves the function unchanged, and
    gradient flow conserves every :math:`D_i = \|in_i\|^2 - \|out_i\|^2` (Du, Hu & Lee 2018).
    Functional operations inside a custom ``forward`` are not visible: the chain is assumed to be
    the forward order.

    Args:
        module: the model.
        layers: which layers to pair (default ``None``: every module that owns trainable
            parameters, each of which must then be Linear/Conv); a list of module names (adjacent
            in that order); or a dict ``{layer: [parameter names]}`` whose parameters belong to
            one Linear/Conv module per layer.

    Returns:
        One :class:`UnitLayer` per adjacent pair, in order.

    Raises:
        ValueError: a module between or among the layers that breaks the pairing (BatchNorm, a
            module with its own forward such as a residual block, an unknown module), grouped
            convolutions, shapes that do not chain, or fewer than two layers; the message names
            the module.

    Example:

        >>> from torch import nn
        >>> from torch_momentum.balance import pair_units
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        ...                     nn.Linear(4 * 3 * 3, 2))
        >>> [(u.name, u.units, u.next_weight) for u in pair_units(net)]
        [('0', 4, '4.weight')]
    """
    chain = _chain(module)
    position = {name: i for i, (name, _) in enumerate(chain)}
    spec = check_layers_spec(layers)
    if spec is None:
        names = [
            name
            for name, mod in chain
            if any(p.requires_grad for p in mod.parameters(recurse=False))
        ]
    elif isinstance(spec, dict):
        names = []
        for layer, p_names in spec.items():
            owners = {p_name.rpartition(".")[0] for p_name in p_names}
            if len(owners) != 1:
                raise ValueError(
                    f"`layers[{layer!r}]` has parameters of several modules {sorted(owners)}: per-"
                    "unit pairing needs one Linear/Conv module per layer"
                )
            names.append(owners.pop())
    else:
        names = list(spec)
    for name in names:
        if name not in position:
            raise ValueError(
                f"per-unit balance: the layer {name!r} is not a leaf module of the model's chain"
            )
        mod = chain[position[name]][1]
        if not isinstance(mod, _WEIGHTED):
            raise ValueError(
                f"per-unit balance cannot pair units through the module {name!r}"
                f" ({type(mod).__name__}): only Linear and Conv1d/2d/3d layers are paired"
                " (BatchNorm and other modules break the unit symmetry); pass `layers=[...]`"
                " naming a pairable chain, or `neurons=False`"
            )
        if getattr(mod, "groups", 1) != 1:
            raise ValueError(
                f"per-unit balance: the conv layer {name!r} has groups={mod.groups}; only"
                " groups=1 is paired"
            )
    if len(names) < 2:
        raise ValueError(f"per-unit balance needs at least two layers, got {names}")
    units = []
    for a, b in itertools.pairwise(names):
        ia, ib = position[a], position[b]
        if ib <= ia:
            raise ValueError(
                f"per-unit balance: layer {b!r} comes before {a!r} in the model; list layers in"
                " forward order"
            )
        flattened = False
        for name, mod in chain[ia + 1 : ib]:
            if not isinstance(mod, _PASS_THROUGH) or any(True for _ in mod.parameters()):
                raise ValueError(
                    f"per-unit balance cannot pair the units of {a!r} with {b!r}: the module"
                    f" {name!r} ({type(mod).__name__}) sits between them and is not a"
                    " positively homogeneous channel-wise map (BatchNorm, a residual add or an"
                    " unknown module); pass `layers=[...]` naming a pairable part, or"
                    " `neurons=False`"
                )
            if isinstance(mod, nn.Flatten):
                if mod.start_dim != 1:
                    raise ValueError(
                        f"per-unit balance: Flatten {name!r} must flatten from dim 1, got"
                        f" start_dim={mod.start_dim}"
                    )
                flattened = True
        ma, mb = chain[ia][1], chain[ib][1]
        n = ma.weight.shape[0]
        fan_in = mb.weight.shape[1]
        a_conv = not isinstance(ma, nn.Linear)
        b_conv = not isinstance(mb, nn.Linear)
        ok = fan_in == n
        if a_conv and not b_conv:
            ok = flattened and fan_in % n == 0
        elif b_conv and not a_conv:
            ok = False
        if not ok:
            raise ValueError(
                f"per-unit balance: the {n} outputs of {a!r} ({type(ma).__name__}) do not map"
                f" channel by channel onto the inputs of {b!r} ({type(mb).__name__}, fan-in"
                f" {fan_in})"
            )
        bias = f"{a}.bias" if getattr(ma, "bias", None) is not None else None
        units.append(UnitLayer(a, b, f"{a}.weight", bias, f"{b}.weight", n))
    return units


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _unit_parts(
    unit: UnitLayer, get: Callable[[str], Tensor | None]
) -> list[tuple[Tensor | None, str, float]]:
    return [
        (get(unit.weight), "rows", 1.0),
        (get(unit.bias) if unit.bias is not None else None, "entries", 1.0),
        (get(unit.next_weight), "cols", -1.0),
    ]


def _unit_sq(t: Tensor, kind: str, n: int, other: Tensor | None = None) -> Tensor:
    """Per-unit sums of ``t * other`` (``other`` defaults to ``t``), float64, length ``n``.

    Few kernels (this runs at logging steps on every hidden layer): a float64-accumulated norm
    for the squares, one product and one float64-accumulated sum otherwise."""
    t = _full(t).detach()
    o = None if other is None else _full(other).detach()
    if kind == "entries":
        t, dims = t.reshape(n, 1), (1,)
    elif kind == "rows":
        t, dims = t.reshape(n, -1), (1,)
    else:
        t, dims = t.reshape(t.shape[0], n, -1), (0, 2)
    if o is None:
        if t.is_complex():
            return torch.linalg.vector_norm(t, dim=dims, dtype=torch.complex128).square()
        return torch.linalg.vector_norm(t, dim=dims, dtype=torch.float64).square()
    o = o.reshape(t.shape)
    # complex tensors as real vectors: <t, o> = Re(conj(t) o)
    prod = (t.conj() * o).real if t.is_complex() else t * o
    return prod.sum(dims, dtype=torch.float64)


def _signed_sum(values: list[tuple[float, Tensor]]) -> Tensor:
    """``sum(sign * value)`` for signs +-1, one kernel per term after the first."""
    (sign, total), rest = values[0], values[1:]
    if sign != 1.0:
        total = -total
    for sign, value in rest:
        total = torch.add(total, value.to(total.device), alpha=sign)
    return total


def _getter(module: nn.Module, tensors: Callable[[str, Tensor], Tensor] | None):
    params = dict(module.named_parameters(remove_duplicate=False))

    def get(name: str) -> Tensor:
        p = params[name]
        return tensors(name, p) if tensors is not None else p

    return get


def unit_balance(
    module: nn.Module,
    units: Sequence[UnitLayer],
    tensors: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    r"""Per-unit balance :math:`D_i = \|in_i\|^2 - \|out_i\|^2` of every hidden layer.

    Args:
        module: the model.
        units: from :func:`pair_units`.
        tensors: optional ``(parameter name, parameter) -> tensor`` giving the values to use
            (e.g. the iterate of a look-ahead optimiser); default: the parameters.

    Returns:
        ``{hidden layer name: float64 vector of length units}``. Sharded (DTensor) parameters
        are gathered (a collective every rank joins).

    Example:

        >>> import torch
        >>> from torch import nn
        >>> from torch_momentum.balance import pair_units, unit_balance
        >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        ...     _ = net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        >>> unit_balance(net, pair_units(net))["0"].tolist()
        [0.0, 3.0]
    """
    get = _getter(module, tensors)
    out = {}
    for unit in units:
        values = [
            (sign, _unit_sq(t, kind, unit.units))
            for t, kind, sign in _unit_parts(unit, get)
            if t is not None
        ]
        out[unit.name] = _signed_sum(values)
    return out


def unit_symmetry(module: nn.Module, units: Sequence[UnitLayer]) -> dict[str, Tensor]:
    r"""Per-unit :math:`R_i = \langle in_i, g_{in_i}\rangle - \langle out_i, g_{out_i}\rangle` at
    the parameters as held, with their ``.grad`` (missing gradients count 0).

    :math:`R_i = 0` for any loss when the network is positively homogeneous in unit ``i``
    (Euler's identity); a non-zero value measures a broken symmetry.

    Returns:
        ``{hidden layer name: float64 vector of length units}``.

    Example:

        >>> import torch
        >>> from torch import nn
        >>> from torch_momentum.balance import pair_units, unit_symmetry
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)).double()
        >>> net(torch.randn(5, 3, dtype=torch.float64)).square().sum().backward()
        >>> bool(unit_symmetry(net, pair_units(net))["0"].abs().max() < 1e-12)
        True
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    out = {}
    for unit in units:
        values = []
        for name, kind, sign in (
            (unit.weight, "rows", 1.0),
            (unit.bias, "entries", 1.0),
            (unit.next_weight, "cols", -1.0),
        ):
            if name is None:
                continue
            p = params[name]
            if p.grad is not None:
                values.append((sign, _unit_sq(p, kind, unit.units, p.grad)))
        if values:
            out[unit.name] = _signed_sum(values)
        else:
            out[unit.name] = torch.zeros(unit.units, dtype=torch.float64)
    return out


# ----------------------------------------------------------------------------------------------
# the ledger
# ----------------------------------------------------------------------------------------------

#: The ledger's terms, in order: ``ledger/{term}/{L}-{M}``.
LEDGER_TERMS = ("momentum", "weight_decay", "symmetry", "discretisation", "other")

# the upper triangle of the Gram matrix of a tensor's three post-step rows
_UPPER = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def _acc(t: Tensor) -> torch.dtype:
    """The accumulation dtype of the ledger's dot products for a tensor of ``t``'s dtype."""
    return torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32


def _sums_of_squares(tensors: list[Tensor]) -> list[Tensor]:
    """``[sum |t|^2 for t in tensors]`` (real view of complex; half precision summed in float32),
    one multi-tensor reduction per dtype run."""
    out: list[Tensor] = []
    start = 0
    while start < len(tensors):
        dtype = tensors[start].dtype
        stop = start + 1
        while stop < len(tensors) and tensors[stop].dtype is dtype:
            stop += 1
        low = dtype in (torch.float16, torch.bfloat16)
        chunk = tensors[start:stop]
        out.extend(torch._foreach_powsum(chunk, 2, dtype=torch.float32 if low else None))
        start = stop
    return out


def _vec(t: Tensor, acc: torch.dtype) -> Tensor:
    """``t`` as a real vector of dtype ``acc`` (a view when it already is one; no autograd: the
    ledger's hooks run under ``torch.no_grad``)."""
    if t.dtype is not acc:
        if t.dtype.is_complex:
            t = torch.view_as_real(t)
        if t.dtype is not acc:
            t = t.to(acc)
    return t.reshape(-1)


# entries of the 4x4 Gram matrix of (x_t, v_t, g_t, dx) used by the terms:
# D = <x,x>, K = <x,v>, <x,g>, <v,g>, <x,dx>, <dx,dx>
_GRAM_ENTRIES = (0, 1, 2, 6, 3, 15)
_GRAM_AB = tuple(divmod(e, 4) for e in _GRAM_ENTRIES)


def _coefficients(
    eta: float, mu: float, lam: float, c: float, s: float, delta: float
) -> list[list[float]]:
    """Rows: the five terms as linear combinations of the Gram entries ``_GRAM_ENTRIES``."""
    a = 2.0 * (eta * mu + delta)
    return [
        [0.0, a, 0.0, 2.0 * eta * s * c, 0.0, 0.0],  # momentum
        [-2.0 * eta * lam, -2.0 * eta * lam * c, 0.0, 0.0, 0.0, 0.0],  # weight decay
        [0.0, 0.0, -2.0 * eta * s, -2.0 * eta * s * c, 0.0, 0.0],  # symmetry
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # discretisation
        [2.0 * eta * lam, -a + 2.0 * eta * lam * c, 2.0 * eta * s, 0.0, 2.0, 0.0],  # other
    ]


def _float(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().reshape(()))  # a host read; a CPU tensor lr costs nothing
    return float(value)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


_KINDS: dict[type, str] = {}


def _unit_slice(p: Tensor, kind: str, n: int, name: str) -> tuple[int, int]:
    """``(first unit, number of units)`` of this rank's shard of a unit part: all ``n`` units
    unless the unit axis (rows and bias entries: dim 0) is sharded. The column axis of the next
    layer's weight must not be sharded (a unit's columns would span ranks at unknown offsets).

    Raises:
        ValueError: the next layer's weight sharded along its columns.
    """
    if not _is_dtensor(p):
        return 0, n
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded = {pl.dim for pl in p.placements if pl.is_shard()}  # type: ignore[attr-defined]
    if kind == "cols":
        if 1 in sharded:
            raise ValueError(
                f"per-unit ledger terms need the next layer's weight {name!r} (shape"
                f" {tuple(p.shape)}) unsharded along its columns; got placements"
                f" {p.placements}"  # type: ignore[attr-defined]
            )
        return 0, n
    if 0 not in sharded:
        return 0, n
    shape, offset = compute_local_shape_and_global_offset(
        p.shape,
        p.device_mesh,  # type: ignore[attr-defined]
        p.placements,  # type: ignore[attr-defined]
    )
    return int(offset[0]), int(shape[0])


class BalanceLedger:
    r"""The balance ledger: where :math:`D = \|W_L\|^2 - \|W_M\|^2` of adjacent layers goes.

    For any update :math:`x_{t+1} = x_t + \Delta x`, exactly,
    :math:`D_{t+1} - D_t = 2\langle x_t, \Delta x\rangle_\pm + \|\Delta x\|^2_\pm` with
    :math:`\langle a, b\rangle_\pm = \langle a_L, b_L\rangle - \langle a_M, b_M\rangle`. For
    heavy ball (``PolyakSGD``; ``torch.optim.SGD`` with :math:`v = -`\ ``momentum_buffer``;
    :math:`d_t = g_t + \lambda x_t`, :math:`v_{t+1} = \mu v_t - d_t`,
    :math:`x_{t+1} = x_t + \eta v_{t+1}`) the first-order part splits into

    .. math::
        2\eta\mu K_t - 2\eta\lambda D_t - 2\eta R_t, \qquad
        K_t = \langle x_t, v_t\rangle_\pm,\ R_t = \langle x_t, g_t\rangle_\pm,

    (momentum, weight decay, symmetry) and the discretisation term is
    :math:`\|\Delta x\|^2_\pm = \eta^2\|v_{t+1}\|^2_\pm`. For Nesterov (``NesterovSGD``,
    ``SGD(nesterov=True)``) :math:`D` is taken at the iterate :math:`x = y - c\,v` (``y`` the
    parameters, ``c`` the look-ahead coefficient the parameters were built with), the gradient at
    ``y``: momentum :math:`2\eta\mu K_t + 2\eta c\langle v_t, g_t\rangle_\pm`, weight decay
    :math:`-2\eta\lambda(D_t + cK_t)`, symmetry :math:`-2\eta\langle y_t, g_t\rangle_\pm` (for the
    built-in under a changing :math:`\eta\mu` its implied iterate also moves by
    :math:`(c_t - \eta\mu)v_t`, counted as momentum). Any other optimiser gets the generic split:
    symmetry :math:`-2\eta R_t` (the gradient's share, :math:`\eta` the group's ``lr``), the rest
    of the first-order part in ``other``. For the SGD family ``other`` is round-off. Every
    update that is applied is read, from optimiser step hooks: for the known rules the
    pre-step iterate and velocity are recovered exactly from the parameters, velocity and
    gradient after the step (no copies); any other optimiser gets a copy of the parameters
    before the step. Clipping, AMP unscaling and gradient accumulation are thus seen as applied,
    and a step skipped by a GradScaler is not counted.

    The terms are accumulated on the device without host synchronisation: per tensor, the
    entries of the Gram matrix of the parameters, velocity and gradient that the terms need (at
    most six dot products; four for heavy ball), mapped to the sums by one cached matrix. With
    sharded (DTensor) parameters every rank accumulates its shards and :meth:`read` sums them
    with one ``all_reduce`` (every rank must call it); per-unit sums likewise, each rank adding
    the units of its row shard (the next layer's weight must not be sharded along its columns).

    Args:
        layers: ``{layer name: [parameters]}`` in adjacency order (e.g. from
            :func:`discover_layers`, values as tensors).
        optimizers: the optimiser (or optimisers) that update them.
        units: optional :class:`UnitLayer` list (from :func:`pair_units`) for per-unit terms.
        module: the model; required with ``units`` (to find the unit parameters by name).

    Example:

        >>> import torch
        >>> from torch import nn
        >>> from torch_momentum import PolyakSGD
        >>> from torch_momentum.balance import BalanceLedger
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(),
        ...                     nn.Linear(4, 2, bias=False)).double()
        >>> opt = PolyakSGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> ledger = BalanceLedger({"a": [net[0].weight], "b": [net[2].weight]}, opt)
        >>> ledger.attach()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     ((net(x) - y) ** 2).mean().backward()
        ...     _ = opt.step()
        >>> out = ledger.read()
        >>> drift = out["D"] - out["D0"]
        >>> bool(abs(drift - out["sums"].sum(1)).max() < 1e-12 * (1 + abs(out["D0"]).max()))
        True
        >>> ledger.detach()
    """

    #: sums of squares as one multi-tensor reduction (True) or dot products (False); None: by
    #: device (multi-tensor except on the CPU). Both give the same values up to rounding.
    _split_squares: bool | None = None

    def __init__(
        self,
        layers: Mapping[str, Sequence[Tensor]],
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        units: Sequence[UnitLayer] | None = None,
        module: nn.Module | None = None,
    ) -> None:
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self.names = list(layers)
        if len(self.names) < 2:
            raise ValueError(f"the ledger needs at least two layers, got {self.names}")
        self.pairs = [f"{a}-{b}" for a, b in adjacent_pairs(self.names)]
        self.optimizers = list(optimizers)
        self.units = list(units or [])
        if self.units and module is None:
            raise ValueError("`units` needs `module` to find the unit parameters by name")
        self._tracked: list[Tensor] = []
        index: dict[int, int] = {}

        def track(p: Tensor) -> int:
            if id(p) not in index:
                index[id(p)] = len(self._tracked)
                self._tracked.append(p)
            return index[id(p)]

        layer_of = []
        for layer, params in enumerate(layers.values()):
            for p in params:
                layer_of.append((track(p), layer))
        self._unit_parts: list[list[tuple[int, str, float]]] = []
        if self.units:
            named = dict(module.named_parameters(remove_duplicate=False))  # type: ignore[union-attr]
            for unit in self.units:
                parts = [(track(named[unit.weight]), "rows", 1.0)]
                if unit.bias is not None:
                    parts.append((track(named[unit.bias]), "entries", 1.0))
                parts.append((track(named[unit.next_weight]), "cols", -1.0))
                self._unit_parts.append(parts)
        n, n_pairs = len(self._tracked), len(self.pairs)
        self._sharded = any(_is_dtensor(p) for p in self._tracked)
        first = _local(self._tracked[0])
        self.device = first.device
        self._multi_device = any(_local(p).device != self.device for p in self._tracked)
        self._unit_set = {i for parts in self._unit_parts for i, _, _ in parts}
        # sign[pair, tensor]: +1 for layer L, -1 for layer M of pair L-M
        sign = torch.zeros(n_pairs, n, dtype=torch.float64)
        for t, layer in layer_of:
            if layer < n_pairs:
                sign[layer, t] += 1.0
            if layer > 0:
                sign[layer - 1, t] -= 1.0
        self._sign = sign.to(self.device)
        self._weights = [
            1.0 if not _is_dtensor(p) else _local_and_weight(p)[1] for p in self._tracked
        ]
        self._local_sums = torch.zeros(n_pairs, len(LEDGER_TERMS), dtype=torch.float64).to(
            self.device
        )
        self._offset = torch.zeros_like(self._local_sums)
        self._unit_sums = [
            torch.zeros(u.units, len(LEDGER_TERMS), dtype=torch.float64).to(self.device)
            for u in self.units
        ]
        self._unit_offset = [torch.zeros_like(t) for t in self._unit_sums]
        # per unit part: (first unit, number of units) of this rank's shard (all units unless
        # the unit axis itself is sharded)
        self._unit_slices = {
            (u, i): _unit_slice(
                self._tracked[i],
                kind,
                unit.units,
                {"rows": unit.weight, "entries": unit.bias, "cols": unit.next_weight}[kind] or "",
            )
            for u, (unit, parts) in enumerate(zip(self.units, self._unit_parts, strict=True))
            for i, kind, _ in parts
        }
        self.D0: Tensor | None = None
        self.unit_D0: list[Tensor] | None = None
        self.steps = 0  # optimiser steps accumulated by this process (since start/restore)
        #: whether this process accumulates (replicated data parallel: rank zero only)
        self.active = True
        self._owner: dict[int, tuple[torch.optim.Optimizer, dict[str, Any]]] = {}
        self._sgd_c: dict[tuple[int, int], float] = {}
        self._pending: dict[int, list[Any]] = {}
        self._rules: dict[Any, Any] = {}
        self._matrices: dict[Any, Any] = {}
        self._handles: list[Any] = []
        self._static: dict[int, list[Any]] = {}
        self._views: dict[tuple[int, int], tuple[int, int, Tensor]] = {}
        self._locate()

    # ------------------------------------------------------------------------------------------
    # optimiser kinds
    # ------------------------------------------------------------------------------------------

    def _locate(self) -> None:
        ids = {id(p): i for i, p in enumerate(self._tracked)}
        self._owner = {}
        self._plans: dict[int, list[tuple[int, dict[str, Any], list[int]]]] = {}
        for opt in self.optimizers:
            plan = []
            for g, group in enumerate(opt.param_groups):
                idx = [ids[id(p)] for p in group["params"] if id(p) in ids]
                for i in idx:
                    self._owner[i] = (opt, group)
                if idx:
                    plan.append((g, group, idx))
            self._plans[id(opt)] = plan

    @staticmethod
    def _kind(opt: torch.optim.Optimizer) -> str:
        cached = _KINDS.get(type(opt))
        if cached is not None:
            return cached
        _KINDS[type(opt)] = kind = BalanceLedger._find_kind(opt)
        return kind

    @staticmethod
    def _find_kind(opt: torch.optim.Optimizer) -> str:
        from torch_momentum.optim import NesterovSGD, PolyakSGD

        if isinstance(opt, NesterovSGD):
            return "nesterov"
        if isinstance(opt, PolyakSGD):
            return "heavy"
        if type(opt) is torch.optim.SGD:
            return "sgd"
        return "generic"

    def _lookahead(self, opt: torch.optim.Optimizer, g: int, group: dict[str, Any]) -> float:
        """The c with parameters = x + c * v now (0 without a look-ahead)."""
        kind = self._kind(opt)
        if kind == "nesterov":
            return _float(opt._lookahead_coefficient(group))  # type: ignore[attr-defined]
        if kind == "sgd" and group.get("nesterov", False):
            key = (id(opt), g)
            if key not in self._sgd_c:
                self._sgd_c[key] = _float(group["lr"]) * float(group["momentum"])
            return self._sgd_c[key]
        return 0.0

    def _velocity(self, opt: torch.optim.Optimizer, p: Tensor) -> Tensor | None:
        state = opt.state.get(p, {})
        kind = self._kind(opt)
        if kind in ("nesterov", "heavy"):
            return state.get("velocity")
        if kind == "sgd":
            buf = state.get("momentum_buffer")
            return None if buf is None else torch.neg(buf)
        return None

    def _hyper(self, opt: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[float, ...]:
        """``(eta, mu, lambda, sign, known)``: known=False for the generic split."""
        kind = self._kind(opt)
        eta = _float(group.get("lr", 0.0))
        s = -1.0 if group.get("maximize", False) else 1.0
        if kind == "generic" or (kind == "sgd" and group.get("dampening", 0) != 0):
            return eta, 0.0, 0.0, s, 0.0
        return eta, float(group["momentum"]), float(group["weight_decay"]), s, 1.0

    def _iterate(self, i: int, *, local: bool = True) -> Tensor:
        """The iterate of tracked tensor ``i`` (a view of the parameter when it is the iterate)."""
        p = self._tracked[i]
        value = _local(p.detach()) if local else p.detach()
        owner = self._owner.get(i)
        if owner is None:
            return value
        opt, group = owner
        g = next(k for k, gr in enumerate(opt.param_groups) if gr is group)
        c = self._lookahead(opt, g, group)
        v = self._velocity(opt, p) if c != 0.0 else None
        if v is None:
            return value
        return value - c * (_local(v) if local else v)

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register step pre/post hooks on the optimisers (idempotent)."""
        if self._handles:
            return
        for opt in self.optimizers:
            if self._kind(opt) == "heavy":
                # heavy ball needs nothing from before the step: the post-step state determines
                # the pre-step iterate and velocity
                self._static[id(opt)] = [
                    (g, group, idx, None, 0.0) for g, group, idx in self._plans.get(id(opt), [])
                ]
            else:
                self._handles.append(opt.register_step_pre_hook(self._before))
            self._handles.append(opt.register_step_post_hook(self._after))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = {}
        self._static = {}
        self._views = {}

    @torch.no_grad()
    def _before(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        # Known rules need only the look-ahead coefficient in force now (the pre-step iterate and
        # velocity are recovered exactly from the state after the step); other optimisers get a
        # copy of the parameters.
        if not self.active:
            return
        generic = self._kind(opt) == "generic"
        pending = []
        for g, group, idx in self._plans.get(id(opt), []):
            known = self._hyper(opt, group)[4] != 0.0
            c = self._lookahead(opt, g, group) if known else 0.0
            xs = None
            if generic or not known:
                xs = [_local(self._tracked[i].detach()).clone() for i in idx]
            pending.append((g, group, idx, xs, c))
        self._pending[id(opt)] = pending

    def _rule(
        self, opt: torch.optim.Optimizer, g: int, group: dict[str, Any], c0: float
    ) -> tuple[Any, list[list[float]], list[list[float]], list[list[float]]]:
        """For a known rule: a key, the coefficient rows of the terms, and the matrices mapping the
        post-step rows ``r = (p, v_{t+1}, g_t)`` to ``(x_t, v_t, g_t, dx)`` with and without a
        velocity (``v_{t+1}`` absent: plain gradient descent)."""
        eta, mu, lam, s, _ = self._hyper(opt, group)
        kind = self._kind(opt)
        nesterov = kind == "nesterov" or (kind == "sgd" and group.get("nesterov", False))
        c1, delta = 0.0, 0.0
        if kind == "sgd" and nesterov:
            c1 = eta * mu
            delta = c0 - eta * mu
            self._sgd_c[(id(opt), g)] = c1
        elif kind == "nesterov":
            c1 = self._lookahead(opt, g, group)
        if not nesterov:
            c0 = 0.0
        key = (kind, nesterov, eta, mu, lam, s, c0, c1, delta)
        cached = self._rules.get(key)
        if cached is None:
            if len(self._rules) > 256:  # a scheduler changes lr every step
                self._rules.clear()
            cached = self._rules[key] = (key, *self._rule_matrices(kind, nesterov, *key[2:]))
        return cached

    @staticmethod
    def _rule_matrices(
        kind: str,
        nesterov: bool,
        eta: float,
        mu: float,
        lam: float,
        s: float,
        c0: float,
        c1: float,
        delta: float,
    ) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
        rows = _coefficients(eta, mu, lam, c0, s, delta)
        # without a velocity: p1 = p0 - eta (s g + lam p0)
        k = 1.0 / (1.0 - eta * lam) if eta * lam != 1.0 else 0.0
        x0 = [k, 0.0, k * eta * s]
        plain = [x0, [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0 - k, 0.0, -k * eta * s]]
        if mu == 0.0:
            with_v = [[1.0, -c1 - eta, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, eta, 0.0]]
            return rows, with_v, plain
        x1 = [1.0, -c1, 0.0]
        if kind == "sgd" and nesterov:
            # p0 = (p1 + eta s g - eta mu v1) / (1 - eta lam); mu v0 = v1 + s g + lam p0
            p0 = [k, -k * eta * mu, k * eta * s]
            v0 = [(lam * p0[0]) / mu, (1.0 + lam * p0[1]) / mu, (s + lam * p0[2]) / mu]
            xs = [p0[j] - c0 * v0[j] for j in range(3)]
            dx = [x1[j] - xs[j] for j in range(3)]
        else:
            # dx = eta v1; mu v0 = v1 + s g + lam (x0 + c0 v0)
            xs = [x1[0], x1[1] - eta, x1[2]]
            dx = [0.0, eta, 0.0]
            den = mu - lam * c0
            v0 = [lam * xs[0] / den, (1.0 + lam * xs[1]) / den, (s + lam * xs[2]) / den]
        return rows, [xs, v0, [0.0, 0.0, 1.0], dx], plain

    @torch.no_grad()
    def _after(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        # One pass collects, per updated tensor, its post-step rows (first, second, gradient):
        # (p, v_{t+1}, g_t) for a known rule (v_{t+1} absent for plain gradient descent; the
        # built-in's momentum_buffer read as is, its sign folded into the map), (x_t, p, g_t) for
        # the generic split. The terms are linear in the rows' Gram entries; only the entries
        # with a non-zero coefficient are computed (one dot product each), and one cached matrix
        # maps them to the per-pair sums (one matrix-vector product).
        pending = self._pending.pop(id(opt), None)
        if pending is None:
            pending = self._static.get(id(opt))
        if not self.active or pending is None:
            return
        kind = self._kind(opt)
        vkey = "momentum_buffer" if kind == "sgd" else "velocity"
        state = opt.state
        tracked, sharded, unit_set = self._tracked, self._sharded, self._unit_set
        rows_of: list[tuple[Tensor | None, ...]] = []
        used: list[int] = []
        keys: list[Any] = []
        rules: list[Any] = []
        unit_rows: dict[int, tuple[Tensor, list[list[float]], list[list[float]]]] = {}
        for g, group, idx, xs, c0 in pending:
            rule = self._rule(opt, g, group, c0) if xs is None else self._generic_rule(opt, group)
            for k, i in enumerate(idx):
                p = tracked[i]
                grad = p.grad
                if grad is None:
                    continue  # not updated by this step
                if xs is not None:
                    parts: tuple[Tensor | None, ...] = (xs[k], p, grad)
                    plain = False
                else:
                    st = state.get(p)
                    v = st.get(vkey) if st else None
                    if kind not in ("heavy", "nesterov", "sgd"):
                        v = None
                    parts, plain = (p, v, grad), v is None
                if sharded:
                    parts = tuple(None if t is None else _local(t) for t in parts)
                rows_of.append(parts)
                used.append(i)
                keys.append((rule[0], plain))
                rules.append(rule)
                if i in unit_set:
                    unit_rows[i] = self._unit_row(parts, rule, plain, kind == "sgd")
        if not used:
            return
        self.steps += 1
        key = (tuple(used), tuple(keys))
        cached = self._matrices.get(key)
        if cached is None:
            if len(self._matrices) > 64:  # a scheduler changes lr every step
                self._matrices.clear()
            cached = self._matrices[key] = self._step_matrix(used, rules, keys)
        matrix, entries, squares, buffer = cached
        dots = []
        dot = torch.dot
        views = self._views
        for i, parts, (needed, pairs) in zip(used, rows_of, entries, strict=True):
            acc = _acc(parts[0])  # type: ignore[arg-type]
            vecs: list[Tensor | None] = [None, None, None]
            for k in needed:
                t = parts[k]
                if k == 2 or (k == 0 and not isinstance(t, nn.Parameter)):
                    vecs[k] = _vec(t, acc)  # type: ignore[arg-type]
                    continue
                # parameters and velocities persist across steps: reuse their flat views while
                # they still view the same memory (a copy, e.g. a dtype conversion, never does)
                hit = views.get((i, k))
                if hit is None or hit[0] != t.data_ptr() or hit[1] != t.numel():  # type: ignore[union-attr]
                    vec = _vec(t, acc)  # type: ignore[arg-type]
                    n = vec.numel() // (2 if t.is_complex() else 1)  # type: ignore[union-attr]
                    views[(i, k)] = hit = (vec.data_ptr(), n, vec)
                vecs[k] = hit[2]
            for a, b in pairs:
                dots.append(dot(vecs[a], vecs[b]))  # type: ignore[arg-type]
        for k, positions in enumerate(squares):
            if positions:
                dots.extend(_sums_of_squares([rows_of[pos][k] for pos in positions]))  # type: ignore[misc]
        if dots:
            if self._multi_device:
                dots = [d.to(self.device) for d in dots]
            # stack, then cast into the float64 buffer: stack(out=) across dtypes is ~4x slower
            flat = buffer.copy_(torch.stack(dots))
            self._local_sums.view(-1).addmv_(matrix, flat)
        if unit_rows:
            self._accumulate_units(unit_rows)

    def _generic_rule(
        self, opt: torch.optim.Optimizer, group: dict[str, Any]
    ) -> tuple[Any, list[list[float]], list[list[float]], list[list[float]]]:
        """The generic split: rows ``r = (x_t, p, g_t)``, ``dx = p - x_t``."""
        eta, _, _, s, _ = self._hyper(opt, group)
        rows = _coefficients(eta, 0.0, 0.0, 0.0, s, 0.0)
        cmap = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 1.0, 0.0]]
        return ("generic", eta, s), rows, cmap, cmap

    def _unit_row(
        self, parts: tuple[Tensor | None, ...], rule: Any, plain: bool, negate: bool
    ) -> tuple[Tensor, list[list[float]], list[list[float]]]:
        """The stacked rows of one tensor for the per-unit Gram matrices."""
        _, rows, with_v, plain_map = rule
        first, second, grad = parts
        if negate and second is not None:
            second = torch.neg(second)  # the built-in's buffer is -v
        acc = _acc(first)  # type: ignore[arg-type]
        present = [
            t.detach().to(acc) if not t.is_complex() else t.detach()
            for t in (first, second, grad)
            if t is not None
        ]
        m = torch.stack(present)
        if m.is_complex():
            # real and imaginary parts as a trailing axis: a unit's entries stay together
            m = torch.view_as_real(m).to(acc)
        return m, (plain_map if plain else with_v), rows

    def _step_matrix(self, used: list[int], rules: list[Any], keys: list[Any]) -> tuple[Any, ...]:
        """The map from the needed Gram entries of every tensor's rows to the per-pair sums.

        For tensor ``t`` with rows ``r`` (Gram matrix ``G``), map ``C`` (rows to
        ``(x_t, v_t, g_t, dx)``) and term coefficients ``R`` (terms from the entries
        :data:`_GRAM_ENTRIES` of ``C G C^T``), the terms are ``R Q vec(G)`` with
        ``Q[e] = C[a_e] (x) C[b_e]``; symmetric entries are folded onto the upper triangle and the
        columns that are zero are dropped (their products are not computed).

        Returns ``(matrix, entries, squares, buffer)``. The matrix's columns are first the entries
        computed as dot products (off the diagonal; on the CPU all of them), tensor by tensor:
        ``entries[t] = (rows needed, [(a, b), ...])``. Then the diagonal entries, row by row:
        ``squares[a]`` lists the positions in ``used`` whose ``G[a, a]`` is needed, one
        multi-tensor sum of squares for all of them. ``buffer`` receives the values (float64).
        """
        n_pairs, n_terms = len(self.pairs), len(LEDGER_TERMS)
        # On an accelerator the squares of all tensors take one multi-tensor reduction per row;
        # on the CPU that reduction loops over the tensors and costs more than a dot product each
        split = self.device.type != "cpu" if self._split_squares is None else self._split_squares
        off, entries = [], []
        diag: list[list[Tensor]] = [[], [], []]
        squares: list[list[int]] = [[], [], []]
        for pos, (i, (rule_key, rows, with_v, plain_map), (_, plain)) in enumerate(
            zip(used, rules, keys, strict=True)
        ):
            c = torch.tensor(plain_map if plain else with_v, dtype=torch.float64)
            if rule_key[0] == "sgd":
                c[:, 1] = -c[:, 1]  # the rows hold momentum_buffer = -v
            q = torch.stack([torch.outer(c[a], c[b]).reshape(-1) for a, b in _GRAM_AB])
            full = torch.tensor(rows, dtype=torch.float64) @ q  # (terms, 9)
            scale = self._sign[:, i].cpu()[:, None] * self._weights[i]  # (pairs, 1)
            pairs = []
            for a, b in _UPPER:
                if plain and 1 in (a, b):
                    continue  # no velocity: its coefficients are zero
                col = full[:, 3 * a + b] + (full[:, 3 * b + a] if a != b else 0.0)
                if not bool((col != 0).any()):
                    continue
                column = (scale * col[None]).reshape(-1)  # (pairs * terms,)
                if a == b and split:
                    diag[a].append(column)
                    squares[a].append(pos)
                else:
                    off.append(column)
                    pairs.append((a, b))
            entries.append((frozenset(k for ab in pairs for k in ab), pairs))
        columns = off + diag[0] + diag[1] + diag[2]
        if columns:
            matrix = torch.stack(columns, 1)
        else:
            matrix = torch.zeros(n_pairs * n_terms, 0, dtype=torch.float64)
        buffer = torch.zeros(matrix.shape[1], dtype=torch.float64, device=self.device)
        return self._to_device(matrix), entries, squares, buffer

    def _to_device(self, t: Tensor) -> Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _accumulate_units(
        self, unit_rows: dict[int, tuple[Tensor, list[list[float]], list[list[float]]]]
    ) -> None:
        for u, (unit, parts) in enumerate(zip(self.units, self._unit_parts, strict=True)):
            n = unit.units
            for i, kind, sign in parts:
                if i not in unit_rows:
                    continue
                m, cmap, rows = unit_rows[i]
                first, count = self._unit_slices[(u, i)]
                r = m.shape[0]
                if kind == "entries":
                    per_unit = m.reshape(r, count, -1).transpose(0, 1)
                elif kind == "rows":
                    per_unit = m.reshape(r, count, -1).transpose(0, 1)
                else:
                    per_unit = m.reshape(r, m.shape[1], n, -1).permute(2, 0, 1, 3).reshape(n, r, -1)
                gram = (per_unit @ per_unit.transpose(1, 2)).to(torch.float64)
                if r == 2:
                    gram = torch.nn.functional.pad(gram, (0, 1, 0, 1))[:, [0, 2, 1]][
                        :, :, [0, 2, 1]
                    ]
                c = torch.tensor(cmap, dtype=torch.float64).to(gram.device)
                gram4 = c @ gram @ c.T
                q = gram4.reshape(count, 16)[:, list(_GRAM_ENTRIES)]
                coef = torch.tensor(rows, dtype=torch.float64).to(q.device)
                value = (sign * self._weights[i]) * (q @ coef.T)
                self._unit_sums[u][first : first + count] += value.to(self.device)

    def _unit_sums_now(self) -> list[Tensor]:
        """The per-unit sums over all ranks (one all_reduce when sharded: every rank calls it)."""
        sums = self._unit_sums
        if self._sharded and sums:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flat = torch.cat([t.reshape(-1) for t in sums])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                sums = list(flat.split([t.numel() for t in sums]))
                sums = [t.reshape(-1, len(LEDGER_TERMS)) for t in sums]
        return [off + t for off, t in zip(self._unit_offset, sums, strict=True)]

    # ------------------------------------------------------------------------------------------
    # reading, state
    # ------------------------------------------------------------------------------------------

    def _pair_values(self, corrected: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(D, Q or None, reduced sums)`` per pair; one all_reduce when sharded."""
        n = len(self._tracked)
        xx = torch.zeros(n, dtype=torch.float64, device=self.device)
        qk = torch.zeros(n, dtype=torch.float64, device=self.device)
        heavy = corrected
        with torch.no_grad():
            for i in range(n):
                x = self._iterate(i)
                if x.is_complex():
                    x = torch.view_as_real(x)
                acc = _acc(x)
                xf = x.reshape(-1).to(acc)
                xx[i] = (xf @ xf).to(torch.float64) * self._weights[i]
                owner = self._owner.get(i)
                if not heavy:
                    continue
                if owner is None:
                    continue
                opt, group = owner
                kind = self._kind(opt)
                if kind == "generic" or group.get("nesterov", False) or kind == "nesterov":
                    heavy = False
                    continue
                mu = float(group.get("momentum", 0.0))
                v = self._velocity(opt, self._tracked[i])
                if v is None or mu == 0.0:
                    continue
                vt = _local(v)
                vf = (torch.view_as_real(vt) if vt.is_complex() else vt).reshape(-1).to(acc)
                eta = _float(group["lr"])
                qk[i] = (xf @ vf).to(torch.float64) * self._weights[i] * (2 * eta * mu / (1 - mu))
            local = torch.cat([self._local_sums.reshape(-1), self._sign @ xx, self._sign @ qk])
            if self._sharded:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(local, op=dist.ReduceOp.SUM)
        k = self._local_sums.numel()
        p = len(self.pairs)
        sums = self._offset + local[:k].reshape(self._local_sums.shape)
        d = local[k : k + p]
        q = d + local[k + p :] if heavy else None
        return d, q, sums

    def start(self) -> None:
        """Record :math:`D(0)` (and per-unit :math:`D_i(0)`) at the current iterate and zero the
        sums: a new series. Every rank calls it when sharded."""
        self._local_sums.zero_()
        self._offset.zero_()
        for sums in self._unit_sums:
            sums.zero_()
        for sums in self._unit_offset:
            sums.zero_()
        self.steps = 0
        self.D0 = self._pair_values(False)[0].clone()
        self.unit_D0 = self._unit_d() if self.units else None

    def _unit_d(self) -> list[Tensor]:
        out = []
        for unit, parts in zip(self.units, self._unit_parts, strict=True):
            total = None
            for i, kind, sign in parts:
                value = sign * _unit_sq(self._iterate(i, local=False), kind, unit.units)
                total = value if total is None else total + value
            out.append(total.to(self.device))
        return out

    def read(self) -> dict[str, Any]:
        r"""The ledger now (at step t, before it is taken).

        Returns:
            ``{"pairs": [...], "D": D(t), "D0": D(0), "sums": (pairs, 5) cumulative terms in
            the order of :data:`LEDGER_TERMS`, "closure": (D(t) - D(0)) - sums.sum(1), "Q":
            Q_t or None}`` as float64 tensors; ``Q_t = D_t + 2\eta\mu/(1-\mu) K_t`` is given
            for heavy-ball optimisers only. Every rank calls it when sharded.
        """
        if self.D0 is None:
            self.start()
        d, q, sums = self._pair_values(True)
        return {
            "pairs": list(self.pairs),
            "D": d,
            "D0": self.D0,
            "sums": sums,
            "closure": (d - self.D0) - sums.sum(1),
            "Q": q,
        }

    def read_units(self) -> dict[str, dict[str, Tensor]]:
        """Per hidden layer: ``{"D": D_i(t), "D0": D_i(0), "sums": (units, 5), "closure":
        (D_i(t) - D_i(0)) - sums.sum(1)}`` (float64); empty without ``units``."""
        if not self.units:
            return {}
        if self.unit_D0 is None:
            self.start()
        out = {}
        for unit, d, d0, sums in zip(
            self.units, self._unit_d(), self.unit_D0, self._unit_sums_now(), strict=True
        ):
            out[unit.name] = {"D": d, "D0": d0, "sums": sums, "closure": (d - d0) - sums.sum(1)}
        return out

    def state_dict(self) -> dict[str, Any]:
        """``D(0)``, the cumulative sums (summed over ranks: every rank calls it when
        sharded), the per-unit values and the look-ahead coefficients of the built-in SGD."""
        _, _, sums = self._pair_values(False)
        return {
            "pairs": list(self.pairs),
            "D0": None if self.D0 is None else self.D0.tolist(),
            "sums": sums.tolist(),
            "units": [u.name for u in self.units],
            "unit_D0": None if self.unit_D0 is None else [t.tolist() for t in self.unit_D0],
            "unit_sums": [t.tolist() for t in self._unit_sums_now()],
            "sgd_lookahead": [[self._plan_index(key), value] for key, value in self._sgd_c.items()],
        }

    def _plan_index(self, key: tuple[int, int]) -> list[int]:
        opt_id, g = key
        return [next(k for k, o in enumerate(self.optimizers) if id(o) == opt_id), g]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a series: restore ``D(0)`` and the sums (see :meth:`state_dict`).

        Raises:
            ValueError: the state was saved for other pairs or units.
        """
        if list(state["pairs"]) != self.pairs or list(state["units"]) != [
            u.name for u in self.units
        ]:
            raise ValueError(
                f"ledger state for pairs {state['pairs']} / units {state['units']} does not match"
                f" pairs {self.pairs} / units {[u.name for u in self.units]}"
            )
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float64).to(self.device)  # noqa: E731
        self.D0 = None if state["D0"] is None else as_tensor(state["D0"])
        self._offset = as_tensor(state["sums"]).reshape(self._local_sums.shape)
        self._local_sums.zero_()
        self.unit_D0 = (
            None if state["unit_D0"] is None else [as_tensor(v) for v in state["unit_D0"]]
        )
        saved = [as_tensor(v).reshape(-1, len(LEDGER_TERMS)) for v in state["unit_sums"]]
        if self._sharded:  # the saved totals are added once, after the sum over ranks
            self._unit_offset = saved
            self._unit_sums = [torch.zeros_like(t) for t in saved]
        else:  # continue the same sums in the same order
            self._unit_offset = [torch.zeros_like(t) for t in saved]
            self._unit_sums = saved
        self._sgd_c = {
            (id(self.optimizers[o]), g): float(value) for (o, g), value in state["sgd_lookahead"]
        }
