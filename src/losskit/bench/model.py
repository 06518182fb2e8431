"""The embedding networks the bench trains (the same one for every objective)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import importlib
from typing import Callable

__all__ = ["MLPEmbedder", "CNNEmbedder", "Conv4Embedder", "build_model", "choose_model", "check_model", "user_model", "MODELS"]

#: the networks ``--model`` chooses from (``auto``: :func:`choose_model`), besides ``MODULE:FUNCTION``
MODELS = ("auto", "mlp", "cnn", "cnn-large", "conv4")


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

    def __init__(self, in_channels: int, embedding_dim: int = 64, width: int = 32, large: bool = False):
        super().__init__()

        def block(cin: int, cout: int, pool: bool = True) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        if large:  # cnn-large: 64-128-128-256 channels, the last block unpooled
            widths = (2 * width, 4 * width, 4 * width, 8 * width)
            self.features = nn.Sequential(block(in_channels, widths[0]), block(widths[0], widths[1]),
                                          block(widths[1], widths[2]), block(widths[2], widths[3], pool=False))
        else:
            widths = (width, 2 * width, 2 * width)
            self.features = nn.Sequential(block(in_channels, widths[0]), block(widths[0], widths[1]),
                                          block(widths[1], widths[2]))
        self.head = nn.Linear(widths[-1], embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Conv4Embedder(nn.Module):
    """The prototypical networks' encoder (Snell, Swersky and Zemel, NeurIPS 2017, sec. 3.1; the
    4-block net of Vinyals et al. 2016): four blocks of a 3x3 convolution with ``width`` (64)
    filters, batch normalisation, ReLU and 2x2 max-pooling; the feature map flattened (at 28x28:
    64 x 1 x 1 = 64 values, the protonets' embedding), then a linear layer to ``embedding_dim``
    as in the bench's other networks (so every objective gets an unconstrained embedding).
    """

    def __init__(self, in_channels: int, input_hw: tuple[int, int], embedding_dim: int = 64, width: int = 64):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels, width), block(width, width), block(width, width),
                                      block(width, width), nn.Flatten())
        h, w = input_hw
        for _ in range(4):
            h, w = h // 2, w // 2
        self.head = nn.Linear(width * h * w, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def user_model(spec: str) -> Callable[..., nn.Module]:
    """The function ``MODULE:FUNCTION`` names (imported; a ValueError says what is wrong)."""
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ValueError(f"--model {spec!r}: expected one of {', '.join(MODELS)} or MODULE:FUNCTION")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - the user's module: any import failure is the message
        raise ValueError(f"--model {spec!r}: cannot import module {module!r} ({type(e).__name__}: {e})") from None
    fn = mod
    for part in func.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"--model {spec!r}: module {module!r} has no {func!r}")
    if not callable(fn):
        raise ValueError(f"--model {spec!r}: {func!r} is not callable")
    return fn


def check_model(spec: str) -> None:
    """A ValueError unless ``spec`` is one of :data:`MODELS` or an importable ``MODULE:FUNCTION``."""
    if spec in MODELS:
        return
    if ":" not in spec:
        raise ValueError(f"--model must be one of {', '.join(MODELS)} or MODULE:FUNCTION; got {spec!r}")
    user_model(spec)


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
        if kind in ("cnn", "cnn-large"):
            if min(h, w) < 8:
                raise ValueError(f"the CNN needs images of at least 8x8 pixels; got {h}x{w} (use --model mlp)")
            return CNNEmbedder(c, embedding_dim, large=kind == "cnn-large")
        if kind == "conv4":
            if min(h, w) < 16:
                raise ValueError(f"conv4 halves the image four times and needs at least 16x16 pixels; got {h}x{w} "
                                 "(use --model cnn or mlp)")
            return Conv4Embedder(c, (h, w), embedding_dim)
        if ":" in kind:
            net = user_model(kind)(tuple(input_shape), embedding_dim)
            if not isinstance(net, nn.Module):
                raise ValueError(f"--model {kind!r} returned {type(net).__name__}, expected an nn.Module")
            return net
    raise ValueError(f"model must be one of {', '.join(MODELS)} or MODULE:FUNCTION; got {kind!r}")
