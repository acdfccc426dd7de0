"""Stage `select`: score every synthetic sample and write the keep-list filtered.csv (no image copies)
into its own directory (default <samples>/select: config.json first, _COMPLETE.json last, with the
hashes of the samples and the real dataset it read; contract.py).

Feature space: by default a small CNN trained here on the REAL labeled subset (cfg.subset of
cfg.data), cached under <out>/selector/model and reused while the subset, backbone, epochs and seed
are unchanged; or a timm backbone with local weights (cfg.backbone_weights), whose confidence then
comes from a logistic regression fitted on the real features. Per sample:

- centroid: distance to every class centroid of the real features (Euclidean, penultimate layer);
  `nearest_centroid`, `centroid_dist` = distance to the centroid of the sample's TARGET class;
- confidence: the feature classifier's probability of the target class (`pred` = its argmax);
- memorization: `nn_real_id`, `nn_real_dist` = nearest real image of the subset in feature space,
  minimised over the 8 flips/rotations of the sample (dihedral_memorization: tissue has no
  orientation, so a rotated copy is still a copy). Threshold = the `memorization_quantile` quantile
  of the real-real nearest-neighbour distances (computed the same way), where a real tile's
  neighbours exclude its own group (tiles of one group are flips/rotations of one original, i.e.
  copies by construction); per class (memorization_per_class): the quantile over the real tiles of
  one class of their distance to other groups of that class, applied to samples whose nearest real tile
  is of that class (a class with one group takes the other classes' pooled quantile, none: 0; recorded
  as memorization_threshold_from in filtered.json, with a warning); else one threshold for all classes,
  the quantile pooled over the same-class distances of every class ("pooled", or "none": no class has
  two groups, nothing flagged, a warning). `memorized` = nn_real_dist
  <= threshold: by construction about that fraction of genuinely new tiles is flagged too, in every
  class (a false-positive rate chosen by the user; one global threshold flagged 13% of new benign lung
  tiles, whose distinct fields lie closer together than tumour tiles, see BENCHMARKS.md);
- filters: nearest centroid is the target (if require_nearest_centroid), confidence >=
  min_confidence, not memorized (if drop_memorized); `reason` names the filters a sample missed
  (';'-joined; "cap" when it passed but its class's quota was full);
- rank: 1-based order within the target class by (memorized and dropped, number of filters missed),
  then by rank_by: centroid_dist (default), confidence (highest first), hard (lowest first), or
  coverage (a greedy spread over the k-NN balls of the class's real tiles, `coverage_order`): samples
  passing every filter first; this is each class's ranked list;
- keep (threshold rule, quota_ratio 0): every sample passing the filters, at most
  quota(max_ratio, real count) per class (max_ratio 0: no cap);
- keep (class-balanced, quota_ratio > 0): the first quota(quota_ratio, real count) samples of each
  class's ranked list, never a dropped near-copy: passing samples first, then the best of those that
  missed the confidence/centroid filters (kept with a non-empty `reason`: a quota fill), so every
  class gets its quota when it has that many candidates (a warning, and "short" in filtered.json, when
  not). `evaluate`'s selected@r takes the first quota(r, real count) kept samples by rank.

Also writes filtered.json (config, threshold, per class: samples generated, passed, kept, filled,
quota, short and the acceptance rate kept / generated, counts per reason) and, with
generative_metrics, generative_metrics.json (FD/KD in the domain feature space, FID/KID when
inception_weights is given, precision/recall; real subset vs all and vs kept samples) plus the real
reference statistics selector/reference_<extractor>.npz.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from ..core.transforms import DIHEDRAL, dihedral
from ..data.evaldata import load_real, load_sample_images, quota, read_samples, subset_fingerprint
from ..runtime.artifacts import FILTERED_COLUMNS, FILTERED_CSV, selection_dir
from ..runtime.config import SelectConfig
from ..runtime.configrules import RANK_BY
from ..runtime.configtypes import config_to_dict
from ..runtime.contract import check_complete, completion_record
from ..runtime.distributed import seed_everything
from ..runtime.errors import HistoError
from ..runtime.fileio import write_csv_atomic, write_json_atomic
from ..runtime.log import closes_stage_logs, get_logger
from ..runtime.rundirs import COMPLETE_MARKER, ensure_writable, mark_complete, start_run_dir

FILTERED_JSON = "filtered.json"
GENERATIVE_JSON = "generative_metrics.json"
OUT_COLUMNS = FILTERED_COLUMNS


# --------------------------------------------------------------------------------------------
# Pure scoring
# --------------------------------------------------------------------------------------------
def min_distance(probes: list, ref: np.ndarray) -> np.ndarray:
    """[N, M] distances, minimised over several views of the N probes (e.g. their 8 dihedral transforms)."""
    from scipy.spatial.distance import cdist

    out = None
    for v in probes:  # running minimum: one [N, M] matrix in memory at a time
        d = cdist(np.asarray(v, np.float64), ref)
        out = d if out is None else np.minimum(out, d, out=out)
    return out


def other_group_distances(real_feats: np.ndarray, real_groups, real_views: list | None = None) -> np.ndarray:
    """[N, N] distances between real tiles (minimised over `real_views` of the first tile when given), inf
    between tiles of one group: they are flips/rotations of one original, i.e. copies by construction."""
    d = min_distance(real_views or [real_feats], np.asarray(real_feats, np.float64))
    g = np.asarray(real_groups)
    d[g[:, None] == g[None, :]] = np.inf
    return d


def threshold_sources(real_groups, real_labels, n_classes: int) -> list[str]:
    """Per class, where its memorization threshold comes from: "class" (its real tiles span two or more
    groups, so new tiles of the class can be told from copies), "pooled" (one group only: the quantile over
    the classes that have several), or "none" (no class has several groups: nothing is flagged)."""
    groups, labels = np.asarray(real_groups), np.asarray(real_labels)
    own = [len(set(groups[labels == c])) >= 2 for c in range(n_classes)]
    return ["class" if o else "pooled" if any(own) else "none" for o in own]


def memorization_threshold(real_feats: np.ndarray, real_groups: list[str], quantile: float,
                           real_views: list | None = None, real_labels=None, n_classes: int = 0,
                           per_class: bool = True):
    """quantile of each real tile's distance to its nearest real tile of ANOTHER group (0 when undefined);
    with `real_views`, the distance is minimised over those views of each tile (as for the samples).
    With `real_labels`, one threshold per class (an array of n_classes): the quantile over that class's
    real tiles of their distance to the nearest tile of another group OF THE SAME CLASS, so the
    false-positive rate on genuinely new tiles is about `quantile` in every class (homogeneous tissue,
    whose distinct tiles lie close together, is not over-flagged; tiles of other classes lie far apart and
    would make every sample a "copy"). A class whose tiles come from one group takes the quantile pooled
    over the other classes, and 0 (nothing flagged) when no class has two groups (`threshold_sources`).
    With `real_labels` and not `per_class`: that pooled quantile alone, one threshold for every class
    (same-class neighbours still: a tile of another class is not evidence of how close a copy lies)."""
    if not 0 <= quantile <= 1:
        raise HistoError(f"memorization_quantile must be in [0, 1], got {quantile}")
    d = other_group_distances(real_feats, real_groups, real_views)

    def q(values):
        values = values[np.isfinite(values)]
        return float(np.quantile(values, quantile)) if values.size else 0.0
    if real_labels is None:
        return q(d.min(axis=1))
    labels = np.asarray(real_labels)
    d[labels[:, None] != labels[None, :]] = np.inf
    nn = d.min(axis=1)
    pooled = q(nn)
    if not per_class:
        return pooled
    return np.array([q(nn[labels == c]) if src == "class" else pooled
                     for c, src in enumerate(threshold_sources(real_groups, labels, n_classes))])


def score_samples(real_feats, real_labels, real_ids, real_groups, syn_feats, syn_targets, syn_probs,
                  classes: list[str], *, min_confidence: float = 0.5, require_nearest_centroid: bool = True,
                  memorization_quantile: float = 0.01, memorization_per_class: bool = True,
                  drop_memorized: bool = True, max_ratio: float = 0.0, quota_ratio: float = 0.0, syn_views: list | None = None,
                  real_views: list | None = None, rank_by: str = "centroid",
                  coverage_k: int = 3) -> tuple[list[dict], float]:
    """Score synthetic features against real ones; returns (rows with OUT_COLUMNS, {class: memorization
    threshold}). A sample is a near-copy when its nearest real tile is closer than the threshold of that
    tile's class (memorization_per_class), else than one threshold pooled over the classes (both calibrated
    on distances between tiles of one class, `memorization_threshold`).

    syn_views / real_views: features of transformed copies (e.g. the 8 dihedral transforms) over
    which the memorization distances are minimised, so a rotated copy of a training tile is found.
    quota_ratio > 0: class-balanced keep (see the module docstring); max_ratio > 0: a cap only.
    rank_by / coverage_k: the order within each filter tier (`rank_members`)."""
    from scipy.spatial.distance import cdist

    if max_ratio > 0 and quota_ratio > 0:
        raise HistoError(f"give max_ratio ({max_ratio:g}, a cap on the filtered samples) or quota_ratio "
                         f"({quota_ratio:g}, class-balanced quotas), not both")

    rf, sf = np.asarray(real_feats, np.float64), np.asarray(syn_feats, np.float64)
    rl, st = np.asarray(real_labels), np.asarray(syn_targets)
    probs = np.asarray(syn_probs, np.float64)
    missing = [c for i, c in enumerate(classes) if not (rl == i).any()]
    if missing:
        raise HistoError(f"the real subset has no tile of class(es) {missing}: no centroid")
    centroids = np.stack([rf[rl == i].mean(0) for i in range(len(classes))])
    dc = cdist(sf, centroids)
    nearest = dc.argmin(1)
    d_real = min_distance(syn_views or [sf], rf)
    nn = d_real.argmin(1)
    nn_dist = d_real[np.arange(len(sf)), nn]
    thr = memorization_threshold(rf, list(real_groups), memorization_quantile, real_views, rl, len(classes),
                                 per_class=memorization_per_class)
    thr_of_real = thr[rl] if memorization_per_class else np.full(len(rl), thr)
    rows = []
    for i in range(len(sf)):
        t = int(st[i])
        conf = float(probs[i, t])
        memorized = bool(nn_dist[i] <= thr_of_real[nn[i]])
        reasons = []
        if require_nearest_centroid and nearest[i] != t:
            reasons.append("not_nearest_centroid")
        if conf < min_confidence:
            reasons.append("low_confidence")
        if drop_memorized and memorized:
            reasons.append("memorized")
        rows.append({"target": classes[t], "pred": classes[int(probs[i].argmax())], "confidence": round(conf, 6),
                     "nearest_centroid": classes[int(nearest[i])], "centroid_dist": round(float(dc[i, t]), 6),
                     "nn_real_id": real_ids[int(nn[i])], "nn_real_dist": round(float(nn_dist[i]), 6),
                     "memorized": int(memorized), "reasons": reasons, "_t": t})
    real_counts = np.bincount(rl, minlength=len(classes))
    for t in range(len(classes)):
        members = [i for i, r in enumerate(rows) if r["_t"] == t]
        members = [rows[i] for i in rank_members(rows, members, rank_by, sf, rf[rl == t],
                                                 np.asarray(real_groups)[rl == t], coverage_k)]
        if quota_ratio > 0:
            want = quota(quota_ratio, int(real_counts[t]))
            eligible = [r for r in members if "memorized" not in r["reasons"]]
            chosen = {id(r) for r in eligible[:want]}
        else:
            cap = quota(max_ratio, int(real_counts[t])) if max_ratio > 0 else len(members)
            chosen = {id(r) for r in [r for r in members if not r["reasons"]][:cap]}
        for rank, r in enumerate(members, 1):
            r["rank"] = rank
            r["keep"] = int(id(r) in chosen)
            if not r["reasons"] and not r["keep"]:
                r["reasons"].append("cap")
    for r in rows:
        r["reason"] = ";".join(r.pop("reasons"))
        r.pop("_t")
    return rows, {c: float(thr[i] if memorization_per_class else thr) for i, c in enumerate(classes)}


def rank_members(rows: list[dict], members: list[int], rank_by: str, syn_feats, class_real, class_groups,
                 k: int = 3) -> list[int]:
    """The ranked list of one class: `members` (indices into rows) ordered by filter tier first (passing
    samples, then one filter missed, ...; a dropped near-copy last), then within a tier by `rank_by`:
    centroid distance (most typical first), target-class confidence (highest first), hard (lowest
    confidence first: samples that pass the filters but lie nearest the decision boundary), or coverage
    of the class's real tiles (greedy, see `coverage_order`)."""
    if rank_by not in RANK_BY:
        raise HistoError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")

    def tier(i):
        return ("memorized" in rows[i]["reasons"], len(rows[i]["reasons"]))
    if rank_by != "coverage":
        key = {"confidence": lambda i: -rows[i]["confidence"], "hard": lambda i: rows[i]["confidence"],
               "centroid": lambda i: rows[i]["centroid_dist"]}[rank_by]
        return sorted(members, key=lambda i: (tier(i), key(i), rows[i]["centroid_dist"]))
    by_centroid = sorted(members, key=lambda i: (tier(i), rows[i]["centroid_dist"]))
    balls = real_balls(np.asarray(syn_feats, np.float64)[by_centroid], class_real, class_groups, k)
    tiers = [tier(i) for i in by_centroid]
    order, counts = [], np.zeros(balls.shape[1])
    for t in sorted(set(tiers)):
        pos = [p for p, x in enumerate(tiers) if x == t]
        picked = coverage_order(balls[pos], counts)
        order += [by_centroid[pos[p]] for p in picked]
    return order


