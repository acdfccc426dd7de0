"""The independent class-fidelity judge as a model (trained by the `judge` stage, stages/judge.py): loading a
judge folder, its predictions on a sample directory and the records it writes there (fidelity.csv,
fidelity.json; the layout is described in stages/judge.py), and the realism metrics in its feature space.
`judge` and `score --samples S --judge J` both judge samples through here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.fidelity import class_fidelity
from ..data.evaldata import load_real, load_sample_images, read_filtered, read_samples
from ..runtime.artifacts import FILTERED_CSV, SAMPLES_CSV, selection_dir
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json, sha256_file, write_csv_atomic, write_json_atomic
from ..runtime.rundirs import is_complete

FIDELITY_JSON = "fidelity.json"
FIDELITY_CSV = "fidelity.csv"
FIDELITY_COLUMNS = ["id", "target", "judge_pred", "judge_p_target", "keep"]
JUDGE_JSON = "judge.json"
ROLE = "class-fidelity judge"


def load_judge(folder: str | Path):
    """(model, info) of a trained judge folder; info gains "path" and "id" (hash of its weights)."""
    from .classifier import load_classifier

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


def judge_samples(model, info: dict, sample_dir: str | Path, real=None) -> tuple[list[dict], dict]:
    """(fidelity.csv rows, fidelity.json record) of one sample directory; `real`: the judge's training
    tiles for the realism metrics of all samples ("realism") and of the kept ones ("realism_kept", when
    a keep-list exists; None: realism not computed)."""
    from .classifier import predict

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
    kept = [i for i, k in enumerate(keep or []) if k]
    if real is not None:  # features once: all samples' realism and the kept ones' read the same arrays
        real_feats, sample_feats = judge_features(model, real.images), judge_features(model, images)
    record = {"judge": {k: info.get(k) for k in ("path", "id", "name", "data", "subset", "n_train", "val_subset",
                                                 "val_accuracy", "n_val")},
              "samples": str(sample_dir), "samples_csv_sha256": sha256_file(sample_dir / SAMPLES_CSV),
              "filtered_csv_sha256": filtered_hash, "settings": sampler_settings(rows), "classes": classes,
              **class_fidelity(targets, preds, classes, keep),
              "realism": realism(model, info, real, None, targets, real_feats=real_feats, fake_feats=sample_feats)
              if real is not None else None,
              "realism_kept": realism(model, info, real, None, [targets[i] for i in kept], real_feats=real_feats,
                                      fake_feats=sample_feats[kept]) if real is not None and len(kept) >= 2 else None}
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
    from ..core.metrics import extract_features
    from .classifier import FeatureExtractor

    return extract_features(FeatureExtractor(model), images)


def realism(model, info: dict, real, images, targets: list[str], seed: int = 0, real_feats=None,
            fake_feats=None) -> dict:
    """FD/KD, precision/recall and coverage of the samples against the real tiles, in the judge's feature space
    (`real_feats` / `fake_feats`: the real tiles' / the samples' features when already computed, e.g. the
    real ones once for a whole sweep; `images` is then not read)."""
    import torch

    from ..core.metrics import generative_metrics, identity_extractor

    classes = list(info["classes"])
    fake_labels = np.array([classes.index(t) for t in targets])
    rf = judge_features(model, real.images) if real_feats is None else real_feats
    ff = judge_features(model, images) if fake_feats is None else fake_feats
    return generative_metrics(identity_extractor(rf.shape[1]), f"judge_{info['name']}", torch.from_numpy(rf),
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
