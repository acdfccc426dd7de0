"""Configuration: one frozen dataclass per stage, every field with a default and a one-line help.

The help text (`F(default, "help")`) is the field's one-line comment and also its `--flag` help in
the CLI, which builds its flags from these classes. Configs round-trip through JSON (never pickle);
a config file can be JSON or TOML and may only name known fields of the right type.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .configrules import START_STRENGTH, validate_config
from .configtypes import F, coerce
from .errors import HistoError


# --------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrepareConfig:
    out: str = F("data/default", "output dataset directory")
    name: str = F("", "dataset name (default: the output directory's name)")
    kind: str = F("auto", "labeled | unlabeled | auto (labeled when labels are given)")
    sources: tuple[str, ...] = F((), "slides / large images / folders of them to tile (unlabeled sources)")
    labels_csv: str = F("", "CSV with path,label[,group_id] (paths relative to the CSV)")
    class_folders: str = F("", "root folder with one sub-folder of tiles per class (NCT-CRC-HE layout)")
    classes: tuple[str, ...] = F((), "allowed classes of labels_csv (a label outside them is an error; default: any)")
    unlabeled_tiles: tuple[str, ...] = F((), "labeled target only: folders/files of the same cohort's UNLABELED tiles (whole tiles, treated like the labeled ones); they join the train split without a label, never a validation/test split or a few-shot subset; a file identical to a labeled one is skipped (counted)")
    tile_size: int = F(64, "working resolution: every tile is stored at tile_size x tile_size")
    patch_size: int = F(0, "tile edge in source pixels before resizing (0: tile_size * downscale)")
    stride: int = F(0, "tiling stride in source pixels (0: patch_size, no overlap)")
    downscale: float = F(1.0, "downscale factor from the source's level 0 (ignored when target_mpp > 0)")
    target_mpp: float = F(0.0, "target microns per pixel when the file states its resolution (0: off)")
    min_tissue: float = F(0.5, "keep a tile when at least this fraction of it is tissue")
    max_gray_mean: float = F(220.0, "background filter: tissue pixels have grey value below this")
    min_saturation: float = F(0.07, "tissue pixels have HSV saturation above this (0..1)")
    tissue_method: str = F("fixed", "fixed (the two thresholds) | otsu (raise the saturation threshold to Otsu's on slides with background)")
    max_ink: float = F(0.05, "drop a tile when more than this fraction of it is green pen ink (1: off)")
    image_mode: str = F("convert", "grayscale/RGBA/16-bit images: convert (to 8-bit RGB) or refuse")
    val_frac: float = F(0.15, "fraction of groups in the validation split (stratified by class)")
    test_frac: float = F(0.15, "fraction of groups in the test split (stratified by class)")
    fewshot_fracs: tuple[float, ...] = F((0.05, 0.1, 0.25), "few-shot subsets of train: fractions of groups")
    fewshot_k: tuple[int, ...] = F((), "few-shot subsets of train: k groups per class")
    fewshot_draws: int = F(1, "draws of every few-shot subset from other groups: >1 adds <name>_d1.. (a second level of repetition for benchmarks)")
    seed: int = F(0, "seed for splits and few-shot subsets")
    shard_size: int = F(1024, "tiles per pixel shard")
    strict: bool = F(False, "stop at the first unreadable image instead of skipping and counting")
    exclude: tuple[str, ...] = F((), "prepared datasets that must share no image with this one (leakage guard)", input=True)
    holdout_frac: float = F(0.0, "unlabeled: fraction of groups held out for measurement only (split 'holdout', never trained on)")
    group_px: int = F(0, "unlabeled: group tiles by square regions of this many source pixels (0: one group per image)")
    scale_sample: int = F(256, "tiles sampled (by content hash) to measure the scale: the width of nuclei in px (0: off)")
    scale_tolerance: float = F(1.5, "warn when nuclei of this dataset and of an --exclude dataset differ in width by more than this ratio (0: off)")


@dataclass(frozen=True)
class AutoencoderConfig:
    data: tuple[str, ...] = F(("data/unlabeled",), "prepared unlabeled dataset directories", input=True)
    out: str = F("runs/ae", "run directory")
    block_out_channels: tuple[int, ...] = F((32, 64, 128), "encoder/decoder widths; f = 2**(len-1)")
    layers_per_block: int = F(1, "ResNet layers per block")
    latent_channels: int = F(4, "channels of the latent")
    steps: int = F(400, "optimisation steps")
    batch_size: int = F(16, "batch size per process")
    crop: int = F(32, "train on random crops of this size (0: whole tiles); evaluation uses whole tiles")
    flips: bool = F(True, "random dihedral transform (rotation/flip) of every training tile")
    lr: float = F(4e-4, "AdamW learning rate")
    kl_weight: float = F(1e-6, "weight of the KL term")
    adv_weight: float = F(0.0, "weight of the PatchGAN adversarial loss (0: off)")
    adv_start: int = F(300, "step at which the adversarial loss starts")
    lpips_weights: str = F("", "local path to LPIPS/VGG weights (optional; nothing is downloaded)")
    lpips_weight: float = F(0.0, "weight of the LPIPS loss (needs lpips_weights)")
    init_from: str = F("", "start from this autoencoder (a save_pretrained folder, or a base folder: its vae/) "
                       "instead of fresh weights; the architecture flags must match it", input=True)
    train_part: str = F("all", "all | decoder: train only the decoder (with --init-from); the encoder, so every "
                        "latent and a UNet trained on them, and the scaling factor stay exactly as they were")
    holdout: int = F(64, "held-out tiles for PSNR/SSIM")
    eval_every: int = F(200, "evaluate and write a reconstruction grid every N steps")
    checkpoint_every: int = F(200, "save resumable state every N steps")
    keep_checkpoints: int = F(2, "resumable checkpoints to keep")
    mixed_precision: str = F("no", "no | bf16 | fp16 (fp16 needs a GPU)")
    num_workers: int = F(0, "data loader workers")
    seed: int = F(0, "random seed")


@dataclass(frozen=True)
class ExportBaseConfig:
    model: str = F("runs/ldm/model", "exported LDM folder of pretrain (unet_ema/, scheduler/, vae/)", input=True)
    out: str = F("base/histodiffusion-base-64", "base folder to write (replaced atomically)")
    name: str = F("histodiffusion-base-64", "name of the base")
    version: str = F("1", "version of the base")
    dtype: str = F("fp16", "fp16 | fp32: dtype of the stored weights (they load as float32)")
    data: tuple[str, ...] = F((), "prepared unlabeled datasets it was trained on (counts and source hashes for the card and the leakage guard)", input=True)
    card_notes: str = F("", "Markdown file appended to the model card (measurements, licences, citations)")
    vae: str = F("", "replace the model's autoencoder by this one (train-autoencoder --train-part decoder): its "
                 "encoder must be identical, so the UNet's latents stay valid", input=True)


@dataclass(frozen=True)
class EncodeConfig:
    data: str = F("data/unlabeled", "prepared dataset directory", input=True)
    vae: str = F("runs/ae/model/vae", "autoencoder folder (save_pretrained)", input=True)
    out: str = F("cache/unlabeled", "latent cache directory")
    batch_size: int = F(64, "encode batch size")
    shard_size: int = F(4096, "latents per shard")
    scaling_factor: float = F(0.0, "latent scaling (0: the one measured by train-autoencoder, stored in the vae)")
    flips: bool = F(False, "also cache the 8 dihedral transforms of each tile (ids <id>~d1..d7)")


@dataclass(frozen=True)
class PretrainConfig:
    cache: tuple[str, ...] = F(("cache/unlabeled",), "latent caches of the unlabeled datasets", input=True)
    weights: tuple[float, ...] = F((), "sampling weight per cache (default: proportional to size)")
    out: str = F("runs/ldm", "run directory")
    block_out_channels: tuple[int, ...] = F((64, 128, 128), "UNet widths")
    layers_per_block: int = F(1, "ResNet layers per UNet block")
    attention: bool = F(True, "attention in the lowest-resolution blocks")
    num_train_timesteps: int = F(1000, "diffusion steps T")
    beta_schedule: str = F("linear", "linear | scaled_linear | squaredcos_cap_v2")
    beta_start: float = F(0.0015, "first beta (paper: 0.0015)")
    beta_end: float = F(0.0155, "last beta (paper: 0.0155)")
    prediction_type: str = F("epsilon", "epsilon | v_prediction")
    loss: str = F("l1", "l1 | l2 (paper: l1)")
    steps: int = F(300, "optimisation steps")
    batch_size: int = F(32, "batch size per process")
    lr: float = F(4e-4, "AdamW peak learning rate")
    weight_decay: float = F(0.0, "AdamW weight decay")
    warmup: int = F(50, "linear warm-up steps")
    grad_clip: float = F(1.0, "max gradient norm (0: off)")
    grad_accum: int = F(1, "gradient accumulation steps")
    ema_decay: float = F(0.999, "EMA decay")
    mixed_precision: str = F("no", "no | bf16 | fp16 (fp16 needs a GPU)")
    sample_every: int = F(200, "write a sample grid every N steps (0: off)")
    checkpoint_every: int = F(200, "save resumable state every N steps")
    keep_checkpoints: int = F(2, "resumable checkpoints to keep")
    init_from: str = F("", "start from this exported model folder (fine-tuning), else from scratch", input=True)
    subset: str = F("all", "subset of every cache to train on: all, a split, or a few-shot subset")
    num_workers: int = F(0, "data loader workers")
    seed: int = F(0, "random seed")


@dataclass(frozen=True)
class LatentClassifierConfig:
    cache: str = F("cache/target", "latent cache of the labeled target dataset", input=True)
    subset: str = F("train", "split or few-shot subset to train on (e.g. train, frac0.05)")
    val_subset: str = F("val", "split for validation")
    scheduler: str = F("runs/ldm/model/scheduler", "noise scheduler folder (same as the UNet's)", input=True)
    out: str = F("runs/adapt/latent_classifier", "run directory")
    width: int = F(64, "base channel width")
    depth: int = F(2, "down-sampling stages")
    trunk_unet: str = F("", "UNet folder (e.g. <ldm or base>/unet_ema) whose encoder (timestep embedding, down and mid blocks) is the trunk, with its pretrained weights frozen; only a head on its block features trains (width/depth unused). Empty: a small trunk trained from scratch", input=True)
    steps: int = F(400, "optimisation steps")
    batch_size: int = F(64, "batch size per process")
    lr: float = F(3e-4, "AdamW learning rate")
    weight_decay: float = F(0.05, "AdamW weight decay")
    max_timestep: int = F(0, "train on t in [0, max_timestep) (0: all T)")
    augment: bool = F(False, "random flips/rotations of the latents (approximate: encoders are not equivariant)")
    checkpoint_every: int = F(500, "save resumable state every N steps")
    keep_checkpoints: int = F(2, "resumable checkpoints to keep")
    image_baseline: bool = F(True, "also train an image-space classifier on the same subset with the same budget (steps, batch, lr, weight decay, balanced batches, augment) and report the latent accuracy per timestep bucket as a ratio of its validation accuracy (goal: >= 0.9 in the lowest-noise bucket)")
    image_backbone: str = F("small_cnn", "that image-space classifier: small_cnn[_w<width>] or a timm model name (from scratch)")
    data: str = F("", "prepared dataset of the cache's tiles, for the image baseline (default: the one named in the cache's meta.json)", input=True)
    num_workers: int = F(0, "data loader workers")
    seed: int = F(0, "random seed")


@dataclass(frozen=True)
class FinetuneDecoderConfig:
    data: str = F("data/target", "prepared labeled target dataset", input=True)
    subset: str = F("train", "split or few-shot subset to fine-tune on")
    vae: str = F("runs/ae/model/vae", "autoencoder to start from", input=True)
    out: str = F("runs/adapt/decoder", "run directory")
    aux_weight: float = F(0.1, "weight of the auxiliary image classifier's loss on decoded images")
    aux_steps: int = F(100, "steps to train the auxiliary classifier on the real labeled subset first")
    unlabeled_subset: str = F("", "subset of the same data whose tiles add an L1 reconstruction loss, labels unused (e.g. train: the target's own unlabeled tiles; never val/test); empty: none")
    unlabeled_batch_size: int = F(16, "batch size per process of the unlabeled_subset stream")
    steps: int = F(60, "optimisation steps")
    batch_size: int = F(16, "batch size per process")
    lr: float = F(5e-5, "AdamW learning rate for the decoder")
    checkpoint_every: int = F(200, "save resumable state every N steps")
    keep_checkpoints: int = F(2, "resumable checkpoints to keep")
    seed: int = F(0, "random seed")


@dataclass(frozen=True)
class SampleConfig:
    model: str = F("runs/ldm/model", "exported LDM folder (unet_ema/, scheduler/, vae/)", input=True)
    classifier: str = F("runs/adapt/latent_classifier/model", "latent classifier folder", input=True)
    vae: str = F("", "decoder to use (default: model/vae; e.g. the fine-tuned decoder)", input=True)
    out: str = F("samples/run", "output directory")
    classes: tuple[str, ...] = F((), "classes to synthesise (default: all of the classifier's)")
    n_per_class: int = F(0, "images per class (0: use ratio)")
    ratio: float = F(1.0, "synthetic images as a fraction of the real labeled subset, per class")
    real_counts: str = F("", "latent cache or dataset whose subset counts define the ratio (default: the classifier's cache)", input=True)
    real_subset: str = F("train", "subset whose per-class counts the ratio refers to")
    scale: float = F(10.0, "classifier guidance scale s (reference: 10)")
    guidance_window: tuple[int, int] = F((0, 0), "guide only for t in [lo, hi] ((0,0): every step)")
    scheduler: str = F("dpmsolver++", "ddim | dpmsolver++")
    steps: int = F(20, "sampling steps")
    eta: float = F(0.0, "DDIM eta (1.0 is the reference's setting)")
    batch_size: int = F(64, "samples per batch (does not change the images)")
    seed: int = F(0, "run seed; sample i uses a generator seeded from (seed, i)")
    grid: bool = F(True, "write a sample grid per class")
    strength: float = F(1.0, "1: every sample starts from pure noise (the paper); below 1: from a real train tile of its class (see init_labels; its latent, one of its 8 flips/rotations), noised to this share of the schedule and denoised with guidance (SDEdit variations; samples.csv names the tile)")
    init_cache: str = F("", "with strength < 1: latent cache of the real tiles to start from (default: the latent classifier's cache)", input=True)
    init_subset: str = F("", "with strength < 1: the subset of init_cache (default: the latent classifier's subset, or with init_labels other than tiles the train split); train-split tiles only")
    init_labels: str = F("tiles", "with strength < 1, the class an init tile may start: 'tiles' (its own label), 'classifier' (the latent classifier's prediction on its clean latent; labels are not read, so the target's unlabeled train tiles can be the pool) or 'ensemble' (the mean of that prediction and init_image_classifier's on the tile's pixels) or 'image' (init_image_classifier's alone, e.g. the downstream classifiers of an earlier round: self-training)")
    init_top_share: float = F(1.0, "with init_labels=classifier, ensemble or image: start only from this most confident share of each class's pool (ranked by the predicted class's probability; 1: every tile read as the class)")
    init_image_classifier: tuple[str, ...] = F((), "with init_labels=ensemble or image: image classifier folders (classifier.json + model.safetensors, e.g. train-latent-classifier's image_baseline/ or evaluate's classifiers/selected@4_0) trained on the same labeled subset; several: their probabilities are averaged", input=True)
    init_data: str = F("", "with init_labels=ensemble or image, or detail/color_match=tile: the prepared dataset of the init tiles' pixels (default: the dataset the init cache was encoded from)", input=True)
    detail: str = F("none", "with strength < 1: none | tile: each decoded sample gets back what the autoencoder loses on its starting tile: sample + (tile - its decoded starting latent), tile and latent turned as the sample started, so the sample keeps the tile's nuclei and colours and differs from it by the denoising step's change (BENCHMARKS.md, \"The starting tile's detail on the samples\")")
    color_match: str = F("none", "with strength < 1: none | tile: each decoded sample's per-channel RGB mean and standard deviation set to its starting tile's (turned as the sample started), undoing the autoencoder's colour shift (measured, not adopted: BENCHMARKS.md, \"The starting tile's colours on the samples\")")


@dataclass(frozen=True)
class SelectConfig:
    samples: str = F("samples/run", "sample directory with samples.csv", input=True)
    data: str = F("data/target", "prepared labeled target dataset", input=True)
    subset: str = F("train", "real labeled subset: centroids, feature classifier, memorization")
    out: str = F("", "select's output directory: filtered.csv, filtered.json, _COMPLETE.json (default: <samples>/select)")
    backbone: str = F("small_cnn", "feature extractor: small_cnn[_w<width>] (trained here) or a timm model name")
    backbone_weights: str = F("", "local weights for a timm backbone (nothing is downloaded)")
    feature_steps: int = F(800, "optimisation steps (batch 32, augmented) of the small_cnn feature classifier (800 instead of 200 raised the judged class fidelity of kept samples from 0.82 to 0.90: BENCHMARKS.md)")
    min_confidence: float = F(0.5, "keep only samples with target-class confidence at least this")
    require_nearest_centroid: bool = F(True, "keep only samples whose nearest centroid is the target")
    memorization_quantile: float = F(0.01, "flag a sample closer to a real image than this quantile of real-real distances")
    memorization_per_class: bool = F(True, "one memorization threshold per class (that quantile of the class's real-real distances), applied by the class of a sample's nearest real tile; false: one threshold for all classes, pooled over the classes' same-class distances")
    drop_memorized: bool = F(True, "drop flagged near-copies")
    dihedral_memorization: bool = F(True, "memorization distance: minimum over the 8 flips/rotations of a sample")
    rank_by: str = F("centroid", "order within a class's filter tier: centroid (nearest the class centroid first) | confidence (highest first) | hard (lowest confidence first) | coverage (greedy spread over the class's real tiles' k-NN balls)")
    coverage_k: int = F(3, "rank_by coverage: a real tile's ball reaches its k-th nearest real tile of another group")
    max_ratio: float = F(0.0, "cap kept samples per class at this ratio of real (0: no cap)")
    quota_ratio: float = F(0.0, "class-balanced: keep the best-ranked quota_ratio x real count of every class, filling with samples that missed the confidence/centroid filters when too few pass; never memorized ones (0: filters only; run sets the largest ratio)")
    generative_metrics: bool = F(True, "also write generative_metrics.json (FD/KD, precision/recall)")
    inception_weights: str = F("", "local Inception-v3 weights (torchvision) for FID/KID (default: domain features only)")
    seed: int = F(0, "random seed")


@dataclass(frozen=True)
class EvaluateConfig:
    data: str = F("data/target", "prepared labeled target dataset", input=True)
    subset: str = F("frac0.05", "real training subset (a few-shot subset or train)")
    samples: str = F("", "sample directory (samples.csv, images/); empty: real arms only", input=True)
    selection: str = F("", "select's output directory with the keep-list filtered.csv (default: <samples>/select)", input=True)
    out: str = F("eval/run", "output directory")
    arms: tuple[str, ...] = F(("real", "real_aa", "classic", "selected", "unselected"),
                              "arms: real, real_aa (real-only with another seed stream: the A/A noise floor), classic, classic_aa (classic with another seed stream: the floor of the augmented harness the synthetic arms use), selected, unselected, pseudo (real + the train split's tiles outside the subset, labels never read, labelled by pseudo_reader's classifiers: plain pseudo-labelling, the baseline for --start-from unlabeled), pseudo+selected (real + pseudo's tiles + selected's samples: do the samples add to pseudo-labelling?), start (real + the raw tiles selected's samples started from, with their labels: does the diffusion step pay?), roundtrip (those tiles after one pass through the samples' autoencoder: does the autoencoder or the denoising step lose what the tiles carry?)")
    ratios: tuple[float, ...] = F((1.0,), "ratios R of the selected/unselected/pseudo/pseudo+selected/start/roundtrip arms: R x the real count added per class")
    seeds: tuple[int, ...] = F((0, 1, 2, 3, 4), "training seeds (5: the 95% t-interval is half as wide as with 3: t/sqrt(n) = 1.24 vs 2.48 std)")
    backbone: str = F("small_cnn", "small_cnn[_w<width>] (a 4-block CNN) or a timm model name (e.g. resnet18, vit_small_patch16_224)")
    backbone_weights: str = F("", "local pretrained weights for the backbone (default: from scratch)")
    steps: int = F(500, "optimisation steps per classifier, equal for every arm (500 = 74 passes over LC25000 5%, 432 tiles at batch 64: 7x the 70 that left real-only undertrained; an estimate until the benchmark's curves.csv shows the plateau; the best-validation checkpoint makes extra steps cost time, not accuracy)")
    epochs: int = F(0, "budget in passes over the real subset instead: epochs x steps_per_epoch steps (0: use steps)")
    steps_per_epoch: int = F(0, "optimisation steps per epoch when epochs > 0 (0: one pass over the real data)")
    val_every: int = F(50, "score the val split every N steps and after the last; test scores use the best-validation checkpoint (0: the last weights, no validation)")
    val_subset: str = F("val", "split used for validation and checkpoint choice (groups disjoint from the training subset and test)")
    batch_size: int = F(64, "batch size")
    lr: float = F(1e-3, "AdamW learning rate")
    ema_decay: float = F(0.0, "exponential moving average of the weights (0: off); validation and test score the average")
    pseudo_reader: str = F("classic", "arm of this evaluation whose classifiers (the mean of their probabilities over the seeds) label the pool tiles of the pseudo arms; trained before them")
    pseudo_rank: str = F("confidence", "which pool tiles read as a class a pseudo@R arm trains on (R x the real count): 'confidence' (the reader's most confident first) or 'random' (drawn with the training seed)")
    synthetic_weight: float = F(1.0, "loss weight of a synthetic training image relative to a real one in the arms that add images (selected, unselected, pseudo, pseudo+selected, start, roundtrip; 1: equal; below 1 trusts synthetic labels less)")
    real_finish: float = F(0.0, "share of the step budget at its end in which the arms that add images train on their real tiles only, i.e. fine-tune on real after real + synthetic (0: mixed to the end)")
    tta: bool = F(False, "test-time augmentation: test probabilities averaged over the 8 flips/rotations of each tile")
    external: tuple[str, ...] = F((), "external labeled test sets (prepared dataset directories; all their tiles are scored)", input=True)


@dataclass(frozen=True)
class ScoreConfig:
    classifiers: str = F("", "a saved classifier folder or a folder of them (evaluate's classifiers/); empty: none", input=True)
    data: str = F("data/external", "prepared labeled dataset the classifiers are scored on", input=True)
    subset: str = F("all", "split or subset of that dataset (all, test, ...)")
    samples: str = F("", "sample directory whose class fidelity --judge measures (fidelity.json, fidelity.csv in out)", input=True)
    judge: str = F("", "judge folder written by `histodiffusion judge` (needed with --samples)", input=True)
    out: str = F("eval/run/score", "output directory (scores.csv, scores.json, fidelity.json)")


@dataclass(frozen=True)
class JudgeConfig:
    data: str = F("data/target", "prepared labeled target dataset: the judge trains on tiles of its train split only", input=True)
    subset: str = F("train", "tiles the judge trains on: the train split (all its labels) or a subset of it; any validation or test tile is refused")
    out: str = F("judge", "judge folder, trained once per dataset and reused (model/, judge.json)")
    samples: tuple[str, ...] = F((), "sample directories to judge: each gets fidelity.json and fidelity.csv (per class, all and kept samples)")
    backbone: str = F("small_cnn", "judge architecture: small_cnn[_w<width>] or a timm model name (from scratch)")
    steps: int = F(600, "optimisation steps (AdamW, cosine schedule, classic augmentation); the last weights are kept")
    batch_size: int = F(64, "batch size")
    lr: float = F(1e-3, "AdamW learning rate")
    val_subset: str = F("val", "split the judge's accuracy is measured on after training, to show it can be trusted (never used to choose its weights; empty: not measured)")
    realism: bool = F(True, "also FD/KD and precision/recall of the samples against the judge's training tiles, in its feature space")
    seed: int = F(0, "random seed")


@dataclass(frozen=True)
class ExportDatasetConfig:
    data: str = F("data/target", "prepared labeled target dataset: the real tiles, their labels and groups", input=True)
    subset: str = F("frac0.05", "the real labeled subset exported with the synthetic tiles (the one the samples were selected for)")
    samples: str = F("samples/run", "sample directory (samples.csv, images/)", input=True)
    selection: str = F("", "select's output directory with the keep-list filtered.csv (default: <samples>/select)", input=True)
    evaluation: str = F("", "evaluate's output directory: its measured effect of selected@ratio (same keep-list and subset) goes into the dataset card (empty: not quoted)", input=True)
    ratio: float = F(1.0, "synthetic tiles per class: ratio x the subset's real count, the keep-list's first in rank order (evaluate's selected@ratio)")
    real: bool = F(True, "export the subset's real tiles too (false: the added tiles only)")
    synthetic: bool = F(True, "export the selected synthetic tiles (false: with --pseudo true, the pseudo-labelled tiles without them)")
    pseudo: bool = F(False, "also the pool tiles the evaluation's pseudo arm labelled (its pseudo_labels.csv: per class those of class_rank <= ratio x the real count, i.e. pseudo@ratio; labels read by its classifiers, never the tiles' own); needs --evaluation with that arm")
    out: str = F("augmented", "output directory: labels.csv, images/<class>/, dataset.json, README.md (dataset card)")


@dataclass(frozen=True)
class ReportConfig:
    run: str = F("runs/default", "run directory (or any directory holding the stage outputs)")
    out: str = F("", "report directory (default: <run>/report)")
    data: str = F("", "target dataset (default: <run>/data/target)", input=True)
    samples: str = F("", "sample directory (default: <run>/samples)", input=True)
    eval: str = F("", "evaluation directory (default: <run>/eval)", input=True)
    subset: str = F("", "real subset shown in grids and the embedding (default: evaluate's subset, else train)")
    grid_per_class: int = F(16, "images per class in the sample grids (real and synthetic each)")
    grid_scale: int = F(0, "display scale of the grid tiles (0: tiles at least 128 px wide, i.e. 2x for 64 px tiles)")
    embedding: str = F("auto", "auto (UMAP if installed, else t-SNE) | umap | tsne | pca")
    latent_classifier: str = F("", "latent classifier run directory (default: <run>/adapt/latent_classifier)", input=True)


@dataclass(frozen=True)
class RunConfig:
    out: str = F("runs/default", "run directory for the whole chain")
    preset: str = F("quick", "quick (2-core CPU, ~15 min on the built-in data) | paper (GPU scale)")
    base: str = F("default", "pretrained base to adapt: 'default' (the shipped histodiffusion-base-64), a base folder, or 'none' (pretrain from scratch on --unlabeled)")
    unlabeled: tuple[str, ...] = F((), "with --base none: unlabeled sources to pretrain on (default: the built-in unlabeled images)")
    labels_csv: str = F("", "labeled target CSV path,label[,group_id] (default: the built-in default data)")
    target_unlabeled: tuple[str, ...] = F((), "folders/files of your cohort's UNLABELED tiles: they join the target's train split without labels (prepare --unlabeled-tiles), for --start-from unlabeled, --adapt-decoder-unlabeled and --adapt-unlabeled-steps")
    tile_size: int = F(64, "working resolution of every tile (px)")
    split_seed: int = F(0, "seed of the group split and few-shot subsets of the target data")
    subset: str = F("frac0.25", "labeled few-shot subset used for adaptation, synthesis and evaluation")
    seeds: tuple[int, ...] = F((0, 1, 2), "evaluation seeds")
    ratios: tuple[float, ...] = F((1.0,), "synthetic ratios to evaluate")
    oversample: float = F(2.0, "sample oversample x the largest ratio, so selection has candidates to keep")
    adapt_unlabeled_steps: int = F(0, "continue the base's unconditional training on the target's train-split tiles, without their labels, for this many steps before guidance (0: off)")
    finetune_decoder: bool = F(True, "fine-tune the decoder with an auxiliary classifier before sampling")
    adapt_decoder_unlabeled: bool = F(False, "in that fine-tune, also reconstruct the target's train-split tiles without their labels (beyond the paper; finetune-decoder.unlabeled_subset=train)")
    latent_classifier_trunk: str = F("small", "the latent classifier's trunk: small (trained from scratch on the labeled latents, the paper) | unet: the encoder of the UNet that is guided (pretrained, frozen; only a head on its block features trains; beyond the paper, train-latent-classifier.trunk_unet)")
    start_from: str = F("noise", "where each synthetic tile starts: noise (the paper) | unlabeled: one of the target's train-split tiles, its label unused (the latent classifier names its class), noised to --start-strength, and selection ranks each class's samples by confidence; the evaluation adds the arms pseudo (those tiles pseudo-labelled without a generator, the baseline) start (the kept samples' own starting tiles, raw: what the diffusion step adds) and roundtrip (those tiles through the samples' autoencoder: what of that the autoencoder costs) unless --stage-config sets its arms (beyond the paper; sample --strength S --init-labels classifier, select --rank-by confidence)")
    start_strength: float = F(START_STRENGTH, "with --start-from unlabeled: the share of the noise schedule each starting tile is noised to (0.05 measured best on LC25000 lung, BENCHMARKS.md)")
    start_labels: str = F("latent", "with --start-from unlabeled: who reads each starting tile's class: latent (the latent classifier on its clean latent) | ensemble (the mean of that and train-latent-classifier's image-space baseline on its pixels; sample --init-labels ensemble)")
    ablations: bool = F(False, "also run the no-pretraining ablation and write ablation.md")
    stage_config: str = F("", "JSON/TOML file of per-stage overrides: {stage: {field: value}}")
    until: str = F("", "stop after this stage (e.g. pretrain); empty: the whole chain")
    reuse_from: str = F("", "another run directory: every stage that finished there with this run's config and the same inputs is copied instead of re-run, and an evaluation's finished real/classic classifiers when only samples, arms or seeds differ (variants of one run share their common stages)")
    procs: int = F(1, "processes for the evaluate stages (torchrun on this machine, one thread each unless OMP_NUM_THREADS is set; the same classifiers as one process; their log lines go to the stage's log.txt only)")


# --------------------------------------------------------------------------------------------
# (De)serialisation with type checks
# --------------------------------------------------------------------------------------------
def config_from_dict(cls: type, d: dict, base: Any = None) -> Any:
    """Build `cls` from a dict (e.g. a config file): unknown fields and wrong types are errors."""
    if not isinstance(d, dict):
        raise HistoError(f"{cls.__name__}: config must be a mapping, not {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise HistoError(f"unknown config field(s) for {cls.__name__}: {unknown}; known: {sorted(names)}")
    kw = {k: coerce(cls, k, v) for k, v in d.items()}
    cfg = dataclasses.replace(base, **kw) if base is not None else cls(**kw)
    validate_config(cfg)
    return cfg
