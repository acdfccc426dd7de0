"""Guided synthesis benchmark: speed (samples/s) vs class fidelity, per sampler setting (run by hand).

Settings: the reference's DDIM 50 steps, eta 1, guidance at every step, versus DPM-Solver++ at 10
and 20 steps, each with and without a guidance window. Class fidelity = share of samples that a
classifier trained on REAL labeled data (not the latent classifier that guided them) assigns to the
target class, with a 95% Wilson interval. The speed ratio is reported for the fastest setting whose
fidelity is at least the reference's minus --tolerance ("equal fidelity"); goal >= 2.5x.

Needs trained models, e.g. a `histodiffusion run` directory:
    <run>/ldm/model  <run>/adapt/latent_classifier/model  [<run>/adapt/decoder/model/vae]  <run>/data/target

    .venv/bin/python bench/synthesis.py --run runs/default --n-per-class 32
    .venv/bin/python bench/synthesis.py --model M --classifier C --data D [--real-classifier R]

The real-data judge is --real-classifier (a folder written by models.classifier.save_classifier), else a
small_cnn trained here on --data's --judge-subset split (default train: all real labels) and cached in --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETTINGS = [  # name, scheduler, steps, eta, windowed
    ("ddim50_eta1_full", "ddim", 50, 1.0, False),
    ("dpm++20_full", "dpmsolver++", 20, 0.0, False),
    ("dpm++10_full", "dpmsolver++", 10, 0.0, False),
    ("dpm++20_window", "dpmsolver++", 20, 0.0, True),
    ("dpm++10_window", "dpmsolver++", 10, 0.0, True),
]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def train_judge(data: str, subset: str, out: Path, steps: int, seed: int = 0):
    """small_cnn on real labeled tiles (class-balanced batches, dihedral augmentation); saved to `out`."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from histodiffusion.adapt import _pixel_batch, balanced_batch, step_generator
    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.models.classifier import build_classifier, load_classifier, save_classifier

    if (out / "classifier.json").is_file():
        return load_classifier(out)
    ds = PixelDataset(data, subset)
    labels = np.array([ds.label_index(i) for i in range(len(ds))])
    by_class = [np.flatnonzero(labels == c) for c in range(len(ds.classes))]
    size = int(ds[0][0].shape[-1])
    torch.manual_seed(seed)
    clf = build_classifier("small_cnn", len(ds.classes), size)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    clf.train()
    t0 = time.time()
    for step in range(steps):
        g = step_generator(seed, step, 0)
        x, y = _pixel_batch(ds, balanced_batch(by_class, 64, g), g)
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    val = PixelDataset(data, "val")
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val), 128):
            x, y = _pixel_batch(val, range(i, min(i + 128, len(val))))
            correct += int((clf(x).argmax(-1) == y).sum())
    acc = correct / len(val)
    print(f"judge: small_cnn on {len(ds)} real tiles ({subset}), {steps} steps in {time.time() - t0:.0f}s, "
          f"val accuracy {acc:.3f}")
    save_classifier(clf, out, {"name": "small_cnn", "classes": ds.classes, "image_size": size,
                               "trained_on": f"{data}:{subset}", "val_accuracy": acc})
    return load_classifier(out)


