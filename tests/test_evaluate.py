"""evaluate / score: every arm and seed trained with one budget, group-disjoint test split (asserted),
resume after a kill, external test sets, re-scoring saved classifiers with one command."""
import csv
import json
import shutil

import pytest

from helpers_eval import make_class_samples, make_dataset, one_thread, write_filtered
from histodiffusion.cli import main
from histodiffusion.config import EvaluateConfig
from histodiffusion.evaluate import run
from histodiffusion.runtime import HistoError

ARMS = ["real", "classic", "selected@1", "unselected@1"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_dataset(root / "data")
    ext = make_dataset(root / "ext", seed=9, name="ext")
    samples = make_class_samples(root / "samples", n_per_class=8)
    write_filtered(samples, keep_every=2)  # 4 kept per class, 6 real per class in frac0.5
    cfg = EvaluateConfig(data=str(data), subset="frac0.5", samples=str(samples), out=str(root / "eval"),
                         ratios=(1.0,), seeds=(0, 1), backbone="small_cnn_w8", epochs=2, steps_per_epoch=2,
                         batch_size=8, external=(str(ext),))
    with one_thread():
        run(cfg)
    return cfg, root


def test_every_arm_and_seed_trained_with_one_budget(evaluated):
    cfg, root = evaluated
    out = root / "eval"
    assert (out / "config.json").is_file() and (out / "_COMPLETE.json").is_file()
    for arm in ARMS:
        for seed in (0, 1):
            d = out / "classifiers" / f"{arm}_{seed}"
            info = json.loads((d / "classifier.json").read_text())
            assert (d / "model.safetensors").is_file() and (d / "_COMPLETE.json").is_file()
            assert info["steps"] == 4 and info["batch_size"] == 8 and info["arm"] == arm
    m = json.loads((out / "metrics.json").read_text())
    test = m["testsets"]["test"]
    assert set(test["arms"]) == set(ARMS)
    assert test["arms"]["real"]["accuracy"]["n"] == 2
    # selected: the 4 kept per class (ratio 1 asks for 6); unselected: the same counts, drawn from all 8
    assert test["arms"]["selected@1"]["n_synthetic"] == {"aca": 4, "benign": 4, "scc": 4}
    assert test["arms"]["unselected@1"]["n_synthetic"] == {"aca": 4, "benign": 4, "scc": 4}
    assert set(test["deltas_vs_real"]) == {"classic", "selected@1", "unselected@1"}
    assert m["arms"] == test["arms"] and m["deltas"] == test["deltas_vs_real"]  # top level: the test split
    d = test["deltas_vs_real"]["classic"]["accuracy"]
    acc = {r["seed"]: float(r["accuracy"]) for r in csv.DictReader(open(out / "per_seed.csv"))
           if r["testset"] == "test" and r["arm"] == "classic"}
    real = {r["seed"]: float(r["accuracy"]) for r in csv.DictReader(open(out / "per_seed.csv"))
            if r["testset"] == "test" and r["arm"] == "real"}
    assert d["mean"] == pytest.approx(sum(acc[s] - real[s] for s in acc) / 2, abs=1e-5)
    assert len(list((out / "confusion").glob("test__*.png"))) == 4


def test_external_test_set_scored(evaluated):
    cfg, root = evaluated
    m = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(m["testsets"]) == {"test", "ext"}
    assert m["testsets"]["ext"]["arms"]["real"]["n_test"] == 72  # all tiles of the external set
    rows = list(csv.DictReader(open(root / "eval" / "per_seed.csv")))
    assert sum(r["testset"] == "ext" for r in rows) == 8
    assert (root / "eval" / "confusion" / "ext__real.png").is_file()


def test_resume_skips_finished_classifiers(evaluated):
    cfg, root = evaluated
    out = root / "eval"
    keep = out / "classifiers" / "real_0" / "model.safetensors"
    before = keep.stat().st_mtime_ns
    victim = out / "classifiers" / "selected@1_1"
    (victim / "_COMPLETE.json").unlink()  # as if killed after saving the weights, before scoring
    (out / "_COMPLETE.json").unlink()
    (out / "metrics.json").unlink()
    run(cfg)
    assert keep.stat().st_mtime_ns == before
    assert (victim / "_COMPLETE.json").is_file() and (out / "metrics.json").is_file()
    assert (out / "_COMPLETE.json").is_file()


def test_test_group_in_training_is_refused(tmp_path):
    data = make_dataset(tmp_path / "leaky", leak=True)
    cfg = EvaluateConfig(data=str(data), subset="frac0.5", out=str(tmp_path / "eval"), arms=("real",), seeds=(0,),
                         backbone="small_cnn_w8", epochs=1, batch_size=8)
    with pytest.raises(HistoError, match="leaks"):
        run(cfg)
    assert not (tmp_path / "eval" / "classifiers").exists()


def test_bad_ratio_and_missing_filter(evaluated, tmp_path):
    cfg, root = evaluated
    with pytest.raises(HistoError, match="asks for 18"):
        run(EvaluateConfig(**{**cfg.__dict__, "ratios": (3.0,), "out": str(tmp_path / "a"), "external": ()}))
    bare = tmp_path / "bare"
    shutil.copytree(cfg.samples, bare)
    (bare / "filtered.csv").unlink()
    with pytest.raises(HistoError, match="select"):
        run(EvaluateConfig(**{**cfg.__dict__, "samples": str(bare), "out": str(tmp_path / "b"), "external": ()}))
    with pytest.raises(HistoError, match="samples"):
        run(EvaluateConfig(**{**cfg.__dict__, "samples": "", "out": str(tmp_path / "c"), "external": ()}))


def test_score_command_rescored_saved_classifier(evaluated, tmp_path):
    cfg, root = evaluated
    out = tmp_path / "score"
    code = main(["score", "--classifiers", str(root / "eval" / "classifiers" / "real_0"), "--data", str(root / "ext"),
                 "--subset", "all", "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 1 and rows[0]["arm"] == "real" and rows[0]["n"] == "72"
    saved = json.loads((root / "eval" / "classifiers" / "real_0" / "scores.json").read_text())
    assert float(rows[0]["accuracy"]) == pytest.approx(saved["scores"]["ext"]["accuracy"], abs=1e-6)
    code = main(["score", "--classifiers", str(root / "eval" / "classifiers"), "--data", cfg.data,
                 "--subset", "test", "--out", str(tmp_path / "all")])
    assert code == 0
    agg = json.loads((tmp_path / "all" / "scores.json").read_text())
    assert set(agg["arms"]) == set(ARMS) and agg["arms"]["real"]["accuracy"]["n"] == 2


def test_two_processes_split_jobs_and_match_one_process(evaluated, tmp_path):
    import os
    import subprocess
    import sys

    cfg, root = evaluated
    out = tmp_path / "eval2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "histodiffusion", "evaluate",
           "--data", cfg.data, "--subset", cfg.subset, "--samples", cfg.samples, "--out", str(out),
           "--arms", "real,classic", "--seeds", "0,1", "--backbone", "small_cnn_w8", "--epochs", "2", "--steps-per-epoch", "2",
           "--batch-size", "8", "--external", cfg.external[0]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "_COMPLETE.json").is_file()

    def rows(p):
        return sorted(tuple(r.items()) for r in csv.DictReader(open(p / "per_seed.csv")) if r["arm"] in ("real", "classic"))

    assert len(rows(out)) == 8  # 2 arms x 2 seeds x (test, ext)
    assert rows(out) == rows(root / "eval")  # same seeds -> same classifiers, whatever the process layout

    # one rank fails (rank 1's saved job real_1 has a corrupt scores.json): every rank stops with an
    # error at once instead of rank 0 waiting for rank 1 at a barrier; nothing is marked complete
    (out / "classifiers" / "real_1" / "scores.json").write_text("{broken")
    (out / "_COMPLETE.json").unlink()
    (out / "metrics.json").unlink()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "real_1" in proc.stderr and "rank(s) [1] failed" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "_COMPLETE.json").exists() and not (out / "metrics.json").exists()
