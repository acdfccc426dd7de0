"""Which features label the target's unlabeled tiles best from a few labeled ones? (run by hand)

`run --start-from unlabeled` reads each unlabeled train tile's class from the latent classifier; at 1% of
the groups those pseudo-labels decide the result (BENCHMARKS.md). This probe fits a logistic regression on
the labeled subset in several frozen feature spaces of a latent cache and scores it on the test split and on
the unlabeled train tiles (labels read here for the measurement only):

- the clean latent (flattened posterior mean) and its spatial mean per channel;
- the pretrained UNet's internal features at timestep t (each down, mid and up block's output averaged
  over space, concatenated: "diffusion features"), the latent noised with a fixed seed.

Per subset and feature space: test accuracy, accuracy on the unlabeled train tiles, each class's recall
there, and the precision of the most confident half of each predicted class (what a top-share or
confidence selection would keep). Features are cached in --out.

    .venv/bin/python bench/pseudo_label_probe.py --cache <run>/cache/target --subsets frac0.05_d2,frac0.01_d1 \
        --timesteps 0,50,200 --out bench/out/pseudo_label_probe

With --runs instead, the pseudo-labellers a run has trained are scored on its unlabeled train tiles: the
latent classifier at t = 0 (`sample --init-labels classifier`), the image-space baseline of
train-latent-classifier on the pixels, and their mean (`--init-labels ensemble`): accuracy, recall per
class, and the precision of each class's `--top-ratio` x (labeled count) most confident tiles.

    .venv/bin/python bench/pseudo_label_probe.py --runs <run>,<run> --top-ratio 4
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def unet_features(unet, sched, z, t: int, batch: int = 256, seed: int = 0):
    """[N, D] block outputs of the UNet at timestep t, averaged over space (down, mid, up blocks)."""
    import torch

    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    grabbed: list = []
    hooks = [b.register_forward_hook(lambda m, i, o: grabbed.append((o[0] if isinstance(o, tuple) else o)
                                                                      .float().mean((2, 3))))
             for b in blocks]
    g = torch.Generator().manual_seed(seed)
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(z), batch):
                zb = z[i:i + batch]
                tt = torch.full((len(zb),), t, dtype=torch.long)
                zt = sched.add_noise(zb, torch.randn(zb.shape, generator=g), tt) if t > 0 else zb
                grabbed.clear()
                unet(zt, tt)
                out.append(torch.cat(grabbed, 1))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out).numpy()


def probe(name: str, X, y, labeled, test, unlabeled, classes: list[str]) -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(X[labeled], y[labeled])
    prob = clf.predict_proba(X)
    pred, conf = prob.argmax(1), prob.max(1)
    top_half = {}
    for c, cname in enumerate(classes):
        m = unlabeled & (pred == c)
        if m.any():
            keep = m & (conf >= np.quantile(conf[m], 0.5))
            top_half[cname] = round(float((y[keep] == c).mean()), 3)
    return {"features": name, "test": round(float((pred[test] == y[test]).mean()), 3),
            "unlabeled": round(float((pred[unlabeled] == y[unlabeled]).mean()), 3),
            "recall_unlabeled": {cname: round(float((pred[unlabeled & (y == c)] == c).mean()), 3)
                                 for c, cname in enumerate(classes)},
            "top_half_precision": top_half}


def score_runs(runs: list[str], top_ratio: float, eval_arms: list[str] = ()) -> list[dict]:
    """Each run's latent classifier (t = 0), image baseline and their mean on the run's unlabeled train tiles;
    with eval_arms, also the run's downstream classifiers of each arm (eval/classifiers/<arm>_<seed>): seed 0's
    and the mean of every seed's probabilities (the readers a second round of self-training would use)."""
    import numpy as np
    import torch

    from histodiffusion.data.datasets import LatentDataset
    from histodiffusion.models.latent_classifier import load_latent_classifier
    from histodiffusion.runtime.config import SampleConfig
    from histodiffusion.stages.sample import folder_probabilities, pool_pixels, pool_probabilities

    results = []
    for run in map(Path, runs):
        subset = json.loads((run / "config.json").read_text())["config"]["subset"]
        clf, info, _ = load_latent_classifier(run / "adapt" / "latent_classifier" / "model")
        ds = LatentDataset(run / "cache" / "target", "train", sample=False)
        classes = list(info["classes"])
        labeled = {r["id"] for r in LatentDataset(run / "cache" / "target", subset, sample=False).rows}
        pool = np.array([r["id"] not in labeled for r in ds.rows])
        y = np.array(ds.labels())[pool]
        n_labeled = np.bincount(np.array(ds.labels())[~pool], minlength=len(classes))
        images, directory = pool_pixels(ds, SampleConfig(init_labels="image"))  # read once for every image reader
        with torch.no_grad():  # each reader once; their mean is what init_labels=ensemble computes
            latent = pool_probabilities(ds, clf, classes, SampleConfig(init_labels="classifier"))
            image = folder_probabilities(str(run / "adapt" / "latent_classifier" / "image_baseline"), images, classes,
                                         directory)
        readers = {"latent classifier, t = 0": latent, "image baseline": image, "mean (ensemble)": (latent + image) / 2}
        for arm in eval_arms:
            folders = sorted((run / "eval" / "classifiers").glob(f"{arm}_*"))
            if not folders:
                raise SystemExit(f"{run}/eval/classifiers has no {arm}_<seed> folder")
            with torch.no_grad():
                each = [folder_probabilities(str(f), images, classes, directory) for f in folders]
            readers[f"downstream {folders[0].name}"] = each[0]
            readers[f"downstream {arm}, mean of {len(each)} seeds"] = sum(each) / len(each)
        for name, p in readers.items():
            p = p.numpy()[pool]
            pred = p.argmax(1)
            top = {}
            for c, cname in enumerate(classes):
                idx = np.where(pred == c)[0]
                idx = idx[np.argsort(-p[idx, c], kind="stable")][:round(top_ratio * n_labeled[c])]
                top[cname] = f"{int((y[idx] == c).sum())}/{len(idx)}"
            r = {"run": run.name, "subset": subset, "reader": name, "pool": int(pool.sum()),
                 "accuracy": round(float((pred == y).mean()), 3),
                 "recall": {cname: round(float((pred[y == c] == c).mean()), 3) for c, cname in enumerate(classes)},
                 f"top{top_ratio:g}x_correct": top}
            print(json.dumps(r), flush=True)
            results.append(r)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="latent cache of the labeled target (a run's cache/target)")
    p.add_argument("--subsets", help="comma-separated labeled subsets of the cache")
    p.add_argument("--runs", help="comma-separated run directories: score their trained pseudo-labellers instead")
    p.add_argument("--eval-arms", default="", help="with --runs: comma-separated arms (e.g. real,selected@4) whose "
                   "downstream classifiers in <run>/eval/classifiers are scored as readers too")
    p.add_argument("--top-ratio", type=float, default=4.0, help="with --runs: top-confidence count per class, "
                   "as a multiple of its labeled count")
    p.add_argument("--base", default=str(REPO / "src" / "histodiffusion" / "base" / "histodiffusion-base-64"),
                   help="base (or LDM folder) whose unet_ema and scheduler give the diffusion features")
    p.add_argument("--timesteps", default="0,50,200")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "pseudo_label_probe"))
    args = p.parse_args()
    if args.runs:
        results = score_runs(args.runs.split(","), args.top_ratio,
                             [a for a in args.eval_arms.split(",") if a])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "runs.json").write_text(json.dumps(results, indent=1))
        print(f"wrote {out / 'runs.json'}")
        return
    if not (args.cache and args.subsets):
        p.error("give --cache and --subsets, or --runs")

    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from histodiffusion.data.datasets import LatentDataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = LatentDataset(args.cache, "all", sample=False)
    z = torch.stack([ds[i][0] for i in range(len(ds))])  # scaled posterior means
    classes = list(ds.classes)
    y = np.array(ds.labels())
    split = np.array([r["split"] for r in ds.rows])
    ids = [r["id"] for r in ds.rows]
    base = Path(args.base)
    unet = UNet2DModel.from_pretrained(str(base / "unet_ema")).eval()
    sched = DDPMScheduler.from_pretrained(str(base / "scheduler"))
    spaces = {"clean latent, flattened": z.flatten(1).numpy(), "clean latent, channel means": z.mean((2, 3)).numpy()}
    for t in (int(v) for v in args.timesteps.split(",")):
        path = out / f"unet_t{t}.npy"
        if not path.is_file():
            np.save(path, unet_features(unet, sched, z, t))
        spaces[f"UNet blocks, t = {t}"] = np.load(path)
    results = []
    for subset in args.subsets.split(","):
        members = {r["id"] for r in LatentDataset(args.cache, subset, sample=False).rows}
        labeled = np.array([i in members for i in ids])
        unlabeled = (split == "train") & ~labeled
        for name, X in spaces.items():
            r = {"subset": subset, "n_labeled": int(labeled.sum()),
                 **probe(name, X, y, labeled, split == "test", unlabeled, classes)}
            print(json.dumps(r), flush=True)
            results.append(r)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
