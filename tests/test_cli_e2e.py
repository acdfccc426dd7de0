"""End-to-end CLI smoke test: `histodiffusion run` on tiny settings, every artifact of every stage,
and a second invocation that skips every finished stage."""
import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from histodiffusion.data import default
from histodiffusion.runtime.layout import RunLayout

TINY = {
    "prepare-unlabeled": {"stride": 16},
    "train-autoencoder": {"block_out_channels": [8, 16, 16], "steps": 12, "batch_size": 8, "crop": 0,
                          "holdout": 8, "eval_every": 6, "checkpoint_every": 6},
    "pretrain": {"block_out_channels": [16, 32], "steps": 12, "batch_size": 8, "warmup": 2, "sample_every": 6,
                 "checkpoint_every": 6, "attention": False},
    "train-latent-classifier": {"width": 16, "steps": 12, "batch_size": 16, "checkpoint_every": 6},
    "finetune-decoder": {"steps": 4, "aux_steps": 6, "batch_size": 8, "checkpoint_every": 2},
    "sample": {"steps": 4, "batch_size": 8},
    "select": {"feature_steps": 6},
    "evaluate": {"epochs": 1},
}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "histodiffusion", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def _run(out: Path, cfg: Path, *base, extra: tuple = ()) -> subprocess.CompletedProcess:
    src = [str(p) for p in default.unlabeled_sources() if p.name.startswith(("stardist", "slideflow"))]
    data = ("--base", *base) if base else ("--base", "none", "--unlabeled", ",".join(src))
    return _cli("run", "--out", out, "--tile-size", "16", *data, "--seeds", "0,1", "--subset", "frac0.1",
                "--ratios", "0.5", "--stage-config", cfg, *extra)


