"""`histodiffusion run`'s plan: how run-level options and --stage-config reach each stage's config."""
import json
from pathlib import Path

import pytest

from histodiffusion.cli import main
from histodiffusion.pipeline import plan
from histodiffusion.runtime.config import RunConfig
from histodiffusion.runtime.errors import HistoError


def _steps(tmp_path, stage_config: dict | None = None, **kw) -> dict[str, dict]:
    if stage_config is not None:
        path = tmp_path / "stages.json"
        path.write_text(json.dumps(stage_config))
        kw["stage_config"] = str(path)
    kw.setdefault("base", "none")  # the pretraining stages are part of these plans
    return {s.name: s.fields for s in plan(RunConfig(out=str(tmp_path / "run"), **kw))}


def test_sampling_makes_oversample_times_the_largest_ratio(tmp_path):
    steps = _steps(tmp_path, ratios=(0.5, 2.0), oversample=3.0)
    assert steps["sample"]["ratio"] == pytest.approx(6.0)
    assert steps["evaluate"]["ratios"] == (0.5, 2.0)
    assert _steps(tmp_path, ratios=(1.0,), oversample=1.0)["sample"]["ratio"] == pytest.approx(1.0)


def test_ablation_keys_stack_on_the_stage_settings(tmp_path):
    steps = _steps(tmp_path, {"evaluate": {"epochs": 7}, "evaluate-nopretrain": {"ratios": [1.0]},
                              "pretrain": {"steps": 900, "batch_size": 8}, "pretrain-nopretrain": {"steps": 50}},
                   ratios=(0.5, 1.0, 3.0), oversample=2.0, ablations=True)
    # the ablation is evaluated by the same harness (the user's evaluate settings) at its own ratios
    assert steps["evaluate"]["epochs"] == steps["evaluate_nopretrain"]["epochs"] == 7
    assert steps["evaluate"]["ratios"] == (0.5, 1.0, 3.0)
    assert steps["evaluate_nopretrain"]["ratios"] == [1.0]
    assert steps["evaluate_nopretrain"]["arms"] == ("real", "selected")
    # and sampled only as much as its largest ratio needs
    assert steps["sample"]["ratio"] == pytest.approx(6.0)
    assert steps["sample_nopretrain"]["ratio"] == pytest.approx(2.0)
    # the same UNet settings, with the ablation's own step count
    nopre = steps["pretrain LDM on target only (ablation)"]
    assert nopre["batch_size"] == steps["pretrain LDM"]["batch_size"] == 8
    assert nopre["steps"] == 50 and steps["pretrain LDM"]["steps"] == 900


def test_selection_is_class_balanced_at_the_largest_ratio_and_aa_arm_evaluated(tmp_path):
    steps = _steps(tmp_path, {"select-nopretrain": {"quota_ratio": 0.5}}, ratios=(0.5, 2.0), ablations=True)
    assert steps["select"]["quota_ratio"] == 2.0  # selected@r gets r x real per class for every r evaluated
    assert steps["select_nopretrain"]["quota_ratio"] == 0.5  # the user's setting wins
    assert "real_aa" not in steps["evaluate"].get("arms", ())  # evaluate's default arms (with real_aa) apply
    from histodiffusion.runtime.config import EvaluateConfig, config_from_dict

    cfg = config_from_dict(EvaluateConfig, steps["evaluate"])
    assert "real_aa" in cfg.arms and cfg.steps == 120 and cfg.val_every == 20  # the quick preset's small budget
    assert config_from_dict(EvaluateConfig, {}).steps == 500  # the stage's (benchmark) default


def test_quick_preset_uses_the_narrow_cnn_and_flags_win(tmp_path):
    steps = _steps(tmp_path)
    assert steps["select"]["backbone"] == steps["evaluate"]["backbone"] == "small_cnn_w16"
    steps = _steps(tmp_path, {"evaluate": {"backbone": "small_cnn"}})
    assert steps["evaluate"]["backbone"] == "small_cnn" and steps["select"]["backbone"] == "small_cnn_w16"


def test_unknown_stage_key_and_bad_oversample_are_refused(tmp_path):
    with pytest.raises(HistoError, match="unknown stage"):
        _steps(tmp_path, {"evaluate-nopretrained": {}})
    with pytest.raises(HistoError, match="oversample"):
        _steps(tmp_path, oversample=0.5)
    assert main(["run", "--out", str(tmp_path / "r"), "--base", "none", "--oversample", "0.5"]) == 2
    assert not (tmp_path / "r").exists()
    with pytest.raises(HistoError, match="procs"):
        _steps(tmp_path, procs=0)
    assert main(["run", "--out", str(tmp_path / "r"), "--procs", "0"]) == 2
    assert not (tmp_path / "r").exists()


