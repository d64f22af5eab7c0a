"""The model every replica trains: the original tool's SimpleNN."""

from __future__ import annotations

import torch
from torch import nn


class SimpleNN(nn.Module):
    """784 -> 256 -> ReLU -> LayerNorm -> 4*hidden -> ReLU -> LayerNorm -> 10."""

    def __init__(self, input_dim: int = 784, hidden: int = 128, out: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(input_dim, 256),
            nn.ReLU(),
            nn.LayerNorm(256),
            nn.Linear(256, 4 * hidden),
            nn.ReLU(),
            nn.LayerNorm(4 * hidden),
            nn.Linear(4 * hidden, out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(model_type: str, input_dim: int, hidden: int, out: int, seed: int) -> nn.Module:
    """Build the configured model with seeded initial weights."""
    if model_type != "SimpleNN":
        raise ValueError(f"unknown model type {model_type!r}")
    torch.manual_seed(seed)
    return SimpleNN(input_dim, hidden, out)
