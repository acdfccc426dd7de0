"""Loading real tiles and synthetic samples into memory for select / evaluate / report.

Real tiles come from a prepared dataset (PixelDataset shards); synthetic samples from a sample
directory (samples.csv + images/<id>.png) and its keep-list filtered.csv. Everything is checked at
this boundary with errors naming the file or value: missing image files, unknown classes, a class
order that differs from the target dataset's.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..runtime.artifacts import FILTERED_COLUMNS, FILTERED_CSV, SAMPLES_CSV, SELECT_DIR, read_dataset, subset_ids
from ..runtime.errors import HistoError
from ..runtime.fileio import read_csv
from ..runtime.rundirs import is_complete


@dataclass
class Tiles:
    """uint8 images [N, H, W, 3] with labels (class indices), ids and groups."""
    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    groups: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}


def dataset_classes(data: str | Path) -> tuple[dict, list[dict], list[str]]:
    meta, rows = read_dataset(data)
    classes = list(meta.get("classes") or [])
    if len(classes) < 2:
        raise HistoError(f"dataset {data} is not labeled with at least 2 classes (meta.json classes: {classes})")
    return meta, rows, classes


def load_real(data: str | Path, subset: str, ids: list[str] | None = None) -> Tiles:
    """All labeled tiles of `subset` (split name, 'all' or few-shot subset) of a labeled dataset, in manifest
    order (the cohort's unlabeled tiles of its train split, label "", are not part of it)."""
    from .datasets import PixelDataset

    ds = PixelDataset(data, subset=subset, ids=ids, labeled_only=True)
    if len(ds.classes) < 2:
        raise HistoError(f"dataset {data} is not labeled with at least 2 classes")
    labels = [ds.label_index(i) for i in range(len(ds))]
    if -1 in labels:
        bad = ds.rows[labels.index(-1)]
        raise HistoError(f"tile {bad['id']} of {data} has label {bad['label']!r}, not one of {ds.classes}")
    images = torch.stack([ds.uint8(i) for i in range(len(ds))])
    return Tiles(images, torch.tensor(labels), [r["id"] for r in ds.rows], [r["group"] for r in ds.rows],
                 ds.classes)


def subset_fingerprint(data: str | Path, subset: str) -> str:
    """Content hash of a subset (its tiles' pixel hashes): a changed subset invalidates cached models."""
    _, rows = read_dataset(data)
    wanted = set(subset_ids(data, rows, subset))
    h = hashlib.sha256()
    for r in sorted((r for r in rows if r["id"] in wanted), key=lambda r: r["id"]):
        h.update(f"{r['id']}:{r['hash']}:{r['label']};".encode())
    return h.hexdigest()


def quota(ratio: float, real_count: int) -> int:
    """Synthetic images asked for a class: ratio x real count, rounded exactly as `sample` plans them
    (Python round), so a sample run at ratio R always holds quota(R, n) images per class."""
    return int(round(ratio * real_count))


def read_samples(sample_dir: str | Path, classes: list[str]) -> list[dict]:
    """Rows of samples.csv, checked: every image file exists, every target is a class of the target
    dataset and target_index follows the dataset's class order."""
    sample_dir = Path(sample_dir)
    path = sample_dir / SAMPLES_CSV
    rows = read_csv(path, ["id", "file", "target", "target_index"], "samples.csv")
    if not rows:
        raise HistoError(f"{path} lists no samples")
    missing = [r for r in rows if not (sample_dir / r["file"]).is_file()]
    if missing:
        raise HistoError(f"{len(missing)} image file(s) listed in {path} are missing, e.g. "
                         f"{sample_dir / missing[0]['file']}")
    unknown = sorted({r["target"] for r in rows} - set(classes))
    if unknown:
        raise HistoError(f"{path} has target class(es) {unknown} that the target dataset does not have "
                         f"(its classes: {classes})")
    for r in rows:
        try:
            ti = int(r["target_index"])
        except ValueError:
            raise HistoError(f"{path}: sample {r['id']} has target_index {r['target_index']!r}") from None
        if ti >= len(classes) or classes[ti] != r["target"]:
            raise HistoError(f"{path}: sample {r['id']} has target {r['target']!r} at index {ti}, but the target "
                             f"dataset's class order is {classes}: the samples were made for other classes")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise HistoError(f"{path} lists duplicate sample ids")
    return rows


def load_sample_images(sample_dir: str | Path, rows: list[dict], size: int) -> torch.Tensor:
    """uint8 [N, size, size, 3] from the PNG files (converted to RGB; resized when not size x size)."""
    from PIL import Image

    out = []
    for r in rows:
        p = Path(sample_dir) / r["file"]
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                out.append(np.asarray(im, dtype=np.uint8))
        except OSError as e:
            raise HistoError(f"cannot read sample image {p}: {e}") from None
    return torch.from_numpy(np.stack(out))


def read_filtered(selection: str | Path) -> list[dict]:
    """The keep-list of a complete selection directory (select's output, e.g. <samples>/select)."""
    selection = Path(selection)
    path = selection / FILTERED_CSV
    if not path.is_file():
        if selection.name == SELECT_DIR and (selection.parent / FILTERED_CSV).is_file():
            raise HistoError(f"{selection.parent / FILTERED_CSV} was written by an older histodiffusion (format 1: "
                             f"beside samples.csv); select now writes into its own directory {selection}: re-run "
                             f"`histodiffusion select`")
        raise HistoError(f"no {FILTERED_CSV} in {selection}: run `histodiffusion select` first")
    if not is_complete(selection):
        raise HistoError(f"selection {selection} is incomplete (no _COMPLETE.json: select was interrupted); "
                         f"re-run `histodiffusion select`")
    return read_csv(path, FILTERED_COLUMNS, FILTERED_CSV)


def ranked_kept(filtered: list[dict], classes: list[str]) -> dict[str, list[dict]]:
    """Per class, the kept rows of a keep-list in rank order: selected@r trains on the first
    quota(r, real count) of them."""
    return {c: sorted((f for f in filtered if f["target"] == c and int(f["keep"]) == 1), key=lambda f: int(f["rank"]))
            for c in classes}