def test_subset_not_made_by_prepare_fails_at_plan_time(tmp_path, capsys):
    """`run --subset frac0.2` used to fail at stage 7, after pretraining; now before anything is written."""
    with pytest.raises(HistoError) as e:
        _steps(tmp_path, subset="frac0.2")
    assert "'frac0.2'" in str(e.value) and "--subset" in str(e.value) and "frac0.25" in str(e.value)
    assert main(["run", "--out", str(tmp_path / "r"), "--base", "none", "--subset", "frac0.2"]) == 2
    assert "frac0.2" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # made by prepare when asked for: accepted
    steps = _steps(tmp_path, {"prepare-target": {"fewshot_fracs": [0.2]}}, subset="frac0.2")
    assert steps["latent classifier"]["subset"] == "frac0.2"
    assert _steps(tmp_path, subset="train")["evaluate"]["subset"] == "train"  # a split is always there
    # a stage's own subset field, also of the ablation's stages
    with pytest.raises(HistoError, match=r"'k5' \(evaluate.subset"):
        _steps(tmp_path, {"evaluate": {"subset": "k5"}})
    with pytest.raises(HistoError, match=r"'frac0.3' \(pretrain.subset"):
        _steps(tmp_path, {"pretrain-nopretrain": {"subset": "frac0.3"}}, ablations=True)
    with pytest.raises(HistoError, match=r"'holdout' \(pretrain.subset"):  # no holdout_frac: no holdout split
        _steps(tmp_path, {"pretrain": {"subset": "holdout"}})


@pytest.mark.parametrize("entry, culprit", [
    ({"train-latent-classifier": {"steps": -5}}, "LatentClassifierConfig.steps"),
    ({"evaluate": {"epochz": 3}}, "epochz"),
    ({"sample": {"scheduler": "euler"}}, "SampleConfig.scheduler"),
    ({"evaluate-nopretrain": {"bogus": 1}}, "bogus"),  # a stage this run (no ablations) does not reach
    ({"score": {"subset": 3}}, "ScoreConfig.subset"),
])
def test_bad_stage_config_of_a_later_stage_fails_at_plan_time(tmp_path, capsys, entry, culprit):
    with pytest.raises(HistoError, match=culprit.replace(".", r"\.")):
        _steps(tmp_path, entry)
    cfg = tmp_path / "stages.json"
    cfg.write_text(json.dumps(entry))
    assert main(["run", "--out", str(tmp_path / "r"), "--base", "none", "--stage-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert culprit.split(".")[-1] in err and str(cfg) in err and not (tmp_path / "r").exists()


def test_single_class_labels_csv_fails_at_plan_time(tmp_path):
    from helpers_prepare import labels_csv, lung_rows

    csv = labels_csv(tmp_path / "t", rows=lung_rows()[:20])  # all lung_aca
    with pytest.raises(HistoError, match="single class.*lung_aca"):
        _steps(tmp_path, labels_csv=str(csv))


def test_one_stage_registry_serves_the_cli_and_the_pipeline(tmp_path):
    import subprocess
    import sys

    from histodiffusion.cli import build_parser
    from histodiffusion.runtime.registry import STAGES

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(STAGES) <= set(sub.choices)  # every registered stage is a subcommand (plus `info`)
    assert set(sub.choices) - set(STAGES) == {"info"}
    for s in STAGES.values():  # what a stage reads is a field of its config
        assert set(s.inputs) <= {f for f in s.config.__dataclass_fields__}, s.name
    steps = plan(RunConfig(out=str(tmp_path / "run"), base="none"))
    assert {s.stage for s in steps} <= set(STAGES)
    # the pipeline calls stages through the registry: importing it loads neither the CLI nor torch
    code = "import sys, histodiffusion.pipeline; print('histodiffusion.cli' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_stage_config_cannot_move_the_run_layout(tmp_path, capsys):
    from histodiffusion.runtime.layout import RunLayout

    L = RunLayout(tmp_path / "run")
    steps = {s.name: s for s in plan(RunConfig(out=str(L.root), base="none"))}
    assert steps["sample"].out == L.samples() and steps["sample"].fields["out"] == str(L.samples())
    assert steps["latent classifier"].fields["cache"] == str(L.cache_target)
    for entry in ({"sample": {"out": str(tmp_path / "elsewhere")}}, {"encode-target": {"vae": "x"}},
                  {"evaluate-nopretrain": {"samples": "y"}}):
        with pytest.raises(HistoError, match="part of the run layout"):
            _steps(tmp_path, entry, ablations=True)
    path = tmp_path / "moved.json"
    path.write_text(json.dumps({"sample": {"out": str(tmp_path / "elsewhere")}}))
    assert main(["run", "--out", str(L.root), "--base", "none", "--stage-config", str(path)]) == 2
    assert "part of the run layout" in capsys.readouterr().err and not L.root.exists()


def test_latent_classifier_trunk_option(tmp_path):
    """--latent-classifier-trunk unet builds the latent classifier on the encoder of the UNet the run guides
    (the base's, or the target-adapted one's); small (default) leaves the stage's own trunk."""
    steps = _steps(tmp_path, base="default", latent_classifier_trunk="unet")
    lc = steps["latent classifier"]
    assert lc["trunk_unet"] == str(Path(steps["sample"]["model"]) / "unet_ema")
    adapted = _steps(tmp_path, base="default", latent_classifier_trunk="unet", adapt_unlabeled_steps=10)
    assert adapted["latent classifier"]["trunk_unet"].startswith(str(tmp_path / "run"))  # the adapted UNet's
    assert "trunk_unet" not in _steps(tmp_path, base="default")["latent classifier"]
    with pytest.raises(HistoError, match="no-pretraining arm"):
        _steps(tmp_path, base="default", latent_classifier_trunk="unet", ablations=True)
    with pytest.raises(HistoError, match="latent_classifier_trunk"):
        _steps(tmp_path, base="default", latent_classifier_trunk="big")
