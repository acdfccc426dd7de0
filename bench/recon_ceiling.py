"""The autoencoder's ceiling for synthetic augmentation (run by hand).

Every synthetic image is decoded by the autoencoder, so no sample can be more realistic than an
autoencoder *reconstruction of a real training tile*. This script treats the reconstructions of the
real few-shot subset as if they were samples (a sample directory with samples.csv, labels = the real
labels) and runs the product's own `select` (how many pass selection; FD/precision/recall against the
real tiles) and `evaluate` (real-only vs real + reconstructions, same harness and seeds). If adding
perfectly labeled reconstructions does not help the downstream classifier, better guidance cannot
either: the autoencoder is the bottleneck.

    .venv/bin/python bench/recon_ceiling.py --run bench/out/efficacy/frac0.05
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_reconstructions(run: Path, subset: str, vae_dir: Path, out: Path, batch: int = 64) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from histodiffusion.artifacts import read_meta
    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.models.autoencoder import load_vae
    from histodiffusion.runtime import write_csv_atomic

    classes = list(read_meta(run / "data" / "target", "dataset")["classes"])
    ds = PixelDataset(run / "data" / "target", subset)
    vae = load_vae(vae_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    with torch.no_grad():
        for start in range(0, len(ds), batch):
            items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
            x = torch.stack([it[0] for it in items])
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            img = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for (_, label, tid), im in zip(items, img):
                sid = f"recon_{len(rows):05d}"
                Image.fromarray(np.ascontiguousarray(im)).save(out / "images" / f"{sid}.png")
                rows.append({"id": sid, "file": f"images/{sid}.png", "target": classes[label],
                             "target_index": label, "source_id": tid})
    write_csv_atomic(out / "samples.csv", rows, list(rows[0]))
    return len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (data/target, ae/, adapt/decoder/, eval config)")
    p.add_argument("--vae", default="", help="decoder (default: the run's fine-tuned decoder, else ae/model/vae)")
    p.add_argument("--out", default="", help="default: <run>/recon_ceiling")
    args = p.parse_args()

    from histodiffusion import evaluate, select
    from histodiffusion.config import EvaluateConfig, SelectConfig
    from histodiffusion.runtime import read_json

    run = Path(args.run)
    out = Path(args.out) if args.out else run / "recon_ceiling"
    vae = Path(args.vae) if args.vae else next(p for p in (run / "adapt/decoder/model/vae", run / "ae/model/vae")
                                                if p.is_dir())
    ev = read_json(run / "eval" / "config.json")["config"]
    sel = read_json(run / "samples" / "filtered.json")["config"]
    samples = out / "samples"
    if not (samples / "samples.csv").is_file():
        n = write_reconstructions(run, ev["subset"], vae, samples)
        print(f"{n} reconstructions of {ev['subset']} by {vae} -> {samples}")
    select.run(SelectConfig(**{**sel, "samples": str(samples), "out": ""}))
    keep = json.loads((samples / "filtered.json").read_text())
    gm = json.loads((samples / "generative_metrics.json").read_text())["results"][0]["overall"]
    evaluate.run(EvaluateConfig(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in ev.items()},
                                   "samples": str(samples), "out": str(out / "eval"),
                                   "arms": ("real", "selected", "unselected"), "ratios": (1.0,)}))
    m = json.loads((out / "eval" / "metrics.json").read_text())
    print(f"reconstructions passing selection: {keep['kept']} of {keep['samples']} "
          f"({ {c: v['kept'] for c, v in keep['per_class'].items()} })")
    print("reconstructions vs real: " + ", ".join(f"{k} {v:.3f}" for k, v in gm.items() if isinstance(v, float)))
    print("| arm | accuracy mean [95% CI] | delta vs real [95% CI] |\n|---|---|---|")
    for arm, res in m["arms"].items():
        d = m.get("deltas", {}).get(arm, {}).get("accuracy")
        fmt = lambda r: f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"  # noqa: E731
        print(f"| {arm} (reconstructions) | {fmt(res['accuracy'])} | {fmt(d) if d else '—'} |")


if __name__ == "__main__":
    main()
