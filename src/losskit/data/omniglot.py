"""Omniglot (Lake et al., Science 2015) from its zip files or extracted folders."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from dataclasses import dataclass

import torch

from losskit.data._images import decode, image_extensions, size_hw
from losskit.data.folder import UnreadableImages, _check_dir, _check_max, load_files
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


def _scan_split(root: Path, split: str) -> dict:
    d, z = root / split, root / f"{split}.zip"
    if d.is_dir():
        return _scan_dir(d)
    if z.is_file():
        return _scan_zip(z, split)
    listing = sorted(p.name for p in root.iterdir())[:10]
    raise FileNotFoundError(f"data_dir: expected {EXPECTED}; found neither {split}.zip nor {split}/ in {root} "
                            f"(it holds: {listing or 'nothing'})")


def _read_split(root: Path, split: str, files: dict, classes: list[str], hw, max_per_class, skipped):
    d, z = root / split, root / f"{split}.zip"
    if d.is_dir():
        return load_files(files, classes, hw, True, max_per_class, skipped=skipped)
    with zipfile.ZipFile(z) as zf:
        return load_files(files, classes, hw, True, max_per_class, read=zf.read, skipped=skipped)


def _load_split(root: Path, split: str, hw, max_per_class, exclude=frozenset(), skipped=None):
    files = _scan_split(root, split)
    files = {c: f for c, f in files.items() if c not in exclude}
    if not files:
        raise ValueError(f"test_split: every class of {split!r} is also a class of the train split; "
                         f"expected a split with other classes (open set)")
    return files, _read_split(root, split, files, list(files), hw, max_per_class, skipped)


def load_omniglot(path: str | os.PathLike, image_size: int | Sequence[int] = 28,
                  train_split: str = "images_background_small1", test_split: str = "images_background_small2",
                  max_per_class: int | None = None, split_seed: int | None = None,
                  skip_bad_images: bool = False) -> OpenSetSplit:
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

    ``split_seed`` (an int) instead pools the classes of both splits and holds out whole
    alphabets, chosen by the seed (the alphabets are shuffled with
    ``torch.Generator().manual_seed(split_seed)`` and taken until at least 44% of the classes,
    the default split's share, are held out).  Unreadable files are an error listing them all
    unless ``skip_bad_images`` (then they are left out and listed in ``skipped``).
    """
    hw = size_hw(image_size)
    _check_max(max_per_class)
    if train_split == test_split:
        raise ValueError(f"train_split and test_split: expected two different Omniglot splits, both are {train_split!r}")
    root = _check_dir(path, EXPECTED)
    skipped: list[str] | None = [] if skip_bad_images else None
    if split_seed is not None:
        return _pooled(root, (train_split, test_split), hw, max_per_class, int(split_seed), skipped)
    bad = []
    try:
        train_files, (tx, ty) = _load_split(root, train_split, hw, max_per_class, skipped=skipped)
    except UnreadableImages as e:
        bad += e.files
        train_files, (tx, ty) = _load_split(root, train_split, hw, max_per_class, skipped=[])
    try:
        test_files, (vx, vy) = _load_split(root, test_split, hw, max_per_class, exclude=set(train_files),
                                           skipped=skipped)
    except UnreadableImages as e:
        bad += e.files
        test_files = {}
    if bad:
        raise UnreadableImages(bad)
    return OpenSetSplit("omniglot", tx, ty, vx, vy, list(train_files), list(test_files), skipped=skipped or [])


