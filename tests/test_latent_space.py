"""The latent-space record: one decision of an autoencoder's factor, one compatibility check."""
import pytest
from helpers_pretrain import make_vae

from histodiffusion.models.autoencoder import load_vae
from histodiffusion.runtime.errors import HistoError
from histodiffusion.runtime.latent_space import (LatentSpace, check_compatible, decoder_factor, of_autoencoder,
                                                 of_cache, write_cache_record)


def test_check_compatible_names_both_sides():
    a = LatentSpace("a" * 64, 0.5, (4, 8, 8)).with_schedule({"num_train_timesteps": 1000, "beta_end": 0.0155})
    check_compatible(a, LatentSpace("a" * 64, 0.5), "cache A", "model B")  # unknown shape/schedule: not compared
    for other, match in ((LatentSpace("b" * 64, 0.5), "autoencoder aaaaaaaaaaaa, model B of bbbbbbbbbbbb"),
                         (LatentSpace("a" * 64, 0.25), "scales latents by 0.5, model B by 0.25"),
                         (LatentSpace("a" * 64, 0.5, (4, 16, 16)), "shape"),
                         (LatentSpace("a" * 64, 0.5).with_schedule({"beta_end": 0.02}), "beta_end=0.0155 vs 0.02")):
        with pytest.raises(HistoError, match=match):
            check_compatible(a, other, "cache A", "model B")


def test_foreign_autoencoder_factor_is_never_its_default(tmp_path):
    vae_dir = make_vae(tmp_path / "vae", scaling_factor=0.7)
    vae = load_vae(vae_dir)
    space = of_autoencoder(vae_dir, vae)
    assert space.scaling_factor == pytest.approx(0.7) and space.source == "vae"
    (vae_dir / "histodiffusion.json").unlink()  # now a foreign autoencoder (diffusers default in its config)
    with pytest.raises(HistoError, match="not trusted; pass --scaling-factor"):
        of_autoencoder(vae_dir, vae)
    assert of_autoencoder(vae_dir, vae, override=0.3).source == "override"
    # decoding: a foreign decoder decodes with the factor its latents were scaled by, set in its config
    foreign = load_vae(vae_dir)
    assert decoder_factor(vae_dir, foreign, LatentSpace("x", 0.3)) == 0.3 and foreign.config.scaling_factor == 0.3
    # a measured decoder must agree with the space
    measured_dir = make_vae(tmp_path / "vae2", scaling_factor=0.7)
    with pytest.raises(HistoError, match="has scaling factor 0.7"):
        decoder_factor(measured_dir, load_vae(measured_dir), LatentSpace("x", 0.3))


def test_cache_record_round_trips_and_refuses_other_formats(tmp_path):
    import json

    space = LatentSpace("h" * 64, 0.42, (4, 8, 8), "/vae", "vae")
    write_cache_record(tmp_path, space)
    assert of_cache(tmp_path) == space
    rec = json.loads((tmp_path / "latent_space.json").read_text())
    (tmp_path / "latent_space.json").write_text(json.dumps({**rec, "format_version": 1}))
    with pytest.raises(HistoError, match="format_version 1"):
        of_cache(tmp_path)


def test_roundtrip_uint8_is_one_encode_decode_pass_in_any_batch_size(tmp_path):
    import torch

    from histodiffusion.models.autoencoder import roundtrip_uint8

    vae = load_vae(make_vae(tmp_path / "vae", scaling_factor=0.7))
    tiles = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rec, means = roundtrip_uint8(vae, tiles, batch=2)
    with torch.no_grad():
        mean = vae.encode(tiles.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
        ref = ((vae.decode(mean).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert rec.dtype == torch.uint8 and rec.shape == tiles.shape and means.shape == mean.shape
    assert torch.allclose(means, mean, atol=1e-5) and (rec.int() - ref.int()).abs().max() <= 1
    assert (roundtrip_uint8(vae, tiles, batch=5)[0].int() - rec.int()).abs().max() <= 1


def test_roundtrip_uint8_turns_each_latent_before_decoding(tmp_path):
    import torch

    from histodiffusion.core.transforms import dihedral
    from histodiffusion.models.autoencoder import roundtrip_uint8

    vae = load_vae(make_vae(tmp_path / "vae", scaling_factor=0.7))
    tiles = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    turns = [0, 1, 4, 7]
    rec, means = roundtrip_uint8(vae, tiles, batch=3, turns=turns)
    plain, plain_means = roundtrip_uint8(vae, tiles, batch=3)
    assert torch.allclose(means, plain_means)  # the means returned are the unturned ones
    with torch.no_grad():
        z = torch.stack([dihedral(m, k) for m, k in zip(plain_means, turns)])
        ref = ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (rec.int() - ref.int()).abs().max() <= 1
    assert (rec[0].int() - plain[0].int()).abs().max() <= 1  # turn 0: the plain round trip
    assert (rec[1].int() - plain[1].int()).abs().max() > 1  # a quarter turn of the latent changes the image
