"""Realism of a pretrained base's unconditional samples (run by hand; issue 11's realism table).

Feature space (fixed, documented): a small CNN (`small_cnn_w16`, trained from scratch) that tells the
pretraining sources apart, trained on the training split of the prepared unlabeled datasets (never on
their held-out groups); its penultimate features are the space for FD and k-NN precision / recall.
The FD ratio depends on which such network one draws (v1 measured 2.56x in one and 1.70x in another), so
the classifier's initialisation and data order are seeded and the figures are reported for each of
`--feature-seeds` (default 0,1,2) and their mean. Samples are cached per model in --out, so a second
feature seed or a re-run does not sample again.

Compared, each against the held-out real tiles of those datasets:
  samples   N unconditional samples of the base (DDIM, eta 0, per-sample seeds), decoded
  recon     the base autoencoder's reconstructions of the held-out tiles: the ceiling a sample can reach
  real/2    one half of the held-out tiles against the other: the floor of the metrics at this N

and writes a grid (samples | real held-out tiles) for the README.

    .venv/bin/python bench/base_realism.py --base src/histodiffusion/base/histodiffusion-base-64 \
        --data bench/out/base/data/colon,bench/out/base/data/osteo,bench/out/base/data/he --grid docs/base_samples.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def load_tiles(dirs: list[str], subset: str) -> tuple[torch.Tensor, torch.Tensor]:
    from histodiffusion.data.datasets import PixelDataset

    imgs, labels = [], []
    for k, d in enumerate(dirs):
        ds = PixelDataset(d, subset)
        imgs += [ds.uint8(i) for i in range(len(ds))]
        labels += [k] * len(ds)
    return torch.stack(imgs), torch.tensor(labels)


def source_classifier(dirs: list[str], out: Path, steps: int, seed: int):
    from histodiffusion.models.classifier import build_classifier, load_classifier, save_classifier, train_classifier

    d = out / f"source_classifier_{steps}_s{seed}"
    if (d / "classifier.json").is_file():
        return load_classifier(d)[0]
    x, y = load_tiles(dirs, "all")
    torch.manual_seed(seed)  # the initialisation: one fixed network per feature seed
    model = build_classifier("small_cnn_w16", len(dirs), x.shape[1])
    train_classifier(model, x, y, steps=steps, batch_size=64, lr=1e-3, seed=seed, augment=True,
                     desc="source classifier", show_progress=False)
    save_classifier(model, d, {"name": "small_cnn_w16", "classes": [Path(p).name for p in dirs],
                               "num_classes": len(dirs), "image_size": int(x.shape[1]), "steps": steps, "seed": seed})
    return model


def model_id(base: Path) -> str:
    """Short id of a base (the sha256 of its checksums.json, as verify_base gives it) or of pretrain's model
    folder (its EMA UNet weights)."""
    from histodiffusion.runtime.fileio import sha256_file

    f = base / "checksums.json"
    if not f.is_file():
        f = base / "unet_ema" / "diffusion_pytorch_model.safetensors"
    return sha256_file(f)[:12]


def cached_samples(base: Path, n: int, steps: int, seed: int, out: Path) -> tuple[np.ndarray, float]:
    """The base's unconditional samples, computed once per (model, n, steps, seed) and kept in out."""
    f = out / f"samples_{model_id(base)}_{n}_{steps}_{seed}.npz"
    if f.is_file():
        z = np.load(f)
        return z["samples"], float(z["seconds"])
    t0 = time.time()
    samples = unconditional_samples(base, n, steps, seed)
    seconds = time.time() - t0
    from histodiffusion.runtime.fileio import atomic_path

    with atomic_path(f) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, samples=samples, seconds=seconds)
    return samples, seconds


@torch.no_grad()
def unconditional_samples(base: Path, n: int, steps: int, seed: int, batch: int = 32) -> np.ndarray:
    from histodiffusion.models.unet import load_ldm
    from histodiffusion.diffusers_pipeline import decode_uint8, guided_sample
    from histodiffusion.diffusers_pipeline import make_scheduler
    from histodiffusion.core.seeds import sample_seed

    m = load_ldm(base)
    from histodiffusion.runtime.latent_space import of_model

    unet, vae, sf = m["unet"], m["vae"], of_model(base).scaling_factor  # the base's latent-space record
    c, s = unet.config.in_channels, unet.config.sample_size
    out = []
    for b in range(0, n, batch):
        ids = range(b, min(n, b + batch))
        gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in ids]
        noise = torch.stack([torch.randn((c, s, s), generator=g) for g in gens])
        z = guided_sample(unet, None, make_scheduler("ddim", m["scheduler"].config), noise,
                          torch.zeros(len(gens), dtype=torch.long), gens, steps=steps, scale=0.0)
        out.append(decode_uint8(vae, z, sf))
        print(f"  sampled {min(n, b + batch)}/{n}", flush=True)
    return np.concatenate(out)


