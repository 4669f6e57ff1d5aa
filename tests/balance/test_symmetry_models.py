"""What ``find_symmetries`` finds on the reference architectures, pinned exactly, and why.

Each case lists every symmetry found (kind, name, units) in order, and candidates that must have
been proposed and rejected (the negative controls: the verification, not the candidate
generator, is what excludes them). The comments say why each absent symmetry is absent.

Residual bound: a verified symmetry shows float64 round-off, measured <= 2e-14 here (the LSTM's
bias pair is the largest); 1e-12 leaves a margin while being 1e6 below the default rtol, so a
symmetry that passed only because rtol is loose would fail here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.ledger import train_with_ledger
from torch_momentum.balance.symmetry import find_symmetries
from torch_momentum.demos import (
    BatchNormMLP,
    GeluMLP,
    LSTMLanguageModel,
    PreLNTransformer,
    ReluMLP,
    ResNetCNN,
    TinyViT,
    gpt2_tiny,
)

ROUND_OFF = 1e-12


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def lm(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    logits = getattr(logits, "logits", logits)  # transformers' CausalLMOutput
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def vectors(n: int = 2) -> list[Any]:
    return [(torch.randn(24, 64), torch.randint(0, 10, (24,))) for _ in range(n)]


def images(n: int = 2) -> list[Any]:
    return [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(n)]


def tokens(vocab: int, n: int = 2) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (4, 12)) for _ in range(n)]


def found_and_rejected(
    model: nn.Module, loss: Callable[..., torch.Tensor], batches: list[Any]
) -> tuple[list[tuple[str, str, int]], set[str]]:
    found = find_symmetries(model, loss, batches)
    assert all(s.residual <= ROUND_OFF for s in found), found.summary()
    assert all(s.residual > 1e-6 for s in found.rejected), found.summary()
    return [(s.kind, s.name, s.units) for s in found], {s.name for s in found.rejected}


def test_relu_mlp() -> None:
    # rescale of each hidden layer (rows + bias of the layer before against the columns of the
    # layer after); softmax cross-entropy: translation of the head's columns and bias. Absent:
    # translation of the hidden layers (ReLU is not shift-invariant).
    found, rejected = found_and_rejected(ReluMLP(), ce, vectors())
    assert found == [
        ("rescale", "0/2", 32),
        ("rescale", "2/4", 32),
        ("translation", "4 (columns + bias)", 33),
    ]
    assert {"0 (columns + bias)", "2 (columns + bias)"} <= rejected


def test_gelu_between_two_linear_layers_has_no_rescale() -> None:
    # negative control: GELU(a z) != a GELU(z), so the candidate 0/2 is proposed (the data flow
    # links 0 -> GELU -> 2) and rejected; the head's translation remains
    found, rejected = found_and_rejected(GeluMLP(), ce, vectors())
    assert found == [("translation", "2 (columns + bias)", 33)]
    assert "0/2" in rejected


def test_batchnorm_mlp_train_and_eval() -> None:
    model = BatchNormMLP()
    found, _ = found_and_rejected(model, ce, vectors())
    assert found == [
        ("scale", "0 (per channel)", 32),  # Linear rows before BatchNorm
        ("rescale", "1/3", 32),  # BatchNorm gain and bias against the next Linear's columns
        ("scale", "3 (per channel)", 32),
        ("rescale", "4/6", 32),
        ("translation", "6 (columns + bias)", 33),
    ]
    # negative control: in eval mode BatchNorm is a fixed affine map (running statistics), the
    # scale symmetry is gone; the gain/bias rescale across ReLU stays
    model.eval()
    found, rejected = found_and_rejected(model, ce, vectors())
    assert found == [
        ("rescale", "1/3", 32),
        ("rescale", "4/6", 32),
        ("translation", "6 (columns + bias)", 33),
    ]
    assert {"0 (per channel)", "3 (per channel)"} <= rejected


def test_softmax_head_trained_with_mse_has_no_translation() -> None:
    def mse(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        return F.mse_loss(model(inputs), F.one_hot(targets, 10).to(inputs.dtype))

    found, rejected = found_and_rejected(ReluMLP(), mse, vectors())
    assert found == [("rescale", "0/2", 32), ("rescale", "2/4", 32)]
    assert "4 (columns + bias)" in rejected

    # the translation belongs to the loss, not to the head: MSE on the softmax keeps it
    def mse_of_softmax(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        probs = model(inputs).softmax(-1)
        return F.mse_loss(probs, F.one_hot(targets, 10).to(inputs.dtype))

    found, _ = found_and_rejected(ReluMLP(), mse_of_softmax, vectors())
    assert ("translation", "4 (columns + bias)", 33) in found


def test_resnet_cnn() -> None:
    # scale per channel of every conv before a BatchNorm (downsampling shortcut included);
    # rescale of bn1 against conv2 inside each block (ReLU between, nothing else consumes it);
    # translation of the classifier. Absent: bn2 and the shortcut's BatchNorm against anything
    # (their outputs meet in the residual add), the stem's bn1 against layer1.0.conv1 (its
    # output also feeds the identity shortcut: proposed and rejected), conv translations
    # (BatchNorm removes the per-channel batch mean, not a per-sample shift).
    found, rejected = found_and_rejected(ResNetCNN(), ce, images())
    assert found == [
        ("scale", "conv1 (per channel)", 16),
        ("scale", "layer1.0.conv1 (per channel)", 16),
        ("rescale", "layer1.0 bn1/conv2", 16),
        ("scale", "layer1.0.conv2 (per channel)", 16),
        ("scale", "layer2.0.conv1 (per channel)", 32),
        ("rescale", "layer2.0 bn1/conv2", 32),
        ("scale", "layer2.0.conv2 (per channel)", 32),
        ("scale", "layer2.0.downsample.0 (per channel)", 32),
        ("translation", "fc (columns + bias)", 33),
    ]
    assert "bn1/layer1.0.conv1" in rejected


def test_resnet_cnn_conv_biases_before_batchnorm_get_no_gradient() -> None:
    found = find_symmetries(ResNetCNN(conv_bias=True), ce, images())
    zero = [s for s in found if s.kind == "zero_gradient"]
    convs = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2"]
    assert [s.name for s in zero] == [f"{c}.bias" for c in [*convs, "layer2.0.downsample.0"]]
    # reported once each, as such: no other symmetry is made of a bias alone, and the scale
    # symmetries include the biases (weight and bias of a channel scale together)
    assert all(len(s.params) > 1 or s.kind == "zero_gradient" for s in found)
    scale = {s.name: s.params for s in found if s.kind == "scale"}
    assert scale["conv1 (per channel)"] == ("conv1.weight", "conv1.bias")
    assert [s.kind for s in found].count("scale") == 6


def test_pre_ln_transformer() -> None:
    # every reader of the residual stream is a LayerNorm (pre-LN, final ln_f), so: scaling all
    # its writers together is a scale symmetry ("stream into ln_f"), and adding a multiple of 1
    # to it is a translation of every writer (embedding rows, the attention output projection's
    # and fc2's columns + bias). Per block: the LayerNorm gains against the q/k/v and fc1
    # columns, q/k and v/o per dimension, the ReLU MLP units; the key bias gets no gradient
    # (softmax is shift-invariant per query). Absent: any scale of a single block's output (the
    # stream into an inner LayerNorm also carries the later blocks' inputs: proposed, rejected).
    found, rejected = found_and_rejected(PreLNTransformer(), lm, tokens(32))
    per_block = [
        ("rescale", "blocks.{i} ln1/attn.q+attn.k+attn.v", 32),
        ("rescale", "blocks.{i}.attn q/k", 32),
        ("zero_gradient", "blocks.{i}.attn.k.bias", 1),
        ("rescale", "blocks.{i}.attn v/o", 32),
        ("translation", "blocks.{i}.attn.o (columns + bias)", 33),
        ("rescale", "blocks.{i} ln2/mlp.fc1", 32),
        ("rescale", "blocks.{i}.mlp fc1/fc2", 64),
        ("translation", "blocks.{i}.mlp.fc2 (columns + bias)", 65),
    ]
    assert found == [
        ("scale", "stream into ln_f (6 layers)", 1),
        ("translation", "tok_emb (rows)", 32),
        ("translation", "pos_emb (rows)", 16),
        *[(k, n.format(i=i), u) for i in range(2) for k, n, u in per_block],
        ("rescale", "ln_f/head", 32),
        ("translation", "head (columns + bias)", 33),
    ]
    assert "stream into blocks.1.ln1 (4 layers)" in rejected


GPT2_BLOCK = [
    ("rescale", "transformer.h.{i} ln_1/attn.c_attn", 32),
    ("rescale", "transformer.h.{i}.attn q/k", 32),
    ("rescale", "transformer.h.{i}.attn v/c_proj", 32),
    ("zero_gradient", "transformer.h.{i}.attn.c_attn.bias[k]", 1),
    ("translation", "transformer.h.{i}.attn.c_proj (rows + bias)", 33),
    ("rescale", "transformer.h.{i} ln_2/mlp.c_fc", 32),
    ("translation", "transformer.h.{i}.mlp.c_proj (rows + bias)", 129),
]


def test_gpt2_tiny() -> None:
    # packed c_attn: q/k and v/c_proj pairs are thirds of one Conv1D; the key bias (a third of
    # c_attn.bias) gets no gradient. Absent: the MLP rescale (GELU: c_fc/c_proj is proposed and
    # rejected), the ln_f/lm_head rescale and the stream scale (the head is tied to wte, so
    # they would also rescale the token embedding), wte's translation (same reason) and the
    # head's (no bias; its columns are wte's, shared with the input). wte's translation is a
    # special-point trap: at initialisation ln_f has gain 1 and bias 0, so its output sums to 0
    # per token and shifting a row of the tied head changes no logit; only the perturbed point
    # rejects it (verifying at the current point alone reports it).
    found, rejected = found_and_rejected(gpt2_tiny(), lm, tokens(64))
    assert found == [
        ("translation", "transformer.wpe (rows)", 32),
        *[(k, n.format(i=i), u) for i in range(2) for k, n, u in GPT2_BLOCK],
    ]
    assert {
        "transformer.h.0.mlp c_fc/c_proj",
        "transformer.ln_f/lm_head",
        "stream into transformer.ln_f (6 layers)",
        "transformer.wte (rows)",
    } <= rejected
    found_list = find_symmetries(gpt2_tiny(), lm, tokens(64))
    key_bias = next(s for s in found_list if s.kind == "zero_gradient")
    assert key_bias.parts[0].param == "transformer.h.0.attn.c_attn.bias"
    assert (key_bias.parts[0].dim, key_bias.parts[0].start, key_bias.parts[0].length) == (0, 32, 32)


def test_gpt2_tiny_dropout_breaks_the_translations() -> None:
    # in training mode dropout multiplies a shift of the stream entrywise by its mask / (1 - p):
    # no longer a multiple of 1, so the LayerNorms do not remove it. Scales and rescales stay.
    model = gpt2_tiny(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    found, rejected = found_and_rejected(model, lm, tokens(64))
    assert found == [
        (k, n.format(i=i), u) for i in range(2) for k, n, u in GPT2_BLOCK if k != "translation"
    ]
    assert {"transformer.wpe (rows)", "transformer.h.1.mlp.c_proj (rows + bias)"} <= rejected


def test_gpt2_tiny_untied_head() -> None:
    # untying the head brings back what the tied embedding killed
    found, _ = found_and_rejected(gpt2_tiny(tie_word_embeddings=False), lm, tokens(64))
    assert found == [
        ("scale", "stream into transformer.ln_f (6 layers)", 1),
        ("translation", "transformer.wte (rows)", 64),
        ("translation", "transformer.wpe (rows)", 32),
        *[(k, n.format(i=i), u) for i in range(2) for k, n, u in GPT2_BLOCK],
        ("rescale", "transformer.ln_f/lm_head", 32),
        ("translation", "lm_head (columns)", 32),
    ]


def test_lstm_language_model() -> None:
    # the embedding's columns against the LSTM's input weights (nothing nonlinear between);
    # bias_ih and bias_hh enter the gates only as their sum; the head's translation. Absent:
    # any rescale inside or after the LSTM (sigmoid and tanh gates are not homogeneous), the
    # embedding rows' translation (the LSTM does not remove a shift of its input).
    found, rejected = found_and_rejected(LSTMLanguageModel(), lm, tokens(32))
    assert found == [
        ("rescale", "embedding/lstm", 16),
        ("translation", "lstm bias_ih_l0/bias_hh_l0", 128),
        ("translation", "head (columns + bias)", 33),
    ]
    assert "embedding (rows)" in rejected


class _PreNormEncoder(nn.Module):
    """torch's own TransformerEncoderLayer (packed MultiheadAttention, functional ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(1))


