"""Stages `evaluate` and `score`: the downstream harness and the re-scoring of saved classifiers.

`evaluate` trains one downstream classifier per (arm, seed) with the SAME budget and
hyper-parameters (optimisation steps = epochs x steps_per_epoch, batch size, AdamW lr, cosine
schedule, backbone) and differs only in the training images:
  real            the real training subset (cfg.subset) only, no augmentation
  classic         real + classic augmentation (flips, 90-degree rotations, colour jitter)
  selected@R      real + synthetic images kept in filtered.csv, best-ranked first, at most
                  quota(R, real count) per class; with classic augmentation
  unselected@R    real + synthetic images drawn at random (seeded by the training seed) from
                  samples.csv ignoring the filter, the same number per class as selected@R;
                  with classic augmentation
The validation split is not used (fixed budget, no early stopping). Every classifier is scored on
the test split, whose groups must be disjoint from the training subset's (checked: HistoError
otherwise), and on every external labeled dataset (cfg.external: ALL its tiles, classes matched by
name; a tile identical to a training tile is an error). Outputs (cfg.out): config.json first,
classifiers/<arm>_<seed>/ (model.safetensors, classifier.json, scores.json, _COMPLETE.json),
per_seed.csv, metrics.json ("testsets": {test, <external>...}: per arm mean, 95% t-CI, n and paired
deltas vs the real arm; "arms" / "deltas": the test split's, at the top level),
confusion/<testset>__<arm>.png (confusion summed over seeds, rows normalised), _COMPLETE.json last.
A finished (arm, seed) is skipped on re-run, so a killed run resumes.

Multi-process (torchrun / accelerate launch): rank r trains jobs r, r+W, ...; each job's folder is
written by the rank that trained it (atomically); rank 0 waits for all and writes the merged outputs.

`score` re-scores saved classifiers (one folder or a folder of them) on any labeled dataset.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from .config import EvaluateConfig, ScoreConfig
from .evaldata import (Tiles, dataset_classes, load_real, load_sample_images, quota, read_filtered,
                       read_samples)
from .runtime import (HistoError, closes_stage_logs, dist_info, get_logger, is_complete, mark_complete,
                      raise_if_any_rank_failed, read_json, seed_everything, start_run_dir, write_csv_atomic,
                      write_json_atomic)

ARM_KINDS = ("real", "classic", "selected", "unselected")
TEST = "test"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def expand_arms(arms, ratios, has_samples: bool) -> list[tuple[str, str, float]]:
    """[(arm name, kind, ratio)]: selected/unselected become one arm per ratio ('selected@1')."""
    out = []
    for a in arms:
        if a not in ARM_KINDS:
            raise HistoError(f"unknown arm {a!r}: use {', '.join(ARM_KINDS)}")
        if a in ("real", "classic"):
            out.append((a, a, 0.0))
            continue
        if not has_samples:
            raise HistoError(f"arm {a!r} needs synthetic samples: give --samples (a sample directory)")
        if not ratios:
            raise HistoError("the synthetic arms need at least one ratio (--ratios)")
        for r in ratios:
            if r <= 0:
                raise HistoError(f"ratio must be positive, got {r}")
            out.append((f"{a}@{r:g}", a, float(r)))
    if len({n for n, _, _ in out}) != len(out):
        raise HistoError(f"duplicate arms in {list(arms)} x ratios {list(ratios)}")
    return out


def check_groups_disjoint(train: Tiles, test: Tiles, what: str) -> None:
    """The harness's honesty check: no training group may appear in the test set."""
    shared = sorted(set(train.groups) & set(test.groups))
    if shared:
        raise HistoError(f"{len(shared)} group(s) of the training subset are also in {what}, e.g. {shared[0]!r}: "
                         f"the split leaks; re-run prepare (splits must be by group)")


def relabel(tiles: Tiles, classes: list[str], what: str) -> Tiles:
    """Map a dataset's labels into `classes` order (same class names required)."""
    if sorted(tiles.classes) != sorted(classes):
        raise HistoError(f"{what} has classes {tiles.classes}, the classifier {classes}")
    m = torch.tensor([classes.index(c) for c in tiles.classes])
    return Tiles(tiles.images, m[tiles.labels], tiles.ids, tiles.groups, list(classes))