def real_balls(syn_feats: np.ndarray, real_feats: np.ndarray, real_groups, k: int) -> np.ndarray:
    """[n_syn, n_real] bool: sample inside real tile j's k-NN ball, whose radius is the distance from j to its
    k-th nearest real tile of another group (tiles of one group are flips of one original). The balls of
    density/coverage (Naeem et al., ICML 2020); a real tile without k other-group neighbours has none."""
    from scipy.spatial.distance import cdist

    if k < 1:
        raise HistoError(f"coverage_k must be at least 1, got {k}")
    real = np.asarray(real_feats, np.float64)
    if len(real) < k + 1:  # k other tiles cannot exist
        return np.zeros((len(syn_feats), len(real)), bool)
    radius = np.sort(other_group_distances(real, real_groups), axis=1)[:, k - 1]
    radius[~np.isfinite(radius)] = -1.0  # fewer than k tiles of other groups: no ball
    return cdist(syn_feats, real) <= radius[None, :]


def coverage_order(balls: np.ndarray, counts: np.ndarray) -> list[int]:
    """Greedy order of the rows of `balls` ([n, m] bool, already in tie-break order) that spreads them over
    the m real tiles: each pick maximises sum over the real tiles whose ball it lies in of 1 / (1 + times
    that tile is covered so far), a concave (diminishing) reward: the first picks cover distinct real
    tiles, then every tile a second time, and so on, so the kept samples follow the real tiles' spread
    instead of piling up at the class centre. Rows covering no real tile come last, in their given order.
    `counts` (per real tile) is updated in place, so a later tier continues from an earlier one."""
    b = balls.astype(np.float64)
    left = np.ones(len(b), bool)
    order = []
    for _ in range(len(b)):
        gain = b @ (1.0 / (1.0 + counts))
        gain[~left] = -1.0
        best = int(np.argmax(gain))  # first maximum: the given order breaks ties
        if gain[best] <= 0:
            break
        order.append(best)
        left[best] = False
        counts += b[best]
    return order + [i for i in range(len(b)) if left[i]]