def test_torch_transformer_encoder_layer() -> None:
    # nn.MultiheadAttention packs q, k, v in in_proj_weight (rows); linear1 -> F.relu ->
    # dropout -> linear2 is linked through the autograd graph. Absent: the stream symmetries
    # (the layer's output reaches the head through a mean, not a LayerNorm).
    batches = [(torch.randn(4, 5, 8), torch.randint(0, 3, (4,))) for _ in range(2)]
    found, _ = found_and_rejected(_PreNormEncoder(), ce, batches)
    assert found == [
        ("rescale", "layer norm1/self_attn", 16),
        ("rescale", "layer.self_attn q/k", 16),
        ("rescale", "layer.self_attn v/out_proj", 16),
        ("zero_gradient", "layer.self_attn.in_proj_bias[k]", 1),
        ("rescale", "layer linear1/linear2", 32),
        ("rescale", "layer norm2/linear1", 16),
        ("translation", "head (columns + bias)", 17),
    ]


class _ConvFlatten(nn.Module):
    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.gn = nn.GroupNorm(2, 8) if norm else nn.Identity()
        self.act = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.act(self.gn(self.conv(x)))))


@pytest.mark.parametrize("norm", [False, True])
def test_flatten_groups_the_columns_of_each_channel(norm: bool) -> None:
    # after Flatten each channel owns 36 consecutive columns of fc: one unit of the rescale;
    # GroupNorm(2, 8): the conv's scale symmetry per group of 4 channels
    found = find_symmetries(_ConvFlatten(norm), ce, images())
    names = [(s.kind, s.name, s.units) for s in found]
    rescale = ("rescale", "gn/fc" if norm else "conv/fc", 8)
    assert rescale in names
    part = next(s for s in found if s.kind == "rescale").parts[-1]
    assert (part.param, part.dim, part.length, part.block, part.sign) == (
        "fc.weight",
        1,
        288,
        36,
        -1.0,
    )
    assert (("scale", "conv (per group)", 2) in names) == norm


