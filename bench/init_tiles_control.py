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

`--roundtrip VAE` writes, instead of the raw tile, its round trip through autoencoder VAE (a save_pretrained
folder) as `evaluate`'s roundtrip arm makes it (models.autoencoder.roundtrip_uint8: posterior mean, turned by
`init_dihedral` in latent space, decoded). That arm always uses the samples' own autoencoder
(`<samples>/pipeline/vae`); this control takes any other one, e.g. the base's `vae/` before decoder fine-tuning,
to evaluate with the samples' own keep-list (the evaluate config with `samples` -> the control, `selection`
unchanged): what the decoder fine-tuning is worth on the very tiles the samples start from.
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
    ap.add_argument("--roundtrip", default="", help="an autoencoder folder: write the tiles' round trip through it "
                    "instead of the raw tiles")
    args = ap.parse_args()

    from PIL import Image

    from histodiffusion.runtime.fileio import read_csv, write_csv_atomic

    src, out = Path(args.samples), Path(args.out)
    rows = read_csv(src / "samples.csv", ["id", "file", "target", "target_index", "init_id", "init_dihedral"], "samples.csv")
    if not rows or not all(r["init_id"] for r in rows):
        sys.exit(f"{src}/samples.csv: every sample must name its init tile (made with strength < 1)")
    if (out / "samples.csv").is_file():
        sys.exit(f"{out} exists already")
    ids = sorted({r["init_id"] for r in rows})
    tile = (roundtrip(args.roundtrip, args.data, {(r["init_id"], int(r["init_dihedral"])) for r in rows})
            if args.roundtrip else raw(args.data, ids))
    (out / "images").mkdir(parents=True, exist_ok=True)
    control = []
    for r in rows:
        img = tile(r["init_id"], int(r["init_dihedral"]))
        Image.fromarray(np.ascontiguousarray(img)).save(out / r["file"])
        control.append({"id": r["id"], "file": r["file"], "target": r["target"], "target_index": r["target_index"],
                        "init_id": r["init_id"], "init_dihedral": r["init_dihedral"]})
    write_csv_atomic(out / "samples.csv", control, list(control[0]))
    print(f"wrote {len(control)} starting tiles of {src} to {out}")


def raw(data: str, ids: list[str]):
    """(tile id, dihedral) -> the stored tile, turned: uint8 [H, W, 3]."""
    from histodiffusion.core.transforms import dihedral
    from histodiffusion.data.datasets import PixelDataset

    ds = PixelDataset(data, ids=ids)
    where = {r["id"]: i for i, r in enumerate(ds.rows)}
    return lambda tile_id, d: dihedral(ds.uint8(where[tile_id]), d, dims=(0, 1)).numpy()


def roundtrip(vae_dir: str, data: str, pairs: set[tuple[str, int]]):
    """(tile id, dihedral) -> the tile through autoencoder `vae_dir`, its latent turned: uint8 [H, W, 3]."""
    import torch

    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.models.autoencoder import load_vae, roundtrip_uint8

    pairs = sorted(pairs)
    ds = PixelDataset(data, ids=sorted({t for t, _ in pairs}))
    where = {r["id"]: i for i, r in enumerate(ds.rows)}
    recs, _ = roundtrip_uint8(load_vae(vae_dir), torch.stack([ds.uint8(where[t]) for t, _ in pairs]),
                              turns=[d for _, d in pairs])
    images = {p: rec.numpy() for p, rec in zip(pairs, recs)}
    return lambda tile_id, d: images[(tile_id, d)]


if __name__ == "__main__":
    main()
