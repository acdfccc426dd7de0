"""Stages `evaluate` and `score`: the downstream harness and the re-scoring of saved classifiers.

`evaluate` trains one downstream classifier per (arm, seed) with the SAME budget and
hyper-parameters (cfg.steps optimisation steps, or epochs x steps_per_epoch; batch size, AdamW lr,
cosine schedule, backbone, validation rule) and differs only in the training images:
  real            the real training subset (cfg.subset) only, no augmentation
  real_aa         exactly `real` with another seed stream (training seed + AA_SEED_OFFSET): the
                  paired delta real_aa - real is the harness's A/A noise floor ("noise_floor")
  classic         real + classic augmentation (flips, 90-degree rotations, colour jitter)
  classic_aa      exactly `classic` with another seed stream: classic_aa - classic is the noise floor of the
                  augmented harness ("noise_floors"), the one the synthetic arms train with
  selected@R      real + synthetic images kept in filtered.csv, best-ranked first, at most
                  quota(R, real count) per class; with classic augmentation
  unselected@R    real + synthetic images drawn at random (seeded by the training seed) from
                  samples.csv ignoring the filter, the same number per class as selected@R;
                  with classic augmentation
  pseudo@R        real + real tiles of the train split outside the training subset (labels never read)
                  that the cfg.pseudo_reader arm's classifiers (mean probability over the seeds; trained
                  first) read as each class, quota(R, real count) per class (cfg.pseudo_rank: the most
                  confident first, or drawn with the training seed); with classic augmentation. Plain
                  pseudo-labelling without a generator: what `run --start-from unlabeled` must beat
  pseudo+selected@R  real + pseudo@R's tiles + selected@R's samples, with classic augmentation: whether the
                  generator adds anything on top of pseudo-labelling
  start@R         real + the raw tiles selected@R's samples started from (samples.csv init_id, turned by
                  init_dihedral), each with its sample's target label, with classic augmentation: the same
                  choice of tiles and labels without the diffusion step
  roundtrip@R     real + the same tiles after one pass through the samples' autoencoder (<samples>/pipeline/vae;
                  the latent turned as the sampler turns it), with the samples' labels and classic augmentation:
                  the samples without their denoising step (not for samples made with detail=tile)
In the arms that add images each added image weighs cfg.synthetic_weight in the batch loss, a
real one 1 (sum(w * loss) / sum(w); 1: the plain mean, as before). With cfg.real_finish > 0 their last
round(real_finish x steps) steps draw batches from the real tiles only (fine-tuning on real after mixed
training; the same budget, the earlier steps unchanged).
Every classifier is scored on the validation split (cfg.val_subset) every cfg.val_every steps and
after the last; its best-validation weights (highest accuracy, then lowest loss, then earliest step)
are saved and scored, the same rule for every arm, and its validation curve is kept (scores.json,
merged into curves.csv) to show whether real-only has plateaued. With pseudo arms (pseudo, pseudo+selected)
the other arms train first; pseudo_labels.csv then records every pool tile's reading (and its true label where
it has one, for the measurement "pseudo" in metrics.json only). The training subset, validation and test
splits must be pairwise group-disjoint (checked: HistoError otherwise). Every classifier is
scored on the test split and on every external labeled dataset (cfg.external: ALL its tiles, classes
matched by name; a tile identical to a training tile is an error). Outputs (cfg.out): config.json
first, classifiers/<arm>_<seed>/ (model.safetensors, classifier.json, scores.json, _COMPLETE.json),
per_seed.csv, curves.csv, metrics.json ("testsets": {test, <external>...}: per arm mean, 95% t-CI, n
and paired deltas vs the real arm, of the synthetic arms vs classic, of selected@R, unselected@R,
pseudo+selected@R and start@R vs pseudo@R, of selected@R and roundtrip@R vs start@R ("deltas_vs_start": what the
diffusion step adds, and what the autoencoder's round trip alone costs) and of selected@R vs roundtrip@R
("deltas_vs_roundtrip": what the denoising step adds over the round trip); "start": per start arm the distinct starting tiles and, measurement only, the share whose own label is
the sample's target; start_tiles.csv lists those tiles); "arms" / "deltas" /
"deltas_vs_classic" / "noise_floor": the test split's, at the top level; "validation": per arm best step and mean curve), confusion/<testset>__<arm>.png (confusion
summed over seeds, rows normalised), _COMPLETE.json last. A finished (arm, seed) is skipped on
re-run, so a killed run resumes.

Multi-process (torchrun / accelerate launch): rank r trains jobs r, r+W, ...; each job's folder is
written by the rank that trained it (atomically); rank 0 waits for all and writes the merged outputs.

`score` re-scores saved classifiers (one folder or a folder of them) on any labeled dataset, and
with --samples and --judge writes the class fidelity of a sample directory (models/judge.py) beside them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..core import metrics as M
from ..core.evalsummary import (CURVE_COLUMNS, curve_rows, per_seed_columns, per_seed_rows, summarise,
                                validation_summary)
from ..data.evalarms import (AA_OF, PSEUDO_KINDS, SELECTED_KINDS, START_COLUMNS, SYNTHETIC_KINDS,
                             UNAUGMENTED_KINDS, check_groups_disjoint, expand_arms, label_agreement, pseudo_pool,
                             pseudo_sets, relabel, start_rows, start_summary, synthetic_sets, train_seed,
                             training_set)
from ..data.evaldata import Tiles, dataset_classes, load_real
from ..models.cards import CARD, classifier_card
from ..runtime.artifacts import FILTERED_CSV, confusion_name, selection_dir
from ..runtime.config import EvaluateConfig, ScoreConfig
from ..runtime.contract import completion_record
from ..runtime.distributed import dist_info, raise_if_any_rank_failed, seed_everything
from ..runtime.errors import HistoError
from ..runtime.fileio import atomic_path, read_json, write_csv_atomic, write_json_atomic, write_text_atomic
from ..runtime.log import closes_stage_logs, get_logger
from ..runtime.rundirs import is_complete, mark_complete, start_run_dir

TEST = "test"


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def score(model, tiles: Tiles, tta: bool = False) -> dict:
    """Test metrics of a model on tiles; `tta`: probabilities averaged over the 8 dihedral views."""
    from ..models.classifier import predict

    probs, _ = predict(model, tiles.images, tta=tta)
    return M.classification_metrics(tiles.labels.numpy(), probs.argmax(1).numpy(), tiles.classes)


def val_record(model, tiles: Tiles) -> dict:
    """Validation accuracy, macro-F1 and mean cross-entropy of a model on tiles (eval mode)."""
    from ..models.classifier import predict

    probs, _ = predict(model, tiles.images)
    m = M.classification_metrics(tiles.labels.numpy(), probs.argmax(1).numpy(), tiles.classes)
    p_true = probs[torch.arange(len(tiles)), tiles.labels].clamp_min(1e-12)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "loss": float(-p_true.log().mean())}


def load_external(paths, classes: list[str], train_hashes: set[str]) -> dict[str, Tiles]:
    from ..runtime.artifacts import read_dataset

    out = {}
    for p in paths:
        name = Path(p).name
        if name in out or name == TEST:
            raise HistoError(f"external test set name {name!r} (from {p}) is used twice or clashes with 'test'")
        tiles = relabel(load_real(p, "all"), classes, f"external test set {p}")
        _, rows = read_dataset(p)
        dup = [r["id"] for r in rows if r["hash"] in train_hashes]
        if dup:
            raise HistoError(f"external test set {p}: tile {dup[0]!r} is identical to a training tile")
        out[name] = tiles
    return out


# --------------------------------------------------------------------------------------------
# Stage: evaluate
# --------------------------------------------------------------------------------------------
@closes_stage_logs
def run(cfg: EvaluateConfig) -> Path:
    from ..runtime.artifacts import read_dataset

    rank, world = dist_info()
    out = start_run_dir(cfg.out, cfg, "evaluate", is_main=rank == 0)
    log = get_logger("evaluate", out / "log.txt", is_main=rank == 0)
    if not cfg.seeds:
        raise HistoError("evaluate needs at least one seed (--seeds)")
    # 1. data: training subset, validation and test splits (pairwise group-disjoint, asserted),
    #    external sets, synthetic pools
    _, _, classes = dataset_classes(cfg.data)
    arms = expand_arms(cfg.arms, cfg.ratios, bool(cfg.samples))
    real = load_real(cfg.data, cfg.subset)
    test = load_real(cfg.data, TEST)
    check_groups_disjoint(real, test, f"the test split of {cfg.data}")
    val = load_val(cfg, real, test) if cfg.val_every > 0 else None
    _, rows = read_dataset(cfg.data)
    train_ids = set(real.ids)
    externals = load_external(cfg.external, classes, {r["hash"] for r in rows if r["id"] in train_ids})
    syn = synthetic_sets(cfg, arms, real)
    pool = check_pseudo(cfg, arms, real, test, val)
    check_keep_list(cfg, out, arms, rank == 0)
    start = next((e for e in syn if e["kind"] == "start"), None)  # the start arms' tiles
    if rank == 0 and start:  # an augmentation set a user can take as it is
        write_csv_atomic(out / START_CSV, start_rows(arms, start, classes), START_COLUMNS)
    size = int(real.images.shape[1])
    steps, steps_per_epoch = budget(cfg, len(real))
    jobs = [(a, s) for a in arms for s in cfg.seeds]
    first = [j for j in jobs if j[0][1] not in PSEUDO_KINDS]  # the pseudo arms read pseudo_reader's classifiers
    log.info("evaluate: %d arms x %d seeds, %d steps each (batch %d), %d real training tiles, %s, %d test tiles",
             len(arms), len(cfg.seeds), steps, cfg.batch_size, len(real),
             f"best of {len(val)} {cfg.val_subset} tiles every {cfg.val_every} steps" if val else "last weights",
             len(test))
    # 2. train and score the jobs of this rank (finished ones are skipped)
    sets = {TEST: test, **externals}
    if world > 1:
        from ..runtime.distributed import make_accelerator

        make_accelerator(cpu=True)  # the process group, for the collective error check below
    try:
        _train_jobs(cfg, out, first[rank::world], sets, val, classes, size, steps, real, syn, log)
        error = None
    except Exception as e:  # reported collectively: the other ranks must not wait for this one
        error = e
    raise_if_any_rank_failed(error, "evaluate")
    # 3. pseudo arms (after their reader's classifiers exist): every rank labels the pool alike, rank 0 records it
    pseudo = None
    if pool is not None:
        try:
            pseudo = label_pool(cfg, out, arms, real, pool, rank == 0)
            _train_jobs(cfg, out, [j for j in jobs if j not in first][rank::world], sets, val, classes, size, steps,
                        real, [*syn, pseudo], log)
            error = None
        except Exception as e:
            error = e
        raise_if_any_rank_failed(error, "evaluate (pseudo arms)")
    if rank != 0:
        return out
    # 4. merge (rank 0): per_seed.csv, curves.csv, metrics.json, confusion PNGs, completion marker last
    _merge(cfg, out, arms, jobs, sets, classes, real, val, test, externals, steps, steps_per_epoch, pseudo,
           start_summary(arms, start, real) if start else None)
    return out


START_CSV = "start_tiles.csv"  # evalarms.start_rows: per start arm, the tiles it adds and their labels
PSEUDO_CSV = "pseudo_labels.csv"  # every pool tile's reading by the pseudo arms' reader; class_rank: its place in
# its pseudo-class by confidence (1: the most confident), so pseudo@R (confidence order) trains on the tiles with
# class_rank <= quota(R, the class's real count): a pseudo-labelled augmentation set a user can take as it is


def check_pseudo(cfg: EvaluateConfig, arms, real: Tiles, test: Tiles, val: Tiles | None) -> Tiles | None:
    """The pseudo arms' pool (None without pseudo arms), checked: pseudo_reader is a non-pseudo arm of this
    evaluation; the pool is group-disjoint from test and validation."""
    if not any(kind in PSEUDO_KINDS for _, kind, _ in arms):
        return None
    readers = [n for n, kind, _ in arms if kind not in PSEUDO_KINDS]
    if cfg.pseudo_reader not in readers:
        raise HistoError(f"pseudo_reader {cfg.pseudo_reader!r} is not a non-pseudo arm of this evaluation "
                         f"({', '.join(readers) or 'none'}): the pseudo arms read the pool with its classifiers")
    pool, copies = pseudo_pool(cfg, real)
    check_groups_disjoint(pool, test, f"the test split of {cfg.data}", "the pseudo arms' pool")
    if val is not None:
        check_groups_disjoint(pool, val, f"the validation split {cfg.val_subset!r}", "the pseudo arms' pool")
    get_logger("evaluate").info("pseudo arms: %d pool tiles outside subset %r (%d exact copies of training tiles "
                                "left out), read by the %s classifiers", len(pool), cfg.subset, copies,
                                cfg.pseudo_reader)
    return pool


def label_pool(cfg: EvaluateConfig, out: Path, arms, real: Tiles, pool: Tiles, is_main: bool) -> dict:
    """pseudo_sets from the reader arm's saved classifiers (one per seed); rank 0 writes pseudo_labels.csv."""
    from ..models.classifier import load_classifier

    readers = []
    for seed in cfg.seeds:
        d = out / "classifiers" / f"{cfg.pseudo_reader}_{seed}"
        if not is_complete(d):
            raise HistoError(f"reader classifier {d} did not finish: re-run the same command")
        readers.append(load_classifier(d)[0])
    pseudo = pseudo_sets(cfg, arms, real, pool, readers)
    if is_main:
        probs, classes = pseudo["probs"], real.classes
        class_rank = {i: k + 1 for idx in pseudo["by_class"].values() for k, i in enumerate(idx)}
        rows = [{"id": pool.ids[i], "group": pool.groups[i], "pseudo_label": classes[int(pseudo["labels"][i])],
                 "confidence": round(float(probs[i].max()), 6), "class_rank": class_rank[i],
                 **{f"p_{c}": round(float(probs[i, ci]), 6) for ci, c in enumerate(classes)},
                 "label": classes[int(pool.labels[i])] if pool.labels[i] >= 0 else ""} for i in range(len(pool))]
        write_csv_atomic(out / PSEUDO_CSV, rows, ["id", "group", "pseudo_label", "confidence", "class_rank"] +
                         [f"p_{c}" for c in classes] + ["label"])
    return pseudo


