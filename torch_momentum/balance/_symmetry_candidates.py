"""Candidate symmetries of a model, from its module structure and one recorded forward pass.

Private helper of :mod:`torch_momentum.balance.symmetry`: everything proposed here is only a
*candidate*; :func:`~torch_momentum.balance.symmetry.find_symmetries` keeps a candidate only if
the gradients verify it.
Candidates are therefore generated liberally (every pair of equal unit count inside one parent
module, every Linear as a classifier...): a wrong candidate costs a few inner products.

Sources of candidates:

* one forward pass with hooks on every leaf module records which module's output each module
  consumes (tensor identity), looking through modules that commute with a positive per-channel
  scale (ReLU, LeakyReLU, PReLU, Identity, Dropout, pooling, Flatten);
* a norm layer (BatchNorm/InstanceNorm per channel, GroupNorm per group, LayerNorm/RMSNorm the
  whole layer, any other norm over some set of its outputs the whole layer too: ConvNeXt's
  LayerNorm over a convolution's channels) after a producer (Linear, Conv, Conv1D, Embedding):
  a **scale** candidate of the producer;
* a producer (its output units: rows and bias of a Linear/Conv, columns and bias of a Conv1D, the
  gain and bias of a norm layer, the columns of an Embedding) against the input units of all the
  modules that consume it, and every producer/producer and producer/consumer pair of equal unit
  count among the leaf children of one parent module (query/key, value/output, packed thirds of
  ``c_attn`` or ``in_proj``), the same across the leaves of two sibling modules (BERT's
  ``attention.self.value`` and ``attention.output.dense``), and per head of an attention module
  that declares its head dimension (grouped-query attention, rotary pairs), and a raw vector
  parameter against the rows of a leaf child (ConvNeXt's LayerScale): **rescale** candidates;
* every Linear/Conv1D/Conv (its input columns and its bias), Embedding (its rows) and recurrent
  layer (``bias_ih`` against ``bias_hh``): **translation** candidates;
* every parameter, and every third of a packed q/k/v parameter: zero-gradient slices.
"""

from __future__ import annotations

from torch import nn

from torch_momentum.balance._symmetry_heads import Side, head_rescales
from torch_momentum.balance._symmetry_proposal import (
    PartsKey,
    PartSpec,
    Proposal,
    ZeroSlice,
    overlaps,
    parts_key,
)
from torch_momentum.balance._symmetry_trace import Call, DataFlow
from torch_momentum.balance._symmetry_units import (
    LAYER_NORM,
    PER_CHANNEL_NORM,
    Names,
    Units,
    input_units,
    is_conv1d_gpt,
    known_owner,
    norm_modules,
    output_units,
    own_param,
    param_parts,
    weight_norm,
)
from torch_momentum.balance.groups import uncompiled

_WRAPPERS = ("model.", "module.", "_orig_mod.")


def display_prefix(names: list[str]) -> str:
    """The wrapper prefix (``model.``, ``module.``, ``_orig_mod.``, repeated) shared by all names.

    Example:
        >>> from torch_momentum.balance._symmetry_candidates import display_prefix
        >>> display_prefix(["module.model.fc.weight", "module.model.fc.bias"])
        'module.model.'
        >>> display_prefix(["model.weight", "head.weight"])
        ''
    """
    prefix = ""
    while names:
        rest = [n[len(prefix) :] for n in names]
        step = next((w for w in _WRAPPERS if all(r.startswith(w) for r in rest)), None)
        if step is None:
            return prefix
        prefix += step
    return prefix


def _relative(names: list[str]) -> tuple[str, list[str]]:
    """The common parent module of ``names`` and the names relative to it."""
    split = [n.split(".") for n in names]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    return ".".join(split[0][:common]), [".".join(s[common:]) for s in split]


def _join(parent: str, rest: str) -> str:
    return f"{parent} {rest}" if parent else rest


def _signed(units: Units, sign: float, block: int = 1) -> tuple[PartSpec, ...]:
    """``units``' parts with ``sign``; a consumer's input units grouped ``block`` per unit."""
    return tuple(
        p._replace(sign=sign, block=p.block * block) if p.dim is not None else p._replace(sign=sign)
        for p in units.parts
    )


