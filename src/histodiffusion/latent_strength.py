"""How strong is the noise-aware latent classifier? Its validation accuracy per timestep bucket set
against an image-space classifier trained on the same subset with the same budget.

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

from .runtime.errors import HistoError
from .core.seeds import torch_generator

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
    from .data.datasets import PixelDataset

    ds = PixelDataset(data, ids=ids)
    if len(ds) != len(set(ids)):
        raise HistoError(f"image baseline: {len(set(ids)) - len(ds)} tile(s) of the {what} latents are not in "
                         f"dataset {data}: give --data, the dataset the cache was encoded from")
    return ds


def image_baseline(cfg, data: Path, train_ids: list[str], val_ids: list[str], classes: list[str], out: Path,
                   log) -> dict:
    """Train (or reuse) the image-space classifier with the latent classifier's budget; its val accuracy."""
    from .adapt import _accuracy, _class_members, _pixel_batch, balanced_batch
    from .models.classifier import build_classifier, load_classifier, save_classifier

    folder = out / "image_baseline"
    if (folder / "classifier.json").is_file():
        _, info = load_classifier(folder)
        log.info("image baseline: reusing %s (val accuracy %.3f)", folder, info["val_accuracy"])
        return {k: info[k] for k in ("backbone", "steps", "batch_size", "lr", "weight_decay", "augment",
                                     "n_train", "n_val", "val_accuracy", "seconds")}
    ds, val = _pixels(data, train_ids, "training"), _pixels(data, val_ids, "validation")
    if list(ds.classes) != list(classes):
        raise HistoError(f"image baseline: dataset {data} has classes {ds.classes}, the latent cache {classes}")
    by_class = _class_members(np.array([ds.label_index(i) for i in range(len(ds))]), classes,
                              f"image baseline subset {cfg.subset!r} of {data}")
    size = int(ds[0][0].shape[-1])
    torch.manual_seed(cfg.seed)
    clf = build_classifier(cfg.image_backbone, len(classes), size)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    clf.train()
    t0 = time.time()
    for step in range(cfg.steps):
        g = torch_generator(cfg.seed + IMAGE_SEED_OFFSET, step, 0)
        x, y = _pixel_batch(ds, balanced_batch(by_class, cfg.batch_size, g), g if cfg.augment else None)
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    res = {"backbone": cfg.image_backbone, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
           "weight_decay": cfg.weight_decay, "augment": cfg.augment, "n_train": len(ds), "n_val": len(val),
           "val_accuracy": _accuracy(clf, val, range(len(val))), "seconds": round(time.time() - t0, 1)}
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
