"""Stage `train-latent-classifier`: a noise-aware classifier p(y | z_t, t) on latents of the labeled
few-shot subset, noised at random timesteps with the LDM's own noise schedule (`add_noise`), class-balanced
batches, AdamW. Reports validation accuracy per timestep bucket (metrics.json) next to an image-space
classifier trained on the same subset with the same budget (the ratio per bucket and the goal, >= 0.9 at
the lowest noise, are in metrics.json). Exports <out>/model/.

Batches are drawn from a generator seeded by (seed, step, rank), so a resumed run continues the same
sequence of batches; every process draws its own batch and accelerate averages the gradients.

How strong is the latent classifier (the second half of this module)? Its validation accuracy per
timestep bucket set against an image-space classifier trained on the same subset with the same budget.

`train-latent-classifier` calls `image_baseline` after training (rank 0; cfg.image_baseline): a
classifier on the PIXELS of the same training tiles (the same ids as the latent subset), with the
same number of steps, batch size, AdamW learning rate and weight decay, class-balanced batches drawn
the same way, dihedral augmentation when the latent classifier used its (latent) augmentation; scored
on the clean pixels of the same validation tiles. `strength_summary` turns the bucket accuracies into
ratios to that accuracy; the goal (issue 12) is a ratio of at least 0.9 in the lowest-noise bucket
(t < 250 of T = 1000). The image classifier is saved under <out>/image_baseline/ and reused on re-run.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.seeds import torch_generator
from ..core.transforms import DIHEDRAL, dihedral
from ..data.batches import accuracy, balanced_batch, class_members, train_balanced
from ..models.cards import CARD, latent_classifier_card
from ..runtime.artifacts import IMAGE_BASELINE_DIR, MODEL_INFO, format_meta, read_meta
from ..runtime.config import LatentClassifierConfig
from ..runtime.contract import completion_record
from ..runtime.distributed import load_latest_checkpoint, make_accelerator, save_checkpoint, seed_everything
from ..runtime.errors import HistoError
from ..runtime.fileio import atomic_path, write_json_atomic, write_text_atomic
from ..runtime.log import MetricsLog, closes_stage_logs
from ..runtime.rundirs import is_complete, mark_complete, start_stage

N_BUCKETS = 4  # validation accuracy per timestep bucket [k*T/4, (k+1)*T/4)


def _load_training_scheduler(path: str, space):
    from ..runtime.latent_space import check_compatible, of_model
    from ..models.unet import load_scheduler

    sched = load_scheduler(path)
    if (Path(path).parent / MODEL_INFO).is_file():  # scheduler of an exported LDM: its latents must be the cache's
        try:
            check_compatible(space, of_model(Path(path).parent, "LDM"), "the latent cache", f"the LDM of {path}")
        except HistoError as e:
            raise HistoError(f"{e}; encode the target data with the LDM's autoencoder") from None
    return sched


def noised_batch(ds, idx, sched, g: torch.Generator, max_t: int, augment: bool = False):
    """(z_t, t, y) for items `idx` of a LatentDataset: z_t = add_noise(z, eps, t), t ~ U[0, max_t).

    augment: each latent gets one of the 8 dihedral transforms (drawn from g), applied in latent space.
    """
    items = [ds[int(i)] for i in idx]
    z = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items])
    if augment:
        ks = torch.randint(DIHEDRAL, (len(idx),), generator=g)
        z = torch.stack([dihedral(zi, int(k)) for zi, k in zip(z, ks)])
    t = torch.randint(0, max_t, (len(idx),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    return sched.add_noise(z, noise, t), t, y


@torch.no_grad()
def bucket_accuracy(model, ds, sched, seed: int = 1234, batch: int = 256) -> dict[str, float]:
    """Accuracy on (clean-mean) latents noised at a fixed random t inside each timestep bucket."""
    T = int(sched.config.num_train_timesteps)
    edges = np.linspace(0, T, N_BUCKETS + 1).astype(int)
    labels = torch.tensor(ds.labels())
    z_all = torch.stack([ds[i][0] for i in range(len(ds))])
    out = {}
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        g = torch.Generator().manual_seed(seed + b)
        t = torch.randint(int(lo), int(hi), (len(ds),), generator=g)
        zt = sched.add_noise(z_all, torch.randn(z_all.shape, generator=g), t)
        pred = torch.cat([model(zt[i:i + batch], t[i:i + batch]).argmax(-1) for i in range(0, len(ds), batch)])
        out[f"[{lo},{hi})"] = float((pred == labels).float().mean())
    return out


@closes_stage_logs
def run(cfg: LatentClassifierConfig) -> Path:
    from ..data.datasets import LatentDataset
    from ..models import norm_groups
    from ..models.latent_classifier import LatentClassifier, init_trunk_from_unet, unet_trunk_config

    acc = make_accelerator()
    out, log = start_stage(acc, cfg, "train-latent-classifier")
    if is_complete(out):
        log.info("latent classifier already complete: %s", out / "model")
        return out
    for name in ("steps", "batch_size", "width", "depth"):
        if getattr(cfg, name) <= 0:
            raise HistoError(f"{name} must be positive, got {getattr(cfg, name)}")
    # 1. data: latents of the labeled subset (z sampled from the posterior mean/std at each step)
    meta = read_meta(cfg.cache, "latent cache")
    classes = list(meta.get("classes") or [])
    if len(classes) < 2:
        raise HistoError(f"latent cache {cfg.cache} has classes {classes}: need a labeled dataset with >= 2 classes")
    ds = LatentDataset(cfg.cache, cfg.subset, sample=True, seed=cfg.seed)
    by_class = class_members(ds.labels(), classes, f"subset {cfg.subset!r} of {cfg.cache}")
    sched = _load_training_scheduler(cfg.scheduler, ds.space)
    T = int(sched.config.num_train_timesteps)
    max_t = cfg.max_timestep or T
    if not 0 < max_t <= T:
        raise HistoError(f"max_timestep must be in [1, {T}] (or 0 for all), got {cfg.max_timestep}")
    val = LatentDataset(cfg.cache, cfg.val_subset, sample=False) if cfg.val_subset else None
    image_data = None
    if val is not None and cfg.image_baseline:  # checked before training: its dataset must be readable
        image_data = baseline_data(cfg, meta)
    # 2. model and optimiser, resumed from the newest checkpoint
    seed_everything(cfg.seed)
    c = int(ds[0][0].shape[0])
    if cfg.trunk_unet:  # the pretrained UNet's encoder, frozen: only the norms and head on its features train
        unet = _load_trunk_unet(cfg.trunk_unet, c)
        model = LatentClassifier(in_channels=c, num_classes=len(classes), class_names=classes,
                                 trunk=unet_trunk_config(unet))
        init_trunk_from_unet(model, unet)
        for prm in model.trunk_parameters():
            prm.requires_grad_(False)
    else:
        model = LatentClassifier(in_channels=c, num_classes=len(classes), width=cfg.width, depth=cfg.depth,
                                 norm_num_groups=norm_groups(cfg.width, most=8), class_names=classes)
    opt = torch.optim.AdamW([prm for prm in model.parameters() if prm.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    step, _ = load_latest_checkpoint(acc, out)
    if step:
        log.info("resumed from step %d", step)
    log.info("latent classifier: %d latents of %s (%s), %d classes, t < %d, %d steps x %d x %d process(es); %s",
             len(ds), cfg.subset, cfg.cache, len(classes), max_t, cfg.steps, cfg.batch_size, acc.num_processes,
             f"trunk: the encoder of {cfg.trunk_unet} (frozen)" if cfg.trunk_unet else "small trunk from scratch")
    metrics = MetricsLog(out / "metrics.jsonl", acc.is_main_process)
    model.train()
    t0, run_loss, run_acc, n = time.time(), 0.0, 0.0, 0
    # 3. training: class-balanced batches of noised latents
    while step < cfg.steps:
        g = torch_generator(cfg.seed, step, acc.process_index)
        ds.set_epoch(step)
        zt, t, y = noised_batch(ds, balanced_batch(by_class, cfg.batch_size, g), sched, g, max_t, cfg.augment)
        logits = model(zt, t)
        loss = F.cross_entropy(logits, y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(-1) == y).float().mean())
        n += 1
        if step % 50 == 0 or step == cfg.steps:
            metrics.log(step=step, loss=run_loss / n, train_acc=run_acc / n, seconds=time.time() - t0)
            log.info("step %d/%d loss %.4f train acc %.3f", step, cfg.steps, run_loss / n, run_acc / n)
            run_loss, run_acc, n = 0.0, 0.0, 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(acc, out, step, cfg.keep_checkpoints)
    # 4. validation per timestep bucket, export
    model = acc.unwrap_model(model).eval()
    if acc.is_main_process:
        _validate_and_export(cfg, model, ds, val, sched, max_t, classes, image_data, out, log)
    acc.wait_for_everyone()
    return out


def _load_trunk_unet(path: str, channels: int):
    """The UNet whose encoder becomes the classifier's trunk: a UNet2DModel folder for latents of `channels`."""
    from diffusers import UNet2DModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise HistoError(f"trunk_unet: {folder} is not a UNet folder (no config.json; e.g. <ldm or base>/unet_ema)")
    try:
        unet = UNet2DModel.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise HistoError(f"trunk_unet: cannot load a UNet2DModel from {folder}: {type(e).__name__}: {e}") from None
    if int(unet.config.in_channels) != channels:
        raise HistoError(f"trunk_unet: {folder} takes {unet.config.in_channels} latent channels, the cache's "
                         f"latents have {channels}")
    return unet


