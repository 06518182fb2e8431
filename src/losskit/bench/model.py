"""The embedding networks the bench trains (the same one for every objective)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLPEmbedder", "CNNEmbedder", "build_model", "choose_model", "MODELS"]

#: the networks ``--model`` chooses from (``auto``: :func:`choose_model`)
MODELS = ("auto", "mlp", "cnn")


class MLPEmbedder(nn.Module):
    """Flatten -> 2 hidden layers (ReLU) -> linear embedding.  For tiny images (8x8 digits)."""

    def __init__(self, in_features: int, embedding_dim: int = 64, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, embedding_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNNEmbedder(nn.Module):
    """Three conv blocks (conv-BN-ReLU-pool), global average pool, linear embedding.

    For 28x28-ish images (Omniglot, image folders); channels 32-64-64.
    """

    def __init__(self, in_channels: int, embedding_dim: int = 64, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width), block(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def choose_model(kind: str, input_shape: tuple[int, int, int]) -> str:
    """``auto``: an MLP for images of at most 16x16 pixels, a CNN above."""
    if kind != "auto":
        return kind
    _, h, w = input_shape
    return "mlp" if h * w <= 256 else "cnn"


def build_model(kind: str, input_shape: tuple[int, int, int], embedding_dim: int, seed: int) -> nn.Module:
    """The embedding network, initialised from ``seed`` alone (same weights for every objective)."""
    c, h, w = input_shape
    kind = choose_model(kind, input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "mlp":
            return MLPEmbedder(c * h * w, embedding_dim)
        if kind == "cnn":
            if min(h, w) < 8:
                raise ValueError(f"the CNN needs images of at least 8x8 pixels; got {h}x{w} (use --model mlp)")
            return CNNEmbedder(c, embedding_dim)
    raise ValueError(f"model must be auto, mlp or cnn; got {kind!r}")
