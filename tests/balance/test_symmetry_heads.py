"""Head-wise attention symmetries: grouped-query attention and rotary position embeddings.

With H query heads sharing K key/value heads (G = H / K each), the q/k rescale has one unit per
key dimension (all G query heads that read it scale together) and the v/o rescale one unit per
value dimension (the output projection's columns of all G heads). Rotary embeddings rotate each
head's dimensions in pairs, so only a scale common to a pair commutes with them: one unit per
pair, (j, j + d/2) in the "rotate half" convention of transformers' Llama, (2j, 2j + 1)
interleaved. The verification decides which holds: each case pins what is found and what is
rejected, and a rotary candidate that merely coarsens a verified per-dimension one is not
reported at all.

Residual bound: ROUND_OFF of test_symmetry_models (float64 round-off, measured <= 2e-16 here).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.balance.test_flat import assert_same_ledger, float64_case, ledger_reads, use_path
from tests.balance.test_symmetry_models import ROUND_OFF, found_and_rejected, lm, tokens
from tests.helpers.ledger import train_with_ledger
from torch_momentum import PolyakSGD
from torch_momentum.balance import LEDGER_TERMS, _native
from torch_momentum.balance.symmetry import find_symmetries
from torch_momentum.demos import gpt2_tiny, llama_tiny


def _rotate(x: Tensor, rope: str, rotary: int) -> Tensor:
    """Rotary position embedding of the first ``rotary`` dimensions of each head of ``x``
    ``(batch, heads, time, d)``: pairs (j, j + r/2) ("half") or (2j, 2j + 1) ("interleaved")
    turned by ``position * 100 ** (-2j / r)``; the other dimensions pass."""
    x, rest = x[..., :rotary], x[..., rotary:]
    freq = 100.0 ** (-torch.arange(0, rotary, 2, dtype=x.dtype) / rotary)
    angle = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] * freq  # (time, r/2)
    cos, sin = angle.cos(), angle.sin()
    if rope == "half":
        a, b = x[..., : rotary // 2], x[..., rotary // 2 :]
        turned = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        turned = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    return torch.cat([turned, rest], -1)


class HeadsLM(nn.Module):
    """Embedding -> causal self-attention (H query heads, K key/value heads, an optional rotary
    embedding of ``rotary`` dimensions of each head, q/k/v separate or ``packed`` in one
    projection: ``"blocks"`` ``[q | k | v]`` as GPT-BigCode's multi-query attention, ``"groups"``
    ``[q_{g,1} .. q_{g,G} | k_g | v_g]`` per key/value head as GPT-NeoX (G = 1) and Falcon)
    -> linear head: the attention written out, as model code does."""

    def __init__(
        self,
        heads: int,
        kv_heads: int,
        rope: str | None,
        rotary: int | None = None,
        packed: str | None = None,
        width: int = 16,
        rotary_in_config: bool = False,
        positions: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, width)
        self.attn = nn.Module()
        d = self.attn.head_dim = width // heads  # the attributes the candidates read
        if rotary is not None and rotary_in_config:  # as Nemotron and GLM declare it
            self.attn.config = SimpleNamespace(partial_rotary_factor=rotary / d)
        elif rotary is not None:
            self.attn.rotary_ndims = rotary
        if packed is not None:
            self.attn.qkv = nn.Linear(width, (heads + 2 * kv_heads) * d)
        else:
            self.attn.q = nn.Linear(width, heads * d)
            self.attn.k = nn.Linear(width, kv_heads * d)
            self.attn.v = nn.Linear(width, kv_heads * d)
        self.attn.o = nn.Linear(heads * d, width)
        self.head = nn.Linear(width, 32)
        self.shape = (heads, kv_heads, d)
        self.rope, self.rotary, self.packed = rope, rotary or d, packed
        # learned positions added in functional code: q, k and v then read a tensor no module
        # produced, as OPT's first layer does
        self.pos = nn.Parameter(0.1 * torch.randn(16, width)) if positions else None

    def forward(self, ids: Tensor) -> Tensor:
        (b, t), (heads, kv_heads, d) = ids.shape, self.shape
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos[:t]
        if self.packed == "blocks":
            q, k, v = self.attn.qkv(x).split([heads * d, kv_heads * d, kv_heads * d], -1)
            q = q.view(b, t, heads, d).transpose(1, 2)
            k = k.view(b, t, kv_heads, d).transpose(1, 2)
            v = v.view(b, t, kv_heads, d).transpose(1, 2)
        elif self.packed == "groups":
            g = heads // kv_heads
            qkv = self.attn.qkv(x).view(b, t, kv_heads, g + 2, d)
            q = qkv[:, :, :, :g].reshape(b, t, heads, d).transpose(1, 2)
            k, v = qkv[:, :, :, g].transpose(1, 2), qkv[:, :, :, g + 1].transpose(1, 2)
        else:
            q = self.attn.q(x).view(b, t, heads, d).transpose(1, 2)
            k = self.attn.k(x).view(b, t, kv_heads, d).transpose(1, 2)
            v = self.attn.v(x).view(b, t, kv_heads, d).transpose(1, 2)
        if self.rope is not None:
            q, k = _rotate(q, self.rope, self.rotary), _rotate(k, self.rope, self.rotary)
        k = k.repeat_interleave(heads // kv_heads, 1)  # query head i reads key head i // G
        v = v.repeat_interleave(heads // kv_heads, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        y = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return self.head(self.attn.o(y.transpose(1, 2).reshape(b, t, heads * d)))


def _heads(found: list[tuple[str, str, int]]) -> list[tuple[str, int]]:
    return [(name, units) for kind, name, units in found if "(per " in name or "rotary" in name]


# (heads, kv_heads, rope): found head-wise symmetries (name, units); rejected head candidates.
# d = 16 / heads. Without rotation the per-key-head rescale holds and the rotary ones, true but
# coarser, are not reported; with it only the matching pairing holds.
CASES = [
    (
        4,
        2,
        None,
        [("attn q/k (per key dimension)", 8), ("attn v/o (per value dimension)", 8)],
        set(),
    ),
    (
        4,
        2,
        "half",
        [("attn q/k (rotary pairs)", 4), ("attn v/o (per value dimension)", 8)],
        {"attn q/k (per key dimension)", "attn q/k (interleaved rotary pairs)"},
    ),
    (
        4,
        2,
        "interleaved",
        [("attn q/k (interleaved rotary pairs)", 4), ("attn v/o (per value dimension)", 8)],
        {"attn q/k (per key dimension)", "attn q/k (rotary pairs)"},
    ),
    (4, 1, "half", [("attn q/k (rotary pairs)", 2), ("attn v/o (per value dimension)", 4)], set()),
    # equal head counts: the per-dimension q/k pair is a sibling candidate, rejected under
    # rotation; v/o per dimension is the sibling one (no "per value dimension" form)
    (4, 4, "half", [("attn q/k (rotary pairs)", 8)], {"attn q/k"}),
]


@pytest.mark.parametrize(("heads", "kv_heads", "rope", "expected", "rejected"), CASES)
def test_head_symmetries_follow_the_attention(
    heads: int, kv_heads: int, rope: str | None, expected: list[Any], rejected: set[str]
) -> None:
    torch.manual_seed(0)
    found, rejected_names = found_and_rejected(HeadsLM(heads, kv_heads, rope), lm, tokens(32))
    assert _heads(found) == expected
    assert rejected <= rejected_names
    assert not any("rotary" in name for _, name, _ in found if rope is None)
    if kv_heads == heads:
        assert ("rescale", "attn v/o", 16) in found  # the sibling pair


def test_partial_rotation_pairs_the_rotated_dimensions_only() -> None:
    # 2 heads of 8 dimensions, the first 4 rotated (Phi, GPT-NeoX's rotary_pct): per head 2
    # pairs and 4 single dimensions; the per-dimension and all-pairs forms are rejected
    for rope in ("half", "interleaved"):
        torch.manual_seed(0)
        found, rejected = found_and_rejected(HeadsLM(2, 2, rope, rotary=4), lm, tokens(32))
        label = "rotary pairs" if rope == "half" else "interleaved rotary pairs"
        assert _heads(found) == [(f"attn q/k ({label})", 12)]
        assert "attn q/k" in rejected


def test_projections_reading_a_functional_input_are_queries_keys_and_values() -> None:
    # q, k, v and o all read tensors no recorded module produced (the stream is embedding +
    # positions, summed in functional code): only o reads its siblings' outputs, so only o is
    # the output projection. Before, q, k and v were taken for output projections too: q/k
    # was paired as k's output against q's columns, and no head-wise candidate was proposed
    torch.manual_seed(0)
    found, _ = found_and_rejected(HeadsLM(4, 2, "half", positions=True), lm, tokens(32))
    assert _heads(found) == [("attn q/k (rotary pairs)", 4), ("attn v/o (per value dimension)", 8)]


def test_partial_rotation_declared_in_the_config() -> None:
    # no rotary_ndims on the module, partial_rotary_factor 0.5 in its config: the pairs of the
    # 4 rotated dimensions and the 4 others alone (before: all 8 paired, a coarser symmetry)
    torch.manual_seed(0)
    model = HeadsLM(2, 2, "half", rotary=4, rotary_in_config=True)
    found, _ = found_and_rejected(model, lm, tokens(32))
    assert _heads(found) == [("attn q/k (rotary pairs)", 12)]


def test_two_rotated_dimensions_make_one_candidate() -> None:
    # with r = 2 the halves (0, 1) and the interleaved pair (0, 1) are one pair: one candidate,
    # one charge (before: the same symmetry reported twice)
    torch.manual_seed(0)
    found, rejected = found_and_rejected(HeadsLM(2, 2, "half", rotary=2), lm, tokens(32))
    assert _heads(found) == [("attn q/k (rotary pairs)", 14)]
    assert not any("interleaved" in name for name in rejected)


class _Stack(nn.Module):
    """Two attention blocks in a ModuleList, the parents of their leaves ``blocks.0`` and
    ``blocks.1``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList([HeadsLM(2, 2, None).attn for _ in range(2)])
        self.head = nn.Linear(16, 32)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for attn in self.blocks:
            q, k, v = attn.q(x), attn.k(x), attn.v(x)
            scores = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)
            x = x + attn.o(scores @ v)
        return self.head(x)


