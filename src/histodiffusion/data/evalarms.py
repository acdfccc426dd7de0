"""The arms of the downstream harness (stages/evaluate.py) and the images each arm trains on:
  real            the real training subset only, no augmentation
  real_aa         exactly `real` with another seed stream (training seed + AA_SEED_OFFSET): the
                  paired delta real_aa - real is the harness's A/A noise floor
  classic         real + classic augmentation
  classic_aa      exactly `classic` with another seed stream: classic_aa - classic is the A/A noise floor of
                  the augmented harness, the one every synthetic arm trains with
  selected@R      real + the synthetic images kept in filtered.csv, best-ranked first, at most
                  quota(R, real count) per class
  unselected@R    real + synthetic images drawn at random (seeded by the training seed and the class)
                  from samples.csv ignoring the filter, as many per class as selected@R
"""
from __future__ import annotations

import torch

from ..core.seeds import numpy_rng
from ..runtime.artifacts import selection_dir
from ..runtime.config import EvaluateConfig
from ..runtime.errors import HistoError
from ..runtime.log import get_logger
from .evaldata import Tiles, load_sample_images, quota, ranked_kept, read_filtered, read_samples

ARM_KINDS = ("real", "real_aa", "classic", "classic_aa", "selected", "unselected")
REAL_KINDS = ("real", "real_aa", "classic", "classic_aa")  # arms without synthetic images
AA_OF = {"real_aa": "real", "classic_aa": "classic"}  # A/A arm -> the arm it repeats with other seeds
AA_SEED_OFFSET = 1_000_003  # real_aa (classic_aa) with seed s trains exactly as real (classic) with seed s + offset
UNAUGMENTED_KINDS = ("real", "real_aa")  # every other arm trains with classic augmentation


def expand_arms(arms, ratios, has_samples: bool) -> list[tuple[str, str, float]]:
    """[(arm name, kind, ratio)]: selected/unselected become one arm per ratio ('selected@1')."""
    out = []
    for a in arms:
        if a not in ARM_KINDS:
            raise HistoError(f"unknown arm {a!r}: use {', '.join(ARM_KINDS)}")
        if a in REAL_KINDS:
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
    names = {n for n, _, _ in out}
    for aa, of in AA_OF.items():
        if aa in names and of not in names:
            raise HistoError(f"arm {aa!r} is the A/A repeat of {of!r}: add {of!r} to the arms")
    if len(names) != len(out):
        raise HistoError(f"duplicate arms in {list(arms)} x ratios {list(ratios)}")
    return out


def check_groups_disjoint(train: Tiles, test: Tiles, what: str, train_what: str = "the training subset") -> None:
    """The harness's honesty check: no training (or validation) group may appear in the test set."""
    shared = sorted(set(train.groups) & set(test.groups))
    if shared:
        raise HistoError(f"{len(shared)} group(s) of {train_what} are also in {what}, e.g. {shared[0]!r}: "
                         f"the split leaks; re-run prepare (splits must be by group)")


def train_seed(kind: str, seed: int) -> int:
    """The seed a job trains with: the seed itself, or the A/A arm's own stream."""
    return seed + AA_SEED_OFFSET if kind in AA_OF else seed


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
        filt = read_filtered(selection_dir(cfg.samples, cfg.selection))
        unknown = [f["id"] for f in filt if f["id"] not in index]
        if unknown:
            raise HistoError(f"filtered.csv in {selection_dir(cfg.samples, cfg.selection)} lists sample {unknown[0]!r} "
                             f"that {cfg.samples}/samples.csv lacks: re-run select")
        kept = {c: [index[f["id"]] for f in ks] for c, ks in ranked_kept(filt, real.classes).items()}
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
                get_logger("evaluate").warning("%s: selection kept only %d of the %d %r samples asked for; the arm "
                                               "uses %d (unselected: the same count); select --quota-ratio %g fills "
                                               "each class from its ranked list (filtered.json: short = too few "
                                               "candidates, sample more)", name, n_sel, want, c, n_sel,
                                               max(r for _, k, r in arms if k == "selected"))
            per_class[c] = kept[c][:n_sel] if kind == "selected" else n_sel
        chosen[name] = per_class
    return {"rows": rows, "images": images, "by_class": by_class, "chosen": chosen}


def training_set(kind: str, name: str, seed: int, real: Tiles, syn: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(uint8 images, labels, synthetic counts per class) of one arm and seed."""
    if kind in REAL_KINDS:
        return real.images, real.labels, {c: 0 for c in real.classes}
    idx, counts = [], {}
    for ci, c in enumerate(real.classes):
        pick = syn["chosen"][name][c]
        if kind == "unselected":
            rng = numpy_rng(seed, ci)
            pool = syn["by_class"][c]
            pick = [pool[j] for j in rng.choice(len(pool), size=pick, replace=False)] if pick else []
        idx += pick
        counts[c] = len(pick)
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    labels = torch.tensor([real.classes.index(syn["rows"][i]["target"]) for i in idx], dtype=torch.long)
    return (torch.cat([real.images, syn["images"][idx_t]]), torch.cat([real.labels, labels]), counts)
