"""LayerBalanceMonitor() with no arguments on the networks people train (issue 20): a ResNet-style
CNN with BatchNorm and downsampling, a pre-LN transformer, GPT-2 from a tiny config, an LSTM
language model, a model with a sparse embedding, and a single Linear layer. Each runs with
neurons=True and ledger=True under a CSVLogger, in float64 so that the ledger's closure is
float64 round-off."""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.trainer import fit
from torch_momentum import PolyakSGD
from torch_momentum.callbacks import LayerBalanceMonitor
from torch_momentum.demos import (
    LSTMLanguageModel,
    PreLNTransformer,
    ResNetCNN,
    TinyViT,
    gpt2_tiny,
    llama_tiny,
)

pytestmark = pytest.mark.slow  # several Trainer fits with figures: ~25 s in all

SUMMARY = re.compile(
    r"^(grad_norm/total|balance/(sq_norm/total|sq_norm_change/max|drift|unit_drift_max"
    r"|unit_symmetry_max)|charge/(scale|rescale|translation)/(max|median|worst)"
    r"|angle/(mean|prediction)|effective_lr/median"
    r"|ledger/(momentum|weight_decay|symmetry|discretisation|other|rounding|closure))$"
)


class _SparseEmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16, sparse=True)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.emb(tokens).mean(1))))


class _Task(pl.LightningModule):
    """Cross-entropy on a model's logits (classification, or next token for language models)."""

    def __init__(self, net: nn.Module, lm: bool, weight_decay: float) -> None:
        super().__init__()
        self.model = net.double()
        self.lm, self.weight_decay = lm, weight_decay

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self.model(x)
        out = getattr(out, "logits", out)
        if self.lm:
            return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return PolyakSGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=self.weight_decay)


def _images(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=g))


def _tokens(vocab: int, n: int = 64, length: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length + 1), generator=g)
    return TensorDataset(ids[:, :-1], ids[:, 1:])


def _bags() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 40, (64, 6), generator=g), torch.randint(0, 5, (64,)))


# model, language model?, weight decay, data, the kinds it must find, the expected warning
CASES: dict[
    str,
    tuple[Callable[[], nn.Module], bool, float, Callable[[], TensorDataset], set[str], str | None],
] = {
    "resnet": (
        ResNetCNN,
        False,
        5e-4,
        _images,
        {"scale", "rescale", "translation"},
        r"does not apply.*conv1: a normalisation layer follows it",
    ),
    "transformer": (
        PreLNTransformer,
        True,
        5e-4,
        lambda: _tokens(32),
        {"scale", "rescale", "translation"},
        None,
    ),
    # its cls_token starts at 0 and heavy ball keeps its sum there: a zero charge whose relative
    # closure was 2e283 when measured against |Q| alone
    "vit": (
        lambda: TinyViT(depth=2),
        False,
        5e-4,
        _images,
        {"rescale", "translation"},
        None,
    ),
    "gpt2": (
        gpt2_tiny,
        True,
        5e-4,
        lambda: _tokens(64),
        {"rescale", "translation"},
        r"does not apply.*mlp\.c_proj: no positively homogeneous path",
    ),
    # RMSNorm, rotary q/k pairs of each key head, value heads shared by two query heads
    "llama": (
        llama_tiny,
        True,
        5e-4,
        lambda: _tokens(64),
        {"scale", "rescale", "translation"},
        None,
    ),
    "lstm": (
        LSTMLanguageModel,
        True,
        5e-4,
        lambda: _tokens(32),
        {"rescale", "translation"},
        r"does not apply",
    ),
    "sparse-embedding": (
        _SparseEmbeddingModel,
        False,
        0.0,
        _bags,
        {"rescale", "translation"},
        None,
    ),
    "single-linear": (
        lambda: nn.Linear(8 * 8, 10),
        False,
        5e-4,
        lambda: TensorDataset(_images().tensors[0].reshape(64, -1), _images().tensors[1]),
        {"translation"},
        None,
    ),
}

# Lightning's own notes about this small setup, and the float64 verification of GPT-2 (its loss
# is computed in float32 by transformers): expected, not about the monitor
EXPECTED = re.compile(
    r"LeafSpec.*deprecated|does not have many workers|number of training batches|"
    r"loss leaves float64|computes in float32|does not apply|LayerBalanceMonitor`: .*float"
)


@pytest.mark.parametrize("case", list(CASES))
def test_the_default_monitor_on_a_real_network(case: str, tmp_path: Path) -> None:
    make, lm, decay, data, kinds, warning = CASES[case]
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(neurons=True, ledger=True, log_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            _Task(make(), lm, decay),
            [monitor],
            DataLoader(data(), batch_size=16),
            logger=CSVLogger(tmp_path),
            max_steps=6,
        )
    messages = [str(w.message) for w in caught]
    unexpected = [m for m in messages if not EXPECTED.search(m)]
    assert not unexpected, unexpected
    if warning is not None:
        assert any(re.search(warning, m, re.S) for m in messages), messages
    # the symmetries: the kinds the model has (tests/balance/test_symmetry_models.py pins them)
    assert kinds <= {s.kind for s in monitor.symmetries}, [s.name for s in monitor.symmetries]
    # a fixed, small set of keys whatever the depth
    keys = set(monitor.history[-1]) - {"step"}
    assert len(keys) <= 25 and all(SUMMARY.match(k) for k in keys), sorted(keys)
    assert "grad_norm/total" in keys and all(f"charge/{k}/max" in keys for k in kinds)
    with open(Path(monitor.figure_paths["balance"]).parent / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert len([c for c in columns if c not in ("step", "epoch")]) <= 25, columns
    # float64: the ledger of every charge closes to round-off over 6 steps
    assert monitor.history[-1]["ledger/closure"] <= 1e-10
    assert monitor.history[-1]["ledger/other"] == pytest.approx(0.0, abs=1e-10)
    # the monitor's ledger is public: its charges are the symmetries the monitor found
    ledger = monitor.balance_ledger
    assert ledger is not None and len(ledger.read_charges()) == len(monitor.symmetries)
    # the figures: written, readable sizes
    assert set(monitor.figure_paths) == {"balance", "ledger"}
    for path in monitor.figure_paths.values():
        with Image.open(path) as image:
            width, height = image.size
        assert max(width, height) <= 2400 and min(width, height) >= 400, (path, width, height)


def test_wrapper_prefixes_and_block_indices_in_per_layer_keys(tmp_path: Path) -> None:
    """per_layer=True names groups without the LightningModule attribute (`model.`) and pads
    block indices so that the columns sort in model order."""
    torch.manual_seed(0)
    monitor = LayerBalanceMonitor(per_layer=True, save_figure=False)
    net = PreLNTransformer(n_layers=11)
    loader = DataLoader(_tokens(32), batch_size=16)
    fit(_Task(net, True, 0.0), [monitor], loader, logger=CSVLogger(tmp_path), max_steps=2)
    keys = [k for k in monitor.history[-1] if k.startswith("balance/sq_norm/")]
    assert (
        "balance/sq_norm/blocks.00.attn.q" in keys and "balance/sq_norm/blocks.10.mlp.fc2" in keys
    )
    assert not any("model." in k for k in monitor.history[-1])
