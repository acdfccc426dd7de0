"""Stage `judge`: an independent judge of class fidelity (a measurement, never part of the method).

A classifier trained on the labeled tiles of the target's TRAIN split only scores every synthetic
sample. Class fidelity = the share of samples it assigns to their target class, per class and over
all classes, for all samples and for the kept ones (the keep flag of filtered.csv), each with a 95%
Wilson interval. The judge is independent of what it measures: it is not the latent classifier that
guided the samples nor the feature classifier of `select`, and it never sees a validation or test
tile (a subset holding one is refused before anything is written, and the tiles it is trained on
are checked again once loaded; validation tiles are only scored after training, to show the judge
can be trusted: they never choose its weights, which are the last ones).

Judge folder (cfg.out), trained once per dataset and reused: config.json first, model/ (the saved
classifier), judge.json (training tiles, counts, fingerprint of the training tiles, validation
accuracy), _COMPLETE.json last. A dataset whose training tiles changed since is refused.

Per judged sample directory (`judge --samples S`; `score --samples S --judge J` writes the same two
files into score's output directory):
  fidelity.csv   id, target, judge_pred, judge_p_target, keep (-1: no filtered.csv)
  fidelity.json  the judge (id, data, validation accuracy), hashes of samples.csv and filtered.csv,
                 the sampler settings, "all" and "kept" fidelity blocks (n, hits, fidelity, ci95,
                 macro_fidelity, per class with what the judge predicted), and "realism": FD/KD and
                 precision/recall of the samples against the judge's training tiles in its feature
                 space (null when not computed). Written last.
Single process: under a launcher, only rank 0 works and writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtime.artifacts import FILTERED_CSV, SAMPLES_CSV, selection_dir
from .runtime.config import JudgeConfig
from .runtime.contract import completion_record
from .data.evaldata import dataset_classes, load_real, load_sample_images, read_filtered, read_samples, subset_fingerprint
from .models.cards import CARD, classifier_card
from .runtime.errors import HistoError
from .runtime.log import closes_stage_logs, get_logger
from .runtime.distributed import dist_info
from .runtime.rundirs import is_complete, mark_complete, start_run_dir
from .runtime.fileio import read_json, sha256_file, write_csv_atomic, write_json_atomic, write_text_atomic

FIDELITY_JSON = "fidelity.json"
FIDELITY_CSV = "fidelity.csv"
FIDELITY_COLUMNS = ["id", "target", "judge_pred", "judge_p_target", "keep"]
JUDGE_JSON = "judge.json"
ROLE = "class-fidelity judge"
TRAIN_SPLIT = "train"


# --------------------------------------------------------------------------------------------
# Pure fidelity arithmetic
# --------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion k / n (None when n = 0)."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def fidelity_block(targets: list[str], preds: list[str], classes: list[str]) -> dict:
    """Share of samples the judge assigns to their target class: over all samples, macro (mean over the
    classes that have samples) and per class, with what the judge predicted for each target class."""
    per_class = {}
    for c in classes:
        idx = [i for i, t in enumerate(targets) if t == c]
        hits = sum(preds[i] == c for i in idx)
        per_class[c] = {"n": len(idx), "hits": hits, "fidelity": hits / len(idx) if idx else None,
                        "ci95": wilson(hits, len(idx)), "predicted": {p: sum(preds[i] == p for i in idx)
                                                                     for p in classes}}
    n = len(targets)
    hits = sum(t == p for t, p in zip(targets, preds))
    present = [v["fidelity"] for v in per_class.values() if v["n"]]
    return {"n": n, "hits": hits, "fidelity": hits / n if n else None, "ci95": wilson(hits, n),
            "macro_fidelity": float(np.mean(present)) if present else None, "per_class": per_class}


def class_fidelity(targets: list[str], preds: list[str], classes: list[str], keep: list[int] | None = None) -> dict:
    """{"all": block, "kept": block over the samples with keep = 1, or None without a selection}."""
    if len(targets) != len(preds) or (keep is not None and len(keep) != len(targets)):
        raise ValueError("targets, predictions and keep flags must have one entry per sample")
    unknown = sorted(set(targets) - set(classes))
    if unknown:
        raise HistoError(f"sample target class(es) {unknown} are not classes of the judge ({classes})")
    out = {"all": fidelity_block(list(targets), list(preds), classes), "kept": None}
    if keep is not None:
        idx = [i for i, k in enumerate(keep) if int(k) == 1]
        out["kept"] = fidelity_block([targets[i] for i in idx], [preds[i] for i in idx], classes)
    return out


# --------------------------------------------------------------------------------------------
# The judge's training tiles: the train split only
# --------------------------------------------------------------------------------------------
def judge_training_ids(data: str | Path, subset: str) -> list[str]:
    """Ids of `subset` of `data`, refused when any of them lies outside the train split or shares a
    group with a validation or test tile."""
    from .runtime.artifacts import subset_ids

    _, rows, _ = dataset_classes(data)
    ids = subset_ids(data, rows, subset)
    split = {r["id"]: r["split"] for r in rows}
    bad = [i for i in ids if split.get(i) != TRAIN_SPLIT]
    if bad:
        where = ", ".join(sorted({str(split.get(i)) for i in bad}))
        raise HistoError(f"judge: subset {subset!r} of {data} holds {len(bad)} tile(s) outside the train split "
                         f"({where}; e.g. {bad[0]!r}): the judge trains on train-split tiles only, never on "
                         f"validation or test tiles")
    group = {r["id"]: r["group"] for r in rows}
    held_out = {r["group"] for r in rows if r["split"] != TRAIN_SPLIT}
    shared = sorted({group[i] for i in ids} & held_out)
    if shared:
        raise HistoError(f"judge: {len(shared)} group(s) of subset {subset!r} of {data} also hold validation/test "
                         f"tiles, e.g. {shared[0]!r}: the split leaks; re-run prepare (splits must be by group)")
    return ids


def assert_train_only(tiles, data: str | Path) -> None:
    """Checked again on the tiles actually loaded for training (a second line of defence)."""
    from .runtime.artifacts import read_dataset

    _, rows = read_dataset(data)
    split = {r["id"]: r["split"] for r in rows}
    bad = [i for i in tiles.ids if split.get(i) != TRAIN_SPLIT]
    if bad:
        raise HistoError(f"judge: refusing to train on {len(bad)} tile(s) outside the train split of {data}, "
                         f"e.g. {bad[0]!r}")


# --------------------------------------------------------------------------------------------
# Train once, load, judge
# --------------------------------------------------------------------------------------------
def load_judge(folder: str | Path):
    """(model, info) of a trained judge folder; info gains "path" and "id" (hash of its weights)."""
    from .models.classifier import load_classifier

    folder = Path(folder)
    if not is_complete(folder) or not (folder / "model" / "classifier.json").is_file():
        raise HistoError(f"no trained judge in {folder}: run `histodiffusion judge --data <target dataset> "
                         f"--out {folder}` first")
    model, info = load_classifier(folder / "model")
    if info.get("role") != ROLE:
        raise HistoError(f"{folder} holds a classifier that is not a class-fidelity judge (role {info.get('role')!r})")
    info = {**info, **read_json(folder / JUDGE_JSON, "judge record"), "path": str(folder.resolve()),
            "id": sha256_file(folder / "model" / "model.safetensors")[:16]}
    return model, info


def ensure_judge(cfg: JudgeConfig, ids: list[str], out: Path, log):
    """The judge of cfg.out: trained on the tiles `ids` (train split, checked) unless already there."""
    from .models.classifier import build_classifier, save_classifier, train_classifier

    fingerprint = subset_fingerprint(cfg.data, cfg.subset)
    if is_complete(out):
        model, info = load_judge(out)
        if info.get("fingerprint") != fingerprint:
            raise HistoError(f"judge {out} was trained on other tiles than subset {cfg.subset!r} of {cfg.data} has "
                             f"now (the dataset changed): use another --out or delete {out}")
        log.info("judge: reusing %s (trained on %d tiles, val accuracy %s)", out, info["n_train"],
                 info.get("val_accuracy"))
        return model, info
    tiles = load_real(cfg.data, cfg.subset, ids=ids)
    assert_train_only(tiles, cfg.data)
    from .runtime.distributed import seed_everything

    seed_everything(cfg.seed)
    size = int(tiles.images.shape[1])
    model = build_classifier(cfg.backbone, len(tiles.classes), size)
    log.info("judge: training %s on %d tiles of %s (%s) for %d steps", cfg.backbone, len(tiles), cfg.data,
             cfg.subset, cfg.steps)
    train_classifier(model, tiles.images, tiles.labels, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                     seed=cfg.seed, augment=True, desc="judge")
    record = {"data": str(cfg.data), "subset": cfg.subset, "fingerprint": fingerprint, "n_train": len(tiles),
              "train_counts": tiles.counts(), "train_splits": [TRAIN_SPLIT], "val_subset": cfg.val_subset,
              "val_accuracy": None, "n_val": 0}
    if cfg.val_subset:  # scored after training only: no checkpoint is chosen on it
        from .models.classifier import predict

        val = load_real(cfg.data, cfg.val_subset)
        probs, _ = predict(model, val.images)
        record.update(val_accuracy=float((probs.argmax(1) == val.labels).float().mean()), n_val=len(val))
        log.info("judge: accuracy %.3f on %d %s tiles (measured after training)", record["val_accuracy"], len(val),
                 cfg.val_subset)
    save_classifier(model, out / "model", {"name": cfg.backbone, "classes": tiles.classes, "image_size": size,
                                           "role": ROLE, "steps": cfg.steps, "batch_size": cfg.batch_size,
                                           "lr": cfg.lr, "seed": cfg.seed, **record})
    write_json_atomic(out / JUDGE_JSON, record)
    write_text_atomic(out / "model" / CARD, classifier_card(out / "model", str(out / "model")))
    mark_complete(out, **completion_record(cfg))
    return load_judge(out)


def judge_samples(model, info: dict, sample_dir: str | Path, real=None) -> tuple[list[dict], dict]:
    """(fidelity.csv rows, fidelity.json record) of one sample directory; `real`: the judge's training
    tiles for the realism metrics (None: realism not computed)."""
    from .models.classifier import predict

    sample_dir = Path(sample_dir)
    classes = list(info["classes"])
    rows = read_samples(sample_dir, classes)
    images = load_sample_images(sample_dir, rows, int(info["image_size"]))
    probs, _ = predict(model, images)
    preds = [classes[int(i)] for i in probs.argmax(1)]
    targets = [r["target"] for r in rows]
    keep, filtered_hash = None, None
    selection = selection_dir(sample_dir)
    if (selection / FILTERED_CSV).is_file():
        filt = {f["id"]: f for f in read_filtered(selection)}
        missing = [r["id"] for r in rows if r["id"] not in filt]
        if missing:
            raise HistoError(f"{selection / FILTERED_CSV} lacks sample {missing[0]!r} of samples.csv: re-run select")
        keep = [int(filt[r["id"]]["keep"]) for r in rows]
        filtered_hash = sha256_file(selection / FILTERED_CSV)
    per_sample = [{"id": r["id"], "target": t, "judge_pred": p, "keep": keep[i] if keep is not None else -1,
                   "judge_p_target": round(float(probs[i, classes.index(t)]), 6)}
                  for i, (r, t, p) in enumerate(zip(rows, targets, preds))]
    record = {"judge": {k: info.get(k) for k in ("path", "id", "name", "data", "subset", "n_train", "val_subset",
                                                 "val_accuracy", "n_val")},
              "samples": str(sample_dir), "samples_csv_sha256": sha256_file(sample_dir / SAMPLES_CSV),
              "filtered_csv_sha256": filtered_hash, "settings": sampler_settings(rows), "classes": classes,
              **class_fidelity(targets, preds, classes, keep),
              "realism": realism(model, info, real, images, targets) if real is not None else None}
    return per_sample, record


def sampler_settings(rows: list[dict]) -> dict:
    """The sampler settings of a sample directory (a list when they vary across samples)."""
    out = {}
    for k in ("scale", "scheduler", "steps", "eta", "window_lo", "window_hi"):
        vals = sorted({r.get(k, "") for r in rows})
        out[k] = vals[0] if len(vals) == 1 else vals
    return out


def judge_features(model, images) -> np.ndarray:
    """The judge's penultimate features of uint8 images (float64 [N, D])."""
    from .core.metrics import extract_features
    from .models.classifier import FeatureExtractor

    return extract_features(FeatureExtractor(model), images)