# --------------------------------------------------------------------------------------------
# Feature model
# --------------------------------------------------------------------------------------------
def feature_model(cfg: SelectConfig, real, selector_dir: Path, log):
    """(model, confidence function(features)->probs, extractor name); trained or loaded from selector_dir."""
    from ..models.classifier import (build_classifier, load_classifier, predict, save_classifier, small_cnn_width,
                                     train_classifier)

    size = int(real.images.shape[1])
    n_cls = len(real.classes)
    if not small_cnn_width(cfg.backbone):
        if not cfg.backbone_weights:
            raise HistoError(f"backbone {cfg.backbone!r} needs backbone_weights (a local weights file): random "
                             f"features mean nothing; use the default small_cnn to train one on the real subset")
        model = build_classifier(cfg.backbone, n_cls, size, cfg.backbone_weights).eval()
        from sklearn.linear_model import LogisticRegression

        _, feats = predict(model, real.images)
        lr = LogisticRegression(max_iter=2000).fit(feats.numpy(), real.labels.numpy())
        return model, (lambda f: lr.predict_proba(np.asarray(f))), cfg.backbone
    info = {"name": cfg.backbone, "classes": real.classes, "image_size": size, "data": str(cfg.data),
            "subset": cfg.subset, "fingerprint": subset_fingerprint(cfg.data, cfg.subset),
            "steps": cfg.feature_steps, "seed": cfg.seed, "role": "selection feature classifier"}
    mdir = selector_dir / "model"
    if (mdir / "classifier.json").is_file() and (mdir / "model.safetensors").is_file():
        model, old = load_classifier(mdir)
        if all(old.get(k) == v for k, v in info.items() if k != "data"):
            log.info("reusing the selection feature classifier in %s", mdir)
            return model, _softmax_head(model), cfg.backbone
        log.info("selection feature classifier in %s was made for another subset/config: retraining", mdir)
    seed_everything(cfg.seed)
    model = build_classifier(cfg.backbone, n_cls, size)
    train_classifier(model, real.images, real.labels, steps=cfg.feature_steps, batch_size=32, lr=1e-3,
                     seed=cfg.seed, augment=True, desc="select: feature classifier")
    save_classifier(model, mdir, info)
    return model, _softmax_head(model), cfg.backbone


