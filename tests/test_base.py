"""The pretrained base: export-base, verification at load (files, format, checksums, latent shape),
loading with plain diffusers, and `run` adapting a base instead of pretraining."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_sample import SIZE, make_ldm, make_vae32
from histodiffusion.cli import main
from histodiffusion.models.base import CHECKSUMS, verify_base
from histodiffusion.runtime.errors import HistoError


@pytest.fixture
def base(tmp_path) -> Path:
    ldm = make_ldm(tmp_path / "ldm", make_vae32(tmp_path / "vae"))
    out = tmp_path / "base"
    assert main(["export-base", "--model", str(ldm), "--out", str(out), "--name", "tiny-base", "--version", "3"]) == 0
    return out


def _resum(base: Path) -> None:
    """Re-write checksums.json after a deliberate edit (to reach the checks behind the checksums)."""
    from histodiffusion.models.base import checksummed_files
    from histodiffusion.runtime.fileio import sha256_file

    files = {rel: sha256_file(base / rel) for rel in checksummed_files(base)}
    (base / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": files}))


def test_export_writes_fp16_weights_checksums_and_a_card(base):
    from safetensors import safe_open

    info = verify_base(base)
    assert info["base"]["name"] == "tiny-base" and info["base"]["version"] == "3"
    assert info["latent_shape"] == [4, SIZE // 4, SIZE // 4] and info["base"]["tile_size"] == SIZE
    for sub in ("vae", "unet_ema"):
        with safe_open(str(next((base / sub).glob("*.safetensors"))), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    sums = json.loads((base / CHECKSUMS).read_text())["files"]
    assert "unet_ema/diffusion_pytorch_model.safetensors" in sums and "sources.csv" in sums
    card = (base / "README.md").read_text()
    assert "tiny-base (version 3)" in card and "from_pretrained" in card


def test_plain_diffusers_gives_the_same_images_as_the_package(base, tmp_path):
    """Without importing histodiffusion: the same UNet output and decoded image for the same latents."""
    code = f"""
