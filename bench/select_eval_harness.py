"""Benchmark of the selection and evaluation harness on real data (run by hand; prints figures).

Needs ../shared/data/lc25000_lung. Builds (once) a 64 px dataset directly with DatasetWriter (split by
group 70/15/15 stratified by class, few-shot subset frac0.05 of the train groups) unless --data names
a prepared dataset. Then:

1. select, with stand-in "synthetic" samples whose answer is known: held-out validation tiles (new
   groups: should be kept, not flagged), exact copies of training tiles and 90-degree rotations of
   training tiles (same group: near-copies; should be flagged memorized), and validation tiles
   labelled with a wrong class (should be dropped by the centroid/confidence filters);
2. evaluate arms real and classic (and selected@1 with the validation stand-ins) over 3 seeds.

    .venv/bin/python bench/select_eval_harness.py --out bench/out/harness
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTODIFFUSION_SHARED", REPO.parent / "shared" / "data"))


def build_dataset(out: Path, size: int = 64, seed: int = 0) -> Path:
    from PIL import Image

    from histodiffusion.data.writer import DatasetWriter

    labels = SHARED / "lc25000_lung" / "labels.csv"
    rows = list(csv.DictReader(open(labels)))
    classes = sorted({r["label"] for r in rows})
    rng = np.random.default_rng(seed)
    split_of = {}
    for c in classes:
        groups = sorted({r["group_id"] for r in rows if r["label"] == c})
        rng.shuffle(groups)
        n = len(groups)
        for i, g in enumerate(groups):
            split_of[g] = "test" if i < round(0.15 * n) else "val" if i < round(0.30 * n) else "train"
    w = DatasetWriter(out, tile_size=size)
    for r in rows:
        with Image.open(labels.parent / r["path"]) as im:
            tile = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
        w.add(tile, id=Path(r["path"]).stem, source="lc25000_lung", path=r["path"], label=r["label"],
              group=r["group_id"], split=split_of[r["group_id"]])
    sub = []
    for c in classes:
        groups = sorted({r["group"] for r in w.rows if r["split"] == "train" and r["label"] == c})
        rng.shuffle(groups)
        keep = set(groups[:max(1, round(0.05 * len(groups)))])
        sub += [r["id"] for r in w.rows if r["group"] in keep]
    return w.finish({"name": "lc25000_lung64", "kind": "labeled", "classes": classes, "tile_size": size},
                    {"frac0.05": sub})


def standins(data: Path, out: Path, subset: str) -> dict:
    """A sample directory of real tiles with known answers; returns {kind: ids}."""
    from PIL import Image

    from histodiffusion.runtime.artifacts import SAMPLES_COLUMNS
    from histodiffusion.data.evaldata import load_real
    from histodiffusion.runtime.fileio import write_csv_atomic

    real, val = load_real(data, subset), load_real(data, "val")
    rng = np.random.default_rng(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, kinds = [], {"heldout": [], "copy": [], "rot90": [], "wrong_label": []}
    n_per = {c: int((real.labels == i).sum()) for i, c in enumerate(real.classes)}

    def add(img, target, kind):
        sid = f"{kind}_{len(rows):05d}"
        Image.fromarray(img).save(out / "images" / f"{sid}.png")
        rows.append({"id": sid, "file": f"images/{sid}.png", "seed": len(rows), "target": target,
                     "target_index": real.classes.index(target), "scale": 0, "scheduler": "real-standin",
                     "steps": 0, "eta": 0, "window_lo": 0, "window_hi": 0, "confidence": "", "unet_id": "",
                     "classifier_id": "", "vae_id": ""})
        kinds[kind].append(sid)

    for ci, c in enumerate(real.classes):
        vi = np.flatnonzero(val.labels.numpy() == ci)
        for j in rng.choice(vi, size=min(len(vi), n_per[c]), replace=False):
            add(val.images[j].numpy(), c, "heldout")
        ri = np.flatnonzero(real.labels.numpy() == ci)
        for j in rng.choice(ri, size=5, replace=False):
            add(real.images[j].numpy(), c, "copy")
            add(np.ascontiguousarray(np.rot90(real.images[j].numpy())), c, "rot90")
        for j in rng.choice(vi, size=10, replace=False):
            add(val.images[j].numpy(), real.classes[(ci + 1) % len(real.classes)], "wrong_label")
    write_csv_atomic(out / "samples.csv", rows, SAMPLES_COLUMNS)
    return kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "harness"))
    p.add_argument("--data", default="", help="a prepared labeled dataset (default: build one from LC25000)")
    p.add_argument("--subset", default="frac0.05")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=500, help="optimisation steps per classifier (evaluate --steps)")
    args = p.parse_args()
    if not args.data and not (SHARED / "lc25000_lung" / "labels.csv").is_file():
        sys.exit(f"needs the real data in {SHARED}")
    from histodiffusion.stages import evaluate, select
    from histodiffusion.runtime.config import EvaluateConfig, SelectConfig
    from histodiffusion.runtime.rundirs import is_complete

    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not is_complete(data):
        t = time.time()
        build_dataset(data)
        print(f"dataset built in {time.time() - t:.0f} s")
    samples = out / "samples"
    kinds = standins(data, samples, args.subset) if not (samples / "samples.csv").is_file() else None
    t = time.time()
    selection = select.run(SelectConfig(samples=str(samples), data=str(data), subset=args.subset))  # <samples>/select
    print(f"select: {time.time() - t:.0f} s")
    flt = {r["id"]: r for r in csv.DictReader(open(selection / "filtered.csv"))}
    kinds = kinds or {k: [i for i in flt if i.startswith(k + "_")] for k in ("heldout", "copy", "rot90", "wrong_label")}
    print("| stand-in kind | n | kept | flagged memorized | nearest centroid = target | median confidence |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, ids in kinds.items():
        rs = [flt[i] for i in ids]
        print(f"| {k} | {len(rs)} | {sum(r['keep'] == '1' for r in rs)} | {sum(r['memorized'] == '1' for r in rs)} | "
              f"{sum(r['nearest_centroid'] == r['target'] for r in rs)} | "
              f"{np.median([float(r['confidence']) for r in rs]):.3f} |")
    gen = json.loads((samples / "generative_metrics.json").read_text())
    for res in gen["results"]:
        o = res["overall"]
        print(f"generative ({res['samples']}): {res['fd_name']}={o[res['fd_name']]:.4f} "
              f"{res['kd_name']}={o[res['kd_name']]:.5f} precision={o['precision']:.3f} recall={o['recall']:.3f}")
    t = time.time()
    cfg = EvaluateConfig(data=str(data), subset=args.subset, samples=str(samples), out=str(out / "eval"),
                         arms=("real", "classic", "selected"), ratios=(1.0,),
                         seeds=tuple(int(s) for s in args.seeds.split(",")), steps=args.steps)
    evaluate.run(cfg)
    m = json.loads((out / "eval" / "metrics.json").read_text())
    n_jobs = len(m["arms"]) * len(m["seeds"])
    print(f"evaluate: {time.time() - t:.0f} s for {n_jobs} classifiers ({m['budget']['steps']} steps of "
          f"{m['budget']['batch_size']} each), {m['data']['n_train_real']} real training tiles")
    print("| arm | accuracy [95% CI] | macro-F1 [95% CI] | delta acc vs real [95% CI] |")
    print("|---|---|---|---|")
    for arm, r in m["arms"].items():
        d = m["deltas"].get(arm, {}).get("accuracy")
        f = lambda x: f"{x['mean']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"  # noqa: E731
        print(f"| {arm} | {f(r['accuracy'])} | {f(r['macro_f1'])} | {f(d) if d else '-'} |")


if __name__ == "__main__":
    main()