def test_the_blocks_of_a_stack_are_not_cousins() -> None:
    # the output projection of block 0 and the value of block 1 share a grandparent (the
    # ModuleList); pairing them for every two blocks made the candidates grow with the square
    # of the depth (96 blocks: 37,345 rejected candidates against 865)
    torch.manual_seed(0)
    found = find_symmetries(_Stack(), lm, tokens(32))
    names = [s.name for s in (*found, *found.rejected)]
    assert not [n for n in names if n.startswith("blocks ")], names
    assert "blocks.0 v/o" in [s.name for s in found]


def test_a_projection_packed_head_by_head() -> None:
    # GPT-NeoX's query_key_value: [q_h | k_h | v_h] per head. Read in thirds ([q | k | v], the
    # sibling candidates) nothing holds; read head by head, the rotary q/k pairs and the v/o
    # rescale per value dimension do
    torch.manual_seed(0)
    found, rejected = found_and_rejected(HeadsLM(4, 4, "half", packed="groups"), lm, tokens(32))
    assert _heads(found) == [
        ("attn q/k (rotary pairs, per-head packing)", 8),
        ("attn v/o (per value dimension, per-head packing)", 16),
    ]
    assert {"attn q/k", "attn v/o", "attn q/k (per key dimension, per-head packing)"} <= rejected


