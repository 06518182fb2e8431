"""scikit-learn's bundled 8x8 digits as an open-set split."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from losskit.data.split import OpenSetSplit


def load_digits(train_classes: Iterable[int] = (0, 1, 2, 3, 4)) -> OpenSetSplit:
    """scikit-learn's digits (1,797 images of 8x8, grey, values 0..16 scaled by 1/16).

    Split rule: the digits in ``train_classes`` train, every other digit tests
    (default 0-4 train, 5-9 test).  Labels are re-indexed in ascending digit order.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install 'losskit[bench]'") from e
    train = sorted({int(c) for c in train_classes})
    bad = [c for c in train if not 0 <= c <= 9]
    if bad or not train:
        raise ValueError(f"train_classes: expected a non-empty subset of digits 0..9, got {list(train_classes)}")
    test = [c for c in range(10) if c not in train]
    if not test:
        raise ValueError("train_classes: expected at most 9 of the 10 digits (the rest are the test classes), got all 10")
    d = _sk_load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))

    def part(classes: list[int]):
        mask = torch.isin(y, torch.tensor(classes))
        remap = torch.full((10,), -1, dtype=torch.int64)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        return x[mask].contiguous(), remap[y[mask]]

    tx, ty = part(train)
    vx, vy = part(test)
    return OpenSetSplit("digits", tx, ty, vx, vy, [str(c) for c in train], [str(c) for c in test])
