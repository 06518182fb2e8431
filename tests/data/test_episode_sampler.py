import pytest
import torch

import losskit
from losskit.data.episodes import EpisodeSampler, episode_labels, episode_support_mask


def labels_with(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in counts.items()])
    return y[torch.randperm(len(y), generator=g)]


def test_episode_invariants():
    y = labels_with({c: 6 + c % 3 for c in range(10)})
    s = EpisodeSampler(y, n_way=5, k_shot=2, n_query=3, episodes=50, seed=1)
    assert len(s) == 50 and s.episode_size == 25
    local = s.episode_labels()
    seen_classes = set()
    for idx in s:
        assert idx.dtype == torch.long and idx.shape == (25,)
        assert len(set(idx.tolist())) == 25  # no row twice in an episode
        lab = y[idx]
        sup, qry = lab[:10], lab[10:]
        way = sup[::2]
        assert len(set(way.tolist())) == 5  # n_way distinct classes
        # layout: support block class by class, then query block in the same class order
        assert torch.equal(sup, way.repeat_interleave(2))
        assert torch.equal(qry, way.repeat_interleave(3))
        # episode-local labels are consistent with the true labels
        assert torch.equal(way[local], lab)
        seen_classes.update(way.tolist())
    assert seen_classes == set(range(10))


def test_reproducible_and_epoch_changes_stream():
    y = labels_with({c: 5 for c in range(8)})
    a = [i.tolist() for i in EpisodeSampler(y, 3, 1, 2, episodes=10, seed=7)]
    b = [i.tolist() for i in EpisodeSampler(y, 3, 1, 2, episodes=10, seed=7)]
    assert a == b
    s = EpisodeSampler(y, 3, 1, 2, episodes=10, seed=7)
    assert [i.tolist() for i in s] == [i.tolist() for i in s]  # re-iterating repeats
    s.set_epoch(1)
    assert [i.tolist() for i in s] != a
    assert [i.tolist() for i in EpisodeSampler(y, 3, 1, 2, episodes=10, seed=8)] != a


def test_negative_labels_are_never_drawn():
    y = torch.cat([labels_with({c: 4 for c in range(4)}), torch.full((20,), -1)])
    for idx in EpisodeSampler(y, 4, 2, 2, episodes=20, seed=0):
        assert (y[idx] >= 0).all()


def test_too_few_samples_errors_and_drop_small_classes():
    y = labels_with({0: 5, 1: 5, 2: 2, 3: 5})
    with pytest.raises(ValueError, match=r"labels: class 2 has 2 samples.*k_shot \+ n_query = 4"):
        EpisodeSampler(y, 2, 1, 3)
    s = EpisodeSampler(y, 3, 1, 3, episodes=20, drop_small_classes=True)
    assert s.classes.tolist() == [0, 1, 3]
    for idx in s:
        assert 2 not in y[idx].tolist()
    with pytest.raises(ValueError, match=r"n_way: expected at most 3 .*got 4"):
        EpisodeSampler(y, 4, 1, 3, drop_small_classes=True)


def test_bad_arguments():
    y = torch.arange(4).repeat(3)
    with pytest.raises(ValueError, match="k_shot: expected an integer >= 1, got 0"):
        EpisodeSampler(y, 2, 0)
    with pytest.raises(ValueError, match="n_query: expected an integer >= 0"):
        EpisodeSampler(y, 2, 1, -1)
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        EpisodeSampler(y.float(), 2, 1)
    with pytest.raises(ValueError, match=r"labels: expected shape \[N\]"):
        EpisodeSampler(y.view(3, 4), 2, 1)


def test_masks_and_use_with_episode_losses():
    assert episode_support_mask(2, 1, 2).tolist() == [True, True, False, False, False, False]
    assert episode_labels(2, 1, 2).tolist() == [0, 1, 0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    y = labels_with({c: 6 for c in range(6)})
    feats = torch.randn(len(y), 8, generator=g)
    s = EpisodeSampler(y, 3, 2, 2, episodes=2, seed=0)
    for idx in s:
        for name in ("proto-triplet", "gpam"):
            per = losskit.get(name, reduction="none")(feats[idx], y[idx], support_mask=s.support_mask)
            assert per.shape == (12,) and torch.isfinite(per).all() and (per[s.support_mask] == 0).all()
        # k_shot == ceil((k_shot + n_query) / 2): the default split is the episode's own split
        a = losskit.get("proto-triplet")(feats[idx], y[idx])
        b = losskit.get("proto-triplet")(feats[idx], y[idx], support_mask=s.support_mask)
        torch.testing.assert_close(a, b)