@pytest.mark.parametrize(
    ("kv_heads", "packed", "expected"),
    [
        # GPT-BigCode's multi-query c_attn: [q (4 heads) | k | v], one key/value head of 4
        (1, "blocks", [("attn q/k (rotary pairs)", 2), ("attn v/o (per value dimension)", 4)]),
        (2, "blocks", [("attn q/k (rotary pairs)", 4), ("attn v/o (per value dimension)", 8)]),
        # Falcon's grouped layout: [q_{g,1} q_{g,2} | k_g | v_g] per key/value head g
        (
            2,
            "groups",
            [
                ("attn q/k (rotary pairs, per-head packing)", 4),
                ("attn v/o (per value dimension, per-head packing)", 8),
            ],
        ),
    ],
)
def test_a_projection_packing_fewer_key_value_heads(
    kv_heads: int, packed: str, expected: list[tuple[str, int]]
) -> None:
    # (H + 2K) d outputs from H d inputs: H = 4 query heads and K key/value heads of d = 4
    torch.manual_seed(0)
    model = HeadsLM(4, kv_heads, "half", packed=packed)
    found, _ = found_and_rejected(model, lm, tokens(32))
    assert _heads(found) == expected


def test_a_module_without_a_head_dimension_gets_no_head_candidates() -> None:
    torch.manual_seed(0)
    model = HeadsLM(4, 2, "half")
    del model.attn.head_dim
    found = find_symmetries(model, lm, tokens(32))
    names = [s.name for s in (*found, *found.rejected)]
    assert not any("head)" in n or "rotary" in n for n in names)