def _pooled(root: Path, splits: tuple[str, ...], hw, max_per_class, seed: int, skipped) -> OpenSetSplit:
    where: dict[str, tuple[str, list]] = {}  # class -> (split, files); a class in both splits is read once
    for split in splits:
        for c, f in _scan_split(root, split).items():
            where.setdefault(c, (split, f))
    alphabets = sorted({c.split("/")[0] for c in where})
    if len(alphabets) < 2:
        raise ValueError(f"split_seed: the splits {list(splits)} hold one alphabet; nothing to hold out")
    order = [alphabets[i] for i in torch.randperm(len(alphabets), generator=torch.Generator().manual_seed(seed))]
    held: set[str] = set()
    for a in order[:-1]:
        if sum(1 for c in where if c.split("/")[0] in held) >= 0.44 * len(where):
            break
        held.add(a)
    test = [c for c in sorted(where) if c.split("/")[0] in held]
    train = [c for c in sorted(where) if c.split("/")[0] not in held]
    bad: list = []

    def read(classes):
        xs, ys = [], []
        for split in splits:
            mine = [c for c in classes if where[c][0] == split]
            if not mine:
                continue
            files = {c: where[c][1] for c in mine}
            try:
                x, y = _read_split(root, split, files, mine, hw, max_per_class, skipped)
            except UnreadableImages as e:
                bad.extend(e.files)
                continue
            index = {c: classes.index(c) for c in mine}
            xs.append(x)
            ys.append(torch.tensor([index[mine[int(i)]] for i in y], dtype=torch.int64))
        if not xs:
            return torch.zeros(0, 1, *hw), torch.zeros(0, dtype=torch.int64)
        return torch.cat(xs), torch.cat(ys)

    tx, ty = read(train)
    vx, vy = read(test)
    if bad:
        raise UnreadableImages(bad)
    return OpenSetSplit(f"omniglot (split seed {seed})", tx, ty, vx, vy, train, test, skipped=skipped or [])


# ---------------------------------------------------------------- the 20-way one-shot task

#: error rates of the 20-way one-shot classification task on these 20 runs (Lake, Salakhutdinov and
#: Tenenbaum, Science 2015, fig. 3 / table S1; Koch, Zemel and Salakhutdinov, ICML deep learning workshop 2015,
#: table 2: Siamese convnet 92.0% correct)
PUBLISHED_ONESHOT = {"people": 0.045, "Bayesian program learning": 0.033, "Siamese convnet (Koch et al. 2015)": 0.08}


@dataclass
class OneShotRun:
    """One run of the 20-way one-shot task: 20 training images (one per class) and 20 test
    images; ``test_y[i]`` is the position in ``train_x`` of test image ``i``'s class."""

    name: str
    train_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


ONESHOT_EXPECTED = "all_runs.zip or an extracted all_runs/ folder (runNN/class_labels.txt, runNN/training, runNN/test)"


def load_oneshot_runs(path: str | os.PathLike, image_size: int | Sequence[int] = 28) -> list[OneShotRun]:
    """The 20 runs of Omniglot's 20-way one-shot task (``all_runs.zip`` of Lake et al.'s
    repository, or its extracted ``all_runs/`` folder, in ``path``).  Each run's
    ``class_labels.txt`` pairs every test image with its training image."""
    hw = size_hw(image_size)
    root = _check_dir(path, ONESHOT_EXPECTED)
    folder, z = root / "all_runs", root / "all_runs.zip"
    if folder.is_dir():
        def read(name: str) -> bytes:
            return (folder / name).read_bytes()
        names = [str(p.relative_to(folder)).replace(os.sep, "/") for p in folder.rglob("*") if p.is_file()]
        zf = None
    elif z.is_file():
        try:
            zf = zipfile.ZipFile(z)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"data_dir: {z} is not a readable zip file ({e}); expected {ONESHOT_EXPECTED}") from e
        names = zf.namelist()
        read = zf.read
    else:
        raise FileNotFoundError(f"data_dir: expected {ONESHOT_EXPECTED} in {root}")
    try:
        prefix = ""
        labels = sorted(n for n in names if n.endswith("/class_labels.txt"))
        if labels and labels[0].count("/") == 2:  # all_runs/runNN/class_labels.txt
            prefix = labels[0].split("/")[0] + "/"
        runs = []
        for lab in labels:
            run = lab[len(prefix):].split("/")[0]
            pairs = [line.split() for line in read(lab).decode().splitlines() if line.strip()]
            train_names = sorted({t for _, t in pairs})
            index = {t: i for i, t in enumerate(train_names)}
            train_x = torch.stack([torch.from_numpy(decode(read(prefix + t), hw, True)) for t in train_names])
            test_x = torch.stack([torch.from_numpy(decode(read(prefix + q), hw, True)) for q, _ in pairs])
            test_y = torch.tensor([index[t] for _, t in pairs], dtype=torch.int64)
            runs.append(OneShotRun(run, train_x, test_x, test_y))
    finally:
        if zf is not None:
            zf.close()
    if not runs:
        raise ValueError(f"data_dir: no runNN/class_labels.txt found; expected {ONESHOT_EXPECTED}")
    return runs


