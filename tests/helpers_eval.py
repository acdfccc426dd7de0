"""Tiny-artifact builders for the select / evaluate / report tests: labeled datasets written with
DatasetWriter (classes told apart by colour and texture, groups of flipped copies, train/val/test
split by group, few-shot subsets) and fake sample directories (PNG files + samples.csv)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histodiffusion.data.writer import DatasetWriter
from histodiffusion.runtime.artifacts import SAMPLES_COLUMNS
from histodiffusion.runtime.fileio import write_csv_atomic

CLASSES = ["aca", "benign", "scc"]
_BASE = np.array([[200, 60, 90], [90, 80, 200], [70, 190, 80]], dtype=np.float64)


def class_tile(c: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A tile of class c: its base colour, a class-specific stripe pattern, noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = np.sin((xx if c == 0 else yy if c == 1 else xx + yy) * (0.8 + 0.3 * c))[..., None] * 30
    img = _BASE[c] + pattern + rng.normal(0, 18, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(out: str | Path, classes=CLASSES, groups=(4, 2, 2), per_group: int = 3, size: int = 16,
                 seed: int = 0, leak: bool = False, name: str = "target", pool_label: str | None = None) -> Path:
    """groups = (train, val, test) groups per class; subsets frac0.5 (half of the train groups per
    class) and all_train. leak=True puts a test tile into the group of a frac0.5 training tile.
    pool_label: the label of the train tiles outside frac0.5 instead of their class ("": unlabeled)."""
    rng = np.random.default_rng(seed)
    w = DatasetWriter(out, tile_size=size, shard_size=50)
    sub = []
    for c, cls in enumerate(classes):
        ci = CLASSES.index(cls) if cls in CLASSES else c % 3
        for split, n_groups in zip(("train", "val", "test"), groups):
            for g in range(n_groups):
                base = class_tile(ci, rng, size)
                gid = f"{name}-{cls}-{split}{g}"
                in_sub = split == "train" and g < max(1, n_groups // 2)
                label = pool_label if split == "train" and not in_sub and pool_label is not None else cls
                for k in range(per_group):
                    tile = np.ascontiguousarray(np.rot90(base, k))
                    row = w.add(tile, id=f"{gid}-{k}", source="synthetic-test", label=label, group=gid, split=split)
                    if in_sub:
                        sub.append(row["id"])
    if leak:
        victim = next(r for r in w.rows if r["id"] in sub)
        test_row = next(r for r in w.rows if r["split"] == "test")
        test_row["group"] = victim["group"]
    meta = {"name": name, "kind": "labeled", "classes": list(classes), "tile_size": size,
            "counts": {"tiles": len(w.rows)}}
    return w.finish(meta, {"frac0.5": sub})


def make_samples(out: str | Path, images: list[np.ndarray], targets: list[str], classes=CLASSES,
                 seed: int = 0) -> Path:
    """A sample directory: images/<id>.png + samples.csv (SAMPLES_COLUMNS)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, t) in enumerate(zip(images, targets)):
        sid = f"s{i:05d}"
        Image.fromarray(img).save(out / "images" / f"{sid}.png")
        rows.append({"id": sid, "file": f"images/{sid}.png", "seed": seed * 100000 + i, "target": t,
                     "target_index": list(classes).index(t), "scale": 10.0, "scheduler": "ddim", "steps": 10,
                     "eta": 0.0, "window_lo": 0, "window_hi": 0, "confidence": 0.9, "unet_id": "u",
                     "classifier_id": "c", "vae_id": "v"})
    write_csv_atomic(out / "samples.csv", rows, SAMPLES_COLUMNS)
    return out


def make_class_samples(out: str | Path, n_per_class: int = 6, size: int = 16, seed: int = 1,
                       classes=CLASSES) -> Path:
    """Synthetic samples drawn from the same class distributions as make_dataset's tiles."""
    rng = np.random.default_rng(seed)
    imgs, targets = [], []
    for c, cls in enumerate(classes):
        for _ in range(n_per_class):
            imgs.append(class_tile(c, rng, size))
            targets.append(cls)
    return make_samples(out, imgs, targets, classes)


def write_filtered(sample_dir: str | Path, keep_every: int = 2) -> Path:
    """A hand-made complete selection in <sample_dir>/select: filtered.csv with every keep_every-th sample
    of each class kept, ranked in file order, and its completion marker."""
    import csv

    from histodiffusion.runtime.artifacts import FILTERED_COLUMNS, selection_dir
    from histodiffusion.runtime.rundirs import mark_complete

    sample_dir = Path(sample_dir)
    with open(sample_dir / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out, seen = [], {}
    for r in rows:
        k = seen.get(r["target"], 0)
        seen[r["target"]] = k + 1
        keep = int(k % keep_every == 0)
        out.append({"id": r["id"], "target": r["target"], "pred": r["target"], "confidence": 0.9,
                    "nearest_centroid": r["target"], "centroid_dist": float(k), "nn_real_id": "x",
                    "nn_real_dist": 1.0, "memorized": 0, "keep": keep, "rank": k + 1,
                    "reason": "" if keep else "low_confidence"})
    selection = selection_dir(sample_dir)
    write_csv_atomic(selection / "filtered.csv", out, FILTERED_COLUMNS)
    mark_complete(selection, inputs={})
    return selection / "filtered.csv"


class one_thread:
    """Context manager: torch on one thread (tiny models; avoids oversubscription on a busy 2-core box)."""

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)


def with_starts(samples: Path, data: str, out: Path) -> Path:
    """A copy of a sample directory whose sample i names train tile i (cycling through the train split, every
    class) of `data` as its starting tile, turned by dihedral i % 8; its keep-list copied along."""
    import csv
    import shutil

    from histodiffusion.data.datasets import PixelDataset

    shutil.copytree(samples, out)
    train = [r["id"] for r in PixelDataset(data, "train").rows]
    rows = list(csv.DictReader(open(out / "samples.csv")))
    for i, r in enumerate(rows):
        r["init_id"], r["init_dihedral"] = train[(5 * i) % len(train)], i % 8
    write_rows(out / "samples.csv", rows)
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    """A CSV file of `rows` (dicts with the same keys, in the first row's order)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
