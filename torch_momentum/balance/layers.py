"""Which parameters form a layer, and which layers are adjacent.

A *layer* is a named list of parameters: by default every submodule that directly owns trainable
parameters, in registration order (for ``nn.Sequential`` stacks that is forward order); or the
modules, or the exact parameters, that the user names. Adjacent layers (consecutive in that order)
are the pairs whose squared-norm differences the balance law is about.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

__all__ = [
    "ROOT_LAYER_NAME",
    "LayerParams",
    "adjacent_pairs",
    "check_layers_spec",
    "discover_layers",
]

#: Name used for parameters owned directly by the root module (whose module name is ``""``).
ROOT_LAYER_NAME = "root"

LayerParams = dict[str, list[tuple[str, Tensor]]]


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
    check_disjoint(found)
    return found


def check_disjoint(found: LayerParams) -> None:
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
        entries: list[tuple[str, Tensor]] = []
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
