r"""Hidden units: pairing each unit's incoming and outgoing weights, and per-unit balance.

For a hidden unit :math:`i` between two layers of a network that is positively homogeneous in
that unit (ReLU, leaky ReLU, identity; pooling and flattening in between), scaling its incoming
weights (row :math:`i` and bias :math:`i`) by :math:`\alpha > 0` and its outgoing weights (column
:math:`i`) by :math:`1/\alpha` leaves the function unchanged. Hence for any loss
:math:`R_i = \langle in_i, g_{in_i}\rangle - \langle out_i, g_{out_i}\rangle = 0` and gradient
flow conserves :math:`D_i = \|in_i\|^2 - \|out_i\|^2` (Du, Hu & Lee 2018, per unit).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from torch import Tensor, nn

from torch_momentum.balance._parts import SymmetryPart, part_values, signed_sum
from torch_momentum.balance._symmetry_trace import PASS_THROUGH
from torch_momentum.balance.layers import check_layers_spec

__all__ = ["UnitLayer", "pair_units", "unit_balance", "unit_symmetry"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Modules that may sit between two paired layers: positively homogeneous and channel-wise (the
#: same modules the symmetry discovery looks through).
_PASS_THROUGH = PASS_THROUGH
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


class _Opaque(nn.Module):
    """Marks, in the chain, a module that combines its submodules in its own forward."""

    def __init__(self, module: nn.Module, reason: str) -> None:
        super().__init__()
        self.inner = [module]  # not a submodule: no parameters of its own
        self.reason = reason


def _chain(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules in registration order, descending the root and plain containers; a module
    with its own forward (a residual block, an attention block, a compiled module) or a
    container owning parameters is one opaque entry: pairing through it is an error, pairing
    elsewhere is not."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, mod: nn.Module, is_root: bool) -> None:
        children = list(mod.named_children())
        if not children:
            out.append((prefix, mod))
            return
        if not is_root and not isinstance(mod, _CONTAINERS):
            if isinstance(mod, _WEIGHTED + _PASS_THROUGH):
                out.append((prefix, mod))
            else:
                out.append((prefix, _Opaque(mod, "it combines submodules in its own forward")))
            return
        if any(True for _ in mod.parameters(recurse=False)) and not is_root:
            out.append((prefix, _Opaque(mod, "a container that owns parameters")))
            return
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
    names = _select(chain, position, check_layers_spec(layers))
    units = []
    for a, b in itertools.pairwise(names):
        ia, ib = position[a], position[b]
        if ib <= ia:
            raise ValueError(
                f"per-unit balance: layer {b!r} comes before {a!r} in the model; list layers in"
                " forward order"
            )
        ma, mb = chain[ia][1], chain[ib][1]
        rank = 2 if isinstance(ma, nn.Linear) else cast(nn.modules.conv._ConvNd, ma).weight.dim()
        flattened = _check_between(chain[ia + 1 : ib], a, b, rank)
        n = _check_shapes(ma, mb, a, b, flattened)
        bias = f"{a}.bias" if getattr(ma, "bias", None) is not None else None
        units.append(UnitLayer(a, b, f"{a}.weight", bias, f"{b}.weight", n))
    return units


def _select(
    chain: list[tuple[str, nn.Module]],
    position: dict[str, int],
    spec: list[str] | dict[str, list[str]] | None,
) -> list[str]:
    """The names of the layers to pair, each checked to be a Linear/Conv leaf of the chain."""
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
        if isinstance(mod, _Opaque):
            mod = mod.inner[0]
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
    return names


def _check_between(between: list[tuple[str, nn.Module]], a: str, b: str, rank: int) -> bool:
    """Check the modules between layers ``a`` and ``b`` (``a``'s output has ``rank``
    dimensions); return whether one is a Flatten."""
    flattened = False
    for name, mod in between:
        if isinstance(mod, _Opaque):
            raise ValueError(
                f"per-unit balance cannot pair units through the module {name!r}"
                f" ({type(mod.inner[0]).__name__}): {mod.reason} (a residual add?), so its units"
                " cannot be paired; pass `layers=[...]` naming a chain of Linear/Conv layers"
                " without it, or `neurons=False`"
            )
        if not isinstance(mod, _PASS_THROUGH) or any(True for _ in mod.parameters()):
            raise ValueError(
                f"per-unit balance cannot pair the units of {a!r} with {b!r}: the module"
                f" {name!r} ({type(mod).__name__}) sits between them and is not a"
                " positively homogeneous channel-wise map (BatchNorm, a residual add or an"
                " unknown module); pass `layers=[...]` naming a pairable part, or"
                " `neurons=False`"
            )
        if isinstance(mod, nn.Flatten):
            start = mod.start_dim + rank if mod.start_dim < 0 else mod.start_dim
            end = mod.end_dim + rank if mod.end_dim < 0 else mod.end_dim
            if start != 1 or end != rank - 1:
                raise ValueError(
                    f"per-unit balance: Flatten {name!r} (start_dim={mod.start_dim},"
                    f" end_dim={mod.end_dim}) on the {rank}-d output of {a!r} must flatten every"
                    " dimension after the channels (start_dim=1, end_dim=-1): otherwise a"
                    " channel's positions do not form one block of the next layer's columns"
                )
            flattened = True
    return flattened


def _check_shapes(ma: nn.Module, mb: nn.Module, a: str, b: str, flattened: bool) -> int:
    """The number of units of ``a``, checked to map channel by channel onto ``b``'s inputs."""
    n = cast(Tensor, ma.weight).shape[0]
    fan_in = cast(Tensor, mb.weight).shape[1]
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
    return int(n)


