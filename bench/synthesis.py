"""Guided synthesis benchmark (run by hand): class fidelity by the independent judge, realism, speed.

Two sweeps (--sweeps scale,speed; both by default), on the same plan of --n-per-class samples per class
(sample i has the same seed in every setting, so settings differ only in the sampler):

  scale   guidance-scale sweep (--scales 0,1,2,5,10,20) with one sampler setting (--scale-setting,
          default dpm++20_full, `sample`'s default sampler): per scale, class fidelity (overall, macro,
          per class, 95% Wilson intervals) and realism (FD/KD and precision/recall against the target's
          train tiles, in the judge's feature space).
  speed   the reference's DDIM 50 steps, eta 1, guidance at every step, versus DPM-Solver++ 20 and 10
          steps, each with and without a guidance window (--window lo,hi), at --scale: samples/s and
          fidelity, and each setting's fidelity minus the reference's, paired by sample (same seeds; 95%
          t interval of the per-sample differences, core.metrics.paired_diff). "Equal fidelity": fidelity >= the reference's
          minus --tolerance; the speed ratio is the fastest such setting's samples/s over the
          reference's (goal: >= 2.5x).

The judge is a `histodiffusion judge` folder (--judge, default <out>/judge): trained there by the judge
stage from --data's train split when absent (so it never sees a validation or test tile), reused after.
It is neither the latent classifier that guides the samples nor the selection classifier.

Needs trained models, e.g. a `histodiffusion run` directory:
    the models its sample stage uses (its LDM or the base it adapted, latent classifier, decoder) and its target data

    .venv/bin/python bench/synthesis.py --run runs/default --n-per-class 32
    .venv/bin/python bench/synthesis.py --run runs/default --sweeps scale --scales 0,1,2,5,10,20
    .venv/bin/python bench/synthesis.py --run runs/default --sweeps speed --window 0,600 --scale 10
    .venv/bin/python bench/synthesis.py --model M --classifier C --data D [--judge J]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "ddim50_eta1_full"
SETTINGS = {  # name: scheduler, steps, eta, windowed
    REFERENCE: ("ddim", 50, 1.0, False),
    "dpm++20_full": ("dpmsolver++", 20, 0.0, False),
    "dpm++15_full": ("dpmsolver++", 15, 0.0, False),
    "dpm++10_full": ("dpmsolver++", 10, 0.0, False),
    "dpm++20_window": ("dpmsolver++", 20, 0.0, True),
    "dpm++10_window": ("dpmsolver++", 10, 0.0, True),
}


def run_sample_fields(run: Path) -> dict:
    """The sample stage's fields of a run as `histodiffusion run` plans them (model: the base it adapted,
    its target-adapted LDM or its own; classifier; fine-tuned decoder; target dataset), as api.load_pipeline
    reads them."""
    from histodiffusion.info import run_plan

    _, steps = run_plan(run)
    fields = dict(next(s.fields for s in steps if s.stage == "sample"))
    fields["data"] = next(s.fields["data"] for s in steps if s.stage == "select")
    return fields


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def load_or_train_judge(args, data: str, out: Path):
    """(model, info) of the judge folder; trained by the judge stage (train split only) when absent."""
    from histodiffusion.models.judge import load_judge
    from histodiffusion.runtime.config import JudgeConfig
    from histodiffusion.stages import judge
    from histodiffusion.runtime.rundirs import is_complete

    folder = Path(args.judge) if args.judge else out / "judge"
    if not is_complete(folder):
        if not data:
            raise SystemExit(f"no trained judge in {folder}: give --data (the target dataset) to train one there")
        judge.run(JudgeConfig(data=data, out=str(folder), backbone=args.judge_backbone, steps=args.judge_steps))
    model, info = load_judge(folder)
    print(f"judge {info['id']}: {info['name']} trained on {info['n_train']} tiles of {info['data']} "
          f"({info['subset']}), accuracy on {info['n_val']} {info['val_subset']} tiles: {info['val_accuracy']}")
    return model, info


def to_judge_size(images, size: int):
    """uint8 [N, H, W, 3] numpy -> uint8 torch tensor at the judge's input size."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images)
    if x.shape[1] == size:
        return x
    y = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def run_setting(name, cfg, window, m, plan, judged, batch_size: int, warm_up: bool) -> dict:
    """Time the synthesis of every planned sample with one setting, then judge the images."""
    import numpy as np

    from histodiffusion.core.fidelity import class_fidelity
    from histodiffusion.models.classifier import predict
    from histodiffusion.models.judge import realism
    from histodiffusion.stages.sample import generate

    model, info, real, real_feats = judged
    if warm_up:
        generate(plan[:min(len(plan), 4)], m, cfg, window)
    t0 = time.perf_counter()
    images, conf = [], []
    for b in range(0, len(plan), batch_size):
        rows, ims = generate(plan[b:b + batch_size], m, cfg, window)
        images.append(ims)
        conf += [float(r["confidence"]) for r in rows]
    secs = time.perf_counter() - t0
    x = to_judge_size(np.concatenate(images), int(info["image_size"]))
    classes = list(info["classes"])
    probs, _ = predict(model, x)
    preds = [classes[int(i)] for i in probs.argmax(1)]
    targets = [it["target"] for it in plan]
    fid = class_fidelity(targets, preds, classes)["all"]
    res = {"setting": name, "scheduler": cfg.scheduler, "steps": cfg.steps, "eta": cfg.eta, "scale": cfg.scale,
           "window": list(window), "samples": len(plan), "seconds": secs, "samples_per_s": len(plan) / secs,
           "fidelity": fid["fidelity"], "fidelity_ci95": fid["ci95"], "macro_fidelity": fid["macro_fidelity"],
           "per_class": {c: v["fidelity"] for c, v in fid["per_class"].items()},
           "latent_confidence": float(np.mean(conf)), "realism": None,
           "correct": [int(p == t) for p, t in zip(preds, targets)]}
    if real is not None:
        r = realism(model, info, real, x, targets, real_feats=real_feats)
        o = r["overall"]
        res["realism"] = {"fd_name": r["fd_name"], "kd_name": r["kd_name"], "fd": o[r["fd_name"]],
                          "kd": o[r["kd_name"]], "precision": o["precision"], "recall": o["recall"],
                          "coverage": o["coverage"]}
    return res


