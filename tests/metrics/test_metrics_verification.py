import math

import numpy as np
import pytest
import torch
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn import metrics as skm

from losskit.metrics import (
    VerificationMetrics,
    eer,
    epsilon_opis,
    evaluate_embeddings,
    histogram_error_bound,
    opis,
    pair_histograms,
    pair_scores,
    roc_curve,
    roc_from_histograms,
    tar_at_far,
)


def clustered(n=200, d=8, c=10, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + spread * torch.randn(c, d, generator=g)[y]
    return x.double(), y


def naive_pairs(x, y, metric="cosine"):
    x, y = np.asarray(x, np.float64), np.asarray(y)
    gen, imp = [], []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if metric == "cosine":
                s = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            elif metric == "dot":
                s = x[i] @ x[j]
            elif metric == "squared-euclidean":
                s = -((x[i] - x[j]) ** 2).sum()
            else:
                s = -np.linalg.norm(x[i] - x[j])
            (gen if y[i] == y[j] else imp).append(s)
    return np.array(gen), np.array(imp)


def sk_inputs(g, i):
    return np.r_[np.ones(len(g)), np.zeros(len(i))], np.r_[g, i]


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared-euclidean"])
def test_pair_scores_match_naive(metric):
    x, y = clustered(60, 5, c=6, seed=1)
    g, i = pair_scores(x, y, metric=metric, chunk_size=13)
    ng, ni = naive_pairs(x, y, metric)
    np.testing.assert_allclose(np.sort(g.numpy()), np.sort(ng), atol=1e-10)
    np.testing.assert_allclose(np.sort(i.numpy()), np.sort(ni), atol=1e-10)


@pytest.mark.parametrize("quantize", [None, 20])
def test_roc_tar_eer_match_sklearn(quantize):
    rng = np.random.default_rng(0)
    g, i = rng.normal(1.0, 1.0, 700), rng.normal(-0.5, 1.0, 3000)
    if quantize:  # heavy ties between and within the two score sets
        g, i = np.round(g * quantize) / quantize, np.round(i * quantize) / quantize
    far, tar, thr = roc_curve(torch.from_numpy(g), torch.from_numpy(i))
    yt, ys = sk_inputs(g, i)
    fpr, tpr, sthr = skm.roc_curve(yt, ys, drop_intermediate=False)
    np.testing.assert_allclose(far.numpy(), fpr, atol=1e-12)
    np.testing.assert_allclose(tar.numpy(), tpr, atol=1e-12)
    np.testing.assert_allclose(thr.numpy()[1:], sthr[1:])
    assert float(torch.trapezoid(tar, far)) == pytest.approx(skm.roc_auc_score(yt, ys), abs=1e-12)
    for f in (1e-3, 1e-2, 0.1, 0.5):
        assert tar_at_far(g, i, far=f) == pytest.approx(float(tpr[fpr <= f].max()), abs=1e-12)
    want = brentq(lambda v: 1.0 - v - interp1d(fpr, tpr)(v), 0.0, 1.0)
    assert eer(g, i) == pytest.approx(want, abs=1e-9)


def test_verification_edge_cases():
    with pytest.raises(ValueError, match="genuine"):
        roc_curve(torch.zeros(0), torch.ones(3))
    with pytest.raises(ValueError, match="impostor"):
        eer(torch.ones(3), torch.zeros(0))
    with pytest.raises(ValueError, match="far"):
        tar_at_far([1.0], [0.0], far=2.0)
    with pytest.raises(ValueError, match="finite"):
        tar_at_far([float("nan")], [0.0])
    # perfect separation: TAR 1 at FAR 0, EER 0; all scores equal: EER 0.5
    assert tar_at_far([0.9, 0.8], [0.1, 0.2], far=0.0) == 1.0 and eer([0.9, 0.8], [0.1, 0.2]) == 0.0
    assert eer([0.5, 0.5], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    vm = VerificationMetrics()
    vm.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))  # a single class: no impostor pair
    out = vm.compute()
    assert math.isnan(out["eer"]) and math.isnan(out["tar@far=0.001"])
    with pytest.raises(ValueError, match="dimension 3"):
        vm.update(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))


def test_histogram_mode_within_bound():
    x, y = clustered(400, 8, c=20, spread=0.8, seed=4)
    g, i = pair_scores(x, y)
    edges, gc, ic = pair_histograms(x, y, bins=512, chunk_size=64)
    assert int(gc.sum()) == g.numel() and int(ic.sum()) == i.numel()
    far, tar, _ = roc_from_histograms(edges, gc, ic)
    bound = histogram_error_bound(gc, ic)
    ef, et, _ = roc_curve(g, i)
    for f in (1e-3, 1e-2, 0.1):
        exact = tar_at_far(g, i, f)
        approx = float(tar[far <= f + 1e-12].max())
        assert exact - bound["tar"] - 1e-12 <= approx <= exact + 1e-12
    from losskit.metrics.verification import _eer_roc
    assert abs(_eer_roc(far, tar) - eer(g, i)) <= bound["eer"] + 1e-12
    # same via the accumulator
    vm = VerificationMetrics(fars=(1e-2,), mode="histogram", bins=512, chunk_size=64)
    for a in range(0, 400, 150):
        vm.update(x[a:a + 150], y[a:a + 150])
    assert vm.compute()["tar@far=0.01"] == pytest.approx(float(tar[far <= 1e-2 + 1e-12].max()))
    # euclidean: the range comes from a first pass
    e, gce, ice = pair_histograms(x, y, metric="euclidean", bins=64)
    ge, ie = pair_scores(x, y, metric="euclidean")
    assert float(e[0]) == pytest.approx(float(torch.cat([ge, ie]).min()))
    assert int(gce.sum()) == ge.numel()