KEEP_LIST = "keep_list.json"  # the keep-list an evaluation uses, recorded when it starts


def check_keep_list(cfg: EvaluateConfig, out: Path, arms, is_main: bool) -> None:
    """Record the keep-list (filtered.csv hash) the selected arms train on; on resume, refuse another one,
    so classifiers of an old and a new selection never mix in one evaluation."""
    from ..runtime.fileio import sha256_file

    if not any(kind in SELECTED_KINDS for _, kind, _ in arms):
        return
    path = selection_dir(cfg.samples, cfg.selection) / FILTERED_CSV
    now = {"filtered_csv": str(path.resolve()), "sha256": sha256_file(path)}
    old = read_json(out / KEEP_LIST, "keep-list record") if (out / KEEP_LIST).is_file() else None
    if old and old.get("sha256") != now["sha256"]:
        raise HistoError(f"evaluation {out} was started with another keep-list ({old.get('filtered_csv')}, sha256 "
                         f"{str(old.get('sha256'))[:12]}; now {now['sha256'][:12]}): select was re-run since; delete "
                         f"{out} (or use another --out) to evaluate the new selection")
    if is_main and not old:
        write_json_atomic(out / KEEP_LIST, now)


def budget(cfg: EvaluateConfig, n_real: int) -> tuple[int, int]:
    """(optimisation steps, steps per epoch or 0) of every classifier: cfg.steps, or epochs x steps_per_epoch."""
    if cfg.epochs > 0:
        spe = cfg.steps_per_epoch or math.ceil(n_real / cfg.batch_size)
        steps = cfg.epochs * spe
    else:
        steps, spe = cfg.steps, 0
    if round(cfg.real_finish * steps) >= steps:
        raise HistoError(f"real_finish {cfg.real_finish:g} leaves no step of the {steps} to real + synthetic "
                         f"training: lower it or raise the budget")
    return steps, spe


