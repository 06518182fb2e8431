"""The open-set split every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class OpenSetSplit:
    """Train and test images whose classes are disjoint (open-set protocol).

    ``train_y`` indexes ``train_classes`` and ``test_y`` indexes ``test_classes``
    (both re-indexed from 0).  Images are float32 ``[N, C, H, W]`` in ``[0, 1]``.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_classes: list[str]
    test_classes: list[str]
    #: image files the loader left out because they could not be read (``skip_bad_images``)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for part, x, y, classes in (
            ("train", self.train_x, self.train_y, self.train_classes),
            ("test", self.test_x, self.test_y, self.test_classes),
        ):
            if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype != torch.float32:
                raise ValueError(f"{part}_x: expected a float32 tensor [N, C, H, W], got "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
            if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
                raise ValueError(f"{part}_y: expected an int64 tensor [{x.shape[0]}], got "
                                 f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
                raise ValueError(f"{part}_y: expected values in [0, {len(classes) - 1}], "
                                 f"got [{int(y.min())}, {int(y.max())}]")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(f"train_x and test_x: expected the same [C, H, W], got "
                             f"{tuple(self.train_x.shape[1:])} and {tuple(self.test_x.shape[1:])}")
        shared = set(self.train_classes) & set(self.test_classes)
        if shared:
            raise ValueError(f"train_classes and test_classes must be disjoint (open set), "
                             f"both contain {sorted(shared)[:5]}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def num_train_classes(self) -> int:
        return len(self.train_classes)

    @property
    def num_test_classes(self) -> int:
        return len(self.test_classes)

    def __repr__(self) -> str:
        return (f"OpenSetSplit(name={self.name!r}, input_shape={self.input_shape}, "
                f"train={tuple(self.train_x.shape)} over {self.num_train_classes} classes, "
                f"test={tuple(self.test_x.shape)} over {self.num_test_classes} classes)")


#: the rotations :func:`with_rotation_classes` adds as new classes, in degrees (counter-clockwise)
ROTATIONS = (90, 180, 270)


def with_rotation_classes(split: OpenSetSplit) -> OpenSetSplit:
    """``split`` with every training class also rotated by 90, 180 and 270 degrees, each rotation a
    new class (``C`` classes become ``4C``; class ``c`` rotated by ``90 k`` degrees is class
    ``c + k C``, named ``"NAME rot90"`` ...), as Omniglot's few-shot training does (Santoro et al.
    2016; Vinyals et al. 2016; Snell et al. 2017, sec. 3.1).  The test images are unchanged."""
    c = len(split.train_classes)
    xs = [split.train_x] + [torch.rot90(split.train_x, r // 90, dims=(2, 3)) for r in ROTATIONS]
    ys = [split.train_y + i * c for i in range(len(ROTATIONS) + 1)]
    names = list(split.train_classes) + [f"{n} rot{r}" for r in ROTATIONS for n in split.train_classes]
    return OpenSetSplit(split.name, torch.cat(xs).contiguous(), torch.cat(ys), split.test_x, split.test_y,
                        names, list(split.test_classes), skipped=list(split.skipped))
