"""select: centroid / confidence / memorization scores, caps, class-balanced quotas and acceptance rates,
the stage on tiny data, bad inputs."""
import csv
import json
import shutil

import numpy as np
import pytest

from helpers_eval import CLASSES, make_class_samples, make_dataset, make_samples, one_thread
from histodiffusion.cli import main
from histodiffusion.runtime.artifacts import FILTERED_COLUMNS
from histodiffusion.runtime.config import SelectConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.stages.select import (coverage_order, memorization_threshold, real_balls, run, score_samples,
                                          selection_summary)

@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


REAL = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [10, 0], [10, 1], [11, 0], [11, 1]], dtype=float)
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
IDS = [f"r{i}" for i in range(8)]
GROUPS = [f"g{i}" for i in range(8)]
SURE = np.array([0.9, 0.1])


def score(syn, targets, probs=None, **kw):
    probs = np.array([SURE if t == 0 else SURE[::-1] for t in targets]) if probs is None else probs
    kw.setdefault("drop_memorized", False)
    return score_samples(REAL, LABELS, IDS, GROUPS, np.array(syn, float), np.array(targets), probs, ["a", "b"], **kw)


def test_centroid_keeps_own_centroid_drops_other_class_centroid():
    rows, _ = score([[0.5, 0.5], [10.5, 0.5]], [0, 0])
    at_own, at_other = rows
    assert at_own["nearest_centroid"] == "a" and at_own["keep"] == 1 and at_own["reason"] == ""
    assert at_own["centroid_dist"] == pytest.approx(0.0)
    assert at_other["nearest_centroid"] == "b" and at_other["keep"] == 0
    assert "not_nearest_centroid" in at_other["reason"]
    assert at_own["rank"] == 1 and at_other["rank"] == 2
    rows, _ = score([[10.5, 0.5]], [0], require_nearest_centroid=False)
    assert rows[0]["keep"] == 1


def test_confidence_threshold():
    rows, _ = score([[0.5, 0.5]], [0], probs=np.array([[0.4, 0.6]]), min_confidence=0.5)
    assert rows[0]["keep"] == 0 and rows[0]["reason"] == "low_confidence"
    assert rows[0]["confidence"] == pytest.approx(0.4) and rows[0]["pred"] == "b"


def test_memorization_flags_exact_copy():
    rows, thr = score([[1.0, 1.0], [0.5, 0.5]], [0, 0], memorization_quantile=0.5, drop_memorized=True)
    assert thr == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    copy, fresh = rows
    assert copy["memorized"] == 1 and copy["nn_real_id"] == "r3" and copy["nn_real_dist"] == 0.0
    assert copy["keep"] == 0 and "memorized" in copy["reason"]
    assert fresh["memorized"] == 1 or fresh["nn_real_dist"] > thr
    rows, _ = score([[1.0, 1.0]], [0], memorization_quantile=0.0, drop_memorized=False)
    assert rows[0]["memorized"] == 1 and rows[0]["keep"] == 1


def test_threshold_ignores_same_group_neighbours():
    feats = np.array([[0, 0], [0, 0], [5, 0], [5, 0]], float)
    assert memorization_threshold(feats, ["g", "g", "h", "h"], 0.0) == pytest.approx(5.0)
    assert memorization_threshold(feats, ["g", "g", "g", "g"], 0.5) == 0.0


def test_memorization_threshold_per_class_of_the_nearest_real_tile():
    # class a: distinct tiles 0.1 apart (homogeneous tissue); class b: 2 apart
    real = np.array([[0, 0], [0, 0.1], [0.1, 0], [0.1, 0.1], [10, 0], [10, 2], [12, 0], [12, 2]], float)
    syn = np.array([[0.05, 0.2], [0.0, 0.0], [11.0, 1.0]])  # new a tile, a copy of r0, new b tile
    probs = np.array([SURE, SURE, SURE[::-1]])

    def flagged(per_class):
        rows, thr = score_samples(real, LABELS, IDS, GROUPS, syn, np.array([0, 0, 1]), probs, ["a", "b"],
                                  memorization_quantile=0.5, memorization_per_class=per_class)
        return [r["memorized"] for r in rows], thr

    # one threshold over all classes (the median of 0.1 x 4 and 2 x 4): the new a tile is flagged, the b one not
    assert flagged(False) == ([1, 1, 0], {"a": pytest.approx(1.05), "b": pytest.approx(1.05)})
    # per class: each class's new tile is judged against its own spacing; the copy stays flagged
    assert flagged(True) == ([0, 1, 1], {"a": pytest.approx(0.1), "b": pytest.approx(2.0)})
    per_class = memorization_threshold(real, GROUPS, 0.5, real_labels=LABELS, n_classes=2)
    assert per_class.tolist() == pytest.approx([0.1, 2.0])


