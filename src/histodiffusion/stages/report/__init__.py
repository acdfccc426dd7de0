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

import html
from pathlib import Path

from ...runtime.config import ReportConfig
from ...runtime.contract import completion_record
from ...runtime.errors import HistoError
from ...runtime.fileio import read_json, write_text_atomic
from ...runtime.log import closes_stage_logs, get_logger
from ...runtime.rundirs import mark_complete, start_run_dir
from .doc import CSS, Doc
from .images import section_embedding, section_grids
from .quality import section_fidelity, section_latent_classifier
from .sections import (classes_of, section_configs, section_data, section_generative, section_results,
                       section_selection)
from .verdict import section_augmented, section_fidelity_summary, section_verdict


def _paths(cfg: ReportConfig) -> dict[str, Path]:
    """The directories the report reads: the config's, else the run layout's (layout.py)."""
    from ...runtime.layout import RunLayout

    from ...runtime.artifacts import selection_dir

    L = RunLayout(cfg.run)
    samples = Path(cfg.samples) if cfg.samples else L.samples()
    return {"run": L.root, "layout": L, "data": Path(cfg.data) if cfg.data else L.data_target,
            "samples": samples, "select": selection_dir(samples),
            "eval": Path(cfg.eval) if cfg.eval else L.evaluation(),
            "latent_classifier": Path(cfg.latent_classifier) if cfg.latent_classifier else L.latent_classifier}


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
    # 1. the first screen: verdict, efficacy table, class fidelity, sample grids
    doc.open_section("verdict")
    section_verdict(doc, p["eval"])
    section_fidelity_summary(doc, p["samples"])
    section_augmented(doc, p["layout"].augmented)
    classes = classes_of(p["data"])
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
    from ...runtime.layout import ARMS

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
