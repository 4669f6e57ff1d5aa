"""The default groups of a real network's parameters, and readable names for them.

A network people train has dozens to hundreds of parameter tensors. The balance law speaks about
weight matrices (Linear and convolution layers, attention projections), so by default each weight
matrix is a group of its own and everything else (biases, normalisation gains, embeddings,
positional embeddings, class tokens) is one ``other`` group. Names lose the prefixes of wrappers
(``model.``, ``module.``, ``_orig_mod.``) and get zero-padded indices, so that logger columns are
short and sort in model order (``blocks.02`` before ``blocks.10``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import Tensor, nn

__all__ = ["OTHER_GROUP", "WRAPPER_PREFIXES", "clean_names", "uncompiled", "weight_groups"]

#: Leading name components added by wrappers (LightningModule attributes, DDP, torch.compile).
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")
#: The group of every trainable parameter that is not a weight matrix.
OTHER_GROUP = "other"

_MATRIX_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.MultiheadAttention)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
#: an index: digits between the ends of a name, ".", "/" and spaces
_COMPILED = re.compile(r"\._orig_mod(?=[./ ]|$)")
_INDEX = re.compile(r"(?<![^./ ])\d+(?![^./ ])")


def uncompiled(name: str) -> str:
    """``name`` without the ``._orig_mod`` of a ``torch.compile``'d submodule (which holds the
    original module under that attribute: not part of the name a reader knows).

    Example:
        >>> from torch_momentum.balance.groups import uncompiled
        >>> uncompiled("blocks.0._orig_mod.attn q/k")
        'blocks.0.attn q/k'
    """
    return _COMPILED.sub("", name)


def _strip(name: str) -> str:
    name = uncompiled(name)
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _sole_child_prefix(module: nn.Module) -> str:
    """``"net."`` where ``module`` only wraps one child that holds all its parameters (a
    LightningModule's ``self.net``), repeated down the chain of such wrappers; ``""`` else."""
    prefix = ""
    while not any(True for _ in module.parameters(recurse=False)):
        holders = [(n, m) for n, m in module.named_children() if any(True for _ in m.parameters())]
        if len(holders) != 1 or isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            break
        name, module = holders[0]
        prefix += f"{name}."
    return prefix


def _index_width(names: Iterable[str]) -> int:
    return max((len(m) for name in names for m in _INDEX.findall(name)), default=1)


def clean_names(names: Iterable[str], *, module: nn.Module | None = None) -> dict[str, str]:
    """``{name: readable name}``: wrapper prefixes stripped (:data:`WRAPPER_PREFIXES` and, given
    ``module``, the name of a child it merely wraps: a LightningModule's ``self.net``), and the
    indices zero-padded to one width: the number of digits of the largest index among the
    names and, given ``module``, among its module and parameter names (so that the labels of a
    model's groups and of its symmetries pad alike). An index is a run of digits between the
    start or end of the name, ``.``, ``/`` and spaces (``blocks.2.attn``, ``0/2``,
    ``10 (columns + bias)``; not ``layer1`` or ``(12 layers)``).

    The one source of the readable names of the groups and symmetries of
    :class:`~torch_momentum.balance.summary.BalanceSummary`, :func:`weight_groups` and
    :class:`~torch_momentum.balance.watch.NetworkWatch`.

    Example:

        >>> from torch import nn
        >>> from torch_momentum.balance.groups import clean_names
        >>> names = ["model.blocks.2.attn", "model.blocks.10.attn", "_orig_mod.head"]
        >>> list(clean_names(names).values())
        ['blocks.02.attn', 'blocks.10.attn', 'head']
        >>> net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
        >>> list(clean_names(["0/2", "10 (columns + bias)"], module=net).values())
        ['00/02', '10 (columns + bias)']
    """
    wrapper = "" if module is None else _sole_child_prefix(module)

    def strip(name: str) -> str:
        # "net.0.weight", and "net 0/2" (a symmetry named by the wrapper, its parent module)
        for head in (wrapper, wrapper[:-1] + " ") if wrapper else ():
            if name.startswith(head):
                return _strip(name[len(head) :])
        return _strip(name)

    stripped = {name: strip(name) for name in names}
    width = _index_width(stripped.values())
    if module is not None:
        named = [n for n, _ in module.named_modules()]
        named += [n for n, _ in module.named_parameters(remove_duplicate=False)]
        width = max(width, _index_width(strip(n) for n in named))
    return {name: _INDEX.sub(lambda m: m[0].zfill(width), s) for name, s in stripped.items()}


def _is_matrix_module(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight; matched by name so that
    # this module does not import transformers
    return isinstance(module, (*_MATRIX_MODULES, nn.modules.conv._ConvNd)) or (
        type(module).__name__ == "Conv1D"
    )


def weight_groups(module: nn.Module) -> dict[str, list[tuple[str, Tensor]]]:
    """``{group: [(parameter name, parameter), ...]}``: one group per weight matrix (the
    ``weight``, or ``in_proj_weight``/``q_proj_weight``/... of attention, of Linear, convolution
    and GPT-2 ``Conv1D`` modules; dimension >= 2), in registration order, and one group
    :data:`OTHER_GROUP` with every other trainable parameter (biases, normalisation layers,
    embeddings, and a matrix tied to an embedding). Group names are the modules' names, cleaned
    (:func:`clean_names`; a parameter of a matrix module other than ``weight`` adds its own name).

    Example:

        >>> from torch import nn
        >>> from torch_momentum.balance.groups import weight_groups
        >>> net = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
        >>> {k: [n for n, _ in v] for k, v in weight_groups(net).items()}
        {'1': ['1.weight'], 'other': ['0.weight', '1.bias', '2.weight', '2.bias']}
    """
    embedded = {
        id(p) for m in module.modules() if isinstance(m, _EMBEDDINGS) for p in m.parameters()
    }
    matrices: dict[str, list[tuple[str, Tensor]]] = {}
    taken: set[int] = set()
    for mod_name, mod in module.named_modules():
        if not _is_matrix_module(mod):
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if p.dim() < 2 or not p.requires_grad or id(p) in embedded or id(p) in taken:
                continue
            taken.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            key = mod_name if p_name == "weight" else full
            matrices.setdefault(key or p_name, []).append((full, p))
    others: list[tuple[str, Tensor]] = [
        (name, p) for name, p in module.named_parameters() if p.requires_grad and id(p) not in taken
    ]
    clean = clean_names(matrices, module=module)
    groups = {clean[k]: v for k, v in matrices.items()}
    if others:
        groups[OTHER_GROUP] = others
    return groups
