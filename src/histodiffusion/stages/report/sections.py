"""Report sections on tables and records: resolved configurations, data counts, selection statistics,
downstream results with their validation curves and confusion matrices, generative metrics."""
from __future__ import annotations

import json
from pathlib import Path

from ...runtime.errors import HistoError
from ...runtime.fileio import read_json
from .doc import ARM_HEADER, Doc, arm_rows, ci, fmt
from .figures import curve_figure


def _thresholds(thr) -> str:
    """The memorization threshold of a keep-list: one number, or one per class (class: value)."""
    return ", ".join(f"{c} {fmt(v, 4)}" for c, v in thr.items()) if isinstance(thr, dict) else fmt(thr, 4)


def section_configs(doc: Doc, p: dict) -> None:
    found = []
    cands = [("dataset meta.json", p["data"] / "meta.json")]
    for stage_dir in p["layout"].training_dirs():
        cands += [(f"{stage_dir.name}: {c.parent.relative_to(p['run'])}", c) for c in sorted(stage_dir.rglob("config.json"))
                  if "checkpoints" not in c.parts and "model" not in c.parts]
    cands += [("sample", p["samples"] / "config.json"), ("select", p["select"] / "config.json"),
              ("evaluate", p["eval"] / "config.json")]
    for name, path in cands:
        if path.is_file():
            try:
                found.append((name, json.dumps(json.loads(path.read_text()), indent=2)))
            except json.JSONDecodeError:
                continue
    if not found:
        return
    doc.open_fold(f"Resolved configurations ({len(found)})")
    doc.p(f"{len(found)} stage configuration(s) found: " + ", ".join(n for n, _ in found) + ".")
    for name, text in found:
        doc.raw_details(name, text)
    doc.close_fold()


def classes_of(data: Path) -> list[str] | None:
    """Class names of the target dataset, or None when there is none."""
    from ...runtime.artifacts import read_meta

    return list(read_meta(data, "dataset").get("classes") or []) if (data / "manifest.csv").is_file() else None


def section_data(doc: Doc, p: dict, subset: str) -> dict | None:
    from ...runtime.artifacts import read_dataset, subset_ids

    if not (p["data"] / "manifest.csv").is_file():
        return None
    meta, rows = read_dataset(p["data"])
    classes = list(meta.get("classes") or [])
    splits = sorted({r["split"] for r in rows})
    doc.h(2, "Data")
    doc.p(f"Dataset {p['data']} ({meta.get('name', '')}): {len(rows)} tiles of {meta.get('tile_size')} px, "
          f"{len({r['group'] for r in rows})} groups; splits are by group.")
    head = ["split"] + classes + ["total", "groups"]
    body = []
    for s in splits:
        rs = [r for r in rows if r["split"] == s]
        body.append([s] + [sum(r["label"] == c for r in rs) for c in classes] + [len(rs), len({r["group"] for r in rs})])
    try:
        ids = set(subset_ids(p["data"], rows, subset))
        rs = [r for r in rows if r["id"] in ids]
        body.append([f"{subset} (training subset)"] + [sum(r["label"] == c for r in rs) for c in classes]
                    + [len(rs), len({r["group"] for r in rs})])
    except HistoError:
        pass
    doc.table(head, body, "tiles per split and class")
    return {"meta": meta, "classes": classes}


