"""Wall time of one downstream classifier of the efficacy harness, by memory layout (run by hand; not in CI).

Trains the benchmark's classifier (evaluate's budget: small_cnn_w16, 500 steps of 64 tiles with classic
augmentation, best-validation checkpoint every 50 steps) on one few-shot subset, once with the model and
batches channels-last (train_classifier's default: oneDNN's fast convolution path on CPU) and once in the
default contiguous layout, with the same seeds, and reports seconds per classifier and test accuracy per
layout. Run it on an otherwise idle machine; --threads is the torch thread count (evaluate runs one
classifier per process, one process per core: --threads 1).

    .venv/bin/python bench/harness_speed.py --data <run>/data/target --subset frac0.05 --seeds 0,1

Writes <out>/results.md and prints it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared labeled dataset (histodiffusion prepare)")
    p.add_argument("--subset", default="frac0.05")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--backbone", default="small_cnn_w16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "harness_speed"))
    args = p.parse_args()

    import torch

    from histodiffusion.data.evaldata import load_real
    from histodiffusion.models.classifier import build_classifier, train_classifier
    from histodiffusion.runtime.distributed import seed_everything
    from histodiffusion.runtime.fileio import write_text_atomic
    from histodiffusion.stages.evaluate import score, val_record

    torch.set_num_threads(args.threads)
    real, val, test = (load_real(args.data, s) for s in (args.subset, "val", "test"))
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        for channels_last in (True, False):
            seed_everything(seed)
            model = build_classifier(args.backbone, len(real.classes), int(real.images.shape[1]))
            t0 = time.perf_counter()
            train_classifier(model, real.images, real.labels, steps=args.steps, batch_size=args.batch_size,
                             lr=1e-3, seed=seed, augment=True, show_progress=False,
                             validate=lambda m: val_record(m, val), val_every=args.val_every,
                             channels_last=channels_last)
            seconds = time.perf_counter() - t0
            acc = score(model, test)["accuracy"]
            rows.append((seed, "channels_last" if channels_last else "contiguous", seconds, acc))
            print(f"seed {seed} {rows[-1][1]}: {seconds:.1f} s, test accuracy {acc:.3f}", flush=True)
    lines = [f"# One downstream classifier: {args.backbone}, {args.steps} steps x {args.batch_size}, validation "
             f"every {args.val_every} on {len(val)} tiles, {len(real)} training tiles ({args.subset}), "
             f"{args.threads} thread(s)", "", "| seed | layout | seconds | test accuracy |", "|---|---|---:|---:|"]
    lines += [f"| {s} | {lay} | {sec:.1f} | {acc:.3f} |" for s, lay, sec, acc in rows]
    mean = {lay: sum(r[2] for r in rows if r[1] == lay) / len(seeds) for lay in ("channels_last", "contiguous")}
    lines += [f"\n{lay}: mean {sec:.1f} s per classifier" for lay, sec in mean.items()]
    lines.append(f"\nspeed-up of channels_last: {mean['contiguous'] / mean['channels_last']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