def _rescale(name: str, a: Units, b: Units, block: int = 1) -> Proposal | None:
    if not a.parts or not b.parts or a.n * block != b.n or a.n == 0:
        return None
    parts = _signed(a, 1.0) + _signed(b, -1.0, block)
    return None if overlaps(parts) else Proposal("rescale", name, parts, a.n)


def _thirds(units: Units) -> list[tuple[str, Units]]:
    """The q, k, v thirds of a packed output (each part narrowed to one third)."""
    if units.n % 3 or any(p.dim is None for p in units.parts):
        return []
    n = units.n // 3
    return [
        (label, Units(n, tuple(p._replace(start=k * n, length=n) for p in units.parts)))
        for k, label in enumerate("qkv")
    ]


class _Context:
    """The model's structure as the proposals need it."""

    def __init__(self, model: nn.Module, calls: list[Call], prefix: str) -> None:
        self.names = Names(model)
        self.modules = dict(model.named_modules())
        self.calls = calls
        self.flow = DataFlow(calls)
        self.links = self.flow.links
        self.prefix = prefix
        self.called = {c.name for c in calls}
        self.first_call: dict[str, Call] = {}
        for call in calls:
            self.first_call.setdefault(call.name, call)

    def short(self, name: str) -> str:
        """A module or parameter name without the wrapper prefix and compiled submodules'
        ``._orig_mod`` (a label: parameters keep their own names)."""
        return uncompiled(name[len(self.prefix) :] if name.startswith(self.prefix) else name)


def _last_dim_producer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, *LAYER_NORM)) or is_conv1d_gpt(module)


