"""Does a sample folder's exported pipeline remake its images? (run by hand; the unit tests check the same on tiny
models, this on a real run's)

Loads `<samples>/pipeline` with diffusers' `DiffusionPipeline.from_pretrained` (histodiffusion only registers the
pipeline class), takes every k-th row of samples.csv and calls the pipeline with each sample's seed and target and
the folder's sampling record (steps, guidance scale and window, eta, strength, detail, color_match; the scheduler
is the folder's). Samples started from real tiles (strength < 1) are given their starting tiles, turned by
`init_dihedral`, as `image=`: once with the tiles' cached latents (turned the same way) as `init_latents=`, the
stage's own inputs, and once with the tiles alone, which the pipeline encodes itself. Reports, per way, how many
images are identical to the PNGs and the largest and mean pixel difference; for tile-started samples also how
often `read_classes` on the tiles gives the sample's target (the latent classifier's reading the run started them
from).

    .venv/bin/python bench/pipeline_remake.py --samples bench/out/efficacy_ul_f5d0/samples_detp --n 24
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", required=True, help="a finished sample directory (samples.csv, pipeline/)")
    ap.add_argument("--n", type=int, default=24, help="how many samples, spread evenly over samples.csv")
    ap.add_argument("--cache", default="", help="the latent cache of the starting tiles (default: the latent "
                    "classifier's cache named in the pipeline record)")
    args = ap.parse_args()

    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    import histodiffusion.diffusers_pipeline  # noqa: F401  (registers HistoDiffusionPipeline with diffusers)
    from histodiffusion.core.transforms import dihedral
    from histodiffusion.data.datasets import LatentDataset, PixelDataset

    samples = Path(args.samples)
    with open(samples / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = rows[:: max(1, len(rows) // args.n)][: args.n]
    record = json.loads((samples / "pipeline" / "histodiffusion.json").read_text())
    s = record["sampling"]
    pipe = DiffusionPipeline.from_pretrained(str(samples / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    want = np.stack([np.asarray(Image.open(samples / r["file"]).convert("RGB")) for r in rows]).astype(np.int16)
    kw = {"class_labels": [r["target"] for r in rows], "guidance_scale": float(s["scale"]),
          "num_inference_steps": int(s["steps"]), "guidance_window": tuple(s["guidance_window"]),
          "eta": float(s["eta"]), "output_type": "np"}
    ways = {}
    tiles = None
    if float(s["strength"]) < 1:
        cache = args.cache or record["classifier_cache"]
        lat = LatentDataset(cache, "all", sample=False)
        at = {r["id"]: j for j, r in enumerate(lat.rows)}
        px = PixelDataset(json.loads((Path(cache) / "meta.json").read_text())["dataset"],
                          ids=sorted({r["init_id"] for r in rows}))
        pos = {r["id"]: j for j, r in enumerate(px.rows)}
        k = [int(r["init_dihedral"]) for r in rows]
        z = torch.stack([dihedral(lat[at[r["init_id"]]][0], t) for r, t in zip(rows, k)])
        tiles = np.stack([dihedral(px.uint8(pos[r["init_id"]]), t, dims=(0, 1)).numpy() for r, t in zip(rows, k)])
        kw.update(strength=float(s["strength"]), image=tiles, detail=s.get("detail") == "tile",
                  color_match=s.get("color_match") == "tile")
        ways["image + cached init_latents"] = {"init_latents": z}
        ways["image alone (encoded by the pipeline)"] = {}
    else:
        ways["from noise"] = {}
    print(f"{samples}: {len(rows)} samples; sampling record {s}")
    for name, extra in ways.items():
        gens = [torch.Generator().manual_seed(int(r["seed"])) for r in rows]
        got = np.rint(pipe(generator=gens, **kw, **extra).images * 255).astype(np.int16)
        d = np.abs(got - want)
        same = int((d.reshape(len(rows), -1).max(1) == 0).sum())
        print(f"  {name}: {same} of {len(rows)} identical; largest difference {int(d.max())} grey levels, "
              f"mean {d.mean():.4f}")
    if tiles is not None:
        names, _ = pipe.read_classes(image=tiles)
        agree = sum(n == r["target"] for n, r in zip(names, rows))
        print(f"  read_classes(image=tiles) gives the sample's target for {agree} of {len(rows)}")


if __name__ == "__main__":
    main()
