"""Efficacy benchmark on real data (run by hand; not part of CI).

Adapt the shipped pretrained base (--base; `--base none` pretrains from scratch on
../shared/data/unlabeled_he as before), target ../shared/data/lc25000_lung at 64 px, few-shot 5% and
10% of the train groups, 5 seeds; arms real / real_aa (A/A: the noise floor) / classic / selected /
unselected at the given ratios and the no-pretraining ablation; every classifier 500 steps with its
best-validation checkpoint (bench/efficacy_stages.json), selection class-balanced at the largest
ratio. With --base none, the unlabeled preparation, autoencoder, latent caches and pretrained UNet are
made once (in the first fraction's run directory) and reused by the other fractions.
--adapt-unlabeled-steps N adds continued unconditional training of the base on the target's train tiles
(labels unused) before guidance, --adapt-decoder-unlabeled the same tiles in the decoder fine-tune
(bench/efficacy_decoder_unl.json: 500 steps; both with bench/efficacy_unet_adapt.json, which also evaluates
unselected): run them into another --out to compare with the plain base,
with --reuse-from <the plain run's --out> so the stages the variants share are copied, not re-run.
--start-from unlabeled starts the samples from the target's train tiles, labels unused (run --start-from;
with --adapt-decoder-unlabeled the best configuration measured at 1% and 5%).

    .venv/bin/python bench/efficacy.py --out bench/out/efficacy

Writes <out>/results.md (one table over fractions) and prints it; each fraction's run directory holds
the full report. The evaluate stages train their classifiers in --procs processes (default 2: one per
core of the development machine), with the same results as one process.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTODIFFUSION_SHARED", REPO.parent / "shared" / "data"))


def main() -> None:
    from histodiffusion.runtime.configrules import START_FROM, START_STRENGTH

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "efficacy"))
    p.add_argument("--fractions", default="0.05,0.1")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--ratios", default="0.5,1,2,3")
    p.add_argument("--oversample", type=float, default=4.0,
                   help="samples made per the largest ratio's count (selection keeps a fraction of them)")
    p.add_argument("--preset", default="quick")
    p.add_argument("--base", default="default", help="pretrained base to adapt (default: the shipped one; none: "
                   "pretrain from scratch on unlabeled_he)")
    p.add_argument("--adapt-unlabeled-steps", type=int, default=0)
    p.add_argument("--adapt-decoder-unlabeled", action="store_true",
                   help="the decoder fine-tune also reconstructs the target's train tiles, labels unused")
    p.add_argument("--start-from", default=START_FROM[0], choices=START_FROM,
                   help="unlabeled: samples start from the target's train tiles, labels unused (run --start-from)")
    p.add_argument("--start-strength", type=float, default=START_STRENGTH,
                   help="with --start-from unlabeled (run --start-strength)")
    p.add_argument("--stage-config", default=str(REPO / "bench" / "efficacy_stages.json"),
                   help="per-stage overrides (JSON)")
    p.add_argument("--until", default="", help="stop every fraction after this stage (e.g. pretrain)")
    p.add_argument("--pretrained-from", default="",
                   help="run directory whose finished stages with the same config and inputs (data/, ae/, cache/, "
                        "ldm/) are copied (run --reuse-from; default: the first fraction's)")
    p.add_argument("--reuse-from", default="",
                   help="another efficacy --out: each fraction's run copies the stages (and real/classic classifiers) "
                        "that finished there with the same config and inputs (run --reuse-from)")
    p.add_argument("--draws", type=int, default=1,
                   help="draws of the labeled subset (other groups, same size): draw d > 0 runs in frac<f>_d<d>/ "
                        "with subset frac<f>_d<d>; the table pools (draw, seed) pairs")
    p.add_argument("--table-only", action="store_true", help="only (re)write results.md from finished runs")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--procs", type=int, default=2, help="processes for the evaluate stages (one per core)")
    args = p.parse_args()
    if not (SHARED / "lc25000_lung" / "labels.csv").is_file():
        sys.exit(f"needs the real data in {SHARED}")

    from histodiffusion.runtime.config import RunConfig
    from histodiffusion.data.splits import draw_name
    from histodiffusion.pipeline import run

    out = Path(args.out)
    fracs = [float(f) for f in args.fractions.split(",")]
    if args.table_only:
        return write_table(out, fracs, args.draws)
    stage_config = subset_stage_config(args.stage_config, fracs, args.draws, out)
    first = Path(args.pretrained_from) if args.pretrained_from else out / f"frac{fracs[0]:g}"
    t0 = time.time()
    for frac, draw in [(f, d) for d in range(args.draws) for f in fracs]:
        name = draw_name(f"frac{frac:g}", draw)  # the subset, and its run directory
        rd = out / name
        other = Path(args.reuse_from) / name if args.reuse_from else first  # stages finished there are copied
        reuse = str(other) if other != rd and (other / "config.json").is_file() else ""
        cfg = RunConfig(
            out=str(rd), preset=args.preset,
            base=args.base, adapt_unlabeled_steps=args.adapt_unlabeled_steps,
            adapt_decoder_unlabeled=args.adapt_decoder_unlabeled,
            start_from=args.start_from, start_strength=args.start_strength,
            unlabeled=tuple(str(p) for p in sorted((SHARED / "unlabeled_he").iterdir())) if args.base == "none" else (),
            labels_csv=str(SHARED / "lc25000_lung" / "labels.csv"),
            subset=name, seeds=tuple(int(s) for s in args.seeds.split(",")),
            ratios=tuple(float(r) for r in args.ratios.split(",")), oversample=args.oversample,
            ablations=not args.no_ablations,
            stage_config=stage_config, until=args.until, procs=args.procs,
            reuse_from=reuse)
        run(cfg)
        if args.until:
            break
    if not args.until:
        write_table(out, fracs, args.draws)
    print(f"total {time.time() - t0:.0f} s")


def subset_stage_config(path: str, fracs: list[float], draws: int, out: Path) -> str:
    """The --stage-config file, or (when it does not make every fraction or draw) a copy in <out> whose
    prepare-target also makes them; an existing run keeps its config when nothing has to change."""
    from histodiffusion.runtime.configtypes import load_config_file

    cfg = load_config_file(path) if path else {}
    tgt = dict(cfg.get("prepare-target", {}))
    have = [float(f) for f in tgt.get("fewshot_fracs", (0.05, 0.1, 0.25))]
    if all(f in have for f in fracs) and int(tgt.get("fewshot_draws", 1)) >= draws:
        return path
    tgt["fewshot_fracs"] = sorted(set(have) | set(fracs))
    tgt["fewshot_draws"] = max(draws, int(tgt.get("fewshot_draws", 1)))
    merged = out / "stage_config.json"
    merged.parent.mkdir(parents=True, exist_ok=True)
    merged.write_text(json.dumps({**cfg, "prepare-target": tgt}, indent=1))
    return str(merged)


def write_table(out: Path, fracs: list[float], draws: int = 1) -> None:
    table = results_table(out, fracs)
    if draws > 1:
        table += "\n" + pooled_table(out, fracs, draws)
    for frac in fracs:
        if (out / f"frac{frac:g}").is_dir():
            table += "\n" + signal_chain(out / f"frac{frac:g}")
    (out / "results.md").write_text(table)
    print(table)


def signal_chain(run: Path, eval_dir: Path | None = None) -> str:
    """Where the class signal goes, link by link, from one run directory's artifacts (a link whose artifact is
    missing says how to make it): guidance (latent classifier vs an image classifier on the same tiles), the
    samples' class fidelity by the independent judge (all, and kept by selection), for samples started from
    unlabeled tiles the correctness of their pseudo-labels (pseudo_labels), the autoencoder's
    ceiling (bench/recon_ceiling.py: new real tiles through the decoder vs as they are), the downstream gain."""
    if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling bench script
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from recon_ceiling import ceiling_gains, ceiling_share

    rows = []
    lc = run / "adapt" / "latent_classifier" / "metrics.json"
    if lc.is_file():
        m = json.loads(lc.read_text())
        b = m["goal"]["bucket"]
        rows.append(f"| guidance | latent classifier val accuracy at t in {b} / image classifier on the same tiles | "
                    f"{m['val_accuracy_by_t'][b]:.3f} / {m['image_classifier']['val_accuracy']:.3f} = "
                    f"{m['goal']['ratio']:.2f}x (goal {m['goal']['target']}x) |")
    fid = run / "samples" / "fidelity.json"
    if fid.is_file():
        f = json.loads(fid.read_text())
        for part, what in (("all", "all samples"), ("kept", "kept by selection")):
            if f.get(part):
                per = ", ".join(f"{c} {v['fidelity']:.2f}" for c, v in f[part]["per_class"].items())
                rate = {"mean": f[part]["fidelity"], "ci95": f[part]["ci95"]}
                rows.append(f"| class fidelity ({what}) | share the judge (val accuracy "
                            f"{f['judge']['val_accuracy']:.3f}) assigns to the target class, n={f[part]['n']} | "
                            f"{fmt(rate)} ({per}) |")
    else:
        rows.append("| class fidelity | not measured | `histodiffusion judge --samples <run>/samples` |")
    rows += pseudo_labels(run, eval_dir or run / "eval")
    base, gains = ceiling_gains(run / "recon_ceiling")
    for v, what in (("real_new", "new real tiles (more labels)"), ("recon_new", "the same tiles through the decoder")):
        if v in gains:
            rows.append(f"| autoencoder ceiling | selected@1 = {what}, gain over {base} | {fmt(gains[v])} |")
    share = ceiling_share(gains)
    rows.append("| autoencoder ceiling | share of the new tiles' gain that survives the decoder | "
                + (f"{share:.0%} |" if share is not None else "not measured: `bench/recon_ceiling.py --run <run>` |"))
    ev = (eval_dir or run / "eval") / "metrics.json"
    if ev.is_file():
        m = json.loads(ev.read_text())
        for arm, d in (m.get("deltas_vs_classic") or {}).items():
            rows.append(f"| downstream | {arm} vs classic augmentation (paired over seeds) | {fmt(d['accuracy'])} |")
        floor = (m.get("noise_floors") or {}).get("classic_aa")
        if floor:
            rows.append(f"| downstream | A/A floor of the augmented harness (classic_aa vs classic) | {fmt(floor['accuracy'])} |")
    head = [f"Where the signal goes ({run.name}):", "", "| link | measure | value |", "|---|---|---|"]
    return "\n".join(head + rows) + "\n"


def pseudo_labels(run: Path, eval_dir: Path) -> list[str]:
    """Samples started from unlabeled train tiles (`--start-from unlabeled`) take the latent classifier's reading
    of their starting tile as their label. The benchmark's target is fully labeled, so the true label of each
    starting tile (never read by the method) says how often that label is right: over all samples, the kept
    ones, and the samples each selected@r arm trains on (evaluate's rule, evaldata.ranked_kept). Samples whose
    starting tile has no label (a --target-unlabeled cohort) are left out of the shares."""
    from histodiffusion.data.evaldata import quota, ranked_kept, read_filtered
    from histodiffusion.runtime.artifacts import read_dataset, selection_dir

    ev_path = eval_dir / "config.json"
    ev_cfg = json.loads(ev_path.read_text())["config"] if ev_path.is_file() else {}
    samples_dir = Path(ev_cfg.get("samples") or run / "samples")
    if not (samples_dir / "config.json").is_file():
        return []
    cfg = json.loads((samples_dir / "config.json").read_text())["config"]
    if cfg.get("strength", 1.0) >= 1.0 or cfg.get("init_labels") != "classifier":
        return []
    truth = {r["id"]: r["label"] for r in read_dataset(ev_cfg.get("data") or run / "data" / "target")[1]}
    with open(samples_dir / "samples.csv", newline="") as f:
        samples = {r["id"]: r for r in csv.DictReader(f)}
    sel = selection_dir(samples_dir, ev_cfg.get("selection", ""))
    real = {c: v["real"] for c, v in json.loads((sel / "filtered.json").read_text())["per_class"].items()}
    kept = ranked_kept(read_filtered(sel), list(real))
    parts = [("all", list(samples)), ("kept", [f["id"] for ks in kept.values() for f in ks])]
    parts += [(f"selected@{r:g}", [f["id"] for c, ks in kept.items() for f in ks[:quota(r, real[c])]])
              for r in ev_cfg.get("ratios", [])]
    rows = []
    for name, ids in parts:
        known = [samples[i] for i in ids if truth.get(samples[i]["init_id"])]
        by_class = {c: [truth[s["init_id"]] == c for s in known if s["target"] == c] for c in real}
        right = sum(sum(v) for v in by_class.values())
        per = ", ".join(f"{c} {sum(v) / len(v):.2f}" for c, v in by_class.items() if v)
        rows.append(f"| pseudo-labels ({name}) | share of samples whose starting tile's true label (never read by "
                    f"the method) is their class, n={len(known)} | {right / max(1, len(known)):.3f} ({per}) |")
    return rows


def pooled_table(out: Path, fracs: list[float], draws: int) -> str:
    """Per fraction and arm: the paired delta vs real over every (draw, seed) pair, draws pooled."""
    import numpy as np

    from histodiffusion.data.splits import draw_name
    from histodiffusion.core.metrics import mean_ci

    lines = [f"Pooled over {draws} draws of the labeled subset (paired by draw and seed):", "",
             "| labels | arm | pairs | accuracy mean | delta acc vs real [95% CI] |", "|---|---|---:|---|---|"]
    for frac in fracs:
        acc: dict[str, dict[tuple, float]] = {}
        for d in range(draws):
            for arm, by_seed in test_accuracies(out / draw_name(f"frac{frac:g}", d) / "eval").items():
                acc.setdefault(arm, {}).update({(d, seed): a for seed, a in by_seed.items()})
        real = acc.get("real", {})
        for arm, vals in acc.items():
            keys = sorted(set(vals) & set(real))
            if arm == "real" or not keys:
                continue
            ci = mean_ci([vals[k] - real[k] for k in keys])
            lines.append(f"| {frac:.0%} | {arm} | {len(keys)} | {np.mean([vals[k] for k in keys]):.3f} | {fmt(ci)} |")
    return "\n".join(lines) + "\n"


def test_accuracies(eval_dir: Path) -> dict[str, dict[str, float]]:
    """arm -> seed -> test accuracy, from an evaluation's per_seed.csv ({} when it has none yet)."""
    f = eval_dir / "per_seed.csv"
    acc: dict[str, dict[str, float]] = {}
    if f.is_file():
        for r in csv.DictReader(f.open()):
            if r["testset"] == "test":
                acc.setdefault(r["arm"], {})[r["seed"]] = float(r["accuracy"])
    return acc


def results_table(out: Path, fracs: list[float]) -> str:
    """One row per fraction and arm; deltas paired by seed, vs real (no augmentation) and vs classic
    (real with classic augmentation: the baseline every synthetic arm, trained with it, has to beat)."""
    lines = ["| labels | arm | synthetic used | accuracy mean [95% CI] | macro-F1 mean [95% CI] "
             "| delta acc vs real [95% CI] | delta acc vs classic [95% CI] |", "|---|---|---:|---|---|---|---|"]
    for frac in fracs:
        for suffix, tag in (("", ""), ("_nopretrain", " (no pretraining)")):
            path = out / f"frac{frac:g}" / f"eval{suffix}" / "metrics.json"
            if not path.is_file():
                continue
            m = json.loads(path.read_text())
            for arm, res in m["arms"].items():
                if suffix and arm in ("real", "real_aa", "classic"):
                    continue
                d = m.get("deltas", {}).get(arm, {}).get("accuracy")
                label = "real_aa (A/A noise floor)" if arm == "real_aa" else arm
                c = (m.get("deltas_vs_classic") or {}).get(arm, {}).get("accuracy")
                lines.append(f"| {frac:.0%} | {label}{tag} | {synthetic_used(path.parent, arm)} | {fmt(res['accuracy'])} "
                             f"| {fmt(res['macro_f1'])} | {fmt(d) if d else '—'} | {fmt(c) if c else '—'} |")
    return "\n".join(lines) + "\n"


def synthetic_used(eval_dir: Path, arm: str) -> str:
    """Synthetic images in the arm's training set (first seed), e.g. '432 (148/139/145)'."""
    found = sorted((eval_dir / "classifiers").glob(f"{arm}_*/classifier.json"))
    if not found:
        return "?"
    n = json.loads(found[0].read_text()).get("n_synthetic", {})
    total = sum(n.values())
    return f"{total} ({'/'.join(str(v) for v in n.values())})" if total else "0"


def fmt(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


if __name__ == "__main__":
    main()
