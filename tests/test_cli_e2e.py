"""End-to-end CLI smoke test: `histodiffusion run` on tiny settings, every artifact of every stage,
and a second invocation that skips every finished stage."""
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from histodiffusion.data import default

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


def _run(out: Path, cfg: Path, *base) -> subprocess.CompletedProcess:
    src = [str(p) for p in default.unlabeled_sources() if p.name.startswith(("stardist", "slideflow"))]
    data = ("--base", *base) if base else ("--base", "none", "--unlabeled", ",".join(src))
    return _cli("run", "--out", out, "--tile-size", "16", *data, "--seeds", "0,1", "--subset", "frac0.1",
                "--ratios", "0.5", "--stage-config", cfg)


@pytest.mark.slow
def test_run_end_to_end_and_skip(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    r = _run(out, cfg)
    assert r.returncode == 0, r.stderr[-3000:]

    complete = lambda p: (out / p / "_COMPLETE.json").is_file()  # noqa: E731
    # 1. every stage's artifacts
    for d in ("data/unlabeled", "data/target"):
        assert complete(d) and (out / d / "manifest.csv").is_file() and (out / d / "meta.json").is_file()
        assert list((out / d / "shards").glob("pixels_*.safetensors"))
    assert (out / "data/target/subsets/frac0.1.csv").is_file()
    assert complete("ae") and (out / "ae/model/vae/config.json").is_file()
    assert list((out / "ae/model/vae").glob("*.safetensors"))
    for c in ("cache/unlabeled", "cache/target"):
        assert complete(c) and (out / c / "index.csv").is_file() and list((out / c).glob("latents_*.safetensors"))
    assert complete("ldm")
    for sub in ("unet_ema", "scheduler", "vae"):
        assert (out / "ldm/model" / sub).is_dir()
    assert complete("adapt/latent_classifier") and (out / "adapt/latent_classifier/model/config.json").is_file()
    assert complete("adapt/decoder") and (out / "adapt/decoder/model/vae/config.json").is_file()
    with open(out / "samples/samples.csv") as f:
        samples = list(csv.DictReader(f))
    classes = json.loads((out / "data/target/meta.json").read_text())["classes"]
    real = [r["label"] for r in csv.DictReader(open(out / "cache/target/index.csv"))
            if r["id"] in {x["id"] for x in csv.DictReader(open(out / "data/target/subsets/frac0.1.csv"))}]
    for c in classes:  # the largest ratio (0.5) x oversample (default 2) x the real count of every class
        assert sum(r["target"] == c for r in samples) == real.count(c)
    assert sorted(p.name for p in (out / "samples/images").glob("*.png")) == sorted(Path(r["file"]).name for r in samples)
    with open(out / "samples/filtered.csv") as f:
        assert sorted(r["id"] for r in csv.DictReader(f)) == sorted(r["id"] for r in samples)
    metrics = json.loads((out / "eval/metrics.json").read_text())
    assert {"real", "classic"} <= set(metrics["arms"])
    assert (out / "eval/per_seed.csv").is_file()
    assert (out / "report/index.html").is_file() and (out / "report/report.md").is_file()
    for stage_dir in ("ae", "ldm", "adapt/latent_classifier", "samples", "eval"):
        assert (out / stage_dir / "config.json").is_file()
    assert "report:" in r.stderr
    # the run's log.txt holds every stage's lines and the pipeline's to the end; each stage dir its own log
    run_log = (out / "log.txt").read_text()
    for stage in ("prepare", "train-autoencoder", "encode", "pretrain", "train-latent-classifier",
                  "finetune-decoder", "sample", "select", "evaluate", "report"):
        assert f" [{stage}] " in run_log, stage
    assert "[run] [12/12] report: done" in run_log and "[run] finished in" in run_log
    for stage_dir in ("data/target", "ae", "cache/target", "ldm", "adapt/latent_classifier", "adapt/decoder",
                      "samples", "eval", "report"):
        assert (out / stage_dir / "log.txt").stat().st_size > 0, stage_dir
    timings_first = (out / "timings.md").read_text()

    # 2. a second invocation skips every finished stage, and keeps their measured times
    r2 = _run(out, cfg)
    assert r2.returncode == 0, r2.stderr[-3000:]
    timings = (out / "timings.md").read_text()
    assert "| ran |" not in timings and timings.count("| skipped (time of the run that made it) |") >= 12
    assert [ln.split("|")[2] for ln in timings.splitlines()] == [ln.split("|")[2] for ln in timings_first.splitlines()]
    assert r2.stderr.count("complete, skipped") >= 12

    # 3. pretrain once, adapt again: export the run's LDM as a base, and a new run adapts it (no pretraining)
    base = tmp_path / "base"
    r3 = _cli("export-base", "--model", out / "ldm/model", "--out", base, "--data", out / "data/unlabeled")
    assert r3.returncode == 0, r3.stderr[-3000:]
    out2 = tmp_path / "run2"
    r4 = _run(out2, cfg, base)
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert not (out2 / "ae").exists() and not (out2 / "ldm").exists() and not (out2 / "data/unlabeled").exists()
    recorded = json.loads((out2 / "base.json").read_text())
    assert recorded["id"] == hashlib.sha256((base / "checksums.json").read_bytes()).hexdigest()
    assert json.loads((out2 / "cache/target/meta.json").read_text())["vae_hash"] == recorded["vae_hash"]
    assert (out2 / "eval/metrics.json").is_file() and (out2 / "report/index.html").is_file()


def test_run_refuses_other_config_in_same_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"format_version": 1, "version": "0", "stage": "run",
                                                 "config": {"out": str(out), "preset": "paper"}}))
    (out / "data").mkdir()  # the other run had started producing artifacts
    from histodiffusion.cli import main

    assert main(["run", "--out", str(out), "--base", "none"]) == 2
