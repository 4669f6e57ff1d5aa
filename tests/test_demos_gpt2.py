"""``torch_momentum.demos.gpt2_tiny``: eager attention through the public config argument."""

from __future__ import annotations

import pytest
import torch

from torch_momentum.demos import gpt2_tiny

pytest.importorskip("transformers")


def test_gpt2_tiny_uses_eager_attention_unless_told_otherwise():
    assert gpt2_tiny().config._attn_implementation == "eager"
    assert gpt2_tiny(attn_implementation="sdpa").config._attn_implementation == "sdpa"


def test_gpt2_tiny_forward_is_deterministic():
    torch.manual_seed(0)
    model = gpt2_tiny()
    ids = torch.randint(0, 64, (2, 7))
    assert torch.equal(model(ids).logits, model(ids).logits)
