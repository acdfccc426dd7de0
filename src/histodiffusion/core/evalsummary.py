"""The merged outputs of `evaluate`, from the per-(arm, seed) scores.json records: per_seed.csv rows,
per-arm mean and 95% t-CI with paired deltas against the real arm (real_aa's delta is the A/A noise
floor), validation curves (curves.csv and their per-arm summary). Pure: `evaluate` writes the files."""
from __future__ import annotations


import numpy as np

from . import metrics as M

CURVE_COLUMNS = ["arm", "seed", "step", "val_loss", "val_accuracy", "val_macro_f1", "best"]


def format_ci(d: dict | None, signed: bool = False, missing: str = "—") -> str:
    """'0.843 [0.827, 0.858]' of a mean_ci / paired_diff record ('+0.034 [-0.005, +0.072]' with signed);
    `missing` for an empty or absent record."""
    if not d:
        return missing
    f = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = d.get("ci95") or (float("nan"), float("nan"))
    return f"{f.format(d.get('mean', float('nan')))} [{f.format(lo)}, {f.format(hi)}]"



def per_seed_columns(classes: list[str]) -> list[str]:
    return (["arm", "seed", "testset", "n", "accuracy", "macro_f1"] + [f"sens_{c}" for c in classes]
            + [f"spec_{c}" for c in classes])


def per_seed_rows(results: dict, classes: list[str]) -> list[dict]:
    rows = []
    for (name, seed), sc in results.items():
        for ts, m in sc["scores"].items():
            rows.append({"arm": name, "seed": seed, "testset": ts, "n": m["n"], "accuracy": round(m["accuracy"], 6),
                         "macro_f1": round(m["macro_f1"], 6),
                         **{f"sens_{c}": round(m["sensitivity"][c], 6) for c in classes},
                         **{f"spec_{c}": round(m["specificity"][c], 6) for c in classes}})
    return rows


def summarise(results: dict, arm_names: list[str], seeds: list[int], classes: list[str], testsets: list[str],
              aa_of: dict[str, str] | None = None, pairs: dict[str, dict[str, str]] | None = None) -> dict:
    """{"testsets": {ts: {"arms": {arm: {metric: mean_ci}}, "deltas_vs_real": {arm: {metric: paired_diff}},
    "deltas_vs_classic": {synthetic arm: {metric: paired_diff}} (when classic is an arm), "noise_floors": {aa arm:
    {metric: paired_diff against the arm it repeats}}, and for each key of `pairs` (e.g. "deltas_vs_pseudo"):
    {arm: {metric: paired_diff against pairs[key][arm]}}}}}; aa_of maps each A/A arm to that arm (evaluate passes
    data.evalarms.AA_OF); evaluate pairs each synthetic arm with the pseudo-labelling arm of its ratio, selected@R and roundtrip@R
    with start@R, and selected@R with roundtrip@R."""
    aa_of = aa_of or {}
    out = {"classes": classes, "seeds": seeds, "ci": "95% t-interval over seeds (n-1 dof)", "testsets": {}}
    for ts in testsets:
        arms = {}
        per = {a: {s: results[(a, s)]["scores"][ts] for s in seeds} for a in arm_names}
        for a in arm_names:
            arms[a] = {"accuracy": M.mean_ci([per[a][s]["accuracy"] for s in seeds]),
                       "macro_f1": M.mean_ci([per[a][s]["macro_f1"] for s in seeds]),
                       "sensitivity": {c: M.mean_ci([per[a][s]["sensitivity"][c] for s in seeds]) for c in classes},
                       "specificity": {c: M.mean_ci([per[a][s]["specificity"][c] for s in seeds]) for c in classes},
                       "n_synthetic": results[(a, seeds[0])].get("n_synthetic", {}), "n_test": per[a][seeds[0]]["n"]}
        deltas = _paired_deltas(per, arm_names, seeds, "real")
        # the synthetic arms train with classic augmentation: their gain over it is the synthetic tiles' own
        # (real and the A/A arms are not synthetic; classic_aa's delta against classic is its noise floor)
        vs_classic = _paired_deltas(per, [a for a in arm_names if a != "real" and a not in aa_of], seeds, "classic")
        floors = {aa: _paired(per, aa, of, seeds) for aa, of in aa_of.items() if aa in arm_names and of in arm_names}
        out["testsets"][ts] = {"arms": arms, "deltas_vs_real": deltas, "deltas_vs_classic": vs_classic,
                               "noise_floors": floors,
                               **{key: {a: _paired(per, a, b, seeds) for a, b in pair.items()}
                                  for key, pair in (pairs or {}).items()}}
    return out


def _paired_deltas(per: dict, arm_names: list[str], seeds: list[int], base: str) -> dict:
    """{arm: {metric: paired_diff against `base`}} for every other arm; {} when `base` is not an arm."""
    if base not in per:
        return {}
    return {a: _paired(per, a, base, seeds) for a in arm_names if a != base}


def _paired(per: dict, arm: str, base: str, seeds: list[int]) -> dict:
    """{metric: paired_diff arm - base over the seeds} for accuracy and macro-F1."""
    return {k: M.paired_diff({s: per[arm][s][k] for s in seeds}, {s: per[base][s][k] for s in seeds})
            for k in ("accuracy", "macro_f1")}



def curve_rows(results: dict) -> list[dict]:
    """One row per (arm, seed, validation step); best = 1 on the step whose weights were kept."""
    rows = []
    for (name, seed), sc in results.items():
        v = sc.get("validation") or {}
        for r in v.get("curve", []):
            rows.append({"arm": name, "seed": seed, "step": r["step"], "val_loss": round(r["loss"], 6),
                         "val_accuracy": round(r["accuracy"], 6), "val_macro_f1": round(r["macro_f1"], 6),
                         "best": int(r["step"] == v["best_step"])})
    return rows


def validation_summary(results: dict, arm_names: list[str], seeds: list[int]) -> dict:
    """Per arm: best step and best validation accuracy (mean, CI over seeds), the mean curve, and the
    mean gain of validation accuracy over the second half of the budget (about 0: plateaued)."""
    out = {}
    for a in arm_names:
        vs = [results[(a, s)].get("validation") for s in seeds]
        if not all(vs):
            continue
        steps = [r["step"] for r in vs[0]["curve"]]
        mean_acc = [float(np.mean([v["curve"][i]["accuracy"] for v in vs])) for i in range(len(steps))]
        mean_loss = [float(np.mean([v["curve"][i]["loss"] for v in vs])) for i in range(len(steps))]
        half = int(np.argmin([abs(st - steps[-1] / 2) for st in steps]))
        out[a] = {"best_step": M.mean_ci([v["best_step"] for v in vs]), "best_steps": [v["best_step"] for v in vs],
                  "best_accuracy": M.mean_ci([v["best"]["accuracy"] for v in vs]),
                  "last_accuracy": M.mean_ci([v["curve"][-1]["accuracy"] for v in vs]),
                  "gain_second_half": mean_acc[-1] - mean_acc[half],
                  "curve": {"step": steps, "accuracy": mean_acc, "loss": mean_loss}}
    return out
