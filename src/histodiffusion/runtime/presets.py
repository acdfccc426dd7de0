"""Named presets: config-field overrides per stage (keys are CLI subcommands, values are fields of that
stage's config class in config.py). A preset only changes defaults; flags still override it.

- "quick": the config defaults, sized so `histodiffusion run` on the built-in default data (~860
  unlabeled 64 px tiles) finishes within 15 minutes on 2 CPU cores (measured: see BENCHMARKS.md):
  autoencoder (32, 64, 128), f=4, 4 latent channels, trained on random 32 px crops (400 steps of
  16); UNet (64, 128, 128) on 16x16x4 latents (300 steps of 32); the only overrides are the
  narrower small CNN (`small_cnn_w16`, ~3x faster than `small_cnn` on this CPU) as the selection
  feature extractor, the evaluation classifier and the latent classifier's image-space baseline, and an
  evaluation budget sized for the default run's 95 labeled tiles (120 steps of 64, about 80 epochs,
  validated every 20: real-only validation accuracy plateaus from about step 60; at the former 40 steps
  it was still rising, see BENCHMARKS.md) instead of evaluate's default 500, sized for the benchmark.
- "paper": the scale of HistoDiffusion (Ye et al., MICCAI 2023; LDM-style KL-f4 first stage), for
  GPU users: 256 px tiles -> 64x64x3 latents; autoencoder widths (128, 256, 512) with 2 ResNet layers
  per block, KL weight 1e-6, PatchGAN from step 50k (add --lpips-weights with a local VGG16 file
  and --lpips-weight 1.0 to match the LDM loss); UNet base width 192 with multipliers (1, 2, 3, 4)
  and 2 ResNet layers per block, linear betas 0.0015..0.0155 over T=1000, L1 loss on eps.
  Differences from the reference: attention only in the lowest-resolution UNet block (the reference
  attends at 32, 16 and 8), and the reference trains far longer on several GPUs.
"""
from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    "quick": {
        "select": {"backbone": "small_cnn_w16"},
        "train-latent-classifier": {"image_backbone": "small_cnn_w16"},
        "evaluate": {"backbone": "small_cnn_w16", "steps": 120, "val_every": 20},
    },
    "paper": {
        "prepare": {"tile_size": 256},
        "train-autoencoder": {
            "block_out_channels": [128, 256, 512], "layers_per_block": 2, "latent_channels": 3,
            "crop": 0, "steps": 100_000, "batch_size": 12, "lr": 4.5e-6 * 12, "kl_weight": 1e-6,
            "adv_weight": 0.5, "adv_start": 50_001, "holdout": 256, "eval_every": 5_000,
            "checkpoint_every": 5_000, "mixed_precision": "bf16", "num_workers": 8,
        },
        "encode": {"batch_size": 64, "shard_size": 4096},
        "pretrain": {
            "block_out_channels": [192, 384, 576, 768], "layers_per_block": 2, "attention": True,
            "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0015, "beta_end": 0.0155,
            "prediction_type": "epsilon", "loss": "l1", "steps": 200_000, "batch_size": 48, "lr": 1e-4,
            "warmup": 1_000, "ema_decay": 0.9999, "sample_every": 10_000, "checkpoint_every": 5_000,
            "mixed_precision": "bf16", "num_workers": 8,
        },
    },
}


def preset_overrides(preset: str, stage: str) -> dict:
    """The field overrides of `preset` for `stage` (empty when the preset does not touch it)."""
    from .errors import HistoError

    if preset not in PRESETS:
        raise HistoError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[preset].get(stage, {}))
