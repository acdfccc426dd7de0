"""Ceilings for synthetic augmentation through this autoencoder (run by hand).

Every synthetic image is decoded by the autoencoder, so no sample can be better than what the decoder
makes of a real tile. Three "perfect generators", each written as a sample directory (samples.csv with
the true labels) and run through the product's own `select` and `evaluate` (same harness and seeds as
the run; arms real, selected@1, unselected@1):

  recon_subset  the autoencoder's reconstructions of the few-shot subset itself (no new content)
  real_new      NEW real tiles of the train split (other groups than the subset), as many per class
                as the subset: the upper bound of any generator (it is simply more labeled data)
  recon_new     the autoencoder's reconstructions of those new tiles: a generator that produced the
                right new tissue but through this decoder

If real_new helps and recon_new does not, the autoencoder is the bottleneck, whatever the guidance.

    .venv/bin/python bench/recon_ceiling.py --run bench/out/efficacy/frac0.05
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = ("recon_subset", "real_new", "recon_new")


def pick_tiles(run: Path, subset: str, variant: str, seed: int = 0) -> tuple[object, list[int]]:
    """(PixelDataset, item indices): the subset itself, or as many new train tiles per class from other groups."""
    import numpy as np

    from histodiffusion.data.datasets import PixelDataset

    sub = PixelDataset(run / "data" / "target", subset)
    if variant == "recon_subset":
        return sub, list(range(len(sub)))
    train = PixelDataset(run / "data" / "target", "train")
    used_groups = {r["group"] for r in sub.rows}
    rng = np.random.default_rng(seed)
    picked = []
    for c in sorted({sub.label_index(i) for i in range(len(sub))}):
        want = sum(sub.label_index(i) == c for i in range(len(sub)))
        pool = [i for i in range(len(train)) if train.label_index(i) == c and train.rows[i]["group"] not in used_groups]
        picked += sorted(rng.choice(pool, size=want, replace=False).tolist())
    return train, picked


def write_samples(ds, idx: list[int], classes: list[str], vae, out: Path, batch: int = 64) -> int:
    """The tiles `idx` of ds as a sample directory: as stored (vae None) or encoded + decoded by vae."""
    import numpy as np
    import torch
    from PIL import Image

    from histodiffusion.runtime.fileio import write_csv_atomic
    from histodiffusion.diffusers_pipeline import decode_uint8

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    with torch.no_grad():
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            items = [ds[i] for i in chunk]
            if vae is None:
                img = np.stack([ds.uint8(i).numpy() for i in chunk])
            else:
                img = decode_uint8(vae, vae.encode(torch.stack([it[0] for it in items])).latent_dist.mean, 1.0)
            for (_, label, tid), im in zip(items, img):
                sid = f"s_{len(rows):05d}"
                Image.fromarray(np.ascontiguousarray(im)).save(out / "images" / f"{sid}.png")
                rows.append({"id": sid, "file": f"images/{sid}.png", "target": classes[label],
                             "target_index": label, "source_id": tid})
    write_csv_atomic(out / "samples.csv", rows, list(rows[0]))
    return len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a `histodiffusion run` directory (data/target, ae/, adapt/decoder/)")
    p.add_argument("--vae", default="", help="decoder (default: the run's fine-tuned decoder, else ae/model/vae)")
    p.add_argument("--out", default="", help="default: <run>/recon_ceiling")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()

    from histodiffusion.stages import evaluate, select
    from histodiffusion.runtime.artifacts import read_meta
    from histodiffusion.runtime.config import EvaluateConfig, RunConfig, SelectConfig, config_from_dict
    from histodiffusion.models.autoencoder import load_vae
    from histodiffusion.pipeline import plan
    from histodiffusion.runtime.fileio import read_json

    run = Path(args.run)
    out = Path(args.out) if args.out else run / "recon_ceiling"
    vae_dir = Path(args.vae) if args.vae else next(p for p in (run / "adapt/decoder/model/vae", run / "ae/model/vae")
                                                    if p.is_dir())
    # the select / evaluate settings of the run itself (preset + stage config), as `histodiffusion run` resolves them
    fields = {s.name: s.fields for s in plan(config_from_dict(RunConfig, read_json(run / "config.json")["config"]))}
    ev, sel = fields["evaluate"], fields["select"]
    classes = list(read_meta(run / "data" / "target", "dataset")["classes"])
    vae = load_vae(vae_dir)
    table = ["| variant | passing selection | FD | precision / recall | arm | accuracy mean [95% CI] "
             "| delta vs real [95% CI] |", "|---|---|---:|---|---|---|---|"]
    fmt = lambda r: f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"  # noqa: E731
    for variant in args.variants.split(","):
        samples = out / variant / "samples"
        if not (samples / "samples.csv").is_file():
            ds, idx = pick_tiles(run, ev["subset"], variant)
            n = write_samples(ds, idx, classes, vae if variant.startswith("recon") else None, samples)
            print(f"{variant}: {n} images -> {samples}")
        selection = select.run(config_from_dict(SelectConfig, {**sel, "samples": str(samples), "out": ""}))
        keep = json.loads((selection / "filtered.json").read_text())  # select's own directory: <samples>/select
        gm = json.loads((selection / "generative_metrics.json").read_text())["results"][0]["overall"]
        fd = next(v for k, v in gm.items() if k.startswith("FD_"))
        evaluate.run(config_from_dict(EvaluateConfig, {**ev, "samples": str(samples), "selection": str(selection),
                                                       "out": str(out / variant / "eval"),
                                                       "arms": ["real", "selected", "unselected"], "ratios": [1.0]}))
        m = json.loads((out / variant / "eval" / "metrics.json").read_text())
        for arm, res in m["arms"].items():
            d = m.get("deltas", {}).get(arm, {}).get("accuracy")
            table.append(f"| {variant} | {keep['kept']}/{keep['samples']} "
                         f"({'/'.join(str(v['kept']) for v in keep['per_class'].values())}) | {fd:.1f} "
                         f"| {gm['precision']:.2f} / {gm['recall']:.2f} | {arm} | {fmt(res['accuracy'])} "
                         f"| {fmt(d) if d else '—'} |")
    text = "\n".join(table) + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