def synthetic_weights(n_real: int, n_total: int, weight: float) -> torch.Tensor | None:
    """Per-image loss weights of a training set whose first n_real images are real: 1 for real, `weight` for
    the synthetic ones after them; None (the plain mean) when there are no synthetic images or weight is 1."""
    if n_total == n_real or weight == 1.0:
        return None
    return torch.cat([torch.ones(n_real), torch.full((n_total - n_real,), float(weight))])


def load_val(cfg: EvaluateConfig, real: Tiles, test: Tiles) -> Tiles:
    """The validation split, checked group-disjoint from the training subset and from test."""
    try:
        val = load_real(cfg.data, cfg.val_subset)
    except HistoError as e:
        raise HistoError(f"validation split {cfg.val_subset!r}: {e}; prepare with --val-frac > 0, or evaluate "
                         f"with --val-every 0 (score the last weights)") from None
    check_groups_disjoint(real, val, f"the validation split {cfg.val_subset!r} of {cfg.data}")
    check_groups_disjoint(val, test, f"the test split of {cfg.data}", f"the validation split {cfg.val_subset!r}")
    return val


def _train_jobs(cfg: EvaluateConfig, out: Path, jobs, sets, val, classes, size: int, steps: int, real, extras,
                log) -> None:
    """Train, save and score one rank's (arm, seed) jobs; finished ones are skipped (or scored on new sets).
    `extras`: the added-image sets the arms choose from (synthetic_sets, and pseudo_sets once the pool is read)."""
    from ..models.classifier import build_classifier, load_classifier, save_classifier, train_classifier, val_rank

    for (name, kind, ratio), seed in jobs:
        d = out / "classifiers" / f"{name}_{seed}"
        if is_complete(d):
            sc = read_json(d / "scores.json", "classifier scores")
            missing = [k for k in sets if k not in sc["scores"]]
            if missing:  # a new external set: score the saved classifier on it
                model, saved = load_classifier(d)
                sc["scores"].update({k: score(model, sets[k], bool(saved.get("tta"))) for k in missing})
                write_json_atomic(d / "scores.json", sc)
            log.info("skip %s seed %d (finished)", name, seed)
            continue
        x, y, counts = training_set(kind, name, seed, real, extras)
        synthetic = len(x) > len(real)
        weights = synthetic_weights(len(real), len(x), cfg.synthetic_weight)
        finish = round(cfg.real_finish * steps) if synthetic else 0
        tseed = train_seed(kind, seed)
        seed_everything(tseed)  # initial weights depend on the seed only, not on the job order
        model = build_classifier(cfg.backbone, len(classes), size, cfg.backbone_weights)
        curve: list[dict] = []
        train_classifier(model, x, y, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=tseed,
                         augment=kind not in UNAUGMENTED_KINDS, desc=f"{name} seed {seed}",
                         validate=(lambda m: val_record(m, val)) if val is not None else None,
                         val_every=cfg.val_every, history=curve, ema_decay=cfg.ema_decay, sample_weight=weights,
                         finish_n=len(real), finish_steps=finish)
        best = min(curve, key=val_rank) if curve else None  # the weights train_classifier restored
        validation = {"split": cfg.val_subset, "every": cfg.val_every, "n": len(val), "best_step": best["step"],
                      "best": best, "curve": curve} if best else None
        info = {"name": cfg.backbone, "classes": classes, "image_size": size, "arm": name, "kind": kind,
                "ratio": ratio, "seed": seed, "train_seed": tseed, "steps": steps, "batch_size": cfg.batch_size,
                "lr": cfg.lr, "checkpoint": f"best {cfg.val_subset} step {best['step']}" if best else "last",
                "ema_decay": cfg.ema_decay, "tta": cfg.tta,
                "synthetic_weight": cfg.synthetic_weight if synthetic else None,
                "real_finish_steps": finish if synthetic else None,
                "data": str(cfg.data), "subset": cfg.subset, "n_real": len(real), "n_synthetic": counts,
                "backbone_weights": cfg.backbone_weights}
        save_classifier(model, d, info)
        sc = {"arm": name, "seed": seed, "n_real": len(real), "n_synthetic": counts, "validation": validation,
              "scores": {k: score(model, t, cfg.tta) for k, t in sets.items()}}
        write_json_atomic(d / "scores.json", sc)
        write_text_atomic(d / CARD, classifier_card(d, str(d), sc))
        mark_complete(d)
        log.info("%s seed %d: test accuracy %.3f%s", name, seed, sc["scores"][TEST]["accuracy"],
                 f" (best {cfg.val_subset} accuracy {best['accuracy']:.3f} at step {best['step']})" if best else "")