def _found_and_rejected_llama(model: nn.Module) -> tuple[list[tuple[str, str, int]], set[str]]:
    found = find_symmetries(model, lm, tokens(64))
    # Llama's RMSNorm normalises in float32 even in a float64 model: the stream scale shows
    # ~1e-9 (float32 round-off through the norms), every other symmetry float64 round-off
    for s in found:
        assert s.residual <= (1e-8 if s.name.startswith("stream") else ROUND_OFF), s.name
    assert all(s.residual > 1e-6 for s in found.rejected), found.summary()
    return [(s.kind, s.name, s.units) for s in found], {s.name for s in found.rejected}


LLAMA_BLOCK = [
    (
        "rescale",
        "model.layers.{i} input_layernorm/self_attn.q_proj+self_attn.k_proj+self_attn.v_proj",
        32,
    ),
    ("rescale", "model.layers.{i}.self_attn q_proj/k_proj (rotary pairs)", 8),
    ("rescale", "model.layers.{i}.self_attn v_proj/o_proj (per value dimension)", 16),
    ("rescale", "model.layers.{i} post_attention_layernorm/mlp.gate_proj+mlp.up_proj", 32),
    ("rescale", "model.layers.{i}.mlp up_proj/down_proj", 64),
]


def test_llama_tiny() -> None:
    # RMSNorm gains against the columns they feed; q/k per rotary pair of each key head (2 key
    # heads x 4 pairs), shared by its 2 query heads; v/o per value dimension (2 x 8); the
    # SwiGLU MLP's up rows against down's columns (up enters linearly: silu(gate) * up); the
    # final norm's gain against the head, the head's translation. Absent: gate (SiLU is not
    # homogeneous), q/k per dimension (the rotation mixes each pair), the embedding (its rows
    # enter the residual stream unnormalised).
    torch.manual_seed(0)
    found, rejected = _found_and_rejected_llama(llama_tiny())
    assert found == [
        ("scale", "stream into model.norm (5 layers)", 1),
        *[(k, n.format(i=i), u) for i in range(2) for k, n, u in LLAMA_BLOCK],
        ("rescale", "model.norm/lm_head", 32),
        ("translation", "lm_head (columns)", 32),
    ]
    assert {
        "model.layers.0.self_attn q_proj/k_proj (per key dimension)",
        "model.layers.0.self_attn q_proj/k_proj (interleaved rotary pairs)",
    } <= rejected


def test_llama_multi_head_attention() -> None:
    torch.manual_seed(0)
    found, rejected = _found_and_rejected_llama(llama_tiny(num_key_value_heads=4))
    block = [(n, u) for _, n, u in found if n.startswith("model.layers.0.self_attn")]
    assert block == [
        ("model.layers.0.self_attn q_proj/k_proj (rotary pairs)", 16),
        ("model.layers.0.self_attn v_proj/o_proj", 32),
    ]
    assert "model.layers.0.self_attn q_proj/k_proj" in rejected