def test_weight_norm_direction() -> None:
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(64, 16)), nn.Tanh(), nn.Linear(16, 10)
    )
    found = find_symmetries(model, ce, vectors())
    assert [(s.kind, s.name, s.units) for s in found] == [
        ("scale", "0.weight (weight-norm direction)", 16),
        ("translation", "2 (columns + bias)", 17),
    ]


def _weight_norm(module: nn.Module, api: str, dim: int = 0) -> nn.Module:
    if api == "parametrizations":
        return nn.utils.parametrizations.weight_norm(module, dim=dim)
    with pytest.warns(FutureWarning, match="weight_norm"):  # the older API is deprecated
        return nn.utils.weight_norm(module, dim=dim)


WEIGHT_NORM_NAMES = {
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    "legacy": ("weight_g", "weight_v"),
}


@pytest.mark.parametrize("api", list(WEIGHT_NORM_NAMES))
def test_weight_norm_producer_rescales_through_its_gain(api: str) -> None:
    # W = g * v / |v| per row: v is scale-free per row (scale); a ReLU unit's output scales
    # with (g_i, b_i) alone, against the next layer's column i (rescale). Before, the legacy
    # API gave neither, and the parametrized module was not recorded (it is no leaf): no rescale
    torch.manual_seed(0)
    model = nn.Sequential(_weight_norm(nn.Linear(64, 16), api), nn.ReLU(), nn.Linear(16, 10))
    found = find_symmetries(model, ce, vectors())
    assert [(s.kind, s.name, s.units) for s in found] == [
        ("rescale", "0/2", 16),
        ("scale", "0.weight (weight-norm direction)", 16),
        ("translation", "2 (columns + bias)", 17),
    ]
    g, v = (f"0.{n}" for n in WEIGHT_NORM_NAMES[api])
    rescale, scale = found[0], found[1]
    assert [(p.param, p.dim, p.length, p.sign) for p in rescale.parts] == [
        (g, 0, 16, 1.0),
        ("0.bias", 0, 16, 1.0),
        ("2.weight", 1, 16, -1.0),
    ]
    assert [(p.param, p.dim, p.length) for p in scale.parts] == [(v, 0, 16)]
    assert all(s.residual <= ROUND_OFF for s in found)


