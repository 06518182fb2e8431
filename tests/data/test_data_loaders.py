import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from losskit.data import OpenSetSplit, load_dataset, load_digits, load_image_folder, load_omniglot

def _find_omniglot():
    """../shared/datasets/omniglot relative to the project (or any parent folder)."""
    import os
    from pathlib import Path
    if os.environ.get("LOSSKIT_OMNIGLOT"):
        return Path(os.environ["LOSSKIT_OMNIGLOT"])
    for parent in Path(__file__).resolve().parents:
        cand = parent / "shared" / "datasets" / "omniglot"
        if cand.is_dir():
            return cand
    return Path("shared/datasets/omniglot")


OMNI = _find_omniglot()


def _check_split(s: OpenSetSplit, c: int):
    assert s.train_x.dtype == torch.float32 and s.test_x.dtype == torch.float32
    assert s.train_y.dtype == torch.int64 and s.test_y.dtype == torch.int64
    assert s.train_x.shape[1] == c and s.input_shape == tuple(s.train_x.shape[1:])
    for x in (s.train_x, s.test_x):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(s.train_classes).isdisjoint(s.test_classes)
    assert sorted(s.train_y.unique().tolist()) == list(range(s.num_train_classes))
    assert sorted(s.test_y.unique().tolist()) == list(range(s.num_test_classes))


# ------------------------------------------------------------------ digits

def test_digits_default_split():
    s = load_digits()
    _check_split(s, 1)
    assert s.input_shape == (1, 8, 8)
    assert s.train_classes == ["0", "1", "2", "3", "4"] and s.test_classes == ["5", "6", "7", "8", "9"]
    from sklearn.datasets import load_digits as sk
    d = sk()
    assert s.train_x.shape[0] == int((d.target < 5).sum())
    # first test image is the first digit >= 5, scaled by 1/16, label re-indexed
    j = int(np.argmax(d.target >= 5))
    assert torch.allclose(s.test_x[0, 0], torch.tensor(d.images[j] / 16.0, dtype=torch.float32))
    assert int(s.test_y[0]) == d.target[j] - 5


def test_digits_custom_and_bad():
    s = load_digits(train_classes=(9, 1, 3))
    assert s.train_classes == ["1", "3", "9"] and len(s.test_classes) == 7
    _check_split(s, 1)
    with pytest.raises(ValueError, match="train_classes"):
        load_digits(train_classes=(1, 12))
    with pytest.raises(ValueError, match="train_classes"):
        load_digits(train_classes=range(10))


# ------------------------------------------------------------------ folders