def test_verification_accumulator_exact_equals_functions():
    x, y = clustered(120, 6, c=8, seed=2)
    vm = VerificationMetrics(fars=(1e-3, 1e-2), mode="exact", chunk_size=16)
    for a in range(0, 120, 50):
        vm.update(x[a:a + 50], y[a:a + 50])
    out = vm.compute()
    g, i = pair_scores(x, y)
    assert out["tar@far=0.001"] == tar_at_far(g, i, 1e-3) and out["tar@far=0.01"] == tar_at_far(g, i, 1e-2)
    assert out["eer"] == pytest.approx(eer(g, i), abs=1e-12)


# ---------------------------------------------------------------- OPIS

def naive_opis(x, y, far_range=(1e-2, 1e-1), n_thr=101, epsilon=None, pooled=False):
    """Written from the definition with explicit loops over classes and pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y)
    n = len(x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    imp_all = [s[a, b] for a in range(n) for b in range(a + 1, n) if y[a] != y[b]]
    gen_all = [s[a, b] for a in range(n) for b in range(a + 1, n) if y[a] == y[b]]
    lo, hi = np.quantile(imp_all, [1 - far_range[1], 1 - far_range[0]])
    thr = np.linspace(lo, hi, n_thr)

    def util(gen, imp, d):
        tpr = np.mean(np.asarray(gen) >= d)
        tnr = np.mean(np.asarray(imp) < d)
        return 0.0 if tpr + tnr == 0 else 2 * tpr * tnr / (tpr + tnr)

    per_class = []
    for c in np.unique(y):
        idx = np.where(y == c)[0]
        if len(idx) < 2:
            continue
        gen = [s[a, b] for a in idx for b in idx if a != b]
        imp = [s[a, b] for a in idx for b in range(n) if y[b] != c]
        per_class.append([util(gen, imp, d) for d in thr])
    U = np.array(per_class)
    if epsilon is None:
        if pooled:
            ubar = np.array([util(gen_all, imp_all, d) for d in thr])
        else:
            ubar = np.array([np.mean([U[c, k] for c in range(len(U))]) for k in range(len(thr))])
        return float(np.mean([(U[c, k] - ubar[k]) ** 2 for c in range(len(U)) for k in range(len(thr))]))
    m = max(1, int(np.ceil(epsilon * len(U))))
    srt = np.sort(U, axis=0)
    return float(np.mean((srt[:m].mean(0) - srt[-m:].mean(0)) ** 2))


def test_opis_matches_naive():
    x, y = clustered(90, 6, c=9, spread=1.0, seed=6)
    y = torch.cat([y, torch.tensor([99])])  # a lone sample: its class is skipped
    x = torch.cat([x, torch.randn(1, 6, dtype=torch.float64)])
    assert opis(x, y, chunk_size=17) == pytest.approx(naive_opis(x, y), abs=1e-12)
    assert opis(x, y, reference="pooled") == pytest.approx(naive_opis(x, y, pooled=True), abs=1e-12)
    assert opis(x, y) != pytest.approx(opis(x, y, reference="pooled"), abs=1e-9)
    assert epsilon_opis(x, y, epsilon=0.2, chunk_size=17) == pytest.approx(naive_opis(x, y, epsilon=0.2), abs=1e-12)
    assert opis(x, y, num_thresholds=11, far_range=(0.05, 0.2)) == pytest.approx(
        naive_opis(x, y, far_range=(0.05, 0.2), n_thr=11), abs=1e-12)


def test_opis_behaviour_and_errors():
    # every class an identical, rotated copy of the same structure: all per-class
    # utility curves coincide, so OPIS is 0 (up to rounding)
    d = 8
    base = torch.tensor([[1.0, 0.3], [1.0, -0.3], [1.0, 0.0]], dtype=torch.float64)
    x = torch.zeros(3 * (d // 2), d, dtype=torch.float64)
    for c in range(d // 2):
        x[3 * c:3 * c + 3, 2 * c:2 * c + 2] = base
    y = torch.arange(d // 2).repeat_interleave(3)
    x2, y2 = clustered(200, 8, c=10, spread=0.7, seed=3)
    assert opis(x2, y2) > 1e-4
    assert opis(x, y) == pytest.approx(0.0, abs=1e-20) and epsilon_opis(x, y) == pytest.approx(0.0, abs=1e-20)
    assert math.isnan(opis(torch.randn(4, 3), torch.arange(4)))
    with pytest.raises(ValueError, match="one class"):
        opis(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="far_range"):
        opis(x2, y2, far_range=(0.2, 0.1))
    with pytest.raises(ValueError, match="reference"):
        opis(x2, y2, reference="overall")
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_opis(x2, y2, epsilon=0.0)


def test_evaluate_embeddings_keys_and_values():
    x, y = clustered(150, 8, c=10, seed=9)
    out = evaluate_embeddings(x, y)
    assert list(out) == ["recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "map@r",
                         "tar@far=0.001", "tar@far=0.01", "eer", "opis"]
    assert all(isinstance(v, float) for v in out.values())
    g, i = pair_scores(x, y)
    assert out["eer"] == pytest.approx(eer(g, i)) and out["tar@far=0.01"] == tar_at_far(g, i, 1e-2)
    # streaming verification gives the same within the bound
    out2 = evaluate_embeddings(x, y, exact_max_pairs=0)
    assert abs(out2["eer"] - out["eer"]) < 1e-3
    # degenerate: one class -> verification undefined, retrieval perfect
    one = evaluate_embeddings(x[:20], torch.zeros(20, dtype=torch.long), ks=(1,))
    assert one["recall@1"] == 1.0 and math.isnan(one["eer"]) and math.isnan(one["opis"])


def test_low_precision_and_numpy_inputs():
    x, y = clustered(100, 8, c=8, seed=11)
    ref = evaluate_embeddings(x.float(), y, ks=(1,))
    bf = evaluate_embeddings(x.bfloat16(), y, ks=(1,))
    assert all(math.isfinite(v) for v in bf.values())
    assert abs(bf["recall@1"] - ref["recall@1"]) <= 0.05 and abs(bf["eer"] - ref["eer"]) <= 0.05
    npy = evaluate_embeddings(x.float().numpy(), y.numpy(), ks=(1,))
    assert npy == ref
    with pytest.raises(ValueError, match="finite"):
        evaluate_embeddings(torch.full((4, 2), float("inf")), torch.tensor([0, 0, 1, 1]))


def test_evaluate_equals_separate_functions():
    from losskit.metrics import map_at_r, precision_at_1, recall_at_k
    x, y = clustered(130, 6, c=7, seed=12)
    y = torch.cat([y, torch.tensor([50])])
    x = torch.cat([x, torch.randn(1, 6, dtype=torch.float64)])
    out = evaluate_embeddings(x, y, ks=(1, 3, 500))
    r = recall_at_k(x, y, (1, 3, 500))
    assert out["recall@1"] == r[1] and out["recall@3"] == r[3] and out["recall@500"] == r[500]
    assert out["precision@1"] == precision_at_1(x, y)
    assert out["map@r"] == pytest.approx(map_at_r(x, y), abs=1e-12)
    assert out["opis"] == pytest.approx(opis(x, y), abs=1e-15)
    g, i = pair_scores(x, y)
    assert out["tar@far=0.001"] == tar_at_far(g, i, 1e-3)


def test_metric_takes_the_distance_vocabulary():
    from losskit.distances import DISTANCE_NAMES, DotProductSimilarity, get_distance
    from losskit.metrics import class_utilities, knn, recall_at_k
    from losskit.metrics import RetrievalMetrics

    x, y = clustered(60, 5, c=6, seed=2)
    # one message, from the one resolver, naming the keyword
    msg = r"metric: expected one of \('cosine', 'dot', 'euclidean', 'squared-euclidean'\) or a BaseDistance, got 'l1'"
    for call in (lambda: knn(x, metric="l1"), lambda: recall_at_k(x, y, metric="l1"),
                 lambda: pair_scores(x, y, metric="l1"), lambda: pair_histograms(x, y, metric="l1"),
                 lambda: class_utilities(x, y, torch.zeros(3), metric="l1"), lambda: opis(x, y, metric="l1"),
                 lambda: evaluate_embeddings(x, y, metric="l1"), lambda: RetrievalMetrics(metric="l1"),
                 lambda: VerificationMetrics(metric="l1")):
        with pytest.raises(ValueError, match=msg):
            call()
    with pytest.raises(ValueError, match=msg.replace("metric:", "distance:")):
        get_distance("l1")
    # every name is accepted; squared Euclidean ranks as Euclidean does
    for name in DISTANCE_NAMES:
        out = evaluate_embeddings(x, y, ks=(1, 4), metric=name)
        assert all(math.isfinite(v) for v in out.values())
    a, b = evaluate_embeddings(x, y, metric="euclidean"), evaluate_embeddings(x, y, metric="squared-euclidean")
    for key in ("recall@1", "recall@4", "map@r", "tar@far=0.001", "tar@far=0.01", "eer"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)
    # an object works where a name does: dot on normalised rows is cosine
    cos = evaluate_embeddings(x, y, metric="cosine")
    dotn = evaluate_embeddings(x, y, metric=DotProductSimilarity(normalize=True))
    assert dotn == pytest.approx(cos, abs=1e-12)
    e, gc, ic = pair_histograms(x, y, metric=DotProductSimilarity(normalize=True), bins=8)
    assert (float(e[0]), float(e[-1])) == (-1.0, 1.0)  # a normalised similarity is binned over [-1, 1]
