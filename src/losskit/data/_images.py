"""Image decoding shared by the folder and Omniglot loaders (Pillow)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading images needs Pillow: pip install 'losskit[bench]'") from e
    return Image


def image_extensions() -> set[str]:
    """Lower-case file extensions Pillow can open (``.png``, ``.pgm``, ``.jpg``, ...)."""
    return {ext.lower() for ext in _pil().registered_extensions()}


def size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        hw = (image_size, image_size)
    else:
        try:
            hw = tuple(int(s) for s in image_size)  # type: ignore[union-attr]
        except TypeError:
            hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size: expected a positive int or (height, width), got {image_size!r}")
    return hw  # type: ignore[return-value]


def decode(source: str | os.PathLike | bytes, hw: tuple[int, int], grayscale: bool) -> np.ndarray:
    """Decode one image into float32 ``[C, H, W]`` in ``[0, 1]`` (C = 1 grey, 3 colour).

    Palette, binary, alpha and CMYK images are converted by Pillow (alpha is
    dropped); 16-bit and float images (e.g. 16-bit PGM) are scaled by 65535
    when their maximum exceeds 255, else by 255.  Resizing is bilinear with
    Pillow's antialiasing when shrinking.
    """
    Image = _pil()
    name = source if not isinstance(source, bytes) else "<bytes>"
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
    except Exception as e:
        raise ValueError(f"could not read image {name}: {e}") from e
    size = (hw[1], hw[0])  # Pillow takes (width, height)
    if img.mode in _HIGH_DEPTH:
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if arr.size and float(arr.max()) > 255 else 255.0
        img = Image.fromarray(arr / scale, mode="F")
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        out = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[None]
        return out if grayscale else np.repeat(out, 3, axis=0)
    img = img.convert("L" if grayscale else "RGB")
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if grayscale else np.ascontiguousarray(arr.transpose(2, 0, 1))
