"""Small reference architectures, shared by the tests, the examples and the benchmarks.

Plain :class:`torch.nn.Module` classes (like Lightning's ``lightning.pytorch.demos``), sized to run
in well under a second per step on a 2-core CPU. They are written the way the networks people
train are written (module names and structure follow torchvision's ResNet and GPT-style
transformers), because their purpose is to exercise code that walks real model structure: the
symmetry discovery of :mod:`torch_momentum.balance.symmetry`, the balance monitor and its ledger.

* :class:`ReluMLP`: ``Linear -> ReLU -> ... -> Linear`` with biases.
* :class:`GeluMLP`: ``Linear -> GELU -> Linear``, the negative control of :class:`ReluMLP` (GELU is
  not positively homogeneous, so it has no hidden-unit rescale symmetry).
* :class:`BatchNormMLP`: ``Linear -> BatchNorm1d -> ReLU`` blocks and a linear head.
* :class:`ResNetCNN`: a ResNet-style CNN (BatchNorm, BasicBlocks, 1x1-conv downsampling
  shortcuts) for 8x8 single-channel images with 10 classes (scikit-learn's digits).
* :class:`PreLNTransformer`: a pre-LayerNorm causal transformer language model with separate
  q/k/v/o projections and a ReLU MLP.
* :func:`gpt2_tiny`: GPT-2 from a tiny ``transformers.GPT2Config`` (packed ``c_attn``, GELU, tied
  embeddings); needs the ``transformers`` package.
* :func:`llama_tiny`: Llama from a tiny ``transformers.LlamaConfig`` (RMSNorm, rotary position
  embeddings, grouped-query attention, SwiGLU MLP); needs ``transformers``.
* :class:`TinyViT`: a Vision Transformer (patch embedding, class token, learned positions, pre-LN
  blocks with a GELU MLP) for 8x8 images.
* :class:`LSTMLanguageModel`: embedding, LSTM, linear head.

All classifiers return logits; the language models return logits of shape ``(batch, time,
vocab)``. Losses are the caller's choice (cross-entropy, or mean squared error as the negative
control of the translation symmetry of softmax cross-entropy).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "BatchNormMLP",
    "GeluMLP",
    "LSTMLanguageModel",
    "PreLNTransformer",
    "ReluMLP",
    "ResNetCNN",
    "TinyViT",
    "TransformerBlock",
    "gpt2_tiny",
    "llama_tiny",
]


class ReluMLP(nn.Sequential):
    """``Linear -> ReLU -> ... -> Linear`` with biases, as an ``nn.Sequential``.

    ReLU is positively homogeneous, so every hidden unit ``i`` has a rescale symmetry: its row and
    bias in the layer before, times ``a > 0``, and its column in the layer after, times ``1/a``,
    leave the output unchanged. Under softmax cross-entropy the head also has the translation
    symmetry (adding a constant to every logit).

    Args:
        in_features: input size (64 for the 8x8 digits, flattened).
        hidden: widths of the hidden layers.
        out_features: number of outputs (classes).
        bias: whether the Linear layers have biases.

    Example:
        >>> import torch
        >>> from torch_momentum.demos import ReluMLP
        >>> model = ReluMLP(64, (32, 32), 10)
        >>> model(torch.randn(5, 64)).shape
        torch.Size([5, 10])
        >>> [type(m).__name__ for m in model]
        ['Linear', 'ReLU', 'Linear', 'ReLU', 'Linear']
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (32, 32),
        out_features: int = 10,
        *,
        bias: bool = True,
    ) -> None:
        widths = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class GeluMLP(nn.Sequential):
    """``Linear -> GELU -> Linear``: the negative control of the hidden-unit rescale symmetry.

    GELU(a z) differs from a GELU(z) for a > 0, so rescaling a hidden unit's incoming weights by a
    and its outgoing weights by 1/a changes the output: there is no rescale symmetry here.

    Example:
        >>> import torch
        >>> from torch_momentum.demos import GeluMLP
        >>> GeluMLP(64, 32, 10)(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(self, in_features: int = 64, hidden: int = 32, out_features: int = 10) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features))


class BatchNormMLP(nn.Sequential):
    """``(Linear -> BatchNorm1d -> ReLU) x k -> Linear``.

    In training mode BatchNorm normalises each unit by its batch statistics, so the weights (and
    bias) of every unit of the Linear before it are scale-invariant: the scale symmetry, exact as
    the norm's eps -> 0. In eval mode BatchNorm uses its running statistics, a fixed affine map,
    and the symmetry is gone.

    Args:
        in_features: input size.
        hidden: widths of the hidden layers.
        out_features: number of outputs.
        affine: whether the BatchNorm layers have a learnable gain and bias.
        bias: whether the Linear layers have biases (a bias before BatchNorm gets no gradient).

    Example:
        >>> import torch
        >>> from torch_momentum.demos import BatchNormMLP
        >>> model = BatchNormMLP(64, (32,), 10)
        >>> [type(m).__name__ for m in model]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
        >>> model(torch.randn(8, 64)).shape
        torch.Size([8, 10])
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (32, 32),
        out_features: int = 10,
        *,
        affine: bool = True,
        bias: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h, bias=bias), nn.BatchNorm1d(h, affine=affine), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv + BatchNorm, a shortcut, ReLU after the add.

    ``downsample`` (a 1x1 conv with ``stride`` and a BatchNorm, as in torchvision) is built when
    the stride or the width changes. The modules are called ``conv1, bn1, relu, conv2, bn2,
    downsample`` as in torchvision; ``relu`` is one module called twice.

    Example:
        >>> import torch
        >>> from torch_momentum.demos import BasicBlock
        >>> block = BasicBlock(8, 16, stride=2)
        >>> block(torch.randn(2, 8, 8, 8)).shape
        torch.Size([2, 16, 4, 4])
        >>> [type(m).__name__ for m in block.downsample]
        ['Conv2d', 'BatchNorm2d']
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, *, conv_bias: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=conv_bias),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetCNN(nn.Module):
    """A ResNet-style CNN for 8x8 single-channel images (scikit-learn's digits), 10 classes.

    torchvision's ResNet layout at a small size: a 3x3 stem conv + BatchNorm + ReLU (no max-pool:
    the images are 8x8), then one stage per entry of ``widths``, each of ``blocks``
    :class:`BasicBlock` s, the first block of every stage after the first with stride 2 and a
    1x1-conv + BatchNorm downsampling shortcut; global average pooling, ``torch.flatten`` and a
    linear classifier ``fc``. Module names follow torchvision (``conv1, bn1, relu, layer1, ...,
    avgpool, fc``). With the defaults: 19,706 parameters, about 3 ms per training step of 64
    images on one CPU core.

    Args:
        in_channels: image channels.
        num_classes: classes.
        widths: channels per stage.
        blocks: BasicBlocks per stage.
        conv_bias: give every conv a bias (torchvision has none: a bias before BatchNorm gets no
            gradient in training mode).

    Example:
        >>> import torch
        >>> from torch_momentum.demos import ResNetCNN
        >>> model = ResNetCNN()
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> sum(p.numel() for p in model.parameters())
        19706
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32),
        blocks: int = 1,
        *,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        if not widths or blocks < 1:
            raise ValueError(f"widths must be non-empty and blocks >= 1, got {widths}, {blocks}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        width = widths[0]
        for i, w in enumerate(widths):
            stage = [
                BasicBlock(
                    width if b == 0 else w, w, 2 if (b == 0 and i > 0) else 1, conv_bias=conv_bias
                )
                for b in range(blocks)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            width = w
        self.stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _Attention(nn.Module):
    """Multi-head self-attention with separate ``q, k, v, o`` Linear projections (causal unless
    ``causal=False``)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.causal = causal
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, e = x.shape
        h = self.n_heads

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, h, e // h).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(e // h)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        attn = scores.softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(b, t, e))