def test_gqa_rotary_charge_is_the_sum_over_the_heads_of_each_pair() -> None:
    torch.manual_seed(0)
    model = llama_tiny()
    found = find_symmetries(model, lm, tokens(64))
    qk = next(s for s in found if s.name == "model.layers.0.self_attn q_proj/k_proj (rotary pairs)")
    vo = next(s for s in found if s.name.startswith("model.layers.0.self_attn v_proj/o_proj"))
    params = dict(model.named_parameters())
    attn = "model.layers.0.self_attn."
    d, group = 8, 2
    wq = params[attn + "q_proj.weight"].detach().view(4, 2, d // 2, -1).square().sum((1, 3))
    wk = params[attn + "k_proj.weight"].detach().view(2, 2, d // 2, -1).square().sum((1, 3))
    expected = wq.view(2, group, d // 2).sum(1) - wk  # (key head, pair)
    torch.testing.assert_close(qk.charge(params).detach(), expected.flatten().double())
    wv = params[attn + "v_proj.weight"].detach().square().sum(1).view(2, d)
    wo = params[attn + "o_proj.weight"].detach().square().sum(0).view(2, group, d).sum(1)
    torch.testing.assert_close(vo.charge(params).detach(), (wv - wo).flatten().double())


def _llama() -> tuple[nn.Module, Any, Any]:
    return llama_tiny(), tokens(64, 1)[0], lm


def test_llama_ledgers_close_and_their_symmetry_terms_are_round_off() -> None:
    model, batch, loss, symmetries = float64_case(_llama)
    opt = PolyakSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    ledger = train_with_ledger(model, loss, batch, opt, symmetries, steps=6)
    charges = ledger.read_charges()
    assert any("rotary" in name for name in charges)
    # RMSNorm's eps (1e-6 against a stream of mean square ~4e-4 at Llama's initialisation)
    # breaks the stream's scale symmetry: its relative residual is 9e-7 at the start (under
    # rtol, so it is reported) and grows to 8e-4 over these steps, where its symmetry term
    # books it; with eps ~0 it stays at 7e-9 (float32 round-off inside the norm)
    broken = {s.name for s in symmetries if s.kind == "scale"}
    assert broken == {"stream into model.norm (5 layers)"}
    for name, row in charges.items():
        scale = float(row["scale"].max())
        # 6 float64 steps: round-off ~1e-15 of the charge's scale; 1e-12 leaves a margin
        assert float(row["closure"].abs().max()) <= 1e-12 * scale, name
        symmetry = row["sums"][:, LEDGER_TERMS.index("symmetry")]
        if name not in broken:
            assert float(symmetry.abs().max()) <= 1e-12 * scale, name


def test_llama_flat_ledger_equals_the_stacked_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    # head-wise parts: several slices of one tensor in one unit, units spread over a tensor
    model, batch, loss, symmetries = float64_case(_llama)
    reads = {}
    for path in ("stacked", "flat", "native"):
        if path != "native" or _native.library() is not None:  # (a machine with no compiler)
            use_path(path, monkeypatch)
            reads[path] = ledger_reads(copy.deepcopy(model), batch, loss, "polyak", symmetries)
    for read in reads.values():
        assert_same_ledger(read, reads["stacked"], symmetries)


def test_gpt2_reports_the_per_dimension_pair_not_the_rotary_ones() -> None:
    # GPT-2 has no rotation: its q/k rescale per dimension holds, and so do the coarser rotary
    # ones (two units tied); only the finer is reported, the coarser are neither found nor
    # rejected
    found = find_symmetries(gpt2_tiny(), lm, tokens(64))
    names = [s.name for s in found]
    assert "transformer.h.0.attn q/k" in names
    assert not any("rotary" in n for n in names)
    rejected = {s.name for s in found.rejected}
    assert "transformer.h.0.attn q/v (rotary pairs)" in rejected  # proposed, and false
    # the thirds' rotary pairs are true (dropped as coarser); read head by head (GPT-NeoX's
    # packing), q/k is false
    thirds = {n for n in rejected if n.startswith("transformer.h.0.attn q/k (")}
    assert thirds == {
        "transformer.h.0.attn q/k (per key dimension, per-head packing)",
        "transformer.h.0.attn q/k (rotary pairs, per-head packing)",
        "transformer.h.0.attn q/k (interleaved rotary pairs, per-head packing)",
    }
    assert max(s.residual for s in found) <= ROUND_OFF


def test_qwen3_qk_norm_per_head() -> None:
    # Qwen3 normalises each head of q and of k (RMSNorm over the head's 8 dimensions) before
    # the rotation: every head of q_proj and of k_proj is scale-free on its own (the whole
    # layer, coarser, is not reported), and the norms' gains, shared by the heads, rescale
    # against each other per rotary pair
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3ForCausalLM"):
        pytest.skip("transformers without Qwen3")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attn_implementation="eager",
    )
    model = transformers.Qwen3ForCausalLM(config)
    found = find_symmetries(model, lm, tokens(64))
    # RMSNorm normalises in float32 inside a float64 model: the head scales show ~1e-8
    assert max(s.residual for s in found) <= 1e-7
    attn = [(s.kind, s.name, s.units) for s in found if ".self_attn" in s.name]
    assert attn == [
        ("scale", "model.layers.0.self_attn.q_proj (per 8 outputs)", 4),
        ("scale", "model.layers.0.self_attn.k_proj (per 8 outputs)", 2),
        ("rescale", "model.layers.0.self_attn v_proj/o_proj (per value dimension)", 16),
        ("rescale", "model.layers.0.self_attn q_norm/k_norm (rotary pairs)", 4),
    ]
    opt = PolyakSGD(model.double().parameters(), lr=0.02, momentum=0.9)
    ledger = train_with_ledger(model, lm, tokens(64, 1)[0], opt, list(found), steps=4)
    for name, row in ledger.read_charges().items():
        # float64 round-off over 4 steps (the charges' own float64 arithmetic)
        assert float(row["closure"].abs().max()) <= 1e-12 * float(row["scale"].max()), name