def _write(path, arr, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def make_folder(root, n_classes=4, per_class=3, size=(10, 12)):
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        for i in range(per_class):
            if (c + i) % 3 == 0:  # grey PGM
                _write(root / f"class{c}" / f"img{i}.pgm", rng.integers(0, 256, size, dtype=np.uint8), "PPM")
            elif (c + i) % 3 == 1:  # RGB PNG
                _write(root / f"class{c}" / f"img{i}.png", rng.integers(0, 256, size + (3,), dtype=np.uint8), "PNG")
            else:  # grey PNG
                _write(root / f"class{c}" / f"img{i}.png", rng.integers(0, 256, size, dtype=np.uint8), "PNG")
    return root


def test_folder_grey_and_colour(tmp_path):
    root = make_folder(tmp_path / "data")
    s = load_image_folder(root, image_size=6)
    _check_split(s, 1)
    assert s.input_shape == (1, 6, 6)
    assert s.num_train_classes == 2 and s.num_test_classes == 2
    assert s.train_x.shape[0] == 6 and s.test_x.shape[0] == 6
    assert s.name == f"folder:{root}"
    c = load_image_folder(root, image_size=(5, 7), grayscale=False)
    _check_split(c, 3)
    assert c.input_shape == (3, 5, 7)
    assert c.train_classes == s.train_classes  # same seed, same split


def test_folder_pixel_values_and_pgm(tmp_path):
    root = tmp_path / "d"
    _write(root / "a" / "x.pgm", np.full((4, 4), 51, np.uint8), "PPM")
    _write(root / "b" / "y.png", np.full((4, 4, 3), [255, 0, 0], np.uint8), "PNG")
    s = load_image_folder(root, image_size=4, test_fraction=0.5)
    xs = {s.train_classes[0]: s.train_x[0], s.test_classes[0]: s.test_x[0]}
    assert torch.allclose(xs["a"], torch.full((1, 4, 4), 51 / 255))
    red_grey = np.asarray(Image.new("RGB", (1, 1), (255, 0, 0)).convert("L"))[0, 0] / 255
    assert torch.allclose(xs["b"], torch.full((1, 4, 4), float(red_grey)))
    c = load_image_folder(root, image_size=4, grayscale=False)
    xc = {c.train_classes[0]: c.train_x[0], c.test_classes[0]: c.test_x[0]}
    assert torch.allclose(xc["b"][0], torch.ones(4, 4)) and torch.allclose(xc["b"][1], torch.zeros(4, 4))
    assert torch.allclose(xc["a"], torch.full((3, 4, 4), 51 / 255))


def test_folder_16bit_pgm(tmp_path):
    root = tmp_path / "d"
    for c in "ab":
        p = root / c / "x.pgm"
        p.parent.mkdir(parents=True)
        # binary 16-bit PGM written by hand: maxval 65535, value 32768 everywhere
        p.write_bytes(b"P5\n3 2\n65535\n" + (32768).to_bytes(2, "big") * 6)
    s = load_image_folder(root, image_size=(2, 3))
    assert torch.allclose(s.train_x, torch.full((1, 1, 2, 3), 32768 / 65535), atol=1e-4)


def test_folder_split_rule_seed_and_fraction(tmp_path):
    root = make_folder(tmp_path / "d", n_classes=10, per_class=2, size=(4, 4))
    a = load_image_folder(root, image_size=4, seed=0, test_fraction=0.3)
    b = load_image_folder(root, image_size=4, seed=0, test_fraction=0.3)
    c = load_image_folder(root, image_size=4, seed=1, test_fraction=0.3)
    assert a.test_classes == b.test_classes and len(a.test_classes) == 3 and len(a.train_classes) == 7
    assert sorted(a.train_classes + a.test_classes) == sorted(f"class{i}" for i in range(10))
    assert a.test_classes != c.test_classes or a.train_classes != c.train_classes
    m = load_image_folder(root, image_size=4, max_per_class=1)
    assert m.train_x.shape[0] == m.num_train_classes
    with pytest.raises(ValueError, match="test_fraction"):
        load_image_folder(root, test_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(root, image_size=0)
    with pytest.raises(ValueError, match="max_per_class"):
        load_image_folder(root, max_per_class=0)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir: expected a folder with one subfolder per class.*does not exist"):
        load_image_folder(tmp_path / "nope")
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="got a file"):
        load_image_folder(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="got an empty folder"):
        load_image_folder(tmp_path / "empty")
    flat = tmp_path / "flat"
    _write(flat / "a.png", np.zeros((3, 3), np.uint8), "PNG")
    _write(flat.parent / "flat" / "b.png", np.zeros((3, 3), np.uint8), "PNG")
    with pytest.raises(ValueError, match="no subfolders"):
        load_image_folder(flat)
    one = tmp_path / "one"
    _write(one / "only" / "a.png", np.zeros((3, 3), np.uint8), "PNG")
    with pytest.raises(ValueError, match="at least 2 class"):
        load_image_folder(one)
    noimg = tmp_path / "noimg"
    _write(noimg / "a" / "a.png", np.zeros((3, 3), np.uint8), "PNG")
    (noimg / "b").mkdir()
    (noimg / "b" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="holds no image"):
        load_image_folder(noimg)
    bad = tmp_path / "bad"
    _write(bad / "a" / "a.png", np.zeros((3, 3), np.uint8), "PNG")
    (bad / "b").mkdir()
    (bad / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not read image.*broken.png"):
        load_image_folder(bad)


# ------------------------------------------------------------------ omniglot

def _png_bytes(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((105, 105), value, np.uint8)).convert("1").save(buf, format="PNG")
    return buf.getvalue()


LAYOUT = {
    "images_background_small1": {"Alpha/character01": 0, "Alpha/character02": 255, "Shared/character01": 0},
    "images_background_small2": {"Beta/character01": 255, "Beta/character02": 0, "Shared/character01": 0},
}


def make_omniglot(root, as_zip=True, per_class=3):
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in LAYOUT.items():
        if as_zip:
            with zipfile.ZipFile(root / f"{split}.zip", "w") as zf:
                zf.writestr(f"{split}/", "")
                for c, v in classes.items():
                    for i in range(per_class):
                        zf.writestr(f"{split}/{c}/{i:04d}_{i:02d}.png", _png_bytes(v))
        else:
            for c, v in classes.items():
                for i in range(per_class):
                    p = root / split / c / f"{i:04d}_{i:02d}.png"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(_png_bytes(v))
    return root


@pytest.mark.parametrize("as_zip", [True, False])
def test_omniglot_zip_and_folder(tmp_path, as_zip):
    root = make_omniglot(tmp_path / "omni", as_zip=as_zip)
    s = load_omniglot(root, image_size=14)
    _check_split(s, 1)
    assert s.input_shape == (1, 14, 14)
    assert s.train_classes == ["Alpha/character01", "Alpha/character02", "Shared/character01"]
    # the class shared by both splits is dropped from the test side (open set)
    assert s.test_classes == ["Beta/character01", "Beta/character02"]
    assert s.train_x.shape[0] == 9 and s.test_x.shape[0] == 6
    assert torch.all(s.train_x[s.train_y == 1] == 1.0) and torch.all(s.train_x[s.train_y == 0] == 0.0)
    m = load_omniglot(root, image_size=14, max_per_class=2)
    assert m.train_x.shape[0] == 6


def test_omniglot_ignores_macos_metadata(tmp_path):
    root = make_omniglot(tmp_path / "omni")
    z = root / "images_background_small1.zip"
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("__MACOSX/images_background_small1/Alpha/character01/._0000_00.png", b"junk")
        zf.writestr("images_background_small1/Alpha/character01/._0000_00.png", b"junk")
    s = load_omniglot(root, image_size=14)
    assert s.train_x.shape[0] == 9


def test_omniglot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_omniglot(tmp_path / "none")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="images_background_small1.zip"):
        load_omniglot(tmp_path / "e")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "images_background_small1.zip").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable zip"):
        load_omniglot(tmp_path / "z")
    root = make_omniglot(tmp_path / "o")
    with pytest.raises(ValueError, match="two different"):
        load_omniglot(root, train_split="images_background_small1", test_split="images_background_small1")