def _norm_scale(ctx: _Context, producer: str, norm: nn.Module, units: Units) -> list[Proposal]:
    """The scale candidates of ``producer``'s output units normalised by ``norm``."""
    module, name = ctx.modules[producer], ctx.short(producer)
    if isinstance(norm, PER_CHANNEL_NORM) and norm.num_features == units.n:
        return [Proposal("scale", f"{name} (per channel)", units.parts, units.n)]
    if isinstance(norm, nn.GroupNorm) and norm.num_channels == units.n:
        block = units.n // norm.num_groups
        parts = tuple(p._replace(block=block) for p in units.parts)
        return [Proposal("scale", f"{name} (per group)", parts, norm.num_groups)]
    if isinstance(norm, nn.GroupNorm):
        return []
    shape = getattr(norm, "normalized_shape", None)
    weight = own_param(norm, "weight")
    size = tuple(shape) if shape is not None else None if weight is None else tuple(weight.shape)
    every = tuple(PartSpec(p.param, None, 0, 0) for p in units.parts)
    whole = Proposal("scale", f"{name} (whole layer)", every, 1)
    if size == (units.n,) and _last_dim_producer(module):
        if isinstance(module, nn.Embedding):  # each token's vector is normalised on its own
            rows = PartSpec(units.parts[0].param, 0, 0, module.num_embeddings)
            return [Proposal("scale", f"{name} (per row)", (rows,), module.num_embeddings)]
        return [whole]
    # normalised over some other set of its outputs: each block of m consecutive outputs
    # (Qwen3's q_norm over each head of q_proj), or a convolution's channels (a LayerNorm after
    # a permute, ConvNeXt's channels-first LayerNorm); scaling the whole layer scales every
    # such set, a block at a time is finer
    m = size[0] if size is not None and len(size) == 1 else 0
    if not (_last_dim_producer(module) and 0 < m < units.n and units.n % m == 0):
        return [whole]
    if any(p.dim is None or p.block != 1 for p in units.parts):
        return [whole]
    parts = tuple(p._replace(block=m) for p in units.parts)
    fine = Proposal("scale", f"{name} (per {m} outputs)", parts, units.n // m)
    return [fine, whole._replace(unless=parts_key(parts))]


def _scales(ctx: _Context) -> list[Proposal]:
    """Producers followed by a norm layer, residual streams into one, weight-norm directions."""
    found = []
    for producer, consumer, block in ctx.links:
        units = output_units(ctx.names, ctx.modules[producer])
        norm = ctx.modules[consumer]
        if units is None or not units.parts or block > 1 or not norm_modules(norm):
            continue
        found += _norm_scale(ctx, producer, norm, units)
    return found + _stream_scales(ctx) + _weight_norms(ctx)


def _stream_scales(ctx: _Context) -> list[Proposal]:
    """All the layers summed into a LayerNorm/RMSNorm's input (a residual stream), as one unit.

    Scaling every writer of a pre-LN transformer's residual stream scales the stream, which
    only LayerNorms read: the loss does not change (the writers' own inputs come through
    LayerNorms too). Proposed for every such norm; only the complete set of writers verifies.
    """
    found = []
    for call in ctx.calls:
        norm = call.module
        if not call.inputs or isinstance(norm, (*PER_CHANNEL_NORM, nn.GroupNorm)):
            continue
        if not norm_modules(norm) or ctx.flow.produced_directly(call.inputs[0]):
            continue
        writers = ctx.flow.writers(call.inputs[0])
        if not writers or len(writers) < 2:
            continue
        parts: tuple[PartSpec, ...] = ()
        for writer in writers:
            units = output_units(ctx.names, ctx.modules[writer])
            if units is None or not _last_dim_producer(ctx.modules[writer]):
                break
            parts += tuple(PartSpec(p.param, None, 0, 0) for p in units.parts)
        else:
            label = f"stream into {ctx.short(call.name)} ({len(writers)} layers)"
            if parts and not overlaps(parts):
                found.append(Proposal("scale", label, parts, 1))
    return found


def _weight_norms(ctx: _Context) -> list[Proposal]:
    """The direction ``v`` of a weight norm (``g * v / |v|``, either API): scale-free per slice
    along the normalised dimension."""
    found = []
    for name, module in ctx.modules.items():
        norm = weight_norm(ctx.names, module)
        if norm is None or norm.v is None:
            continue
        size = 0 if norm.dim is None else norm.shape[norm.dim]
        part = PartSpec(norm.v, norm.dim, 0, size)
        label = f"{ctx.short(name)}.weight (weight-norm direction)"
        found.append(Proposal("scale", label, (part,), max(size, 1)))
    return found


def _flow_rescales(ctx: _Context) -> list[Proposal]:
    """Each producer against the input units of all the modules that consume its output.

    A link found through the autograd graph (block 0) gets the block the sizes imply.
    """
    consumers: dict[str, list[tuple[str, int]]] = {}
    for producer, consumer, block in ctx.links:
        consumers.setdefault(producer, []).append((consumer, block))
    found = []
    for producer, cs in consumers.items():
        a = output_units(ctx.names, ctx.modules[producer])
        if a is None or not a.parts:
            continue
        parts = _signed(a, 1.0)
        for consumer, block in cs:
            u = input_units(ctx.names, ctx.modules[consumer])
            if block == 0 and u is not None and u.n % a.n == 0:
                block = u.n // a.n
            if u is None or not u.parts or u.n != a.n * block:
                break
            parts += _signed(u, -1.0, block)
        else:
            parent, rel = _relative([ctx.short(producer)] + [ctx.short(c) for c, _ in cs])
            name = _join(parent, f"{rel[0]}/{'+'.join(rel[1:])}")
            if not overlaps(parts):
                found.append(Proposal("rescale", name, parts, a.n))
    return found


def _leaves_by_parent(ctx: _Context) -> dict[str, list[str]]:
    parents: dict[str, list[str]] = {}
    for name in ctx.modules:
        if name in ctx.called and name:
            parents.setdefault(name.rpartition(".")[0], []).append(name)
    return parents


#: a parent's unlinked producers (with packed thirds), unlinked consumers, and the thirds
_Sides = tuple[list[tuple[str, str, Units]], dict[str, Units], list[tuple[str, Units]]]


def _sibling_sides(ctx: _Context, leaves: list[str]) -> _Sides:
    """Unlinked producers (and their packed thirds), unlinked consumers, and the thirds."""
    produced = {p for p, _, _ in ctx.links}
    consumed = {c for _, c, _ in ctx.links}
    outs: list[tuple[str, str, Units]] = []
    ins: dict[str, Units] = {}
    packed_all: list[tuple[str, Units]] = []
    for leaf in leaves:
        label, module = leaf.rpartition(".")[2], ctx.modules[leaf]
        out, inp = output_units(ctx.names, module), input_units(ctx.names, module)
        if out is not None and out.parts and leaf not in produced:
            # a packed q/k/v projection maps E features to 3E
            packed = _thirds(out) if inp is not None and 3 * inp.n == out.n else []
            outs += [(leaf, label, out)] + [(leaf, third, units) for third, units in packed]
            packed_all += packed
        if inp is not None and inp.parts and leaf not in consumed:
            ins[leaf] = inp
    return outs, ins, packed_all


def _siblings(ctx: _Context) -> tuple[list[Proposal], list[ZeroSlice]]:
    """Pairs of equal size among the leaf children of one parent, and packed thirds.

    Only modules whose output (input) no recorded module consumes (produces) take part: their
    data goes through functional code (attention's q, k, v and the input of its output
    projection; a packed projection split in three). The linked ones are paired by
    :func:`_flow_rescales`. Each unordered pair gives one candidate: output against the
    other's input where that fits (value/output), else output against output (query/key). An
    attention module that declares its head dimension adds the grouped-query and rotary pairs
    (:func:`~torch_momentum.balance._symmetry_heads.head_rescales`).
    """
    found: list[Proposal] = []
    thirds: list[ZeroSlice] = []
    sides: dict[str, _Sides] = {}
    for parent, leaves in _leaves_by_parent(ctx).items():
        outs, ins, packed = sides[parent] = _sibling_sides(ctx, leaves)
        thirds += _zero_thirds(ctx, packed)
        short = ctx.short(parent)
        reading = _reading_siblings(ctx, outs, ins)
        pairs: list[tuple[str, Units, str, Units]] = []
        for i, (leaf_a, la, a) in enumerate(outs):
            for leaf_b, lb, b in outs[i + 1 :]:
                if leaf_b in reading and leaf_b != leaf_a and ins[leaf_b].n == a.n:
                    pairs.append((la, a, leaf_b.rpartition(".")[2], ins[leaf_b]))
                elif leaf_a in reading and leaf_a != leaf_b and ins[leaf_a].n == b.n:
                    pairs.append((lb, b, leaf_a.rpartition(".")[2], ins[leaf_a]))
                else:
                    pairs.append((la, a, lb, b))
            outs_modules = {leaf for leaf, _, _ in outs}
            pairs += [
                (la, a, leaf.rpartition(".")[2], units)
                for leaf, units in ins.items()
                if leaf not in outs_modules
            ]
        for la, a, lb, b in pairs:
            proposal = _rescale(_join(short, f"{la}/{lb}"), a, b)
            if proposal is not None:
                found.append(proposal)
        heads = [_head_side(ctx, leaf, label, units) for leaf, label, units in outs]
        projections = [
            Side(leaf.rpartition(".")[2], u.n, u.parts)
            for leaf, u in ins.items()
            if leaf in reading
        ]
        found += head_rescales(short, ctx.modules[parent], heads, projections)
    return found + _cousins(ctx, sides), thirds


def _reading_siblings(
    ctx: _Context, outs: list[tuple[str, str, Units]], ins: dict[str, Units]
) -> set[str]:
    """The unlinked consumers whose input was computed from a sibling producer's output (an
    attention's output projection reads q, k and v through functional code; OPT's first q, k
    and v projections read the embeddings' sum, not their siblings); all of them where the
    autograd graph is too large to tell."""
    siblings = {leaf for leaf, _, _ in outs}
    found = set()
    for leaf in ins:
        call = ctx.first_call.get(leaf)
        sources = None if call is None or not call.inputs else ctx.flow.sources(call.inputs[0])
        if sources is None or set(sources) & (siblings - {leaf}):
            found.add(leaf)
    return found


def _head_side(ctx: _Context, leaf: str, label: str, units: Units) -> Side:
    """A producer's output rows as a side of the head-wise candidates; a leaf's own output
    (not a third) with more units than inputs may pack q, k and v."""
    inputs = input_units(ctx.names, ctx.modules[leaf])
    n = 0 if inputs is None else inputs.n
    own = label == leaf.rpartition(".")[2]
    return Side(label, units.n, units.parts, packed=own and units.n > n > 0, inputs=n)


def _cousins(ctx: _Context, sides: dict[str, _Sides]) -> list[Proposal]:
    """Each unlinked consumer against the unlinked producers of equal size among the leaves of
    the other children of its grandparent: BERT's value projection
    (``attention.self.value``) feeds the output projection of a sibling module
    (``attention.output.dense``) through functional code."""
    found = []
    for parent, (_, ins, _) in sides.items():
        grand, _, mine = parent.rpartition(".")
        for other, (outs, _, _) in sides.items():
            theirs = other.rpartition(".")[2]
            if not parent or other == parent or other.rpartition(".")[0] != grand:
                continue
            if mine.isdigit() or theirs.isdigit():
                continue  # entries of one ModuleList: blocks of a stack, not halves of one
            for consumer, b in ins.items():
                for _, label, a in outs:
                    source = f"{theirs}.{label}" if theirs else label  # a leaf of the root
                    name = f"{source}/{mine}.{consumer.rpartition('.')[2]}"
                    proposal = _rescale(_join(ctx.short(grand), name), a, b)
                    if proposal is not None:
                        found.append(proposal)
    return found


def _zero_thirds(ctx: _Context, packed: list[tuple[str, Units]]) -> list[ZeroSlice]:
    return [
        ZeroSlice(p.param, p.dim, p.start, p.length, f"{ctx.short(p.param)}[{label}]")
        for label, units in packed
        for p in units.parts
    ]


def _attention_modules(ctx: _Context) -> tuple[list[Proposal], list[ZeroSlice]]:
    """``nn.MultiheadAttention``: q/k rows and v rows against out_proj's columns, from the packed
    ``in_proj`` or from the separate ``q/k/v_proj_weight`` (``kdim``/``vdim``)."""
    found: list[Proposal] = []
    thirds: list[ZeroSlice] = []
    for name, m in ctx.modules.items():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        qkv = _attention_thirds(ctx, m)
        thirds += _zero_thirds(ctx, list(qkv.items()))
        for label in ("k", "v"):  # the extra key and value (add_bias_kv) scale with them
            extra, u = ctx.names.of(m, f"bias_{label}"), qkv[label]
            if extra is not None:
                qkv[label] = Units(u.n, (*u.parts, PartSpec(extra, 2, 0, m.embed_dim)))
        out = input_units(ctx.names, m.out_proj)
        for label, a, b in (("q/k", qkv["q"], qkv["k"]), ("v/out_proj", qkv["v"], out)):
            proposal = None if b is None else _rescale(_join(ctx.short(name), label), a, b)
            if proposal is not None:
                found.append(proposal)
    return found, thirds


def _attention_thirds(ctx: _Context, m: nn.MultiheadAttention) -> dict[str, Units]:
    """The rows (and bias slices) of the q, k and v projections of ``m``."""
    if m.in_proj_weight is not None:
        packed: list[tuple[str, int | None]] = [("in_proj_weight", 0), ("in_proj_bias", 0)]
        return dict(_thirds(param_parts(ctx.names, m, packed, 3 * m.embed_dim)))
    e, bias = m.embed_dim, ctx.names.of(m, "in_proj_bias")
    out = {}
    for k, label in enumerate(("q", "k", "v")):
        weight = ctx.names.of(m, f"{label}_proj_weight")
        parts = [PartSpec(weight, 0, 0, e)] if weight is not None else []
        parts += [PartSpec(bias, 0, k * e, e)] if bias is not None else []
        out[label] = Units(e, tuple(parts))
    return out


def _translation(ctx: _Context, name: str, module: nn.Module) -> list[Proposal]:
    """Input columns (summed over outputs) and the bias of one layer; rows of an Embedding."""
    short = ctx.short(name)
    if isinstance(module, nn.Embedding):
        rows = param_parts(ctx.names, module, [("weight", 0)], module.num_embeddings)
        return (
            [Proposal("translation", f"{short} (rows)", rows.parts, rows.n)] if rows.parts else []
        )
    if isinstance(module, nn.RNNBase):
        return _rnn_biases(ctx, short, module)
    units = input_units(ctx.names, module)
    if units is None or isinstance(module, nn.MultiheadAttention):
        return []
    parts, n = units.parts, units.n if units.parts else 0
    bias = ctx.names.of(module, "bias")
    if bias is not None:
        parts += (PartSpec(bias, None, 0, 0, unit_offset=n),)
    what = "columns" if isinstance(module, nn.Linear) else "input channels"
    what = "rows" if is_conv1d_gpt(module) else what
    label = f"{short} ({what}{' + bias' if bias is not None else ''})"
    return [Proposal("translation", label, parts, n + (bias is not None))] if parts else []


def _raw_rescales(ctx: _Context) -> list[Proposal]:
    """A vector parameter of another module (ConvNeXt's ``layer_scale_parameter``, multiplied
    into a branch in functional code) against the output units of each leaf child of that
    module with as many units: the scale of each entry against its row."""
    found = []
    for name, module in ctx.modules.items():
        if known_owner(module):
            continue
        for attr, p in module.named_parameters(recurse=False):
            gain = param_parts(ctx.names, module, [(attr, 0)], len(p)) if p.dim() == 1 else None
            if gain is None or not gain.parts:  # not a vector, or frozen
                continue
            for child, leaf in module.named_children():
                units = output_units(ctx.names, leaf)
                if f"{name}.{child}".lstrip(".") in ctx.called and units is not None:
                    proposal = _rescale(_join(ctx.short(name), f"{attr}/{child}"), gain, units)
                    found += [] if proposal is None else [proposal]
    return found


def _raw_translations(ctx: _Context) -> list[Proposal]:
    """Parameters of other modules (a ViT's ``cls_token`` and ``pos_embed``, added to the
    stream in functional code): each shifted along its last dimension, one unit per index of
    its one leading dimension longer than 1 (per token), or as a whole."""
    found = []
    for name, p in ctx.modules[""].named_parameters():
        owner, _, attr = name.rpartition(".")
        module = ctx.modules[owner]
        if not p.requires_grad or known_owner(module) or "parametrizations" in name.split("."):
            continue
        if ctx.names.of(module, attr) != name or p.dim() == 0:
            continue  # shared: proposed under its first name
        lead = [d for d in range(p.dim() - 1) if p.shape[d] > 1]
        if len(lead) > 1:
            continue
        dim = lead[0] if lead else None
        n = 1 if dim is None else p.shape[dim]
        label = f"{ctx.short(name)} (per row)" if dim is not None else ctx.short(name)
        found.append(
            Proposal("translation", label, (PartSpec(name, dim, 0, n if n > 1 else 0),), n)
        )
    return found


def _rnn_biases(ctx: _Context, short: str, module: nn.RNNBase) -> list[Proposal]:
    """``bias_ih`` against ``bias_hh``: only their sum enters the gates they share."""
    # LSTM: all four gates; GRU: r and z (not n, where b_hn is multiplied by r); RNN: one
    gates = 4 if isinstance(module, nn.LSTM) else 2 if isinstance(module, nn.GRU) else 1
    found = []
    for attr, _ in module.named_parameters(recurse=False):
        if not attr.startswith("bias_ih_l"):
            continue
        ih, hh = ctx.names.of(module, attr), ctx.names.of(module, attr.replace("_ih_", "_hh_"))
        if ih is None or hh is None:
            continue
        n = gates * module.hidden_size
        parts = (PartSpec(ih, 0, 0, n), PartSpec(hh, 0, 0, n, sign=-1.0))
        label = f"{short} {attr}/{attr.replace('_ih_', '_hh_')}"
        found.append(Proposal("translation", label, parts, n))
    return found


def _dedup(proposals: list[Proposal]) -> list[Proposal]:
    seen: set[tuple[str, PartsKey]] = set()
    unique = []
    for p in proposals:
        key = (p.kind, parts_key(p.parts))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def propose(
    model: nn.Module, calls: list[Call], kinds: tuple[str, ...], prefix: str = ""
) -> tuple[list[Proposal], list[ZeroSlice]]:
    """Candidate symmetries of ``kinds`` and the slices that may get no gradient.

    ``calls`` is what a :class:`CallRecorder` recorded during one forward pass; ``prefix`` is the
    wrapper prefix left out of the names (:func:`display_prefix`).

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_candidates import propose
        >>> from torch_momentum.balance._symmetry_trace import CallRecorder
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> with CallRecorder(model) as rec:
        ...     _ = model(torch.randn(5, 3))
        >>> proposals, _ = propose(model, rec.calls, ("rescale",))
        >>> [(p.name, p.units) for p in proposals]
        [('0/2', 4)]
    """
    ctx = _Context(model, calls, prefix)
    proposals: list[Proposal] = []
    siblings, thirds = _siblings(ctx)
    attention, mha_thirds = _attention_modules(ctx)
    if "scale" in kinds:
        proposals += _scales(ctx)
    if "rescale" in kinds:
        proposals += _flow_rescales(ctx) + siblings + attention + _raw_rescales(ctx)
    if "translation" in kinds:
        for name, module in ctx.modules.items():
            proposals += _translation(ctx, name, module)
        proposals += _raw_translations(ctx)
    whole = [
        ZeroSlice(n, None, 0, 0, ctx.short(n))
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    return _dedup(proposals), whole + thirds + mha_thirds
