"""Metrics as pure functions: seed statistics, classification scores, generative metrics.

- `mean_ci` / `paired_diff`: mean and 95% confidence interval over seeds with the t-distribution
  (n - 1 degrees of freedom); paired differences arm - baseline per seed (same seeds in both arms).
- `classification_metrics`: accuracy, macro-F1, per-class sensitivity (recall) and specificity,
  confusion matrix (scikit-learn).
- `frechet_distance` / `kernel_distance`: torchmetrics' FrechetInceptionDistance and
  KernelInceptionDistance with the feature extractor passed in. Only with Inception-v3 weights
  (`models.classifier.inception_extractor`, a local file) is the result an "FID"/"KID"; with the domain extractor
  (the selection classifier's penultimate features) we call it `FD_<name>` / `KD_<name>`
  (`metric_names`). KID is torchmetrics' unbiased polynomial-kernel MMD^2, averaged over subsets.
- `precision_recall`: improved precision and recall of Kynkäänniemi et al. (NeurIPS 2019): k-NN
  balls around real (fake) features estimate each manifold; precision = fraction of fake samples
  inside the real manifold, recall = fraction of real samples inside the fake manifold; coverage
  (Naeem et al., ICML 2020) = fraction of real samples whose own k-NN ball holds a fake sample.
- Reference statistics (mean, covariance, count and the features of the real set) are saved as
  `.npz` (`save_reference` / `load_reference`) and reused by `frechet_distance(reference=...)`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..runtime.errors import HistoError
from ..runtime.fileio import atomic_path


# --------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------
def mean_ci(values, confidence: float = 0.95) -> dict:
    """{"mean", "ci95": [lo, hi], "half_width", "std", "n"}; t-distribution with n-1 dof (n=1: no CI)."""
    from scipy import stats

    v = np.asarray(list(values), dtype=float)
    n = int(v.size)
    if n == 0:
        raise HistoError("mean_ci needs at least one value")
    m = float(v.mean())
    if n == 1:
        return {"mean": m, "ci95": [m, m], "half_width": float("nan"), "std": float("nan"), "n": 1}
    sd = float(v.std(ddof=1))
    h = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n))
    return {"mean": m, "ci95": [m - h, m + h], "half_width": h, "std": sd, "n": n}


def paired_diff(arm: dict, baseline: dict, confidence: float = 0.95) -> dict:
    """Paired differences arm[seed] - baseline[seed] over the seeds both have, with mean_ci."""
    seeds = sorted(set(arm) & set(baseline))
    if not seeds:
        raise HistoError("paired_diff: the arm and the baseline share no seed")
    d = [float(arm[s]) - float(baseline[s]) for s in seeds]
    return {**mean_ci(d, confidence), "seeds": seeds}


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------
def classification_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """accuracy, macro_f1, per-class sensitivity/specificity (dicts by class name), confusion (rows: true)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    if y_true.size == 0:
        raise HistoError("classification_metrics: no predictions to score")
    labels = list(range(len(classes)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    total = cm.sum()
    sens, spec = {}, {}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = total - tp - fn - fp
        sens[c] = float(tp / (tp + fn)) if tp + fn else float("nan")
        spec[c] = float(tn / (tn + fp)) if tn + fp else float("nan")
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "sensitivity": sens, "specificity": spec, "confusion": cm.tolist(), "n": int(y_true.size)}


# --------------------------------------------------------------------------------------------
# Feature extractors and generative metrics
# --------------------------------------------------------------------------------------------
def metric_names(extractor_name: str) -> tuple[str, str]:
    """("FID", "KID") for Inception-v3, else honest names ("FD_<name>", "KD_<name>")."""
    if extractor_name == "inception_v3":
        return "FID", "KID"
    return f"FD_{extractor_name}", f"KD_{extractor_name}"



def extract_features(extractor, images, batch_size: int = 256) -> np.ndarray:
    """float64 features [N, D] of uint8 images [N, 3, H, W] (or [N, H, W, 3])."""
    import torch

    images = torch.as_tensor(images)
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    with torch.no_grad():
        out = [extractor(images[i:i + batch_size]).double() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).numpy()


def _nchw(images):
    import torch

    images = torch.as_tensor(images)
    if images.ndim == 2 and images.is_floating_point():  # features already extracted
        return images
    if images.dtype != torch.uint8:
        raise HistoError(f"generative metrics expect uint8 images, got {images.dtype}")
    return images.permute(0, 3, 1, 2).contiguous() if images.shape[-1] == 3 and images.shape[1] != 3 else images


def frechet_distance(extractor, fake, real=None, reference: str | Path | None = None, batch_size: int = 256) -> float:
    """Fréchet distance between the extractor's features of `real` images (or saved reference
    statistics, .npz) and `fake` images, through torchmetrics.FrechetInceptionDistance."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    if reference is not None:
        ref = load_reference(reference)
        n = int(ref["n"])
        mu = torch.as_tensor(ref["mean"], dtype=torch.float64)
        cov = torch.as_tensor(ref["cov"], dtype=torch.float64)
        if mu.numel() != fid.real_features_sum.numel():
            raise HistoError(f"reference {reference} has {mu.numel()} features, the extractor "
                             f"{fid.real_features_sum.numel()}")
        fid.real_features_sum = mu * n
        fid.real_features_cov_sum = cov * (n - 1) + n * torch.outer(mu, mu)
        fid.real_features_num_samples = torch.tensor(n)
    elif real is not None:
        real = _nchw(real)
        for i in range(0, real.shape[0], batch_size):
            fid.update(real[i:i + batch_size], real=True)
    else:
        raise HistoError("frechet_distance needs real images or a reference .npz")
    fake = _nchw(fake)
    for i in range(0, fake.shape[0], batch_size):
        fid.update(fake[i:i + batch_size], real=False)
    return float(fid.compute())


def kernel_distance(extractor, real, fake, subsets: int = 50, subset_size: int = 1000, seed: int = 0,
                    batch_size: int = 256) -> tuple[float, float]:
    """(mean, std) of the unbiased KID estimate over random subsets (torchmetrics); the subset size
    is capped at the smaller set's size."""
    import warnings

    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _nchw(real), _nchw(fake)
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise HistoError("kernel_distance needs at least 2 real and 2 fake images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subsets=subsets, subset_size=size)
    for x, is_real in ((real, True), (fake, False)):
        for i in range(0, x.shape[0], batch_size):
            kid.update(x[i:i + batch_size], real=is_real)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        m, s = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(m), float(s)


def precision_recall(real_feats, fake_feats, k: int = 3) -> dict:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN radii (self excluded)."""
    real = np.asarray(real_feats, dtype=np.float64)
    fake = np.asarray(fake_feats, dtype=np.float64)
    if len(real) <= k or len(fake) <= k:
        raise HistoError(f"precision_recall needs more than k={k} real and fake samples "
                         f"(got {len(real)} real, {len(fake)} fake)")

    def radii(x, rows: int = 1024):  # k-th neighbour distance, in row blocks: memory O(rows * N), not O(N^2)
        out = np.empty(len(x))
        for s in range(0, len(x), rows):
            out[s:s + rows] = np.partition(_cdist(x[s:s + rows], x), k, axis=1)[:, k]  # column 0: the point itself
        return out

    in_real_balls = _cdist(fake, real) <= radii(real)[None, :]  # [fake, real]: fake inside a real tile's ball
    in_fake_balls = _cdist(real, fake) <= radii(fake)[None, :]
    # coverage (Naeem et al., ICML 2020): real samples whose own k-NN ball holds a fake sample; unlike
    # recall, a few fake outliers with wide balls cannot inflate it
    return {"precision": float(in_real_balls.any(axis=1).mean()), "recall": float(in_fake_balls.any(axis=1).mean()),
            "coverage": float(in_real_balls.any(axis=0).mean()), "k": k}


def _cdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(a, b)


# --------------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------------
def save_reference(path: str | Path, feats, extractor_name: str) -> None:
    """mean, cov (n-1), n, the features themselves and the extractor's name, as .npz (atomic)."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise HistoError(f"reference statistics need at least 2 feature vectors, got shape {f.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, mean=f.mean(0), cov=np.cov(f, rowvar=False), n=np.int64(len(f)), features=f,
                     extractor=np.array(extractor_name))


def load_reference(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HistoError(f"reference statistics not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:
        raise HistoError(f"cannot read reference statistics {path}: {e}") from None
    for k in ("mean", "cov", "n"):
        if k not in out:
            raise HistoError(f"reference statistics {path} lack {k!r}")
    out["extractor"] = str(out.get("extractor", ""))
    return out


def identity_extractor(dim: int):
    """A feature extractor that passes precomputed features through (generative metrics on given features)."""
    from torch import nn

    class _Identity(nn.Module):
        num_features = dim

        def forward(self, x):
            return x

    return _Identity()


def generative_metrics(extractor, extractor_name: str, real, real_labels, fake, fake_labels, classes: list[str],
                       k: int = 3, kid_subsets: int = 50, seed: int = 0) -> dict:
    """FD/KD (named by `metric_names`) and precision/recall, overall and per class (a class with too
    few images for a metric gets null there). Images uint8; labels are class indices. The extractor
    runs once per image; torchmetrics then gets the features through an identity module."""
    import torch

    rl, fl = np.asarray(real_labels), np.asarray(fake_labels)
    fd_name, kd_name = metric_names(extractor_name)
    rf, ff = extract_features(extractor, _nchw(real)), extract_features(extractor, _nchw(fake))
    ident = identity_extractor(rf.shape[1])
    real, fake = torch.from_numpy(rf), torch.from_numpy(ff)

    def block(r_idx, f_idx):
        r_idx, f_idx = np.flatnonzero(r_idx), np.flatnonzero(f_idx)
        out = {"n_real": int(len(r_idx)), "n_fake": int(len(f_idx)), fd_name: None, kd_name: None,
               kd_name + "_std": None, "precision": None, "recall": None, "coverage": None}
        if len(r_idx) >= 2 and len(f_idx) >= 2:
            ri, fi = torch.as_tensor(r_idx), torch.as_tensor(f_idx)
            out[fd_name] = frechet_distance(ident, fake[fi], real=real[ri])
            out[kd_name], out[kd_name + "_std"] = kernel_distance(ident, real[ri], fake[fi],
                                                                   subsets=kid_subsets, seed=seed)
        if len(r_idx) > k and len(f_idx) > k:
            pr = precision_recall(rf[r_idx], ff[f_idx], k=k)
            out["precision"], out["recall"], out["coverage"] = pr["precision"], pr["recall"], pr["coverage"]
        return out

    res = {"extractor": extractor_name, "fd_name": fd_name, "kd_name": kd_name, "k": k,
           "overall": block(np.ones(len(rl), bool), np.ones(len(fl), bool)),
           "per_class": {c: block(rl == i, fl == i) for i, c in enumerate(classes)}}
    return res
