"""judge: the independent class-fidelity judge trains on the train split only (val/test refused, and
asserted on the tiles it trains on, whose count, splits and id/pixel digests judge.json records), fidelity
per class for all and kept samples (a constructed example with known predictions), fidelity.json /
fidelity.csv of a sample directory, reuse of a trained judge, and `score --samples --judge`."""
import csv
import hashlib
import json

import pytest

from helpers_eval import make_class_samples, make_dataset, one_thread, write_filtered
from histodiffusion.cli import main
from histodiffusion.core.fidelity import class_fidelity
from histodiffusion.runtime.config import JudgeConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.stages import judge


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    data = make_dataset(root / "data")
    samples = make_class_samples(root / "samples", n_per_class=6)
    write_filtered(samples, keep_every=2)  # 3 of 6 kept per class
    return {"root": root, "data": data, "samples": samples}


def cfg_of(world, out, **kw):
    kw = {"backbone": "small_cnn_w8", "steps": 6, "batch_size": 8, **kw}
    return JudgeConfig(data=str(world["data"]), out=str(out), **kw)


def test_fidelity_per_class_on_a_constructed_example():
    classes = ["a", "b", "c"]
    targets = ["a"] * 4 + ["b"] * 3 + ["c"] * 2
    preds = ["a", "a", "b", "a", "b", "c", "c", "c", "c"]
    keep = [1, 0, 1, 1, 1, 1, 0, 0, 0]
    f = class_fidelity(targets, preds, classes, keep)
    a = f["all"]
    assert (a["n"], a["hits"]) == (9, 6) and a["fidelity"] == pytest.approx(6 / 9)
    assert [a["per_class"][c]["fidelity"] for c in classes] == [pytest.approx(3 / 4), pytest.approx(1 / 3), 1.0]
    assert a["macro_fidelity"] == pytest.approx((3 / 4 + 1 / 3 + 1) / 3)
    assert a["per_class"]["a"]["predicted"] == {"a": 3, "b": 1, "c": 0}
    assert a["per_class"]["b"]["predicted"] == {"a": 0, "b": 1, "c": 2}
    k = f["kept"]  # kept: a -> a, b, a (2 of 3); b -> b, c (1 of 2); c: none kept
    assert (k["n"], k["hits"]) == (5, 3)
    assert k["per_class"]["a"]["fidelity"] == pytest.approx(2 / 3) and k["per_class"]["b"]["fidelity"] == 0.5
    assert k["per_class"]["c"] == {"n": 0, "hits": 0, "fidelity": None, "ci95": None,
                                   "predicted": {"a": 0, "b": 0, "c": 0}}
    assert k["macro_fidelity"] == pytest.approx((2 / 3 + 0.5) / 2)  # classes without kept samples left out
    lo, hi = a["per_class"]["c"]["ci95"]  # Wilson: 2 of 2 -> [0.342, 1]
    assert lo == pytest.approx(0.3424, abs=1e-3) and hi == 1.0
    assert class_fidelity(targets, preds, classes)["kept"] is None
    with pytest.raises(HistoError, match="not classes of the judge"):
        class_fidelity(["z"], ["a"], classes)


def test_judge_refuses_validation_and_test_tiles(world, tmp_path):
    for subset in ("val", "test", "all"):
        with pytest.raises(HistoError, match="outside the train split"):
            judge.run(cfg_of(world, tmp_path / subset, subset=subset))
        assert not (tmp_path / subset).exists()  # refused before anything is written
    # a hand-made subset file that slips one test tile in among train tiles
    rows = list(csv.DictReader(open(world["data"] / "manifest.csv")))
    ids = [r["id"] for r in rows if r["split"] == "train"][:5] + [next(r["id"] for r in rows if r["split"] == "test")]
    (world["data"] / "subsets" / "sneaky.csv").write_text("id\n" + "\n".join(ids) + "\n")
    try:
        with pytest.raises(HistoError, match=r"1 tile\(s\) outside the train split \(test"):
            judge.run(cfg_of(world, tmp_path / "sneaky", subset="sneaky"))
    finally:
        (world["data"] / "subsets" / "sneaky.csv").unlink()