import sys, torch
assert 'histodiffusion' not in sys.modules
from diffusers import AutoencoderKL, UNet2DModel
torch.manual_seed(0)
z = torch.randn(2, 4, {SIZE // 4}, {SIZE // 4})
vae = AutoencoderKL.from_pretrained('{base}/vae'); unet = UNet2DModel.from_pretrained('{base}/unet_ema')
with torch.no_grad():
    eps = unet(z, torch.tensor([500, 500])).sample
    img = vae.decode(z / vae.config.scaling_factor).sample
torch.save({{'eps': eps, 'img': img}}, '{tmp_path}/plain.pt')
assert 'histodiffusion' not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    from histodiffusion.models.unet import load_ldm

    ldm = load_ldm(base)
    torch.manual_seed(0)
    z = torch.randn(2, 4, SIZE // 4, SIZE // 4)
    with torch.no_grad():
        eps = ldm["unet"](z, torch.tensor([500, 500])).sample
        img = ldm["vae"].decode(z / ldm["info"]["scaling_factor"]).sample
    assert torch.equal(eps, plain["eps"]) and torch.equal(img, plain["img"])


def test_corrupted_weight_file_is_refused_by_its_checksum(base):
    w = base / "unet_ema" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(HistoError, match="checksum mismatch for unet_ema/diffusion_pytorch_model.safetensors"):
        verify_base(base)


@pytest.mark.parametrize("breakage, message", [
    ("missing", "scheduler/scheduler_config.json is missing"),
    ("format", "format_version 99"),
    ("shape", "latent shape mismatch"),
    ("unlisted", "extra.safetensors is not in checksums.json"),
])
def test_bad_base_is_one_clear_error_and_run_writes_nothing(base, tmp_path, capsys, breakage, message):
    if breakage == "missing":
        (base / "scheduler" / "scheduler_config.json").unlink()
    elif breakage == "format":
        rec = json.loads((base / "histodiffusion.json").read_text())
        (base / "histodiffusion.json").write_text(json.dumps({**rec, "format_version": 99}))
        _resum(base)
    elif breakage == "shape":
        cfg = json.loads((base / "unet_ema" / "config.json").read_text())
        (base / "unet_ema" / "config.json").write_text(json.dumps({**cfg, "sample_size": SIZE // 2}))
        _resum(base)
    else:
        (base / "unet_ema" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(HistoError, match=message):
        verify_base(base)
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--base", str(base), "--tile-size", str(SIZE)]) == 2
    assert message.split()[0] in capsys.readouterr().err
    assert not out.exists()


def test_run_plan_with_a_base_skips_pretraining_and_guards_leakage(base, tmp_path):
    from histodiffusion.runtime.config import RunConfig
    from histodiffusion.pipeline import plan

    steps = plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE))
    stages = [s.stage for s in steps]
    assert "pretrain" not in stages and "train-autoencoder" not in stages and stages[:2] == ["prepare", "encode"]
    fields = {s.name: s.fields for s in steps}
    assert fields["prepare target"]["exclude"] == (str(base),)
    assert fields["encode target"]["vae"] == str(base / "vae")
    assert fields["sample"]["model"] == str(base)
    with pytest.raises(HistoError, match="--base none"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, unlabeled=("a.png",)))
    with pytest.raises(HistoError, match=f"works on {SIZE} px tiles"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=64))
    scratch = [s.stage for s in plan(RunConfig(out=str(tmp_path / "r"), base="none"))]
    assert "pretrain" in scratch and "train-autoencoder" in scratch


def test_leakage_guard_refuses_a_target_the_base_was_trained_on(tmp_path):
    """prepare --exclude BASE: a labeled image whose file is in the base's sources.csv is refused."""
    from PIL import Image

    from histodiffusion.runtime.fileio import sha256_file

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = ["path,label,group_id"]
    for i in range(12):
        Image.new("RGB", (20, 20), (200 - 5 * i, 100, 150 + i)).save(img_dir / f"t{i}.png")
        rows.append(f"t{i}.png,{'ab'[i % 2]},g{i}")
    (img_dir / "labels.csv").write_text("\n".join(rows) + "\n")
    base = tmp_path / "fakebase"
    base.mkdir()
    (base / "sources.csv").write_text(f"path,sha256\ncolon/x.png,{sha256_file(img_dir / 't3.png')}\n")
    out = tmp_path / "target"
    assert main(["prepare", "--labels-csv", str(img_dir / "labels.csv"), "--tile-size", "16", "--exclude", str(base),
                 "--fewshot-fracs", "0.5", "--out", str(out)]) == 2
    assert not out.exists()


def test_adapting_the_base_on_unlabeled_target_tiles(base, tmp_path):
    """--adapt-unlabeled-steps: continued unconditional training from the base on the target's train tiles
    (labels unused) feeds guidance; the leakage guard refuses validation/test tiles."""
    from helpers_sample import make_labeled_cache
    from histodiffusion.runtime.config import PretrainConfig, RunConfig
    from histodiffusion.pipeline import plan
    from histodiffusion.stages.pretrain import run as pretrain

    steps = {s.name: s for s in plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE,
                                               adapt_unlabeled_steps=30))}
    adapt = steps["adapt LDM to target tiles (unlabeled)"]
    assert adapt.stage == "pretrain" and adapt.fields["init_from"] == str(base)
    assert adapt.fields["subset"] == "train" and adapt.fields["steps"] == 30
    assert steps["sample"].fields["model"] == str(tmp_path / "r" / "ldm_target" / "model")
    assert not steps["finetune decoder"].fields.get("unlabeled_subset")
    # --adapt-decoder-unlabeled: the decoder fine-tune also reconstructs the train split, labels unused
    dec = {s.name: s for s in plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE,
                                             adapt_decoder_unlabeled=True))}["finetune decoder"]
    assert dec.fields["unlabeled_subset"] == "train" and dec.fields["subset"] == "frac0.25"
    with pytest.raises(HistoError, match="needs --finetune-decoder true"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, adapt_decoder_unlabeled=True,
                       finetune_decoder=False))
    # --start-from unlabeled: every arm's samples start from train tiles, classes by the latent classifier
    steps = {s.name: s for s in plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE,
                                               start_from="unlabeled", start_strength=0.1, ablations=True))}
    for name in ("sample", "sample_nopretrain"):
        f = steps[name].fields
        assert (f["strength"], f["init_labels"], f["init_subset"], f["detail"]) == (0.1, "classifier", "train",
                                                                                    "tile"), name
        assert steps[name.replace("sample", "select")].fields["rank_by"] == "confidence", name
    # ... and the main evaluation adds the baseline: those tiles pseudo-labelled without the generator
    # and the samples' own starting tiles, raw (what the diffusion step adds); the samples keep their tiles'
    # detail, so no roundtrip arm, unless the user's sample config decodes them plainly
    assert steps["evaluate"].fields["arms"][-2:] == ("pseudo", "start")
    assert "classic" in steps["evaluate"].fields["arms"] and "roundtrip" not in steps["evaluate"].fields["arms"]
    stage_cfg = tmp_path / "plain.json"
    stage_cfg.write_text(json.dumps({"sample": {"detail": "none"}}))
    plain = {s.name: s for s in plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE,
                                               start_from="unlabeled", stage_config=str(stage_cfg)))}
    assert plain["sample"].fields["detail"] == "none"
    assert plain["evaluate"].fields["arms"][-3:] == ("pseudo", "start", "roundtrip")
    assert not {"pseudo", "start", "roundtrip"} & set(steps["evaluate_nopretrain"].fields["arms"])
    # --start-labels ensemble: the classes are read by the latent classifier and its image-space baseline
    ens = {s.name: s for s in plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE,
                                             start_from="unlabeled", start_labels="ensemble"))}["sample"].fields
    assert ens["init_labels"] == "ensemble"
    assert ens["init_image_classifier"] == (str(tmp_path / "r" / "adapt" / "latent_classifier" / "image_baseline"),)
    stage_cfg = tmp_path / "no_baseline.json"
    stage_cfg.write_text(json.dumps({"train-latent-classifier": {"image_baseline": False}}))
    with pytest.raises(HistoError, match="--start-labels ensemble .* needs image_baseline true"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, start_from="unlabeled",
                       start_labels="ensemble", stage_config=str(stage_cfg)))
    with pytest.raises(HistoError, match="--start-labels ensemble are used only with --start-from unlabeled"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, start_labels="ensemble"))
    noise = {s.name: s for s in plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE))}
    assert noise["sample"].fields.get("strength", 1.0) == 1.0
    assert noise["select"].fields.get("rank_by", "centroid") == "centroid"
    assert "pseudo" not in noise["evaluate"].fields.get("arms", ())
    stage_cfg.write_text(json.dumps({"evaluate": {"arms": ["real", "selected"]}}))  # the user's arms win
    assert {s.name: s for s in plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE,
                                              start_from="unlabeled", stage_config=str(stage_cfg)))
            }["evaluate"].fields["arms"] == ["real", "selected"]
    with pytest.raises(HistoError, match="stage 'sample': strength 0.01 of 20 steps runs no step"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, start_from="unlabeled",
                       start_strength=0.01))
    with pytest.raises(HistoError, match="--target-unlabeled tiles are used only by"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, target_unlabeled=(str(tmp_path),)))
    with pytest.raises(HistoError, match="--target-unlabeled .*nope: no such file or folder"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, start_from="unlabeled",
                       target_unlabeled=(str(tmp_path / "nope"),)))
    prep = {s.name: s for s in plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE,
                                              start_from="unlabeled", target_unlabeled=(str(tmp_path),)))}
    assert prep["prepare target"].fields["unlabeled_tiles"] == (str(tmp_path),)
    with pytest.raises(HistoError, match="used only with --start-from unlabeled"):
        plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, start_strength=0.3))
    for bad in ({"start_from": "tiles"}, {"start_from": "unlabeled", "start_strength": 1.0}):
        with pytest.raises(HistoError, match="start_"):
            plan(RunConfig(out=str(tmp_path / "r"), base=str(base), tile_size=SIZE, **bad))

    _, _, cache = make_labeled_cache(tmp_path / "t", vae=base / "vae")
    common = dict(cache=(str(cache),), init_from=str(base), steps=2, batch_size=4, warmup=0, sample_every=0,
                  checkpoint_every=0)
    with pytest.raises(HistoError, match="validation/test tiles"):
        pretrain(PretrainConfig(out=str(tmp_path / "bad"), subset="all", **common))
    model = pretrain(PretrainConfig(out=str(tmp_path / "ok"), subset="train", **common))
    assert (model / "unet_ema" / "config.json").is_file()
    # a base exported from a continued model says where its training started and the total
    assert main(["export-base", "--model", str(model), "--out", str(tmp_path / "base2"), "--version", "4"]) == 0
    assert "2 steps, continued from the EMA weights of `base`" in (tmp_path / "base2" / "README.md").read_text()
    again = pretrain(PretrainConfig(out=str(tmp_path / "ok2"), subset="train", **{**common, "init_from": str(tmp_path / "base2")}))
    assert main(["export-base", "--model", str(again), "--out", str(tmp_path / "base3"), "--version", "5"]) == 0
    card = (tmp_path / "base3" / "README.md").read_text()
    assert "2 steps, continued from the EMA weights of `base2` (itself 2 steps: 4 in total)" in card


