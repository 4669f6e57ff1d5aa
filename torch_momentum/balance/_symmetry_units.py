"""Which slices of a module's parameters are the units of its output and of its input.

Private helper of the symmetry candidates (:mod:`torch_momentum.balance._symmetry_candidates`):
a Linear's or a convolution's output units are its rows with their bias, its input units its
columns; a norm layer's output units are its gain and bias; weight norm moves a unit's scale into
its gain. The names here are shared by the candidate modules, not user API.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from torch_momentum.balance._symmetry_proposal import PartSpec

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PER_CHANNEL_NORM = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
LAYER_NORM = (nn.LayerNorm, nn.RMSNorm)


class Units(NamedTuple):
    """``n`` units, and the parameter slices that hold them (``PartSpec``: one unit per index
    along ``dim``)."""

    n: int
    parts: tuple[PartSpec, ...]


def norm_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every normalisation module and the name of its epsilon attribute.

    The torch norm layers (BatchNorm, SyncBatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm)
    and any module whose class name ends in ``Norm`` with a float attribute ``eps`` or
    ``variance_epsilon`` (the convention of ``transformers``' RMSNorm classes).

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_units import norm_modules
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        >>> [(type(m).__name__, attr) for m, attr in norm_modules(model)]
        [('LayerNorm', 'eps')]
    """
    known = (*PER_CHANNEL_NORM, *LAYER_NORM, nn.GroupNorm)
    found = []
    for module in model.modules():
        if not (isinstance(module, known) or type(module).__name__.endswith("Norm")):
            continue
        for attr in ("eps", "variance_epsilon"):
            value = getattr(module, attr, "missing")
            if value is None or isinstance(value, float):
                found.append((module, attr))
                break
    return found


def own_param(module: nn.Module, attr: str) -> nn.Parameter | None:
    """``module``'s own parameter ``attr`` (not a submodule's), or None."""
    return dict(module.named_parameters(recurse=False)).get(attr)


class Names:
    """Canonical (first-registered) names of the trainable parameters, by module attribute."""

    def __init__(self, model: nn.Module) -> None:
        self.by_id = {id(p): n for n, p in model.named_parameters() if p.requires_grad}

    def of(self, module: nn.Module, attr: str) -> str | None:
        value = own_param(module, attr)
        return None if value is None else self.by_id.get(id(value))


def param_parts(
    names: Names, module: nn.Module, spec: list[tuple[str, int | None]], n: int
) -> Units:
    parts = []
    for attr, dim in spec:
        name = names.of(module, attr)
        if name is not None:
            parts.append(PartSpec(name, dim, 0, 0 if dim is None else n))
    return Units(n, tuple(parts))


