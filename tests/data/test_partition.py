import numpy as np
import pytest
import torch

from losskit.data.partition import (classes_per_client_partition, dirichlet_partition, partition_counts,
                                    quantity_skew_partition)

Y = np.repeat(np.arange(10), 60)  # 600 samples, 10 classes
Y = np.random.default_rng(0).permutation(Y)


def _is_partition(parts, n, complete=True):
    cat = np.concatenate(parts)
    assert len(set(cat.tolist())) == cat.size  # disjoint
    assert cat.min() >= 0 and cat.max() < n
    if complete:
        assert cat.size == n


def _skew(counts):
    """Mean over clients of the largest class share."""
    sizes = counts.sum(1, keepdims=True)
    return float((counts.max(1, keepdims=True) / np.maximum(sizes, 1)).mean())


def test_dirichlet_seeded_complete_and_skew_grows_as_alpha_falls():
    a = dirichlet_partition(Y, 10, 0.5, seed=3)
    b = dirichlet_partition(torch.as_tensor(Y), 10, 0.5, seed=3)  # tensors work too
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, dirichlet_partition(Y, 10, 0.5, seed=4)))
    _is_partition(a, Y.size)
    assert min(p.size for p in dirichlet_partition(Y, 10, 0.1, seed=0, min_size=10)) >= 10
    skews = [np.mean([_skew(partition_counts(Y, dirichlet_partition(Y, 10, al, seed=s))) for s in range(3)])
             for al in (0.1, 1.0, 100.0)]
    assert skews[0] > skews[1] > skews[2]
    assert skews[2] < 0.25  # alpha 100: near IID (one class of 10 would be 0.1)


def test_classes_per_client():
    parts = classes_per_client_partition(Y, 20, 2, seed=1)
    counts = partition_counts(Y, parts)
    assert ((counts > 0).sum(1) == 2).all()  # exactly k classes each
    assert (counts.sum(0) == 60).all()  # every class handed out, in full
    _is_partition(parts, Y.size)
    # fewer clients x k than classes: only the dealt classes are used
    few = classes_per_client_partition(Y, 2, 3, seed=0)
    assert partition_counts(Y, few).astype(bool).sum() == 6
    _is_partition(few, Y.size, complete=False)
    with pytest.raises(ValueError, match="classes_per_client"):
        classes_per_client_partition(Y, 4, 11)


def test_quantity_skew():
    parts = quantity_skew_partition(Y, 10, 0.5, seed=0, min_size=5)
    _is_partition(parts, Y.size)
    sizes = np.array([p.size for p in parts])
    assert sizes.min() >= 5 and sizes.max() > 2 * sizes.min()
    big = partition_counts(Y, [parts[int(sizes.argmax())]])[0]
    assert (big > 0).sum() == 10  # labels stay IID: the biggest client sees every class


def test_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(Y, 10, 0.0)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition(Y, 700, 1.0)
    with pytest.raises(TypeError, match="labels"):
        dirichlet_partition(np.zeros(5), 2, 1.0)
    with pytest.raises(ValueError, match="labels"):
        dirichlet_partition(np.zeros((5, 2), dtype=int), 2, 1.0)
    with pytest.raises(ValueError, match="tries"):
        dirichlet_partition(Y, 50, 0.01, min_size=11, max_tries=3)


def test_works_on_losskit_digits():
    pytest.importorskip("sklearn")
    from losskit.data import load_digits

    split = load_digits()
    parts = dirichlet_partition(split.train_y, 5, 0.3, seed=0)
    _is_partition(parts, int(split.train_y.shape[0]))
