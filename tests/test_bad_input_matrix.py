"""The bad-input matrix: every case goes through the CLI (`histodiffusion.cli.main`) and must give
exit code 2, exactly one error line (`histodiffusion <command>: error: ...`) naming the culprit,
no traceback, and no partial output (no _COMPLETE.json, no artifact files, no temporary files).

Cases already covered elsewhere are not repeated here (see docs/troubleshooting.md for the whole
table): tests/test_prepare_bad_input.py (corrupt/truncated/non-image/grey/RGBA/16-bit images, empty
class folder, unknown label, missing file, too-small image, CSV columns, strict mode, leakage between
datasets, same source twice), tests/test_sample.py (unknown class, guidance window, counts, missing
model folders, scheduler name, eta, classifier of another autoencoder), tests/test_select.py
(missing sample image, unknown class, class order), tests/test_evaluate.py (test group in training,
ratio too large, missing filtered.csv), tests/test_adapt.py (unknown subset, missing scheduler,
max_timestep), tests/test_pretrain.py (caches of two autoencoders, replaced autoencoder, missing
scaling factor, NaN loss, truncated checkpoint).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from histodiffusion.cli import main

ARTIFACT_OK = {"config.json", "log.txt"}  # what a stage may have written before it refused the input


@pytest.fixture(autouse=True)
def _fresh_log_handlers():
    """Stage loggers keep the stderr of the test that created them; capsys needs the current one."""
    import logging

    for lg in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for h in [h for h in getattr(lg, "handlers", []) if type(h) is logging.StreamHandler]:
            lg.removeHandler(h)
    yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small valid artifacts of every kind; cases copy and break them."""
    from helpers_eval import make_class_samples
    from helpers_eval import make_dataset as make_eval_dataset
    from helpers_pretrain import make_cache, make_dataset, make_vae
    from helpers_sample import make_labeled_cache, make_latent_classifier, make_ldm

    root = tmp_path_factory.mktemp("world")
    unl_cache = make_cache(root / "unl", "unl", n=8)  # root/unl/{data/unl, vae, cache/unl}
    data16, vae16 = root / "unl" / "data" / "unl", root / "unl" / "vae"
    labeled16 = make_dataset(root / "lab16", n=10, classes=("a", "b"))
    data32, vae32, cache32 = make_labeled_cache(root / "t", n=20)
    ldm = make_ldm(root / "ldm", vae32)
    clf = make_latent_classifier(root / "clf", cache32, ldm / "scheduler")
    target = make_eval_dataset(root / "target")
    samples = make_class_samples(root / "samples", n_per_class=2)
    return {"root": root, "unl_cache": unl_cache, "data16": data16, "vae16": vae16, "labeled16": labeled16,
            "data32": data32, "vae32": vae32, "cache32": cache32, "ldm": ldm, "clf": clf, "target": target,
            "samples": samples, "make_vae": make_vae}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def set_json(path: Path, **fields) -> None:
    d = json.loads(path.read_text())
    d.update(fields)
    path.write_text(json.dumps(d))