def _validate_and_export(cfg: LatentClassifierConfig, model, ds, val, sched, max_t: int, classes: list[str],
                         image_data: Path | None, out: Path, log) -> None:
    """Main process: accuracy per timestep bucket on the validation subset (and against the image
    baseline), metrics.json, the exported model/ with its record and card, _COMPLETE.json."""
    result = {"steps": cfg.steps, "classes": classes, "train_subset": cfg.subset, "n_train": len(ds),
              "chance": 1.0 / len(classes)}
    if val is not None:
        by_t = bucket_accuracy(model, val, sched)
        result.update(val_subset=cfg.val_subset, n_val=len(val), val_accuracy_by_t=by_t,
                      val_accuracy=float(np.mean(list(by_t.values()))))
        log.info("validation accuracy by timestep: %s", ", ".join(f"t in {k}: {v:.3f}" for k, v in by_t.items()))
        if cfg.image_baseline:
            image = image_baseline(cfg, image_data, _base_ids(ds), _base_ids(val), classes, out, log)
            result.update(image_classifier=image, **strength_summary(by_t, image["val_accuracy"]))
            for line in strength_lines(by_t, image, result):
                log.info("latent vs image classifier: %s", line)
    write_json_atomic(out / "metrics.json", result)
    with atomic_path(out / "model") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        write_json_atomic(tmp / MODEL_INFO, format_meta(
            kind="latent_classifier", classes=classes, **ds.space.fields(),
            cache=str(Path(cfg.cache).resolve()), subset=cfg.subset,
            scheduler=dict(sched.config), max_timestep=max_t,
            trunk_from=str(Path(cfg.trunk_unet).resolve()) if cfg.trunk_unet else ""))
        write_text_atomic(tmp / CARD, latent_classifier_card(tmp, str(out / "model"), result))
    mark_complete(out, **completion_record(cfg))
    log.info("latent classifier exported: %s", out / "model")


