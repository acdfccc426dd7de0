"""evaluate / score: every arm and seed trained with one budget, best-validation checkpoint scored,
validation curves recorded, the A/A arm, group-disjoint train/val/test (asserted), resume after a kill,
external test sets, re-scoring saved classifiers with one command."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from helpers_eval import (make_class_samples, make_dataset, one_thread, with_starts, write_filtered,
                          write_rows)
from histodiffusion.cli import main
from histodiffusion.runtime.config import EvaluateConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.stages.evaluate import run

ARMS = ["real", "real_aa", "classic", "selected@1", "unselected@1"]


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
                         ratios=(1.0,), seeds=(0, 1), backbone="small_cnn_w8", steps=4, val_every=2,
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
    assert set(test["deltas_vs_real"]) == {"real_aa", "classic", "selected@1", "unselected@1"}
    assert m["arms"] == test["arms"] and m["deltas"] == test["deltas_vs_real"]  # top level: the test split
    assert m["noise_floor"] == test["deltas_vs_real"]["real_aa"]  # the A/A delta, reported beside the others
    assert test["arms"]["real_aa"]["n_synthetic"] == {"aca": 0, "benign": 0, "scc": 0}
    assert m["budget"]["steps"] == 4 and m["budget"]["val_subset"] == "val" and m["budget"]["val_every"] == 2
    d = test["deltas_vs_real"]["classic"]["accuracy"]
    acc = {r["seed"]: float(r["accuracy"]) for r in csv.DictReader(open(out / "per_seed.csv"))
           if r["testset"] == "test" and r["arm"] == "classic"}
    real = {r["seed"]: float(r["accuracy"]) for r in csv.DictReader(open(out / "per_seed.csv"))
            if r["testset"] == "test" and r["arm"] == "real"}
    assert d["mean"] == pytest.approx(sum(acc[s] - real[s] for s in acc) / 2, abs=1e-5)
    assert len(list((out / "confusion").glob("test__*.png"))) == 5


def test_every_downstream_classifier_has_a_model_card(evaluated):
    cfg, root = evaluated
    for arm in ARMS:
        for seed in (0, 1):
            d = root / "eval" / "classifiers" / f"{arm}_{seed}"
            card = (d / "README.md").read_text()
            sc = json.loads((d / "scores.json").read_text())
            info = json.loads((d / "classifier.json").read_text())
            assert card.startswith(f"# Downstream classifier `{arm}`, seed {seed}")
            for ts in ("test", "ext"):  # its real figures, on the test split and the external set
                s = sc["scores"][ts]
                assert f"- {ts}: accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}" in card
            assert f"- Real: {info['n_real']} tiles of subset `frac0.5`" in card and "4 steps of batch 8" in card
            assert ("aca 4, benign 4, scc 4" in card) == (arm in ("selected@1", "unselected@1"))
            assert f"load_classifier('{d}')" in card and "Licence: not recorded" in card


def test_external_test_set_scored(evaluated):
    cfg, root = evaluated
    m = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(m["testsets"]) == {"test", "ext"}
    assert m["testsets"]["ext"]["arms"]["real"]["n_test"] == 72  # all tiles of the external set
    rows = list(csv.DictReader(open(root / "eval" / "per_seed.csv")))
    assert sum(r["testset"] == "ext" for r in rows) == 10
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


def test_best_validation_checkpoint_is_the_one_scored(evaluated):
    from histodiffusion.data.evaldata import load_real
    from histodiffusion.stages.evaluate import score, val_record
    from histodiffusion.models.classifier import load_classifier

    cfg, root = evaluated
    out = root / "eval"
    val, test = load_real(cfg.data, "val"), load_real(cfg.data, "test")
    for arm in ("real", "selected@1"):
        d = out / "classifiers" / f"{arm}_1"
        sc = json.loads((d / "scores.json").read_text())
        v = sc["validation"]
        assert [r["step"] for r in v["curve"]] == [2, 4]  # every val_every steps and after the last
        best = max(v["curve"], key=lambda r: (r["accuracy"], -r["loss"], -r["step"]))
        assert v["best_step"] == best["step"] and v["best"] == best
        model, info = load_classifier(d)
        assert info["checkpoint"] == f"best val step {best['step']}"
        # the saved weights are the best-validation ones, and the test scores are theirs
        assert val_record(model, val)["accuracy"] == pytest.approx(best["accuracy"], abs=1e-9)
        assert val_record(model, val)["loss"] == pytest.approx(best["loss"], abs=1e-5)
        assert score(model, test)["accuracy"] == pytest.approx(sc["scores"]["test"]["accuracy"], abs=1e-9)


def test_validation_curves_recorded_per_arm_and_seed(evaluated):
    cfg, root = evaluated
    out = root / "eval"
    rows = list(csv.DictReader(open(out / "curves.csv")))
    assert len(rows) == len(ARMS) * 2 * 2  # arms x seeds x validation points
    for arm in ARMS:
        for seed in ("0", "1"):
            mine = [r for r in rows if r["arm"] == arm and r["seed"] == seed]
            assert [r["step"] for r in mine] == ["2", "4"] and sum(r["best"] == "1" for r in mine) == 1
    m = json.loads((out / "metrics.json").read_text())
    v = m["validation"]["real"]
    assert v["curve"]["step"] == [2, 4] and v["best_accuracy"]["n"] == 2
    real = [float(r["val_accuracy"]) for r in rows if r["arm"] == "real" and r["step"] == "4"]
    assert v["curve"]["accuracy"][-1] == pytest.approx(sum(real) / 2, abs=1e-5)
    assert v["gain_second_half"] == pytest.approx(v["curve"]["accuracy"][1] - v["curve"]["accuracy"][0])


def test_train_classifier_restores_the_best_validated_weights():
    import torch

    from histodiffusion.models.classifier import build_classifier, train_classifier

    torch.manual_seed(0)
    x = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8)
    y = torch.arange(12) % 3
    script = iter([0.5, 0.9, 0.9, 0.7])  # best at step 2 (step 3 ties on accuracy with a higher loss)
    snaps, history = {}, []

    def validate(model):
        step = len(snaps) + 1
        snaps[step] = {k: v.clone() for k, v in model.state_dict().items()}
        assert not model.training  # validated in eval mode
        return {"accuracy": next(script), "loss": {2: 0.1, 3: 0.2}.get(step, 1.0)}

    kw = dict(steps=4, batch_size=4, lr=1e-2, seed=3)
    torch.manual_seed(0)
    model = train_classifier(build_classifier("small_cnn_w8", 3, 16), x, y, validate=validate, val_every=1,
                             history=history, **kw)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    state = model.state_dict()
    assert all(torch.equal(state[k], snaps[2][k]) for k in state)
    # validation draws no random numbers: without it, the last weights are those validated at step 4
    torch.manual_seed(0)
    plain = train_classifier(build_classifier("small_cnn_w8", 3, 16), x, y, **kw).state_dict()
    assert all(torch.equal(plain[k], snaps[4][k]) for k in plain)


def test_ema_returns_the_weight_average_and_validates_it():
    import torch

    from histodiffusion.models.classifier import build_classifier, train_classifier

    x = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8)
    y = torch.arange(12) % 3
    kw = dict(steps=5, batch_size=4, lr=1e-2, seed=3)
    # the average, rebuilt by hand from the raw weights after every step (decay 0.5: visibly different)
    raw_steps = []

    def record(model):
        raw_steps.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": 0.0}

    torch.manual_seed(0)
    train_classifier(build_classifier("small_cnn_w8", 3, 16), x, y, validate=record, val_every=1, **kw)
    expected = None
    for st in raw_steps:
        expected = {k: v.float().clone() for k, v in st.items()} if expected is None else \
            {k: 0.5 * expected[k] + 0.5 * st[k].float() if st[k].is_floating_point() else st[k] for k in st}
    scored = []
    torch.manual_seed(0)
    model = train_classifier(build_classifier("small_cnn_w8", 3, 16), x, y, ema_decay=0.5, val_every=1,
                             validate=lambda m: scored.append({k: v.clone() for k, v in m.state_dict().items()})
                             or {"accuracy": 0.0}, **kw)
    state = model.state_dict()
    # the first average is the first step's weights; the returned model is the average (all calls tie:
    # the earliest validated average would win, so compare against it), never the raw last weights
    first = scored[0]
    assert all(torch.allclose(first[k].float(), raw_steps[0][k].float()) for k in first)
    assert all(torch.allclose(state[k].float(), first[k].float()) for k in state)
    last = scored[-1]
    assert any(not torch.allclose(last[k].float(), raw_steps[-1][k].float()) for k in last if last[k].is_floating_point())
    assert all(torch.allclose(last[k].float(), expected[k].float(), atol=1e-5) for k in last
               if last[k].is_floating_point() and "num_batches" not in k)
    with pytest.raises(Exception, match="ema_decay"):
        train_classifier(build_classifier("small_cnn_w8", 3, 16), x, y, ema_decay=1.0, **kw)


def test_tta_prediction_does_not_depend_on_the_tile_orientation():
    import torch

    from histodiffusion.models.classifier import build_classifier, predict, train_classifier
    from histodiffusion.core.transforms import dihedral

    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    model = train_classifier(build_classifier("small_cnn_w8", 3, 16), x, torch.arange(6) % 3, steps=6, batch_size=6,
                             lr=3e-2, seed=0)
    turned = dihedral(x.permute(0, 3, 1, 2), 5).permute(0, 2, 3, 1).contiguous()  # a rotation and a flip
    plain, plain_turned = predict(model, x)[0], predict(model, turned)[0]
    assert not torch.allclose(plain, plain_turned, atol=1e-4)  # an untrained CNN is not rotation-invariant
    tta, tta_turned = predict(model, x, tta=True)[0], predict(model, turned, tta=True)[0]
    torch.testing.assert_close(tta, tta_turned, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tta.sum(1), torch.ones(6))


def test_aa_arm_is_real_with_its_own_seed_stream(evaluated, tmp_path):
    from safetensors.torch import load_file

    from histodiffusion.data.evalarms import AA_SEED_OFFSET
    from histodiffusion.core.evalsummary import summarise

    cfg, root = evaluated
    base = {**cfg.__dict__, "samples": "", "external": (), "seeds": (0, 1)}
    # real_aa seed s is exactly real seed s + AA_SEED_OFFSET (nothing else differs)
    run(EvaluateConfig(**{**base, "arms": ("real",), "seeds": (AA_SEED_OFFSET,), "out": str(tmp_path / "r")}))
    a = load_file(str(root / "eval" / "classifiers" / "real_aa_0" / "model.safetensors"))
    b = load_file(str(tmp_path / "r" / "classifiers" / f"real_{AA_SEED_OFFSET}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # the noise floor is the paired real_aa - real difference on the test split, seed by seed
    m = json.loads((root / "eval" / "metrics.json").read_text())
    acc = {(r["arm"], int(r["seed"])): float(r["accuracy"])
           for r in csv.DictReader(open(root / "eval" / "per_seed.csv")) if r["testset"] == "test"}
    floor = [acc[("real_aa", s)] - acc[("real", s)] for s in (0, 1)]
    assert m["noise_floor"]["accuracy"]["mean"] == pytest.approx(sum(floor) / 2, abs=1e-5)
    # the A/A logic: two arms trained alike (no seed offset) have a noise floor of exactly 0
    scores = {s: json.loads((root / "eval" / "classifiers" / f"real_{s}" / "scores.json").read_text()) for s in (0, 1)}
    same = {(arm, s): scores[s] for arm in ("real", "real_aa") for s in (0, 1)}
    aa = summarise(same, ["real", "real_aa"], [0, 1], m["classes"], ["test"])["testsets"]["test"]["deltas_vs_real"]
    assert aa["real_aa"]["accuracy"]["mean"] == 0.0 and aa["real_aa"]["accuracy"]["ci95"] == [0.0, 0.0]
    assert aa["real_aa"]["macro_f1"]["mean"] == 0.0



def test_classic_aa_is_classic_with_its_own_seed_stream(evaluated, tmp_path):
    """The augmented harness's A/A arm: classic_aa seed s trains exactly as classic seed s + offset, and its
    paired delta against classic is reported as noise_floors["classic_aa"]; alone it is refused."""
    from safetensors.torch import load_file

    from histodiffusion.core.evalsummary import summarise
    from histodiffusion.data.evalarms import AA_OF, AA_SEED_OFFSET

    cfg, _ = evaluated
    base = {**cfg.__dict__, "samples": "", "external": (), "seeds": (0,)}
    run(EvaluateConfig(**{**base, "arms": ("classic", "classic_aa"), "out": str(tmp_path / "aa")}))
    run(EvaluateConfig(**{**base, "arms": ("classic",), "seeds": (AA_SEED_OFFSET,), "out": str(tmp_path / "c")}))
    a = load_file(str(tmp_path / "aa" / "classifiers" / "classic_aa_0" / "model.safetensors"))
    b = load_file(str(tmp_path / "c" / "classifiers" / f"classic_{AA_SEED_OFFSET}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    m = json.loads((tmp_path / "aa" / "metrics.json").read_text())
    acc = {r["arm"]: float(r["accuracy"]) for r in csv.DictReader(open(tmp_path / "aa" / "per_seed.csv"))
           if r["testset"] == "test"}
    assert m["noise_floors"]["classic_aa"]["accuracy"]["mean"] == pytest.approx(acc["classic_aa"] - acc["classic"], abs=1e-5)
    assert m["noise_floor"] is None  # no real_aa arm in this run
    # identical scores in both arms: a floor of exactly 0
    sc = json.loads((tmp_path / "aa" / "classifiers" / "classic_0" / "scores.json").read_text())
    floors = summarise({("classic", 0): sc, ("classic_aa", 0): sc}, ["classic", "classic_aa"], [0], m["classes"],
                       ["test"], AA_OF)["testsets"]["test"]["noise_floors"]
    assert floors["classic_aa"]["accuracy"]["mean"] == 0.0
    with pytest.raises(HistoError, match="classic_aa.*add 'classic'"):
        run(EvaluateConfig(**{**base, "arms": ("real", "classic_aa"), "out": str(tmp_path / "alone")}))

def test_test_group_in_training_is_refused(tmp_path):
    data = make_dataset(tmp_path / "leaky", leak=True)
    cfg = EvaluateConfig(data=str(data), subset="frac0.5", out=str(tmp_path / "eval"), arms=("real",), seeds=(0,),
                         backbone="small_cnn_w8", steps=2, batch_size=8)
    with pytest.raises(HistoError, match="leaks"):
        run(cfg)
    assert not (tmp_path / "eval" / "classifiers").exists()


def test_validation_split_checked_and_optional(evaluated, tmp_path):
    cfg, root = evaluated
    base = {**cfg.__dict__, "samples": "", "external": (), "arms": ("real",), "seeds": (0,), "steps": 2}
    # the validation split must share no group with the training subset, nor with test
    with pytest.raises(HistoError, match="training subset are also in the validation split 'train'"):
        run(EvaluateConfig(**{**base, "val_subset": "train", "out": str(tmp_path / "a")}))
    with pytest.raises(HistoError, match="validation split 'test'.*leaks"):
        run(EvaluateConfig(**{**base, "val_subset": "test", "out": str(tmp_path / "b")}))
    no_val = make_dataset(tmp_path / "noval", groups=(4, 0, 2))
    with pytest.raises(HistoError, match="val-every 0"):
        run(EvaluateConfig(**{**base, "data": str(no_val), "out": str(tmp_path / "c")}))
    assert not (tmp_path / "c" / "classifiers").exists()
    run(EvaluateConfig(**{**base, "data": str(no_val), "val_every": 0, "out": str(tmp_path / "d")}))
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["budget"]["checkpoint"] == "last step" and m["validation"] == {}
    assert json.loads((tmp_path / "d" / "classifiers" / "real_0" / "scores.json").read_text())["validation"] is None


def test_epochs_budget_still_works(evaluated, tmp_path):
    cfg, root = evaluated
    run(EvaluateConfig(**{**cfg.__dict__, "samples": "", "external": (), "arms": ("real",), "seeds": (0,),
                          "epochs": 2, "steps_per_epoch": 0, "val_every": 0, "out": str(tmp_path / "e")}))
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["budget"]["steps"] == 2 * 3 and m["budget"]["steps_per_epoch"] == 3  # 18 real tiles, batch 8


def test_bad_ratio_and_missing_filter(evaluated, tmp_path):
    cfg, root = evaluated
    with pytest.raises(HistoError, match="asks for 18"):
        run(EvaluateConfig(**{**cfg.__dict__, "ratios": (3.0,), "out": str(tmp_path / "a"), "external": ()}))
    bare = tmp_path / "bare"
    shutil.copytree(cfg.samples, bare)
    shutil.rmtree(bare / "select")
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


def test_two_processes_split_jobs_and_match_one_process(evaluated, pseudo_evaluated, tmp_path):
    import os
    import subprocess
    import sys

    cfg, root = evaluated
    out = tmp_path / "eval2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "histodiffusion", "evaluate",
           "--data", cfg.data, "--subset", cfg.subset, "--samples", cfg.samples, "--out", str(out),
           "--arms", "real,classic,pseudo,pseudo+selected", "--ratios", "0.5", "--seeds", "0,1", "--backbone", "small_cnn_w8", "--steps", "4", "--val-every", "2",
           "--batch-size", "8", "--external", cfg.external[0]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "_COMPLETE.json").is_file()

    def rows(p):
        return sorted(tuple(r.items()) for r in csv.DictReader(open(p / "per_seed.csv")) if r["arm"] in ("real", "classic"))

    assert len(rows(out)) == 8  # 2 arms x 2 seeds x (test, ext)
    assert rows(out) == rows(root / "eval")  # same seeds -> same classifiers, whatever the process layout
    # the pseudo arm reads the pool with both ranks' classic classifiers, after both finished
    pseudo = [sorted(tuple(r.items()) for r in csv.DictReader(open(p / "per_seed.csv"))
                     if r["arm"] in ("pseudo@0.5", "pseudo+selected@0.5") and r["testset"] == "test")
              for p in (out, Path(pseudo_evaluated[0].out))]
    assert len(pseudo[0]) == 4 and pseudo[0] == pseudo[1]
    assert (out / "pseudo_labels.csv").read_bytes() == (Path(pseudo_evaluated[0].out) / "pseudo_labels.csv").read_bytes()

    # one rank fails (rank 1's saved job real_1 has a corrupt scores.json): every rank stops with an
    # error at once instead of rank 0 waiting for rank 1 at a barrier; nothing is marked complete
    (out / "classifiers" / "real_1" / "scores.json").write_text("{broken")
    (out / "_COMPLETE.json").unlink()
    (out / "metrics.json").unlink()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "real_1" in proc.stderr and "rank(s) [1] failed" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "_COMPLETE.json").exists() and not (out / "metrics.json").exists()


def test_help_shows_the_budget_and_seed_defaults(capsys):
    with pytest.raises(SystemExit) as e:  # help texts with a literal % (e.g. "LC25000 5%") must format
        main(["evaluate", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 500)" in text and "5%" in text and "real_aa" in text and "(default: 0,1,2,3,4)" in text


def test_synthetic_arms_are_also_paired_against_classic():
    """The synthetic arms train with classic augmentation: summarise pairs them against classic as well as
    real, seed by seed; the A/A and real arms get no delta vs classic, and without a classic arm there is none."""
    from histodiffusion.core.evalsummary import summarise
    from histodiffusion.data.evalarms import AA_OF

    def sc(acc):
        return {"scores": {"test": {"accuracy": acc, "macro_f1": acc / 2, "n": 10, "sensitivity": {"a": acc},
                                    "specificity": {"a": acc}}}}

    acc = {"real": (0.70, 0.74), "classic": (0.72, 0.80), "classic_aa": (0.75, 0.77), "selected@1": (0.80, 0.83)}
    results = {(arm, s): sc(v[s]) for arm, v in acc.items() for s in (0, 1)}
    r = summarise(results, list(acc), [0, 1], ["a"], ["test"], AA_OF)["testsets"]["test"]
    assert set(r["deltas_vs_classic"]) == {"selected@1"}
    d = r["deltas_vs_classic"]["selected@1"]["accuracy"]
    assert d["mean"] == pytest.approx(((0.80 - 0.72) + (0.83 - 0.80)) / 2) and d["seeds"] == [0, 1]
    assert r["deltas_vs_classic"]["selected@1"]["macro_f1"]["mean"] == pytest.approx(d["mean"] / 2)
    assert r["deltas_vs_real"]["selected@1"]["accuracy"]["mean"] == pytest.approx(((0.80 - 0.70) + (0.83 - 0.74)) / 2)
    assert r["noise_floors"]["classic_aa"]["accuracy"]["mean"] == pytest.approx(((0.75 - 0.72) + (0.77 - 0.80)) / 2)
    no_classic = {k: v for k, v in results.items() if k[0] in ("real", "selected@1")}
    assert summarise(no_classic, ["real", "selected@1"], [0, 1], ["a"], ["test"])["testsets"]["test"][
        "deltas_vs_classic"] == {}


def test_synthetic_weight_changes_only_the_synthetic_arms(evaluated, tmp_path):
    """--synthetic-weight: recorded per classifier and in metrics.json; the real arm is the same classifier
    bit for bit, the selected arm another one (its synthetic images weigh less in the loss)."""
    from safetensors.torch import load_file

    cfg, root = evaluated
    out = tmp_path / "w"
    run(EvaluateConfig(**{**cfg.__dict__, "arms": ("real", "selected"), "seeds": (0,), "external": (),
                          "synthetic_weight": 0.25, "out": str(out)}))

    def weights(d):
        return load_file(str(d / "model.safetensors"))

    for arm, same in (("real", True), ("selected@1", False)):
        a, b = weights(root / "eval" / "classifiers" / f"{arm}_0"), weights(out / "classifiers" / f"{arm}_0")
        assert all(a[k].equal(b[k]) for k in a) is same, arm
    info = json.loads((out / "classifiers" / "selected@1_0" / "classifier.json").read_text())
    assert info["synthetic_weight"] == 0.25
    assert json.loads((out / "classifiers" / "real_0" / "classifier.json").read_text())["synthetic_weight"] is None
    assert json.loads((out / "metrics.json").read_text())["budget"]["synthetic_weight"] == 0.25


def test_real_finish_fine_tunes_only_the_synthetic_arms_on_real_tiles(evaluated, tmp_path):
    """--real-finish: the synthetic arm's last steps train on its real tiles only (another classifier), the
    real arm is the same classifier bit for bit; the finish is recorded per classifier and in metrics.json."""
    from safetensors.torch import load_file

    cfg, root = evaluated
    out = tmp_path / "f"
    run(EvaluateConfig(**{**cfg.__dict__, "arms": ("real", "selected"), "seeds": (0,), "external": (),
                          "real_finish": 0.5, "out": str(out)}))
    for arm, same in (("real", True), ("selected@1", False)):
        a = load_file(str(root / "eval" / "classifiers" / f"{arm}_0" / "model.safetensors"))
        b = load_file(str(out / "classifiers" / f"{arm}_0" / "model.safetensors"))
        assert all(a[k].equal(b[k]) for k in a) is same, arm
    info = json.loads((out / "classifiers" / "selected@1_0" / "classifier.json").read_text())
    assert info["real_finish_steps"] == round(0.5 * info["steps"]) > 0
    assert json.loads((out / "classifiers" / "real_0" / "classifier.json").read_text())["real_finish_steps"] is None
    assert json.loads((out / "metrics.json").read_text())["budget"]["real_finish"] == 0.5


def test_real_finish_must_leave_mixed_steps():
    from histodiffusion.stages.evaluate import budget

    assert budget(EvaluateConfig(steps=10, real_finish=0.9), 100) == (10, 0)
    with pytest.raises(HistoError, match="real_finish 0.96 leaves no step of the 10"):
        budget(EvaluateConfig(steps=10, real_finish=0.96), 100)
    assert budget(EvaluateConfig(epochs=2, batch_size=30), 100) == (8, 4)


def test_finish_steps_draw_only_the_first_images_and_leave_the_earlier_steps_alone():
    """The last finish_steps batches hold only images < finish_n, without repeats within a pass; the steps
    before the switch draw exactly the batches of an unfinished training."""
    import torch
    from torch import nn

    from histodiffusion.models.classifier import train_classifier

    class Recorder(nn.Module):  # reads each image's index from its pixels
        def __init__(self):
            super().__init__()
            self.lin, self.seen = nn.Linear(3, 3), []

        def forward(self, x):
            self.seen.append(sorted(((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()))
            return self.lin(x.mean(dim=(2, 3)))

    x = torch.arange(12, dtype=torch.uint8)[:, None, None, None].expand(12, 4, 4, 3).contiguous()
    y = torch.arange(12) % 3
    kw = dict(steps=9, batch_size=4, lr=1e-2, seed=5)
    plain, finished = Recorder(), Recorder()
    train_classifier(plain, x, y, **kw)
    train_classifier(finished, x, y, finish_n=6, finish_steps=3, **kw)
    assert finished.seen[:6] == plain.seen[:6] and finished.seen[6:] != plain.seen[6:]
    tail = finished.seen[6:]
    assert all(i < 6 for b in tail for i in b) and all(len(set(b)) == 4 for b in tail)  # a permutation each pass
    with pytest.raises(HistoError, match="finish_steps must be in"):
        train_classifier(Recorder(), x, y, finish_n=6, finish_steps=9, **kw)
    with pytest.raises(HistoError, match="finish_n in"):
        train_classifier(Recorder(), x, y, finish_n=0, finish_steps=2, **kw)


def test_sample_weight_scales_each_image_in_the_loss():
    """Images of near-zero weight barely move the model: their labels hardly matter; at weight 1 they do."""
    import torch

    from histodiffusion.models.classifier import build_classifier, train_classifier

    torch.manual_seed(0)
    x = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8)
    y = torch.arange(12) % 3
    y_other = y.clone()
    y_other[6:] = (y[6:] + 1) % 3  # the last six ("synthetic") images with other labels
    kw = dict(steps=6, batch_size=6, lr=1e-2, seed=3)

    def trained(labels, w):
        torch.manual_seed(0)
        weight = None if w is None else torch.cat([torch.ones(6), torch.full((6,), w)])
        return train_classifier(build_classifier("small_cnn_w8", 3, 16), x, labels, sample_weight=weight,
                                **kw).state_dict()

    def gap(a, b):
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    assert gap(trained(y, 1e-6), trained(y_other, 1e-6)) < 1e-3
    assert gap(trained(y, 1.0), trained(y_other, 1.0)) > 1e-2
    ones, plain = trained(y, 1.0), trained(y, None)  # weight 1 everywhere: the plain mean
    assert gap(ones, plain) < 1e-5
    with pytest.raises(HistoError, match="sample_weight"):
        train_classifier(build_classifier("small_cnn_w8", 3, 16), x, y, sample_weight=torch.zeros(12), **kw)
    with pytest.raises(HistoError, match=r"one positive weight per image \(12\), got shape \(0,\)$"):
        train_classifier(build_classifier("small_cnn_w8", 3, 16), x, y, sample_weight=torch.ones(0), **kw)


def test_channels_last_training_is_the_same_training_in_another_layout():
    """The fast layout changes only the order of float sums: the same training up to rounding (which AdamW's
    normalised steps can turn into a step of about lr on a weight whose gradient is near 0), returned in
    the default (contiguous, saveable) layout."""
    import torch

    from histodiffusion.models.classifier import build_classifier, train_classifier

    x = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8)
    y = torch.arange(12) % 3
    kw = dict(steps=4, batch_size=4, lr=1e-3, seed=3, augment=True)

    def trained(channels_last):
        torch.manual_seed(0)
        return train_classifier(build_classifier("small_cnn_w8", 3, 16), x, y, channels_last=channels_last, **kw)

    fast, plain = trained(True), trained(False)
    for k, v in fast.state_dict().items():
        assert v.is_contiguous(), k
        assert float((v.float() - plain.state_dict()[k].float()).abs().max()) <= 1e-3, k
    torch.manual_seed(0)
    start = build_classifier("small_cnn_w8", 3, 16).state_dict()  # the initial weights of both
    assert any(not torch.allclose(v.float(), start[k].float()) for k, v in fast.state_dict().items()
               if v.is_floating_point())  # it did train


def test_balanced_training_in_channels_last_is_the_same_training():
    """train_balanced (the image baseline's and the auxiliary classifier's loop) in the fast layout: the same
    training up to rounding, the model left in the default layout."""
    import numpy as np
    import torch

    from histodiffusion.data.batches import train_balanced
    from histodiffusion.models.classifier import build_classifier

    g = torch.Generator().manual_seed(0)
    ds = [(torch.rand(3, 16, 16, generator=g) * 2 - 1, i % 3, f"t{i}") for i in range(12)]
    by_class = [np.arange(c, 12, 3) for c in range(3)]

    def trained(channels_last):
        torch.manual_seed(0)
        clf = build_classifier("small_cnn_w8", 3, 16)
        train_balanced(clf, ds, by_class, 4, 6, 1e-3, 0.0, seed=5, augment=True, channels_last=channels_last)
        return clf

    fast, plain = trained(True), trained(False)
    torch.manual_seed(0)
    start = build_classifier("small_cnn_w8", 3, 16).state_dict()
    for k, v in fast.state_dict().items():
        assert v.is_contiguous(), k
        assert float((v.float() - plain.state_dict()[k].float()).abs().max()) <= 1e-3, k
    assert any(not torch.allclose(v.float(), start[k].float()) for k, v in fast.state_dict().items()
               if v.is_floating_point())
    assert not fast.training


# --------------------------------------------------------------------------------------------
# pseudo@R: the pseudo-labelling baseline (train tiles outside the subset, read by another arm's classifiers)
# --------------------------------------------------------------------------------------------
PSEUDO_ARMS = ("real", "classic", "selected", "pseudo", "pseudo+selected")


@pytest.fixture(scope="module")
def pseudo_evaluated(evaluated):
    cfg, root = evaluated
    pcfg = EvaluateConfig(**{**cfg.__dict__, "arms": PSEUDO_ARMS, "ratios": (0.5,), "external": (),
                             "out": str(root / "eval_pseudo")})
    with one_thread():
        run(pcfg)
    return pcfg, root


def test_pseudo_arm_trains_on_the_pool_as_the_reader_reads_it(pseudo_evaluated):
    import torch

    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.models.classifier import load_classifier, predict

    cfg, root = pseudo_evaluated
    out = Path(cfg.out)
    rows = list(csv.DictReader(open(out / "pseudo_labels.csv")))
    subset = {r["id"] for r in PixelDataset(cfg.data, "frac0.5").rows}
    train = PixelDataset(cfg.data, "train")
    pool = [i for i, r in enumerate(train.rows) if r["id"] not in subset]
    assert [r["id"] for r in rows] == [train.rows[i]["id"] for i in pool] and len(rows) == 18
    assert all(r["label"] for r in rows)  # the pool's own labels, recorded for the measurement
    # the pseudo-label: argmax of the mean probability of the reader arm's classifiers (classic, seeds 0 and 1)
    images = torch.stack([train.uint8(i) for i in pool])
    probs = sum(predict(load_classifier(out / "classifiers" / f"classic_{s}")[0], images)[0] for s in (0, 1)) / 2
    classes = ["aca", "benign", "scc"]
    assert [r["pseudo_label"] for r in rows] == [classes[int(k)] for k in probs.argmax(1)]
    assert [float(r["confidence"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)
    m = json.loads((out / "metrics.json").read_text())
    ps = m["pseudo"]
    assert ps["reader"] == "classic" and ps["pool"] == 18 and sum(ps["read_as"].values()) == 18
    right = sum(r["pseudo_label"] == r["label"] for r in rows) / 18
    assert ps["pool_right"]["right"] == pytest.approx(right, abs=1e-4)
    # quota(0.5, 6 real per class) = 3 per class, the most confident of those read as the class (fewer when
    # the reader reads fewer as it)
    n_syn = m["arms"]["pseudo@0.5"]["n_synthetic"]
    for c in classes:
        read = sorted((float(r["confidence"]) for r in rows if r["pseudo_label"] == c), reverse=True)
        assert n_syn[c] == min(3, len(read)) == ps["chosen"]["pseudo@0.5"][c]["n"]
        # class_rank: 1, 2, ... down the class's confidence order
        ranked = sorted((int(r["class_rank"]), float(r["confidence"])) for r in rows if r["pseudo_label"] == c)
        assert [k for k, _ in ranked] == list(range(1, len(read) + 1)) and [v for _, v in ranked] == read
    assert "pseudo@0.5" in m["deltas_vs_classic"]
    assert set(m["deltas_vs_pseudo"]) == {"selected@0.5", "pseudo+selected@0.5"}
    d = m["deltas_vs_pseudo"]["selected@0.5"]["accuracy"]
    acc = {(r["arm"], r["seed"]): float(r["accuracy"]) for r in csv.DictReader(open(out / "per_seed.csv"))
           if r["testset"] == "test"}
    assert d["mean"] == pytest.approx(sum(acc[("selected@0.5", s)] - acc[("pseudo@0.5", s)] for s in "01") / 2,
                                      abs=1e-5)


def test_pseudo_arm_never_reads_the_pool_labels(pseudo_evaluated, tmp_path):
    """The same cohort with its pool tiles unlabeled (label ""): the same pseudo-labels and bit-identical pseudo
    classifiers; only the measurement column is empty."""
    from safetensors.torch import load_file

    cfg, root = pseudo_evaluated
    data = make_dataset(tmp_path / "data", pool_label="")
    out = tmp_path / "eval"
    run(EvaluateConfig(**{**cfg.__dict__, "data": str(data), "arms": ("classic", "pseudo"), "out": str(out)}))
    a = list(csv.DictReader(open(Path(cfg.out) / "pseudo_labels.csv")))
    b = list(csv.DictReader(open(out / "pseudo_labels.csv")))
    assert [r["pseudo_label"] for r in a] == [r["pseudo_label"] for r in b] and not any(r["label"] for r in b)
    for s in (0, 1):
        x = load_file(str(Path(cfg.out) / "classifiers" / f"pseudo@0.5_{s}" / "model.safetensors"))
        y = load_file(str(out / "classifiers" / f"pseudo@0.5_{s}" / "model.safetensors"))
        assert all(x[k].equal(y[k]) for k in x)
    assert json.loads((out / "metrics.json").read_text())["pseudo"]["pool_right"]["n_labeled"] == 0


def test_pseudo_random_draws_per_seed_from_the_tiles_read_as_the_class(pseudo_evaluated, tmp_path):
    from histodiffusion.data.evalarms import pseudo_pool, pseudo_sets, training_set
    from histodiffusion.data.evaldata import load_real
    from histodiffusion.models.classifier import load_classifier

    cfg, root = pseudo_evaluated
    rcfg = EvaluateConfig(**{**cfg.__dict__, "pseudo_rank": "random"})
    real = load_real(cfg.data, cfg.subset)
    pool, copies = pseudo_pool(rcfg, real)
    assert copies == 0 and len(pool) == 18
    readers = [load_classifier(Path(cfg.out) / "classifiers" / f"classic_{s}")[0] for s in (0, 1)]
    arms = [("pseudo@0.5", "pseudo", 0.5)]
    ps = pseudo_sets(rcfg, arms, real, pool, readers)
    draws = [training_set("pseudo", "pseudo@0.5", s, real, [ps]) for s in (0, 1, 0)]
    assert draws[0][0].equal(draws[2][0])  # seeded by the training seed
    for x, y, counts in draws:
        assert x.shape[0] == len(real) + sum(counts.values())
        added = y[len(real):]
        assert (added == ps["labels"][torch_index(x[len(real):], pool.images)]).all()
    # pseudo_rank confidence: the same count per class, the reader's most confident tiles of the class
    best = pseudo_sets(cfg, arms, real, pool, readers)
    x, y, counts = training_set("pseudo", "pseudo@0.5", 0, real, [best])
    assert counts == draws[0][2]
    conf = best["probs"].max(1).values
    for ci, c in enumerate(real.classes):
        took = torch_index(x[len(real):], pool.images)[y[len(real):] == ci]
        of_class = conf[best["labels"] == ci].sort(descending=True).values
        assert conf[took].sort(descending=True).values.tolist() == of_class[:counts[c]].tolist()


def test_pseudo_selected_arm_adds_both_arms_images(pseudo_evaluated):
    """pseudo+selected@R trains on the real tiles, selected@R's kept samples and pseudo@R's pool tiles, each with
    the label its own arm gives it; the saved classifier records both counts."""
    import torch

    from histodiffusion.data.evalarms import expand_arms, pseudo_pool, pseudo_sets, synthetic_sets, training_set
    from histodiffusion.data.evaldata import load_real
    from histodiffusion.models.classifier import load_classifier

    cfg, root = pseudo_evaluated
    real = load_real(cfg.data, cfg.subset)
    arms = expand_arms(cfg.arms, cfg.ratios, True)
    syn = synthetic_sets(cfg, arms, real)
    readers = [load_classifier(Path(cfg.out) / "classifiers" / f"classic_{s}")[0] for s in (0, 1)]
    ps = pseudo_sets(cfg, arms, real, pseudo_pool(cfg, real)[0], readers)
    xs, ys, cs = training_set("selected", "selected@0.5", 0, real, [*syn, ps])
    xp, yp, cp = training_set("pseudo", "pseudo@0.5", 0, real, [*syn, ps])
    x, y, counts = training_set("pseudo+selected", "pseudo+selected@0.5", 0, real, [*syn, ps])
    n = len(real)
    assert x.equal(torch.cat([xs, xp[n:]])) and y.equal(torch.cat([ys, yp[n:]]))
    assert counts == {c: cs[c] + cp[c] for c in real.classes} and sum(cs.values()) > 0 and sum(cp.values()) > 0
    saved = json.loads((Path(cfg.out) / "classifiers" / "pseudo+selected@0.5_0" / "classifier.json").read_text())
    assert saved["n_synthetic"] == counts and saved["kind"] == "pseudo+selected"
    m = json.loads((Path(cfg.out) / "metrics.json").read_text())
    d = m["deltas_vs_pseudo"]["pseudo+selected@0.5"]["accuracy"]
    acc = {(r["arm"], r["seed"]): float(r["accuracy"]) for r in csv.DictReader(open(Path(cfg.out) / "per_seed.csv"))
           if r["testset"] == "test"}
    assert d["mean"] == pytest.approx(sum(acc[("pseudo+selected@0.5", s)] - acc[("pseudo@0.5", s)]
                                          for s in "01") / 2, abs=1e-5)


def torch_index(images, pool_images):
    """Positions in pool_images of each of `images` (exact pixel matches)."""
    import torch

    flat = pool_images.flatten(1)
    return torch.tensor([int((flat == im.flatten()).all(1).nonzero()[0]) for im in images])


def test_pseudo_arm_bad_options(evaluated, tmp_path, capsys):
    cfg, root = evaluated
    base = {**cfg.__dict__, "samples": "", "external": (), "ratios": (1.0,)}
    with pytest.raises(HistoError, match="pseudo_reader 'classic' is not"):
        run(EvaluateConfig(**{**base, "arms": ("real", "pseudo"), "out": str(tmp_path / "a")}))
    assert main(["evaluate", "--data", cfg.data, "--arms", "classic,pseudo", "--pseudo-rank", "best",
                 "--out", str(tmp_path / "b")]) != 0
    assert "pseudo_rank" in capsys.readouterr().err
    with pytest.raises(HistoError, match="outside the training subset 'train'"):
        run(EvaluateConfig(**{**base, "subset": "train", "arms": ("classic", "pseudo"), "out": str(tmp_path / "c")}))
    with pytest.raises(HistoError, match="arm 'pseudo\\+selected' needs synthetic samples"):
        run(EvaluateConfig(**{**base, "arms": ("classic", "pseudo+selected"), "out": str(tmp_path / "d")}))
    for d in "abcd":  # refused before any classifier trained
        assert not (tmp_path / d / "classifiers").exists()


# --------------------------------------------------------------------------------------------
# start@R: the raw tiles selected@R's samples started from, with the samples' labels (no diffusion step)
# --------------------------------------------------------------------------------------------
def arm_training_sets(cfg: EvaluateConfig, *kinds: str):
    """(the real subset, the synthetic sets, per kind the (images, labels, counts) its arm at ratio 0.5 trains on
    with seed 0) of an evaluation config."""
    from histodiffusion.data.evalarms import expand_arms, synthetic_sets, training_set
    from histodiffusion.data.evaldata import load_real

    real = load_real(cfg.data, cfg.subset)
    sets = synthetic_sets(cfg, expand_arms(cfg.arms, cfg.ratios, True), real)
    return real, sets, [training_set(k, f"{k}@0.5", 0, real, sets) for k in kinds]


@pytest.fixture(scope="module")
def start_evaluated(evaluated):
    cfg, root = evaluated
    samples = with_starts(Path(cfg.samples), cfg.data, root / "samples_start")
    scfg = EvaluateConfig(**{**cfg.__dict__, "samples": str(samples), "arms": ("selected", "start"),
                             "ratios": (0.5,), "external": (), "out": str(root / "eval_start")})
    with one_thread():
        run(scfg)
    return scfg, root


def test_start_arm_trains_on_the_kept_samples_starting_tiles_with_their_labels(start_evaluated):
    import torch

    from histodiffusion.core.transforms import dihedral
    from histodiffusion.data.datasets import PixelDataset

    cfg, root = start_evaluated
    real, _, ((xs, ys, cs), (x, y, counts)) = arm_training_sets(cfg, "selected", "start")
    n = len(real)
    assert counts == cs and sum(counts.values()) == 9 and y.equal(ys)  # quota(0.5, 6) = 3 kept per class
    assert not x[n:].equal(xs[n:])  # the tiles, not the samples
    # each added image: the train tile its sample names, turned by the sample's init_dihedral
    rows = {r["id"]: r for r in csv.DictReader(open(Path(cfg.samples) / "samples.csv"))}
    kept = [f for f in csv.DictReader(open(Path(cfg.samples) / "select" / "filtered.csv")) if f["keep"] == "1"]
    order = [f["id"] for c in real.classes for f in sorted((f for f in kept if f["target"] == c),
                                                            key=lambda f: int(f["rank"]))[:3]]
    train = PixelDataset(cfg.data, "train")
    at = {r["id"]: j for j, r in enumerate(train.rows)}
    want = torch.stack([dihedral(train.uint8(at[rows[i]["init_id"]]), int(rows[i]["init_dihedral"]), dims=(0, 1))
                        for i in order])
    assert x[n:].equal(want)
    assert [real.classes[int(k)] for k in y[n:]] == [rows[i]["target"] for i in order]
    # metrics: selected@R against start@R, recomputed from per_seed.csv; the starting tiles measured
    m = json.loads((Path(cfg.out) / "metrics.json").read_text())
    acc = {(r["arm"], r["seed"]): float(r["accuracy"]) for r in csv.DictReader(open(Path(cfg.out) / "per_seed.csv"))
           if r["testset"] == "test"}
    d = m["deltas_vs_start"]["selected@0.5"]["accuracy"]
    assert d["mean"] == pytest.approx(sum(acc[("selected@0.5", s)] - acc[("start@0.5", s)] for s in "01") / 2,
                                      abs=1e-5)
    st = m["start"]["start@0.5"]
    tiles = {rows[i]["init_id"] for i in order}
    assert st["distinct_tiles"] == len(tiles)
    assert st["training_subset_tiles"] == len(tiles & set(real.ids))
    right = [train.rows[at[rows[i]["init_id"]]]["label"] == rows[i]["target"] for i in order]
    assert st["right_all"] == {"right": round(sum(right) / 9, 4), "n_labeled": 9, "n": 9} and 0 < sum(right) < 9
    # start_tiles.csv: the tiles the arm adds, in class and keep-list order, with the labels it trains them with
    listed = list(csv.DictReader(open(Path(cfg.out) / "start_tiles.csv")))
    assert [(r["sample_id"], r["tile_id"], r["dihedral"], r["target"]) for r in listed] == [
        (i, rows[i]["init_id"], rows[i]["init_dihedral"], rows[i]["target"]) for i in order]
    assert [r["class_rank"] for r in listed] == ["1", "2", "3"] * 3 and {r["arm"] for r in listed} == {"start@0.5"}


def test_start_arm_refuses_samples_without_a_starting_tile_the_dataset_has(evaluated, start_evaluated, tmp_path):
    cfg, root = evaluated
    base = {**cfg.__dict__, "arms": ("start",), "ratios": (0.5,), "external": ()}
    with pytest.raises(HistoError, match=r"sample 's00000' in .*samples.csv has no starting tile \(init_id"):
        run(EvaluateConfig(**{**base, "out": str(tmp_path / "a")}))  # samples made from noise
    samples = tmp_path / "s"
    shutil.copytree(start_evaluated[0].samples, samples)
    text = (samples / "samples.csv").read_text()
    first = next(csv.DictReader(open(samples / "samples.csv")))["init_id"]
    (samples / "samples.csv").write_text(text.replace(f",{first},", ",elsewhere-7,", 1))
    with pytest.raises(HistoError, match="starts from tile 'elsewhere-7', which is not a train-split tile"):
        run(EvaluateConfig(**{**base, "samples": str(samples), "out": str(tmp_path / "b")}))
    rows = list(csv.DictReader(open(start_evaluated[0].samples + "/samples.csv")))
    rows[0]["init_dihedral"] = "9"
    write_rows(samples / "samples.csv", rows)
    with pytest.raises(HistoError, match="sample 's00000' in .* has init_dihedral '9', not 0..7"):
        run(EvaluateConfig(**{**base, "samples": str(samples), "out": str(tmp_path / "c")}))
    for d in "abc":  # refused before any classifier trained
        assert not (tmp_path / d / "classifiers").exists()


# --------------------------------------------------------------------------------------------
# roundtrip@R: start@R's tiles after one pass through the samples' own autoencoder (no denoising step)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roundtrip_evaluated(start_evaluated):
    from helpers_pretrain import make_vae

    from histodiffusion.models.autoencoder import vae_id

    cfg, root = start_evaluated
    samples = root / "samples_roundtrip"
    shutil.copytree(cfg.samples, samples)
    vae = make_vae(samples / "pipeline" / "vae", scaling_factor=0.7)  # the samples' decoder (as sample writes it)
    rows = list(csv.DictReader(open(samples / "samples.csv")))
    write_rows(samples / "samples.csv", [{**r, "vae_id": vae_id(vae)} for r in rows])
    rcfg = EvaluateConfig(**{**cfg.__dict__, "samples": str(samples), "arms": ("selected", "start", "roundtrip"),
                             "out": str(root / "eval_roundtrip")})
    for arm in ("selected", "start"):  # the same classifiers as the start evaluation's: reuse them
        for s in cfg.seeds:
            shutil.copytree(Path(cfg.out) / "classifiers" / f"{arm}@0.5_{s}",
                            Path(rcfg.out) / "classifiers" / f"{arm}@0.5_{s}")
    with one_thread():
        run(rcfg)
    return rcfg, root


def test_roundtrip_arm_trains_on_the_starting_tiles_through_the_samples_autoencoder(roundtrip_evaluated):
    import torch

    from histodiffusion.core.transforms import dihedral
    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.models.autoencoder import load_vae

    cfg, root = roundtrip_evaluated
    real, sets, ((xs, ys, cs), (x, y, counts)) = arm_training_sets(cfg, "start", "roundtrip")
    assert [e["kind"] for e in sets] == ["samples", "start", "roundtrip"]
    n = len(real)
    assert counts == cs and sum(counts.values()) == 9 and y.equal(ys)  # the same samples, labels and count
    # each added image: the start arm's tile unturned, encoded to its posterior mean, turned in latent space by
    # the sample's init_dihedral, decoded by <samples>/pipeline/vae
    vae = load_vae(Path(cfg.samples) / "pipeline" / "vae")
    rows = {r["id"]: r for r in csv.DictReader(open(Path(cfg.samples) / "samples.csv"))}
    listed = list(csv.DictReader(open(Path(cfg.out) / "start_tiles.csv")))  # start@0.5's tiles, in training order
    assert len(listed) == 9 and {r["arm"] for r in listed} == {"start@0.5"}  # roundtrip arms list none
    turns = [int(rows[r["sample_id"]]["init_dihedral"]) for r in listed]
    train = PixelDataset(cfg.data, "train")
    at = {r["id"]: j for j, r in enumerate(train.rows)}
    raw = torch.stack([train.uint8(at[r["tile_id"]]) for r in listed])  # unturned
    with torch.no_grad():
        mean = vae.encode(raw.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
        z = torch.stack([dihedral(m, k) for m, k in zip(mean, turns)])
        want = ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (x[n:].int() - want.int()).abs().max() <= 1 and not x[n:].equal(xs[n:])
    # metrics: roundtrip@R against start@R (the autoencoder's cost), selected@R against roundtrip@R (the
    # denoising step's gain), recomputed from per_seed.csv
    m = json.loads((Path(cfg.out) / "metrics.json").read_text())
    acc = {(r["arm"], r["seed"]): float(r["accuracy"]) for r in csv.DictReader(open(Path(cfg.out) / "per_seed.csv"))
           if r["testset"] == "test"}
    assert set(m["deltas_vs_start"]) == {"selected@0.5", "roundtrip@0.5"} and set(m["deltas_vs_roundtrip"]) == {
        "selected@0.5"}
    for key, arm, ref in (("deltas_vs_start", "roundtrip@0.5", "start@0.5"),
                          ("deltas_vs_roundtrip", "selected@0.5", "roundtrip@0.5")):
        assert m[key][arm]["accuracy"]["mean"] == pytest.approx(
            sum(acc[(arm, s)] - acc[(ref, s)] for s in "01") / 2, abs=1e-5)
    assert set(m["start"]) == {"start@0.5"}


def test_roundtrip_arm_needs_the_samples_own_autoencoder(roundtrip_evaluated, tmp_path):
    from helpers_pretrain import make_vae

    cfg, root = roundtrip_evaluated
    base = {**cfg.__dict__, "arms": ("roundtrip",)}
    samples = tmp_path / "s"
    shutil.copytree(cfg.samples, samples)
    shutil.rmtree(samples / "pipeline")
    with pytest.raises(HistoError, match=r"roundtrip arms need the autoencoder that decoded the samples: .*"
                                         r"pipeline/vae is missing"):
        run(EvaluateConfig(**{**base, "samples": str(samples), "out": str(tmp_path / "a")}))
    make_vae(samples / "pipeline" / "vae", seed=1)  # another autoencoder than the one samples.csv names
    with pytest.raises(HistoError, match=r"sample 's00000' in .*samples.csv was decoded by autoencoder \w{12}, "
                                         r".*pipeline/vae is \w{12}: the roundtrip arms need the samples' own"):
        run(EvaluateConfig(**{**base, "samples": str(samples), "out": str(tmp_path / "b")}))
    shutil.rmtree(samples / "pipeline")
    shutil.copytree(Path(cfg.samples) / "pipeline", samples / "pipeline")
    (samples / "pipeline" / "histodiffusion.json").write_text(json.dumps({"sampling": {"detail": "tile"}}))
    with pytest.raises(HistoError, match=r"made with detail=tile .* so roundtrip arms do not split selected - start"):
        run(EvaluateConfig(**{**base, "samples": str(samples), "out": str(tmp_path / "c")}))
    for d in "abc":  # refused before any classifier trained
        assert not (tmp_path / d / "classifiers").exists()


def test_a_list_field_given_a_string_from_python_is_refused(evaluated, tmp_path):
    """Built in Python, EvaluateConfig(arms="real") would be read letter by letter: one clear error, nothing
    written (the same rule for every stage: start_run_dir validates the config)."""
    cfg, root = evaluated
    with pytest.raises(HistoError, match=r"config field arms \(EvaluateConfig.arms\) is a list: give \('real',\)"):
        run(EvaluateConfig(**{**cfg.__dict__, "arms": "real", "out": str(tmp_path / "e")}))
    assert not (tmp_path / "e").exists()
    with pytest.raises(HistoError, match="val_every .* must be >= 0"):  # the value rules apply to configs built in Python too
        run(EvaluateConfig(**{**cfg.__dict__, "val_every": -1, "out": str(tmp_path / "f")}))
    assert not (tmp_path / "f").exists()


def test_export_dataset_quotes_the_evaluation_of_its_keep_list(evaluated, tmp_path):
    """export-dataset's card gives the evaluation's paired effect of selected@ratio, and refuses an evaluation
    of another ratio or of another keep-list before writing anything."""
    from histodiffusion.runtime.config import ExportDatasetConfig
    from histodiffusion.stages.export_dataset import run as export

    cfg, _ = evaluated
    base = dict(data=cfg.data, subset=cfg.subset, samples=cfg.samples, evaluation=cfg.out)
    out = export(ExportDatasetConfig(**base, ratio=1.0, out=str(tmp_path / "aug")))
    measured = json.loads((out / "dataset.json").read_text())["measured"]
    metrics = json.loads((Path(cfg.out) / "metrics.json").read_text())
    assert measured["vs_real"] == metrics["deltas"]["selected@1"]["accuracy"]
    assert measured["noise_floor"] == metrics["noise_floor"]["accuracy"]
    assert f"{measured['vs_real']['mean']:+.3f}" in (out / "README.md").read_text()
    with pytest.raises(HistoError, match="no arm selected@0.5"):
        export(ExportDatasetConfig(**base, ratio=0.5, out=str(tmp_path / "half")))
    other = Path(shutil.copytree(cfg.samples, tmp_path / "other"))
    write_filtered(other, keep_every=3)
    with pytest.raises(HistoError, match="measured another keep-list"):
        export(ExportDatasetConfig(**{**base, "samples": str(other)}, ratio=1.0, out=str(tmp_path / "b")))
    assert not (tmp_path / "half").exists() and not (tmp_path / "b").exists()


def test_export_dataset_with_the_pseudo_labelled_tiles(pseudo_evaluated, tmp_path):
    """--pseudo true: the pool tiles of class_rank <= ratio x real count, with the reader's labels (never their
    own), the tiles' pixels from the dataset, and the measured pseudo@R or pseudo+selected@R quoted."""
    import numpy as np
    from PIL import Image

    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.runtime.config import ExportDatasetConfig
    from histodiffusion.stages.export_dataset import run as export

    cfg, _ = pseudo_evaluated
    base = dict(data=cfg.data, subset=cfg.subset, samples=cfg.samples, evaluation=cfg.out, ratio=0.5)
    out = export(ExportDatasetConfig(**base, synthetic=False, pseudo=True, real=False, out=str(tmp_path / "p")))
    rows = list(csv.DictReader(open(out / "labels.csv")))
    labelled = {r["id"]: r for r in csv.DictReader(open(Path(cfg.out) / "pseudo_labels.csv"))}
    want = [i for i, r in labelled.items() if int(r["class_rank"]) <= 3]  # 0.5 x 6 real per class
    assert sorted(r["id"] for r in rows) == sorted(want) and {r["source"] for r in rows} == {"pseudo"}
    ds = PixelDataset(cfg.data, ids=want)
    for r in rows:
        assert r["label"] == labelled[r["id"]]["pseudo_label"] and r["origin_group"] == labelled[r["id"]]["group"]
        pixels = ds.uint8([x["id"] for x in ds.rows].index(r["id"])).numpy()
        assert (np.asarray(Image.open(out / r["path"])) == pixels).all()
    metrics = json.loads((Path(cfg.out) / "metrics.json").read_text())
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["arm"] == "pseudo@0.5" and summary["measured"]["vs_real"] == metrics["deltas"]["pseudo@0.5"]["accuracy"]
    assert "measured with the real tiles, which this export leaves out" in (out / "README.md").read_text()
    both = export(ExportDatasetConfig(**base, pseudo=True, out=str(tmp_path / "both")))
    assert json.loads((both / "dataset.json").read_text())["description"] == (
        f"18 real + 9 synthetic + {len(want)} pseudo tiles (pseudo+selected@0.5)")
    with pytest.raises(HistoError, match="give --evaluation"):
        export(ExportDatasetConfig(**{**base, "evaluation": ""}, pseudo=True, out=str(tmp_path / "x")))
    with pytest.raises(HistoError, match="needs --pseudo true"):
        export(ExportDatasetConfig(**base, synthetic=False, out=str(tmp_path / "y")))
    drawn = Path(shutil.copytree(cfg.out, tmp_path / "drawn"))  # an evaluation that drew its pseudo tiles
    record = json.loads((drawn / "config.json").read_text())
    record["config"]["pseudo_rank"] = "random"
    (drawn / "config.json").write_text(json.dumps(record))
    with pytest.raises(HistoError, match="drew its pseudo tiles at random"):
        export(ExportDatasetConfig(**{**base, "evaluation": str(drawn)}, pseudo=True, out=str(tmp_path / "z")))
    assert not any((tmp_path / n).exists() for n in "xyz")
