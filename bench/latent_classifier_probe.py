"""How much class signal can guidance get? Noise-aware latent classifier variants on a run's latents (by hand).

For one run directory (e.g. a bench/efficacy fraction) this prints
1. how far latent-space flips/rotations are from the latents of flipped/rotated images (the latent
   augmentation of train-latent-classifier assumes they are close),
2. the ceiling: a logistic regression on clean posterior-mean latents of the few-shot subset, and
3. validation accuracy per timestep bucket for latent-classifier variants (steps, width, augmentation),
   each trained by the real stage (`stages.latent_classifier.run`) into <out>/<variant>, next to the stage's
   image-space classifier trained on the same tiles with the same budget, and the ratio latent / image
   in the lowest-noise bucket (goal of issue 12: >= 0.9 at t < 250).

    .venv/bin/python bench/latent_classifier_probe.py --run bench/out/efficacy/frac0.05
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {  # name: overrides of the run's latent-classifier config
    "base_noaug": {"augment": False},
    "aug": {"augment": True},
    "aug_3x_steps": {"augment": True, "steps_factor": 3},
    "aug_3x_steps_w128": {"augment": True, "steps_factor": 3, "width": 128},
}


def equivariance_error(run: Path, n: int = 64) -> dict[str, float]:
    """Mean ||E(T x) - T E(x)|| / ||E(x)|| over the 7 non-identity dihedral transforms T."""
    import torch

    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.core.transforms import DIHEDRAL, dihedral
    from histodiffusion.models.autoencoder import load_vae

    vae = load_vae(run / "ae" / "model" / "vae")
    ds = PixelDataset(run / "data" / "target", "val")
    x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        errs = []
        for k in range(1, DIHEDRAL):
            zk = vae.encode(dihedral(x, k)).latent_dist.mean
            errs.append(float((zk - dihedral(z, k)).norm() / z.norm()))
        other = vae.encode(x.roll(1, dims=0)).latent_dist.mean  # a different image, for scale
    return {"relative_error_mean": sum(errs) / len(errs), "relative_error_max": max(errs),
            "different_image_relative_distance": float((other - z).norm() / z.norm())}


def clean_ceiling(run: Path, subset: str) -> float:
    """Validation accuracy of a logistic regression on flattened clean (mean) latents."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from histodiffusion.data.datasets import LatentDataset

    def xy(split):
        ds = LatentDataset(run / "cache" / "target", split, sample=False)
        return np.stack([ds[i][0].numpy().ravel() for i in range(len(ds))]), ds.labels()

    xt, yt = xy(subset)
    xv, yv = xy("val")
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(xt, yt)
    return float((clf.predict(xv) == yv).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (data/, ae/, cache/, ldm/, adapt/)")
    p.add_argument("--out", default="", help="where variants are trained (default: <run>/probe_latent_classifier)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()

    from histodiffusion.stages import latent_classifier
    from histodiffusion.runtime.config import LatentClassifierConfig
    from histodiffusion.runtime.fileio import read_json

    run = Path(args.run)
    out = Path(args.out) if args.out else run / "probe_latent_classifier"
    base = read_json(run / "adapt" / "latent_classifier" / "config.json")["config"]
    base = {k: (tuple(v) if isinstance(v, list) else v) for k, v in base.items()}
    print("equivariance of the encoder:", json.dumps(equivariance_error(run)))
    print(f"clean-latent logistic regression, val accuracy: {clean_ceiling(run, base['subset']):.3f}")
    rows = []
    for name in args.variants.split(","):
        ov = dict(VARIANTS[name])
        factor = ov.pop("steps_factor", 1)
        cfg = dataclasses.replace(LatentClassifierConfig(**base), out=str(out / name), steps=base["steps"] * factor,
                                  checkpoint_every=10**9, **ov)
        t0 = time.time()
        latent_classifier.run(cfg)
        m = read_json(out / name / "metrics.json")
        rows.append((name, cfg.steps, cfg.width, cfg.augment, m["val_accuracy_by_t"], m.get("image_classifier"),
                     m.get("goal"), time.time() - t0))
    buckets = list(rows[0][4]) if rows else []
    print("| variant | steps | width | augment | " + " | ".join(f"val acc t in {b}" for b in buckets)
          + " | image classifier val acc | ratio (lowest t) | s |")
    print("|---|---:|---:|---|" + "---:|" * (len(buckets) + 3))
    for name, steps, width, aug, by_t, image, goal, sec in rows:
        img = f"{image['val_accuracy']:.3f}" if image else "–"
        ratio = f"{goal['ratio']:.2f} ({'met' if goal['met'] else 'missed'})" if goal and goal["ratio"] is not None \
            else "–"
        print(f"| {name} | {steps} | {width} | {aug} | " + " | ".join(f"{by_t[b]:.3f}" for b in buckets)
              + f" | {img} | {ratio} | {sec:.0f} |")


if __name__ == "__main__":
    main()
