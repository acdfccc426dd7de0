"""`histodiffusion info RUN_DIR`: a run's stages, whether each is complete, and its key figures.

The stages and their directories come from the run's own plan (pipeline.plan on the run's recorded
config.json, laid out under RUN_DIR wherever it was moved), so `info` lists what `run` would run. Each
stage is complete (its marker is there), started (its directory exists, no marker: a killed or running
stage) or not started. Key figures are read from the files the stages write (meta.json, metrics.json,
filtered.json, _COMPLETE.json); a figure whose file is missing is left out. Reads only, writes nothing.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .runtime.errors import HistoError
from .runtime.fileio import read_json
from .runtime.layout import RunLayout
from .runtime.registry import STAGES
from .runtime.rundirs import COMPLETE_MARKER, CONFIG_FILE, check_format_version

COMPLETE, STARTED, NOT_STARTED = "complete", "started", "not started"


def run_plan(run_dir: str | Path):
    """(RunConfig, [pipeline.Step]) of a run directory, its paths under `run_dir`; HistoError if not a run."""
    from .runtime.config import RunConfig, config_from_dict
    from .pipeline import plan

    root = Path(run_dir)
    if not root.is_dir():
        raise HistoError(f"run directory not found: {root}")
    path = RunLayout(root).config
    if not path.is_file():
        raise HistoError(f"{root} is not a run directory (no {CONFIG_FILE}; `histodiffusion run --out DIR` makes one)")
    rec = read_json(path, "run config")
    check_format_version(rec, path)
    if rec.get("stage") != "run":
        raise HistoError(f"{root} is the output directory of stage {rec.get('stage')!r}, not a run directory "
                         f"(made by `histodiffusion run`)")
    # per-stage overrides change stage settings, never the layout: plan without them (the file may be gone)
    cfg = dataclasses.replace(config_from_dict(RunConfig, rec.get("config") or {}), out=str(root), stage_config="",
                              until="")
    base = None
    if cfg.base != "none":
        base_json = RunLayout(root).base_record
        recorded = read_json(base_json, "base record") if base_json.is_file() else {}
        base = {"path": recorded.get("path") or cfg.base}
    return cfg, plan(cfg, base)


def status(step) -> str:
    """complete, started (its own config.json is there: killed or running) or not started."""
    if (step.out / COMPLETE_MARKER).is_file():
        return COMPLETE
    return STARTED if _load(step.out / CONFIG_FILE).get("stage") == step.stage else NOT_STARTED


def run_info(run_dir: str | Path) -> dict:
    """{"run", "config", "base", "stages": [{"name", "stage", "dir", "status", "figures"}], "complete"}."""
    cfg, steps = run_plan(run_dir)
    root = Path(run_dir)
    stages = []
    for s in steps:
        st = status(s)
        figures = _figures(s.stage, s.out) if st == COMPLETE else ""
        stages.append({"name": s.name, "stage": s.stage, "what": STAGES[s.stage].help, "dir": _rel(s.out, root),
                       "status": st, "figures": figures})
    base = _load(RunLayout(root).base_record)
    return {"run": str(root), "config": dataclasses.asdict(cfg), "base": base, "stages": stages,
            "complete": all(s["status"] == COMPLETE for s in stages)}


def format_info(info: dict) -> str:
    cfg, stages = info["config"], info["stages"]
    done = sum(s["status"] == COMPLETE for s in stages)
    b = info["base"]
    base = f"{b.get('name')} v{b.get('version')}" if b else cfg["base"]
    lines = [f"run directory {info['run']}: {done}/{len(stages)} stages complete"
             + (" (finished)" if info["complete"] else ""),
             f"  preset {cfg['preset']}, base {base}, subset {cfg['subset']}, ratios {list(cfg['ratios'])}, "
             f"seeds {list(cfg['seeds'])}", ""]
    width, dwidth = max(len(s["name"]) for s in stages), max(len(s["dir"]) for s in stages)
    mark = {COMPLETE: "[x]", STARTED: "[~]", NOT_STARTED: "[ ]"}
    for i, s in enumerate(stages, 1):
        tail = f"  {s['figures']}" if s["figures"] else ("  (started, not finished: re-run to resume)"
                                                        if s["status"] == STARTED else "")
        lines.append(f"{mark[s['status']]} {i:2d}. {s['name']:<{width}}  {s['dir']:<{dwidth}}{tail}".rstrip())
    lines += ["", "[x] complete  [~] started, incomplete  [ ] not started"]
    return "\n".join(lines)


def show(run_dir: str | Path) -> int:
    """The `info` command: print the run's stages and key figures."""
    print(format_info(run_info(run_dir)))
    return 0