@pytest.mark.slow
def test_run_end_to_end_and_skip(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    r = _run(out, cfg)
    assert r.returncode == 0, r.stderr[-3000:]

    L = RunLayout(out)
    complete = lambda p: (p / "_COMPLETE.json").is_file()  # noqa: E731
    # 1. every stage's artifacts
    for d in (L.data_unlabeled, L.data_target):
        assert complete(d) and (d / "manifest.csv").is_file() and (d / "meta.json").is_file()
        assert list((d / "shards").glob("pixels_*.safetensors"))
    assert (L.data_target / "subsets/frac0.1.csv").is_file()
    assert complete(L.ae) and (L.ae_vae / "config.json").is_file()
    assert list(L.ae_vae.glob("*.safetensors"))
    for c in (L.cache_unlabeled, L.cache_target):
        assert complete(c) and (c / "index.csv").is_file() and list(c.glob("latents_*.safetensors"))
    assert complete(L.ldm)
    for sub in ("unet_ema", "scheduler", "vae"):
        assert (L.model(L.ldm) / sub).is_dir()
    assert complete(L.latent_classifier) and (L.model(L.latent_classifier) / "config.json").is_file()
    assert complete(L.decoder) and (L.model(L.decoder) / "vae/config.json").is_file()
    with open(L.samples() / "samples.csv") as f:
        samples = list(csv.DictReader(f))
    classes = json.loads((L.data_target / "meta.json").read_text())["classes"]
    real = [r["label"] for r in csv.DictReader(open(L.cache_target / "index.csv"))
            if r["id"] in {x["id"] for x in csv.DictReader(open(L.data_target / "subsets/frac0.1.csv"))}]
    for c in classes:  # the largest ratio (0.5) x oversample (default 2) x the real count of every class
        assert sum(r["target"] == c for r in samples) == real.count(c)
    assert sorted(p.name for p in (L.samples() / "images").glob("*.png")) == sorted(Path(r["file"]).name for r in samples)
    with open(L.select() / "filtered.csv") as f:  # select's own directory and completion marker
        assert sorted(r["id"] for r in csv.DictReader(f)) == sorted(r["id"] for r in samples)
    assert complete(L.select()) and (L.select() / "config.json").is_file()
    keep_list = json.loads((L.evaluation() / "keep_list.json").read_text())  # the keep-list evaluate used
    assert keep_list["filtered_csv"] == str((L.select() / "filtered.csv").resolve())
    metrics = json.loads((L.evaluation() / "metrics.json").read_text())
    assert {"real", "classic"} <= set(metrics["arms"])
    assert (L.evaluation() / "per_seed.csv").is_file()
    assert L.report_index.is_file() and (L.report / "report.md").is_file()
    # the augmented training set: the real subset + selected@0.5 as files, the evaluation's effect quoted
    exported = list(csv.DictReader(open(L.augmented / "labels.csv")))
    kept = [r for r in csv.DictReader(open(L.select() / "filtered.csv")) if r["keep"] == "1"]
    assert [r["source"] for r in exported].count("real") == len(real)
    assert 0 < [r["source"] for r in exported].count("synthetic") <= len(kept)
    assert all((L.augmented / r["path"]).is_file() for r in exported)
    assert json.loads((L.augmented / "dataset.json").read_text())["measured"]["arm"] == "selected@0.5"
    for stage_dir in (L.ae, L.ldm, L.latent_classifier, L.samples(), L.select(), L.evaluation(), L.augmented):
        assert (stage_dir / "config.json").is_file()
        marker = json.loads((stage_dir / "_COMPLETE.json").read_text())  # the completion contract
        assert marker["format_version"] == 2 and marker["config"] and marker["inputs"], stage_dir
    assert "report:" in r.stderr
    # the run's log.txt holds every stage's lines and the pipeline's to the end; each stage dir its own log
    run_log = L.log.read_text()
    for stage in ("prepare", "train-autoencoder", "encode", "pretrain", "train-latent-classifier",
                  "finetune-decoder", "sample", "select", "evaluate", "report"):
        assert f" [{stage}] " in run_log, stage
    assert "[run] [13/13] report: done" in run_log and "[run] finished in" in run_log
    for stage_dir in (L.data_target, L.ae, L.cache_target, L.ldm, L.latent_classifier, L.decoder,
                      L.samples(), L.select(), L.evaluation(), L.report):
        assert (stage_dir / "log.txt").stat().st_size > 0, stage_dir
    timings_first = L.timings.read_text()

    # 2. a second invocation skips every finished stage, and keeps their measured times
    r2 = _run(out, cfg)
    assert r2.returncode == 0, r2.stderr[-3000:]
    timings = L.timings.read_text()
    assert "| ran |" not in timings and timings.count("| skipped (time of the run that made it) |") >= 12
    assert [ln.split("|")[2] for ln in timings.splitlines()] == [ln.split("|")[2] for ln in timings_first.splitlines()]
    assert r2.stderr.count("complete, skipped") >= 12

    # 3. pretrain once, adapt again: export the run's LDM as a base, and a new run adapts it (no pretraining)
    base = tmp_path / "base"
    r3 = _cli("export-base", "--model", L.model(L.ldm), "--out", base, "--data", L.data_unlabeled)
    assert r3.returncode == 0, r3.stderr[-3000:]
    out2 = tmp_path / "run2"
    r4 = _run(out2, cfg, base)
    assert r4.returncode == 0, r4.stderr[-3000:]
    L2 = RunLayout(out2)
    assert not L2.ae.exists() and not L2.ldm.exists() and not L2.data_unlabeled.exists()
    recorded = json.loads(L2.base_record.read_text())
    assert recorded["id"] == hashlib.sha256((base / "checksums.json").read_bytes()).hexdigest()
    assert json.loads((L2.cache_target / "latent_space.json").read_text())["vae_hash"] == recorded["vae_hash"]
    assert (L2.evaluation() / "metrics.json").is_file() and L2.report_index.is_file()

    # 4. --procs 2: the evaluate stage's classifiers in two processes (torchrun), the same results as in one
    one = (L2.evaluation() / "per_seed.csv").read_text()
    shutil.rmtree(L2.evaluation())
    shutil.rmtree(L2.report)
    r5 = _run(out2, cfg, base, extra=("--procs", "2"))
    assert r5.returncode == 0, r5.stderr[-3000:]
    assert (L2.evaluation() / "per_seed.csv").read_text() == one
    assert "| evaluate | " in (t := L2.timings.read_text()) and t.count("| ran |") == 3  # evaluate, export, report
    assert L2.report_index.is_file()

    # 5. a variant of run2 (another sampler setting) with --reuse-from: run2's finished stages are copied, and
    # its real/classic classifiers; sampling, selection, the synthetic arms and the report run
    cfg2 = tmp_path / "tiny2.json"
    cfg2.write_text(json.dumps({**TINY, "sample": {"steps": 3, "batch_size": 8}}))
    out3 = tmp_path / "run3"
    r6 = _run(out3, cfg2, base, extra=("--reuse-from", out2))
    assert r6.returncode == 0, r6.stderr[-3000:]
    assert r6.stderr.count("copied from") == 5, r6.stderr[-3000:]  # 4 stages + evaluate's sample-free classifiers
    ran = [ln.split("|")[1].strip() for ln in RunLayout(out3).timings.read_text().splitlines() if "| ran |" in ln]
    assert ran == ["sample", "select", "evaluate", "export dataset", "report"]
    assert (L2.select() / "_COMPLETE.json").is_file()  # the other run is read, never changed
    for name in ("real_0", "classic_1"):
        assert (L2.evaluation() / "classifiers" / name / "scores.json").read_bytes() == (
            RunLayout(out3).evaluation() / "classifiers" / name / "scores.json").read_bytes()


    # 6. the cohort's unlabeled tiles (--target-unlabeled) as starting points (--start-from unlabeled) and in the
    # decoder fine-tune (--adapt-decoder-unlabeled): train split only, never in a labeled subset
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for r in list(csv.DictReader(open(default.labels_csv())))[:60]:  # new content: the tiles turned a quarter
        Image.open(default.labels_csv().parent / r["path"]).transpose(Image.Transpose.ROTATE_90).save(
            cohort / f"{Path(r['path']).stem}.png")
    out4 = tmp_path / "run4"  # with the shipped base at 64 px: its latent classifier reads every class in the pool
    cfg4 = tmp_path / "tiny4.json"
    cfg4.write_text(json.dumps({**TINY, "train-latent-classifier": {"width": 16, "steps": 100, "batch_size": 32,
                                                                    "checkpoint_every": 50, "image_baseline": False}}))
    r7 = _cli("run", "--out", out4, "--seeds", "0", "--subset", "frac0.1", "--ratios", "0.5", "--stage-config", cfg4,
              "--target-unlabeled", cohort, "--start-from", "unlabeled", "--start-strength", "0.25",
              "--adapt-decoder-unlabeled", "true")
    assert r7.returncode == 0, r7.stderr[-3000:]
    L4 = RunLayout(out4)
    rows = list(csv.DictReader(open(L4.data_target / "manifest.csv")))
    unl = {r["id"] for r in rows if not r["label"]}
    assert len(unl) == 60 and {r["split"] for r in rows if r["id"] in unl} == {"train"}
    assert not unl & {x["id"] for x in csv.DictReader(open(L4.data_target / "subsets/frac0.1.csv"))}
    train = {r["id"] for r in rows if r["split"] == "train"}
    starts = [r["init_id"] for r in csv.DictReader(open(L4.samples() / "samples.csv"))]
    assert starts and set(starts) <= train and set(starts) & unl  # labels unused: any train tile may start one
    dec = json.loads((L4.decoder / "config.json").read_text())["config"]
    assert dec["unlabeled_subset"] == "train"
    assert json.loads((L4.select() / "config.json").read_text())["config"]["rank_by"] == "confidence"
    # the baseline arm: the same pool pseudo-labelled by the classic classifiers, the cohort's unlabeled tiles too
    m4 = json.loads((L4.evaluation() / "metrics.json").read_text())
    assert "pseudo@0.5" in m4["arms"] and set(m4["deltas_vs_pseudo"]) == {"selected@0.5", "unselected@0.5",
                                                                          "start@0.5"}
    # ... and the samples' own starting tiles, raw: the samples keep those tiles' detail (detail=tile), so
    # selected@0.5 against them is the denoising step's change alone (no roundtrip arm)
    sampling = json.loads((L4.samples() / "pipeline" / "histodiffusion.json").read_text())["sampling"]
    assert sampling["detail"] == "tile" and sampling["color_match"] == "none"
    assert set(m4["deltas_vs_start"]) == {"selected@0.5"} and not m4["deltas_vs_roundtrip"]
    assert m4["start"]["start@0.5"]["distinct_tiles"] > 0
    pool = {r["id"]: r for r in csv.DictReader(open(L4.evaluation() / "pseudo_labels.csv"))}
    assert unl <= set(pool) and not any(pool[i]["label"] for i in unl)


def test_run_refuses_other_config_in_same_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"format_version": 1, "version": "0", "stage": "run",
                                                 "config": {"out": str(out), "preset": "paper"}}))
    RunLayout(out).data_target.mkdir(parents=True)  # the other run had started producing artifacts
    from histodiffusion.cli import main

    assert main(["run", "--out", str(out), "--base", "none"]) == 2
