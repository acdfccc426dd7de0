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
classifier), judge.json (training tiles, counts, fingerprint of the training tiles, "trained_on": what
the loaded training tiles were (count, splits, sha256 of their sorted ids and pixel hashes), validation
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

import hashlib
from pathlib import Path

from ..data.evaldata import dataset_classes, load_real, read_samples, subset_fingerprint
from ..models.cards import CARD, classifier_card
from ..models.judge import JUDGE_JSON, ROLE, judge_samples, load_judge, summary_line, write_fidelity
from ..runtime.config import JudgeConfig
from ..runtime.contract import completion_record
from ..runtime.distributed import dist_info
from ..runtime.errors import HistoError
from ..runtime.fileio import write_json_atomic, write_text_atomic
from ..runtime.log import closes_stage_logs, get_logger
from ..runtime.rundirs import is_complete, mark_complete, start_run_dir

TRAIN_SPLIT = "train"


# --------------------------------------------------------------------------------------------
# The judge's training tiles: the train split only
# --------------------------------------------------------------------------------------------
def judge_training_ids(data: str | Path, subset: str) -> list[str]:
    """Ids of `subset` of `data`, refused when any of them lies outside the train split or shares a
    group with a validation or test tile."""
    from ..runtime.artifacts import subset_ids

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


def assert_train_only(tiles, data: str | Path) -> dict:
    """Checked again on the tiles actually loaded for training (a second line of defence); returns what
    judge.json records of them ("trained_on"): their count, the splits they lie in, and sha256 digests of
    their sorted ids and of their sorted pixel hashes, so anyone can check what the judge saw."""
    from ..runtime.artifacts import read_dataset

    _, rows = read_dataset(data)
    split = {r["id"]: r["split"] for r in rows}
    bad = [i for i in tiles.ids if split.get(i) != TRAIN_SPLIT]
    if bad:
        raise HistoError(f"judge: refusing to train on {len(bad)} tile(s) outside the train split of {data}, "
                         f"e.g. {bad[0]!r}")
    pixels = sorted(hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in tiles.images)
    return {"n": len(tiles), "splits": sorted({split[i] for i in tiles.ids}),
            "ids_sha256": hashlib.sha256("\n".join(sorted(tiles.ids)).encode()).hexdigest(),
            "pixels_sha256": hashlib.sha256("\n".join(pixels).encode()).hexdigest()}


# --------------------------------------------------------------------------------------------
# Train once (or reuse)
# --------------------------------------------------------------------------------------------
def ensure_judge(cfg: JudgeConfig, ids: list[str], out: Path, log):
    """The judge of cfg.out: trained on the tiles `ids` (train split, checked) unless already there."""
    from ..models.classifier import build_classifier, save_classifier, train_classifier

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
    trained_on = assert_train_only(tiles, cfg.data)
    from ..runtime.distributed import seed_everything

    seed_everything(cfg.seed)
    size = int(tiles.images.shape[1])
    model = build_classifier(cfg.backbone, len(tiles.classes), size)
    log.info("judge: training %s on %d tiles of %s (%s) for %d steps", cfg.backbone, len(tiles), cfg.data,
             cfg.subset, cfg.steps)
    train_classifier(model, tiles.images, tiles.labels, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                     seed=cfg.seed, augment=True, desc="judge")
    record = {"data": str(cfg.data), "subset": cfg.subset, "fingerprint": fingerprint, "n_train": len(tiles),
              "train_counts": tiles.counts(), "train_splits": [TRAIN_SPLIT], "trained_on": trained_on,
              "val_subset": cfg.val_subset,
              "val_accuracy": None, "n_val": 0}
    if cfg.val_subset:  # scored after training only: no checkpoint is chosen on it
        from ..models.classifier import predict

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


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
@closes_stage_logs
def run(cfg: JudgeConfig) -> Path:
    from ..runtime.artifacts import subset_ids

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