@pytest.mark.parametrize("api", list(WEIGHT_NORM_NAMES))
def test_weight_norm_consumer(api: str) -> None:
    # rows normalised (dim 0): no move of g and v scales one column, so no rescale is proposed;
    # columns normalised (dim 1): the column scales with its gain g_j
    torch.manual_seed(0)
    rows = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), _weight_norm(nn.Linear(16, 10), api))
    found = find_symmetries(rows, ce, vectors())
    assert not [s for s in [*found, *found.rejected] if s.kind == "rescale"]
    cols = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), _weight_norm(nn.Linear(16, 10), api, 1))
    rescale = next(s for s in find_symmetries(cols, ce, vectors()) if s.kind == "rescale")
    g = f"2.{WEIGHT_NORM_NAMES[api][0]}"
    assert [(p.param, p.dim, p.sign) for p in rescale.parts][-1] == (g, 1, -1.0)
    assert rescale.units == 16 and rescale.residual <= ROUND_OFF


def test_weight_norm_charges_are_conserved_by_gradient_flow() -> None:
    # small steps of gradient descent in float64: each charge moves only at second order
    # (discretisation), and the ledger splits it exactly
    from torch_momentum.balance import LEDGER_TERMS

    torch.manual_seed(0)
    model = nn.Sequential(
        _weight_norm(nn.Linear(64, 16), "parametrizations"), nn.ReLU(), nn.Linear(16, 10)
    ).double()
    batch = (torch.randn(24, 64, dtype=torch.float64), torch.randint(0, 10, (24,)))
    found = find_symmetries(model, ce, [batch])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for name, row in train_with_ledger(model, ce, batch, opt, found, 10).read_charges().items():
        scale = float(row["scale"].max())
        # 10 float64 steps: round-off ~1e-15 of the charge; 1e-12 leaves a margin
        assert float(row["closure"].abs().max()) <= 1e-12 * scale, name
        symmetry = row["sums"][:, LEDGER_TERMS.index("symmetry")]
        assert float(symmetry.abs().max()) <= 1e-12 * scale, name


