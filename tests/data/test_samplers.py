import numpy as np
import pytest
import torch

from losskit.data import PKSampler, pk_batch_shape


def test_pk_sampler_gives_p_classes_of_k_each_and_is_seeded():
    y = torch.arange(6).repeat_interleave(torch.tensor([10, 10, 10, 3, 10, 10]))
    s = PKSampler(y, p=4, k=5, seed=0)
    for _ in range(20):
        idx = s.batch()
        labels = y[idx].numpy()
        classes, counts = np.unique(labels, return_counts=True)
        assert len(classes) == 4 and (counts == 5).all()  # class 3 (3 images) is drawn with replacement
    a, b = PKSampler(y, 4, 5, seed=1), PKSampler(y, 4, 5, seed=1)
    assert all((a.batch() == b.batch()).all() for _ in range(5))
    assert s.steps_per_epoch == int(np.ceil(len(y) / 20))


def test_pk_sampler_refuses_more_classes_than_the_labels_have():
    with pytest.raises(ValueError, match="P=4 classes per batch but the training set has 3"):
        PKSampler(torch.arange(3).repeat(5), p=4, k=2, seed=0)


def test_pk_batch_shape_rule():
    # K = min(16, max(2, smallest // 4)); P = min(#classes, max(2, batch_size // K))
    assert pk_batch_shape(torch.arange(5).repeat_interleave(180)) == (5, 16)
    assert pk_batch_shape(torch.arange(100).repeat_interleave(20)) == (16, 5)
    assert pk_batch_shape(torch.arange(100).repeat_interleave(4), batch_size=10) == (5, 2)  # K floor 2
    assert pk_batch_shape(torch.arange(3).repeat_interleave(100), batch_size=1000) == (3, 16)  # P capped
    assert pk_batch_shape(torch.arange(10).repeat_interleave(8), classes=3, samples=7) == (3, 7)
    with pytest.raises(ValueError, match="at least 2 classes; got 1"):
        pk_batch_shape(torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="classes: 11 classes per batch exceeds the 10 classes"):
        pk_batch_shape(torch.arange(10).repeat(3), classes=11)
