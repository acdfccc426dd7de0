"""`histodiffusion run`: the whole chain in one run directory, each stage skipped when complete.

    prepare (unlabeled, target) -> train-autoencoder -> encode (unlabeled, target) -> pretrain
    -> train-latent-classifier -> finetune-decoder -> sample -> select -> evaluate -> report

Every stage is an ordinary stage run with its own config, written into its own sub-directory, so a
killed run resumes by re-running the same command and any stage can be re-run by hand. With
`--ablations true` it also trains the "no pretraining" arm (the same UNet trained only on the small
labeled set, then guided, selected and evaluated the same way) and writes the ablation table.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from . import config as C
from .runtime import HistoError, get_logger, human_time, is_complete, start_run_dir, write_text_atomic


# stage_config keys besides the stage names: one stage run twice, or the no-pretraining ablation's own
# stages (each key's fields go on top of its stage's, e.g. {"evaluate-nopretrain": {"ratios": [1]}})
EXTRA_KEYS = ("prepare-unlabeled", "prepare-target", "encode-target", "pretrain-nopretrain", "sample-nopretrain",
              "select-nopretrain", "evaluate-nopretrain")


@dataclasses.dataclass
class Step:
    name: str  # shown in progress lines
    stage: str  # CLI stage name (selects the config class)
    out: Path  # the stage's artifact directory (its completion marker says "done")
    fields: dict  # config fields (layout + preset + user overrides)
    done: Callable[[Path], bool] = is_complete
    on_skip: Callable[[], list[str]] | None = None  # checks repeated when the stage is skipped: warnings


def _run_stage(stage: str, cfg: Any) -> None:
    import importlib

    from .cli import ENTRY, STAGES

    module = importlib.import_module(STAGES[stage][0])
    getattr(module, ENTRY.get(stage, "run"))(cfg)


def plan(cfg: C.RunConfig) -> list[Step]:
    """The chain of stages for this run, with each stage's resolved config fields."""
    from .presets import PRESETS, preset_overrides

    C.validate_config(cfg)
    root = Path(cfg.out)
    preset_overrides(cfg.preset, "run")  # validates the name
    preset = PRESETS[cfg.preset]
    user = C.load_config_file(cfg.stage_config) if cfg.stage_config else {}
    unknown = sorted(set(user) - set(C.STAGE_CONFIGS) - set(EXTRA_KEYS))
    if unknown:
        raise HistoError(f"stage_config {cfg.stage_config}: unknown stage(s) {unknown}")

    unlabeled_sources, labels_csv = _sources(cfg)
    d_unl, d_tgt = root / "data" / "unlabeled", root / "data" / "target"
    c_unl, c_tgt = root / "cache" / "unlabeled", root / "cache" / "target"
    ldm_model = root / "ldm" / "model"

    def fields(key: str, base: dict, stage: str | None = None) -> dict:
        stage = stage or key
        merged = {**preset.get(stage, {}), **preset.get(key, {}), **base}
        merged.update(user.get(stage, {}))  # the user's settings of the stage, then of this key
        merged.update(user.get(key, {}) if key != stage else {})
        return merged

    target_fields = fields("prepare-target", {
        "out": str(d_tgt), "kind": "labeled", "labels_csv": labels_csv, "tile_size": cfg.tile_size,
        "exclude": (str(d_unl),), "seed": cfg.split_seed}, "prepare")
    steps = [
        Step("prepare unlabeled", "prepare", d_unl, fields("prepare-unlabeled", {
            "out": str(d_unl), "kind": "unlabeled", "sources": unlabeled_sources, "tile_size": cfg.tile_size,
            "fewshot_fracs": ()}, "prepare")),
        Step("prepare target", "prepare", d_tgt, target_fields,
             on_skip=lambda: _scale_warnings(d_tgt, d_unl, target_fields)),
        Step("train autoencoder", "train-autoencoder", root / "ae",
             fields("train-autoencoder", {"data": (str(d_unl),), "out": str(root / "ae")})),
        Step("encode unlabeled", "encode", c_unl,
             fields("encode", {"data": str(d_unl), "vae": str(root / "ae" / "model" / "vae"), "out": str(c_unl)})),
        Step("encode target", "encode", c_tgt, fields("encode-target", {
            "data": str(d_tgt), "vae": str(root / "ae" / "model" / "vae"), "out": str(c_tgt)}, "encode")),
        Step("pretrain LDM", "pretrain", root / "ldm",
             fields("pretrain", {"cache": (str(c_unl),), "out": str(root / "ldm")})),
        Step("latent classifier", "train-latent-classifier", root / "adapt" / "latent_classifier",
             fields("train-latent-classifier", {
                 "cache": str(c_tgt), "subset": cfg.subset, "scheduler": str(ldm_model / "scheduler"),
                 "out": str(root / "adapt" / "latent_classifier")})),
    ]
    decoder = None
    if cfg.finetune_decoder:
        decoder = root / "adapt" / "decoder"
        steps.append(Step("finetune decoder", "finetune-decoder", decoder, fields("finetune-decoder", {
            "data": str(d_tgt), "subset": cfg.subset, "vae": str(root / "ae" / "model" / "vae"), "out": str(decoder)})))
    vae = str(decoder / "model" / "vae") if decoder else ""
    arms = [("", ldm_model)]
    if cfg.ablations:
        steps.append(Step("pretrain LDM on target only (ablation)", "pretrain", root / "ldm_nopretrain",
                          fields("pretrain-nopretrain", {"cache": (str(c_tgt),), "out": str(root / "ldm_nopretrain"),
                                                         "subset": cfg.subset}, "pretrain")))
        arms.append(("_nopretrain", root / "ldm_nopretrain" / "model"))
    for suffix, model in arms:
        key = suffix.replace("_", "-")  # stage_config key of the ablation's stages, e.g. "sample-nopretrain"
        s_dir = root / f"samples{suffix}"
        evaluate = fields(f"evaluate{key}", {
            "data": str(d_tgt), "subset": cfg.subset, "samples": str(s_dir), "out": str(root / f"eval{suffix}"),
            "ratios": cfg.ratios, "seeds": cfg.seeds, **({"arms": ("real", "selected")} if suffix else {})}, "evaluate")
        # selection drops samples: make oversample x as many as the largest ratio evaluated needs
        n_sample = max(evaluate["ratios"]) * cfg.oversample
        steps += [
            Step(f"sample{suffix}", "sample", s_dir, fields(f"sample{key}", {
                "model": str(model), "classifier": str(root / "adapt" / "latent_classifier" / "model"), "vae": vae,
                "out": str(s_dir), "ratio": n_sample, "real_counts": str(c_tgt), "real_subset": cfg.subset,
                "seed": cfg.seeds[0] if cfg.seeds else 0}, "sample")),
            Step(f"select{suffix}", "select", s_dir, fields(f"select{key}", {
                "samples": str(s_dir), "data": str(d_tgt), "subset": cfg.subset}, "select"),
                done=lambda p: (p / "filtered.csv").is_file()),
            Step(f"evaluate{suffix}", "evaluate", root / f"eval{suffix}", evaluate),
        ]
    steps.append(Step("report", "report", root / "report", fields("report", {"run": str(root),
                                                                             "out": str(root / "report")})))
    return steps