def synthetic_sets(cfg: EvaluateConfig, arms, real: Tiles) -> dict:
    """Sample rows, images, indices per class and, per synthetic arm and class, the chosen sample
    indices (selected: kept, by rank) or the count to draw (unselected: as many as selected uses)."""
    kinds = {k for _, k, _ in arms}
    if not kinds & {"selected", "unselected"}:
        return {}
    rows = read_samples(cfg.samples, real.classes)
    images = load_sample_images(cfg.samples, rows, int(real.images.shape[1]))
    index = {r["id"]: i for i, r in enumerate(rows)}
    by_class = {c: [i for i, r in enumerate(rows) if r["target"] == c] for c in real.classes}
    kept: dict[str, list[int]] = {}
    if "selected" in kinds:
        filt = read_filtered(cfg.samples)
        unknown = [f["id"] for f in filt if f["id"] not in index]
        if unknown:
            raise HistoError(f"filtered.csv in {cfg.samples} lists sample {unknown[0]!r} that samples.csv lacks: "
                             f"re-run select")
        for c in real.classes:
            ks = sorted((f for f in filt if f["target"] == c and int(f["keep"]) == 1), key=lambda f: int(f["rank"]))
            kept[c] = [index[f["id"]] for f in ks]
    real_counts = real.counts()
    chosen: dict[str, dict] = {}
    for name, kind, ratio in arms:
        if kind not in ("selected", "unselected"):
            continue
        per_class = {}
        for c in real.classes:
            want = quota(ratio, real_counts[c])
            if want > len(by_class[c]):
                raise HistoError(f"ratio {ratio:g} asks for {want} synthetic {c!r} images "
                                 f"({ratio:g} x {real_counts[c]} real) but {cfg.samples}/samples.csv has only "
                                 f"{len(by_class[c])}: sample more or lower --ratios")
            n_sel = min(want, len(kept[c])) if "selected" in kinds else want
            if n_sel < want and kind == "selected":
                get_logger("evaluate").warning("%s: only %d of the %d %r samples asked for passed selection; "
                                               "the arm uses %d (unselected: the same count)", name, n_sel, want, c, n_sel)
            per_class[c] = kept[c][:n_sel] if kind == "selected" else n_sel
        chosen[name] = per_class
    return {"rows": rows, "images": images, "by_class": by_class, "chosen": chosen}


