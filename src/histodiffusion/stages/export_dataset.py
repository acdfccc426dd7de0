"""Stage `export-dataset`: the augmented training set as files a user's own training code reads.

What the chain makes is a keep-list (select writes no image copies, evaluate reads the samples in place).
This stage writes the set a downstream classifier trains on, `evaluate`'s selected@ratio arm: the labeled
subset's real tiles and, per class, the first ratio x its real count of the keep-list's samples in rank
order; with `pseudo`, also the pool tiles the evaluation's pseudo arm labelled (pseudo@ratio: per class
those of class_rank <= ratio x its real count; pseudo+selected@ratio with the samples), as one folder:

  labels.csv    path,label,group_id (the layout `prepare --labels-csv` reads; paths relative to the CSV),
                source (real | synthetic | pseudo), id (tile or sample id), origin and origin_group (the
                real tile a sample started from and its group; a pseudo tile's own group), rank and
                confidence (the selection's; a pseudo tile's class_rank and its reader's confidence)
  images/<class>/<source>__<id>.png   the tiles at the prepared size (an ImageFolder layout)
  dataset.json  counts per class and source, the inputs' hashes, the measured effect when given
  README.md     dataset card: what it holds, how it was made, what it was measured to do, how to use it
  config.json first, _COMPLETE.json last.

An added tile is its own group (group_id synthetic-<sample id> or pseudo-<tile id>: a group holds one label,
and a sample's or a pseudo tile's label may differ from its group's others); origin_group names the real group
(of the tile a sample started from, with strength < 1), to keep a tile with its group. Added tiles are
training data: never put them in a validation or test split. With `evaluation`, the card quotes that
evaluation's paired effect of the exported arm (it must have measured this keep-list on this subset:
checked). With a judge's fidelity.csv in the sample directory (`histodiffusion judge --samples`), the card gives the judge's class
fidelity of exactly the exported samples. Single process: under a launcher only rank 0 works and writes.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..core.evalsummary import format_ci
from ..data.evaldata import load_real, quota, ranked_kept, read_filtered, read_samples
from ..models.cards import CITATION, dataset_line
from ..runtime.artifacts import FILTERED_CSV, SAMPLES_CSV, read_dataset, selection_dir
from ..runtime.config import ExportDatasetConfig
from ..runtime.contract import check_complete, completion_record
from ..runtime.distributed import dist_info
from ..runtime.errors import HistoError
from ..runtime.fileio import (atomic_path, read_csv, read_json, sha256_file, write_csv_atomic, write_json_atomic,
                              write_text_atomic)
from ..runtime.log import closes_stage_logs, get_logger
from ..runtime.rundirs import is_complete, mark_complete, remove_stale_temps, start_run_dir

LABELS_CSV = "labels.csv"
LABELS_COLUMNS = ["path", "label", "group_id", "source", "id", "origin", "origin_group", "rank", "confidence"]
SOURCES = ("real", "synthetic", "pseudo")  # labels.csv's source column
DATASET_JSON = "dataset.json"
CARD = "README.md"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_name(source: str, tile_id: str) -> str:
    """`<source>__<id>.png` with every run of characters outside [A-Za-z0-9._-] (e.g. the '/' of LC25000
    ids) turned into '_'."""
    return f"{source}__{_UNSAFE.sub('_', tile_id)}.png"


# --------------------------------------------------------------------------------------------
# What is exported
# --------------------------------------------------------------------------------------------
def chosen_samples(cfg: ExportDatasetConfig, classes: list[str], real_counts: dict[str, int], log) -> list[dict]:
    """selected@ratio: per class the first quota(ratio, real count) kept samples of the keep-list in rank
    order, each as its samples.csv row joined with its filtered.csv row ("selection")."""
    rows = {r["id"]: r for r in read_samples(cfg.samples, classes)}
    selection = selection_dir(cfg.samples, cfg.selection)
    filtered = read_filtered(selection)
    unknown = [f["id"] for f in filtered if f["id"] not in rows]
    if unknown:
        raise HistoError(f"{selection / FILTERED_CSV} lists sample {unknown[0]!r} that {cfg.samples}/{SAMPLES_CSV} "
                         f"lacks: re-run select")
    out = []
    for c, kept in ranked_kept(filtered, classes).items():
        want = quota(cfg.ratio, real_counts[c])
        if len(kept) < want:
            log.warning("export-dataset: the keep-list has %d %r samples, ratio %g asks for %d (%g x %d real): "
                        "exporting %d (select --quota-ratio %g fills each class from its ranked list)",
                        len(kept), c, cfg.ratio, want, cfg.ratio, real_counts[c], len(kept), cfg.ratio)
        out += [{**rows[f["id"]], "selection": f} for f in kept[:want]]
    return out


def chosen_pseudo(cfg: ExportDatasetConfig, classes: list[str], real_counts: dict[str, int]) -> tuple[list[dict], list]:
    """pseudo@ratio: per class the evaluation's pseudo_labels.csv rows of class_rank <= quota(ratio, real
    count), and their pixels (uint8 [H, W, 3] each) from the dataset."""
    from ..data.datasets import PixelDataset

    path = Path(cfg.evaluation) / "pseudo_labels.csv"
    if not path.is_file():
        raise HistoError(f"--pseudo true exports the tiles the pseudo arm labelled, but {path} does not exist: "
                         f"evaluate with the pseudo arm (--arms ...,pseudo)")
    evaluated = read_json(path.parent / "config.json", "evaluation config").get("config") or {}
    if evaluated.get("pseudo_rank", "confidence") != "confidence":
        raise HistoError(f"evaluation {path.parent} drew its pseudo tiles at random (--pseudo-rank "
                         f"{evaluated.get('pseudo_rank')}, a draw per seed): the export takes each class's most "
                         f"confident, which that evaluation did not measure")
    rows = read_csv(path, ["id", "group", "pseudo_label", "confidence", "class_rank"], "pseudo labels")
    chosen = [r for r in rows if r["pseudo_label"] in real_counts
              and int(r["class_rank"]) <= quota(cfg.ratio, real_counts[r["pseudo_label"]])]
    chosen.sort(key=lambda r: (classes.index(r["pseudo_label"]), int(r["class_rank"])))
    ds = PixelDataset(cfg.data, ids=[r["id"] for r in chosen]) if chosen else None
    at = {r["id"]: i for i, r in enumerate(ds.rows)} if ds else {}
    missing = [r["id"] for r in chosen if r["id"] not in at]
    if missing:
        raise HistoError(f"{path} names tile {missing[0]!r} that {cfg.data} lacks: the evaluation is of another "
                         f"dataset")
    return chosen, [ds.uint8(at[r["id"]]) for r in chosen]


def exported_arm(cfg: ExportDatasetConfig) -> str:
    """The evaluate arm whose added tiles the export holds: selected@R, pseudo@R or pseudo+selected@R."""
    kind = "pseudo+selected" if cfg.pseudo and cfg.synthetic else "pseudo" if cfg.pseudo else "selected"
    return f"{kind}@{cfg.ratio:g}"


def measured_effect(cfg: ExportDatasetConfig) -> dict | None:
    """The evaluation's paired effect of the exported arm ({"arm", "seeds", "accuracy", "vs_real",
    "vs_classic", "noise_floor"}), refused unless it measured this keep-list on this subset."""
    if not cfg.evaluation:
        return None
    ev = Path(cfg.evaluation)
    if not is_complete(ev) or not (ev / "metrics.json").is_file():
        raise HistoError(f"evaluation {ev} is not a complete evaluate output (no _COMPLETE.json or metrics.json)")
    metrics = read_json(ev / "metrics.json", "evaluation metrics")
    arm = exported_arm(cfg)
    if arm not in (metrics.get("arms") or {}):
        raise HistoError(f"evaluation {ev} has no arm {arm} (its arms: {sorted(metrics.get('arms') or {})}): "
                         f"export the ratio it measured or evaluate this one")
    subset = (metrics.get("data") or {}).get("subset")
    if subset != cfg.subset:
        raise HistoError(f"evaluation {ev} trained on subset {subset!r}, this export holds subset {cfg.subset!r}")
    keep_list = ev / "keep_list.json"
    filtered = selection_dir(cfg.samples, cfg.selection) / FILTERED_CSV
    used = read_json(keep_list, "keep-list record").get("sha256") if cfg.synthetic and keep_list.is_file() else None
    if cfg.synthetic and used != sha256_file(filtered):
        raise HistoError(f"evaluation {ev} measured another keep-list than {filtered} ({keep_list}: sha256 "
                         f"{str(used)[:12]}): select was re-run since, or the evaluation is of other samples")
    return {"arm": arm, "evaluation": str(ev), "seeds": metrics.get("seeds"),
            "accuracy": metrics["arms"][arm].get("accuracy"), "real": metrics["arms"].get("real", {}).get("accuracy"),
            "vs_real": (metrics.get("deltas") or {}).get(arm, {}).get("accuracy"),
            "vs_classic": (metrics.get("deltas_vs_classic") or {}).get(arm, {}).get("accuracy"),
            "noise_floor": (metrics.get("noise_floor") or {}).get("accuracy")}


def judged_fidelity(cfg: ExportDatasetConfig, chosen: list[dict], classes: list[str]) -> dict | None:
    """The judge's class fidelity of the exported samples, from the sample directory's fidelity.csv when the
    judge read these very samples (fidelity.json's samples.csv hash); None without one."""
    from ..core.fidelity import fidelity_block
    from ..models.judge import FIDELITY_JSON

    samples = Path(cfg.samples)
    record_path, per_sample = samples / FIDELITY_JSON, samples / "fidelity.csv"
    if not (record_path.is_file() and per_sample.is_file()) or not chosen:
        return None
    record = read_json(record_path, "fidelity record")
    if record.get("samples_csv_sha256") != sha256_file(samples / SAMPLES_CSV):
        return None  # judged before the samples changed: not these samples
    pred = {r["id"]: r["judge_pred"] for r in read_csv(per_sample, ["id", "judge_pred"], "fidelity.csv")}
    if any(s["id"] not in pred for s in chosen):
        return None
    block = fidelity_block([s["target"] for s in chosen], [pred[s["id"]] for s in chosen], classes)
    return {**block, "judge": (record.get("judge") or {}).get("path")}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_images(cfg: ExportDatasetConfig, real, chosen: list[dict], pseudo: tuple[list[dict], list],
                 starts: dict[str, str], out: Path) -> list[dict]:
    """images/<class>/ (built beside and renamed into place) and the rows of labels.csv."""
    from PIL import Image

    rows, names = [], set()

    def row(label: str, source: str, tile_id: str, group: str, **extra) -> str:
        rel = f"images/{label}/{file_name(source, tile_id)}"
        if rel in names:
            raise HistoError(f"two tiles map to one file name {rel} (ids differing only in characters outside "
                             f"[A-Za-z0-9._-], e.g. {tile_id!r})")
        names.add(rel)
        rows.append({"path": rel, "label": label, "group_id": group, "source": source, "id": tile_id,
                     **{k: extra.get(k, "") for k in ("origin", "origin_group", "rank", "confidence")}})
        return rel

    def target(tmp: Path, rel: str) -> Path:
        path = tmp / Path(rel).relative_to("images")
        path.parent.mkdir(exist_ok=True)  # a class folder only for a class with tiles (ImageFolder refuses empty ones)
        return path

    with atomic_path(out / "images") as tmp:
        tmp.mkdir()
        if cfg.real:
            for i, tile_id in enumerate(real.ids):
                rel = row(real.classes[int(real.labels[i])], "real", tile_id, real.groups[i])
                Image.fromarray(real.images[i].numpy()).save(target(tmp, rel))
        for s in chosen:
            origin = s.get("init_id") or ""
            rel = row(s["target"], "synthetic", s["id"], f"synthetic-{s['id']}", origin=origin,
                         origin_group=starts.get(origin, "") if origin else "", rank=s["selection"]["rank"],
                         confidence=s["selection"]["confidence"])
            shutil.copyfile(Path(cfg.samples) / s["file"], target(tmp, rel))
        for r, pixels in zip(*pseudo):
            rel = row(r["pseudo_label"], "pseudo", r["id"], f"pseudo-{r['id']}", origin_group=r["group"],
                         rank=r["class_rank"], confidence=r["confidence"])
            Image.fromarray(pixels.numpy()).save(target(tmp, rel))
    return rows


def card(cfg: ExportDatasetConfig, summary: dict) -> str:
    """README.md of the exported set."""
    counts, effect, fid = summary["counts"], summary["measured"], summary["judge_fidelity"]
    sources = [k for k in SOURCES if any(n[k] for n in counts.values())]
    table = [f"| class | {' | '.join(sources)} |", "|---|" + "---:|" * len(sources)] + [
        f"| {c} | {' | '.join(str(n[k]) for k in sources)} |" for c, n in counts.items()]
    added = [f"{summary['n_synthetic']} synthetic tiles (per class the first {cfg.ratio:g} x its real count of the "
             f"selection's keep-list in rank order)"] if cfg.synthetic else []
    added += [f"{summary['n_pseudo']} pseudo-labelled tiles of the pool (per class the {cfg.ratio:g} x its real count "
              f"its reader was most confident of; labels read by the classifiers of {cfg.evaluation}, not the tiles' "
              f"own)"] if cfg.pseudo else []

    def ci(d: dict | None, signed: bool = True) -> str:
        return format_ci(d, signed, missing="not measured")

    if effect:
        measured = (f"`{effect['arm']}` in {effect['evaluation']} ({len(effect['seeds'] or [])} seeds, test split, "
                    f"95% t-intervals): accuracy {ci(effect['accuracy'], False)} against real-only "
                    f"{ci(effect['real'], False)}; paired difference vs real-only {ci(effect['vs_real'])}, vs "
                    f"classic augmentation {ci(effect['vs_classic'])}; A/A noise floor {ci(effect['noise_floor'])}.")
    else:
        measured = (f"Not measured with this export: `histodiffusion evaluate` (arms real, real_aa, classic and "
                    f"{exported_arm(cfg).split('@')[0]} at ratio {cfg.ratio:g}) measures it; pass its folder as "
                    f"`--evaluation` to quote it here.")
    if effect and not cfg.real:
        measured += " (It was measured with the real tiles, which this export leaves out.)"
    fidelity = "" if not cfg.synthetic else (
        f"An independent judge ({fid['judge']}) reads {fid['hits']} of the {fid['n']} synthetic tiles as their "
        f"label ({fid['fidelity']:.3f}, 95% CI [{fid['ci95'][0]:.3f}, {fid['ci95'][1]:.3f}])." if fid else
        "No judge has read these samples (`histodiffusion judge --samples` gives their class fidelity).")
    return "\n".join([
        "# Augmented training set (histodiffusion)", "",
        f"{summary['n_real']} real tiles (subset `{cfg.subset}`) and {' and '.join(added)}: the set `evaluate` "
        f"calls `{exported_arm(cfg)}`.", "", *table, "",
        "## Where it comes from", "",
        f"- Real tiles: {dataset_line(cfg.data)}",
        *([f"- Synthetic tiles: {cfg.samples} (samples.csv: seeds and sampler; `pipeline/` remakes them), kept by "
           f"{selection_dir(cfg.samples, cfg.selection)} (filtered.csv sha256 "
           f"{summary['inputs']['filtered_csv'][:12]})."] if cfg.synthetic else []),
        *([f"- Pseudo-labelled tiles: train-split tiles of the same dataset outside the subset, read by the "
           f"classifiers of {cfg.evaluation} (its pseudo_labels.csv)."] if cfg.pseudo else []),
        "- Labels of added tiles are the classes they were made for or read as, not a pathologist's.", "",
        "## What it was measured to do", "", measured, "", fidelity, "",
        "## Use it", "",
        "`labels.csv` lists every tile (path relative to it, label, group_id, source real | synthetic); the "
        "images are also laid out one folder per class (`torchvision.datasets.ImageFolder('images')`). Train on "
        "it; keep the added tiles out of every validation and test split. An added tile is its own group "
        "(`synthetic-<id>`, `pseudo-<id>`); `origin` and `origin_group` name the real tile a sample started from "
        "and that tile's group (a pseudo tile's own group), to keep a tile on the same side of a split as its "
        "group.", "",
        "## Citation", "", CITATION, ""])


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
@closes_stage_logs
def run(cfg: ExportDatasetConfig) -> Path:
    rank, _ = dist_info()
    out = Path(cfg.out)
    if rank != 0:  # file copies: one process does it all
        return out
    log = get_logger("export-dataset")
    if check_complete(out, cfg):
        log.info("export-dataset: already complete: %s", out)
        return out
    # 1. inputs, checked before anything is written: the real subset, the samples and their keep-list, the
    #    evaluation whose effect the card quotes
    if not cfg.synthetic and not cfg.pseudo:
        raise HistoError("nothing to add to the real tiles: --synthetic false needs --pseudo true")
    if cfg.pseudo and not cfg.evaluation:
        raise HistoError("--pseudo true exports the tiles an evaluation's pseudo arm labelled: give --evaluation")
    real = load_real(cfg.data, cfg.subset)
    real_counts = real.counts()
    chosen = chosen_samples(cfg, real.classes, real_counts, log) if cfg.synthetic else []
    effect = measured_effect(cfg)
    pseudo = chosen_pseudo(cfg, real.classes, real_counts) if cfg.pseudo else ([], [])
    if not cfg.real and not chosen and not pseudo[0]:
        raise HistoError(f"nothing to export: --real false and no tile to add (the keep-list of "
                         f"{selection_dir(cfg.samples, cfg.selection)} keeps no sample)")
    starts = {r["id"]: r["group"] for r in read_dataset(cfg.data)[1]} if any(s.get("init_id") for s in chosen) else {}
    # 2. the images and labels.csv (a killed export's temporaries are removed first)
    start_run_dir(out, cfg, "export-dataset")
    log = get_logger("export-dataset", out / "log.txt")
    remove_stale_temps(out)
    rows = write_images(cfg, real, chosen, pseudo, starts, out)
    write_csv_atomic(out / LABELS_CSV, rows, LABELS_COLUMNS)
    # 3. what it holds and what it was measured to do; the marker last
    counts = {c: {k: sum(r["label"] == c and r["source"] == k for r in rows) for k in SOURCES} for c in real.classes}
    totals = {k: sum(n[k] for n in counts.values()) for k in SOURCES}
    parts = [f"{totals['real']} real"] + [f"{totals[k]} {k}" for k in SOURCES[1:] if getattr(cfg, k)]
    inputs = {"samples_csv": sha256_file(Path(cfg.samples) / SAMPLES_CSV),
              "filtered_csv": sha256_file(selection_dir(cfg.samples, cfg.selection) / FILTERED_CSV)} \
        if cfg.synthetic else {}
    summary = {"subset": cfg.subset, "ratio": cfg.ratio, "arm": exported_arm(cfg),
               **{f"n_{k}": v for k, v in totals.items()}, "counts": counts, "classes": real.classes,
               "description": f"{' + '.join(parts)} tiles ({exported_arm(cfg)})", "inputs": inputs,
               "measured": effect, "judge_fidelity": judged_fidelity(cfg, chosen, real.classes)}
    write_json_atomic(out / DATASET_JSON, summary)
    write_text_atomic(out / CARD, card(cfg, summary))
    mark_complete(out, **completion_record(cfg))
    log.info("export-dataset: %d real + %d synthetic + %d pseudo-labelled tiles -> %s", summary["n_real"],
             summary["n_synthetic"], summary["n_pseudo"], out / LABELS_CSV)
    return out