def test_depthwise_convolution_rescales_each_input_channel() -> None:
    # a depthwise convolution (groups = in_channels, 2 output channels per input channel) reads
    # input channel c through its rows 2c, 2c + 1 only: ReLU unit c of the convolution before
    # rescales against them. Before, only groups == 1 had input units: no candidate
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, groups=8, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4, 5),
    )
    batches = [(torch.randn(16, 2, 6, 6), torch.randint(0, 5, (16,))) for _ in range(2)]
    found = find_symmetries(model, ce, batches)
    rescale = next(s for s in found if s.name == "0/2")
    assert rescale.kind == "rescale" and rescale.units == 8 and rescale.residual <= ROUND_OFF
    assert [(p.param, p.dim, p.length, p.block, p.sign) for p in rescale.parts] == [
        ("0.weight", 0, 8, 1, 1.0),
        ("0.bias", 0, 8, 1, 1.0),
        ("2.weight", 0, 16, 2, -1.0),
    ]
    params = dict(model.named_parameters())
    with torch.no_grad():
        a = params["0.weight"].flatten(1).square().sum(1) + params["0.bias"].square()
        b = params["2.weight"].flatten(1).square().sum(1).view(8, 2).sum(1)
    torch.testing.assert_close(rescale.charge(params), (a - b).double())
    # a grouped convolution with several channels per group reads a channel through a block of
    # rows and one column: not a slice along one dimension, so not proposed
    grouped = nn.Sequential(
        nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(32, 5)
    )
    assert "0/2" not in {s.name for s in [*find_symmetries(grouped, ce, batches), *found.rejected]}


def test_raw_parameters_added_to_a_pre_ln_stream_translate() -> None:
    # a ViT's cls_token and pos_embed are raw parameters of the root, added to the residual
    # stream in functional code; every read of the stream is a LayerNorm, so shifting a token's
    # entries by a constant is invisible: one translation per token (per row of pos_embed) and
    # one for the class token. Before, raw parameters got no candidate
    torch.manual_seed(0)
    model = TinyViT(depth=2)
    found = find_symmetries(model, ce, images())
    raw = [(s.kind, s.name, s.units) for s in found if s.params[0] in ("cls_token", "pos_embed")]
    assert raw == [("translation", "cls_token", 1), ("translation", "pos_embed (per row)", 17)]
    assert all(s.residual <= ROUND_OFF for s in found)
    part = next(s for s in found if s.name == "pos_embed (per row)").parts[0]
    assert (part.param, part.dim, part.length) == ("pos_embed", 1, 17)