def test_memorization_threshold_with_a_class_from_one_group():
    """Neighbours of another class never calibrate a class's threshold: a class whose tiles come from one
    group takes the threshold pooled over the others, and with one group per class nothing is flagged
    (at 1% of LC25000 every class is one group: the cross-class spacing flagged all 240 samples)."""
    from histodiffusion.stages.select import threshold_sources

    real = np.array([[0, 0], [0, 0.1], [0.1, 0], [0.1, 0.1], [10, 0], [10, 2], [12, 0], [12, 2]], float)
    one_b = GROUPS[:4] + ["gb"] * 4  # class b: one group
    assert threshold_sources(one_b, LABELS, 2) == ["class", "pooled"]
    assert memorization_threshold(real, one_b, 0.5, real_labels=LABELS, n_classes=2).tolist() == \
        pytest.approx([0.1, 0.1])
    one_each = ["ga"] * 4 + ["gb"] * 4
    assert threshold_sources(one_each, LABELS, 2) == ["none", "none"]
    assert memorization_threshold(real, one_each, 0.5, real_labels=LABELS, n_classes=2).tolist() == [0.0, 0.0]
    # without labels the nearest tile of another group may be of any class (10 apart: every new tile a "copy");
    # one threshold for all classes (per_class False) is pooled over same-class distances instead
    assert memorization_threshold(real, one_each, 0.5) == pytest.approx(10.0, abs=0.1)
    assert memorization_threshold(real, one_each, 0.5, real_labels=LABELS, n_classes=2, per_class=False) == 0.0
    assert memorization_threshold(real, one_b, 0.5, real_labels=LABELS, n_classes=2, per_class=False) == \
        pytest.approx(0.1)
    syn = np.array([[0.05, 0.05], [11.0, 1.0]])  # new tiles near each class's centre
    rows, thr = score_samples(real, LABELS, IDS, one_each, syn, np.array([0, 1]), np.array([SURE, SURE[::-1]]),
                              ["a", "b"], memorization_quantile=0.5)
    assert [r["memorized"] for r in rows] == [0, 0] and thr == {"a": 0.0, "b": 0.0}
    rows, thr = score_samples(real, LABELS, IDS, one_each, syn, np.array([0, 1]), np.array([SURE, SURE[::-1]]),
                              ["a", "b"], memorization_quantile=0.5, memorization_per_class=False)
    assert [r["memorized"] for r in rows] == [0, 0] and thr == {"a": 0.0, "b": 0.0}


def test_per_class_cap_keeps_best_ranked():
    syn = [[0.5, 0.5 + d] for d in (0.4, 0.1, 0.3, 0.0, 0.2)]
    rows, _ = score(syn, [0] * 5, max_ratio=0.5, memorization_quantile=0.0)  # 0.5 x 4 real -> 2
    kept = [i for i, r in enumerate(rows) if r["keep"]]
    assert kept == [1, 3]
    assert sorted(r["rank"] for r in rows) == [1, 2, 3, 4, 5]
    assert all(r["reason"] == "cap" for i, r in enumerate(rows) if i not in kept)
    assert rows[3]["rank"] == 1


# A crafted score table. Class a (4 real): two samples pass every filter, two miss the confidence
# filter only, one misses two filters, one is a near-copy of a real tile; class b (4 real): one sample.
CRAFTED = [([0.5, -1.5], 0, 0.9), ([0.5, -2.0], 0, 0.9), ([0.5, -1.2], 0, 0.4), ([0.5, -3.0], 0, 0.3),
           ([1.0, 1.0], 0, 0.9), ([8.0, -2.0], 0, 0.2), ([10.5, -1.5], 1, 0.9)]


def crafted(**kw):
    syn = [f for f, _, _ in CRAFTED]
    targets = [t for _, t, _ in CRAFTED]
    probs = np.array([[c, 1 - c] if t == 0 else [1 - c, c] for _, t, c in CRAFTED])
    return score(syn, targets, probs, memorization_quantile=0.0, drop_memorized=True, **kw)