def section_selection(doc: Doc, p: dict) -> None:
    path = p["select"] / "filtered.json"
    if not path.is_file():
        return
    f = read_json(path, "selection summary")
    reasons = sorted(f.get("dropped_by", {}))
    doc.h(2, "Selection")
    cfg = f.get("config", {})
    q = cfg.get("quota_ratio") or 0
    rule = (f"class-balanced: each class keeps the first {q:g} x its real count of its ranked list (samples passing "
            f"every filter first, then the best of those that missed one: 'filled'; never a dropped near-copy)"
            if q else f"cap {cfg.get('max_ratio')} x real per class (0: none)")
    doc.p(f"Feature space: {f.get('extractor')}; filters: the nearest centroid is the target "
          f"({cfg.get('require_nearest_centroid')}), confidence >= {cfg.get('min_confidence')}, not memorized "
          f"(nearest real distance <= {_thresholds(f.get('memorization_threshold'))}, the "
          f"{cfg.get('memorization_quantile')} quantile of real-real nearest-neighbour distances across groups"
          f"{', per class of the nearest real tile' if isinstance(f.get('memorization_threshold'), dict) else ''}; "
          f"dropped: {cfg.get('drop_memorized')}); {rule}. Kept {f['kept']} of {f['samples']}. "
          f"Acceptance = kept / generated; pass rate = passing every filter / generated.")
    src = f.get("memorization_threshold_from")
    loose = {c: v for c, v in src.items() if v != "class"} if isinstance(src, dict) else {}
    if src == "none":
        doc.p("Not calibrated: the real tiles of every class come from one group, so no pair of distinct real "
              "tiles of a class shows how close a new tile may lie; no sample is flagged as memorized.")
    if loose:
        doc.p(f"Not calibrated: the real tiles of {', '.join(loose)} come from one group per class, so no pair of "
              f"distinct real tiles of the class shows how close a new tile may lie; "
              + ("their threshold is pooled over the other classes." if "pooled" in loose.values()
                 else "no sample is flagged as memorized."))
    pc = f["per_class"]
    rows = []
    for c, v in pc.items():
        rows.append([c, v["real"], v["samples"], v.get("passed", "–"), fmt(v.get("pass_rate")), v["kept"],
                     v.get("filled", 0), "–" if v.get("quota") is None else v["quota"], v.get("short", 0),
                     fmt(v.get("acceptance", v["kept"] / max(v["samples"], 1))), v["memorized"]]
                    + [v["dropped_by"].get(r, 0) for r in reasons])
    n = max(f["samples"], 1)
    passed = sum(v.get("passed", 0) for v in pc.values())
    rows.append(["all", sum(v["real"] for v in pc.values()), f["samples"], passed, fmt(passed / n), f["kept"],
                 sum(v.get("filled", 0) for v in pc.values()), "", sum(v.get("short", 0) for v in pc.values()),
                 fmt(f["kept"] / n), sum(v["memorized"] for v in pc.values())] + [f["dropped_by"][r] for r in reasons])
    doc.table(["class", "real", "generated", "passed", "pass rate", "kept", "filled", "quota", "short", "acceptance",
               "flagged memorized"] + [f"dropped: {r}" for r in reasons], rows,
              "selection per class (a dropped sample can have several reasons)")


def section_results(doc: Doc, p: dict, eval_dir: Path, title: str = "Downstream classification",
                    test_table: bool = True) -> None:
    """Budget, noise floor, arms per test set (the test split's table only with `test_table`: the verdict
    shows it), per-class sensitivity / specificity, validation curves, confusion matrices."""
    path = eval_dir / "metrics.json"
    if not path.is_file():
        return
    m = read_json(path, "evaluation metrics")
    b = m.get("budget", {})
    doc.h(2, title)
    doc.p(f"Results of {eval_dir}.")
    ckpt = (f"the checkpoint with the best accuracy on the {b['val_subset']!r} split (scored every "
            f"{b.get('val_every')} steps)" if b.get("val_subset") else "the last weights")
    doc.p(f"Backbone {b.get('backbone')}, {b.get('steps')} optimisation steps per classifier (batch {b.get('batch_size')}, "
          f"lr {b.get('lr')}, cosine schedule) and {ckpt}, identical for every arm; seeds {m['seeds']}. Values: mean "
          f"[{m.get('ci')}]; deltas are paired differences against the real arm over the same seeds.")
    unlike = []
    if b.get("synthetic_weight", 1.0) != 1.0:
        unlike.append(f"each synthetic image weighs {b['synthetic_weight']:g} of a real one in the loss")
    if b.get("real_finish"):
        unlike.append(f"the last {b['real_finish']:.0%} of the steps train on the real tiles only")
    if unlike:
        doc.p("In the synthetic arms " + " and ".join(unlike) + ".")
    aa = m.get("noise_floor")
    if aa:
        doc.p(f"Noise floor (A/A: real_aa is real-only with another seed stream): Δ accuracy {ci(aa['accuracy'])}, "
              f"Δ macro-F1 {ci(aa['macro_f1'])}. A delta inside this interval is not distinguishable from seed "
              f"noise.")
    aa = (m.get("noise_floors") or {}).get("classic_aa")
    if aa:
        doc.p(f"Noise floor of the augmented harness (A/A: classic_aa is classic with another seed stream; the "
              f"synthetic arms also train with classic augmentation): Δ accuracy {ci(aa['accuracy'])}, "
              f"Δ macro-F1 {ci(aa['macro_f1'])}.")
    classes = m["classes"]
    for ts, r in m["testsets"].items():
        first = next(iter(r["arms"].values()))
        if test_table or ts != "test":
            doc.table(ARM_HEADER, arm_rows(r),
                      f"{'test split' if ts == 'test' else 'external test set ' + ts} ({first['n_test']} tiles)")
        rows = [[arm] + [f"{fmt(v['sensitivity'][c]['mean'])} / {fmt(v['specificity'][c]['mean'])}" for c in classes]
                for arm, v in r["arms"].items()]
        doc.table(["arm"] + [f"{c} sens / spec" for c in classes], rows, f"per-class sensitivity / specificity ({ts}, mean over seeds)")
    section_validation(doc, m, eval_dir)
    from ...runtime.artifacts import confusion_name

    pngs = [(ts, arm, eval_dir / "confusion" / confusion_name(ts, arm)) for ts, r in m["testsets"].items()
            for arm in r["arms"]]
    pngs = [x for x in pngs if x[2].is_file()]
    if pngs:
        doc.h(3, "Confusion matrices (summed over seeds, rows normalised)")
        for ts in m["testsets"]:
            doc.open_row()
            for _, arm, png in (x for x in pngs if x[0] == ts):
                doc.image(png.read_bytes(), f"confusion_{eval_dir.name}_{png.name}", f"{ts}: {arm}", 260)
            doc.close_row()


