"""Load the models of guided synthesis together and check that they share one latent space.

An exported LDM folder (unet_ema/, scheduler/, vae/, histodiffusion.json; a base has the same layout),
a latent classifier folder, and optionally another autoencoder (the fine-tuned decoder). The classifier,
the UNet and the decoder must agree on the latent space (latent_space.py: the autoencoder whose latents
they use, the scaling factor, the noise schedule) and on the number of latent channels; any
disagreement is one HistoError naming the two folders. The pipeline decodes with the autoencoder
config's factor, which latent_space.decoder_factor sets (a foreign decoder's default is never used).
"""
from __future__ import annotations

from pathlib import Path

from ..runtime.artifacts import LDM_SCHEDULER, LDM_UNET, LDM_VAE, MODEL_INFO
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json, sha256_dir
from ..runtime.latent_space import check_compatible, decoder_factor, latent_hash, of_model
from ..runtime.rundirs import check_format_version


def load_components(model: str | Path, classifier: str | Path, vae: str | Path = "") -> dict:
    """{"unet", "vae", "classifier", "info" (the classifier's record), "scheduler_config" (training),
    "scaling_factor", "prediction_type", "T", "unet_id", "classifier_id", "vae_id"}."""
    from .autoencoder import load_vae
    from .latent_classifier import load_latent_classifier
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
    # 1. one latent space (autoencoder, scaling factor, noise schedule): the classifier's, the LDM's and
    #    the decoder's; the decoder decodes with the space's factor (its measured one must agree)
    space = of_model(classifier, "latent classifier")
    ldm_space = of_model(model_dir, "LDM") if ldm_info else space.with_schedule(dict(train_sched.config))
    what = f"latent classifier {classifier}"
    check_compatible(space, ldm_space, what, f"LDM {model_dir}")
    if latent_hash(vae_dir) != space.vae_hash:
        raise HistoError(f"{what} holds latents of autoencoder {space.vae_hash[:12]}, autoencoder {vae_dir} of "
                         f"{latent_hash(vae_dir)[:12]}: retrain the classifier on a cache encoded with this autoencoder")
    sf = decoder_factor(vae_dir, ae, space)
    # 2. one number of latent channels
    if clf.config.in_channels != unet.config.in_channels:
        raise HistoError(f"latent classifier expects {clf.config.in_channels} latent channels, the UNet "
                         f"{unet.config.in_channels}")
    return {"unet": unet, "vae": ae, "classifier": clf, "info": cinfo, "ldm_info": ldm_info,
            "scheduler_config": dict(train_sched.config), "scaling_factor": sf,
            "prediction_type": train_sched.config.get("prediction_type", "epsilon"),
            "T": int(train_sched.config.num_train_timesteps), "unet_id": sha256_dir(model_dir / LDM_UNET),
            "classifier_id": clf_id, "vae_id": sha256_dir(vae_dir), "model_dir": str(model_dir),
            "classifier_dir": str(classifier), "vae_dir": str(vae_dir)}