def _merge(cfg, out: Path, arms, jobs, sets, classes, real, val, test, externals, steps, steps_per_epoch,
           pseudo: dict | None, start: dict | None) -> None:
    results = {}
    for (name, kind, ratio), seed in jobs:
        d = out / "classifiers" / f"{name}_{seed}"
        if not is_complete(d):
            raise HistoError(f"classifier {d} did not finish (a rank failed?): re-run the same command")
        results[(name, seed)] = read_json(d / "scores.json", "classifier scores")
    names = [a[0] for a in arms]
    pairs = {"deltas_vs_pseudo": {n: f"pseudo@{r:g}" for n, k, r in arms
                                  if k in SYNTHETIC_KINDS and f"pseudo@{r:g}" in names},
             # the diffusion step against its raw starting tiles, split (with roundtrip arms) into the
             # autoencoder's round trip (roundtrip@R - start@R) and the denoising step (selected@R - roundtrip@R)
             "deltas_vs_start": {f"{a}@{r:g}": n for n, k, r in arms for a in ("selected", "roundtrip")
                                 if k == "start" and f"{a}@{r:g}" in names},
             "deltas_vs_roundtrip": {f"selected@{r:g}": n for n, k, r in arms
                                     if k == "roundtrip" and f"selected@{r:g}" in names}}
    summary = summarise(results, names, list(cfg.seeds), classes, list(sets), AA_OF, pairs)
    deltas, floors = summary["testsets"][TEST]["deltas_vs_real"], summary["testsets"][TEST]["noise_floors"]
    summary.update({"budget": {"steps": steps, "steps_per_epoch": steps_per_epoch, "epochs": cfg.epochs,
                               "batch_size": cfg.batch_size, "lr": cfg.lr, "backbone": cfg.backbone,
                               "synthetic_weight": cfg.synthetic_weight, "real_finish": cfg.real_finish,
                               "val_every": cfg.val_every, "val_subset": cfg.val_subset if val else "",
                               "checkpoint": ("best validation accuracy (ties: lower loss, earlier step)" if val
                                              else "last step")},
                    "data": {"dataset": str(cfg.data), "subset": cfg.subset, "n_train_real": len(real),
                             "train_counts": real.counts(), "test_counts": test.counts(),
                             "val_counts": val.counts() if val else {},
                             "external": {k: {"n": len(t), "counts": t.counts()} for k, t in externals.items()},
                             "external_scope": "all tiles of each external dataset"},
                    "arm_specs": [{"arm": n, "kind": k, "ratio": r} for n, k, r in arms],
                    "validation": validation_summary(results, names, list(cfg.seeds)),
                    # the test split's results also at the top level (pipeline / bench tables read these)
                    "arms": summary["testsets"][TEST]["arms"], "deltas": deltas,
                    "deltas_vs_classic": summary["testsets"][TEST]["deltas_vs_classic"],
                    "deltas_vs_pseudo": summary["testsets"][TEST]["deltas_vs_pseudo"],
                    "deltas_vs_start": summary["testsets"][TEST]["deltas_vs_start"],
                    "deltas_vs_roundtrip": summary["testsets"][TEST]["deltas_vs_roundtrip"], "start": start,
                    "noise_floor": floors.get("real_aa"), "noise_floors": floors,
                    "pseudo": pseudo_summary(cfg, arms, real, pseudo) if pseudo else None})
    write_csv_atomic(out / "per_seed.csv", per_seed_rows(results, classes), per_seed_columns(classes))
    write_csv_atomic(out / "curves.csv", curve_rows(results), CURVE_COLUMNS)
    write_json_atomic(out / "metrics.json", summary)
    for ts in sets:
        for name, _, _ in arms:
            cm = sum(np.asarray(results[(name, s)]["scores"][ts]["confusion"]) for s in cfg.seeds)
            plot_confusion(cm, classes, f"{name} on {ts} ({len(cfg.seeds)} seeds)",
                           out / "confusion" / confusion_name(ts, name))
    mark_complete(out, **completion_record(cfg), arms=len(arms), seeds=len(cfg.seeds))


