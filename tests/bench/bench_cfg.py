"""A tiny bench configuration and a silent log, shared by the bench tests (imported by name: the bench
conftest puts this folder on ``sys.path``, since tests use --import-mode=importlib)."""

from __future__ import annotations

from losskit.bench.config import BenchConfig


def tiny_cfg(objectives, **kw) -> BenchConfig:
    base = dict(objectives=list(objectives), seeds=2, epochs=2, embedding_dim=8, batch_size=8, device="cpu")
    base.update(kw)
    return BenchConfig(**base)


def quiet(s) -> None:
    pass
