"""Model cards (README.md) of exported model folders: what the model is, what data it saw, how it was
trained, its key measurements and how to load it in two lines. Pure text builders from the records the
stages already write (histodiffusion.json, metrics.json, config.json); and the base's card (`base_card`).
"""
from __future__ import annotations

from pathlib import Path

from ..data.leakage import SOURCES_CSV
from ..runtime.artifacts import LDM_UNET, LDM_VAE, MODEL_INFO
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json
from .autoencoder import downsample_factor

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
    return downsample_factor(vae_config.get("block_out_channels") or [0])


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
    trunk = (f"trunk: the encoder of the pretrained UNet {info.get('trunk_from')}, frozen, with a trained head"
             if cfg.get("trunk") else f"width {cfg.get('width')}, depth {cfg.get('depth')}")
    lines = [
        "# Noise-aware latent classifier p(y | z_t, t) (histodiffusion)", "",
        f"Classifies noisy latents z_t at timestep t into {cfg.get('class_names') or info.get('classes')} "
        f"({trunk}, GroupNorm only: one sample's gradient does not "
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


def start_note(sampling: dict) -> str:
    """How a pipeline card's samples started: from noise (empty), or from real tiles at a strength, with the
    arguments that make the same images (samples.csv names each sample's tile and its turn)."""
    strength = float(sampling.get("strength") or 1.0)
    if strength >= 1:
        return ""
    finish = [f"`{k}=True`" for k in ("detail", "color_match") if sampling.get(k) == "tile"]
    return (f" The samples started from real tiles at strength {strength:g} (samples.csv: tile `init_id` turned by "
            f"`k = init_dihedral`): pass `strength={strength:g}`, the tiles as `image=`, each turned "
            f"(`histodiffusion.core.transforms.dihedral(tile, k, dims=(0, 1))`), and for the very same bits their "
            f"cached latents as `init_latents=` (`dihedral(z, k)`; else the pipeline encodes the turned tiles)"
            + (f" and {' and '.join(finish)} (the samples were finished with their tiles)" if finish else "") + ".")


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
        "`histodiffusion.diffusers_pipeline.sample_seed(seed, i)`). The same seeds give the same images."
        + start_note(s), "",
        "## Load it", "", "```python",
        "from histodiffusion import HistoDiffusionPipeline   # diffusers' DiffusionPipeline works too once imported",
        f"pipe = HistoDiffusionPipeline.from_pretrained('{name}'); tiles = pipe(class_labels={classes[:1] * 4}).images",
        "```", "",
        "`vae/`, `unet/` and `scheduler/` load with plain diffusers (`AutoencoderKL`, `UNet2DModel`, "
        f"`{record.get('scheduler_class', 'DDIMScheduler')}`); `latent_classifier/` needs histodiffusion.", "",
        "## Citation", "", CITATION, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Autoencoders (train-autoencoder, finetune-decoder) and image classifiers (evaluate, judge)
# --------------------------------------------------------------------------------------------
LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "CITATION.md", "SOURCES.md")


def dataset_line(data: str | Path) -> str:
    """What a prepared dataset is (name, tiles, classes, source) and its licence where known: the meta's
    `licence`, else the first 'Source' paragraph of a licence/citation file next to the source images."""
    d = Path(data)
    meta = _json(d / "meta.json")
    if not meta:
        return f"`{d}` (no meta.json: not described)"
    classes = meta.get("classes") or []
    count = meta.get("count") or sum(sum(c.values()) if isinstance(c, dict) else c
                                     for c in (meta.get("counts") or {}).values()) or "?"
    text = (f"`{meta.get('name') or d.name}` ({d}): {count} tiles of {meta.get('tile_size')} px"
            + (f", classes {', '.join(classes)}" if classes else ", unlabeled"))
    src = meta.get("sources") or {}  # labeled: {"root": ...}; unlabeled: [{"path": ...}] per source image
    roots = list(dict.fromkeys(Path(x["path"]).parent for x in src if isinstance(x, dict) and x.get("path"))) \
        if isinstance(src, list) else [Path(src.get("root") or d)]
    roots = roots or [d]
    root = roots[0] if len(roots) == 1 else f"{len(roots)} folders, e.g. {roots[0]}"
    licence = meta.get("licence")
    if not licence:
        for folder in (roots[0], roots[0].parent):
            found = [folder / n for n in LICENCE_FILES if (folder / n).is_file()]
            if found:
                paras = [p.strip() for p in found[0].read_text(errors="replace").split("\n\n")]
                source = next((p for p in paras if p.startswith("Source")), "")
                licence = " ".join(source.split()) + f" (see {found[0]})" if source else f"see {found[0]}"
                break
    return text + f"; sources {root}. Licence: {licence or 'not recorded (that of the source images)'}."


