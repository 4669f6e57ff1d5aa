"""Small float64 networks and regression data for the plain-torch balance tests (ledger, units):
a ReLU / LeakyReLU MLP 6 -> 8 -> 5 -> 2, a small CNN on 8x8 single-channel images, fixed data."""

from __future__ import annotations

import torch
from torch import nn


def mlp(bias: bool = True, seed: int = 0) -> nn.Sequential:
    """Linear 6 -> 8, ReLU, Linear 8 -> 5, LeakyReLU(0.1), Linear 5 -> 2 (seeded with ``seed``)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8, bias=bias),
        nn.ReLU(),
        nn.Linear(8, 5, bias=bias),
        nn.LeakyReLU(0.1),
        nn.Linear(5, 2, bias=bias),
    ).double()


def cnn(seed: int = 0) -> nn.Sequential:
    """Two 3x3 convolutions (1 -> 3 -> 4 channels) with ReLU and pooling, then Linear 16 -> 3."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()


def regression_data(kind: str = "mlp") -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random inputs and targets for :func:`mlp` (20 points) or :func:`cnn` (16 images)."""
    g = torch.Generator().manual_seed(1)
    if kind == "cnn":
        x = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)
        return x, torch.randn(16, 3, generator=g, dtype=torch.float64)
    return torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(
        20, 2, generator=g, dtype=torch.float64
    )