def _scale_warnings(target: Path, unlabeled: Path, target_fields: dict) -> list[str]:
    from .data.prepare import check_scale

    tolerance = target_fields.get("scale_tolerance", C.PrepareConfig.scale_tolerance)
    return check_scale(target, [unlabeled], tolerance) if (unlabeled / "meta.json").is_file() else []


def _sources(cfg: C.RunConfig) -> tuple[tuple[str, ...], str]:
    from .data import default

    unl = tuple(cfg.unlabeled) or tuple(str(p) for p in default.unlabeled_sources())
    lab = cfg.labels_csv or str(default.labels_csv())
    return unl, lab


def run(cfg: C.RunConfig) -> Path:
    steps = plan(cfg)  # validates the run config and the stage overrides before anything is written
    root = start_run_dir(cfg.out, cfg, "run", neutral=("until",))
    log = get_logger(log_file=root / "log.txt")
    if cfg.until:
        stages = [s.stage for s in steps]
        if cfg.until not in stages:
            raise HistoError(f"until: unknown stage {cfg.until!r}; stages of this run: {sorted(set(stages))}")
        last = stages.index(cfg.until)
        while last + 1 < len(stages) and stages[last + 1] == cfg.until:
            last += 1
        steps = steps[:last + 1]
    t_all = time.time()
    timings = []
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.name}"
        if step.done(step.out):
            log.info(f"{head}: complete, skipped ({step.out})")
            for warning in step.on_skip() if step.on_skip else []:
                log.warning(warning)
            timings.append((step.name, 0.0, "skipped"))
            continue
        stage_cfg = C.config_from_dict(C.STAGE_CONFIGS[step.stage], step.fields)
        log.info(f"{head} -> {step.out}")
        t0 = time.time()
        _run_stage(step.stage, stage_cfg)
        dt = time.time() - t0
        timings.append((step.name, dt, "ran"))
        log.info(f"{head}: done in {human_time(dt)}")
    lines = ["| stage | seconds | |", "|---|---:|---|"] + [f"| {n} | {t:.1f} | {s} |" for n, t, s in timings]
    write_text_atomic(root / "timings.md", "\n".join(lines) + "\n")
    if cfg.until:
        log.info(f"stopped after stage {cfg.until!r} as asked ({human_time(time.time() - t_all)})")
        return root
    if cfg.ablations:
        _ablation_table(root)
    report = root / "report" / "index.html"
    log.info(f"finished in {human_time(time.time() - t_all)}; report: {report.resolve()}")
    return report


def _ablation_table(root: Path) -> None:
    """One table over the main evaluation and the no-pretraining evaluation (same seeds, same harness)."""
    import json

    rows = ["| arm | accuracy (mean, 95% CI) | macro-F1 (mean, 95% CI) | delta acc vs real |", "|---|---|---|---|"]
    for suffix, label in (("", ""), ("_nopretrain", " (no pretraining)")):
        path = root / f"eval{suffix}" / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        for arm, res in m.get("arms", {}).items():
            if suffix and arm in ("real", "classic"):
                continue
            acc, f1 = res.get("accuracy", {}), res.get("macro_f1", {})
            d = m.get("deltas", {}).get(arm, {}).get("accuracy", {})
            rows.append(f"| {arm}{label} | {_ci(acc)} | {_ci(f1)} | {_ci(d) if d else '—'} |")
    write_text_atomic(root / "ablation.md", "\n".join(rows) + "\n")


def _ci(d: dict) -> str:
    if not d:
        return "—"
    lo, hi = d.get("ci95", [float("nan"), float("nan")])
    return f"{d.get('mean', float('nan')):.3f} [{lo:.3f}, {hi:.3f}]"
