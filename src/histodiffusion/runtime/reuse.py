"""`run --reuse-from OTHER_RUN`: variants of one run (another sampler, another adaptation, an ablation) share
their common stages instead of re-running them.

A stage directory of the other run is copied into this run when the stage finished there with this run's
config and from the same inputs (runtime.contract.completion, which only reads: inputs are compared by hash,
not path),
so a copied stage is exactly what this run would have made. For an evaluation that is not reusable as a
whole (other samples, arms or seeds), its finished classifiers of the arms that do not read samples
(real, real_aa, classic, classic_aa) are copied when the harness (everything but samples, selection, arms,
ratios, seeds, external test sets) and the labeled dataset are the same. Copies are atomic (a temporary
beside the target, then renamed); nothing is copied over an existing directory. A copied artifact may name
files of the other run in its metadata (a latent cache names the dataset it encoded): keep that run.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .configtypes import config_to_dict
from .errors import HistoError
from .fileio import atomic_path, read_json
from .rundirs import CONFIG_FILE, comparable_config, is_complete

# fields of an evaluation that do not change its sample-free classifiers
_CLASSIFIER_NEUTRAL = ("samples", "selection", "arms", "ratios", "seeds", "external", "synthetic_weight",
                       "real_finish", "pseudo_reader", "pseudo_rank")


def check_source(source: str, out: str) -> Path:
    """The other run directory, checked before anything is written."""
    src = Path(source)
    if not (src / CONFIG_FILE).is_file() or read_json(src / CONFIG_FILE, "run config").get("stage") != "run":
        raise HistoError(f"reuse_from {source}: not a directory made by `histodiffusion run` (no run config.json)")
    if src.resolve() == Path(out).resolve():
        raise HistoError(f"reuse_from {source} is this run's own directory (--out)")
    return src


def reuse_stage(out: Path, root: Path, source_root: Path, cfg: Any) -> str:
    """Copy the stage directory `out` (inside run `root`) from run `source_root` when it finished there
    with `cfg` and the same inputs; returns what was copied ("" when nothing)."""
    from .config import EvaluateConfig
    from .contract import completion

    if out.exists():
        return ""
    src = source_root / Path(out).relative_to(root)
    try:
        done, changed = completion(src, cfg)  # reads only: the other run is never changed
    except HistoError:  # made by an older histodiffusion
        done, changed = False, []
    if done and not changed:
        _copy(src, out)
        return f"copied from {src}"
    if isinstance(cfg, EvaluateConfig):
        n = _reuse_classifiers(src, out, cfg)
        return f"{n} finished sample-free classifier(s) copied from {src}" if n else ""
    return ""


def _reuse_classifiers(src: Path, out: Path, cfg: Any) -> int:
    from ..data.evalarms import REAL_KINDS
    from .contract import fingerprint

    if not (src / CONFIG_FILE).is_file():
        return 0
    old = read_json(src / CONFIG_FILE, "evaluation config").get("config") or {}
    if comparable_config(old, _CLASSIFIER_NEUTRAL + ("data",), type(cfg)) != comparable_config(
            config_to_dict(cfg), _CLASSIFIER_NEUTRAL + ("data",)) or not old.get("data"):
        return 0
    if fingerprint(old["data"]) != fingerprint(cfg.data):
        return 0
    n = 0
    for d in sorted((src / "classifiers").glob("*_*")):
        arm = d.name.rsplit("_", 1)[0]
        dst = out / "classifiers" / d.name
        if arm in REAL_KINDS and is_complete(d) and not dst.exists():
            _copy(d, dst)
            n += 1
    return n


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copytree(src, tmp, symlinks=True)