def training_set(kind: str, name: str, seed: int, real: Tiles, syn: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(uint8 images, labels, synthetic counts per class) of one arm and seed."""
    if kind in ("real", "classic"):
        return real.images, real.labels, {c: 0 for c in real.classes}
    idx, counts = [], {}
    for ci, c in enumerate(real.classes):
        pick = syn["chosen"][name][c]
        if kind == "unselected":
            rng = np.random.default_rng([seed, ci])
            pool = syn["by_class"][c]
            pick = [pool[j] for j in rng.choice(len(pool), size=pick, replace=False)] if pick else []
        idx += pick
        counts[c] = len(pick)
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    labels = torch.tensor([real.classes.index(syn["rows"][i]["target"]) for i in idx], dtype=torch.long)
    return (torch.cat([real.images, syn["images"][idx_t]]), torch.cat([real.labels, labels]), counts)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def score(model, tiles: Tiles) -> dict:
    from .models.classifier import predict

    probs, _ = predict(model, tiles.images)
    return M.classification_metrics(tiles.labels.numpy(), probs.argmax(1).numpy(), tiles.classes)


def load_external(paths, classes: list[str], train_hashes: set[str]) -> dict[str, Tiles]:
    from .artifacts import read_dataset

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
    from .artifacts import read_dataset

    rank, world = dist_info()
    out = start_run_dir(cfg.out, cfg, "evaluate", is_main=rank == 0)
    log = get_logger("evaluate", out / "log.txt", is_main=rank == 0)
    if not cfg.seeds:
        raise HistoError("evaluate needs at least one seed (--seeds)")
    # 1. data: training subset, test split (group-disjoint, asserted), external sets, synthetic pools
    _, _, classes = dataset_classes(cfg.data)
    arms = expand_arms(cfg.arms, cfg.ratios, bool(cfg.samples))
    real = load_real(cfg.data, cfg.subset)
    test = load_real(cfg.data, TEST)
    check_groups_disjoint(real, test, f"the test split of {cfg.data}")
    _, rows = read_dataset(cfg.data)
    train_ids = set(real.ids)
    externals = load_external(cfg.external, classes, {r["hash"] for r in rows if r["id"] in train_ids})
    syn = synthetic_sets(cfg, arms, real)
    size = int(real.images.shape[1])
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(len(real) / cfg.batch_size)
    steps = cfg.epochs * steps_per_epoch
    jobs = [(a, s) for a in arms for s in cfg.seeds]
    log.info("evaluate: %d arms x %d seeds, %d steps each (batch %d), %d real training tiles, %d test tiles",
             len(arms), len(cfg.seeds), steps, cfg.batch_size, len(real), len(test))
    # 2. train and score the jobs of this rank (finished ones are skipped)
    sets = {TEST: test, **externals}
    if world > 1:
        from .runtime import make_accelerator

        make_accelerator(cpu=True)  # the process group, for the collective error check below
    try:
        _train_jobs(cfg, out, jobs[rank::world], sets, classes, size, steps, real, syn, log)
        error = None
    except Exception as e:  # reported collectively: the other ranks must not wait for this one
        error = e
    raise_if_any_rank_failed(error, "evaluate")
    if rank != 0:
        return out
    # 3. merge (rank 0): per_seed.csv, metrics.json, confusion PNGs, completion marker last
    _merge(cfg, out, arms, jobs, sets, classes, real, test, externals, steps, steps_per_epoch)
    return out


def _train_jobs(cfg: EvaluateConfig, out: Path, jobs, sets, classes, size: int, steps: int, real, syn, log) -> None:
    """Train, save and score one rank's (arm, seed) jobs; finished ones are skipped (or scored on new sets)."""
    from .models.classifier import build_classifier, load_classifier, save_classifier, train_classifier

    for (name, kind, ratio), seed in jobs:
        d = out / "classifiers" / f"{name}_{seed}"
        if is_complete(d):
            sc = read_json(d / "scores.json", "classifier scores")
            missing = [k for k in sets if k not in sc["scores"]]
            if missing:  # a new external set: score the saved classifier on it
                model, _ = load_classifier(d)
                sc["scores"].update({k: score(model, sets[k]) for k in missing})
                write_json_atomic(d / "scores.json", sc)
            log.info("skip %s seed %d (finished)", name, seed)
            continue
        x, y, counts = training_set(kind, name, seed, real, syn)
        seed_everything(seed)  # initial weights depend on the seed only, not on the job order
        model = build_classifier(cfg.backbone, len(classes), size, cfg.backbone_weights)
        train_classifier(model, x, y, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                         augment=kind != "real", desc=f"{name} seed {seed}")
        info = {"name": cfg.backbone, "classes": classes, "image_size": size, "arm": name, "kind": kind,
                "ratio": ratio, "seed": seed, "steps": steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                "data": str(cfg.data), "subset": cfg.subset, "n_real": len(real), "n_synthetic": counts,
                "backbone_weights": cfg.backbone_weights}
        save_classifier(model, d, info)
        sc = {"arm": name, "seed": seed, "n_real": len(real), "n_synthetic": counts,
              "scores": {k: score(model, t) for k, t in sets.items()}}
        write_json_atomic(d / "scores.json", sc)
        mark_complete(d)
        log.info("%s seed %d: test accuracy %.3f", name, seed, sc["scores"][TEST]["accuracy"])


def _merge(cfg, out: Path, arms, jobs, sets, classes, real, test, externals, steps, steps_per_epoch) -> None:
    results = {}
    for (name, kind, ratio), seed in jobs:
        d = out / "classifiers" / f"{name}_{seed}"
        if not is_complete(d):
            raise HistoError(f"classifier {d} did not finish (a rank failed?): re-run the same command")
        results[(name, seed)] = read_json(d / "scores.json", "classifier scores")
    summary = summarise(results, [a[0] for a in arms], list(cfg.seeds), classes, list(sets))
    summary.update({"budget": {"steps": steps, "steps_per_epoch": steps_per_epoch, "epochs": cfg.epochs,
                               "batch_size": cfg.batch_size, "lr": cfg.lr, "backbone": cfg.backbone},
                    "data": {"dataset": str(cfg.data), "subset": cfg.subset, "n_train_real": len(real),
                             "train_counts": real.counts(), "test_counts": test.counts(),
                             "external": {k: {"n": len(t), "counts": t.counts()} for k, t in externals.items()},
                             "external_scope": "all tiles of each external dataset"},
                    "arm_specs": [{"arm": n, "kind": k, "ratio": r} for n, k, r in arms],
                    # the test split's results also at the top level (pipeline / bench tables read these)
                    "arms": summary["testsets"][TEST]["arms"], "deltas": summary["testsets"][TEST]["deltas_vs_real"]})
    write_csv_atomic(out / "per_seed.csv", per_seed_rows(results, classes), per_seed_columns(classes))
    write_json_atomic(out / "metrics.json", summary)
    for ts in sets:
        for name, _, _ in arms:
            cm = sum(np.asarray(results[(name, s)]["scores"][ts]["confusion"]) for s in cfg.seeds)
            plot_confusion(cm, classes, f"{name} on {ts} ({len(cfg.seeds)} seeds)",
                           out / "confusion" / confusion_name(ts, name))
    mark_complete(out, arms=len(arms), seeds=len(cfg.seeds))


def confusion_name(testset: str, arm: str) -> str:
    """File name of an arm's confusion matrix PNG under confusion/."""
    return f"{testset}__{arm.replace('@', '_at_').replace('/', '_')}.png"


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


def summarise(results: dict, arm_names: list[str], seeds: list[int], classes: list[str], testsets: list[str]) -> dict:
    """{"testsets": {ts: {"arms": {arm: {metric: mean_ci}}, "deltas_vs_real": {arm: {metric: paired_diff}}}}}."""
    out = {"classes": classes, "seeds": seeds, "ci": "95% t-interval over seeds (n-1 dof)", "testsets": {}}
    for ts in testsets:
        arms, deltas = {}, {}
        per = {a: {s: results[(a, s)]["scores"][ts] for s in seeds} for a in arm_names}
        for a in arm_names:
            arms[a] = {"accuracy": M.mean_ci([per[a][s]["accuracy"] for s in seeds]),
                       "macro_f1": M.mean_ci([per[a][s]["macro_f1"] for s in seeds]),
                       "sensitivity": {c: M.mean_ci([per[a][s]["sensitivity"][c] for s in seeds]) for c in classes},
                       "specificity": {c: M.mean_ci([per[a][s]["specificity"][c] for s in seeds]) for c in classes},
                       "n_synthetic": results[(a, seeds[0])].get("n_synthetic", {}), "n_test": per[a][seeds[0]]["n"]}
        if "real" in arm_names:
            for a in arm_names:
                if a != "real":
                    deltas[a] = {k: M.paired_diff({s: per[a][s][k] for s in seeds}, {s: per["real"][s][k] for s in seeds})
                                 for k in ("accuracy", "macro_f1")}
        out["testsets"][ts] = {"arms": arms, "deltas_vs_real": deltas}
    return out


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runtime import atomic_path

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
    from .models.classifier import load_classifier

    out = start_run_dir(cfg.out, cfg, "score")
    dirs = find_classifiers(cfg.classifiers)
    data = load_real(cfg.data, cfg.subset)
    rows, by_arm = [], {}
    for d in dirs:
        model, info = load_classifier(d)
        tiles = relabel(data, list(info["classes"]), f"dataset {cfg.data}")
        if int(info["image_size"]) != int(tiles.images.shape[1]):
            raise HistoError(f"classifier {d} expects {info['image_size']} px tiles, {cfg.data} has "
                             f"{tiles.images.shape[1]} px")
        m = score(model, tiles)
        arm, seed = info.get("arm", d.name), info.get("seed", "")
        rows.append({"classifier": d.name, "arm": arm, "seed": seed, "testset": cfg.subset, "n": m["n"],
                     "accuracy": round(m["accuracy"], 6), "macro_f1": round(m["macro_f1"], 6),
                     **{f"sens_{c}": round(m["sensitivity"][c], 6) for c in tiles.classes},
                     **{f"spec_{c}": round(m["specificity"][c], 6) for c in tiles.classes}})
        by_arm.setdefault(arm, []).append(m)
    cols = ["classifier"] + per_seed_columns(tiles.classes)
    write_csv_atomic(out / "scores.csv", rows, cols)
    write_json_atomic(out / "scores.json", {
        "data": str(cfg.data), "subset": cfg.subset, "classifiers": [str(d) for d in dirs],
        "arms": {a: {"accuracy": M.mean_ci([m["accuracy"] for m in ms]),
                     "macro_f1": M.mean_ci([m["macro_f1"] for m in ms])} for a, ms in by_arm.items()}})
    mark_complete(out, classifiers=len(dirs))
    return out