def pseudo_summary(cfg: EvaluateConfig, arms, real: Tiles, pseudo: dict) -> dict:
    """The pseudo arms' reader and pool, and (measurement only: the pool tiles that carry a label) how many of the
    pool and, with pseudo_rank confidence, of each arm's chosen tiles it labels right."""
    true, labels = pseudo["true"], pseudo["labels"]
    per_arm = {}
    for name, kind, _ in arms:
        if kind == "pseudo":
            chosen = pseudo["chosen"][name]
            per_arm[name] = {c: (label_agreement(labels, true, v) if isinstance(v, list) else {"drawn": v})
                             for c, v in chosen.items()}
    return {"reader": cfg.pseudo_reader, "reader_seeds": list(cfg.seeds), "rank": cfg.pseudo_rank,
            "pool": len(true), "read_as": {c: len(v) for c, v in pseudo["by_class"].items()},
            "pool_right": label_agreement(labels, true, list(range(len(true)))), "chosen": per_arm,
            "note": "right: share of tiles whose own label (where the pool tile has one) is the pseudo-label; "
                    "measurement only, training never reads it"}


# --------------------------------------------------------------------------------------------
# Stage: score (re-score saved classifiers on new data)
# --------------------------------------------------------------------------------------------
def find_classifiers(path: str | Path) -> list[Path]:
    p = Path(path)
    if (p / "classifier.json").is_file():
        return [p]
    found = sorted(d for d in p.iterdir() if (d / "classifier.json").is_file()) if p.is_dir() else []
    if not found:
        raise HistoError(f"no saved classifier (classifier.json) in {p} or its sub-folders")
    return found