def test_class_quota_filled_from_each_ranked_list():
    rows, _ = crafted(quota_ratio=1.0)  # quota: 1 x 4 real per class
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 6, 5, 1]
    assert rows[4]["memorized"] == 1 and "memorized" in rows[4]["reason"]
    # class a: exactly 4 kept, the two passing samples first, then the best two that missed one filter
    assert [r["keep"] for r in rows[:6]] == [1, 1, 1, 1, 0, 0]
    assert rows[2]["reason"] == rows[3]["reason"] == "low_confidence"  # kept as quota fills, reason kept
    # class b: only 1 candidate for a quota of 4: kept, and the class is short
    assert rows[6]["keep"] == 1
    summary = selection_summary(rows, ["a", "b"], {"a": 4, "b": 4}, 1.0)
    a, b = summary["per_class"]["a"], summary["per_class"]["b"]
    assert (a["samples"], a["passed"], a["kept"], a["filled"], a["quota"], a["short"]) == (6, 2, 4, 2, 4, 0)
    assert (b["samples"], b["passed"], b["kept"], b["filled"], b["quota"], b["short"]) == (1, 1, 1, 0, 4, 3)
    # acceptance = kept / generated per class
    assert summary["acceptance"] == {"a": pytest.approx(4 / 6), "b": 1.0}
    assert a["pass_rate"] == pytest.approx(2 / 6) and a["dropped_by"] == {
        "memorized": 1, "not_nearest_centroid": 1, "low_confidence": 1}
    assert summary["kept"] == 5 and summary["mode"] == "class-balanced quota"


def test_class_quota_smaller_than_the_passing_samples_caps_them():
    rows, _ = crafted(quota_ratio=0.25)  # quota 1 per class
    assert [r["keep"] for r in rows] == [1, 0, 0, 0, 0, 0, 1]
    assert rows[1]["reason"] == "cap"
    summary = selection_summary(rows, ["a", "b"], {"a": 4, "b": 4}, 0.25)
    assert summary["per_class"]["a"]["passed"] == 2 and summary["acceptance"]["a"] == pytest.approx(1 / 6)
    # the threshold rule (no quota) keeps only the passing samples: class a 2, b 1
    rows, _ = crafted()
    assert [r["keep"] for r in rows] == [1, 1, 0, 0, 0, 0, 1]
    summary = selection_summary(rows, ["a", "b"], {"a": 4, "b": 4})
    assert summary["per_class"]["a"]["quota"] is None and summary["per_class"]["a"]["short"] == 0
    assert summary["acceptance"] == {"a": pytest.approx(2 / 6), "b": 1.0}
    with pytest.raises(HistoError, match="not both"):
        crafted(quota_ratio=1.0, max_ratio=1.0)


def test_coverage_order_spreads_over_the_real_tiles():
    # rows: which of 3 real tiles each sample's position lies in the ball of (already in tie-break order)
    balls = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 1, 0]], bool)
    counts = np.zeros(3)
    # row 5 covers two fresh tiles: first; then row 4, the one fresh tile r2; then rows 0-2 gain 1/2 each
    # (r0, r1 covered once): row 0 by the given order; now r0 is covered twice, so row 2 (r1: 1/2) comes
    # before row 1 (r0: 1/3); row 3 covers nothing: last
    assert coverage_order(balls, counts) == [5, 4, 0, 2, 1, 3]
    assert counts.tolist() == [3, 2, 1]  # updated in place: the next tier continues from here
    assert coverage_order(balls[[3]], np.zeros(3)) == [0]  # a sample covering nothing is still ranked (last)


def test_real_balls_reach_the_kth_other_group_neighbour():
    real = np.array([[0, 0], [0, 0.1], [2, 0], [5, 0]], float)
    groups = ["g", "g", "h", "i"]  # tiles 0 and 1 are flips of one original: not each other's neighbours
    balls = real_balls(np.array([[0, 1.9], [4.5, 0]]), real, groups, k=1)
    # radii: 2, sqrt(4.01), 2, 3
    assert balls.tolist() == [[True, True, False, False], [False, False, False, True]]
    # k=3: tiles 0 and 1 have only two tiles of other groups: no ball; tiles 2 and 3 reach their 3rd
    balls = real_balls(np.array([[0, 1.9], [4.5, 0]]), real, groups, k=3)
    assert balls.tolist() == [[False, False, True, False], [False, False, True, True]]
    assert real_balls(np.zeros((1, 2)), real[:2], groups[:2], k=3).shape == (1, 2)
    with pytest.raises(HistoError, match="coverage_k"):
        real_balls(np.zeros((1, 2)), real, groups, k=0)