def realism(model, info: dict, real, images, targets: list[str], seed: int = 0, real_feats=None) -> dict:
    """FD/KD and precision/recall of the samples against the real tiles, in the judge's feature space
    (`real_feats`: the real tiles' features when already computed, e.g. once for a whole sweep)."""
    import torch

    from .core.metrics import _identity_extractor, generative_metrics

    classes = list(info["classes"])
    fake_labels = np.array([classes.index(t) for t in targets])
    rf = judge_features(model, real.images) if real_feats is None else real_feats
    ff = judge_features(model, images)
    return generative_metrics(_identity_extractor(rf.shape[1]), f"judge_{info['name']}", torch.from_numpy(rf),
                              real.labels.numpy(), torch.from_numpy(ff), fake_labels, classes, seed=seed)


def judge_real_tiles(info: dict):
    """The judge's training tiles, when its dataset is still readable (else None: realism not computed)."""
    if not (Path(info["data"]) / "manifest.csv").is_file():
        return None
    return load_real(info["data"], info["subset"])


def write_fidelity(directory: str | Path, per_sample: list[dict], record: dict) -> None:
    write_csv_atomic(Path(directory) / FIDELITY_CSV, per_sample, FIDELITY_COLUMNS)
    write_json_atomic(Path(directory) / FIDELITY_JSON, record)  # last