def test_scale_check_against_a_base_uses_its_pretraining_mixture(tmp_path):
    """A target is compared with the mixture-weighted nucleus width of the base's datasets."""
    from histodiffusion.data.resolution import scale_warnings

    base = tmp_path / "b"
    base.mkdir()
    record = {"format_version": 1, "sources": ["colon", "bone"], "weights": [0.75, 0.25],
              "base": {"data": [{"name": "colon", "resolution": {"nucleus_px": 4.0}},
                                {"name": "bone", "resolution": {"nucleus_px": 20.0}}]}}
    (base / "histodiffusion.json").write_text(json.dumps(record))
    (c,) = scale_warnings("target", 8.0, [base], 1.5)
    assert c["nucleus_px"] == 8.0 and c["ratio"] == 1.0 and c["warning"] is None  # 0.75 * 4 + 0.25 * 20
    (c,) = scale_warnings("target", 4.0, [base], 1.5)
    assert c["ratio"] == 2.0 and "target" in c["warning"] and str(base) in c["warning"]


def test_a_longer_trained_decoder_replaces_the_bases_and_nothing_else(base, tmp_path, capsys):
    """train-autoencoder --init-from BASE --train-part decoder keeps the encoder (so the UNet's latents) and the
    scaling factor; export-base --vae takes that decoder and refuses an autoencoder with another encoder."""
    from helpers_pretrain import make_dataset
    from histodiffusion.models.autoencoder import load_vae

    data = make_dataset(tmp_path / "unl", n=12, size=SIZE, seed=3)
    arch = ["--block-out-channels", "8,16,16", "--latent-channels", "4", "--batch-size", "4", "--crop", "0",
            "--holdout", "2", "--eval-every", "0", "--checkpoint-every", "0", "--data", str(data)]
    assert main(["train-autoencoder", *arch, "--steps", "2", "--init-from", str(base), "--train-part", "decoder",
                 "--out", str(tmp_path / "dec")]) == 0
    old, new = load_vae(base / "vae"), load_vae(tmp_path / "dec" / "model" / "vae")
    a, b = old.state_dict(), new.state_dict()
    changed = {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}
    assert changed == {"decoder", "post_quant_conv"} and new.config.scaling_factor == old.config.scaling_factor
    assert "only the decoder was trained" in (tmp_path / "dec" / "model" / "vae" / "README.md").read_text()

    out = tmp_path / "base_dec"
    assert main(["export-base", "--model", str(base), "--vae", str(tmp_path / "dec" / "model" / "vae"),
                 "--out", str(out), "--version", "4"]) == 0
    info = verify_base(out)
    assert info["vae_hash"] != verify_base(base)["vae_hash"]
    assert "then the decoder alone 2 more (encoder, latents" in (out / "README.md").read_text()
    x = torch.randn(1, 4, SIZE // 4, SIZE // 4)
    assert not torch.equal(load_vae(out / "vae").decode(x).sample, old.decode(x).sample)
    assert (out / "unet_ema" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (base / "unet_ema" / "diffusion_pytorch_model.safetensors").read_bytes()

    # an autoencoder trained whole (another encoder) cannot replace the base's: one clear error, nothing written
    assert main(["train-autoencoder", *arch, "--steps", "1", "--out", str(tmp_path / "whole")]) == 0
    assert main(["export-base", "--model", str(base), "--vae", str(tmp_path / "whole" / "model" / "vae"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "its encoder differs" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # bad values of the new options
    assert main(["train-autoencoder", *arch, "--train-part", "decoder", "--out", str(tmp_path / "x1")]) == 2
    assert "needs --init-from" in capsys.readouterr().err
    assert main(["train-autoencoder", *arch, "--train-part", "encoder", "--out", str(tmp_path / "x2")]) == 2
    assert "train_part must be one of all, decoder" in capsys.readouterr().err
    assert main(["train-autoencoder", *arch[:3], "8", *arch[4:], "--init-from", str(base),
                 "--out", str(tmp_path / "x3")]) == 2
    assert "latent_channels 4 (config: 8)" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("x1", "x2", "x3"))
