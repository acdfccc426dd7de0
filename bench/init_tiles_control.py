"""The control of samples started from real tiles (run by hand): the starting tiles themselves.

`sample --strength S` starts every sample from the latent of a real train tile (its `init_id`, in the flip or
rotation `init_dihedral`); with `--init-labels classifier` that tile may be any train tile, unlabeled, whose
clean latent the latent classifier reads as the sample's class. Then the gain of such samples can come from
the diffusion model (new variations of the tile) or simply from the new real tiles with the classifier's
labels (pseudo-labelling, no generator needed). This script writes the control: a sample directory with,
for every sample of a finished one, its starting tile as stored (the same flip or rotation, the sample's
target as its label), so that the product's own `select` and `evaluate` run on it with the same configs:

    .venv/bin/python bench/init_tiles_control.py --samples R/samples_ul0.3 --data R/data/target --out R/samples_ul_raw
    .venv/bin/python -m histodiffusion select --config <R/samples_ul0.3/select/config.json with samples -> the control>
    .venv/bin/python -m histodiffusion evaluate --config <the selected arm's config with samples -> the control>

The difference selected(samples) - selected(control), paired over seeds, is what the generator adds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", required=True, help="a finished sample directory made with strength < 1")
    ap.add_argument("--data", required=True, help="the prepared target dataset the init tiles come from")
    ap.add_argument("--out", required=True, help="the control sample directory to write")
    args = ap.parse_args()

    from PIL import Image

    from histodiffusion.core.transforms import dihedral
    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.runtime.fileio import read_csv, write_csv_atomic

    src, out = Path(args.samples), Path(args.out)
    rows = read_csv(src / "samples.csv", ["id", "file", "target", "target_index", "init_id", "init_dihedral"], "samples.csv")
    if not rows or not all(r["init_id"] for r in rows):
        sys.exit(f"{src}/samples.csv: every sample must name its init tile (made with strength < 1)")
    if (out / "samples.csv").is_file():
        sys.exit(f"{out} exists already")
    ds = PixelDataset(args.data, ids=sorted({r["init_id"] for r in rows}))
    where = {r["id"]: i for i, r in enumerate(ds.rows)}
    (out / "images").mkdir(parents=True, exist_ok=True)
    control = []
    for r in rows:
        img = dihedral(ds.uint8(where[r["init_id"]]), int(r["init_dihedral"]), dims=(0, 1))
        Image.fromarray(np.ascontiguousarray(img.numpy())).save(out / r["file"])
        control.append({"id": r["id"], "file": r["file"], "target": r["target"], "target_index": r["target_index"],
                        "init_id": r["init_id"], "init_dihedral": r["init_dihedral"]})
    write_csv_atomic(out / "samples.csv", control, list(control[0]))
    print(f"wrote {len(control)} starting tiles of {src} to {out}")


if __name__ == "__main__":
    main()
