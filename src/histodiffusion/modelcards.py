"""Model cards (README.md) of exported model folders: what the model is, what data it saw, how it was
trained, its key measurements and how to load it in two lines. Pure text builders from the records the
stages already write (histodiffusion.json, metrics.json, config.json); the base's card is basemodel.py's.
"""
from __future__ import annotations

from pathlib import Path

from .artifacts import LDM_UNET, LDM_VAE, MODEL_INFO
from .runtime import read_json

CARD = "README.md"
CITATION = ("Ye, J. et al. *Synthetic Augmentation with Large-scale Unconditional Pre-training.* MICCAI 2023 "
            "(HistoDiffusion).")


def _json(path: Path) -> dict:
    return read_json(path, "model record") if path.is_file() else {}


def _sources(info: dict) -> str:
    names, weights = info.get("sources") or [], list(info.get("weights") or [])
    if not names:
        return "not recorded"
    return ", ".join(f"{n} ({weights[i]:.2f})" if i < len(weights) else str(n) for i, n in enumerate(names))


def _factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config.get("block_out_channels") or [0]) - 1)


def ldm_card(folder: Path, name: str) -> str:
    """README.md of pretrain's exported model folder (unet_ema/, scheduler/, vae/, histodiffusion.json)."""
    info = _json(folder / MODEL_INFO)
    unet = _json(folder / LDM_UNET / "config.json")
    vae = _json(folder / LDM_VAE / "config.json")
    lines = [
        "# Latent diffusion model (unconditional, histodiffusion)", "",
        f"An unconditional UNet (diffusers `UNet2DModel`, widths {unet.get('block_out_channels')}, EMA weights) "
        f"on {info.get('latent_shape')} latents of a KL autoencoder (f={_factor(vae)}), "
        "trained **without labels** on unlabeled histopathology tiles. Class-conditional tiles come from it by "
        "classifier guidance with a latent classifier (`histodiffusion sample`).", "",
        "## Data", "",
        f"Latent caches (mixture weights): {_sources(info)}. Tiles of held-out groups were never trained on. "
        "Licences are those of the source images (see the data set's own records, e.g. "
        "`default_data/SOURCES.md` for the built-in data).", "",
        "## Training", "",
        f"- {info.get('steps')} steps, {info.get('loss')} loss on {info.get('prediction_type')} prediction"
        + (f", continued from {info['init_from']}" if info.get("init_from") else "") + ".",
        f"- Latent scaling factor {info.get('scaling_factor')} (autoencoder {str(info.get('vae_hash'))[:12]}).", "",
        "## Load it", "", "```python",
        "from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel",
        f"unet = UNet2DModel.from_pretrained('{name}/unet_ema'); vae = AutoencoderKL.from_pretrained('{name}/vae')",
        "```", "", "`DDPMScheduler.from_pretrained(path + '/scheduler')` is its training noise schedule.", "",
        "## Citation", "", CITATION, ""]
    return "\n".join(lines)


def latent_classifier_card(folder: Path, name: str, metrics: dict) -> str:
    """README.md of train-latent-classifier's exported model folder."""
    info = _json(folder / MODEL_INFO)
    cfg = _json(folder / "config.json")
    by_t = metrics.get("val_accuracy_by_t") or {}
    acc = ", ".join(f"t in {k}: {v:.3f}" for k, v in by_t.items()) or "no validation split"
    lines = [
        "# Noise-aware latent classifier p(y | z_t, t) (histodiffusion)", "",
        f"Classifies noisy latents z_t at timestep t into {cfg.get('class_names') or info.get('classes')} "
        f"(width {cfg.get('width')}, depth {cfg.get('depth')}, GroupNorm only: one sample's gradient does not "
        "depend on the batch). Its gradient steers the unconditional latent diffusion model towards a class "
        "(classifier guidance).", "",
        "## Data", "",
        f"Latents of subset `{info.get('subset')}` of the labeled cache {info.get('cache')} "
        f"({metrics.get('n_train', '?')} tiles), noised with the LDM's schedule "
        f"(T={(info.get('scheduler') or {}).get('num_train_timesteps')}, t < {info.get('max_timestep')}). "
        f"Autoencoder {str(info.get('vae_hash'))[:12]}, scaling factor {info.get('scaling_factor')}. "
        "Licences are those of the labeled data set.", "",
        "## Training and measurements", "",
        f"- {metrics.get('steps')} steps, class-balanced batches; chance accuracy {metrics.get('chance', 0):.3f}.",
        f"- Validation accuracy ({metrics.get('val_subset', '-')}, {metrics.get('n_val', 0)} tiles) by timestep: "
        f"{acc}.",
        "", "## Load it", "", "```python",
        "from histodiffusion.models.latent_classifier import LatentClassifier",
        f"clf = LatentClassifier.from_pretrained('{name}'); logits = clf(z_t, t)",
        "```", "", "## Citation", "", CITATION, ""]
    return "\n".join(lines)


def pipeline_card(folder: Path, name: str, record: dict) -> str:
    """README.md of a HistoDiffusionPipeline folder (written by the sample stage)."""
    clf = _json(folder / "latent_classifier" / "config.json")
    unet = _json(folder / "unet" / "config.json")
    vae = _json(folder / "vae" / "config.json")
    s = record.get("sampling") or {}
    classes = clf.get("class_names") or []
    lines = [
        "# HistoDiffusionPipeline (histodiffusion)", "",
        "Class-conditional histopathology tiles by classifier guidance in latent space: an unconditional "
        f"latent diffusion UNet (widths {unet.get('block_out_channels')}, {unet.get('in_channels')}x"
        f"{unet.get('sample_size')}x{unet.get('sample_size')} latents), steered by a noise-aware latent classifier "
        f"over {classes}, decoded by a KL autoencoder ({vae.get('sample_size')} px tiles, scaling factor "
        f"{vae.get('scaling_factor')}).", "",
        "## Where the models come from", "",
        f"- LDM: {record.get('model')} (UNet {str(record.get('unet_id'))[:12]}); see its README.md for the "
        "unlabeled data it saw.",
        f"- Latent classifier: {record.get('classifier')} ({str(record.get('classifier_id'))[:12]}), trained on "
        f"subset `{record.get('classifier_subset')}` of {record.get('classifier_cache')}.",
        f"- Autoencoder / decoder: {record.get('vae')} ({str(record.get('vae_id'))[:12]}).",
        "- Licences are those of the data sets named in those folders' records.", "",
        "## How the sample stage used it", "",
        f"{s.get('scheduler')} with {s.get('steps')} steps, guidance scale {s.get('scale')}, window "
        f"{s.get('guidance_window')}, eta {s.get('eta')}, seed {s.get('seed')} (sample i: "
        "`histodiffusion.diffusers_pipeline.sample_seed(seed, i)`). The same seeds give the same images.", "",
        "## Load it", "", "```python",
        "from histodiffusion import HistoDiffusionPipeline   # diffusers' DiffusionPipeline works too once imported",
        f"pipe = HistoDiffusionPipeline.from_pretrained('{name}'); tiles = pipe(class_labels={classes[:1] * 4}).images",
        "```", "",
        "`vae/`, `unet/` and `scheduler/` load with plain diffusers (`AutoencoderKL`, `UNet2DModel`, "
        f"`{record.get('scheduler_class', 'DDIMScheduler')}`); `latent_classifier/` needs histodiffusion.", "",
        "## Citation", "", CITATION, ""]
    return "\n".join(lines)