def test_load_dataset_dispatch(tmp_path):
    assert load_dataset("digits").name == "digits"
    root = make_folder(tmp_path / "d", size=(4, 4))
    assert load_dataset("folder", str(root), image_size=4).input_shape == (1, 4, 4)
    with pytest.raises(ValueError, match="did you mean 'digits'"):
        load_dataset("digit")
    with pytest.raises(ValueError, match="data_dir.*needs data_dir"):
        load_dataset("folder")
    with pytest.raises(ValueError, match="takes no data_dir"):
        load_dataset("digits", str(root))
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_dataset("digits", image_size=8)


def test_split_validation():
    x = torch.zeros(2, 1, 3, 3)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="disjoint"):
        OpenSetSplit("t", x, y, x, y, ["a", "b"], ["b", "c"])
    with pytest.raises(ValueError, match="train_y"):
        OpenSetSplit("t", x, torch.tensor([0, 2]), x, y, ["a", "b"], ["c", "d"])


@pytest.mark.slow
def test_real_omniglot():
    if not (OMNI / "images_background_small1.zip").exists():
        pytest.skip(f"real Omniglot not found at {OMNI}")
    import time
    t = time.perf_counter()
    s = load_omniglot(OMNI)
    assert time.perf_counter() - t < 60
    _check_split(s, 1)
    assert s.num_train_classes == 136 and s.num_test_classes == 106
    assert s.train_x.shape == (2720, 1, 28, 28) and s.test_x.shape == (2120, 1, 28, 28)
