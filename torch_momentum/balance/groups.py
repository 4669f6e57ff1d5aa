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
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

__all__ = ["OTHER_GROUP", "WRAPPER_PREFIXES", "clean_names", "weight_groups"]

#: Leading name components added by wrappers (LightningModule attributes, DDP, torch.compile).
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")
#: The group of every trainable parameter that is not a weight matrix.
OTHER_GROUP = "other"

_MATRIX_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.MultiheadAttention)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_NUMBER = re.compile(r"^\d+$")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def clean_names(names: Iterable[str]) -> dict[str, str]:
    """``{name: readable name}``: wrapper prefixes (:data:`WRAPPER_PREFIXES`) stripped, and the
    numeric components zero-padded to the width of the largest number among all the names.

    Example:

        >>> from torch_momentum.balance.groups import clean_names
        >>> names = ["model.blocks.2.attn", "model.blocks.10.attn", "_orig_mod.head"]
        >>> list(clean_names(names).values())
        ['blocks.02.attn', 'blocks.10.attn', 'head']
    """
    names = list(names)
    stripped = {name: _strip(name) for name in names}
    width = max(
        (len(c) for s in stripped.values() for c in s.split(".") if _NUMBER.match(c)), default=1
    )
    return {
        name: ".".join(c.zfill(width) if _NUMBER.match(c) else c for c in s.split("."))
        for name, s in stripped.items()
    }


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
    clean = clean_names(matrices)
    groups = {clean[k]: v for k, v in matrices.items()}
    if others:
        groups[OTHER_GROUP] = others
    return groups


def readable(names: Sequence[str]) -> list[str]:
    """:func:`clean_names` as a list in the order given."""
    clean = clean_names(names)
    return [clean[n] for n in names]
