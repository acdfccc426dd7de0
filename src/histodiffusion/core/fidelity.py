"""Class fidelity as arithmetic: the share of samples a judge assigns to their target class, per class and
over all classes, for all samples and for the kept ones, each with a 95% Wilson interval."""
from __future__ import annotations

import math

import numpy as np

from ..runtime.errors import HistoError


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