def test_rank_by_coverage_keeps_samples_spread_over_the_real_clusters():
    # class a: two clusters of real tiles (left, right); class b far away
    real = np.array([[0, 0], [0, 0.2], [3, 0], [3, 0.2], [20, 0], [20, 1], [21, 0], [21, 1]], float)
    syn = np.array([[0.1, 0.1], [0.05, 0.1], [3.0, 0.1]])  # two at the left cluster, one at the right
    probs = np.array([SURE, SURE, [0.6, 0.4]])

    def kept(rank_by):
        rows, _ = score_samples(real, LABELS, IDS, GROUPS, syn, np.array([0, 0, 0]), probs, ["a", "b"],
                                drop_memorized=False, quota_ratio=0.5, rank_by=rank_by, coverage_k=1)
        return [r["keep"] for r in rows], [r["rank"] for r in rows]
    # quota 0.5 x 4 real = 2. Nearest the centroid (1.5, 0.1) are the two left samples: both kept
    assert kept("centroid") == ([1, 1, 0], [1, 2, 3])
    # confidence: the third is least sure; hard: it comes first
    assert kept("confidence")[0] == [1, 1, 0]
    assert kept("hard") == ([1, 0, 1], [2, 3, 1])
    # coverage: the left cluster once, then the right one
    assert kept("coverage") == ([1, 0, 1], [1, 3, 2])
    with pytest.raises(HistoError, match="rank_by"):
        kept("spread")


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    from histodiffusion.data.evaldata import load_real

    root = tmp_path_factory.mktemp("select")
    data = make_dataset(root / "data")
    train = load_real(data, "train")
    rng = np.random.default_rng(3)
    from helpers_eval import class_tile

    imgs = [class_tile(c, rng) for c in range(3) for _ in range(4)] + [train.images[5].numpy(),
                                                                     np.fliplr(train.images[9].numpy()).copy()]
    targets = [c for c in CLASSES for _ in range(4)] + [train.classes[int(train.labels[i])] for i in (5, 9)]
    samples = make_samples(root / "samples", imgs, targets)
    cfg = SelectConfig(samples=str(samples), data=str(data), subset="train", backbone="small_cnn_w8",
                       feature_steps=15, min_confidence=0.0, memorization_quantile=0.05)
    with one_thread():
        run(cfg)
    return cfg, samples, train.ids[5], train.groups[5], train.groups[9]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_stage_writes_keep_list_and_flags_copy(selected):
    cfg, samples, copied_id, copied_group, flipped_group = selected
    rows = read_rows(samples / "select" / "filtered.csv")
    assert list(rows[0]) == FILTERED_COLUMNS and len(rows) == 14
    copy, flipped = rows[-2], rows[-1]
    # the copied tile, or a rotation of it in its group (an exact match after rotating the sample)
    assert copy["memorized"] == "1" and copy["keep"] == "0" and copy["nn_real_id"].startswith(copied_group)
    assert float(copy["nn_real_dist"]) < 1e-4
    no_views = SelectConfig(**{**cfg.__dict__, "dihedral_memorization": False, "generative_metrics": False,
                               "out": str(samples / "plain")})
    run(no_views)
    assert read_rows(samples / "plain" / "filtered.csv")[-2]["nn_real_id"] == copied_id
    # a mirrored copy is found too (distances are minimised over the 8 flips/rotations)
    assert flipped["memorized"] == "1" and flipped["nn_real_id"].startswith(flipped_group)
    assert not list(samples.glob("*.png")) and len(list((samples / "images").glob("*.png"))) == 14  # no copies
    summary = json.loads((samples / "select" / "filtered.json").read_text())
    assert summary["samples"] == 14 and summary["kept"] == sum(r["keep"] == "1" for r in rows)
    gen = json.loads((samples / "select" / "generative_metrics.json").read_text())
    res = gen["results"][0]
    assert res["fd_name"] == "FD_small_cnn_w8" and "FID" not in json.dumps(gen)
    assert res["overall"]["n_fake"] == 14 and set(res["per_class"]) == set(CLASSES)
    assert (samples / "select" / "selector" / "reference_small_cnn_w8.npz").is_file()


def test_rerun_reuses_feature_classifier(selected):
    cfg, samples, *_ = selected
    weights = samples / "select" / "selector" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    strict = SelectConfig(**{**cfg.__dict__, "min_confidence": 1.0, "generative_metrics": False})
    run(strict)
    assert weights.stat().st_mtime_ns == before
    assert all(r["keep"] == "0" for r in read_rows(samples / "select" / "filtered.csv"))
    run(cfg)  # restore for other tests