def unit_parts(unit: UnitLayer, fan_in: int) -> list[SymmetryPart]:
    """The unit's charge :math:`D_i` as parts: the rows and bias entries of ``unit.weight`` and
    ``unit.bias`` (+), the columns of ``unit.next_weight`` (-), whose ``fan_in`` inputs come in
    blocks of ``fan_in / units`` per unit (after a ``Flatten``: a channel's positions).

    Example:

        >>> from torch import nn
        >>> from torch_momentum.balance import pair_units
        >>> from torch_momentum.balance.units import unit_parts
        >>> unit = pair_units(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))[0]
        >>> [(p.param, p.dim, p.sign) for p in unit_parts(unit, 4)]
        [('0.weight', 0, 1.0), ('0.bias', 0, 1.0), ('2.weight', 1, -1.0)]
    """
    n = unit.units
    parts = [SymmetryPart(unit.weight, 0, 0, n, 1, 1.0, 0)]
    if unit.bias is not None:
        parts.append(SymmetryPart(unit.bias, 0, 0, n, 1, 1.0, 0))
    parts.append(SymmetryPart(unit.next_weight, 1, 0, fan_in, fan_in // n, -1.0, 0))
    return parts


def _per_unit(
    module: nn.Module,
    units: Sequence[UnitLayer],
    value: Callable[[str, Tensor, SymmetryPart], Tensor | None],
) -> dict[str, Tensor]:
    """``{hidden layer: sum over the unit's parts of sign * value(name, parameter, part)}``
    (``None`` values count 0)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    return {
        unit.name: signed_sum(
            unit_parts(unit, params[unit.next_weight].shape[1]),
            unit.units,
            lambda part: value(part.param, params[part.param], part),
        )
        for unit in units
    }


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

    def value(name: str, p: Tensor, part: SymmetryPart) -> Tensor:
        return part_values(tensors(name, p) if tensors is not None else p, part, False)

    return _per_unit(module, units, value)


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

    def value(name: str, p: Tensor, part: SymmetryPart) -> Tensor | None:
        return None if p.grad is None else part_values(p, part, False, p.grad)

    return _per_unit(module, units, value)