def _load_and_cite(code: list[str], note: str = "") -> list[str]:
    return ["## Load it", "", "```python", *code, "```", ""] + ([note, ""] if note else []) + \
        ["## Citation", "", CITATION, ""]


def _figures(values: dict, nd: int = 4) -> str:
    return ", ".join(f"{k} {v:.{nd}f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()) or "none"


def autoencoder_card(folder: Path, name: str, metrics: dict | None = None) -> str:
    """README.md of an exported autoencoder folder (save_vae's: diffusers AutoencoderKL + histodiffusion.json):
    train-autoencoder's, or finetune-decoder's (`metrics`: its metrics.json, before / after)."""
    info = _json(folder / MODEL_INFO)
    cfg = _json(folder / "config.json")
    what = (f"a KL autoencoder (diffusers `AutoencoderKL`, f={info.get('downsample')}, "
            f"{info.get('latent_channels')} latent channels, {info.get('sample_size')} px tiles, widths "
            f"{cfg.get('block_out_channels')}); latents are scaled by {info.get('scaling_factor')} "
            "(in its config: `vae.config.scaling_factor`)")
    if info.get("finetuned") == "decoder":
        m = metrics or {}
        before, after = m.get("before") or {}, m.get("after") or {}
        lines = [
            "# Fine-tuned decoder (histodiffusion)", "",
            f"The decoder of {what}, fine-tuned so that decoded tiles keep their class: reconstruction L1 plus "
            f"{info.get('aux_weight')} x the cross-entropy of an auxiliary image classifier on the reconstructions. "
            f"The encoder, and so the latent space, is that of {info.get('base_vae')} (weights "
            f"{str(info.get('base_vae_hash'))[:12]}) unchanged.", "",
            "## Data", "",
            f"Labeled tiles of subset `{info.get('subset')}` of {dataset_line(info.get('data') or '')}"
            + (f"; also, reconstruction only (labels unused), {m.get('n_unlabeled', '?')} tiles of subset "
               f"`{info['unlabeled_subset']}`" if info.get("unlabeled_subset") else ""), "",
            "## Training and measurements", "",
            f"- {m.get('steps', '?')} steps on {m.get('n_train', '?')} tiles; classes {info.get('classes')}.",
            f"- Before: {_figures(before)}; after: {_figures(after)} (recon_l1: mean absolute error in [-1, 1]; "
            "aux_accuracy_on_recon: the auxiliary classifier's accuracy on reconstructions).", ""]
    else:
        hm = info.get("holdout_metrics") or {}
        data = info.get("trained_on") or []
        lines = [
            "# Autoencoder (histodiffusion)", "",
            f"{what[0].upper()}{what[1:]}. Trained **without labels**; the latent diffusion model and the latent "
            "classifier work in its latent space.", "",
            "## Data", "",
            *([f"- {dataset_line(d)}" for d in data] or ["not recorded"]), "",
            "## Training and measurements", "",
            f"- {info.get('steps', '?')} steps (L1 + KL, with the stage's adversarial / LPIPS settings in its "
            "config.json)" + (f", continued from `{info['init_from']}`" if info.get("init_from") else "")
            + ("; only the decoder was trained: the encoder and the scaling factor are those of the starting "
               "autoencoder" if info.get("train_part") == "decoder" else "") + ".",
            f"- Held-out reconstructions: {_figures(hm, 4) if hm else 'no held-out tiles'} (PSNR in dB).", ""]
    return "\n".join(lines + _load_and_cite([
        "from diffusers import AutoencoderKL",
        f"vae = AutoencoderKL.from_pretrained('{name}'); z = vae.encode(x).latent_dist.mode() * "
        "vae.config.scaling_factor"], "`x`: images in [-1, 1], shape [N, 3, H, W]; `vae.decode(z / "
        "vae.config.scaling_factor).sample` decodes."))


def classifier_card(folder: Path, name: str, scores: dict | None = None) -> str:
    """README.md of a saved image classifier (classifier.json + model.safetensors): a downstream classifier of
    `evaluate` (`scores`: its scores.json) or the independent judge (role in classifier.json)."""
    info = _json(folder / "classifier.json")
    classes = info.get("classes") or []
    net = (f"a `{info.get('name')}` image classifier of {info.get('image_size')} px tiles into {', '.join(classes)}"
           + (f" (initialised from {info['backbone_weights']})" if info.get("backbone_weights") else
              " (trained from scratch)"))
    if info.get("arm"):
        syn = info.get("n_synthetic") or {}
        test = (scores or {}).get("scores", {})
        val = (scores or {}).get("validation") or {}
        lines = [
            f"# Downstream classifier `{info['arm']}`, seed {info.get('seed')} (histodiffusion evaluate)", "",
            f"{net[0].upper()}{net[1:]}, one of the efficacy experiment's classifiers: every arm has the same "
            "backbone and budget; only the training set differs.", "",
            "## Data", "",
            f"- Real: {info.get('n_real')} tiles of subset `{info.get('subset')}` of {dataset_line(info.get('data') or '')}",
            f"- Synthetic (arm kind `{info.get('kind')}`, ratio {info.get('ratio')}): "
            + (", ".join(f"{c} {n}" for c, n in syn.items()) if sum(syn.values()) else "none") + ".", "",
            "## Training and measurements", "",
            f"- {info.get('steps')} steps of batch {info.get('batch_size')}, lr {info.get('lr')}, training seed "
            f"{info.get('train_seed')}; weights: {info.get('checkpoint')}"
            + (f" (validation accuracy {val['best']['accuracy']:.3f} on {val.get('n')} tiles)" if val.get("best")
               else "") + ".",
            *[f"- {ts}: accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}" for ts, s in test.items()], ""]
    else:
        lines = [
            "# Independent judge of class fidelity (histodiffusion judge)", "",
            f"{net[0].upper()}{net[1:]}. It scores synthetic samples (the share assigned to their target class); it "
            "is neither the latent classifier that guided them nor the selection classifier.", "",
            "## Data", "",
            f"{info.get('n_train')} labeled tiles of subset `{info.get('subset')}` (train split only: never a "
            f"validation or test tile; per class {info.get('train_counts')}) of {dataset_line(info.get('data') or '')}",
            "", "## Training and measurements", "",
            f"- {info.get('steps')} steps of batch {info.get('batch_size')}, lr {info.get('lr')}, seed "
            f"{info.get('seed')}, augmented.",
            f"- Accuracy on {info.get('n_val')} `{info.get('val_subset')}` tiles (after training, no checkpoint "
            f"chosen on them): {info.get('val_accuracy')}.", ""]
    return "\n".join(lines + _load_and_cite([
        "from histodiffusion.models.classifier import load_classifier, predict",
        f"model, info = load_classifier('{name}'); probs, features = predict(model, tiles)"],
        "`tiles`: uint8 tensor [N, H, W, 3]; class names in `info['classes']`."))


def _continued(record: dict) -> str:
    """', continued from <folder> (itself N steps: M in total)' for a UNet trained from another model's weights."""
    init = record.get("init_from")
    if not init:
        return ""
    prior = Path(init) / MODEL_INFO
    steps = read_json(prior, "init_from model info").get("steps") if prior.is_file() else None
    total = f" (itself {steps} steps: {steps + int(record.get('steps') or 0)} in total)" if steps else ""
    return f", continued from the EMA weights of `{Path(init).name}`{total}"


def _ae_steps(info: dict) -> str:
    """'N steps', or 'M steps, then the decoder alone N more' for a decoder trained on (train_part decoder)."""
    if info.get("train_part") != "decoder":
        return f"{info.get('steps')} steps"
    return (f"{info.get('init_steps') or '?'} steps, then the decoder alone {info.get('steps')} more (encoder, latents "
            f"and scaling factor unchanged)")


def base_card(record: dict, folder: Path, notes: Path | None) -> str:
    """README.md of a base: what it is, what it saw, how it was trained, how to load it."""
    from .base import CHECKSUMS

    b = record["base"]
    unet = read_json(folder / LDM_UNET / "config.json", "UNet config")
    vae = read_json(folder / LDM_VAE / "config.json", "autoencoder config")
    vae_info = read_json(folder / LDM_VAE / MODEL_INFO, "autoencoder info")
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e6
    mix = ", ".join(f"{n} {w:.2f}" for n, w in zip(record.get("sources", []), record.get("weights", [])))
    lines = [
        f"# {b['name']} (version {b['version']})", "",
        "A latent diffusion base for histopathology, pretrained **without labels** for "
        "histodiffusion (HistoDiffusion, Ye et al., MICCAI 2023): a KL "
        f"autoencoder (f={downsample_factor(vae['block_out_channels'])}, {vae['latent_channels']} latent channels) "
        f"and an unconditional UNet on {record['latent_shape']} latents of {b['tile_size']} px H&E tiles. "
        "`histodiffusion run` adapts it to a small labeled set (latent classifier, decoder fine-tune, "
        "classifier-guided sampling).", "",
        "## Load it", "", "```python",
        "from diffusers import AutoencoderKL, UNet2DModel, DDIMScheduler",
        f"vae = AutoencoderKL.from_pretrained('{b['name']}/vae'); unet = UNet2DModel.from_pretrained('{b['name']}/unet_ema')",
        "```", "",
        "or `histodiffusion run --base PATH` (the shipped one is the default). Latents are `vae.encode(x).latent_dist"
        f".mean * {record['scaling_factor']:.5f}` (the scaling factor, also in `vae/config.json`).", "",
        "## Data (unlabeled)", "",
        "| dataset | tiles (train / held out) | source files | tiling |", "|---|---|---|---|"]
    for d in b["data"]:
        t = {k: sum(v.values()) for k, v in (d.get("tiles") or {}).items()}
        r = d.get("resolution") or {}
        lines.append(f"| {d['name']} | {t.get('unlabeled', 0)} / {t.get('holdout', 0)} | {d['source_files']} "
                     f"| {r.get('source_px') or r.get('patch_size') or '-'} px patches -> {r.get('tile_size')} px "
                     f"(nuclei {r.get('nucleus_px') or '?'} px) |")
    lines += ["", f"Mixture weights: {mix or 'proportional to size'}. Held-out groups were never trained on. "
              f"Every source file's sha256 is in `{SOURCES_CSV}` (the leakage guard refuses a target that shares one).",
              "", "## Training", "",
              f"- Autoencoder: widths {vae['block_out_channels']}, {_ae_steps(vae_info)}; held-out "
              f"{_metric_line(vae_info.get('holdout_metrics'))}.",
              f"- UNet: widths {unet['block_out_channels']}, {record.get('steps')} steps{_continued(record)}, "
              f"{record.get('loss')} loss on {record.get('prediction_type')}, EMA weights.",
              f"- Weights: {b['dtype']} safetensors, {size:.1f} MB; checksums in `{CHECKSUMS}` (verified at load).", ""]
    if notes is not None:
        if not notes.is_file():
            raise HistoError(f"card_notes file not found: {notes}")
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def _metric_line(m: dict | None) -> str:
    if not m:
        return "metrics not recorded"
    return ", ".join(f"{k.upper()} {v:.3f}" for k, v in m.items())