#: test-time views ``oneshot_error`` can average: ``"none"`` (the image alone) or ``"shift"``
#: (the image moved by every offset in {-1, 0, 1} pixels in each direction: 9 views)
ONESHOT_TTA = ("none", "shift")


def shifted_views(x: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """``x`` (``[N, C, H, W]``) moved by every offset ``(dy, dx)`` in ``{-radius..radius}^2``:
    ``[(2 radius + 1)^2, N, C, H, W]``, view ``v`` = ``(dy, dx)`` in row-major order; the pixels that
    come in from outside repeat the nearest edge pixel (Omniglot's white background)."""
    if x.dim() != 4:
        raise ValueError(f"x: expected [N, C, H, W] images; got shape {tuple(x.shape)}")
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"radius: expected an int >= 0; got {radius!r}")
    h, w = x.shape[-2:]
    r = radius
    pad = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate") if r else x
    # view (dy, dx) shows at (i, j) the pixel (i - dy, j - dx) of x: the content moves by (dy, dx)
    return torch.stack([pad[..., r - dy:r - dy + h, r - dx:r - dx + w]
                        for dy in range(-r, r + 1) for dx in range(-r, r + 1)])


def tta_embed(embed, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """``embed(x)`` L2-normalised; with ``tta="shift"`` the mean of the normalised embeddings of the
    9 one-pixel shifts of :func:`shifted_views` (test-time augmentation: no label is used)."""
    if tta not in ONESHOT_TTA:
        raise ValueError(f"tta: expected one of {', '.join(ONESHOT_TTA)}; got {tta!r}")
    if tta == "none":
        return torch.nn.functional.normalize(embed(x).float(), dim=1)
    views = shifted_views(x, 1)
    z = embed(views.flatten(0, 1)).float()
    return torch.nn.functional.normalize(z, dim=1).view(len(views), len(x), -1).mean(0)


@torch.no_grad()
def oneshot_error(embed, runs: list[OneShotRun], tta: str = "none") -> dict[str, float]:
    """20-way one-shot error: each test image takes the class of its nearest training image by
    cosine similarity of ``embed(images)`` (a function of a ``[N, 1, H, W]`` batch); returns
    the mean error over the runs and its standard error.  ``tta="shift"`` compares the mean
    normalised embedding of each image's 9 one-pixel shifts instead (:func:`tta_embed`)."""
    if tta not in ONESHOT_TTA:
        raise ValueError(f"tta: expected one of {', '.join(ONESHOT_TTA)}; got {tta!r}")
    errors = []
    for r in runs:
        a = torch.nn.functional.normalize(tta_embed(embed, r.train_x, tta), dim=1)
        b = torch.nn.functional.normalize(tta_embed(embed, r.test_x, tta), dim=1)
        pred = (b @ a.T).argmax(1).cpu()
        errors.append(float((pred != r.test_y.cpu()).float().mean()))
    e = torch.tensor(errors, dtype=torch.float64)
    return {"oneshot_error": float(e.mean()),
            "oneshot_error_se": float(e.std() / len(errors) ** 0.5) if len(errors) > 1 else float("nan")}


def train_on_background(split: OpenSetSplit, runs: list[OneShotRun]) -> OpenSetSplit:
    """Every class of ``split`` (its train and test classes pooled) trains; the held-out set is the
    one-shot runs' images: run ``r``'s 20 training images and 20 test images, class
    ``"runNN/classMM"`` (``train_x[i]`` and the test images whose ``test_y`` is ``i``).  For the
    one-shot task every background character may train (the runs are drawn from the 20
    evaluation alphabets, none of which is in a background split)."""
    c = len(split.train_classes)
    train_x = torch.cat([split.train_x, split.test_x])
    train_y = torch.cat([split.train_y, split.test_y + c])
    xs, ys, names = [], [], []
    for r in runs:
        base = len(names)
        names += [f"{r.name}/class{i + 1:02d}" for i in range(len(r.train_x))]
        xs += [r.train_x, r.test_x]
        ys += [torch.arange(len(r.train_x)) + base, r.test_y + base]
    return OpenSetSplit(f"{split.name}, all background classes; held out: the {len(runs)} one-shot runs",
                        train_x, train_y, torch.cat(xs), torch.cat(ys).to(torch.int64),
                        list(split.train_classes) + list(split.test_classes), names, skipped=list(split.skipped))
