"""Ceilings for synthetic augmentation through this autoencoder (run by hand).

Every synthetic image is decoded by the autoencoder, so no sample can be better than what the decoder
makes of a real tile. Three "perfect generators", each written as a sample directory (samples.csv with
the true labels) and run through the product's own `select` and `evaluate` (same harness and seeds as
the run; arms real, selected@1, unselected@1 by default; `--arms classic,selected` measures the gain over
classic augmentation, the harness the synthetic arms train with):

  recon_subset  the autoencoder's reconstructions of the few-shot subset itself (no new content)
  real_new      NEW real tiles of the train split (other groups than the subset), as many per class
                as the subset: the upper bound of any generator (it is simply more labeled data)
  recon_new     the autoencoder's reconstructions of those new tiles: a generator that produced the
                right new tissue but through this decoder

If real_new helps and recon_new does not, the autoencoder is the bottleneck, whatever the guidance.

A decoder adapted on the target's unlabeled train tiles (finetune-decoder --unlabeled-subset) must not have
seen the new tiles it is measured on: `--pool half` draws them only from every other train group outside the
subset (sorted by name), and `--adapt-subset NAME` writes the complement (every other train tile) as the
subset file data/target/subsets/NAME.csv to adapt on, then exits:

    .venv/bin/python bench/recon_ceiling.py --run R --pool half --adapt-subset train_adapt
    .venv/bin/python -m histodiffusion finetune-decoder --config R/adapt/decoder/config.json \
        --unlabeled-subset train_adapt --steps 1000 --out bench/out/decoder_unl
    .venv/bin/python bench/recon_ceiling.py --run R --pool half --vae bench/out/decoder_unl/model/vae ...

    .venv/bin/python bench/recon_ceiling.py --run bench/out/efficacy/frac0.05
    .venv/bin/python bench/recon_ceiling.py --run bench/out/efficacy_base/frac0.05 --variants real_new,recon_new \
        --arms classic,selected --reuse bench/out/efficacy_base/frac0.05/eval5

With the run's class-balanced selection (quota 1) selected@1 holds every tile of a variant, so the ceiling
share is the gain of recon_new over the baseline divided by that of real_new (goal of issue 11: >= 70%).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = ("recon_subset", "real_new", "recon_new")


POOLS = ("all", "half")


def pool_groups(train_rows: list[dict], subset_groups: set[str], pool: str) -> set[str]:
    """The train groups new tiles are drawn from: every group outside the subset ("all"), or every other
    one of them in sorted order ("half": the other half stays free for unlabeled adaptation); --pool's
    argparse choices are POOLS."""
    groups = sorted({r["group"] for r in train_rows} - subset_groups)
    return set(groups if pool == "all" else groups[1::2])


def write_adapt_subset(run: Path, subset: str, name: str) -> Path:
    """data/target/subsets/<name>.csv: the train tiles outside pool_groups(..., "half"), for adaptation."""
    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.runtime.fileio import write_csv_atomic

    path = run / "data" / "target" / "subsets" / f"{name}.csv"
    if path.exists() or name in ("train", "val", "test", "all", subset):
        raise SystemExit(f"--adapt-subset {name!r}: {path} exists or names a split; choose a new name")
    sub, train = PixelDataset(run / "data" / "target", subset), PixelDataset(run / "data" / "target", "train")
    held = pool_groups(train.rows, {r["group"] for r in sub.rows}, "half")
    write_csv_atomic(path, [{"id": r["id"]} for r in train.rows if r["group"] not in held], ["id"])
    return path


def pick_tiles(run: Path, subset: str, variant: str, seed: int = 0, pool: str = "all") -> tuple[object, list[int]]:
    """(PixelDataset, item indices): the subset itself, or as many new train tiles per class from other groups
    (those of pool_groups)."""
    import numpy as np

    from histodiffusion.data.datasets import PixelDataset

    sub = PixelDataset(run / "data" / "target", subset)
    if variant == "recon_subset":
        return sub, list(range(len(sub)))
    train = PixelDataset(run / "data" / "target", "train")
    allowed = pool_groups(train.rows, {r["group"] for r in sub.rows}, pool)
    rng = np.random.default_rng(seed)
    picked = []
    for c in sorted({sub.label_index(i) for i in range(len(sub))}):
        want = sum(sub.label_index(i) == c for i in range(len(sub)))
        pool_idx = [i for i in range(len(train)) if train.label_index(i) == c and train.rows[i]["group"] in allowed]
        picked += sorted(rng.choice(pool_idx, size=want, replace=False).tolist())
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


BASELINE_ARMS = ("real", "real_aa", "classic", "classic_aa")  # arms that do not depend on the samples
SAME_HARNESS = ("data", "subset", "backbone", "backbone_weights", "steps", "epochs", "steps_per_epoch", "val_every",
                "val_subset", "batch_size", "lr", "ema_decay", "tta")


def reuse_baselines(reuse: Path, cfg, arms: list[str], seeds: list[int], eval_out: Path) -> int:
    """Copy the finished baseline classifiers (real/classic arms: they do not depend on the samples) of another
    evaluation with the same harness (EvaluateConfig `cfg` otherwise) into eval_out/classifiers, so evaluate
    skips them; returns how many."""
    import shutil

    from histodiffusion.runtime.configtypes import config_to_dict
    from histodiffusion.runtime.fileio import read_json

    other, ours = read_json(reuse / "config.json", "evaluation config")["config"], config_to_dict(cfg)
    diff = [k for k in SAME_HARNESS if other.get(k) != ours[k]]
    if diff:
        raise SystemExit(f"--reuse {reuse}: another harness (fields {diff} differ), its classifiers do not apply")
    n = 0
    for arm in (a for a in arms if a in BASELINE_ARMS):
        for seed in seeds:
            src, dst = reuse / "classifiers" / f"{arm}_{seed}", eval_out / "classifiers" / f"{arm}_{seed}"
            if (src / "_COMPLETE.json").is_file() and not dst.exists():
                shutil.copytree(src, dst)
                n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a `histodiffusion run` directory (data/target, ae/, adapt/decoder/)")
    p.add_argument("--vae", default="", help="decoder (default: the run's fine-tuned decoder, else ae/model/vae)")
    p.add_argument("--out", default="", help="default: <run>/recon_ceiling")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--arms", default="real,selected,unselected",
                   help="evaluate's arms (ratio 1); with the run's class-balanced selection (quota 1), selected@1 holds "
                        "every 'sample' of a variant (all new tiles), and classic is the baseline it trains with")
    p.add_argument("--seeds", default="", help="training seeds (default: the run's)")
    p.add_argument("--reuse", default="", help="a finished evaluation with the same harness: its real/classic "
                                               "classifiers are copied in instead of trained again")
    p.add_argument("--procs", type=int, default=1, help="processes for evaluate (torchrun, one classifier each)")
    p.add_argument("--pool", default="all", choices=POOLS, help="train groups the new tiles come from: all outside "
                                                                "the subset, or half of them (the rest: --adapt-subset)")
    p.add_argument("--adapt-subset", default="", help="write the train tiles outside the half pool as this subset "
                                                      "of the run's data/target, then exit")
    args = p.parse_args()

    from histodiffusion.stages import select
    from histodiffusion.runtime.artifacts import read_meta
    from histodiffusion.runtime.config import EvaluateConfig, RunConfig, SelectConfig, config_from_dict
    from histodiffusion.models.autoencoder import load_vae
    from histodiffusion.pipeline import plan
    from histodiffusion.runtime.registry import run_stage
    from histodiffusion.runtime.fileio import read_json

    run = Path(args.run)
    if args.adapt_subset:
        ev_subset = read_json(run / "config.json")["config"]["subset"]
        print(f"adaptation subset -> {write_adapt_subset(run, ev_subset, args.adapt_subset)}")
        return
    out = Path(args.out) if args.out else run / "recon_ceiling"
    vae_dir = Path(args.vae) if args.vae else next(p for p in (run / "adapt/decoder/model/vae", run / "ae/model/vae")
                                                    if p.is_dir())
    # the select / evaluate settings of the run itself (preset + stage config), as `histodiffusion run` resolves them
    fields = {s.name: s.fields for s in plan(config_from_dict(RunConfig, read_json(run / "config.json")["config"]))}
    ev, sel = fields["evaluate"], fields["select"]
    arms = args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(ev["seeds"])
    classes = list(read_meta(run / "data" / "target", "dataset")["classes"])
    vae = load_vae(vae_dir)
    for variant in args.variants.split(","):
        samples = out / variant / "samples"
        if not (samples / "samples.csv").is_file():
            ds, idx = pick_tiles(run, ev["subset"], variant, pool=args.pool)
            n = write_samples(ds, idx, classes, vae if variant.startswith("recon") else None, samples)
            print(f"{variant}: {n} images -> {samples}")
        selection = select.run(config_from_dict(SelectConfig, {**sel, "samples": str(samples), "out": ""}))
        cfg = config_from_dict(EvaluateConfig, {**ev, "samples": str(samples), "selection": str(selection),
                                                "out": str(out / variant / "eval"), "arms": arms, "ratios": [1.0],
                                                "seeds": seeds})
        if args.reuse and not (out / variant / "eval" / "_COMPLETE.json").is_file():
            print(f"{variant}: {reuse_baselines(Path(args.reuse), cfg, arms, seeds, out / variant / 'eval')} "
                  f"baseline classifiers reused from {args.reuse}")
        run_stage("evaluate", cfg, args.procs)
    text = results_table(out)
    (out / "results.md").write_text(text)
    print(text)


def ceiling_gains(out: Path) -> tuple[str, dict[str, dict]]:
    """(baseline arm, {variant: paired delta of selected@1's test accuracy against it}) of the finished
    variants under `out`; the baseline is classic when the evaluations have it (the harness the synthetic
    arms train with), else real."""
    found = {v: json.loads((out / v / "eval" / "metrics.json").read_text()) for v in VARIANTS
             if (out / v / "eval" / "metrics.json").is_file()}
    base = "classic" if found and all("classic" in m["arms"] for m in found.values()) else "real"
    key = "deltas_vs_classic" if base == "classic" else "deltas"
    return base, {v: m[key]["selected@1"]["accuracy"] for v, m in found.items() if "selected@1" in m.get(key, {})}


def ceiling_share(gains: dict[str, dict]) -> float | None:
    """recon_new's gain as a share of real_new's (None without both; nan when real_new gains nothing)."""
    if "real_new" not in gains or "recon_new" not in gains:
        return None
    real = gains["real_new"]["mean"]
    return gains["recon_new"]["mean"] / real if real > 0 else float("nan")


def results_table(out: Path) -> str:
    """One row per (finished variant, arm): accuracy, paired deltas vs real and vs classic; then the ceiling share:
    the gain of recon_new over the baseline as a share of real_new's (both selected@1: every new tile)."""
    ci = lambda r, sign="": f"{r['mean']:{sign}.3f} [{r['ci95'][0]:{sign}.3f}, {r['ci95'][1]:{sign}.3f}]"  # noqa: E731
    table = ["| variant | kept of samples (per class) | FD | precision / recall | arm | accuracy mean [95% CI] "
             "| delta vs real [95% CI] | delta vs classic [95% CI] |", "|---|---|---:|---|---|---|---|---|"]
    for variant in VARIANTS:
        mpath = out / variant / "eval" / "metrics.json"
        if not mpath.is_file():
            continue
        m = json.loads(mpath.read_text())
        sel_dir = Path(json.loads((out / variant / "eval" / "config.json").read_text())["config"]["selection"])
        keep = json.loads((sel_dir / "filtered.json").read_text())
        gm = json.loads((sel_dir / "generative_metrics.json").read_text())["results"][0]["overall"]
        fd = next(v for k, v in gm.items() if k.startswith("FD_"))
        for arm, res in m["arms"].items():
            d = m.get("deltas", {}).get(arm, {}).get("accuracy")
            c = (m.get("deltas_vs_classic") or {}).get(arm, {}).get("accuracy")
            table.append(f"| {variant} | {keep['kept']}/{keep['samples']} "
                         f"({'/'.join(str(v['kept']) for v in keep['per_class'].values())}) | {fd:.1f} "
                         f"| {gm['precision']:.2f} / {gm['recall']:.2f} | {arm} | {ci(res['accuracy'])} "
                         f"| {ci(d, '+') if d else '—'} | {ci(c, '+') if c else '—'} |")
    base, gains = ceiling_gains(out)
    share = ceiling_share(gains)
    if share is not None:
        table += ["", f"Ceiling share (selected@1's gain over {base}, recon_new / real_new): "
                      f"{gains['recon_new']['mean']:+.3f} / {gains['real_new']['mean']:+.3f} = {share:.0%}"]
    return "\n".join(table) + "\n"


if __name__ == "__main__":
    main()
