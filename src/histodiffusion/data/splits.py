"""Group-wise stratified splits and few-shot subsets (pure functions, seeded).

A group (slide, patient, or the tiles derived from one original) never spans two splits. Within each
class, the groups are shuffled with the seed; the first ones go to test, the next to val, the rest
to train. Few-shot subsets of train take prefixes of one seeded permutation of each class's train
groups, so with one seed frac0.05 is contained in frac0.1 (and k1 in k5).
"""
from __future__ import annotations

import random
from collections import defaultdict

from ..runtime.errors import HistoError


def group_labels(rows: list[dict]) -> dict[str, str]:
    """group -> its label; a group holding two labels is an error."""
    out: dict[str, str] = {}
    for r in rows:
        g, lab = r["group"], r["label"]
        if out.setdefault(g, lab) != lab:
            raise HistoError(f"group {g!r} holds tiles of two classes ({out[g]!r} and {lab!r}, e.g. {r['path']}); "
                             f"a group must have one label")
    return out


def _by_class(groups: dict[str, str]) -> dict[str, list[str]]:
    per: dict[str, list[str]] = defaultdict(list)
    for g, lab in groups.items():
        per[lab].append(g)
    return {c: sorted(gs) for c, gs in sorted(per.items())}


def split_groups(groups: dict[str, str], val_frac: float, test_frac: float, seed: int) -> dict[str, str]:
    """group -> train/val/test, stratified by class, reproducible with `seed`."""
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1:
        raise HistoError(f"val_frac ({val_frac}) and test_frac ({test_frac}) must be >= 0 with a sum below 1")
    out: dict[str, str] = {}
    for c, gs in _by_class(groups).items():
        rng = random.Random(f"{seed}:{c}")
        gs = gs[:]
        rng.shuffle(gs)
        n = len(gs)
        n_test = max(1, round(test_frac * n)) if test_frac > 0 else 0
        n_val = max(1, round(val_frac * n)) if val_frac > 0 else 0
        if n - n_test - n_val < 1:
            raise HistoError(f"class {c!r} has only {n} group(s): too few for a train split with "
                             f"val_frac={val_frac} and test_frac={test_frac}")
        for i, g in enumerate(gs):
            out[g] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return out


def draw_name(name: str, draw: int) -> str:
    """The subset name of draw `draw` of few-shot subset `name` (frac<f:g> or k<k>): the name itself for
    draw 0, <name>_d<draw> for the others."""
    return f"{name}_d{draw}" if draw else name


def fewshot_names(fracs: tuple[float, ...], ks: tuple[int, ...], draws: int = 1) -> list[str]:
    """Names of the few-shot subsets prepare makes: frac<f:g> and k<k>, and for draws > 1 also
    <name>_d1 .. <name>_d<draws-1> (other seeded draws of the same size, from other groups)."""
    names = [f"frac{f:g}" for f in fracs] + [f"k{k}" for k in ks]
    return [draw_name(n, d) for d in range(draws) for n in names]


def fewshot_groups(groups: dict[str, str], split: dict[str, str], fracs: tuple[float, ...],
                   ks: tuple[int, ...], seed: int, draws: int = 1) -> dict[str, list[str]]:
    """Subset name (frac<f:g>, k<k>, and <name>_d<d> for draws d = 1 .. draws-1) -> sorted train groups;
    at least one group per class. Within a draw the subsets are nested (a larger fraction holds the
    smaller); draw 0 is the historical subset, draw d shuffles the groups with its own seed."""
    if draws < 1:
        raise HistoError(f"few-shot draws must be >= 1, got {draws}")
    train = {g: lab for g, lab in groups.items() if split[g] == "train"}
    for f in fracs:
        if not 0 < f <= 1:
            raise HistoError(f"few-shot fraction {f} must be in (0, 1]")
    for k in ks:
        if k < 1:
            raise HistoError(f"few-shot k {k} must be >= 1")
    out: dict[str, list[str]] = {}
    for d in range(draws):
        perm: dict[str, list[str]] = {}
        for c, gs in _by_class(train).items():
            rng = random.Random(f"fewshot:{seed}:{c}" if d == 0 else f"fewshot:{seed}:draw{d}:{c}")
            gs = gs[:]
            rng.shuffle(gs)
            perm[c] = gs
        for f in fracs:
            out[draw_name(f"frac{f:g}", d)] = sorted(g for gs in perm.values()
                                                     for g in gs[:max(1, round(f * len(gs)))])
        for k in ks:
            short = {c: len(gs) for c, gs in perm.items() if len(gs) < k}
            if short:
                raise HistoError(f"few-shot k={k} groups per class: class(es) {short} have fewer train groups")
            out[draw_name(f"k{k}", d)] = sorted(g for gs in perm.values() for g in gs[:k])
    return out


def holdout_groups(rows, frac: float, seed: int) -> dict[str, str]:
    """group -> "holdout" for a seeded `frac` of the groups of an unlabeled dataset (at least one, never
    all), else "unlabeled": a slice kept out of training, for measurement only."""
    from ..runtime.artifacts import HOLDOUT_SPLIT, UNLABELED_SPLIT

    groups = sorted({r["group"] for r in rows})
    if len(groups) < 2:
        raise HistoError(f"holdout_frac={frac} needs at least 2 groups, the dataset has {len(groups)}: give "
                         f"--group-px to group tiles by region, or --holdout-frac 0")
    rng = random.Random(f"{seed}:holdout")
    rng.shuffle(groups)
    n = min(len(groups) - 1, max(1, round(frac * len(groups))))
    held = set(groups[:n])
    return {g: HOLDOUT_SPLIT if g in held else UNLABELED_SPLIT for g in groups}