def is_conv1d_gpt(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D``: a Linear whose weight is stored ``(in, out)``."""
    weight = own_param(module, "weight")
    return (
        type(module).__name__ == "Conv1D"
        and weight is not None
        and tuple(weight.shape) == (getattr(module, "nx", -1), getattr(module, "nf", -1))
    )


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of ``module``'s own ``weight`` (``()`` without one)."""
    weight = own_param(module, "weight")
    return () if weight is None else tuple(weight.shape)


def affine_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer with a per-feature gain."""
    weight = own_param(module, "weight")
    is_norm = isinstance(module, (*PER_CHANNEL_NORM, *LAYER_NORM, nn.GroupNorm))
    return (is_norm or type(module).__name__.endswith("Norm")) and (
        weight is not None and weight.dim() == 1
    )


class WeightNorm(NamedTuple):
    """A weight written ``g * v / |v|`` by weight norm: the names of ``g`` and ``v`` (None:
    frozen) and the dimension ``dim`` whose slices are normalised one by one (None: the whole
    tensor)."""

    g: str | None
    v: str | None
    dim: int | None
    shape: tuple[int, ...]  # of the weight (and of v)


def weight_norm(names: Names, module: nn.Module) -> WeightNorm | None:
    """``module.weight``'s weight norm: ``torch.nn.utils.parametrizations.weight_norm``
    (``original0``, ``original1``) or the older ``torch.nn.utils.weight_norm`` (``weight_g``,
    ``weight_v``, a forward pre-hook); None if it has none."""
    chains = getattr(module, "parametrizations", None)
    if chains is not None and "weight" in chains:
        chain = chains["weight"]
        norm = next((p for p in chain if type(p).__name__ == "_WeightNorm"), None)
        owner, attrs = chain, ("original0", "original1")
    else:
        hooks = getattr(module, "_forward_pre_hooks", {}).values()
        norm = next((h for h in hooks if type(h).__name__ == "WeightNorm"), None)
        if norm is None or getattr(norm, "name", None) != "weight":
            return None
        owner, attrs = module, ("weight_g", "weight_v")
    g, v = names.of(owner, attrs[0]), names.of(owner, attrs[1])
    if norm is None:
        return None
    dim = getattr(norm, "dim", -1)
    shape = tuple(getattr(owner, attrs[1]).shape)
    return WeightNorm(g, v, None if dim in (None, -1) else dim % len(shape), shape)


def weight_parts(names: Names, module: nn.Module, dim: int, n: int, bias: bool) -> Units:
    """The units of ``module.weight`` along ``dim`` (and of its bias with ``bias``). Under
    weight norm a slice along the normalised dimension scales with its gain ``g`` alone (its
    direction ``v`` is scale-free); along another dimension no move of ``g`` and ``v``
    scales it: no units."""
    norm = weight_norm(names, module)
    if norm is None:
        spec: list[tuple[str, int | None]] = [("weight", dim)]
        return param_parts(names, module, [*spec, ("bias", 0)] if bias else spec, n)
    if norm.dim != dim or norm.g is None:  # a frozen gain: the slice cannot scale
        return Units(n, ())
    parts = [PartSpec(norm.g, dim, 0, n)]
    b = names.of(module, "bias") if bias else None
    return Units(n, tuple(parts + ([PartSpec(b, 0, 0, n)] if b is not None else [])))


def output_units(names: Names, module: nn.Module) -> Units | None:
    """The units of a module's output: rows and bias of a Linear/Conv, gain and bias of a norm."""
    if isinstance(module, nn.Linear):
        return weight_parts(names, module, 0, module.out_features, bias=True)
    if isinstance(module, CONV):
        return weight_parts(names, module, 0, module.out_channels, bias=True)
    if is_conv1d_gpt(module):
        return param_parts(names, module, [("weight", 1), ("bias", 0)], weight_shape(module)[1])
    if isinstance(module, nn.Embedding):
        return param_parts(names, module, [("weight", 1)], module.embedding_dim)
    if isinstance(module, nn.MultiheadAttention):
        out = module.out_proj
        return param_parts(names, out, [("weight", 0), ("bias", 0)], out.out_features)
    if affine_norm(module):
        n = weight_shape(module)[0]
        return param_parts(names, module, [("weight", 0), ("bias", 0)], n)
    return None


def input_units(names: Names, module: nn.Module) -> Units | None:
    """The units of a module's input: the columns its weights apply to them."""
    if isinstance(module, nn.Linear):
        return weight_parts(names, module, 1, module.in_features, bias=False)
    if isinstance(module, CONV) and module.groups == 1:
        return weight_parts(names, module, 1, module.in_channels, bias=False)
    if isinstance(module, CONV) and module.groups == module.in_channels:
        # depthwise: input channel c feeds only the rows c*m .. c*m + m - 1 (m = out / in)
        rows = weight_parts(names, module, 0, module.out_channels, bias=False)
        m = module.out_channels // module.in_channels
        return Units(module.in_channels, tuple(p._replace(block=m) for p in rows.parts))
    if is_conv1d_gpt(module):
        return param_parts(names, module, [("weight", 0)], weight_shape(module)[0])
    if isinstance(module, nn.RNNBase):
        spec: list[tuple[str, int | None]] = [("weight_ih_l0", 1), ("weight_ih_l0_reverse", 1)]
        return param_parts(names, module, spec, module.input_size)
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return param_parts(names, module, [("in_proj_weight", 1)], module.embed_dim)
    return gain_units(names, module)


def gain_units(names: Names, module: nn.Module) -> Units | None:
    """A module of no known type whose only parameter is a vector and which has no submodules
    (timm's ``LayerScale``: ``x * gamma``): a gain per feature, its entries the units of its
    input."""
    if known_owner(module) or isinstance(module, nn.PReLU):  # PReLU's weight is a slope
        return None
    if next(module.children(), None) is not None:
        return None
    own = list(module.named_parameters(recurse=False))
    if len(own) != 1 or own[0][1].dim() != 1:
        return None
    return param_parts(names, module, [(own[0][0], 0)], own[0][1].shape[0])


def known_owner(module: nn.Module) -> bool:
    """Whether the candidates of the layer types above cover ``module``'s own parameters."""
    known = (nn.Linear, *CONV, nn.Embedding, nn.RNNBase, nn.MultiheadAttention, nn.GroupNorm)
    return isinstance(module, known) or is_conv1d_gpt(module) or affine_norm(module)
