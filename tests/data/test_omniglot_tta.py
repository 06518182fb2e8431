"""Shift test-time augmentation of the one-shot evaluation (losskit.data.omniglot), against a
naive per-pixel loop written from the definition: view (dy, dx) shows at (i, j) the pixel
(i - dy, j - dx) of the image, coordinates clamped to the image (edge pixels repeated)."""

import pytest
import torch

from losskit.data.omniglot import OneShotRun, oneshot_error, shifted_views, tta_embed


def naive_shift(x, dy, dx):
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = x[:, :, min(max(i - dy, 0), h - 1), min(max(j - dx, 0), w - 1)]
    return out


@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("hw", [(5, 7), (1, 3)])
def test_shifted_views_match_the_naive_loop(radius, hw):
    x = torch.rand(3, 2, *hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    views = shifted_views(x, radius)
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    assert views.shape == (len(offsets), *x.shape) and views.dtype == x.dtype
    for v, (dy, dx) in zip(views, offsets):
        torch.testing.assert_close(v, naive_shift(x, dy, dx), rtol=0, atol=0)


def test_a_shifted_view_moves_the_content_by_its_offset():
    one = torch.ones(1, 1, 6, 6)
    one[0, 0, 2, 3] = 0.0  # one dark pixel
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    moved = shifted_views(one, 1)[offsets.index((1, -1))]
    assert moved[0, 0, 3, 2] == 0.0 and moved.sum() == 35.0


def test_tta_embed_is_the_mean_of_normalised_view_embeddings():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 6, 6, generator=g, dtype=torch.float64)
    proj = torch.randn(36, 5, generator=g, dtype=torch.float64)

    def embed(z):
        return z.flatten(1) @ proj

    plain = tta_embed(embed, x, "none")
    torch.testing.assert_close(plain, (embed(x) / embed(x).norm(dim=1, keepdim=True)).float())
    want = torch.zeros(4, 5, dtype=torch.float64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            e = embed(naive_shift(x, dy, dx))
            want += e / e.norm(dim=1, keepdim=True)
    torch.testing.assert_close(tta_embed(embed, x, "shift"), (want / 9).float())


def test_oneshot_error_with_shift_tta_counts_mistakes():
    g = torch.Generator().manual_seed(2)
    runs = []
    for r in range(3):
        train = torch.rand(20, 1, 8, 8, generator=g)
        y = torch.randperm(20, generator=g)
        runs.append(OneShotRun(f"run{r:02d}", train, train[y], y))
    # identical test and training images: no mistake with or without the shifted views
    for tta in ("none", "shift"):
        assert oneshot_error(lambda z: z.flatten(1) - 0.5, runs, tta=tta)["oneshot_error"] == 0.0
    # a constant embedding ties every class; argmax takes class 0, right once per 20
    const = oneshot_error(lambda z: torch.ones(len(z), 3), runs, tta="shift")
    assert const["oneshot_error"] == pytest.approx(19 / 20)


def test_bad_tta_and_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match=r"tta: expected one of none, shift; got 'flip'"):
        oneshot_error(lambda z: z.flatten(1), [], tta="flip")
    with pytest.raises(ValueError, match=r"tta: expected one of none, shift; got 'x'"):
        tta_embed(lambda z: z.flatten(1), torch.zeros(1, 1, 4, 4), "x")
    with pytest.raises(ValueError, match=r"x: expected \[N, C, H, W\] images; got shape \(4, 4\)"):
        shifted_views(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="radius: expected an int >= 0; got -1"):
        shifted_views(torch.zeros(1, 1, 4, 4), -1)
