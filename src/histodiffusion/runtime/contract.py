"""The completion contract of every stage: its output directory holds config.json first and
_COMPLETE.json last, and _COMPLETE.json records the stage, its config and a hash of every input it read.

An input is an artifact named by a config field marked `F(..., input=True)` (config.input_fields);
its hash is that of the completion marker of the stage that made it (or of a base's checksums.json, or
of the file itself), so an input that was re-made, trained longer or replaced has another hash.
`check_complete` is the one question "is this output done, from these inputs?": done (skip it), not
done (run it: the stage resumes or refuses another config itself), or done from other inputs: a clear
error naming the inputs that changed (delete the output to re-make it). Inputs are compared by these
hashes, not by their paths: a complete output copied or moved together with its inputs (a run directory
copied to reuse its finished stages) is still complete. Markers written before this contract (format 1)
are refused with a clear error too.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from . import config as C
from .artifacts import selection_dir
from .configtypes import config_to_dict, input_fields
from .distributed import dist_info
from .errors import HistoError
from .fileio import read_json, sha256_file
from .rundirs import COMPLETE_MARKER, MARKER_FORMAT, comparable_config

REMADE = (C.ReportConfig, C.SelectConfig, C.ExportDatasetConfig)  # cheap stages re-made (not refused) when
# their inputs changed
_UP = 3  # an input inside a stage's directory (e.g. ldm/model/scheduler) is hashed by that stage's marker


def fingerprint(path: str | Path) -> str:
    """A hash of one input artifact: its own completion marker; for a folder of config files only (a
    noise scheduler), their content (training a model longer does not change its schedule); else the
    marker of the stage directory that holds it, a base's checksums.json, the file itself, or "missing"."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() and not (p / COMPLETE_MARKER).is_file() else []
    if files and all(f.suffix == ".json" for f in files):
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(p).as_posix()}:{sha256_file(f)};".encode())
        return h.hexdigest()
    for d in [p, *list(p.parents)[:_UP]]:
        for name in (COMPLETE_MARKER, "checksums.json"):
            if (d / name).is_file():
                rel = p.relative_to(d).as_posix()
                return hashlib.sha256(sha256_file(d / name).encode() + f":{rel}".encode()).hexdigest()
    if p.is_file():
        return sha256_file(p)
    return "missing"


def input_hashes(cfg: Any) -> dict[str, Any]:
    """{config field: hash, or list of hashes for a list of paths} of the stage's inputs."""
    out: dict[str, Any] = {}
    for name in input_fields(type(cfg)):
        value = getattr(cfg, name)
        if name == "selection" and not value and getattr(cfg, "samples", ""):  # evaluate's default selection
            value = selection_dir(cfg.samples)
        if isinstance(value, (tuple, list)):
            if value:
                out[name] = [fingerprint(v) for v in value]
        elif value:
            out[name] = fingerprint(value)
    return out


def completion_record(cfg: Any, **extra: Any) -> dict:
    """What a stage writes into its _COMPLETE.json (runtime.mark_complete(out, **completion_record(cfg)))."""
    return {"config_class": type(cfg).__name__, "config": config_to_dict(cfg), "inputs": input_hashes(cfg), **extra}


def output_dir(cfg: Any) -> Path | None:
    """The directory whose marker says the stage is done (None: `run`, which has no marker of its own)."""
    if isinstance(cfg, C.RunConfig):
        return None
    if isinstance(cfg, C.SelectConfig):
        return selection_dir(cfg.samples, cfg.out)
    if isinstance(cfg, C.ReportConfig) and not cfg.out:
        from .layout import RunLayout

        return RunLayout(cfg.run).report
    return Path(cfg.out)


def completion(out: str | Path | None, cfg: Any) -> tuple[bool, list[str]]:
    """(complete with this config, the inputs whose hash changed since) of `out`; reads only (a HistoError
    for a marker of an older histodiffusion)."""
    if out is None:
        return False, []
    marker = Path(out) / COMPLETE_MARKER
    if not marker.is_file():
        return False, []
    rec = read_json(marker, "completion marker")
    if rec.get("format_version") != MARKER_FORMAT or "inputs" not in rec:
        raise HistoError(f"{out} was completed by an older histodiffusion (completion marker format "
                         f"{rec.get('format_version')!r}, this version writes {MARKER_FORMAT} with the hashes of its "
                         f"inputs): delete it (or use another output directory) to re-make it")
    inputs = input_fields(type(cfg))  # compared by hash below, wherever they are now
    if comparable_config(rec.get("config"), inputs, type(cfg)) != comparable_config(config_to_dict(cfg), inputs):
        return False, []
    now = input_hashes(cfg)
    return True, sorted(k for k in set(now) | set(rec["inputs"]) if now.get(k) != rec["inputs"].get(k))


def check_complete(out: str | Path | None, cfg: Any) -> bool:
    """True when `out` is complete with this config and these inputs; False when it is not complete or
    was made with another config (the stage then resumes, or refuses, itself); a HistoError when it is
    complete but was made from other inputs, or by an older histodiffusion."""
    done, changed = completion(out, cfg)
    if done and changed and isinstance(cfg, REMADE):  # cheap, a pure function of its inputs: made again
        if dist_info()[0] == 0:  # only rank 0 writes
            (Path(out) / COMPLETE_MARKER).unlink(missing_ok=True)
        return False
    if done and changed:
        raise HistoError(f"{out} is complete but was made from other inputs: {', '.join(changed)} changed since "
                         f"({', '.join(f'{k}={getattr(cfg, k)}' for k in changed)}); delete {out} to re-make it "
                         f"from the new inputs, or use another output directory")
    return done