class _FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = activation()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    ``attn`` has separate ``q, k, v, o`` Linear projections (``n_heads`` heads; causal unless
    ``causal=False``); ``mlp`` is ``fc1 -> act -> fc2`` with ``activation`` (default ReLU).

    Example:
        >>> import torch
        >>> from torch_momentum.demos import TransformerBlock
        >>> TransformerBlock(16, 2, 32)(torch.randn(3, 5, 16)).shape
        torch.Size([3, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        causal: bool = True,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _Attention(d_model, n_heads, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = _FeedForward(d_model, d_ff, activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PreLNTransformer(nn.Module):
    """A pre-LN causal transformer language model (token ids in, next-token logits out).

    ``tok_emb`` + ``pos_emb`` (learned), ``n_layers`` :class:`TransformerBlock` s in ``blocks``, a
    final LayerNorm ``ln_f`` and an untied linear ``head`` with bias.

    Args:
        vocab_size: tokens.
        d_model: width of the residual stream.
        n_heads: attention heads.
        n_layers: blocks.
        d_ff: hidden width of the ReLU MLP.
        max_len: longest sequence (positions).

    Example:
        >>> import torch
        >>> from torch_momentum.demos import PreLNTransformer
        >>> model = PreLNTransformer(vocab_size=32, d_model=16, n_heads=2, n_layers=2)
        >>> model(torch.randint(0, 32, (3, 7))).shape
        torch.Size([3, 7, 32])
    """

    def __init__(
        self,
        vocab_size: int = 32,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 64,
        max_len: int = 16,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class TinyViT(nn.Module):
    """A Vision Transformer (Dosovitskiy et al. 2021) at a small size, for 8x8 digits.

    timm/torchvision's layout: a patch embedding ``patch_embed`` (a strided Conv2d), a class token
    ``cls_token`` and learned positions ``pos_embed`` (raw parameters of the root), ``depth``
    pre-LN :class:`TransformerBlock` s (bidirectional attention, GELU MLP) in ``blocks``, a final
    LayerNorm ``norm`` and a linear ``head`` on the class token.

    Example:
        >>> import torch
        >>> from torch_momentum.demos import TinyViT
        >>> model = TinyViT(depth=2)
        >>> model(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 8,
        patch_size: int = 2,
        dim: int = 32,
        depth: int = 12,
        heads: int = 4,
        mlp_dim: int = 64,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch {patch_size}")
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_dim, causal=False, activation=nn.GELU)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> Linear head: a recurrent language model (token ids in, logits out).

    Args:
        vocab_size: tokens.
        embed_dim: embedding width.
        hidden_size: LSTM hidden width.
        num_layers: stacked LSTM layers.

    Example:
        >>> import torch
        >>> from torch_momentum.demos import LSTMLanguageModel
        >>> LSTMLanguageModel(32, 16, 24)(torch.randint(0, 32, (3, 7))).shape
        torch.Size([3, 7, 32])
    """

    def __init__(
        self, vocab_size: int = 32, embed_dim: int = 16, hidden_size: int = 32, num_layers: int = 1
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.embedding(tokens))
        return self.head(out)


def _tiny_model(model: str, vocab_size: int, settings: dict[str, Any]) -> nn.Module:
    """``transformers.{model}ForCausalLM`` (``GPT2LMHeadModel`` for GPT-2) from its config with
    ``settings``, a vocabulary of ``vocab_size`` whose last token is BOS and EOS, and eager
    attention (not SDPA, whose backend and rounding vary); ImportError without
    ``transformers``."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the test environment has it
        raise ImportError(
            f"{model.lower()}_tiny needs the `transformers` package (pip install transformers)"
        ) from exc
    common = {
        "vocab_size": vocab_size,
        "bos_token_id": vocab_size - 1,
        "eos_token_id": vocab_size - 1,
        "attn_implementation": "eager",
    }
    head = "GPT2LMHeadModel" if model == "GPT2" else f"{model}ForCausalLM"
    config = getattr(transformers, f"{model}Config")(**{**common, **settings})
    return cast(nn.Module, getattr(transformers, head)(config))


def gpt2_tiny(
    vocab_size: int = 64,
    n_positions: int = 32,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    **config: Any,
) -> nn.Module:
    """GPT-2 (``transformers.GPT2LMHeadModel``) from a tiny ``GPT2Config``.

    The real GPT-2 code: packed ``c_attn`` (a ``Conv1D`` whose weight ``(E, 3E)`` holds the q, k and
    v projections side by side), GELU MLP, LayerNorms, learned positions and the output head tied
    to the token embedding ``wte``. Dropout is off (``resid_pdrop = embd_pdrop = attn_pdrop =
    0``) and attention is the eager implementation, so that two forward passes agree; any
    ``GPT2Config`` field can be overridden through ``config``. The model returns a
    ``CausalLMOutput``: ``model(ids).logits`` has shape ``(batch, time, vocab_size)``.

    Raises:
        ImportError: ``transformers`` is not installed.

    Example:
        >>> import torch
        >>> from torch_momentum.demos import gpt2_tiny
        >>> model = gpt2_tiny()
        >>> model(torch.randint(0, 64, (2, 5))).logits.shape
        torch.Size([2, 5, 64])
        >>> model.lm_head.weight is model.transformer.wte.weight
        True
    """
    settings: dict[str, Any] = {
        "n_positions": n_positions,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **config,
    }
    return _tiny_model("GPT2", vocab_size, settings)


def llama_tiny(
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    **config: Any,
) -> nn.Module:
    """Llama (``transformers.LlamaForCausalLM``) from a tiny ``LlamaConfig``.

    The real Llama code, the layout of most open language models since: RMSNorm before each
    block, rotary position embeddings on the queries and keys (pairs of dimensions ``j`` and
    ``j + d/2`` of each head rotated together), grouped-query attention (by default 4 query heads
    share 2 key/value heads of dimension 8), a SwiGLU MLP (``down(silu(gate(x)) * up(x))``,
    intermediate size ``2 * hidden_size``), no biases and an untied output head. Attention is
    the eager implementation, so that two forward passes agree; any ``LlamaConfig`` field can be
    overridden through ``config``. ``model(ids).logits`` has shape ``(batch, time,
    vocab_size)``.

    Raises:
        ImportError: ``transformers`` is not installed.

    Example:
        >>> import torch
        >>> from torch_momentum.demos import llama_tiny
        >>> model = llama_tiny()
        >>> model(torch.randint(0, 64, (2, 5))).logits.shape
        torch.Size([2, 5, 64])
        >>> attention = model.model.layers[0].self_attn
        >>> attention.q_proj.weight.shape, attention.k_proj.weight.shape, attention.head_dim
        (torch.Size([32, 32]), torch.Size([16, 32]), 8)
    """
    settings: dict[str, Any] = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "pad_token_id": None,
        **config,
    }
    return _tiny_model("Llama", vocab_size, settings)