def section_validation(doc: Doc, m: dict, eval_dir: Path) -> None:
    """Validation curves of the downstream classifiers: has real-only plateaued within the budget?"""
    v = m.get("validation") or {}
    if not v:
        return
    b = m.get("budget", {})
    doc.h(3, "Validation curves")
    doc.p(f"Accuracy on the {b.get('val_subset')!r} split every {b.get('val_every')} steps (mean over seeds; "
          f"per seed in {eval_dir / 'curves.csv'}). Gain in the second half: last point minus the point at half the "
          f"budget; about 0 means the arm has plateaued.")
    rows = [[arm, _steps(x), ci(x["best_accuracy"]), ci(x["last_accuracy"]),
             f"{x['gain_second_half']:+.3f}"] for arm, x in v.items()]
    doc.table(["arm", "best step: mean (min-max)", "best val accuracy", "last val accuracy",
               "gain in the second half"], rows, "validation (checkpoint choice)")
    if any(len(x["curve"]["step"]) > 1 for x in v.values()):
        doc.image(curve_figure({a: x["curve"] for a, x in v.items()}, f"validation accuracy ({eval_dir.name})"),
                  f"curves_{eval_dir.name}.png", f"validation accuracy against step ({eval_dir.name})", 640)


def _steps(x: dict) -> str:
    steps = x.get("best_steps") or [x["best_step"]["mean"]]
    return f"{x['best_step']['mean']:.0f} ({min(steps):.0f}-{max(steps):.0f})"


def section_generative(doc: Doc, p: dict) -> None:
    path = p["select"] / "generative_metrics.json"
    if not path.is_file():
        return
    g = read_json(path, "generative metrics")
    doc.h(2, "Generative metrics")
    doc.p("Real reference: the real training subset. FD/KD are named after their feature extractor: only an "
          "Inception-v3 extractor gives FID/KID; the default is the selection classifier's penultimate features. "
          "KD is the unbiased polynomial-kernel MMD² (can be slightly negative); precision/recall are the k-NN "
          "manifold estimates of Kynkäänniemi et al. (2019); coverage (Naeem et al., 2020) is the share of real tiles "
          "whose k-NN ball holds a synthetic one.")
    for res in g.get("results", []):
        fd, kd = res["fd_name"], res["kd_name"]
        rows = []
        for scope, v in [("all classes", res["overall"]), *res["per_class"].items()]:
            rows.append([scope, v["n_real"], v["n_fake"], fmt(v[fd], 4), fmt(v[kd], 5), fmt(v["precision"]),
                         fmt(v["recall"]), fmt(v.get("coverage"))])
        doc.table(["scope", "real", "synthetic", fd, kd, "precision", "recall", "coverage"], rows,
                  f"{res['samples']} synthetic samples, extractor {res['extractor']} (k={res['k']})")
