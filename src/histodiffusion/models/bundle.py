"""Load the models of guided synthesis together and check that they share one latent space.

An exported LDM folder (unet_ema/, scheduler/, vae/, histodiffusion.json; a base has the same layout),
a latent classifier folder, and optionally another autoencoder (the fine-tuned decoder). The classifier,
the UNet and the decoder must agree on the autoencoder whose latents they use, on the scaling factor,
on the noise schedule and on the number of latent channels; any disagreement is one HistoError naming
the two folders. The scaling factor the pipeline decodes with is the autoencoder config's.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..artifacts import LDM_SCHEDULER, LDM_UNET, LDM_VAE, MODEL_INFO
from ..runtime import HistoError, check_format_version, read_json, sha256_dir

SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")  # the noise schedule


def load_components(model: str | Path, classifier: str | Path, vae: str | Path = "") -> dict:
    """{"unet", "vae", "classifier", "info" (the classifier's record), "scheduler_config" (training),
    "scaling_factor", "prediction_type", "T", "unet_id", "classifier_id", "vae_id"}."""
    from .autoencoder import load_vae, measured_scaling_factor
    from .latent_classifier import load_latent_classifier, vae_latent_hash
    from .unet import load_scheduler, load_unet

    model_dir = Path(model)
    if not (model_dir / LDM_UNET).is_dir():
        raise HistoError(f"LDM folder not found or incomplete: {model_dir} (needs {LDM_UNET}/, {LDM_SCHEDULER}/; "
                         f"run pretrain)")
    if not Path(classifier).is_dir():
        raise HistoError(f"latent classifier folder not found: {classifier} (run train-latent-classifier)")
    vae_dir = Path(vae) if vae else model_dir / LDM_VAE
    unet = load_unet(model_dir / LDM_UNET)
    train_sched = load_scheduler(model_dir / LDM_SCHEDULER)
    ae = load_vae(vae_dir)
    clf, cinfo, clf_id = load_latent_classifier(classifier)
    ldm_info = read_json(model_dir / MODEL_INFO, "LDM info") if (model_dir / MODEL_INFO).is_file() else {}
    if ldm_info:
        check_format_version(ldm_info, model_dir / MODEL_INFO)
    # 1. one latent space: the classifier's autoencoder is the decoder's and the LDM's
    latent_hash = vae_latent_hash(vae_dir)
    for what, h in (("autoencoder " + str(vae_dir), latent_hash), ("LDM " + str(model_dir), ldm_info.get("vae_hash"))):
        if h and h != cinfo.get("vae_hash"):
            raise HistoError(f"latent classifier {classifier} was trained on latents of autoencoder "
                             f"{str(cinfo.get('vae_hash'))[:12]}, but {what} uses {h[:12]}: retrain the classifier "
                             f"on a cache encoded with this autoencoder")
    # 2. one scaling factor: the classifier's (its cache's), the LDM's and the autoencoder config's
    sf = float(cinfo["scaling_factor"])
    if ldm_info.get("scaling_factor") and not math.isclose(float(ldm_info["scaling_factor"]), sf, rel_tol=1e-6):
        raise HistoError(f"scaling factor of the LDM ({ldm_info['scaling_factor']}) differs from the latent "
                         f"classifier's ({sf})")
    cfg_sf = float(getattr(ae.config, "scaling_factor", 0.0) or 0.0)
    if measured_scaling_factor(vae_dir) is not None and not math.isclose(cfg_sf, sf, rel_tol=1e-6):
        raise HistoError(f"autoencoder {vae_dir} has scaling_factor {cfg_sf} in its config, the latent "
                         f"classifier {classifier} was trained with {sf}")
    if cfg_sf != sf:  # a foreign autoencoder encoded with an explicit factor: the pipeline decodes with it
        ae.register_to_config(scaling_factor=sf)
    # 3. one noise schedule and one number of latent channels
    cs = cinfo.get("scheduler") or {}
    diff = [k for k in SCHEDULE_KEYS if k in cs and cs[k] != train_sched.config.get(k)]
    if diff:
        raise HistoError(f"latent classifier {classifier} was trained with another noise schedule "
                         f"({', '.join(f'{k}={cs[k]}' for k in diff)}) than the LDM {model_dir}")
    if clf.config.in_channels != unet.config.in_channels:
        raise HistoError(f"latent classifier expects {clf.config.in_channels} latent channels, the UNet "
                         f"{unet.config.in_channels}")
    return {"unet": unet, "vae": ae, "classifier": clf, "info": cinfo, "ldm_info": ldm_info,
            "scheduler_config": dict(train_sched.config), "scaling_factor": sf,
            "prediction_type": train_sched.config.get("prediction_type", "epsilon"),
            "T": int(train_sched.config.num_train_timesteps), "unet_id": sha256_dir(model_dir / LDM_UNET),
            "classifier_id": clf_id, "vae_id": sha256_dir(vae_dir), "model_dir": str(model_dir),
            "classifier_dir": str(classifier), "vae_dir": str(vae_dir)}