def judge_predictions(judge, info, images, classes):
    """Judge's class names for uint8 images [N, H, W, 3] (resized to its input size if needed)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    size = int(info["image_size"])
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        pred = torch.cat([judge(x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return [info["classes"][int(p)] for p in pred]


def run_setting(name, cfg, window, m, plan, judge, jinfo, classes, batch_size) -> dict:
    """Time the synthesis of every planned sample with one setting; judge the decoded images."""
    import numpy as np

    from histodiffusion.sample import generate

    generate(plan[:min(len(plan), 4)], m, cfg, window)  # warm-up
    t0 = time.perf_counter()
    images, conf = [], []
    for b in range(0, len(plan), batch_size):
        rows, ims = generate(plan[b:b + batch_size], m, cfg, window)
        images.append(ims)
        conf += [float(r["confidence"]) for r in rows]
    secs = time.perf_counter() - t0
    preds = judge_predictions(judge, jinfo, np.concatenate(images), classes)
    hits = sum(pr == it["target"] for pr, it in zip(preds, plan))
    return {"setting": name, "scheduler": cfg.scheduler, "steps": cfg.steps, "eta": cfg.eta, "window": list(window),
            "samples": len(plan), "seconds": secs, "samples_per_s": len(plan) / secs,
            "fidelity": hits / len(plan), "fidelity_ci95": wilson(hits, len(plan)),
            "latent_confidence": float(np.mean(conf)),
            "per_class": {c: sum(pr == c for pr, it in zip(preds, plan) if it["target"] == c)
                          / max(1, sum(it["target"] == c for it in plan)) for c in classes}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="", help="a `histodiffusion run` directory (fills the paths below)")
    p.add_argument("--model", default="", help="exported LDM folder")
    p.add_argument("--classifier", default="", help="latent classifier folder")
    p.add_argument("--vae", default="", help="decoder (default: the run's fine-tuned one if present, else model/vae)")
    p.add_argument("--data", default="", help="prepared labeled target dataset (for the judge)")
    p.add_argument("--real-classifier", default="", help="saved real-data classifier (else one is trained)")
    p.add_argument("--judge-subset", default="train")
    p.add_argument("--judge-steps", type=int, default=600)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "synthesis"))
    p.add_argument("--n-per-class", type=int, default=32)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--window", default="0,600", help="guidance window lo,hi for the *_window settings")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--tolerance", type=float, default=0.02, help="'equal fidelity': >= reference - tolerance")
    p.add_argument("--settings", default="", help="comma-separated subset of the setting names")
    args = p.parse_args()

    import torch

    from histodiffusion.config import SampleConfig
    from histodiffusion.sample import load_models, plan_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run) if args.run else None
    model = args.model or (str(run / "ldm" / "model") if run else "")
    classifier = args.classifier or (str(run / "adapt" / "latent_classifier" / "model") if run else "")
    vae = args.vae or (str(run / "adapt" / "decoder" / "model" / "vae")
                       if run and (run / "adapt" / "decoder" / "model" / "vae").is_dir() else "")
    data = args.data or (str(run / "data" / "target") if run else "")
    if not (model and classifier and (data or args.real_classifier)):
        p.error("give --run, or --model, --classifier and --data/--real-classifier")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from histodiffusion.models.classifier import load_classifier

    judge, jinfo = (load_classifier(args.real_classifier) if args.real_classifier
                    else train_judge(data, args.judge_subset, out / "judge", args.judge_steps))
    lo, hi = (int(v) for v in args.window.split(","))
    base = SampleConfig(model=model, classifier=classifier, vae=vae, out=str(out), n_per_class=args.n_per_class,
                        scale=args.scale, batch_size=args.batch_size)
    m = load_models(base)
    classes = list(m["info"]["classes"])
    if sorted(classes) != sorted(jinfo["classes"]):
        raise SystemExit(f"judge classes {jinfo['classes']} differ from the latent classifier's {classes}")
    plan = plan_samples(base, classes)
    wanted = set(args.settings.split(",")) if args.settings else None
    results = []
    for name, sched, steps, eta, windowed in SETTINGS:
        if wanted and name not in wanted:
            continue
        window = (lo, hi) if windowed else (0, 0)
        cfg = dataclasses.replace(base, scheduler=sched, steps=steps, eta=eta, guidance_window=window)
        res = run_setting(name, cfg, window, m, plan, judge, jinfo, classes, args.batch_size)
        results.append(res)
        ci = res["fidelity_ci95"]
        print(f"{name:18s} {res['samples_per_s']:7.2f} samples/s  fidelity {res['fidelity']:.3f} "
              f"[{ci[0]:.3f}, {ci[1]:.3f}]  latent conf {res['latent_confidence']:.3f}", flush=True)
    ref = next((r for r in results if r["setting"] == "ddim50_eta1_full"), None)
    summary = {"scale": args.scale, "n_per_class": args.n_per_class, "window": [lo, hi], "results": results,
               "threads": torch.get_num_threads()}
    if ref:
        equal = [r for r in results if r is not ref and r["fidelity"] >= ref["fidelity"] - args.tolerance]
        best = max(equal, key=lambda r: r["samples_per_s"], default=None)
        chance = 1 / len(classes)
        summary["reference_above_chance"] = ref["fidelity_ci95"][0] > chance
        if not summary["reference_above_chance"]:
            print(f"warning: the reference's fidelity {ref['fidelity']:.3f} is not above chance ({chance:.3f}): the "
                  f"models do not produce class-recognisable images, so 'equal fidelity' says nothing")
        summary["reference"] = ref["setting"]
        summary["best_at_equal_fidelity"] = best and best["setting"]
        summary["speed_ratio"] = best and best["samples_per_s"] / ref["samples_per_s"]
        if best:
            print(f"fastest at equal fidelity (>= {ref['fidelity']:.3f} - {args.tolerance}): {best['setting']}, "
                  f"{summary['speed_ratio']:.2f}x the reference ({'meets' if summary['speed_ratio'] >= 2.5 else 'misses'}"
                  f" the 2.5x goal)")
        else:
            print("no faster setting reaches the reference's fidelity")
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