def test_bad_inputs(selected, tmp_path, capsys):
    cfg, samples, *_ = selected
    broken = tmp_path / "broken"
    shutil.copytree(samples, broken, ignore=shutil.ignore_patterns("select"))  # (a copied selection would be complete)
    (broken / "images" / "s00002.png").unlink()
    with pytest.raises(HistoError, match="s00002.png"):
        run(SelectConfig(**{**cfg.__dict__, "samples": str(broken)}))
    other = make_class_samples(tmp_path / "other", n_per_class=2, classes=["aca", "benign", "mucosa"])
    with pytest.raises(HistoError, match="mucosa"):
        run(SelectConfig(**{**cfg.__dict__, "samples": str(other)}))
    swapped = make_samples(tmp_path / "swapped", [np.zeros((16, 16, 3), np.uint8)], ["aca"],
                           classes=["benign", "aca", "scc"])
    with pytest.raises(HistoError, match="class order"):
        run(SelectConfig(**{**cfg.__dict__, "samples": str(swapped)}))
    assert not (broken / "select" / "filtered.csv").exists() or (broken / "select" / "filtered.csv").read_bytes() == (samples / "select" / "filtered.csv").read_bytes()
    code = main(["select", "--samples", str(broken), "--data", cfg.data, "--backbone", "small_cnn_w8"])
    assert code == 2 and "missing" in capsys.readouterr().err


def test_timm_backbone_with_local_weights(selected, tmp_path):
    import timm
    from safetensors.torch import save_file

    cfg, samples, copied_id, copied_group, _ = selected
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "timm"
    run(SelectConfig(**{**cfg.__dict__, "backbone": "resnet10t", "backbone_weights": str(tmp_path / "w.safetensors"),
                        "out": str(out), "generative_metrics": False}))
    rows = read_rows(out / "filtered.csv")
    assert len(rows) == 14 and rows[-2]["nn_real_id"].startswith(copied_group) and rows[-2]["memorized"] == "1"
    assert json.loads((out / "filtered.json").read_text())["extractor"] == "resnet10t"
    assert not (samples / "select" / "selector" / "model" / "classifier.json").read_text().count("resnet10t")
    with pytest.raises(HistoError, match="backbone_weights"):
        run(SelectConfig(**{**cfg.__dict__, "backbone": "resnet10t", "out": str(out)}))


def test_stage_class_quota_writes_acceptance_and_warns_when_short(selected, tmp_path):
    import logging

    cfg, samples, *_ = selected
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("histodiffusion.select")
    logger.addHandler(handler)
    try:  # 12 real tiles per class in train: quota 0.25 x 12 = 3 of the 4 (or 5) samples per class
        run(SelectConfig(**{**cfg.__dict__, "quota_ratio": 0.25, "min_confidence": 0.99, "generative_metrics": False,
                            "drop_memorized": False, "out": str(tmp_path / "q")}))
        rows = read_rows(tmp_path / "q" / "filtered.csv")
        for c in CLASSES:
            assert sum(r["keep"] == "1" for r in rows if r["target"] == c) == 3  # filled to the quota exactly
        summary = json.loads((tmp_path / "q" / "filtered.json").read_text())
        for c in CLASSES:
            v = summary["per_class"][c]
            assert v["quota"] == 3 and v["short"] == 0 and v["acceptance"] == pytest.approx(3 / v["samples"])
            assert summary["acceptance"][c] == v["acceptance"]
        assert sum(v["filled"] for v in summary["per_class"].values()) > 0  # some kept below the filters
        assert not any("short" in m or "quota of" in m for m in seen)
        run(SelectConfig(**{**cfg.__dict__, "quota_ratio": 1.0, "generative_metrics": False,
                            "drop_memorized": False, "out": str(tmp_path / "short")}))  # quota 12, at most 6 samples
        summary = json.loads((tmp_path / "short" / "filtered.json").read_text())
        assert all(v["short"] == 12 - v["kept"] > 0 for v in summary["per_class"].values())
        assert sum("keeps" in m and "quota of 12" in m for m in seen) == 3
    finally:
        logger.removeHandler(handler)


def test_stage_one_threshold_for_all_classes_still_flags_the_copy(selected, tmp_path):
    cfg, *_ = selected
    out = tmp_path / "global"
    run(SelectConfig(**{**cfg.__dict__, "memorization_per_class": False, "generative_metrics": False, "out": str(out)}))
    summary = json.loads((out / "filtered.json").read_text())
    assert summary["memorization_threshold_from"] == "pooled"  # every class spans several groups here
    assert len(set(summary["memorization_threshold"].values())) == 1
    copy, flipped = read_rows(out / "filtered.csv")[-2:]
    assert copy["memorized"] == flipped["memorized"] == "1" and copy["keep"] == flipped["keep"] == "0"