def dihedral_views(images: torch.Tensor, n: int = 8) -> list[torch.Tensor]:
    """The first n of the 8 dihedral transforms of uint8 [N, H, W, 3] tiles (identity first; the distances
    are minimised over the views, so their order does not matter)."""
    return [dihedral(images, k, dims=(1, 2)).contiguous() for k in range(min(n, DIHEDRAL))]


def _softmax_head(model):
    def probs(f):
        with torch.no_grad():
            return model.head(torch.as_tensor(f, dtype=torch.float32)).softmax(-1).numpy()
    return probs


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
@closes_stage_logs
def run(cfg: SelectConfig) -> Path:
    from ..models.classifier import predict
    from ..runtime.distributed import dist_info

    rank, _ = dist_info()
    samples_dir = Path(cfg.samples)
    out = selection_dir(samples_dir, cfg.out)
    if check_complete(out, cfg):
        get_logger("select", is_main=rank == 0).info("selection already complete: %s", out)
        return out
    ensure_writable(out.parent)
    # 1. inputs: real subset, samples (checked: files exist, classes match), before anything is written
    real = load_real(cfg.data, cfg.subset)
    rows = read_samples(samples_dir, real.classes)
    syn = load_sample_images(samples_dir, rows, int(real.images.shape[1]))
    targets = np.array([int(r["target_index"]) for r in rows])
    # a selection is a pure function of its inputs and config: another config re-selects in place (the
    # marker goes first; evaluate refuses a keep-list other than the one it started with)
    if rank == 0 and (out / COMPLETE_MARKER).is_file():
        (out / COMPLETE_MARKER).unlink()
    start_run_dir(out, cfg, "select", is_main=rank == 0, neutral=tuple(f.name for f in fields(SelectConfig)))
    log = get_logger("select", out / "log.txt", is_main=rank == 0)
    selector_dir = out / "selector"
    # 2. feature space
    model, conf_fn, ext_name = feature_model(cfg, real, selector_dir, log)
    n_views = 8 if cfg.dihedral_memorization else 1
    real_views = [predict(model, v)[1].numpy() for v in dihedral_views(real.images, n_views)]
    syn_views = [predict(model, v)[1].numpy() for v in dihedral_views(syn, n_views)]
    rf, sf = real_views[0], syn_views[0]
    # 3. scores
    scored, thr = score_samples(rf, real.labels.numpy(), real.ids, real.groups, sf, targets,
                                conf_fn(sf), real.classes, min_confidence=cfg.min_confidence,
                                require_nearest_centroid=cfg.require_nearest_centroid,
                                memorization_quantile=cfg.memorization_quantile,
                                memorization_per_class=cfg.memorization_per_class, drop_memorized=cfg.drop_memorized,
                                max_ratio=cfg.max_ratio, quota_ratio=cfg.quota_ratio, syn_views=syn_views,
                                real_views=real_views, rank_by=cfg.rank_by, coverage_k=cfg.coverage_k)
    for r, s in zip(rows, scored):
        s["id"] = r["id"]
    summary = selection_summary(scored, real.classes, real.counts(), cfg.quota_ratio)
    sources = dict(zip(real.classes, threshold_sources(real.groups, real.labels.numpy(), len(real.classes))))
    uncalibrated = [c for c, v in sources.items() if v != "class"]
    if not cfg.memorization_per_class:
        sources = "none" if "none" in sources.values() else "pooled"
        if sources == "none":
            log.warning("select: the real tiles of every class come from one group, so new tiles cannot be told "
                        "from near-copies by their spacing: no sample is flagged as memorized")
    elif uncalibrated:
        log.warning("select: the real tiles of %s come from one group each, so new tiles of %s cannot be told from "
                    "near-copies by their spacing: %s", ", ".join(map(repr, uncalibrated)),
                    "that class" if len(uncalibrated) == 1 else "those classes",
                    "their memorization threshold is pooled over the other classes"
                    if "pooled" in sources.values() else "no sample is flagged as memorized")
    log.info("select: kept %d of %d samples (memorization threshold %s); acceptance per class: %s",
             summary["kept"], len(scored), ", ".join(f"{c} {v:.4g}" for c, v in thr.items()),
             ", ".join(f"{c} {a:.2f}" for c, a in summary["acceptance"].items()))
    for c, v in summary["per_class"].items():
        if v["short"]:
            log.warning("select: class %r keeps %d of its quota of %d (%g x %d real): only %d of its %d samples "
                        "are candidates (not memorized); sample more", c, v["kept"], v["quota"], cfg.quota_ratio,
                        v["real"], v["kept"], v["samples"])
    if rank != 0:
        return out
    # 4. generative metrics (domain features; FID/KID only with Inception weights)
    gen = None
    if cfg.generative_metrics:
        gen = _generative(cfg, model, ext_name, real, syn, targets, scored, selector_dir)
        write_json_atomic(out / GENERATIVE_JSON, gen)
    # 5. keep-list, its summary, then the completion marker last
    write_csv_atomic(out / FILTERED_CSV, scored, OUT_COLUMNS)
    write_json_atomic(out / FILTERED_JSON, {"config": config_to_dict(cfg), "extractor": ext_name,
                                            "memorization_threshold": thr,
                                            "memorization_threshold_from": sources, **summary})
    mark_complete(out, **completion_record(cfg), kept=summary["kept"], samples=len(scored))
    return out