class _Scaled(nn.Module):
    """A raw gain and a raw offset used in functional code, before a ReLU: not shift-free."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.gain = nn.Parameter(torch.ones(16))
        self.offset = nn.Parameter(torch.zeros(4, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x) * self.gain + self.offset.mean(0))
        return self.head(h)


def test_raw_parameters_that_are_not_shift_free_are_rejected() -> None:
    torch.manual_seed(0)
    found = find_symmetries(_Scaled(), ce, vectors())
    rejected = {s.name for s in found.rejected}
    assert {"gain", "offset (per row)"} <= rejected
    assert not [s for s in found if s.params[0] in ("gain", "offset") and s.kind != "rescale"]
    # a raw gain does rescale against the rows it multiplies (as ConvNeXt's LayerScale)
    assert [(s.name, s.units) for s in found if s.params[0] == "gain"] == [("gain/fc", 16)]


class _CrossAttention(nn.Module):
    """Queries of width 8 attending to keys and values of width 5 (``kdim``, ``vdim``)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(6, 8), nn.Linear(6, 5)
        self.mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv(x)
        return self.head(self.mha(self.q(x), kv, kv)[0].mean(1))


def test_attention_with_kdim_and_vdim() -> None:
    # separate q/k/v projection weights: the head dimensions of q and k pair up, those of v
    # with out_proj's columns, as with the packed in_proj; the key bias gets no gradient.
    # Before, only the packed in_proj was looked at
    torch.manual_seed(0)
    batches = [(torch.randn(4, 7, 6), torch.randint(0, 5, (4,))) for _ in range(2)]
    found = find_symmetries(_CrossAttention(), ce, batches)
    by_name = {s.name: s for s in found}
    qk, vo = by_name["mha q/k"], by_name["mha v/out_proj"]
    assert [(p.param, p.start, p.length, p.sign) for p in qk.parts] == [
        ("mha.q_proj_weight", 0, 8, 1.0),
        ("mha.in_proj_bias", 0, 8, 1.0),
        ("mha.k_proj_weight", 0, 8, -1.0),
        ("mha.in_proj_bias", 8, 8, -1.0),
    ]
    assert [(p.param, p.dim, p.sign) for p in vo.parts][-1] == ("mha.out_proj.weight", 1, -1.0)
    assert by_name["mha.in_proj_bias[k]"].kind == "zero_gradient"
    assert all(s.residual <= ROUND_OFF for s in found)


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x)[0].mean(1))


def test_attention_with_an_extra_key_and_value() -> None:
    # add_bias_kv appends a learned key and value to every sequence: they scale with the key's
    # and the value's head dimensions. Before, bias_v was left out and v/out_proj was rejected
    torch.manual_seed(0)
    batches = [(torch.randn(4, 7, 8), torch.randint(0, 5, (4,))) for _ in range(2)]
    found = find_symmetries(_SelfAttention(), ce, batches)
    by_name = {s.name: s for s in found}
    for name, extra in (("mha q/k", "mha.bias_k"), ("mha v/out_proj", "mha.bias_v")):
        assert by_name[name].residual <= ROUND_OFF
        assert (extra, 2) in [(p.param, p.dim) for p in by_name[name].parts]


def test_weight_norm_with_a_frozen_gain_keeps_the_direction() -> None:
    # g frozen: v / |v| per row is still scale-free (scale), but a unit can no longer scale
    # (its gain cannot move), so no rescale through it
    torch.manual_seed(0)
    model = nn.Sequential(
        _weight_norm(nn.Linear(64, 16), "parametrizations"), nn.ReLU(), nn.Linear(16, 10)
    )
    model[0].parametrizations.weight.original0.requires_grad_(False)
    found = find_symmetries(model, ce, vectors())
    assert [(s.kind, s.name) for s in found] == [
        ("scale", "0.weight (weight-norm direction)"),
        ("translation", "2 (columns + bias)"),
    ]
    assert not [s for s in found.rejected if s.kind == "rescale"]


class _MyLSTM(nn.LSTM):
    """A subclass, as libraries write them (the gate count was once looked up by exact type)."""


class _RecurrentLM(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(32, 8)
        self.rnn = cell(8, 16, batch_first=True)
        self.head = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embedding(ids))[0])


@pytest.mark.parametrize(("cell", "units"), [(_MyLSTM, 64), (nn.GRU, 32)])
def test_recurrent_bias_pairs(cell: type[nn.RNNBase], units: int) -> None:
    # LSTM: all 4 gates see bias_ih + bias_hh; GRU: only r and z (the n gate multiplies b_hn
    # by r), so the pair covers the first 2 * hidden entries
    found, _ = found_and_rejected(_RecurrentLM(cell), lm, tokens(32))
    assert ("translation", "rnn bias_ih_l0/bias_hh_l0", units) in found