def _digest(lines) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def test_judge_trains_on_train_tiles_only_and_writes_fidelity(world, tmp_path):
    out = judge.run(cfg_of(world, tmp_path / "j", samples=(str(world["samples"]),)))
    # asserted through judge.json's record of the tiles it was trained on: exactly the train split's tiles
    # (same ids, same pixels), none of val / test
    from histodiffusion.data.evaldata import load_real

    train, held = load_real(world["data"], "train"), [load_real(world["data"], s) for s in ("val", "test")]
    assert not set(train.ids) & (set(held[0].ids) | set(held[1].ids))
    pixels = lambda x: [hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in x.images]  # noqa: E731
    rec = json.loads((out / "judge.json").read_text())
    assert rec["trained_on"] == {"n": len(train), "splits": ["train"], "ids_sha256": _digest(train.ids),
                                 "pixels_sha256": _digest(pixels(train))}
    assert not set(pixels(train)) & set(pixels(held[0]) + pixels(held[1]))
    assert rec["n_train"] == len(train) and rec["train_splits"] == ["train"] and 0 <= rec["val_accuracy"] <= 1
    weights = out / "model" / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    card = (out / "model" / "README.md").read_text()  # its model card, with its real figures
    assert card.startswith("# Independent judge of class fidelity")
    assert f"{rec['n_train']} labeled tiles of subset `train`" in card and "6 steps of batch 8" in card
    assert f"Accuracy on {rec['n_val']} `val` tiles (after training, no checkpoint chosen on them): " \
           f"{rec['val_accuracy']}." in card and f"load_classifier('{out / 'model'}')" in card
    # fidelity.json agrees with the per-sample fidelity.csv, for all and for kept samples
    f = json.loads((world["samples"] / "fidelity.json").read_text())
    rows = list(csv.DictReader(open(world["samples"] / "fidelity.csv")))
    assert len(rows) == 18 and {r["keep"] for r in rows} == {"0", "1"}
    for scope, chosen in (("all", rows), ("kept", [r for r in rows if r["keep"] == "1"])):
        assert f[scope]["n"] == len(chosen) == (18 if scope == "all" else 9)
        for c in f["classes"]:
            mine = [r for r in chosen if r["target"] == c]
            hits = sum(r["judge_pred"] == c for r in mine)
            assert f[scope]["per_class"][c]["hits"] == hits
            assert f[scope]["per_class"][c]["fidelity"] == pytest.approx(hits / len(mine))
    assert f["judge"]["id"] and f["filtered_csv_sha256"] and f["settings"]["scale"] == "10.0"
    assert f["realism"]["fd_name"] == "FD_judge_small_cnn_w8" and f["realism"]["overall"]["n_fake"] == 18
    assert f["realism_kept"]["overall"]["n_fake"] == 9 and 0 <= f["realism_kept"]["overall"]["coverage"] <= 1
    # re-run on another sample directory: the judge is reused, not retrained
    other = make_class_samples(tmp_path / "other", n_per_class=2, seed=5)
    judge.run(cfg_of(world, tmp_path / "j", samples=(str(other),), realism=False))
    assert weights.stat().st_mtime_ns == trained and "judge: reusing" in (out / "log.txt").read_text()
    f2 = json.loads((other / "fidelity.json").read_text())
    assert f2["kept"] is None and f2["realism"] is None and f2["realism_kept"] is None
    assert f2["judge"]["id"] == f["judge"]["id"]
    with pytest.raises(HistoError, match="different config"):
        judge.run(cfg_of(world, tmp_path / "j", steps=7))


def test_score_writes_the_fidelity_table(world, tmp_path):
    judge.run(cfg_of(world, tmp_path / "j"))
    out = tmp_path / "score"
    code = main(["score", "--samples", str(world["samples"]), "--judge", str(tmp_path / "j"), "--out", str(out)])
    assert code == 0
    s = json.loads((out / "scores.json").read_text())
    f = json.loads((out / "fidelity.json").read_text())
    assert s["fidelity"] == f and s["classifiers"] == [] and not (out / "scores.csv").exists()
    assert f["all"]["n"] == 18 and f["kept"]["n"] == 9 and (out / "fidelity.csv").is_file()
    assert f["realism"] is not None  # the judge's dataset is readable
    with pytest.raises(HistoError, match="needs --judge"):
        from histodiffusion.runtime.config import ScoreConfig
        from histodiffusion.stages.evaluate import run_score

        run_score(ScoreConfig(samples=str(world["samples"]), out=str(tmp_path / "s2")))
    with pytest.raises(HistoError, match="no trained judge"):
        run_score(ScoreConfig(samples=str(world["samples"]), judge=str(tmp_path / "none"), out=str(tmp_path / "s3")))
    with pytest.raises(HistoError, match="--classifiers"):
        run_score(ScoreConfig(out=str(tmp_path / "s4")))
    assert not any((tmp_path / d).exists() for d in ("s2", "s3", "s4"))