def selection_summary(scored: list[dict], classes: list[str], real_counts: dict, quota_ratio: float = 0.0) -> dict:
    """Per class: samples generated, passed (every filter), kept, filled (kept by the quota although a
    filter was missed), quota and short (class-balanced mode), acceptance = kept / generated,
    pass_rate = passed / generated, memorized, and the dropped samples' counts per reason."""
    per_class = {}
    for c in classes:
        rs = [r for r in scored if r["target"] == c]
        reasons: dict[str, int] = {}
        for r in rs:
            if not r["keep"]:
                for why in filter(None, r["reason"].split(";")):
                    reasons[why] = reasons.get(why, 0) + 1
        kept = sum(r["keep"] for r in rs)
        passed = sum(not r["reason"] or r["reason"] == "cap" for r in rs)
        want = quota(quota_ratio, real_counts[c]) if quota_ratio > 0 else None
        per_class[c] = {"samples": len(rs), "passed": passed, "kept": kept,
                        "filled": sum(bool(r["keep"] and r["reason"]) for r in rs), "quota": want,
                        "short": max(0, want - kept) if want is not None else 0,
                        "acceptance": kept / len(rs) if rs else 0.0, "pass_rate": passed / len(rs) if rs else 0.0,
                        "real": real_counts[c], "memorized": sum(r["memorized"] for r in rs), "dropped_by": reasons}
    total: dict[str, int] = {}
    for v in per_class.values():
        for k, n in v["dropped_by"].items():
            total[k] = total.get(k, 0) + n
    return {"samples": len(scored), "kept": sum(r["keep"] for r in scored),
            "mode": "class-balanced quota" if quota_ratio > 0 else "filters",
            "acceptance": {c: v["acceptance"] for c, v in per_class.items()}, "dropped_by": total,
            "per_class": per_class}


def _generative(cfg, model, ext_name, real, syn, targets, scored, selector_dir) -> dict:
    from ..core import metrics
    from ..models.classifier import FeatureExtractor, inception_extractor

    extractors = [(ext_name, FeatureExtractor(model))]
    if cfg.inception_weights:
        extractors.append(("inception_v3", inception_extractor(cfg.inception_weights)))
    keep = np.array([bool(s["keep"]) for s in scored])
    out = {"real": {"data": str(cfg.data), "subset": cfg.subset, "n": len(real)}, "results": []}
    for name, ext in extractors:
        metrics.save_reference(selector_dir / f"reference_{name}.npz",
                               metrics.extract_features(ext, real.images), name)
        for which, mask in (("all", np.ones(len(keep), bool)), ("kept", keep)):
            if mask.sum() < 2:
                continue
            res = metrics.generative_metrics(ext, name, real.images, real.labels.numpy(), syn[torch.as_tensor(mask)],
                                             targets[mask], real.classes, seed=cfg.seed)
            out["results"].append({"samples": which, **res})
    return out
