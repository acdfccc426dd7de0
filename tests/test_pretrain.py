"""Pretraining stages: train-autoencoder, encode, pretrain (tiny models, 16x16 tiles, CPU)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers_pretrain import make_cache, make_dataset, make_vae  # noqa: E402

from histodiffusion.runtime.config import AutoencoderConfig, EncodeConfig, PretrainConfig  # noqa: E402
from histodiffusion.runtime.distributed import list_checkpoints
from histodiffusion.runtime.errors import HistoError

TINY_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, batch_size=4, warmup=2, sample_every=0)


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("HISTODIFFUSION_RECORD_IDS", None)
    return env


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_autoencoder_exports_vae_with_measured_scaling(tmp_path):
    from histodiffusion.models.autoencoder import load_vae
    from histodiffusion.stages.train_autoencoder import run

    a = make_dataset(tmp_path / "a", n=20, seed=1)
    b = make_dataset(tmp_path / "b", n=12, seed=2)
    cfg = AutoencoderConfig(data=(str(a), str(b)), out=str(tmp_path / "ae"), block_out_channels=(8, 16), steps=4,
                            batch_size=4, crop=8, holdout=4, eval_every=2, checkpoint_every=2, adv_weight=0.1, adv_start=3)
    model_dir = run(cfg)
    vae = load_vae(model_dir)
    info = json.loads((model_dir / "histodiffusion.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    assert info["scaling_factor"] > 0 and abs(info["scaling_factor"] - 0.18215) > 1e-6
    card = (model_dir / "README.md").read_text()  # the model card, with its real figures
    assert card.startswith("# Autoencoder") and f"scaled by {info['scaling_factor']}" in card and "- 4 steps" in card
    assert f"psnr {info['holdout_metrics']['psnr']:.4f}" in card and f"`a` ({a.resolve()}): 20 tiles" in card
    assert f"`b` ({b.resolve()}): 12 tiles" in card and f"AutoencoderKL.from_pretrained('{model_dir}')" in card
    holdout = (tmp_path / "ae" / "holdout.csv").read_text().splitlines()
    assert len(holdout) == 1 + 4
    assert (tmp_path / "ae" / "recon" / "step_2.png").is_file() and (tmp_path / "ae" / "recon" / "step_4.png").is_file()
    rows = _metrics(tmp_path / "ae")
    assert any("psnr" in r and "ssim" in r for r in rows) and any(r.get("d_loss", 0) != 0 for r in rows)
    assert [s for s, _ in list_checkpoints(tmp_path / "ae")] == [2, 4]  # the final state too: more steps can follow
    n = len(rows)
    assert run(cfg) == model_dir and len(_metrics(tmp_path / "ae")) == n  # complete: skipped
    assert run(dataclasses.replace(cfg, steps=3)) == model_dir and len(_metrics(tmp_path / "ae")) == n  # fewer: kept
    # training longer continues from the last checkpoint instead of being refused as another config
    run(dataclasses.replace(cfg, steps=6))
    steps = [r["step"] for r in _metrics(tmp_path / "ae")[n:] if "l1" in r]
    assert steps == [6] and {"resumed_from": 4} in _metrics(tmp_path / "ae")[n:]
    assert json.loads((tmp_path / "ae" / "_COMPLETE.json").read_text())["steps"] == 6
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["config"]["steps"] == 6
    assert [s for s, _ in list_checkpoints(tmp_path / "ae")] == [4, 6]
    with pytest.raises(HistoError, match="checkpoint at step 6, beyond steps=5"):
        (tmp_path / "ae" / "_COMPLETE.json").unlink()  # an interrupted run asked for fewer steps than it has
        run(dataclasses.replace(cfg, steps=5))
    with pytest.raises(HistoError, match="lpips-weights"):
        run(AutoencoderConfig(data=(str(a),), out=str(tmp_path / "ae2"), lpips_weight=0.1))


def test_encode_writes_cache_read_by_latent_dataset(tmp_path):
    from safetensors import safe_open

    from histodiffusion.data.datasets import LatentDataset
    from histodiffusion.stages.encode import run

    cache = make_cache(tmp_path, "lab", n=20, classes=("x", "y"), shard_size=8)
    meta = json.loads((cache / "meta.json").read_text())
    space = json.loads((cache / "latent_space.json").read_text())  # the latent-space record, written once
    assert meta["count"] == 20 and space["latent_shape"] == [4, 8, 8] and meta["classes"] == ["x", "y"]
    assert space["scaling_factor"] == 1.0 and space["scaling_source"] == "vae" and len(space["vae_hash"]) == 64
    assert not {"scaling_factor", "vae_hash", "latent_shape"} & set(meta)  # one place
    assert sorted(p.name for p in cache.glob("latents_*.safetensors")) == [
        "latents_00000.safetensors", "latents_00001.safetensors", "latents_00002.safetensors"]
    with safe_open(str(cache / "latents_00002.safetensors"), framework="pt") as f:
        assert f.get_tensor("mean").shape == (4, 4, 8, 8) and f.get_tensor("std").dtype == torch.float32
        assert (f.get_tensor("std") > 0).all()
    ds = LatentDataset(cache, "train")
    z, label, _ = ds[0]
    assert len(ds) == 12 and z.shape == (4, 8, 8) and label in (0, 1)
    assert len(LatentDataset(cache, "frac0.5")) == 6
    # flips: 8 dihedral variants per tile, subsets expanded, scaling override recorded
    flipped = run(EncodeConfig(data=str(tmp_path / "data" / "lab"), vae=str(tmp_path / "vae"),
                               out=str(tmp_path / "cache" / "flip"), flips=True, scaling_factor=0.5))
    fmeta = json.loads((flipped / "meta.json").read_text())
    fspace = json.loads((flipped / "latent_space.json").read_text())
    assert fmeta["count"] == 160 and fspace["scaling_factor"] == 0.5 and fspace["scaling_source"] == "override"
    assert len(LatentDataset(flipped, "frac0.5")) == 48


def test_encode_and_pretrain_refuse_mismatched_autoencoders(tmp_path):
    from histodiffusion.stages.encode import run as encode
    from histodiffusion.stages.pretrain import run as pretrain

    ca = make_cache(tmp_path, "a", n=8)
    make_vae(tmp_path / "vae2", seed=1)
    data_b = make_dataset(tmp_path / "data" / "b", n=8)
    cb = encode(EncodeConfig(data=str(data_b), vae=str(tmp_path / "vae2"), out=str(tmp_path / "cache" / "b")))
    # re-encoding into an existing cache with another autoencoder
    with pytest.raises(HistoError, match="autoencoder"):
        encode(EncodeConfig(data=str(data_b), vae=str(tmp_path / "vae"), out=str(cb)))
    # mixing caches of two autoencoders
    with pytest.raises(HistoError, match=r"not made with one autoencoder.*cache/a.*cache/b"):
        pretrain(PretrainConfig(cache=(str(ca), str(cb)), out=str(tmp_path / "ldm"), steps=1, **TINY_UNET))
    # the cache's autoencoder was replaced after encoding
    make_vae(tmp_path / "vae", seed=5)
    with pytest.raises(HistoError, match="does not match latent cache"):
        pretrain(PretrainConfig(cache=(str(ca),), out=str(tmp_path / "ldm2"), steps=1, **TINY_UNET))
    # a foreign VAE without a measured scaling factor needs an explicit one
    (tmp_path / "vae2" / "histodiffusion.json").unlink()
    with pytest.raises(HistoError, match="scaling-factor"):
        encode(EncodeConfig(data=str(data_b), vae=str(tmp_path / "vae2"), out=str(tmp_path / "cache" / "c")))
    # ... and so does fine-tuning its decoder: its diffusers default factor is never trusted
    from histodiffusion.stages import finetune_decoder
    from histodiffusion.runtime.config import FinetuneDecoderConfig

    labeled = make_dataset(tmp_path / "data" / "lab", n=8, classes=("x", "y"))
    with pytest.raises(HistoError, match="no measured scaling factor"):
        finetune_decoder.run(FinetuneDecoderConfig(data=str(labeled), subset="train", vae=str(tmp_path / "vae2"),
                                                   out=str(tmp_path / "dec"), aux_weight=0, steps=1))
    # a cache made before the latent-space record: one clear error, not a KeyError
    (ca / "latent_space.json").unlink()
    with pytest.raises(HistoError, match="no latent_space.json: it was made by an older histodiffusion"):
        pretrain(PretrainConfig(cache=(str(ca),), out=str(tmp_path / "ldm3"), steps=1, **TINY_UNET))


def test_pretrain_exports_loadable_model_and_fine_tunes(tmp_path):
    from histodiffusion.models.unet import load_ldm
    from histodiffusion.stages.pretrain import run

    c1, c2 = make_cache(tmp_path, "a", n=16, seed=1), make_cache(tmp_path, "b", n=8, seed=2)
    cfg = PretrainConfig(cache=(str(c1), str(c2)), weights=(3.0, 1.0), out=str(tmp_path / "ldm"), steps=4,
                         grad_accum=2, checkpoint_every=2, **{**TINY_UNET, "sample_every": 2})
    model = run(cfg)
    ldm = load_ldm(model)
    assert ldm["unet"].config.sample_size == 8 and ldm["unet"].config.in_channels == 4
    assert ldm["scheduler"].config.beta_start == 0.0015 and ldm["scheduler"].config.clip_sample is False
    assert ldm["info"]["weights"] == [0.75, 0.25] and ldm["info"]["latent_shape"] == [4, 8, 8]
    assert ldm["vae"].config.scaling_factor == ldm["info"]["scaling_factor"]
    assert (tmp_path / "ldm" / "samples" / "step_2.png").is_file()
    assert (tmp_path / "ldm" / "samples" / "step_4.png").is_file()
    ft = run(PretrainConfig(cache=(str(c2),), out=str(tmp_path / "ft"), steps=1, init_from=str(model), **TINY_UNET))
    assert json.loads((ft / "histodiffusion.json").read_text())["init_from"] == str(model)


def test_pretrain_resumes_after_sigkill(tmp_path):
    cache = make_cache(tmp_path, "a", n=16)
    out = tmp_path / "ldm"
    cmd = [sys.executable, "-m", "histodiffusion", "pretrain", "--cache", str(cache), "--out", str(out),
           "--block-out-channels", "16,32", "--batch-size", "4", "--warmup", "2", "--sample-every", "0",
           "--steps", "24", "--checkpoint-every", "3", "--keep-checkpoints", "2"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    first = list_checkpoints(out)
    assert first and not (out / "_COMPLETE.json").exists(), "the run finished before it could be killed"
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _metrics(out)
    resumed = [x for x in rows if "resumed_from" in x]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] >= first[-1][0] > 0
    assert resumed[0]["optimizer_step"] == resumed[0]["resumed_from"] == resumed[0]["ema_step"]
    steps = [x["step"] for x in rows if "loss" in x]
    assert steps[-1] == 24 and steps == sorted(steps)  # continued, not restarted from 0
    assert json.loads((out / "checkpoints" / "step_21" / "trainer_state.json").read_text())["step"] == 21
    assert (out / "model" / "unet_ema" / "config.json").is_file()


def test_two_processes_read_disjoint_data_and_write_one_checkpoint(tmp_path):
    cache = make_cache(tmp_path, "a", n=48)
    out = tmp_path / "ldm"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "histodiffusion", "pretrain", "--cache", str(cache), "--out", str(out), "--block-out-channels", "16,32",
           "--batch-size", "4", "--warmup", "1", "--sample-every", "0", "--steps", "5", "--checkpoint-every", "2",
           "--keep-checkpoints", "5"]
    r = subprocess.run(cmd, env={**_env(), "HISTODIFFUSION_RECORD_IDS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = [{line.split("\t")[1] for line in (out / "debug" / f"ids_rank{k}.txt").read_text().splitlines()}
           for k in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 20 and not ids[0] & ids[1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4", "step_5"]
    assert list(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == [5]
    assert (out / "_COMPLETE.json").is_file()


def _poison_latent(cache: Path, cfg: PretrainConfig, step: int) -> None:
    """Write NaN into the posterior mean of one latent that pretraining first reads at `step` (1-based):
    the cache is the public seam (its order is EpochIndex's, a pure function of the seed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from histodiffusion.runtime.artifacts import latent_shard_name
    from histodiffusion.data.datasets import LatentDataset
    from histodiffusion.data.mixture import EpochIndex

    ds = LatentDataset(cache, cfg.subset)
    index = EpochIndex([len(ds)], cfg.weights, cfg.batch_size, seed=cfg.seed)
    assert len(ds) == index.batches_per_epoch * cfg.batch_size  # one epoch reads every latent once
    row = ds.rows[index.epoch(0)[(step - 1) * cfg.batch_size]]
    path = cache / latent_shard_name(int(row["shard"]))
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["mean"][int(row["index"])] = float("nan")
    save_file(tensors, str(path), metadata=meta)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    from histodiffusion.stages import pretrain

    cache = make_cache(tmp_path, "a", n=16)
    cfg = PretrainConfig(cache=(str(cache),), out=str(tmp_path / "ldm"), steps=10, checkpoint_every=2, **TINY_UNET)
    _poison_latent(cache, cfg, step=4)
    with pytest.raises(HistoError, match=r"nan at step 4.*checkpoints/step_2"):
        pretrain.run(cfg)
    assert [s for s, _ in list_checkpoints(tmp_path / "ldm")] == [2]
    assert not (tmp_path / "ldm" / "model").exists()
    # a truncated checkpoint: one clear error naming it, nothing deleted
    weights = tmp_path / "ldm" / "checkpoints" / "step_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(HistoError, match="cannot load checkpoint .*step_2"):
        pretrain.run(cfg)
    assert weights.is_file()


def test_epoch_index_weights_resume_and_bad_input():
    from histodiffusion.data.mixture import EpochIndex
    from histodiffusion.runtime.distributed import make_accelerator

    idx = EpochIndex([30, 10], [1.0, 3.0], batch_size=4, rank=0, world=1, seed=3)
    first = idx.epoch(0)
    assert sum(i >= 30 for i in first) == 30 and len(first) == 40  # source 2 over-sampled to 3/4
    it = idx.batches(0)
    seq = [next(it) for _ in range(25)]
    it2 = idx.batches(17)
    assert [next(it2) for _ in range(8)] == seq[17:]  # resume at any micro-batch continues the same order
    ranks = [set(EpochIndex([40], [], 4, r, 2, seed=1).epoch(2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20 and not ranks[0] & ranks[1]
    with pytest.raises(HistoError, match="empty source"):
        EpochIndex([5, 0], [], 4, names=["a", "b"])
    with pytest.raises(HistoError, match="do not fill one batch"):
        EpochIndex([5], [], 4, world=2)
    with pytest.raises(HistoError, match="fp16 needs a GPU"):
        make_accelerator("fp16")


def test_paper_preset_is_valid_and_paper_scale():
    from histodiffusion.runtime.config import config_from_dict
    from histodiffusion.runtime.presets import PRESETS, preset_overrides
    from histodiffusion.runtime.registry import build

    for name, stages in PRESETS.items():
        for stage, fields in stages.items():
            build(stage, fields)  # known fields of the right types
    ae = config_from_dict(AutoencoderConfig, preset_overrides("paper", "train-autoencoder"))
    tile = preset_overrides("paper", "prepare")["tile_size"]
    assert tile // 2 ** (len(ae.block_out_channels) - 1) == 64 and ae.latent_channels == 3
    pt = config_from_dict(PretrainConfig, preset_overrides("paper", "pretrain"))
    assert pt.block_out_channels[0] == 192 and (pt.beta_start, pt.beta_end, pt.loss) == (0.0015, 0.0155, "l1")
    with pytest.raises(HistoError, match="unknown preset"):
        preset_overrides("huge", "pretrain")
