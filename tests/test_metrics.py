"""metrics.py against hand computations on small arrays."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers_eval import one_thread
from histodiffusion.core import metrics as M
from histodiffusion.runtime.errors import HistoError


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Projector(nn.Module):
    """A fixed random projection of uint8 images: a deterministic stand-in feature extractor."""

    num_features = 6

    def __init__(self, in_dim: int = 3 * 8 * 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(in_dim, self.num_features, generator=g) / math.sqrt(in_dim),
                              requires_grad=False)

    def forward(self, x):
        return (x.float().flatten(1) / 255.0) @ self.w


def images(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 3, 8, 8), dtype=torch.uint8, generator=g)


def test_mean_ci_by_hand():
    r = M.mean_ci([1, 2, 3, 4])
    sd = np.std([1, 2, 3, 4], ddof=1)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) * s / sqrt(4)
    assert r["mean"] == pytest.approx(2.5) and r["n"] == 4
    assert r["ci95"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-6)
    one = M.mean_ci([0.7])
    assert one["ci95"] == [0.7, 0.7] and math.isnan(one["half_width"])
    with pytest.raises(HistoError):
        M.mean_ci([])


def test_paired_diff_by_hand():
    a = {0: 0.80, 1: 0.90, 2: 0.85, 7: 0.5}
    b = {0: 0.70, 1: 0.80, 2: 0.80}
    r = M.paired_diff(a, b)
    d = np.array([0.1, 0.1, 0.05])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)
    assert r["seeds"] == [0, 1, 2]
    assert r["mean"] == pytest.approx(d.mean())
    assert r["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-6)
    with pytest.raises(HistoError):
        M.paired_diff({0: 1.0}, {1: 1.0})


def test_classification_metrics_by_hand():
    m = M.classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.5})
    assert m["specificity"] == pytest.approx({"a": 0.75, "b": 0.75, "c": 1.0})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_fid_identical_is_zero_and_shift_is_positive():
    ext = Projector()
    real = images(64, 0, 256, 1)
    assert abs(M.frechet_distance(ext, real, real=real)) < 1e-6
    shifted = images(64, 100, 256, 2)
    assert M.frechet_distance(ext, shifted, real=real) > 0.01


def test_kid_unbiased_near_zero_for_same_distribution():
    ext = Projector()
    real, same, other = images(200, 0, 256, 1), images(200, 0, 256, 2), images(200, 60, 256, 3)
    kid_same, _ = M.kernel_distance(ext, real, same, subsets=20, subset_size=100)
    kid_other, _ = M.kernel_distance(ext, real, other, subsets=20, subset_size=100)
    assert kid_other > 0
    assert abs(kid_same) < 0.05 * kid_other
    # an unbiased estimator: an independent sample of the same distribution gives KID ~ 0, not > 0 on average
    vals = [M.kernel_distance(ext, images(60, 0, 256, 10 + i), images(60, 0, 256, 20 + i), subsets=5,
                              subset_size=60)[0] for i in range(6)]
    assert min(vals) < 0 < max(vals)  # a biased (V-statistic) MMD^2 would never go below 0
    assert abs(np.mean(vals)) < 0.1 * kid_other


def test_precision_recall_toy():
    rng = np.random.default_rng(0)
    real = rng.uniform(0, 1, (20, 2))
    assert M.precision_recall(real, real.copy(), k=3) == {"precision": 1.0, "recall": 1.0, "coverage": 1.0, "k": 3}
    far = real + 100.0
    pr = M.precision_recall(real, far, k=3)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0 and pr["coverage"] == 0.0
    half = np.concatenate([real[:10], far[:10]])
    pr = M.precision_recall(real, half, k=3)
    assert pr["precision"] == 0.5 and pr["recall"] >= 0.5 and pr["coverage"] >= 0.5
    # samples piled on one real tile plus one outlier: the outlier's wide k-NN ball gives full recall,
    # coverage (balls around the real tiles) sees that most real tiles have no sample near them
    far_corner = real[[np.argmax(np.linalg.norm(real - 50.0, axis=1))]]  # the real tile farthest from the outlier
    piled = np.concatenate([far_corner + rng.normal(0, 1e-4, (4, 2)), [[50.0, 50.0]]])
    pr = M.precision_recall(real, piled, k=3)
    assert pr["recall"] == 1.0 and pr["coverage"] <= 0.3
    with pytest.raises(HistoError):
        M.precision_recall(real[:3], real, k=3)


def test_reference_npz_round_trip_and_reuse(tmp_path):
    ext = Projector()
    real, fake = images(50, 0, 256, 1), images(40, 30, 256, 2)
    feats = M.extract_features(ext, real)
    path = tmp_path / "ref.npz"
    M.save_reference(path, feats, "projector")
    ref = M.load_reference(path)
    assert ref["extractor"] == "projector" and int(ref["n"]) == 50
    np.testing.assert_allclose(ref["mean"], feats.mean(0))
    np.testing.assert_allclose(ref["cov"], np.cov(feats, rowvar=False))
    direct = M.frechet_distance(ext, fake, real=real)
    reused = M.frechet_distance(ext, fake, reference=path)
    assert reused == pytest.approx(direct, rel=1e-4)
    with pytest.raises(HistoError):
        M.load_reference(tmp_path / "missing.npz")


def test_names_and_per_class_metrics():
    assert M.metric_names("inception_v3") == ("FID", "KID")
    assert M.metric_names("small_cnn") == ("FD_small_cnn", "KD_small_cnn")
    ext = Projector()
    real, fake = images(24, 0, 256, 1), images(24, 0, 256, 2)
    labels = np.repeat([0, 1], 12)
    g = M.generative_metrics(ext, "proj", real, labels, fake, labels, ["a", "b"], kid_subsets=3)
    assert g["fd_name"] == "FD_proj" and set(g["per_class"]) == {"a", "b"}
    assert g["overall"]["n_real"] == 24 and g["per_class"]["a"]["n_fake"] == 12
    assert g["overall"]["FD_proj"] == pytest.approx(M.frechet_distance(ext, fake, real=real), rel=1e-4)
    assert 0 <= g["overall"]["precision"] <= 1
