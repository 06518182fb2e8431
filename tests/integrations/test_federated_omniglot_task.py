"""The closed-set Omniglot set of the federated experiments
(losskit.integrations.flower.task.load_omniglot_classification) on a small zip the
test makes: which classes, which drawings train and test, the pixel convention."""

import io
import zipfile

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from losskit.integrations.flower.task import load_omniglot_classification  # noqa: E402

SPLIT = "images_background_small1"


def _png(value):
    buf = io.BytesIO()
    PIL.fromarray(np.full((105, 105), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_split(root, classes=6, drawings=4, as_zip=True):
    """Class ``c`` (``Alpha{c // 3}/character{c % 3 + 1:02d}``), drawing ``d`` (file
    ``{c:04d}_{d + 1:02d}.png``): grey value ``10 * c + d``, so each image names itself."""
    root.mkdir(parents=True, exist_ok=True)
    names = {}
    for c in range(classes):
        for d in range(drawings):
            names[f"{SPLIT}/Alpha{c // 3}/character{c % 3 + 1:02d}/{c:04d}_{d + 1:02d}.png"] = 10 * c + d
    if as_zip:
        with zipfile.ZipFile(root / f"{SPLIT}.zip", "w") as zf:
            for n, v in names.items():
                zf.writestr(n, _png(v))
    else:
        for n, v in names.items():
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            (root / n).write_bytes(_png(v))
    return root


def _ids(x):
    """Recover ``10 * c + d`` from the inverted, flattened image (constant pixels)."""
    return torch.round((1.0 - x[:, 0]) * 255).long()


@pytest.mark.parametrize("as_zip", [True, False])
def test_every_class_first_drawings_train_rest_test(tmp_path, as_zip):
    root = make_split(tmp_path / "omni", as_zip=as_zip)
    x, y, xt, yt = load_omniglot_classification(root, num_classes=None, image_size=8, train_per_class=3)
    assert x.shape == (18, 64) and xt.shape == (6, 64)
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(torch.bincount(y), torch.full((6,), 3)) and torch.equal(yt, torch.arange(6))
    # drawings _01.._03 train, _04 tests; label = position of the sorted class name
    assert torch.equal(_ids(x), torch.tensor([10 * c + d for c in range(6) for d in range(3)]))
    assert torch.equal(_ids(xt), torch.tensor([10 * c + 3 for c in range(6)]))
    assert torch.all(x[:, 1:] == x[:, :1])  # constant images stay constant after resizing


def test_class_subset_is_seeded_and_sorted(tmp_path):
    root = make_split(tmp_path / "omni")
    a = load_omniglot_classification(root, num_classes=3, image_size=8, train_per_class=3, class_seed=1)
    b = load_omniglot_classification(root, num_classes=3, image_size=8, train_per_class=3, class_seed=1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    pick = sorted(np.random.default_rng(1).choice(6, size=3, replace=False))
    assert torch.equal(_ids(a[2]) // 10, torch.tensor(pick))  # one test drawing per chosen class, in order
    assert torch.equal(a[3], torch.arange(3))


def test_bad_arguments_name_themselves(tmp_path):
    root = make_split(tmp_path / "omni")
    with pytest.raises(ValueError, match=r"num_classes: expected None or an int in \[2, 6\]"):
        load_omniglot_classification(root, num_classes=7)
    with pytest.raises(ValueError, match="train_per_class: expected fewer"):
        load_omniglot_classification(root, num_classes=None, train_per_class=4)
    with pytest.raises(ValueError, match="train_per_class: expected a positive int"):
        load_omniglot_classification(root, num_classes=None, train_per_class=0)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_omniglot_classification(tmp_path / "missing")
