"""The report's first screen: the verdict (one sentence per synthetic ratio, against the A/A noise floor and
classic augmentation), the efficacy table of the test split, class fidelity by the independent judge, and
the sample grids (images.section_grids). Sentences are built by a pure function from metrics.json.
"""
from __future__ import annotations

import re
from pathlib import Path

from ...runtime.fileio import read_json
from .doc import ARM_HEADER, Doc, arm_rows, fmt, rate

TEST = "test"


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _interval(d: dict) -> str:
    """'+0.012 [95% CI -0.030, 0.054]' (one seed: no interval)."""
    if d["n"] < 2:
        return f"{_signed(d['mean'])} (one seed, no interval)"
    lo, hi = d["ci95"]
    return f"{_signed(d['mean'])} [95% CI {lo:.3f}, {hi:.3f}]"


def _seeds(d: dict) -> str:
    return f"{d['n']} seed{'s' if d['n'] != 1 else ''}"


def ratio_arms(deltas: dict, kind: str = "selected") -> list[tuple[float, str]]:
    """[(ratio, arm)] of one kind of synthetic arm ('selected@1', 'selected@0.5', ...), by ratio."""
    found = [(float(m.group(1)), a) for a in deltas if (m := re.fullmatch(rf"{re.escape(kind)}@([\d.]+)", a))]
    return sorted(found)


def judgement(d: dict, floor: dict | None) -> str:
    """Whether a paired delta is told apart from seed noise: its interval excludes 0 and its mean lies outside
    the A/A interval (when there is one)."""
    if d["n"] < 2:
        return "one seed: no interval, no verdict"
    lo, hi = d["ci95"]
    inside_floor = floor is not None and floor["n"] >= 2 and floor["ci95"][0] <= d["mean"] <= floor["ci95"][1]
    if lo <= 0 <= hi or inside_floor:
        return "not distinguishable from seed noise"
    return "a gain beyond seed noise" if d["mean"] > 0 else "a loss beyond seed noise"


def verdict_sentences(metrics: dict, metric: str = "accuracy") -> list[str]:
    """One sentence per ratio of the selected synthetic arms on the test split, e.g. 'Selected synthetic tiles
    at ratio 1 changed test accuracy by +0.012 [95% CI -0.030, 0.054] over 3 seeds, against +0.004 [...]
    between two real-only runs (A/A noise floor) and +0.020 [...] for classic augmentation: not
    distinguishable from seed noise.' When the evaluation has a classic arm, a second clause judges the gain
    over classic augmentation (which the synthetic arms train with) against classic_aa's floor, a third (with a
    pseudo arm of the same ratio) the gain over plain pseudo-labelling, and a fourth (with a start arm of the same
    ratio) the gain over the samples' own starting tiles, i.e. what the diffusion step adds, split (with a roundtrip
    arm of the same ratio) into the autoencoder's round trip of those tiles and the denoising step. Unselected
    arms get a sentence when there is no selected one. A pseudo+selected arm gets one: the gain of adding the
    selected samples to the pseudo-labelled tiles."""
    r = metrics["testsets"][TEST]
    deltas, vs_classic = r["deltas_vs_real"], r.get("deltas_vs_classic") or {}
    floor = deltas.get("real_aa", {}).get(metric)
    classic = deltas.get("classic", {}).get(metric)
    classic_floor = (r.get("noise_floors") or {}).get("classic_aa", {}).get(metric)
    name = "macro-F1" if metric == "macro_f1" else metric
    pool = deltas or vs_classic  # an evaluation without a real arm is judged against classic alone
    arms = [(q, a, "selected synthetic tiles") for q, a in ratio_arms(pool, "selected")] or \
           [(q, a, "synthetic tiles without selection") for q, a in ratio_arms(pool, "unselected")]
    out = []
    for ratio, arm, what in arms:
        head = f"{what[0].upper()}{what[1:]} at ratio {ratio:g} changed test {name}"
        text = ""
        if arm in deltas:
            d = deltas[arm][metric]
            against = []
            if floor:
                against.append(f"{_interval(floor)} between two real-only runs (A/A noise floor)")
            if classic:
                against.append(f"{_interval(classic)} for classic augmentation")
            text = (f"{head} by {_interval(d)} over {_seeds(d)}" + (", against " + " and ".join(against) if against
                                                                     else "") + f": {judgement(d, floor)}.")
        if arm in vs_classic:
            c = vs_classic[arm][metric]
            over = "over classic augmentation alone (which the synthetic arms also use)"
            also = (f", against {_interval(classic_floor)} between two classic runs" if classic_floor else "") + \
                f": {judgement(c, classic_floor)}."
            text += (f" {over[0].upper()}{over[1:]}: {_interval(c)}{also}" if text  # a second clause
                     else f"{head} {over} by {_interval(c)} over {_seeds(c)}{also}")
        p = (r.get("deltas_vs_pseudo") or {}).get(arm, {}).get(metric)
        if p:  # the generator against plain pseudo-labelling of the same unlabeled tiles
            text += (f" Over pseudo-labelled real tiles at the same ratio (pseudo@{ratio:g}, no generator): "
                     f"{_interval(p)}: {judgement(p, classic_floor)}.")
        st = (r.get("deltas_vs_start") or {}).get(arm, {}).get(metric)
        if st:  # the diffusion step against the raw tiles it started from (same tiles, same labels)
            text += (f" Over the samples' own starting tiles, raw (start@{ratio:g}: the same tiles and labels "
                     f"without the diffusion step): {_interval(st)}: {judgement(st, classic_floor)}.")
        rt = (r.get("deltas_vs_start") or {}).get(f"roundtrip@{ratio:g}", {}).get(metric)
        dn = (r.get("deltas_vs_roundtrip") or {}).get(arm, {}).get(metric)
        if rt and dn:  # that difference in two: the autoencoder's round trip, then the denoising step
            text += (f" Of that, one pass of the tiles through the samples' autoencoder (roundtrip@{ratio:g} against "
                     f"start@{ratio:g}) gives {_interval(rt)} and the denoising step over that round trip "
                     f"{_interval(dn)}.")
        out.append(text)
    vs_pseudo = r.get("deltas_vs_pseudo") or {}
    for ratio, arm in ratio_arms(vs_pseudo, "pseudo+selected"):
        p = vs_pseudo[arm][metric]
        out.append(f"Selected synthetic tiles added to the pseudo-labelled real tiles at ratio {ratio:g} ({arm} "
                   f"against pseudo@{ratio:g}) changed test {name} by {_interval(p)} over {_seeds(p)}: "
                   f"{judgement(p, classic_floor)}.")
    return out


