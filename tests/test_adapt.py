"""stages/latent_classifier.py, stages/finetune_decoder.py: the noise-aware latent classifier learns a
separable toy problem and reports accuracy per
timestep bucket; resume continues exactly; decoder fine-tune changes the decoder only."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from histodiffusion.models.autoencoder import vae_id
from histodiffusion.models.latent_classifier import load_latent_classifier
from histodiffusion.runtime.config import FinetuneDecoderConfig, LatentClassifierConfig, SampleConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.runtime.latent_space import latent_hash
from histodiffusion.stages import finetune_decoder, latent_classifier

from helpers_interrupt import interrupt_at
from helpers_sample import make_labeled_cache, make_ldm


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapt")
    data, vae, cache = make_labeled_cache(d)
    ldm = make_ldm(d / "ldm", vae)
    return {"dir": d, "data": data, "vae": vae, "cache": cache, "ldm": ldm}


def lc_cfg(target, out, **kw):
    kw = {"steps": 60, "batch_size": 16, "width": 16, "depth": 2, "lr": 3e-3, "checkpoint_every": 30,
          "subset": "train", "val_subset": "val", "scheduler": str(target["ldm"] / "scheduler"),
          "image_backbone": "small_cnn_w8", **kw}
    return LatentClassifierConfig(cache=str(target["cache"]), out=str(out), **kw)


def test_latent_classifier_learns_and_reports_buckets(target, tmp_path):
    # the toy autoencoder is untrained (not rotation-equivariant): learn from the latents as they are
    out = latent_classifier.run(lc_cfg(target, tmp_path / "lc", augment=False))
    m = json.loads((out / "metrics.json").read_text())
    by_t = m["val_accuracy_by_t"]
    assert list(by_t) == ["[0,250)", "[250,500)", "[500,750)", "[750,1000)"]
    assert by_t["[0,250)"] >= 0.85, by_t  # separable classes: well above chance (0.5) at low noise
    assert m["n_val"] == 8 and m["chance"] == 0.5
    # next to an image-space classifier trained on the same tiles with the same budget: ratio per bucket
    img = m["image_classifier"]
    assert img["steps"] == 60 and img["batch_size"] == 16 and img["lr"] == 3e-3 and img["backbone"] == "small_cnn_w8"
    assert img["n_train"] == m["n_train"] == 24 and img["n_val"] == 8 and 0 <= img["val_accuracy"] <= 1
    ratios = m["ratio_to_image_by_t"]
    assert list(ratios) == list(by_t)
    if img["val_accuracy"] > 0:
        assert all(ratios[b] == pytest.approx(by_t[b] / img["val_accuracy"]) for b in by_t)
    assert m["goal"]["bucket"] == "[0,250)" and m["goal"]["target"] == 0.9
    assert m["goal"]["met"] == (ratios["[0,250)"] >= 0.9 - 1e-9)
    assert (out / "image_baseline" / "classifier.json").is_file()
    assert "latent vs image classifier: t in [0,250)" in (out / "log.txt").read_text()
    model, info, _ = load_latent_classifier(out / "model")
    meta = json.loads((target["cache"] / "latent_space.json").read_text())  # the cache's latent-space record
    assert info["classes"] == ["dark", "pale"] and info["vae_hash"] == meta["vae_hash"]
    assert model.config.class_names == ["dark", "pale"]  # in config.json: loads as a pipeline component
    assert "Validation accuracy" in (out / "model" / "README.md").read_text()  # the model card
    assert info["scheduler"]["num_train_timesteps"] == 1000 and info["scaling_factor"] == meta["scaling_factor"]
    assert (out / "_COMPLETE.json").is_file()


def test_strength_summary_ratios_and_goal():
    from histodiffusion.stages.latent_classifier import strength_summary

    s = strength_summary({"[0,250)": 0.72, "[250,500)": 0.4}, 0.8)
    assert s["ratio_to_image_by_t"] == {"[0,250)": pytest.approx(0.9), "[250,500)": pytest.approx(0.5)}
    assert s["goal"]["bucket"] == "[0,250)" and s["goal"]["met"] is True
    assert strength_summary({"[0,250)": 0.7}, 0.8)["goal"]["met"] is False
    none = strength_summary({"[0,250)": 0.7}, 0.0)
    assert none["ratio_to_image_by_t"] == {"[0,250)": None} and none["goal"]["met"] is None


def test_image_baseline_needs_a_readable_dataset(target, tmp_path):
    with pytest.raises(HistoError, match="image baseline.*--image-baseline false"):
        latent_classifier.run(lc_cfg(target, tmp_path / "a", data=str(tmp_path / "moved")))
    assert not (tmp_path / "a" / "checkpoints").exists()  # refused before training


def test_latent_augmentation_draws_dihedral_transforms(target):
    """augment=True feeds each latent as one of its 8 flips/rotations, drawn from the step's generator."""
    from histodiffusion.data.datasets import LatentDataset
    from histodiffusion.core.transforms import DIHEDRAL, dihedral

    class NoNoise:  # add_noise as the identity, so the batch shows the (transformed) clean latents
        def add_noise(self, z, noise, t):
            return z

    ds = LatentDataset(target["cache"], "train", sample=False)
    idx = list(range(len(ds))) * 4
    plain, _, y = latent_classifier.noised_batch(ds, idx, NoNoise(), torch.Generator().manual_seed(0), 1000)
    aug, _, y2 = latent_classifier.noised_batch(ds, idx, NoNoise(), torch.Generator().manual_seed(0), 1000, augment=True)
    assert torch.equal(y, y2)
    seen = set()
    for z, za in zip(plain, aug):
        ks = [k for k in range(DIHEDRAL) if torch.equal(dihedral(z, k), za)]
        assert ks, "an augmented latent is not a dihedral transform of its latent"
        seen.add(ks[0])
    assert len(seen) >= 4  # transforms vary across the batch
    again, _, _ = latent_classifier.noised_batch(ds, idx, NoNoise(), torch.Generator().manual_seed(0), 1000, augment=True)
    assert torch.equal(aug, again)  # reproducible from the generator (exact resume)