def check_refused(capsys, argv: list[str], culprit: str | list[str], outputs: list[Path] = ()) -> str:
    """Exit 2, one error line naming the culprit, no traceback, no partial output."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"histodiffusion {argv[0]}: error: "), lines[0]
    assert "Traceback" not in err
    for c in [culprit] if isinstance(culprit, str) else culprit:
        assert str(c) in lines[0], (c, lines[0])
    for out in outputs:
        out = Path(out)
        assert not (out / "_COMPLETE.json").exists()
        if out.is_dir():
            left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name not in ARTIFACT_OK)
            assert left == [], left
        leftovers = [p.name for p in out.parent.glob(f".{out.name}.*")] if out.parent.is_dir() else []
        assert leftovers == [], leftovers
    return lines[0]


# --------------------------------------------------------------------------------------------
# Config files and flags
# --------------------------------------------------------------------------------------------
def test_unknown_field_in_config_file(capsys, tmp_path, world):
    cfg = tmp_path / "encode.json"
    cfg.write_text(json.dumps({"data": str(world["data16"]), "batchsize": 4}))
    check_refused(capsys, ["encode", "--config", cfg, "--out", tmp_path / "c"], "batchsize", [tmp_path / "c"])


def test_config_file_not_valid_json(capsys, tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"steps": 3,,}')
    check_refused(capsys, ["pretrain", "--config", cfg, "--out", tmp_path / "p"], str(cfg), [tmp_path / "p"])


def test_toml_field_of_wrong_type(capsys, tmp_path):
    cfg = tmp_path / "ae.toml"
    cfg.write_text('batch_size = "big"\n')
    check_refused(capsys, ["train-autoencoder", "--config", cfg, "--out", tmp_path / "ae"], "batch_size",
                  [tmp_path / "ae"])


def test_flag_of_wrong_type(capsys, tmp_path):
    check_refused(capsys, ["pretrain", "--steps", "abc", "--out", tmp_path / "p"], ["steps", "abc"], [tmp_path / "p"])


@pytest.mark.parametrize("stage,flag,value,field", [
    ("train-autoencoder", "steps", "-5", "steps"),
    ("encode", "batch-size", "0", "batch_size"),
    ("pretrain", "beta-schedule", "cosine", "beta_schedule"),
    ("pretrain", "mixed-precision", "fp8", "mixed_precision"),
    ("train-latent-classifier", "batch-size", "0", "batch_size"),
    ("sample", "batch-size", "0", "batch_size"),
    ("sample", "detail", "edges", "detail"),
    ("select", "min-confidence", "1.5", "min_confidence"),
    ("evaluate", "steps", "0", "steps"),
    ("evaluate", "epochs", "-1", "epochs"),
    ("evaluate", "val-every", "-1", "val_every"),
    ("select", "quota-ratio", "-1", "quota_ratio"),
    ("select", "rank-by", "spread", "rank_by"),
    ("evaluate", "synthetic-weight", "0", "synthetic_weight"),
    ("evaluate", "real-finish", "1", "real_finish"),
    ("evaluate", "arms", "real,bogus", "bogus"),
    ("export-dataset", "ratio", "0", "ratio"),
])
def test_config_value_out_of_range(capsys, tmp_path, world, stage, flag, value, field):
    """Refused before anything is written (so re-running with a fixed value is not blocked)."""
    inputs = {"train-autoencoder": ["--data", world["data16"]], "encode": ["--data", world["data16"], "--vae", world["vae16"]],
              "pretrain": ["--cache", world["unl_cache"]], "train-latent-classifier": ["--cache", world["cache32"]],
              "sample": ["--model", world["ldm"], "--classifier", world["clf"]],
              "select": ["--samples", world["samples"], "--data", world["target"]],
              "evaluate": ["--data", world["target"], "--arms", "real"],
              "export-dataset": ["--data", world["target"], "--samples", world["samples"]]}[stage]
    out = tmp_path / "out"
    out_flag = [] if stage == "select" else ["--out", out]
    if stage == "select":
        inputs = ["--samples", copy(world["samples"], out), "--data", world["target"]]
    check_refused(capsys, [stage, *inputs, *out_flag, f"--{flag}", value], field,
                  [] if stage == "select" else [out])
    if stage == "select":
        assert not (out / "select").exists()


@pytest.mark.parametrize("flags,named", [
    (["--start-from", "tiles"], "start_from"),
    (["--start-from", "unlabeled", "--start-strength", "1"], "start_strength"),
    (["--start-strength", "0.3"], "--start-strength 0.3"),
    (["--start-from", "unlabeled", "--start-labels", "kmeans"], "start_labels"),
    (["--start-labels", "ensemble"], "--start-labels ensemble"),
    (["--start-from", "unlabeled", "--target-unlabeled", "no/such/folder"], "no/such/folder"),
    (["--target-unlabeled", "."], "--target-unlabeled"),
])
def test_run_start_and_cohort_options(capsys, tmp_path, flags, named):
    """`run` checks its options before any stage runs: nothing is written."""
    check_refused(capsys, ["run", "--out", tmp_path / "r", *flags], named, [tmp_path / "r"])


def test_val_and_test_fractions_too_large(capsys, tmp_path):
    from helpers_prepare import labels_csv

    csv_path = labels_csv(tmp_path / "src", n=6)
    check_refused(capsys, ["prepare", "--labels-csv", csv_path, "--tile-size", "16", "--val-frac", "0.6",
                           "--test-frac", "0.5", "--out", tmp_path / "ds"], ["val_frac", "test_frac"], [tmp_path / "ds"])


# --------------------------------------------------------------------------------------------
# Datasets, caches, model folders
# --------------------------------------------------------------------------------------------
def test_incomplete_dataset(capsys, tmp_path, world):
    data = copy(world["data16"], tmp_path / "data")
    (data / "_COMPLETE.json").unlink()
    check_refused(capsys, ["encode", "--data", data, "--vae", world["vae16"], "--out", tmp_path / "c"],
                  [str(data), "incomplete"], [tmp_path / "c"])


def test_dataset_of_another_format_version(capsys, tmp_path, world):
    data = copy(world["data16"], tmp_path / "data")
    set_json(data / "meta.json", format_version=999)
    check_refused(capsys, ["encode", "--data", data, "--vae", world["vae16"], "--out", tmp_path / "c"],
                  ["meta.json", "format_version 999"], [tmp_path / "c"])


def test_truncated_pixel_shard(capsys, tmp_path, world):
    data = copy(world["data16"], tmp_path / "data")
    truncate(data / "shards" / "pixels_00000.safetensors")
    check_refused(capsys, ["encode", "--data", data, "--vae", world["vae16"], "--out", tmp_path / "c"],
                  "pixels_00000.safetensors", [tmp_path / "c"])


def test_truncated_latent_shard(capsys, tmp_path, world):
    cache = copy(world["unl_cache"], tmp_path / "cache")
    truncate(cache / "latents_00000.safetensors")
    check_refused(capsys, ["pretrain", "--cache", cache, "--out", tmp_path / "ldm", "--block-out-channels", "16,32",
                           "--steps", "2", "--batch-size", "2"], "latents_00000.safetensors", [tmp_path / "ldm"])


def test_latent_cache_of_another_format_version(capsys, tmp_path, world):
    cache = copy(world["unl_cache"], tmp_path / "cache")
    set_json(cache / "meta.json", format_version=0)
    check_refused(capsys, ["pretrain", "--cache", cache, "--out", tmp_path / "ldm"], ["meta.json", "format_version 0"],
                  [tmp_path / "ldm"])


def test_truncated_autoencoder_weights(capsys, tmp_path, world):
    vae = copy(world["vae16"], tmp_path / "vae")
    truncate(next(vae.glob("*.safetensors")))
    check_refused(capsys, ["encode", "--data", world["data16"], "--vae", vae, "--out", tmp_path / "c"], str(vae),
                  [tmp_path / "c"])


def test_tile_size_not_divisible_by_autoencoder(capsys, tmp_path, world):
    vae = world["make_vae"](tmp_path / "vae_f8", block_out_channels=(8, 8, 8, 8), size=16)
    data = tmp_path / "data"
    from helpers_pretrain import make_dataset

    make_dataset(data, n=4, size=12)
    check_refused(capsys, ["encode", "--data", data, "--vae", vae, "--out", tmp_path / "c"], ["tile size 12", str(data)],
                  [tmp_path / "c"])


def test_latent_classifier_on_unlabeled_cache(capsys, tmp_path, world):
    check_refused(capsys, ["train-latent-classifier", "--cache", world["unl_cache"], "--scheduler",
                           world["ldm"] / "scheduler", "--out", tmp_path / "lc"], str(world["unl_cache"]), [tmp_path / "lc"])


def test_latent_classifier_cache_and_ldm_of_different_autoencoders(capsys, tmp_path, world):
    ldm = copy(world["ldm"], tmp_path / "ldm")
    set_json(ldm / "histodiffusion.json", vae_hash="f" * 64)
    check_refused(capsys, ["train-latent-classifier", "--cache", world["cache32"], "--scheduler", ldm / "scheduler",
                           "--out", tmp_path / "lc"], [str(ldm / "scheduler"), "ffffffffffff"], [tmp_path / "lc"])


def test_classifier_trained_with_another_noise_schedule(capsys, tmp_path, world):
    clf = copy(world["clf"], tmp_path / "clf")
    info = json.loads((clf / "histodiffusion.json").read_text())
    set_json(clf / "histodiffusion.json", scheduler={**info["scheduler"], "beta_end": 0.02})
    check_refused(capsys, ["sample", "--model", world["ldm"], "--classifier", clf, "--out", tmp_path / "s",
                           "--n-per-class", "1"], [str(clf), "beta_end"], [tmp_path / "s"])


def test_missing_classifier_weights(capsys, tmp_path, world):
    clf = copy(world["clf"], tmp_path / "clf")
    for p in clf.glob("*.safetensors"):
        p.unlink()
    check_refused(capsys, ["sample", "--model", world["ldm"], "--classifier", clf, "--out", tmp_path / "s",
                           "--n-per-class", "1"], str(clf), [tmp_path / "s"])


def test_truncated_unet_weights(capsys, tmp_path, world):
    ldm = copy(world["ldm"], tmp_path / "ldm")
    truncate(next((ldm / "unet_ema").glob("*.safetensors")))
    check_refused(capsys, ["sample", "--model", ldm, "--classifier", world["clf"], "--out", tmp_path / "s",
                           "--n-per-class", "1"], str(ldm / "unet_ema"), [tmp_path / "s"])


def test_model_folder_of_another_format_version(capsys, tmp_path, world):
    clf = copy(world["clf"], tmp_path / "clf")
    set_json(clf / "histodiffusion.json", format_version=999)
    check_refused(capsys, ["sample", "--model", world["ldm"], "--classifier", clf, "--out", tmp_path / "s",
                           "--n-per-class", "1"], ["histodiffusion.json", "format_version 999"], [tmp_path / "s"])


def test_run_directory_of_another_format_version(capsys, tmp_path, world):
    out = tmp_path / "lc"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"format_version": 0, "stage": "train-latent-classifier",
                                                  "config": {}}))
    code = main(["train-latent-classifier", "--cache", str(world["cache32"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "format_version 0" in err and str(out / "config.json") in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


# --------------------------------------------------------------------------------------------
# Data content: duplicates, unlabeled data where labels are needed, unreadable samples
# --------------------------------------------------------------------------------------------
def test_same_image_in_two_groups_refused(capsys, tmp_path):
    """A file listed twice under two groups would land in two splits: a train/test leak."""
    from helpers_prepare import balanced_rows, labels_csv

    rows = balanced_rows(9)
    root = tmp_path / "src"
    csv_path = labels_csv(root, rows)
    dup = root / "copy_of_first.jpg"
    dup.write_bytes((root / rows[0]["path"]).read_bytes())
    with open(csv_path, "a") as f:
        f.write(f"copy_of_first.jpg,{rows[0]['label']},another_group\n")
    check_refused(capsys, ["prepare", "--labels-csv", csv_path, "--tile-size", "16", "--val-frac", "0.2",
                           "--test-frac", "0.2", "--out", tmp_path / "ds"], "copy_of_first.jpg", [tmp_path / "ds"])


def test_evaluate_on_unlabeled_dataset(capsys, tmp_path, world):
    check_refused(capsys, ["evaluate", "--data", world["data16"], "--arms", "real", "--seeds", "0",
                           "--out", tmp_path / "e"], str(world["data16"]), [tmp_path / "e"])


def test_select_without_samples_csv(capsys, tmp_path, world):
    empty = tmp_path / "samples"
    (empty / "images").mkdir(parents=True)
    check_refused(capsys, ["select", "--samples", empty, "--data", world["target"]], str(empty / "samples.csv"))
    assert not (empty / "select").exists()


def test_select_with_corrupt_sample_png(capsys, tmp_path, world):
    samples = copy(world["samples"], tmp_path / "samples")
    truncate(samples / "images" / "s00001.png", 30)
    check_refused(capsys, ["select", "--samples", samples, "--data", world["target"], "--backbone", "small_cnn_w8"],
                  "s00001.png")
    assert not (samples / "select").exists()


@pytest.mark.parametrize("subset,where", [("test", "test"), ("all", "test, val")])
def test_judge_on_validation_or_test_tiles(capsys, tmp_path, world, subset, where):
    check_refused(capsys, ["judge", "--data", world["target"], "--subset", subset, "--out", tmp_path / "j",
                           "--samples", world["samples"]], [f"subset {subset!r}", f"outside the train split ({where}"],
                  [tmp_path / "j"])
    assert not (tmp_path / "j").exists() and not (world["samples"] / "fidelity.json").exists()


def test_judge_bad_steps_and_score_without_judge(capsys, tmp_path, world):
    check_refused(capsys, ["judge", "--data", world["target"], "--steps", "0", "--out", tmp_path / "j"], "steps",
                  [tmp_path / "j"])
    check_refused(capsys, ["score", "--samples", world["samples"], "--out", tmp_path / "s"], "--judge", [tmp_path / "s"])
    check_refused(capsys, ["score", "--samples", world["samples"], "--judge", tmp_path / "nojudge", "--out",
                           tmp_path / "s"], str(tmp_path / "nojudge"), [tmp_path / "s"])


def test_latent_classifier_image_baseline_without_its_dataset(capsys, tmp_path, world):
    check_refused(capsys, ["train-latent-classifier", "--cache", world["cache32"], "--scheduler",
                           world["ldm"] / "scheduler", "--data", tmp_path / "gone", "--out", tmp_path / "lc"],
                  ["image baseline", str(tmp_path / "gone"), "--image-baseline false"], [tmp_path / "lc"])


def test_nan_loss_from_a_huge_learning_rate(capsys, tmp_path, world):
    out = tmp_path / "ae"
    code = main(["train-autoencoder", "--data", str(world["data16"]), "--out", str(out), "--block-out-channels", "8,16",
                 "--steps", "30", "--batch-size", "4", "--crop", "0", "--holdout", "0", "--lr", "1e30",
                 "--checkpoint-every", "1000"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "loss became nan" in lines[0] or "loss became inf" in lines[0], lines[0]
    assert str(out) in lines[0] and not (out / "model").exists() and not (out / "_COMPLETE.json").exists()


# --------------------------------------------------------------------------------------------
# Output that cannot be written (disk full / read-only). Tests run as root, where chmod does not
# stop writes, so the output path is put under a regular file instead (ENOTDIR on every write).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["encode", "select"])
def test_output_directory_not_writable(capsys, tmp_path, world, stage):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    if stage == "encode":
        argv = ["encode", "--data", world["data16"], "--vae", world["vae16"], "--out", out]
    else:
        argv = ["select", "--samples", world["samples"], "--data", world["target"], "--out", out]
    check_refused(capsys, argv, str(blocker))
    assert blocker.read_text() == "not a directory"