@closes_stage_logs
def run_score(cfg: ScoreConfig) -> Path:
    from ..models.judge import score_fidelity
    from ..models.classifier import load_classifier

    if not cfg.classifiers and not cfg.samples:
        raise HistoError("score needs --classifiers (saved classifiers) and/or --samples with --judge")
    fidelity = score_fidelity(cfg.samples, cfg.judge) if cfg.samples else None  # checked before writing
    dirs = find_classifiers(cfg.classifiers) if cfg.classifiers else []
    data = load_real(cfg.data, cfg.subset) if dirs else None
    out = start_run_dir(cfg.out, cfg, "score")
    rows, by_arm, tiles = [], {}, data
    for d in dirs:
        model, info = load_classifier(d)
        tiles = relabel(data, list(info["classes"]), f"dataset {cfg.data}")
        if int(info["image_size"]) != int(tiles.images.shape[1]):
            raise HistoError(f"classifier {d} expects {info['image_size']} px tiles, {cfg.data} has "
                             f"{tiles.images.shape[1]} px")
        m = score(model, tiles, bool(info.get("tta")))
        arm, seed = info.get("arm", d.name), info.get("seed", "")
        rows.append({"classifier": d.name, "arm": arm, "seed": seed, "testset": cfg.subset, "n": m["n"],
                     "accuracy": round(m["accuracy"], 6), "macro_f1": round(m["macro_f1"], 6),
                     **{f"sens_{c}": round(m["sensitivity"][c], 6) for c in tiles.classes},
                     **{f"spec_{c}": round(m["specificity"][c], 6) for c in tiles.classes}})
        by_arm.setdefault(arm, []).append(m)
    if dirs:
        write_csv_atomic(out / "scores.csv", rows, ["classifier"] + per_seed_columns(tiles.classes))
    if fidelity:
        fidelity.write(out)
    write_json_atomic(out / "scores.json", {
        "data": str(cfg.data) if dirs else "", "subset": cfg.subset, "classifiers": [str(d) for d in dirs],
        "arms": {a: {"accuracy": M.mean_ci([m["accuracy"] for m in ms]),
                     "macro_f1": M.mean_ci([m["macro_f1"] for m in ms])} for a, ms in by_arm.items()},
        "fidelity": fidelity.record if fidelity else None})
    mark_complete(out, **completion_record(cfg), classifiers=len(dirs), fidelity=bool(fidelity))
    return out


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(classes), 1.0 + 0.9 * len(classes)), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({int(cm[i, j])})", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
