"""Noise floor of the downstream harness (run by hand; not part of CI).

Trains the real-only downstream classifier on one few-shot subset with many seeds under several harness
variants (weight averaging, test-time augmentation, validation checkpoint choice, classic augmentation)
and reports, per variant, the seed-to-seed spread of test accuracy and the A/A interval: seeds 0..k-1
paired with seeds k..2k-1, exactly like evaluate's `real_aa` arm, 95% t-interval of the paired deltas.
The harness whose A/A interval is narrowest at an equal budget is the one to evaluate arms with.

    .venv/bin/python bench/harness_noise.py --data bench/out/lung64 --subset frac0.05 --pairs 5

Every (variant, seed) result is kept in <out>/runs/<variant>_<seed>.json, so a killed run resumes.
Writes <out>/results.md and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# name -> (ema_decay, tta, val_every, classic augmentation)
VARIANTS = {
    "plain_bestval": (0.0, False, 50, False),   # the harness of the last benchmark
    "ema_bestval": (0.99, False, 50, False),
    "ema_last": (0.99, False, 0, False),
    "ema_bestval_tta": (0.99, True, 50, False),
    "aug_ema_bestval_tta": (0.99, True, 50, True),
    "aug_plain_bestval": (0.0, False, 50, True),
    "plain_last": (0.0, False, 0, False),
    "ema_last_tta": (0.99, True, 0, False),
    "aug_ema_last_tta": (0.99, True, 0, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared labeled dataset (histodiffusion prepare)")
    p.add_argument("--subset", default="frac0.05")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--pairs", type=int, default=5, help="A/A pairs: 2 x pairs seeds per variant")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone", default="small_cnn_w16")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "harness_noise"))
    p.add_argument("--reverse", action="store_true",
                   help="train the seeds from the last one down: a second process started with it shares the work "
                        "with one started without (each skips the seeds whose result file exists)")
    args = p.parse_args()

    from histodiffusion.data.evaldata import load_real
    from histodiffusion.stages.evaluate import score
    from histodiffusion.core.metrics import mean_ci
    from histodiffusion.models.classifier import build_classifier, train_classifier
    from histodiffusion.runtime.distributed import seed_everything
    from histodiffusion.runtime.fileio import write_json_atomic

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    real, val, test = (load_real(args.data, s) for s in (args.subset, "val", "test"))
    print(f"{args.subset}: {len(real)} tiles, val {len(val)}, test {len(test)}; {args.steps} steps x {args.batch_size}")

    def accuracy(model, tiles, tta):  # the metric evaluate scores test tiles with
        return score(model, tiles, tta)["accuracy"]

    results: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for name in args.variants.split(","):
        ema, tta, val_every, aug = VARIANTS[name]
        seeds = list(range(2 * args.pairs))
        for seed in reversed(seeds) if args.reverse else seeds:
            f = out / "runs" / f"{name}_{seed}.json"
            if not f.is_file():
                t0 = time.time()
                seed_everything(seed)
                model = build_classifier(args.backbone, len(real.classes), int(real.images.shape[1]))
                train_classifier(model, real.images, real.labels, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, seed=seed, augment=aug, show_progress=False, ema_decay=ema,
                                 validate=(lambda m: {"accuracy": accuracy(m, val, tta)}) if val_every else None,
                                 val_every=val_every)
                write_json_atomic(f, {"variant": name, "seed": seed, "test_accuracy": accuracy(model, test, tta),
                                      "seconds": time.time() - t0})
        accs = []
        for seed in seeds:
            f = out / "runs" / f"{name}_{seed}.json"
            if not f.is_file():  # the other process of a --reverse pair is still training it
                raise SystemExit(f"{f} is missing: the other process has not finished; re-run to write the table")
            rec = json.loads(f.read_text())
            accs.append(rec["test_accuracy"])
            seconds[name] = seconds.get(name, 0.0) + rec["seconds"]
            print(f"{name} seed {seed}: {rec['test_accuracy']:.4f} ({rec['seconds']:.0f} s)", flush=True)
        results[name] = accs

    lines = [f"Real-only `{args.backbone}` on `{args.subset}` ({len(real)} tiles) of `{args.data}`, {args.steps} steps x "
             f"{args.batch_size}, lr {args.lr:g}; test {len(test)} tiles of unseen groups. A/A: seeds 0..{args.pairs - 1} "
             f"paired with {args.pairs}..{2 * args.pairs - 1}.", "",
             "| variant | EMA | TTA | checkpoint | classic aug | test accuracy mean | seed std | A/A delta [95% CI] | half-width | s per classifier |",
             "|---|---|---|---|---|---:|---:|---|---:|---:|"]
    for name, accs in results.items():
        ema, tta, val_every, aug = VARIANTS[name]
        a = np.array(accs)
        d = a[:args.pairs] - a[args.pairs:]
        ci = mean_ci(d)
        m, (lo, hi) = ci["mean"], ci["ci95"]
        lines.append(f"| {name} | {ema or '-'} | {'8 views' if tta else '-'} | {'best val' if val_every else 'last'} | "
                     f"{'yes' if aug else '-'} | {a.mean():.4f} | {a.std(ddof=1):.4f} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                     f"{(hi - lo) / 2:.4f} | {seconds[name] / len(accs):.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
