"""`prepare`: labeled (CSV, class folders) and unlabeled datasets, split invariants, leakage guard."""
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from helpers_prepare import class_folders, labels_csv, lung_rows
from histodiffusion.data import default
from histodiffusion.data.datasets import PixelDataset
from histodiffusion.data.leakage import check_no_overlap
from histodiffusion.data.splits import fewshot_groups, group_labels, split_groups
from histodiffusion.runtime.artifacts import read_dataset, subset_ids
from histodiffusion.runtime.config import PrepareConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.runtime.fileio import read_csv, sha256_file
from histodiffusion.stages.prepare import run


@pytest.fixture(scope="module")
def lung(tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "lung"
    return run(PrepareConfig(out=str(out), labels_csv="default", fewshot_k=(1, 3)))


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "unl"
    return run(PrepareConfig(out=str(out), sources=("default",)))


def _split_of_groups(rows):
    d = defaultdict(set)
    for r in rows:
        d[r["group"]].add(r["split"])
    return d


def test_labeled_from_csv_manifest_meta_and_shards(lung):
    meta, rows = read_dataset(lung)
    src = lung_rows()
    assert len(rows) == len(src) == meta["count"]
    assert meta["kind"] == "labeled" and meta["classes"] == ["lung_aca", "lung_n", "lung_scc"]
    assert meta["tile_size"] == 64 and meta["config"]["labels_csv"] == "default"
    by_path = {r["path"]: r for r in src}
    for r in rows:
        assert r["label"] == by_path[r["path"]]["label"] and r["group"] == by_path[r["path"]]["group_id"]
        assert r["split"] in ("train", "val", "test")
    counts = defaultdict(lambda: defaultdict(int))
    for r in rows:
        counts[r["split"]][r["label"]] += 1
    assert meta["counts"] == {s: dict(c) for s, c in counts.items()}
    # sources.csv has the sha256 of every file
    srcs = read_csv(lung / "sources.csv", ["path", "sha256"])
    assert len(srcs) == len(src)
    assert srcs[0]["sha256"] == sha256_file(default.labels_csv().parent / srcs[0]["path"])
    ds = PixelDataset(lung, "train")
    assert len(ds) == sum(r["split"] == "train" for r in rows)
    img, label, tid = ds[0]
    assert tuple(img.shape) == (3, 64, 64) and -1.0 <= float(img.min()) < float(img.max()) <= 1.0
    assert ds.classes[label] == next(r["label"] for r in rows if r["id"] == tid)


def test_split_invariants_stratified_by_group(lung):
    _, rows = read_dataset(lung)
    assert all(len(s) == 1 for s in _split_of_groups(rows).values())  # no group in two splits
    groups = defaultdict(lambda: defaultdict(set))
    for r in rows:
        groups[r["label"]][r["split"]].add(r["group"])
    for c, per in groups.items():
        n = sum(len(g) for g in per.values())
        assert len(per["val"]) == round(0.15 * n) and len(per["test"]) == round(0.15 * n)  # stratified
        assert len(per["train"]) == n - 2 * round(0.15 * n)


def test_splits_reproducible_with_seed_and_different_with_another():
    rows = [{"group": r["group_id"], "label": r["label"], "path": r["path"]} for r in lung_rows()]
    g = group_labels(rows)
    a, b, c = (split_groups(g, 0.15, 0.15, s) for s in (0, 0, 1))
    assert a == b and a != c
    with pytest.raises(HistoError, match="two classes"):
        group_labels(rows + [{"group": rows[0]["group"], "label": "lung_n" if rows[0]["label"] != "lung_n"
                              else "lung_aca", "path": "x.jpg"}])


def test_fewshot_subsets_are_whole_train_groups_with_every_class(lung):
    meta, rows = read_dataset(lung)
    by_id = {r["id"]: r for r in rows}
    tiles_of = defaultdict(set)
    for r in rows:
        tiles_of[r["group"]].add(r["id"])
    subs = {}
    for name in ("frac0.05", "frac0.1", "k1", "k3"):
        ids = set(subset_ids(lung, rows, name))
        subs[name] = ids
        assert all(by_id[i]["split"] == "train" for i in ids)
        gs = {by_id[i]["group"] for i in ids}
        assert all(tiles_of[g] <= ids for g in gs)  # whole groups
        assert {by_id[i]["label"] for i in ids} == set(meta["classes"])
    assert subs["frac0.05"] <= subs["frac0.1"] and subs["k1"] <= subs["k3"]
    k3_groups = {by_id[i]["group"] for i in subs["k3"]}
    assert len(k3_groups) == 9
    g = group_labels(rows)
    split = {r["group"]: r["split"] for r in rows}
    with pytest.raises(HistoError, match="fewer train groups"):
        fewshot_groups(g, split, (), (1000,), 0)


def test_fewshot_draws_are_other_groups_of_the_same_size():
    groups = {f"g{c}{i}": c for c in "abc" for i in range(20)}
    split = {g: "train" for g in groups}
    one = fewshot_groups(groups, split, (0.2,), (2,), 0)
    three = fewshot_groups(groups, split, (0.2,), (2,), 0, draws=3)
    assert set(three) == {"frac0.2", "k2", "frac0.2_d1", "k2_d1", "frac0.2_d2", "k2_d2"}
    assert three["frac0.2"] == one["frac0.2"] and three["k2"] == one["k2"]  # draw 0 is the historical subset
    draws = [set(three[n]) for n in ("frac0.2", "frac0.2_d1", "frac0.2_d2")]
    assert all(len(d) == 12 for d in draws) and len({frozenset(d) for d in draws}) == 3
    assert all({groups[g] for g in d} == set("abc") for d in draws)  # every class, 4 groups each
    assert set(three["k2_d1"]) <= set(three["frac0.2_d1"])  # nested within a draw
    with pytest.raises(HistoError, match="draws"):
        fewshot_groups(groups, split, (0.2,), (), 0, draws=0)


def test_labeled_from_class_folders(tmp_path):
    root = class_folders(tmp_path / "nct", per_class=7)
    out = run(PrepareConfig(out=str(tmp_path / "ds"), class_folders=str(root), val_frac=0.15, test_frac=0.15))
    meta, rows = read_dataset(out)
    assert meta["classes"] == ["LUNG_ACA", "LUNG_N", "LUNG_SCC"] and len(rows) == 21
    assert all(r["group"] == r["path"] and r["path"].endswith(".tif") for r in rows)  # own group per file
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_unlabeled_from_sources(unlabeled):
    meta, rows = read_dataset(unlabeled)
    assert meta["kind"] == "unlabeled" and meta["classes"] == []
    assert {r["split"] for r in rows} == {"unlabeled"} and {r["label"] for r in rows} == {""}
    by_name = {Path(s["path"]).name: s for s in meta["sources"]}
    assert set(by_name) == {p.name for p in default.unlabeled_sources()}
    svs = by_name["cmu_small_region.svs"]
    assert svs["mpp"] == pytest.approx(0.499) and svs["background"] > 0
    assert meta["resolution"]["tile_mpp"]["cmu_small_region.svs"] == pytest.approx(0.499)
    assert meta["resolution"]["tile_mpp"]["stardist_histo.jpg"] is None
    assert svs["sha256"] == sha256_file(svs["path"])
    assert sum(s["tiles"] for s in meta["sources"]) == len(rows) == meta["counts"]["unlabeled"][""]
    for r in rows:
        s = by_name[Path(r["source"]).name]
        assert r["group"] == Path(r["source"]).stem
        assert 0 <= int(r["x"]) <= s["width"] - int(r["width"]) and 0 <= int(r["y"]) <= s["height"] - int(r["height"])
    ds = PixelDataset(unlabeled)
    assert len(ds) == len(rows) and ds[len(ds) - 1][1] == -1
    px = np.stack([ds.uint8(i).numpy() for i in range(0, len(ds), 50)])
    assert px.shape[1:] == (64, 64, 3) and px.mean() < 220  # tissue, not glass


def test_rerun_skips_and_other_config_refused(lung):
    before = (lung / "_COMPLETE.json").read_text()
    run(PrepareConfig(out=str(lung), labels_csv="default", fewshot_k=(1, 3)))
    assert (lung / "_COMPLETE.json").read_text() == before
    with pytest.raises(HistoError, match="different config"):
        run(PrepareConfig(out=str(lung), labels_csv="default", seed=5))


def test_leakage_guard(tmp_path, lung, unlabeled):
    check_no_overlap(unlabeled, lung)  # disjoint: no error
    # an "unlabeled" folder that contains one of the target's images
    leak = tmp_path / "leaky"
    leak.mkdir()
    (leak / "a.png").write_bytes((default.unlabeled_dir() / "panoptes_colorstandard.png").read_bytes())
    first = lung_rows()[0]["path"]
    csv = labels_csv(tmp_path / "target", n=60)
    target = run(PrepareConfig(out=str(tmp_path / "target_ds"), labels_csv=str(csv), val_frac=0.2, test_frac=0.2,
                               fewshot_fracs=()))
    (leak / "copy.jpg").write_bytes((default.labels_csv().parent / first).read_bytes())
    with pytest.raises(HistoError) as e:
        run(PrepareConfig(out=str(tmp_path / "unl2"), sources=(str(leak),), patch_size=64, min_tissue=0.0,
                          exclude=(str(target),)))
    assert str(target) in str(e.value) and "unl2" in str(e.value) and "copy.jpg" in str(e.value)
    assert not (tmp_path / "unl2").exists()
    ok = run(PrepareConfig(out=str(tmp_path / "unl3"), sources=(str(leak),), min_tissue=0.0))
    with pytest.raises(HistoError, match="share images"):
        check_no_overlap(ok, target)


def test_folder_with_unreadable_tiles_skipped_and_counted(tmp_path, warnings_logged):
    root = class_folders(tmp_path / "nct", per_class=5)
    (root / "LUNG_N" / "broken.tif").write_bytes(b"II*\x00garbage")
    (root / "LUNG_N" / "notes.txt").write_text("hello")
    for i in range(6):
        (root / "LUNG_SCC" / f"readme{i}.md").write_text("x")
    meta, rows = read_dataset(run(PrepareConfig(out=str(tmp_path / "ds"), class_folders=str(root),
                                                val_frac=0.2, test_frac=0.2)))
    assert len(rows) == 15 and meta["skipped"]["count"] == 8
    assert {Path(s["path"]).name for s in meta["skipped"]["files"]} == {"broken.tif", "notes.txt"} | {
        f"readme{i}.md" for i in range(6)}
    # the warning names the first few files, not only a count
    warning = next(m for m in warnings_logged if m.startswith("skipped 8 unreadable"))
    assert "notes.txt, readme0.md, readme1.md" in warning and "and 3 more" in warning, warning


@pytest.mark.slow
def test_full_shared_data_at_64px(shared_data, tmp_path):
    meta, rows = read_dataset(run(PrepareConfig(out=str(tmp_path / "lung"),
                                                labels_csv=str(shared_data / "lc25000_lung" / "labels.csv"))))
    assert len(rows) == 11898 and len({r["group"] for r in rows}) == 586
    assert meta["group_counts"]["train"] and sum(sum(c.values()) for c in meta["group_counts"].values()) == 586
    assert all(len(s) == 1 for s in _split_of_groups(rows).values())
    meta_u, rows_u = read_dataset(run(PrepareConfig(out=str(tmp_path / "unl"),
                                                    sources=(str(shared_data / "unlabeled_he"),),
                                                    exclude=(str(tmp_path / "lung"),))))
    assert 780 <= len(rows_u) <= 900  # README: about 860 without the ink filter
    assert len(meta_u["sources"]) == 5 and meta_u["skipped"]["count"] == 0
    json.dumps(meta_u)


def test_unlabeled_tiles_of_the_cohort_join_the_train_split_only(tmp_path):
    """prepare --unlabeled-tiles: the cohort's unlabeled tiles are train-split rows without a label, each its
    own group, never in a few-shot subset; the labeled tiles' splits and subsets are those made without them;
    a file identical to a labeled tile (the tile itself) and byte-identical copies are skipped and counted."""
    from histodiffusion.data.evaldata import load_real

    rows = lung_rows()
    csv_path = labels_csv(tmp_path / "lab", n=30)
    labeled = {r["path"] for r in read_csv(csv_path, ["path", "label"])}
    src = default.labels_csv().parent
    folder = tmp_path / "cohort"
    new = [r["path"] for r in rows if r["path"] not in labeled][:12]
    for i, rel in enumerate(new):
        dest = folder / ("sub" if i % 2 else "") / Path(rel).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((src / rel).read_bytes())
    (folder / "copy_of_labeled.png").write_bytes((src / sorted(labeled)[0]).read_bytes())
    (folder / "sub" / "zz_duplicate.png").write_bytes((folder / Path(new[0]).name).read_bytes())
    (folder / "notes.txt").write_text("not an image")

    common = dict(labels_csv=str(csv_path), fewshot_fracs=(0.2, 0.5), fewshot_k=(1,))
    plain = run(PrepareConfig(out=str(tmp_path / "plain"), **common))
    out = run(PrepareConfig(out=str(tmp_path / "ds"), unlabeled_tiles=(str(folder),), **common))
    meta, got = read_dataset(out)
    meta0, got0 = read_dataset(plain)
    unl = [r for r in got if not r["label"]]
    assert len(unl) == len(new) and len(got) == len(got0) + len(new)
    assert all(r["split"] == "train" and r["id"].startswith("unlabeled/") and r["group"] == r["id"] for r in unl)
    assert {(r["id"], r["split"]) for r in got if r["label"]} == {(r["id"], r["split"]) for r in got0}
    for name in meta0["subsets"]:
        assert subset_ids(out, got, name) == subset_ids(plain, got0, name), name
    assert meta["counts"] == meta0["counts"] and meta["classes"] == meta0["classes"]
    assert meta["sources"]["unlabeled_tiles"] == {"tiles": len(new), "also_labeled": 1, "duplicates": 1}
    assert len(read_csv(out / "sources.csv", ["path", "sha256"])) == len(labeled) + len(new)
    # the labeled loader leaves them out; the train split as a pool (sample, finetune-decoder) holds them
    train = load_real(out, "train")
    assert len(train) == sum(r["split"] == "train" for r in got0) and (train.labels >= 0).all()
    pool = PixelDataset(out, "train")
    assert len(pool) == len(train) + len(new) and pool[[r["id"] for r in pool.rows].index(unl[0]["id"])][1] == -1

    with pytest.raises(HistoError, match="unlabeled_tiles join a labeled target"):
        run(PrepareConfig(out=str(tmp_path / "bad1"), sources=("default",), unlabeled_tiles=(str(folder),)))
    with pytest.raises(HistoError, match="missing unlabeled tile input"):
        run(PrepareConfig(out=str(tmp_path / "bad2"), unlabeled_tiles=(str(tmp_path / "nope"),), **common))
    assert not (tmp_path / "bad1").exists() and not (tmp_path / "bad2").exists()
