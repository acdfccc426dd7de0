"""The KL autoencoder: a diffusers `AutoencoderKL` built from `AutoencoderConfig`, and its loader.

Downsampling factor f = 2**(len(block_out_channels) - 1) (default 3 blocks: f = 4, as in the paper).
The latent scaling factor is *measured* on the training corpus at the end of `train-autoencoder`
(1 / std of sampled latents) and stored in the exported model's config (`scaling_factor`); the
folder's `histodiffusion.json` records that it was measured. A folder without that record (e.g.
a foreign VAE) keeps diffusers' default scaling_factor, which this package never trusts: `encode`
then needs an explicit `--scaling-factor` (latent_space.of_autoencoder decides every factor).
"""
from __future__ import annotations

from pathlib import Path

from ..runtime.artifacts import MODEL_INFO
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json, sha256_dir
from ..runtime.rundirs import check_format_version
from . import norm_groups


def downsample_factor(block_out_channels) -> int:
    return 2 ** (len(block_out_channels) - 1)


def build_vae(block_out_channels=(32, 64, 128), layers_per_block: int = 1, latent_channels: int = 4,
              sample_size: int = 64):
    """A fresh AutoencoderKL (RGB in/out); `sample_size` is the tile size it is trained on."""
    from diffusers import AutoencoderKL

    chans = tuple(int(c) for c in block_out_channels)
    if not chans or any(c <= 0 for c in chans):
        raise HistoError(f"block_out_channels must be positive widths, got {list(block_out_channels)}")
    n = len(chans)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=chans,
                         layers_per_block=int(layers_per_block), latent_channels=int(latent_channels),
                         norm_num_groups=norm_groups(chans), sample_size=int(sample_size))


def build_vae_from_config(cfg, sample_size: int):
    """From an AutoencoderConfig (config.py)."""
    return build_vae(cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels, sample_size)


def check_vae_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise HistoError(f"autoencoder folder not found: {folder} (run train-autoencoder, or pass --vae)")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise HistoError(f"{folder} is not an autoencoder folder (needs config.json and *.safetensors "
                         f"from save_pretrained)")
    return folder


def load_vae(folder: str | Path):
    """AutoencoderKL.from_pretrained(folder) in eval mode, with a clear error naming the folder."""
    from diffusers import AutoencoderKL

    folder = check_vae_folder(folder)
    if (folder / MODEL_INFO).is_file():  # written by histodiffusion (a foreign diffusers VAE has none)
        check_format_version(read_json(folder / MODEL_INFO, "autoencoder info"), folder / MODEL_INFO)
    try:
        vae = AutoencoderKL.from_pretrained(str(folder))
    except Exception as e:
        raise HistoError(f"cannot load autoencoder from {folder}: {type(e).__name__}: {e}") from None
    return vae.eval()


def vae_id(folder: str | Path) -> str:
    """Content hash of an autoencoder folder (its weight files): names the VAE in caches and models."""
    return sha256_dir(check_vae_folder(folder))


def encode_posterior(vae, images):
    """(mean, std) of q(z | x) for images in [-1, 1]: float32 tensors [N, C, h, w]."""
    post = vae.encode(images).latent_dist
    return post.mean.float(), post.std.float()


def roundtrip_uint8(vae, images_u8, batch: int = 64, turns=None):
    """(reconstructions uint8 [N, H, W, 3], posterior means [N, C, h, w]) of uint8 tiles [N, H, W, 3]: one
    encode (posterior mean) / decode pass, what a tile looks like once it has been through the autoencoder.
    `turns` (N dihedral indices): each mean is turned in latent space before it is decoded, as the sampler
    turns a starting tile's latent (the means returned are the unturned ones)."""
    import torch

    from ..core.transforms import dihedral
    from .classifier import to_model_input

    recs, means = [], []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            mean = encode_posterior(vae, to_model_input(images_u8[i:i + batch]))[0]
            z = mean if turns is None else torch.stack([dihedral(m, int(k)) for m, k in zip(mean, turns[i:i + batch])])
            rec = vae.decode(z).sample.clamp(-1, 1)
            recs.append(rec.add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
            means.append(mean)
    return torch.cat(recs), torch.cat(means)


def save_vae(vae, folder: str | Path, scaling_factor: float, **info) -> Path:
    """Export atomically: save_pretrained (safetensors) with the measured scaling factor in its config,
    plus histodiffusion.json (scaling factor, downsampling, latent channels and `info`)."""
    import math

    from ..runtime.artifacts import format_meta
    from ..runtime.fileio import atomic_path, write_json_atomic

    if not (scaling_factor > 0 and math.isfinite(scaling_factor)):
        raise HistoError(f"measured latent scaling factor is {scaling_factor}: the autoencoder's latents are "
                         f"degenerate (constant or non-finite); train longer or check the data")
    folder = Path(folder)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    with atomic_path(folder) as tmp:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        write_json_atomic(tmp / MODEL_INFO, format_meta(
            kind="autoencoder", scaling_factor=float(scaling_factor),
            downsample=downsample_factor(vae.config.block_out_channels),
            latent_channels=int(vae.config.latent_channels), sample_size=int(vae.config.sample_size), **info))
    return folder