def test_bert_value_against_the_attention_output_in_a_sibling_module() -> None:
    # BERT splits attention in two modules: attention.self (query, key, value) returns the
    # context, attention.output.dense reads it. The value/output rescale spans the two: it is
    # a "cousin" candidate (the consumer against the producers of its grandparent's other
    # children); query and key against the output are proposed too, and false.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )

    def mlm(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())

    found, rejected = found_and_rejected(transformers.BertForMaskedLM(config), mlm, tokens(32))
    rescales = [(n, u) for k, n, u in found if k == "rescale"]
    assert rescales == [
        ("bert.encoder.layer.0.attention.self query/key", 16),
        ("bert.encoder.layer.0.attention self.value/output.dense", 16),
        ("bert.encoder.layer.0.output.LayerNorm/cls.predictions.transform.dense", 16),
    ]
    assert {
        "bert.encoder.layer.0.attention self.query/output.dense",
        "bert.encoder.layer.0.attention self.key/output.dense",
    } <= rejected


def test_convnext_layer_scale_and_layer_norms_over_channels() -> None:
    # transformers' ConvNeXt: the stem convolution feeds a channels-first LayerNorm and each
    # depthwise convolution a LayerNorm over channels after a permute (functional code): each
    # is scale-free as a whole layer. The block's output is layer_scale_parameter * pwconv2(x):
    # each entry of the raw gain rescales against its row of pwconv2.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=1,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
        patch_size=2,
        num_labels=10,
        layer_scale_init_value=0.5,
    )

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs).logits, targets)

    batches = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    model = transformers.ConvNextForImageClassification(config)
    found, rejected = found_and_rejected(model, loss, batches)
    s0, s1 = "convnext.encoder.stages.0", "convnext.encoder.stages.1"
    assert found == [
        ("scale", "convnext.embeddings.patch_embeddings (whole layer)", 1),
        ("translation", "convnext.embeddings.patch_embeddings (input channels + bias)", 2),
        ("rescale", f"{s0}.layers.0 layer_scale_parameter/pwconv2", 8),
        ("scale", f"{s0}.layers.0.dwconv (whole layer)", 1),
        ("rescale", f"{s0}.layers.0 layernorm/pwconv1", 8),
        ("rescale", f"{s1}.downsampling_layer 0/1", 8),
        ("rescale", f"{s1}.layers.0 layer_scale_parameter/pwconv2", 16),
        ("scale", f"{s1}.layers.0.dwconv (whole layer)", 1),
        ("rescale", f"{s1}.layers.0 layernorm/pwconv1", 16),
        ("rescale", "convnext.layernorm/classifier", 16),
        ("translation", "classifier (columns + bias)", 17),
    ]
    assert f"{s0}.layers.0 layer_scale_parameter/dwconv" in rejected


class _LayerScale(nn.Module):
    """timm's LayerScale: a module of its own, ``x * gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def test_a_layer_scale_module_rescales_against_the_rows_it_scales() -> None:
    # fc2 -> ls (x * gamma): gamma_c times a, row c of fc2 and its bias divided by a. A leaf of
    # no known type whose only parameter is a vector is a per-feature gain: its entries are the
    # units of its input (before: only its translation was proposed, and rejected)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), _LayerScale(16))
    model.append(nn.Linear(16, 10))
    found, rejected = found_and_rejected(model, ce, vectors())
    assert ("rescale", "2/3", 16) in found
    assert "3.gamma" in rejected  # a shift of gamma is no symmetry


def test_prelu_is_looked_through_not_taken_for_a_gain() -> None:
    # PReLU commutes with a positive scale (its slopes stay): the rescale of fc1's units
    # against fc2's columns passes through it. Its one vector parameter is a slope, not a gain
    # on its input: no candidate rescales it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.PReLU(16), nn.Linear(16, 16))  # 16 logits
    found = find_symmetries(model, ce, vectors())
    assert (found[0].kind, found[0].name, found[0].units) == ("rescale", "0/2", 16)
    rescales = [s for s in (*found, *found.rejected) if s.kind == "rescale"]
    assert not [s.name for s in rescales if "1.weight" in s.params]
