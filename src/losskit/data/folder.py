"""A folder of images with one subfolder per class."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from losskit.data._images import decode, image_extensions, size_hw
from losskit.data.split import OpenSetSplit

EXPECTED = "a folder with one subfolder per class containing images"


def _check_dir(path, expected: str, arg: str = "data_dir") -> Path:
    if path is None:
        raise ValueError(f"{arg}: expected {expected}, got None")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{arg}: expected {expected}, got a path that does not exist: {p}")
    if not p.is_dir():
        raise NotADirectoryError(f"{arg}: expected {expected}, got a file: {p}")
    return p


def _visible(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if not c.name.startswith("."))


def scan_image_folder(path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for a folder with one subfolder per class."""
    root = _check_dir(path, EXPECTED)
    entries = _visible(root)
    if not entries:
        raise ValueError(f"data_dir: expected {EXPECTED}, got an empty folder {root}")
    subdirs = [e for e in entries if e.is_dir()]
    if not subdirs:
        raise ValueError(f"data_dir: expected {EXPECTED}, got a folder with no subfolders "
                         f"({len(entries)} files directly inside, e.g. {entries[0].name}; "
                         f"put each class's images in its own subfolder) {root}")
    exts = image_extensions()
    classes: dict[str, list[Path]] = {}
    for d in subdirs:
        files = [f for f in _visible(d) if f.is_file() and f.suffix.lower() in exts]
        if not files:
            raise ValueError(f"data_dir: expected {EXPECTED}, but class subfolder {d} holds no image "
                             f"files Pillow can read (extensions such as .png, .pgm, .jpg)")
        classes[d.name] = files
    if len(classes) < 2:
        raise ValueError(f"data_dir: expected at least 2 class subfolders (the open-set split puts whole "
                         f"classes in train and test), got 1 ({subdirs[0].name}) in {root}")
    return classes


def split_classes(classes: Sequence[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """The folder loader's open-set rule: sort class names, shuffle them with
    ``torch.Generator().manual_seed(seed)``, the first ``round(test_fraction * n)``
    (at least 1, at most n-1) are test classes, the rest train; both lists sorted."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction: expected a fraction in (0, 1) of the classes to hold out, got {test_fraction}")
    names = sorted(classes)
    n = len(names)
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    test = sorted(names[i] for i in perm[:n_test])
    train = sorted(names[i] for i in perm[n_test:])
    return train, test


class UnreadableImages(ValueError):
    """Image files that could not be decoded; ``files`` lists every one with its reason."""

    def __init__(self, files: list[tuple[str, str]]):
        self.files = files
        listing = "\n  ".join(why for _, why in files)
        super().__init__(f"{len(files)} image file{'s' if len(files) != 1 else ''} could not be read "
                         f"(pass skip_bad_images=True, or --skip-bad-images, to leave them out):\n  {listing}")


def load_files(files_by_class: dict[str, list], classes: list[str], hw, grayscale: bool,
               max_per_class: int | None, read=None, skipped: list[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the images of ``classes`` (label = position in ``classes``).

    Every file is tried; unreadable ones are an :class:`UnreadableImages` error listing them
    all, unless ``skipped`` (a list) is given: then they are left out and their names appended
    to it (a class may end with no image)."""
    xs, ys, bad = [], [], []
    for label, c in enumerate(classes):
        files = files_by_class[c]
        if max_per_class is not None:
            files = files[:max_per_class]
        for f in files:
            try:
                img = decode(read(f) if read else f, hw, grayscale)
            except ValueError as e:
                bad.append((str(f), str(e)))
                continue
            except KeyError as e:  # a zip member that is missing
                bad.append((str(f), f"could not read image {f}: missing ({e})"))
                continue
            xs.append(img)
            ys.append(label)
    if bad:
        if skipped is None:
            raise UnreadableImages(bad)
        skipped.extend(name for name, _ in bad)
    x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, 1 if grayscale else 3, *hw)
    return x, torch.tensor(ys, dtype=torch.int64)


def _check_max(max_per_class):
    if max_per_class is not None and (not isinstance(max_per_class, int) or max_per_class < 1):
        raise ValueError(f"max_per_class: expected None or a positive int, got {max_per_class!r}")


def load_image_folder(path: str | os.PathLike, image_size: int | Sequence[int] = 28, grayscale: bool = True,
                      test_fraction: float = 0.5, seed: int = 0, max_per_class: int | None = None,
                      skip_bad_images: bool = False) -> OpenSetSplit:
    """Images in ``path/<class name>/<image>`` (any format Pillow reads: PNG, PGM, JPEG, ...;
    grey or colour), resized to ``image_size`` and converted to 1 (``grayscale``) or 3 channels.

    Open-set split rule: whole classes are held out -- see :func:`split_classes`
    (``test_fraction`` of the classes, chosen by ``seed``).  Within a class, files are
    taken in sorted name order; ``max_per_class`` keeps the first ones.
    Hidden files/folders (starting with ``.``), files Pillow has no extension for, and anything
    nested deeper than ``path/<class>/<file>`` are ignored.  A file that cannot be decoded is
    an error listing every such file (:class:`UnreadableImages`); with ``skip_bad_images=True``
    they are left out and listed in the split's ``skipped``.
    """
    hw = size_hw(image_size)
    _check_max(max_per_class)
    files = scan_image_folder(path)
    train, test = split_classes(list(files), test_fraction, seed)
    skipped: list[str] | None = [] if skip_bad_images else None
    bad: list[tuple[str, str]] = []
    parts = []
    for classes in (train, test):  # both parts are read before any error, so it lists every bad file
        try:
            parts.append(load_files(files, classes, hw, grayscale, max_per_class, skipped=skipped))
        except UnreadableImages as e:
            bad += e.files
    if bad:
        raise UnreadableImages(bad)
    (tx, ty), (vx, vy) = parts
    return OpenSetSplit(f"folder:{path}", tx, ty, vx, vy, train, test, skipped=skipped or [])
