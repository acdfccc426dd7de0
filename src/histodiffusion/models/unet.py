"""The latent diffusion UNet (diffusers `UNet2DModel`) and its DDPM noise schedule, from
`PretrainConfig`; and the loader of an exported LDM folder (unet_ema/, scheduler/, vae/,
histodiffusion.json).
"""
from __future__ import annotations

from pathlib import Path

from ..runtime.artifacts import LDM_SCHEDULER, LDM_UNET, LDM_VAE, MODEL_INFO
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json
from ..runtime.rundirs import check_format_version
from . import norm_groups


def build_unet(block_out_channels=(64, 128, 128), layers_per_block: int = 1, attention: bool = True,
               latent_channels: int = 4, latent_size: int = 16):
    """An unconditional UNet2DModel on [latent_channels, latent_size, latent_size] latents.

    With `attention`, the lowest-resolution down block and the matching up block use self-attention.
    """
    from diffusers import UNet2DModel

    chans = tuple(int(c) for c in block_out_channels)
    n = len(chans)
    if n < 1 or any(c <= 0 for c in chans):
        raise HistoError(f"UNet block_out_channels must be positive widths, got {list(block_out_channels)}")
    if latent_size % (2 ** (n - 1)):
        raise HistoError(f"latent size {latent_size} is not divisible by 2**{n - 1} "
                         f"(UNet with {n} blocks); use fewer UNet blocks or larger tiles")
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    groups = norm_groups(chans)
    return UNet2DModel(sample_size=int(latent_size), in_channels=int(latent_channels),
                       out_channels=int(latent_channels), block_out_channels=chans,
                       layers_per_block=int(layers_per_block), down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=groups,
                       attention_head_dim=min(8, chans[-1]))


def build_unet_from_config(cfg, latent_shape):
    """From a PretrainConfig and the cache's latent shape [C, h, w]."""
    c, h, w = (int(v) for v in latent_shape)
    if h != w:
        raise HistoError(f"latents must be square, got {h}x{w}")
    return build_unet(cfg.block_out_channels, cfg.layers_per_block, cfg.attention, c, h)


def build_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 0.0015,
                    beta_end: float = 0.0155, prediction_type: str = "epsilon"):
    """DDPMScheduler for training (paper: linear betas 0.0015..0.0155, T=1000); never clips latents."""
    from diffusers import DDPMScheduler

    if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise HistoError(f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, not {beta_schedule!r}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise HistoError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")
    if num_train_timesteps < 2:
        raise HistoError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if not 0 < beta_start < beta_end < 1:
        raise HistoError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    return DDPMScheduler(num_train_timesteps=int(num_train_timesteps), beta_schedule=beta_schedule,
                         beta_start=float(beta_start), beta_end=float(beta_end),
                         prediction_type=prediction_type, clip_sample=False)


def build_scheduler_from_config(cfg):
    return build_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
                           cfg.prediction_type)


def load_unet(folder: str | Path):
    from diffusers import UNet2DModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HistoError(f"UNet folder not found or incomplete: {folder} (needs config.json from save_pretrained)")
    try:
        return UNet2DModel.from_pretrained(str(folder)).eval()
    except Exception as e:
        raise HistoError(f"cannot load UNet from {folder}: {type(e).__name__}: {e}") from None


def load_scheduler(folder: str | Path, cls=None):
    """The training DDPMScheduler (or `cls`, e.g. DDIMScheduler, from the same config), clip_sample off."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    if not (folder / "scheduler_config.json").is_file():
        raise HistoError(f"scheduler folder not found or incomplete: {folder} (needs scheduler_config.json)")
    cls = cls or DDPMScheduler
    try:
        return cls.from_pretrained(str(folder), clip_sample=False)
    except Exception as e:
        raise HistoError(f"cannot load scheduler from {folder}: {type(e).__name__}: {e}") from None


def load_ldm(model_dir: str | Path) -> dict:
    """An exported LDM folder: {"unet", "scheduler", "vae", "info", "dir"} (vae loaded from model/vae)."""
    from .autoencoder import load_vae

    model_dir = Path(model_dir)
    if not (model_dir / MODEL_INFO).is_file():
        raise HistoError(f"{model_dir} is not an exported LDM folder ({MODEL_INFO} missing; run pretrain)")
    info = read_json(model_dir / MODEL_INFO, "LDM info")
    check_format_version(info, model_dir / MODEL_INFO)
    return {"unet": load_unet(model_dir / LDM_UNET), "scheduler": load_scheduler(model_dir / LDM_SCHEDULER),
            "vae": load_vae(model_dir / LDM_VAE), "info": info, "dir": model_dir}
