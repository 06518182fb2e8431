"""Omniglot (Lake et al., Science 2015) from its zip files or extracted folders."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from losskit.data._images import image_extensions, size_hw
from losskit.data.folder import _check_dir, _check_max, load_files
from losskit.data.split import OpenSetSplit

EXPECTED = ("a folder holding Omniglot splits as SPLIT.zip or extracted SPLIT/ folders "
            "(layout SPLIT/ALPHABET/characterNN/*.png)")


def _scan_zip(zpath: Path, split: str) -> dict[str, list[str]]:
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"data_dir: {zpath} is not a readable zip file ({e}); expected {EXPECTED}") from e
    exts = image_extensions()
    classes: dict[str, list[str]] = {}
    with zf:
        for name in zf.namelist():
            p = PurePosixPath(name)
            if name.endswith("/") or p.suffix.lower() not in exts or p.name.startswith("."):
                continue
            parts = p.parts
            if parts and parts[0] == split:
                parts = parts[1:]
            if len(parts) != 3:
                continue
            classes.setdefault(f"{parts[0]}/{parts[1]}", []).append(name)
    if not classes:
        raise ValueError(f"data_dir: {zpath} holds no images in the layout [{split}/]ALPHABET/CHARACTER/IMAGE; "
                         f"expected {EXPECTED}")
    return {c: sorted(v) for c, v in sorted(classes.items())}


def _scan_dir(d: Path) -> dict[str, list[Path]]:
    exts = image_extensions()
    classes: dict[str, list[Path]] = {}
    for alphabet in sorted(a for a in d.iterdir() if a.is_dir() and not a.name.startswith(".")):
        for char in sorted(c for c in alphabet.iterdir() if c.is_dir() and not c.name.startswith(".")):
            files = sorted(f for f in char.iterdir()
                           if f.is_file() and f.suffix.lower() in exts and not f.name.startswith("."))
            if files:
                classes[f"{alphabet.name}/{char.name}"] = files
    if not classes:
        raise ValueError(f"data_dir: {d} holds no images in the layout ALPHABET/CHARACTER/IMAGE; expected {EXPECTED}")
    return classes


def _load_split(root: Path, split: str, hw, max_per_class, exclude=frozenset()):
    d, z = root / split, root / f"{split}.zip"
    if d.is_dir() or z.is_file():
        files = _scan_dir(d) if d.is_dir() else _scan_zip(z, split)
        files = {c: f for c, f in files.items() if c not in exclude}
        if not files:
            raise ValueError(f"test_split: every class of {split!r} is also a class of the train split; "
                             f"expected a split with other classes (open set)")
    if d.is_dir():
        return files, load_files(files, list(files), hw, True, max_per_class)
    if z.is_file():
        with zipfile.ZipFile(z) as zf:
            return files, load_files(files, list(files), hw, True, max_per_class, read=zf.read)
    listing = sorted(p.name for p in root.iterdir())[:10]
    raise FileNotFoundError(f"data_dir: expected {EXPECTED}; found neither {split}.zip nor {split}/ in {root} "
                            f"(it holds: {listing or 'nothing'})")


def load_omniglot(path: str | os.PathLike, image_size: int | Sequence[int] = 28,
                  train_split: str = "images_background_small1", test_split: str = "images_background_small2",
                  max_per_class: int | None = None) -> OpenSetSplit:
    """Omniglot characters, grey, ``[N, 1, H, W]`` in ``[0, 1]`` as stored (white
    background = 1, strokes = 0), resized from 105x105 to ``image_size``.

    ``path`` is a folder holding ``<split>.zip`` or an extracted ``<split>/`` folder
    for each split (the folder wins when both exist).  Class name = ``ALPHABET/characterNN``.
    Open-set split rule: every class of ``train_split`` trains; every class of
    ``test_split`` that is not also a class of ``train_split`` tests.  The two
    "small" background splits share two alphabets (Greek and Latin: 50 classes,
    1,000 byte-identical images), so with the defaults the test classes are the
    106 characters of Japanese (katakana), Sanskrit and Tagalog; train has 136.
    Images are taken in sorted file-name order; ``max_per_class`` keeps the first ones.
    """
    hw = size_hw(image_size)
    _check_max(max_per_class)
    if train_split == test_split:
        raise ValueError(f"train_split and test_split: expected two different Omniglot splits, both are {train_split!r}")
    root = _check_dir(path, EXPECTED)
    train_files, (tx, ty) = _load_split(root, train_split, hw, max_per_class)
    test_files, (vx, vy) = _load_split(root, test_split, hw, max_per_class, exclude=set(train_files))
    return OpenSetSplit("omniglot", tx, ty, vx, vy, list(train_files), list(test_files))