def _base_ids(ds) -> list[str]:
    """Tile ids of a latent dataset without the dihedral copies' suffix (<id>~d1..d7), in order."""
    return list(dict.fromkeys(r["id"].split("~")[0] for r in ds.rows))


# --------------------------------------------------------------------------------------------------
# Strength: the latent classifier against an image-space classifier with the same budget
# --------------------------------------------------------------------------------------------------
GOAL_RATIO = 0.9
IMAGE_SEED_OFFSET = 7919  # the image classifier's batches: its own stream of the stage's seed


def strength_summary(by_t: dict[str, float], image_accuracy: float | None, goal: float = GOAL_RATIO) -> dict:
    """Ratios latent accuracy / image accuracy per bucket and the goal in the first (lowest-noise) bucket."""
    ok = image_accuracy is not None and image_accuracy > 0
    ratios = {b: (a / image_accuracy if ok else None) for b, a in by_t.items()}
    first = next(iter(by_t), None)
    r = ratios.get(first) if first is not None else None
    return {"ratio_to_image_by_t": ratios,
            "goal": {"bucket": first, "ratio": r, "target": goal, "met": (r >= goal - 1e-9) if r is not None else None}}  # 1e-9: accuracies are k / n


def baseline_data(cfg, cache_meta: dict) -> Path:
    """The prepared dataset whose pixels the image baseline uses (checked up front, before training)."""
    data = Path(cfg.data or cache_meta.get("dataset") or "")
    if not (data / "manifest.csv").is_file():
        raise HistoError(f"image baseline: the dataset of latent cache {cfg.cache} ({data}) is not readable: give "
                         f"--data (the prepared dataset it was encoded from) or --image-baseline false")
    return data


