"""Stage `report`: one self-contained HTML report (index.html, images embedded, no external CSS/JS)
and its Markdown twin (report.md, images in figures/) for a run directory.

Run directory layout (each part optional; explicit ReportConfig paths override):
    <run>/data/target   prepared labeled target dataset
    <run>/samples       sample directory (samples.csv; select/: filtered.csv, filtered.json, generative_metrics.json)
    <run>/eval          evaluate output (metrics.json, per_seed.csv, confusion/*.png)
    <run>/ae, <run>/ldm, <run>/adapt   training runs (their config.json files are shown)
Sections appear only when their inputs exist: resolved configs, data counts per split and class,
real vs synthetic grids per class, a 2-D embedding of real vs synthetic features, the latent
classifier's accuracy per timestep bucket against an image classifier, selection statistics, class
fidelity by the independent judge (<samples>/fidelity.json), results with 95% CIs and paired deltas
vs the real arm, confusion matrices, generative metrics.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from .runtime.config import ReportConfig
from .runtime.contract import completion_record
from .runtime.errors import HistoError
from .runtime.log import closes_stage_logs, get_logger
from .runtime.rundirs import mark_complete, start_run_dir
from .runtime.fileio import read_json, write_text_atomic
from .report_figures import curve_figure, embedding_figure, grid_figure


class Doc:
    """Builds the HTML body and the Markdown text side by side."""

    def __init__(self, figures: Path):
        self.html: list[str] = []
        self.md: list[str] = []
        self.figures = figures

    def h(self, level: int, text: str) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def p(self, text: str, cls: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def open_section(self, ident: str) -> None:
        self.html.append(f'<section id="{ident}">')

    def close_section(self) -> None:
        self.html.append("</section>")

    def open_fold(self, title: str) -> None:
        """A folded block (<details>) under a heading-like summary; the Markdown twin gets a heading."""
        self.html.append(f'<details class="fold"><summary>{html.escape(title)}</summary>')
        self.md.append(f"\n## {title}\n")

    def close_fold(self) -> None:
        self.html.append("</details>")

    def table(self, header: list[str], rows: list[list], caption: str = "") -> None:
        cells = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""  # wraps to the window, not the table
        self.html.append(f'<div class="table">{cap}<div class="scroll"><table><thead><tr>{cells}</tr></thead>'
                         f'<tbody>{body}</tbody></table></div></div>')
        if caption:
            self.md.append(f"*{caption}*\n")
        self.md.append("| " + " | ".join(map(str, header)) + " |")
        self.md.append("|" + "---|" * len(header))
        self.md.extend("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows)
        self.md.append("")

    def image(self, png: bytes, name: str, alt: str, width: int | None = None, cls: str = "") -> None:
        self.figures.mkdir(parents=True, exist_ok=True)
        (self.figures / name).write_bytes(png)
        w = f' style="max-width:{width}px"' if width else ""
        c = f' class="{cls}"' if cls else ""
        self.html.append(f'<figure><img alt="{html.escape(alt)}"{c}{w} src="data:image/png;base64,'
                         f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(alt)}</figcaption></figure>')
        self.md.append(f"![{alt}](figures/{name})\n")

    def raw_details(self, title: str, text: str) -> None:
        self.html.append(f"<details><summary>{html.escape(title)}</summary><pre>{html.escape(text)}</pre></details>")
        self.md.append(f"<details><summary>{title}</summary>\n\n```json\n{text}\n```\n</details>\n")

    def open_row(self) -> None:
        self.html.append('<div class="row">')

    def close_row(self) -> None:
        self.html.append("</div>")


CSS = """*{box-sizing:border-box}body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;
margin:16px auto;max-width:1180px;color:#222;line-height:1.4;padding:0 16px}h1{border-bottom:2px solid #446;
padding-bottom:6px;font-size:1.6em;margin:8px 0 10px;overflow-wrap:anywhere}h2{margin-top:30px;border-bottom:1px solid #ccc;
padding-bottom:3px}#verdict h2{margin-top:10px}#details>h2:first-child{border:0;margin:40px 0 0;color:#446;font-size:1em;
text-transform:uppercase;letter-spacing:.08em}p.verdict{font-size:17px;background:#f3f5fb;border-left:4px solid #446;
padding:8px 12px;margin:8px 0}.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:2px 0 14px;
font-size:13px}th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}td{white-space:nowrap}th{background:#eef}
td:first-child,th:first-child{text-align:left}p.caption{font-weight:600;font-size:13px;margin:10px 0 2px}
figure{display:inline-block;margin:6px 10px 12px 0;vertical-align:top;max-width:100%}figcaption{font-size:12px;color:#555;
max-width:520px}img{border:1px solid #ddd;max-width:100%;height:auto}img.tiles{image-rendering:pixelated}
pre{background:#f6f6f8;padding:8px;font-size:12px;overflow-x:auto}details{margin:4px 0}summary{cursor:pointer}
details.fold>summary{font-size:1.3em;font-weight:600;margin-top:30px;border-bottom:1px solid #ccc}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}.row>figure{min-width:0}.note{color:#555;font-size:13px}
@media (max-width:640px){body{padding:0 8px;margin:8px auto}h1{font-size:1.25em}p.verdict{font-size:15px}
table{font-size:12px}th,td{padding:3px 5px}figure{margin:4px 0 8px}}"""


def _paths(cfg: ReportConfig) -> dict[str, Path]:
    """The directories the report reads: the config's, else the run layout's (layout.py)."""
    from .runtime.layout import RunLayout

    from .runtime.artifacts import selection_dir

    L = RunLayout(cfg.run)
    samples = Path(cfg.samples) if cfg.samples else L.samples()
    return {"run": L.root, "layout": L, "data": Path(cfg.data) if cfg.data else L.data_target,
            "samples": samples, "select": selection_dir(samples),
            "eval": Path(cfg.eval) if cfg.eval else L.evaluation(),
            "latent_classifier": Path(cfg.latent_classifier) if cfg.latent_classifier else L.latent_classifier}


def _fmt(x, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _ci(m: dict, nd: int = 3) -> str:
    if m["n"] < 2:
        return f"{_fmt(m['mean'], nd)} (n=1)"
    return f"{_fmt(m['mean'], nd)} [{_fmt(m['ci95'][0], nd)}, {_fmt(m['ci95'][1], nd)}]"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
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


def _classes(data: Path) -> list[str] | None:
    """Class names of the target dataset, or None when there is none."""
    from .runtime.artifacts import read_meta

    return list(read_meta(data, "dataset").get("classes") or []) if (data / "manifest.csv").is_file() else None


def section_data(doc: Doc, p: dict, subset: str) -> dict | None:
    from .runtime.artifacts import read_dataset, subset_ids

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


def grid_scale(tile: int, scale: int = 0) -> int:
    """Display scale of the tiles in the grids: `scale`, or (0) the smallest that shows a tile at least
    128 px wide (2x for 64 px tiles)."""
    return scale if scale > 0 else max(1, -(-128 // max(tile, 1)))


def section_grids(doc: Doc, p: dict, subset: str, classes: list[str], n: int, scale: int = 0) -> tuple | None:
    from .data.evaldata import load_real, load_sample_images, read_samples

    real = load_real(p["data"], subset)
    tile = int(real.images.shape[1])
    k = grid_scale(tile, scale)
    cols = max(1, min(n, 4 if tile * k >= 96 else 8))

    def grid(images, keep, title):
        return grid_figure(images, keep, title, cols=cols, scale=k)

    if not (p["samples"] / "samples.csv").is_file():
        doc.h(2, "Real images per class")
        doc.p(f"Up to {n} tiles per class of {subset!r}, {tile} px shown at {k}x.")
        doc.open_row()
        for ci, c in enumerate(classes):
            doc.image(grid(real.images[real.labels == ci][:n], None, c), f"grid_{ci}.png", f"{c}: real", cls="tiles")
        doc.close_row()
        return real, None, None, None
    rows = read_samples(p["samples"], classes)
    filt = {}
    if (p["select"] / "filtered.csv").is_file():
        from .data.evaldata import read_filtered

        filt = {f["id"]: f for f in read_filtered(p["select"])}
    syn = load_sample_images(p["samples"], rows, tile)
    targets = np.array([classes.index(r["target"]) for r in rows])
    keep = np.array([int(filt[r["id"]]["keep"]) if r["id"] in filt else -1 for r in rows])
    doc.h(2, "Real and synthetic images per class")
    doc.p(f"Left: up to {n} real tiles of {subset!r} per class. Right: up to {n} synthetic samples" +
          (", kept ones first in rank order (dropped ones are framed red)" if filt else " (not yet selected)") +
          f". {tile} px tiles shown at {k}x.")
    for ci, c in enumerate(classes):
        idx = [i for i in range(len(rows)) if targets[i] == ci]
        if filt:
            idx.sort(key=lambda i: (-int(filt[rows[i]["id"]]["keep"]), int(filt[rows[i]["id"]]["rank"])))
        idx = idx[:n]
        doc.p(f"{c}: real (left), synthetic (right)", cls="caption")
        doc.open_row()
        doc.image(grid(real.images[real.labels == ci][:n], None, f"{c}: real"), f"grid_real_{ci}.png",
                  f"{c}: real", cls="tiles")
        doc.image(grid(syn[idx] if idx else syn[:0], keep[idx] if filt else None, f"{c}: synthetic"),
                  f"grid_syn_{ci}.png", f"{c}: synthetic" + (" (kept first)" if filt else ""), cls="tiles")
        doc.close_row()
    return real, syn, targets, keep


def section_embedding(doc: Doc, p: dict, real, syn, targets, keep, classes, method: str) -> None:
    from .models.classifier import load_classifier, predict

    feats_name = "raw pixels (8x8 downsampled)"
    model = None
    for d in [p["samples"] / "selector" / "model", *sorted((p["eval"] / "classifiers").glob("real_*"))]:
        if (d / "classifier.json").is_file():
            model, _ = load_classifier(d)
            feats_name = f"penultimate features of {d.relative_to(d.parents[1])}"
            break
    xs = [real.images] + ([syn] if syn is not None else [])
    if model is not None:
        feats = [predict(model, x)[1].numpy() for x in xs]
    else:
        import torch

        feats = [torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2).float(), 8).flatten(1).numpy() for x in xs]
    png, used = embedding_figure(feats, real.labels.numpy(), targets, keep, classes, method)
    if syn is None:
        doc.h(2, "Embedding of real features")
        doc.p(f"2-D {used} embedding of {feats_name} of the real training subset (no synthetic samples found).")
    else:
        doc.h(2, "Embedding of real and synthetic features")
        doc.p(f"2-D {used} embedding of {feats_name}: circles are real tiles, crosses synthetic samples "
              f"(grey crosses: dropped by selection).")
    doc.image(png, "embedding.png", f"{used} of {'real vs synthetic' if syn is not None else 'real'} features", 760)


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
          f"(nearest real distance <= {_fmt(f.get('memorization_threshold'), 4)}, the "
          f"{cfg.get('memorization_quantile')} quantile of real-real nearest-neighbour distances across groups; "
          f"dropped: {cfg.get('drop_memorized')}); {rule}. Kept {f['kept']} of {f['samples']}. "
          f"Acceptance = kept / generated; pass rate = passing every filter / generated.")
    pc = f["per_class"]
    rows = []
    for c, v in pc.items():
        rows.append([c, v["real"], v["samples"], v.get("passed", "–"), _fmt(v.get("pass_rate")), v["kept"],
                     v.get("filled", 0), "–" if v.get("quota") is None else v["quota"], v.get("short", 0),
                     _fmt(v.get("acceptance", v["kept"] / max(v["samples"], 1))), v["memorized"]]
                    + [v["dropped_by"].get(r, 0) for r in reasons])
    n = max(f["samples"], 1)
    passed = sum(v.get("passed", 0) for v in pc.values())
    rows.append(["all", sum(v["real"] for v in pc.values()), f["samples"], passed, _fmt(passed / n), f["kept"],
                 sum(v.get("filled", 0) for v in pc.values()), "", sum(v.get("short", 0) for v in pc.values()),
                 _fmt(f["kept"] / n), sum(v["memorized"] for v in pc.values())] + [f["dropped_by"][r] for r in reasons])
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
    aa = m.get("noise_floor")
    if aa:
        doc.p(f"Noise floor (A/A: real_aa is real-only with another seed stream): Δ accuracy {_ci(aa['accuracy'])}, "
              f"Δ macro-F1 {_ci(aa['macro_f1'])}. A delta inside this interval is not distinguishable from seed "
              f"noise.")
    classes = m["classes"]
    for ts, r in m["testsets"].items():
        first = next(iter(r["arms"].values()))
        if test_table or ts != "test":
            doc.table(ARM_HEADER, arm_rows(r),
                      f"{'test split' if ts == 'test' else 'external test set ' + ts} ({first['n_test']} tiles)")
        rows = [[arm] + [f"{_fmt(v['sensitivity'][c]['mean'])} / {_fmt(v['specificity'][c]['mean'])}" for c in classes]
                for arm, v in r["arms"].items()]
        doc.table(["arm"] + [f"{c} sens / spec" for c in classes], rows, f"per-class sensitivity / specificity ({ts}, mean over seeds)")
    section_validation(doc, m, eval_dir)
    from .runtime.artifacts import confusion_name

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


ARM_HEADER = ["arm", "synthetic images", "accuracy", "macro-F1", "Δ accuracy vs real", "Δ macro-F1 vs real"]


def arm_rows(r: dict) -> list[list]:
    """Rows of ARM_HEADER for one test set of metrics.json (mean [95% CI]; deltas paired against real)."""
    rows = []
    for arm, v in r["arms"].items():
        d = r["deltas_vs_real"].get(arm)
        rows.append([f"{arm} (A/A noise floor)" if arm == "real_aa" else arm,
                     sum(v.get("n_synthetic", {}).values()), _ci(v["accuracy"]), _ci(v["macro_f1"]),
                     _ci(d["accuracy"]) if d else "–", _ci(d["macro_f1"]) if d else "–"])
    return rows


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
    rows = [[arm, _steps(x), _ci(x["best_accuracy"]), _ci(x["last_accuracy"]),
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
          "manifold estimates of Kynkäänniemi et al. (2019).")
    for res in g.get("results", []):
        fd, kd = res["fd_name"], res["kd_name"]
        rows = []
        for scope, v in [("all classes", res["overall"]), *res["per_class"].items()]:
            rows.append([scope, v["n_real"], v["n_fake"], _fmt(v[fd], 4), _fmt(v[kd], 5), _fmt(v["precision"]),
                         _fmt(v["recall"])])
        doc.table(["scope", "real", "synthetic", fd, kd, "precision", "recall"], rows,
                  f"{res['samples']} synthetic samples, extractor {res['extractor']} (k={res['k']})")


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
@closes_stage_logs
def run(cfg: ReportConfig) -> Path:
    p = _paths(cfg)
    if not p["run"].is_dir() and not any(Path(x).is_dir() for x in (cfg.data, cfg.samples, cfg.eval) if x):
        raise HistoError(f"run directory not found: {p['run']}")
    out = start_run_dir(Path(cfg.out) if cfg.out else p["layout"].report, cfg, "report")
    log = get_logger("report", out / "log.txt")
    subset = cfg.subset
    if not subset and (p["eval"] / "config.json").is_file():
        subset = read_json(p["eval"] / "config.json").get("config", {}).get("subset", "")
    subset = subset or "train"
    figures = out / "figures"
    doc = Doc(figures)
    doc.h(1, f"histodiffusion report: {p['run'].resolve().name}")
    doc.p(f"Run directory {p['run'].resolve()}.", cls="note")
    from .report_quality import section_fidelity, section_latent_classifier
    from .report_verdict import section_fidelity_summary, section_verdict

    # 1. the first screen: verdict, efficacy table, class fidelity, sample grids
    doc.open_section("verdict")
    section_verdict(doc, p["eval"])
    section_fidelity_summary(doc, p["samples"])
    classes = _classes(p["data"])
    images = None
    if classes is not None:
        try:
            images = section_grids(doc, p, subset, classes, cfg.grid_per_class, cfg.grid_scale)
        except HistoError as e:  # e.g. samples made for other classes: say so, keep the other sections
            log.warning("report: image sections skipped: %s", e)
            doc.p(f"Image and embedding sections skipped: {e}")
    doc.close_section()
    # 2. details
    doc.open_section("details")
    doc.h(2, "Details")
    if section_data(doc, p, subset) is None:
        doc.p("No target dataset found: data, image and embedding sections are omitted.")
    if images is not None:
        section_embedding(doc, p, *images, classes, cfg.embedding)
    section_latent_classifier(doc, p)
    section_selection(doc, p)
    section_fidelity(doc, p)
    section_results(doc, p, p["eval"], test_table=False)
    from .runtime.layout import ARMS

    for extra in (p["layout"].evaluation(a) for a in ARMS if a):  # e.g. eval_nopretrain (the no-pretraining ablation)
        if extra.is_dir() and extra.resolve() != p["eval"].resolve():
            section_results(doc, p, extra, f"Downstream classification: {extra.name[len('eval_'):]}")
    section_generative(doc, p)
    doc.close_section()
    # 3. resolved configurations, folded
    section_configs(doc, p)
    title = html.escape(f"histodiffusion report: {p['run'].resolve().name}")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(doc.html) + "\n</body></html>\n")
    write_text_atomic(out / "index.html", page)
    write_text_atomic(out / "report.md", "\n".join(doc.md) + "\n")
    mark_complete(out, **completion_record(cfg))
    log.info("report written to %s", out / "index.html")
    return out