def _fmt(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def scale_table(results: list[dict]) -> str:
    lines = ["| scale | fidelity [95% CI] | macro fidelity | FD (judge) | KD (judge) | precision | recall | coverage | "
             "latent conf | samples/s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        q = r["realism"] or {}
        lo, hi = r["fidelity_ci95"]
        lines.append(f"| {r['scale']:g} | {r['fidelity']:.3f} [{lo:.3f}, {hi:.3f}] | {_fmt(r['macro_fidelity'])} | "
                     f"{_fmt(q.get('fd'), 4)} | {_fmt(q.get('kd'), 5)} | {_fmt(q.get('precision'))} | "
                     f"{_fmt(q.get('recall'))} | {_fmt(q.get('coverage'))} | {r['latent_confidence']:.3f} | "
                     f"{r['samples_per_s']:.2f} |")
    return "\n".join(lines)


def speed_summary(results: list[dict], tolerance: float, n_classes: int) -> dict:
    """Reference, fastest setting at equal fidelity and its speed ratio (None without the reference)."""
    ref = next((r for r in results if r["setting"] == REFERENCE), None)
    if ref is None:
        return {"reference": None}
    from histodiffusion.core.metrics import paired_diff

    for r in results:  # paired by sample: the same seeds and targets in every setting
        d = paired_diff(dict(enumerate(r["correct"])), dict(enumerate(ref["correct"])))
        r["fidelity_delta_vs_reference"] = [d["mean"], *d["ci95"]]
    equal = [r for r in results if r is not ref and r["fidelity"] >= ref["fidelity"] - tolerance]
    best = max(equal, key=lambda r: r["samples_per_s"], default=None)
    ratio = best["samples_per_s"] / ref["samples_per_s"] if best else None
    return {"reference": REFERENCE, "tolerance": tolerance,
            "reference_above_chance": ref["fidelity_ci95"][0] > 1 / n_classes,
            "best_at_equal_fidelity": best and best["setting"], "speed_ratio": ratio,
            "goal_met": ratio is not None and ratio >= 2.5}


def speed_table(results: list[dict]) -> str:
    lines = ["| setting | steps | window | samples/s | fidelity [95% CI] | vs reference, paired [95% CI] | "
             "FD (judge) | latent conf |", "|---|---:|---|---:|---|---|---:|---:|"]
    for r in results:
        lo, hi = r["fidelity_ci95"]
        d = r.get("fidelity_delta_vs_reference")
        paired = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "–"
        lines.append(f"| {r['setting']} | {r['steps']} | {r['window']} | {r['samples_per_s']:.2f} | "
                     f"{r['fidelity']:.3f} [{lo:.3f}, {hi:.3f}] | {paired} | "
                     f"{_fmt((r['realism'] or {}).get('fd'), 4)} | {r['latent_confidence']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="", help="a `histodiffusion run` directory (fills the paths below)")
    p.add_argument("--model", default="", help="exported LDM folder")
    p.add_argument("--classifier", default="", help="latent classifier folder")
    p.add_argument("--vae", default="", help="decoder (default: the run's fine-tuned one if present, else model/vae)")
    p.add_argument("--data", default="", help="prepared labeled target dataset (judge training, realism reference)")
    p.add_argument("--judge", default="", help="judge folder (default <out>/judge; trained there when absent)")
    p.add_argument("--judge-steps", type=int, default=600)
    p.add_argument("--judge-backbone", default="small_cnn")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "synthesis"))
    p.add_argument("--sweeps", default="scale,speed", help="comma-separated: scale, speed")
    p.add_argument("--n-per-class", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="run seed of the plan (sample i: seed (seed, i))")
    p.add_argument("--scales", default="0,1,2,5,10,20", help="scale sweep: guidance scales")
    p.add_argument("--scale-setting", default="dpm++20_full", help=f"scale sweep: one of {', '.join(SETTINGS)}")
    p.add_argument("--scale", type=float, default=10.0, help="speed sweep: guidance scale")
    p.add_argument("--settings", default="", help="speed sweep: comma-separated subset of the setting names")
    p.add_argument("--window", default="0,600", help="guidance window lo,hi of the *_window settings")
    p.add_argument("--tolerance", type=float, default=0.02, help="'equal fidelity': >= reference - tolerance")
    p.add_argument("--realism", default="true", help="true/false: FD/KD, precision/recall in the judge's features")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args()

    import torch

    from histodiffusion.models.judge import judge_features
    from histodiffusion.runtime.config import SampleConfig
    from histodiffusion.data.evaldata import load_real
    from histodiffusion.stages.sample import load_models, plan_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    sweeps = [s for s in args.sweeps.split(",") if s]
    if not set(sweeps) <= {"scale", "speed"} or args.scale_setting not in SETTINGS:
        p.error(f"--sweeps takes scale and/or speed; --scale-setting one of {', '.join(SETTINGS)}")
    wanted = [s for s in args.settings.split(",") if s] or list(SETTINGS)
    if set(wanted) - set(SETTINGS):
        p.error(f"unknown setting(s) {sorted(set(wanted) - set(SETTINGS))}; known: {', '.join(SETTINGS)}")
    planned = run_sample_fields(Path(args.run)) if args.run else {}
    model = args.model or str(planned.get("model", ""))
    classifier = args.classifier or str(planned.get("classifier", ""))
    vae = args.vae or str(planned.get("vae", ""))
    data = args.data or str(planned.get("data", ""))
    if not (model and classifier):
        p.error("give --run, or --model, --classifier and --data (or a trained --judge)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jmodel, jinfo = load_or_train_judge(args, data, out)
    real = load_real(jinfo["data"], jinfo["subset"]) if args.realism.lower() in ("1", "true", "yes") else None
    real_feats = judge_features(jmodel, real.images) if real is not None else None  # once for all settings
    lo, hi = (int(v) for v in args.window.split(","))
    base = SampleConfig(model=model, classifier=classifier, vae=vae, out=str(out), n_per_class=args.n_per_class,
                        scale=args.scale, batch_size=args.batch_size, seed=args.seed)
    m = load_models(base)
    classes = list(m["info"]["classes"])
    if sorted(classes) != sorted(jinfo["classes"]):
        raise SystemExit(f"judge classes {jinfo['classes']} differ from the latent classifier's {classes}")
    plan = plan_samples(base, classes)
    done: dict[tuple[str, float], dict] = {}  # (setting, scale) -> result: shared by the two sweeps

    def measure(name: str, scale: float, warm_up: bool) -> dict:
        if (name, scale) not in done:
            sched, steps, eta, windowed = SETTINGS[name]
            window = (lo, hi) if windowed else (0, 0)
            cfg = dataclasses.replace(base, scheduler=sched, steps=steps, eta=eta, guidance_window=window,
                                      scale=scale)
            r = run_setting(name, cfg, window, m, plan, (jmodel, jinfo, real, real_feats), args.batch_size, warm_up)
            print(f"{name:18s} scale {scale:5g}: {r['samples_per_s']:7.2f} samples/s, fidelity {r['fidelity']:.3f} "
                  f"[{r['fidelity_ci95'][0]:.3f}, {r['fidelity_ci95'][1]:.3f}], latent conf "
                  f"{r['latent_confidence']:.3f}", flush=True)
            done[(name, scale)] = r
        return done[(name, scale)]

    summary = {"judge": {k: jinfo.get(k) for k in ("path", "id", "name", "data", "subset", "n_train", "val_accuracy")},
               "n_per_class": args.n_per_class, "seed": args.seed, "window": [lo, hi],
               "threads": torch.get_num_threads()}
    if "speed" in sweeps:
        results = [measure(name, args.scale, warm_up=True) for name in wanted]
        summary["speed"] = {"scale": args.scale, "results": results,
                            **speed_summary(results, args.tolerance, len(classes))}
    if "scale" in sweeps:
        results = [measure(args.scale_setting, s, warm_up=False) for s in floats(args.scales)]
        summary["scale_sweep"] = {"setting": args.scale_setting, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if "speed" in summary:
        s = summary["speed"]
        print(f"\nspeed at guidance scale {args.scale:g} ({args.n_per_class} samples per class):\n"
              + speed_table(s["results"]))
        if s["reference"] is None:
            print(f"(no {REFERENCE} in --settings: no speed ratio)")
        else:
            if not s["reference_above_chance"]:
                print("warning: the reference's fidelity is not above chance: the models do not make class-"
                      "recognisable images, so 'equal fidelity' says nothing")
            print(f"fastest at equal fidelity (>= reference - {args.tolerance}): {s['best_at_equal_fidelity']}, "
                  + (f"{s['speed_ratio']:.2f}x the reference ({'meets' if s['goal_met'] else 'misses'} the 2.5x "
                     f"goal)" if s["speed_ratio"] else "none"))
    if "scale_sweep" in summary:
        print(f"\nguidance-scale sweep with {args.scale_setting}:\n" + scale_table(summary["scale_sweep"]["results"]))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