def _pixels(data: Path, ids: list[str], what: str):
    from ..data.datasets import cache_pixels

    return cache_pixels(data, ids, f"image baseline ({what} latents)", "--data")


def image_baseline(cfg, data: Path, train_ids: list[str], val_ids: list[str], classes: list[str], out: Path,
                   log) -> dict:
    """Train (or reuse) the image-space classifier with the latent classifier's budget; its val accuracy."""
    from ..models.classifier import build_classifier, load_classifier, save_classifier

    folder = out / IMAGE_BASELINE_DIR
    if (folder / "classifier.json").is_file():
        _, info = load_classifier(folder)
        log.info("image baseline: reusing %s (val accuracy %.3f)", folder, info["val_accuracy"])
        return {k: info[k] for k in ("backbone", "steps", "batch_size", "lr", "weight_decay", "augment",
                                     "n_train", "n_val", "val_accuracy", "seconds")}
    ds, val = _pixels(data, train_ids, "training"), _pixels(data, val_ids, "validation")
    if list(ds.classes) != list(classes):
        raise HistoError(f"image baseline: dataset {data} has classes {ds.classes}, the latent cache {classes}")
    by_class = class_members(np.array([ds.label_index(i) for i in range(len(ds))]), classes,
                             f"image baseline subset {cfg.subset!r} of {data}")
    size = int(ds[0][0].shape[-1])
    torch.manual_seed(cfg.seed)
    clf = build_classifier(cfg.image_backbone, len(classes), size)
    t0 = time.time()
    train_balanced(clf, ds, by_class, cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay,
                   cfg.seed + IMAGE_SEED_OFFSET, augment=cfg.augment)
    res = {"backbone": cfg.image_backbone, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
           "weight_decay": cfg.weight_decay, "augment": cfg.augment, "n_train": len(ds), "n_val": len(val),
           "val_accuracy": accuracy(clf, val, range(len(val))), "seconds": round(time.time() - t0, 1)}
    save_classifier(clf, folder, {"name": cfg.image_backbone, "classes": classes, "image_size": size,
                                  "role": "image-space baseline of the latent classifier", **res})
    log.info("image baseline: %s, %d steps on %d tiles: val accuracy %.3f (%.0fs)", cfg.image_backbone, cfg.steps,
             len(ds), res["val_accuracy"], res["seconds"])
    return res


def strength_lines(by_t: dict, image: dict, summary: dict) -> list[str]:
    """Log lines: per bucket, latent accuracy, image accuracy and their ratio; the goal."""
    lines = [f"t in {b}: latent {a:.3f} / image {image['val_accuracy']:.3f} = "
             + ("–" if summary["ratio_to_image_by_t"][b] is None else f"{summary['ratio_to_image_by_t'][b]:.2f}")
             for b, a in by_t.items()]
    g = summary["goal"]
    if g["ratio"] is not None:
        lines.append(f"goal >= {g['target']} x the image classifier at t in {g['bucket']}: "
                     f"{g['ratio']:.2f} ({'met' if g['met'] else 'missed'})")
    return lines