def scores(extractor, real: torch.Tensor, fake: torch.Tensor) -> dict:
    from histodiffusion.core.metrics import extract_features, frechet_distance, precision_recall

    fd = frechet_distance(extractor, fake.permute(0, 3, 1, 2), real.permute(0, 3, 1, 2))
    pr = precision_recall(extract_features(extractor, real.permute(0, 3, 1, 2)),
                          extract_features(extractor, fake.permute(0, 3, 1, 2)))
    return {"fd": fd, "precision": pr["precision"], "recall": pr["recall"], "n_real": len(real), "n_fake": len(fake)}


def save_pair_grid(samples: np.ndarray, real: torch.Tensor, path: Path, n: int = 16, scale: int = 2) -> None:
    """One PNG: n samples (left block) | n real held-out tiles (right block), 4 per row, upscaled."""
    from PIL import Image

    def block(imgs):
        rows = [np.concatenate(list(imgs[r * 4:(r + 1) * 4]), axis=1) for r in range(len(imgs) // 4)]
        return np.concatenate(rows, axis=0)

    rng = np.random.default_rng(0)
    pick = rng.choice(len(real), size=n, replace=False)
    left, right = block(samples[:n]), block(real.numpy()[pick])
    gap = np.full((left.shape[0], 8, 3), 255, np.uint8)
    img = Image.fromarray(np.concatenate([left, gap, right], axis=1))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a base folder (or pretrain's model folder)")
    p.add_argument("--data", required=True, help="comma-separated prepared unlabeled datasets with a holdout split")
    p.add_argument("--n", type=int, default=0, help="samples (default: as many as held-out tiles)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--classifier-steps", type=int, default=800)
    p.add_argument("--feature-seeds", default="0,1,2", help="one source classifier (feature space) per seed")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--grid", default="", help="also write a samples | real grid PNG here")
    p.add_argument("--out", default="bench/out/base_realism")
    args = p.parse_args()

    from histodiffusion.models.autoencoder import load_vae, roundtrip_uint8
    from histodiffusion.models.classifier import FeatureExtractor

    dirs = args.data.split(",")
    out = Path(args.out)
    base = Path(args.base)
    held, _ = load_tiles(dirs, "holdout")
    n = args.n or len(held)
    samples, t_sample = cached_samples(base, n, args.steps, args.seed, out)
    samples = torch.from_numpy(samples)
    recon = roundtrip_uint8(load_vae(base / "vae"), held)[0]
    half = len(held) // 2
    perm = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))
    res = {"base": str(base), "model_id": model_id(base), "sampling_seconds": round(t_sample, 1),
           "ddim_steps": args.steps, "per_feature_seed": {}}
    print("| feature seed | compared with held-out real tiles | FD | precision | recall |\n|---|---|---:|---:|---:|")
    for fs in (int(v) for v in args.feature_seeds.split(",")):
        extractor = FeatureExtractor(source_classifier(dirs, out, args.classifier_steps, fs))
        r = {"samples": scores(extractor, held, samples), "recon": scores(extractor, held, recon),
             "real_half": scores(extractor, held[perm[:half]], held[perm[half:]])}
        r["fd_ratio_samples_over_recon"] = r["samples"]["fd"] / max(1e-9, r["recon"]["fd"])
        res["per_feature_seed"][str(fs)] = r
        for k in ("samples", "recon", "real_half"):
            print(f"| {fs} | {k} ({r[k]['n_fake']} vs {r[k]['n_real']}) | {r[k]['fd']:.1f} | {r[k]['precision']:.2f} | "
                  f"{r[k]['recall']:.2f} |")
    per = list(res["per_feature_seed"].values())
    res["mean"] = {k: {m: float(np.mean([r[k][m] for r in per])) for m in ("fd", "precision", "recall")}
                   for k in ("samples", "recon", "real_half")}
    res["mean"]["fd_ratio_samples_over_recon"] = float(np.mean([r["fd_ratio_samples_over_recon"] for r in per]))
    (out / f"results_{res['model_id']}.json").write_text(json.dumps(res, indent=1))
    m = res["mean"]
    print(f"mean over {len(per)} feature seeds: samples FD {m['samples']['fd']:.1f} precision {m['samples']['precision']:.2f} "
          f"recall {m['samples']['recall']:.2f}; recon FD {m['recon']['fd']:.1f}; FD ratio "
          f"{m['fd_ratio_samples_over_recon']:.2f} (per seed: "
          f"{', '.join(format(r['fd_ratio_samples_over_recon'], '.2f') for r in per)}); sampling {t_sample:.0f}s")
    if args.grid:
        save_pair_grid(samples.numpy(), held, Path(args.grid))
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