def section_verdict(doc: Doc, eval_dir: Path) -> dict | None:
    """Verdict sentences and the efficacy table of the test split; metrics.json, or None when absent."""
    path = eval_dir / "metrics.json"
    doc.h(2, "Verdict")
    if not path.is_file():
        doc.p(f"No evaluation results yet ({path} not found): run `histodiffusion evaluate` for the verdict.")
        return None
    m = read_json(path, "evaluation metrics")
    sentences = verdict_sentences(m)
    if not sentences:
        doc.p("The evaluation has no arm with synthetic tiles: no verdict on synthetic augmentation.")
    for s in sentences:
        doc.p(s, cls="verdict")
    r = m["testsets"][TEST]
    first = next(iter(r["arms"].values()))
    doc.table(ARM_HEADER, arm_rows(r), f"efficacy on the test split ({first['n_test']} tiles; mean [95% CI] over seeds {m['seeds']}; "
                    f"Δ: paired differences against real, and against classic augmentation, which the synthetic arms "
                    f"train with; classic_aa's is the augmented harness's A/A floor)")
    return m


def section_fidelity_summary(doc: Doc, samples: Path) -> None:
    """Class fidelity by the judge, per target class (the full section with its method follows in details)."""
    path = samples / "fidelity.json"
    if not path.is_file():
        return
    f = read_json(path, "class fidelity")
    kept = f.get("kept")
    rows = [[c, rate(f["all"]["per_class"][c]), rate(kept["per_class"][c]) if kept else "–"] for c in f["classes"]]
    rows.append(["macro", fmt(f["all"].get("macro_fidelity")), fmt((kept or {}).get("macro_fidelity"))])
    doc.table(["target class", "all samples", "kept samples"], rows,
              f"class fidelity: share of samples the independent judge assigns to their target class "
              f"(95% Wilson interval; judge's val accuracy {fmt(f['judge'].get('val_accuracy'))})")


def section_augmented(doc: Doc, folder: Path) -> None:
    """Where the run's augmented training set is (export-dataset), when it was written."""
    summary = folder / "dataset.json"
    if not summary.is_file():
        return
    d = read_json(summary, "augmented set summary")
    doc.p(f"Augmented training set: {folder.resolve() / 'labels.csv'} ({d['description']}; one folder per class "
          f"under images/). Its README.md says what it was measured to do; the added tiles are for training only.",
          cls="note")