@dataclass
class Fidelity:
    """A judged sample directory, computed before anything is written (for `score`)."""
    per_sample: list[dict]
    record: dict

    def write(self, directory: str | Path) -> None:
        write_fidelity(directory, self.per_sample, self.record)


def score_fidelity(samples: str | Path, judge_dir: str | Path) -> Fidelity:
    """`score --samples S --judge J`: the class fidelity (and realism, when the judge's dataset is readable)."""
    if not judge_dir:
        raise HistoError(f"--samples {samples} needs --judge: a judge folder written by `histodiffusion judge`")
    model, info = load_judge(judge_dir)
    return Fidelity(*judge_samples(model, info, samples, judge_real_tiles(info)))


def summary_line(record: dict) -> str:
    def one(b):
        return "–" if not b or b["fidelity"] is None else f"{b['fidelity']:.3f} (n={b['n']})"
    return f"class fidelity: all {one(record['all'])}, kept {one(record['kept'])}"


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
@closes_stage_logs
def run(cfg: JudgeConfig) -> Path:
    from .runtime.artifacts import subset_ids

    rank, _ = dist_info()
    if rank != 0:  # a measurement: one process does it all
        return Path(cfg.out)
    # 1. refuse bad inputs before anything is written: training tiles (train split only), the validation
    #    split it is scored on, sample directories
    ids = judge_training_ids(cfg.data, cfg.subset)
    _, rows, classes = dataset_classes(cfg.data)
    if cfg.val_subset:
        subset_ids(cfg.data, rows, cfg.val_subset)
    for s in cfg.samples:
        read_samples(s, classes)
    # 2. the judge: trained once, then reused (samples / realism do not change it)
    out = start_run_dir(cfg.out, cfg, "judge", neutral=("samples", "realism"))
    log = get_logger("judge", out / "log.txt")
    model, info = ensure_judge(cfg, ids, out, log)
    # 3. fidelity (and realism) of every sample directory
    real = load_real(cfg.data, cfg.subset, ids=ids) if cfg.realism and cfg.samples else None
    for s in cfg.samples:
        per_sample, record = judge_samples(model, info, s, real)
        write_fidelity(s, per_sample, record)
        log.info("judge: %s: %s", s, summary_line(record))
    return out
