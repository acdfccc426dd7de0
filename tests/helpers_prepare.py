"""Builders of small real-image inputs for the prepare tests (from the built-in default data)."""
from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from histodiffusion.data import default


def lung_rows() -> list[dict]:
    with open(default.labels_csv(), newline="") as f:
        return list(csv.DictReader(f))


def balanced_rows(n: int) -> list[dict]:
    """n rows of the default labels CSV taken in turn from each class (lung_rows()[0] first): a labels
    CSV needs at least two classes."""
    by_class: dict[str, list[dict]] = {}
    for r in lung_rows():
        by_class.setdefault(r["label"], []).append(r)
    turns = [r for group in zip(*by_class.values()) for r in group]
    return turns[:n]


def class_folders(root: Path, per_class: int = 6, suffix: str = ".tif") -> Path:
    """<root>/<class>/*.tif (NCT-CRC-HE layout) from the default lung tiles."""
    src = default.labels_csv().parent
    seen: dict[str, int] = {}
    for r in lung_rows():
        if seen.get(r["label"], 0) >= per_class:
            continue
        seen[r["label"]] = seen.get(r["label"], 0) + 1
        d = root / r["label"].upper()
        d.mkdir(parents=True, exist_ok=True)
        Image.open(src / r["path"]).save(d / (Path(r["path"]).stem + suffix))
    return root


def labels_csv(root: Path, rows: list[dict] | None = None, columns=("path", "label", "group_id"),
               n: int | None = None) -> Path:
    """A labels CSV beside copies of default lung tiles (paths relative to the CSV); `n`: balanced_rows(n)."""
    src = default.labels_csv().parent
    rows = (balanced_rows(n) if n else lung_rows()) if rows is None else rows
    root.mkdir(parents=True, exist_ok=True)
    for r in rows:
        p = root / r["path"]
        if not p.exists() and (src / r["path"]).exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes((src / r["path"]).read_bytes())
    path = root / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def tissue_crop(path: Path, size: int = 200) -> Image.Image:
    """A crop of a default unlabeled image that is all tissue (tiatoolbox image)."""
    im = Image.open(default.unlabeled_dir() / "tiatoolbox_target_image.jpg").convert("RGB")
    return im.crop((300, 300, 300 + size, 300 + size))