# --------------------------------------------------------------------------------------------------
# Key figures, one reader per stage (best effort: a missing or odd file gives no figure)
# --------------------------------------------------------------------------------------------------
def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _load(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _ci(d: dict) -> str:
    lo, hi = (d.get("ci95") or [float("nan")] * 2)[:2]
    return f"{d.get('mean', float('nan')):+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _figures(stage: str, out: Path) -> str:
    try:
        return _FIGURES.get(stage, lambda _: "")(out)
    except (LookupError, TypeError, ValueError, AttributeError, ZeroDivisionError):  # display only
        return ""


def _prepare(out: Path) -> str:
    m = _load(out / "meta.json")
    counts = m.get("counts") or {}
    per_split = {k: sum(v.values()) if isinstance(v, dict) else v for k, v in counts.items()}
    classes = m.get("classes") or []
    return (f"{m.get('count', sum(per_split.values()))} tiles ("
            + ", ".join(f"{k} {v}" for k, v in per_split.items()) + ")"
            + (f", {len(classes)} classes" if classes else ""))


def _autoencoder(out: Path) -> str:
    c = _load(out / COMPLETE_MARKER)
    parts = [f"{c['steps']} steps"] if "steps" in c else []
    parts += [f"held-out PSNR {c['psnr']:.2f} dB"] if "psnr" in c else []
    parts += [f"SSIM {c['ssim']:.3f}"] if "ssim" in c else []
    parts += [f"scaling factor {c['scaling_factor']:.4f}"] if "scaling_factor" in c else []
    return ", ".join(parts)


def _encode(out: Path) -> str:
    from .runtime.latent_space import LATENT_SPACE

    m, space = _load(out / "meta.json"), _load(out / LATENT_SPACE)
    return f"{m.get('count')} latents of shape {space.get('latent_shape')}"


def _pretrain(out: Path) -> str:
    info = _load(out / "model" / "histodiffusion.json")
    loss = ""
    path = out / "metrics.jsonl"
    if path.is_file():
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if '"loss"' in x]
        loss = f", last loss {rows[-1]['loss']:.4f}" if rows else ""
    return f"{info.get('steps')} steps on {info.get('latent_shape')} latents{loss}"


def _latent_classifier(out: Path) -> str:
    m = _load(out / "metrics.json")
    if "val_accuracy" not in m:
        return f"{m.get('steps')} steps"
    return f"{m.get('steps')} steps, val accuracy {m['val_accuracy']:.3f} (chance {m.get('chance', 0):.3f})"


def _decoder(out: Path) -> str:
    m = _load(out / "metrics.json")
    b, a = m.get("before") or {}, m.get("after") or {}
    return f"recon L1 {b['recon_l1']:.4f} -> {a['recon_l1']:.4f}" if "recon_l1" in a else ""


def _sample(out: Path) -> str:
    c = _load(out / COMPLETE_MARKER)
    pipe = " (pipeline/: diffusers folder)" if (out / "pipeline" / "model_index.json").is_file() else ""
    return f"{c.get('count')} synthetic tiles{pipe}"


def _select(out: Path) -> str:  # out: the selection directory
    f = _load(out / "filtered.json")
    kept, total = f.get("kept", 0), f.get("samples", 0)
    return f"kept {kept} of {total} ({kept / total:.0%}, {f.get('mode')})" if total else ""


def _evaluate(out: Path) -> str:
    m = _load(out / "metrics.json")
    deltas = {a: d["accuracy"] for a, d in (m.get("deltas") or {}).items() if a not in ("real_aa", "classic_aa") and "accuracy" in d}
    real = (m.get("arms") or {}).get("real", {}).get("accuracy")
    parts = [f"real accuracy {real['mean']:.3f}"] if real else []
    parts += [f"delta {a} {_ci(d)}" for a, d in deltas.items()]
    parts += [f"{a} vs classic {_ci(d['accuracy'])}" for a, d in (m.get("deltas_vs_classic") or {}).items()]
    parts += [f"{a} vs pseudo {_ci(d['accuracy'])}" for a, d in (m.get("deltas_vs_pseudo") or {}).items()]
    parts += [f"{a} vs start {_ci(d['accuracy'])}" for a, d in (m.get("deltas_vs_start") or {}).items()]
    parts += [f"{a} vs roundtrip {_ci(d['accuracy'])}" for a, d in (m.get("deltas_vs_roundtrip") or {}).items()]
    if m.get("noise_floor"):
        parts.append(f"noise floor {_ci(m['noise_floor']['accuracy'])}")
    classic_floor = (m.get("noise_floors") or {}).get("classic_aa")
    if classic_floor:
        parts.append(f"noise floor with augmentation {_ci(classic_floor['accuracy'])}")
    seeds = m.get("seeds")
    return "; ".join(parts) + (f" ({len(seeds)} seeds)" if seeds else "")


def _report(out: Path) -> str:
    return str(out / "index.html") if (out / "index.html").is_file() else ""


def _export_dataset(out: Path) -> str:
    m = _load(out / "dataset.json")
    return f"{m['description']} in labels.csv"


_FIGURES = {"prepare": _prepare, "train-autoencoder": _autoencoder, "encode": _encode, "pretrain": _pretrain,
            "train-latent-classifier": _latent_classifier, "finetune-decoder": _decoder, "sample": _sample,
            "select": _select, "evaluate": _evaluate, "export-dataset": _export_dataset,
            "report": _report}