def test_latent_classifier_resume_is_exact(target, tmp_path):
    cfg = lc_cfg(target, tmp_path / "lc", steps=60, checkpoint_every=20, val_subset="")
    ref = latent_classifier.run(dataclasses.replace(cfg, out=str(tmp_path / "ref")))
    # stopped when step 50 is logged: 10 steps after the checkpoint at step 40 are lost
    with interrupt_at("histodiffusion.train-latent-classifier", "step 50/60 "), pytest.raises(KeyboardInterrupt):
        latent_classifier.run(cfg)
    assert [p.name for p in sorted((tmp_path / "lc" / "checkpoints").iterdir())] == ["step_20", "step_40"]
    assert not (tmp_path / "lc" / "model").exists()
    out = latent_classifier.run(cfg)
    assert "resumed from step 40" in (out / "log.txt").read_text()
    a = load_file(str(out / "model" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(ref / "model" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latent_classifier_bad_input(target, tmp_path):
    with pytest.raises(HistoError, match="unknown subset"):
        latent_classifier.run(lc_cfg(target, tmp_path / "a", subset="frac0.5"))
    with pytest.raises(HistoError, match="scheduler folder not found"):
        latent_classifier.run(lc_cfg(target, tmp_path / "b", scheduler=str(tmp_path / "none")))
    with pytest.raises(HistoError, match="max_timestep"):
        latent_classifier.run(lc_cfg(target, tmp_path / "c", max_timestep=5000))


def test_finetune_decoder_changes_decoder_only(target, tmp_path):
    cfg = FinetuneDecoderConfig(data=str(target["data"]), subset="train", vae=str(target["vae"]),
                                out=str(tmp_path / "ft"), aux_weight=0.5, aux_steps=10, steps=6, batch_size=8,
                                lr=1e-3, checkpoint_every=3)
    out = finetune_decoder.run(cfg)
    new = load_file(str(out / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    old = load_file(str(target["vae"] / "diffusion_pytorch_model.safetensors"))
    enc = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in old if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec and set(new) == set(old)
    assert all(torch.equal(new[k], old[k]) for k in enc)
    assert any(not torch.equal(new[k], old[k]) for k in dec)
    # the exported autoencoder names its base: latents of the base autoencoder stay valid
    info = json.loads((out / "model" / "vae" / "histodiffusion.json").read_text())
    assert info["base_vae_hash"] == vae_id(target["vae"]) == latent_hash(out / "model" / "vae")
    assert vae_id(out / "model" / "vae") != info["base_vae_hash"]
    m = json.loads((out / "metrics.json").read_text())
    assert {"recon_l1", "aux_accuracy_on_recon"} <= set(m["before"]) and m["aux_weight"] == 0.5
    assert (out / "aux_classifier" / "classifier.json").is_file()
    card = (out / "model" / "vae" / "README.md").read_text()  # the model card, with its real figures
    assert card.startswith("# Fine-tuned decoder") and "- 6 steps on " in card
    assert f"recon_l1 {m['before']['recon_l1']:.4f}" in card and f"recon_l1 {m['after']['recon_l1']:.4f}" in card
    assert f"is that of {target['vae']}" in card and "AutoencoderKL.from_pretrained(" in card
    # sampling accepts the fine-tuned decoder with a classifier trained on base latents
    from helpers_sample import make_latent_classifier
    from histodiffusion.stages.sample import load_models

    clf = make_latent_classifier(tmp_path / "clf", target["cache"], target["ldm"] / "scheduler")
    m = load_models(SampleConfig(model=str(target["ldm"]), classifier=str(clf), vae=str(out / "model" / "vae")))
    assert m["vae_id"] == vae_id(out / "model" / "vae")


def test_finetune_decoder_plain_reconstruction(target, tmp_path):
    cfg = FinetuneDecoderConfig(data=str(target["data"]), subset="few", vae=str(target["vae"]),
                                out=str(tmp_path / "ft0"), aux_weight=0.0, steps=3, batch_size=4)
    out = finetune_decoder.run(cfg)
    m = json.loads((out / "metrics.json").read_text())
    assert "aux_accuracy_on_recon" not in m["after"] and not (out / "aux_classifier").exists()
    with pytest.raises(HistoError, match="aux_weight"):
        finetune_decoder.run(dataclasses.replace(cfg, out=str(tmp_path / "bad"), aux_weight=-1.0))


def test_finetune_decoder_unlabeled_stream_and_leakage_guard(target, tmp_path):
    """The target's unlabeled tiles add a reconstruction stream that changes the decoder; val/test are refused."""
    cfg = FinetuneDecoderConfig(data=str(target["data"]), subset="few", vae=str(target["vae"]),
                                out=str(tmp_path / "plain"), aux_weight=0.0, steps=4, batch_size=4,
                                unlabeled_batch_size=4)
    plain = finetune_decoder.run(cfg)
    adapted = finetune_decoder.run(dataclasses.replace(cfg, out=str(tmp_path / "unl"), unlabeled_subset="train"))
    m = json.loads((adapted / "metrics.json").read_text())
    from histodiffusion.data.datasets import PixelDataset

    assert m["n_unlabeled"] == len(PixelDataset(target["data"], "train"))
    assert json.loads((plain / "metrics.json").read_text())["n_unlabeled"] == 0
    logged = [json.loads(line) for line in (adapted / "metrics.jsonl").read_text().splitlines()]
    assert logged and all("l1_unlabeled" in r for r in logged)
    a, b = (load_file(str(d / "model" / "vae" / "diffusion_pytorch_model.safetensors")) for d in (plain, adapted))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    info = json.loads((adapted / "model" / "vae" / "histodiffusion.json").read_text())
    assert info["unlabeled_subset"] == "train"
    card = (adapted / "model" / "vae" / "README.md").read_text()
    assert f"labels unused), {m['n_unlabeled']} tiles of subset `train`" in card
    assert "labels unused" not in (plain / "model" / "vae" / "README.md").read_text()
    for held in ("val", "test", "all"):
        with pytest.raises(HistoError, match="validation/test tiles"):
            finetune_decoder.run(dataclasses.replace(cfg, out=str(tmp_path / held), unlabeled_subset=held))
        assert not (tmp_path / held).exists()


def test_latent_classifier_on_the_pretrained_unet_encoder(target, tmp_path):
    """trunk_unet: the classifier's trunk is the UNet's encoder with its weights, frozen while the head trains;
    exported, it loads like any latent classifier and differentiates with respect to the latents (guidance)."""
    from diffusers import UNet2DModel

    from histodiffusion.models.latent_classifier import TRUNK_PREFIXES

    unet_dir = target["ldm"] / "unet_ema"
    out = latent_classifier.run(lc_cfg(target, tmp_path / "lc", augment=False, trunk_unet=str(unet_dir),
                                       image_baseline=False))
    model, info, _ = load_latent_classifier(out / "model")
    assert info["trunk_from"] == str(unet_dir.resolve()) and model.config.trunk["block_out_channels"] == [16, 32]
    unet = UNet2DModel.from_pretrained(str(unet_dir)).state_dict()
    state = model.state_dict()
    trunk = [k for k in state if k.startswith(TRUNK_PREFIXES)]
    assert trunk and all(torch.equal(state[k], unet[k]) for k in trunk)  # pretrained and frozen
    assert not any(k.startswith("up_blocks") for k in state)  # the decoder half is not kept
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_accuracy_by_t"]["[0,250)"] > 0.5  # the head learnt something on the toy classes
    assert "encoder of the pretrained UNet" in (out / "model" / "README.md").read_text()
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    model(z, torch.tensor([10, 500]))[:, 0].sum().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def test_latent_classifier_trunk_bad_input(target, tmp_path):
    with pytest.raises(HistoError, match="trunk_unet: .* is not a UNet folder"):
        latent_classifier.run(lc_cfg(target, tmp_path / "a", trunk_unet=str(tmp_path)))
    from histodiffusion.models.unet import build_unet

    build_unet((16, 32), 1, False, 8, 4).save_pretrained(tmp_path / "unet8")  # for 8-channel latents
    with pytest.raises(HistoError, match="takes 8 latent channels, the cache's latents have 4"):
        latent_classifier.run(lc_cfg(target, tmp_path / "b", trunk_unet=str(tmp_path / "unet8")))
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "model").exists()
