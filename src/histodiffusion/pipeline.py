"""`histodiffusion run`: the whole chain in one run directory, each stage skipped when complete.

    prepare (unlabeled, target) -> train-autoencoder -> encode (unlabeled, target) -> pretrain
    -> train-latent-classifier -> finetune-decoder -> sample -> select -> evaluate -> export-dataset -> report

Every stage is an ordinary stage run with its own config, written into its own sub-directory, so a
killed run resumes by re-running the same command and any stage can be re-run by hand. With
`--ablations true` it also trains the "no pretraining" arm (the same UNet trained only on the small
labeled set, then guided, selected and evaluated the same way) and writes the ablation table.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from .data.splits import fewshot_names
from .runtime import config as C
from .runtime.artifacts import IMAGE_BASELINE_DIR, LDM_UNET
from .runtime.configrules import START_STRENGTH, validate_config
from .runtime.configtypes import load_config_file
from .runtime.contract import check_complete
from .runtime.errors import HistoError
from .runtime.fileio import write_json_atomic, write_text_atomic
from .runtime.layout import RunLayout
from .runtime.log import get_logger, human_time, log_to
from .runtime.registry import STAGES, build, run_stage
from .runtime.reuse import check_source, reuse_stage
from .runtime.rundirs import start_run_dir


# stage_config keys besides the stage names: one stage run twice, or the no-pretraining ablation's own
# stages (each key's fields go on top of its stage's, e.g. {"evaluate-nopretrain": {"ratios": [1]}})
EXTRA_KEYS = ("prepare-unlabeled", "prepare-target", "encode-target", "pretrain-target", "pretrain-nopretrain", "sample-nopretrain",
              "select-nopretrain", "evaluate-nopretrain")


@dataclasses.dataclass
class Step:
    name: str  # shown in progress lines
    stage: str  # the stage registry's name (registry.STAGES: config class, run function)
    out: Path  # the stage's artifact directory (its completion marker says "done")
    fields: dict  # config fields (layout + preset + user overrides)
    on_skip: Callable[[], list[str]] | None = None  # checks repeated when the stage is skipped: warnings


def plan(cfg: C.RunConfig, base: dict | None | str = "verify") -> list[Step]:
    """The chain of stages for this run, with each stage's resolved config fields (`base`: the verified
    base record when the caller has it already, else it is resolved and verified here)."""
    validate_config(cfg)
    if cfg.adapt_decoder_unlabeled and not cfg.finetune_decoder:
        raise HistoError("--adapt-decoder-unlabeled true adapts the decoder fine-tune: it needs --finetune-decoder true")
    if cfg.target_unlabeled and not (cfg.start_from == "unlabeled" or cfg.adapt_decoder_unlabeled
                                     or cfg.adapt_unlabeled_steps):
        raise HistoError("--target-unlabeled tiles are used only by --start-from unlabeled, --adapt-decoder-unlabeled "
                         "true or --adapt-unlabeled-steps N: give one of them")
    if cfg.latent_classifier_trunk == "unet" and cfg.ablations:
        raise HistoError("--latent-classifier-trunk unet builds the classifier on the pretrained UNet, which would "
                         "guide the no-pretraining arm of --ablations true too: use one of them")
    if cfg.start_from == "noise" and (cfg.start_strength != START_STRENGTH or cfg.start_labels != "latent"):
        raise HistoError(f"--start-strength {cfg.start_strength:g} and --start-labels {cfg.start_labels} are used only "
                         f"with --start-from unlabeled (samples from noise start at strength 1)")
    fields = _fields_of(cfg)
    base = _base(cfg) if base == "verify" else base
    L = RunLayout(Path(cfg.out))
    ldm_model = Path(base["path"]) if base else L.model(L.ldm)
    ae_vae = ldm_model / "vae" if base else L.ae_vae
    steps, ldm_model, labels_csv = _model_steps(cfg, L, fields, base, ldm_model, ae_vae)
    steps += _synthesis_steps(cfg, L, fields, ldm_model, ae_vae)
    steps.append(Step("report", "report", L.report, fields("report", {
        "run": str(L.root), "out": str(L.report), "data": str(L.data_target), "samples": str(L.samples()),
        "eval": str(L.evaluation()), "latent_classifier": str(L.latent_classifier)}, {})))
    d_tgt, d_unl = str(L.data_target), str(L.data_unlabeled)
    of_dataset = {d_tgt: d_tgt, str(L.cache_target): d_tgt, d_unl: d_unl, str(L.cache_unlabeled): d_unl}
    _check_steps(cfg, steps, of_dataset, d_tgt, labels_csv)
    return steps


Fields = Callable[..., dict]  # fields(key, layout, settings, stage=None) -> a stage's resolved config fields


def _fields_of(cfg: C.RunConfig) -> Fields:
    """The merger of a stage's config fields: preset < the run's settings < the user's --stage-config (of
    the stage, then of its key, e.g. "prepare-target"); the layout's paths last: the user may not move a
    stage's inputs or outputs (a clear error). Every --stage-config entry is checked here, also of stages
    this run does not reach (fields, types, ranges)."""
    from .runtime.presets import PRESETS, preset_overrides

    preset_overrides(cfg.preset, "run")  # validates the name
    preset = PRESETS[cfg.preset]
    user = load_config_file(cfg.stage_config) if cfg.stage_config else {}
    unknown = sorted(set(user) - set(STAGES) - set(EXTRA_KEYS))
    if unknown:
        raise HistoError(f"stage_config {cfg.stage_config}: unknown stage(s) {unknown}")
    for key, values in user.items():
        stage = key if key in STAGES else key.rsplit("-", 1)[0]
        try:
            build(stage, values)
        except HistoError as e:
            raise HistoError(f"stage_config {cfg.stage_config}, entry {key!r}: {e}") from None

    def fields(key: str, layout: dict, settings: dict, stage: str | None = None) -> dict:
        stage = stage or key
        merged = {**preset.get(stage, {}), **preset.get(key, {}), **settings}
        for k in dict.fromkeys((stage, key)):
            moved = sorted(set(user.get(k, {})) & set(layout))
            if moved:
                raise HistoError(f"stage_config {cfg.stage_config}, entry {k!r}: field(s) {moved} are part of the "
                                 f"run layout ({', '.join(f'{m}={layout[m]}' for m in moved)}) and cannot be "
                                 f"overridden; run the stage by hand (histodiffusion {stage}) to use other paths")
            merged.update(user.get(k, {}))
        return {**merged, **layout}
    return fields


def _model_steps(cfg: C.RunConfig, L: RunLayout, fields: Fields, base: dict | None, ldm_model: Path,
                 ae_vae: Path) -> tuple[list[Step], Path, str]:
    """The data and the unconditional models: prepare, autoencoder, encode, pretrain (or the base instead),
    and the optional unlabeled adaptation to the target. Returns (steps, the LDM the later stages use,
    the labels CSV of the target)."""
    unlabeled_sources, labels_csv = _sources(cfg)
    d_unl, d_tgt, c_unl, c_tgt = L.data_unlabeled, L.data_target, L.cache_unlabeled, L.cache_target
    target_fields = fields("prepare-target", {"out": str(d_tgt), "exclude": (str(ldm_model if base else d_unl),)}, {
        "kind": "labeled", "labels_csv": labels_csv, "tile_size": cfg.tile_size, "seed": cfg.split_seed,
        **({"unlabeled_tiles": cfg.target_unlabeled} if cfg.target_unlabeled else {})}, "prepare")
    prepare_target = Step("prepare target", "prepare", d_tgt, target_fields,
                          on_skip=None if base else lambda: _scale_warnings(d_tgt, d_unl, target_fields))
    encode_target = Step("encode target", "encode", c_tgt, fields("encode-target", {
        "data": str(d_tgt), "vae": str(ae_vae), "out": str(c_tgt)}, {}, "encode"))
    if base:  # pretrain once, adapt many times: the base replaces the pretraining stages
        steps = [prepare_target, encode_target]
    else:
        steps = [
            Step("prepare unlabeled", "prepare", d_unl, fields("prepare-unlabeled", {"out": str(d_unl)}, {
                "kind": "unlabeled", "sources": unlabeled_sources, "tile_size": cfg.tile_size,
                "fewshot_fracs": ()}, "prepare")),
            prepare_target,
            Step("train autoencoder", "train-autoencoder", L.ae,
                 fields("train-autoencoder", {"data": (str(d_unl),), "out": str(L.ae)}, {})),
            Step("encode unlabeled", "encode", c_unl,
                 fields("encode", {"data": str(d_unl), "vae": str(ae_vae), "out": str(c_unl)}, {})),
            encode_target,
            Step("pretrain LDM", "pretrain", L.ldm,
                 fields("pretrain", {"cache": (str(c_unl),), "out": str(L.ldm)}, {})),
        ]
    if cfg.adapt_unlabeled_steps:  # beyond the paper: the target's own train tiles, labels unused
        steps.append(Step("adapt LDM to target tiles (unlabeled)", "pretrain", L.ldm_target, fields(
            "pretrain-target", {"cache": (str(c_tgt),), "init_from": str(ldm_model), "out": str(L.ldm_target)},
            {"subset": "train", "steps": cfg.adapt_unlabeled_steps}, "pretrain")))
        ldm_model = L.model(L.ldm_target)
    return steps, ldm_model, labels_csv


def _synthesis_steps(cfg: C.RunConfig, L: RunLayout, fields: Fields, ldm_model: Path, ae_vae: Path) -> list[Step]:
    """Adaptation to the labels (latent classifier, decoder fine-tune), then per arm (the main chain and the
    optional no-pretraining ablation): sample, select, evaluate."""
    d_tgt, c_tgt = L.data_target, L.cache_target
    classifier = Step("latent classifier", "train-latent-classifier", L.latent_classifier,
                      fields("train-latent-classifier", {"cache": str(c_tgt), "scheduler": str(ldm_model / "scheduler"),
                                                         "out": str(L.latent_classifier)}, {
                          "subset": cfg.subset,
                          **({"trunk_unet": str(ldm_model / LDM_UNET)} if cfg.latent_classifier_trunk == "unet" else {})}))
    steps = [classifier]
    decoder = None
    if cfg.finetune_decoder:
        decoder = L.decoder
        steps.append(Step("finetune decoder", "finetune-decoder", decoder, fields("finetune-decoder", {
            "data": str(d_tgt), "vae": str(ae_vae), "out": str(decoder)}, {
            "subset": cfg.subset, **({"unlabeled_subset": "train"} if cfg.adapt_decoder_unlabeled else {})})))
    vae = str(L.model(decoder) / "vae") if decoder else ""
    # beyond the paper: start from the target's train tiles, their class read by the latent classifier, each
    # decoded sample given back what the round trip loses on its tile (detail); the selection then keeps each
    # class's most confident samples first (nearest the class centroid first kept starting tiles of other
    # classes: BENCHMARKS.md, "Ranking the kept samples by confidence", "The starting tile's detail")
    start, ranking = ({"strength": cfg.start_strength, "init_labels": "classifier", "init_subset": "train",
                       "detail": "tile"}, {"rank_by": "confidence"}) if cfg.start_from == "unlabeled" else ({}, {})
    if cfg.start_labels == "ensemble":  # the latent classifier's reading averaged with its image-space baseline's
        if not classifier.fields.get("image_baseline", True):
            raise HistoError("--start-labels ensemble reads the tiles with train-latent-classifier's image baseline: "
                             "it needs image_baseline true in that stage's config")
        start.update(init_labels="ensemble", init_image_classifier=(str(L.latent_classifier / IMAGE_BASELINE_DIR),))
    arms = [("", ldm_model)]
    if cfg.ablations:
        steps.append(Step("pretrain LDM on target only (ablation)", "pretrain", L.ldm_nopretrain,
                          fields("pretrain-nopretrain", {"cache": (str(c_tgt),), "out": str(L.ldm_nopretrain)},
                                 {"subset": cfg.subset}, "pretrain")))
        arms.append(("_nopretrain", L.model(L.ldm_nopretrain)))
    for suffix, model in arms:
        key = suffix.replace("_", "-")  # stage_config key of the ablation's stages, e.g. "sample-nopretrain"
        s_dir = L.samples(suffix)
        # samples that keep their tiles' detail never went through the round trip: no roundtrip arm for them
        detail = fields(f"sample{key}", {}, start, "sample").get("detail", "none")
        roundtrip = ("roundtrip",) if detail == "none" else ()
        evaluate = fields(f"evaluate{key}", {"data": str(d_tgt), "samples": str(s_dir),
                                             "selection": str(L.select(suffix)), "out": str(L.evaluation(suffix))}, {
            "subset": cfg.subset, "ratios": cfg.ratios, "seeds": cfg.seeds,
            **({"arms": ("real", "selected")} if suffix else {}),
            # samples that start from the target's unlabeled tiles are judged against those tiles pseudo-labelled
            # without a generator (evaluate's pseudo arm; BENCHMARKS.md: at 5% they account for the whole gain)
            # and against the very tiles they started from, raw (start: what the diffusion step adds) and, for
            # samples decoded without their tiles' detail, after one pass through the samples' autoencoder
            # (roundtrip: how much of that the autoencoder costs)
            **({"arms": C.EvaluateConfig().arms + ("pseudo", "start") + roundtrip}
               if cfg.start_from == "unlabeled" and not suffix
               else {})}, "evaluate")
        # selection drops samples: make oversample x as many as the largest ratio evaluated needs
        n_sample = max(evaluate["ratios"]) * cfg.oversample
        steps += [
            Step(f"sample{suffix}", "sample", s_dir, fields(f"sample{key}", {
                "model": str(model), "classifier": str(L.model(L.latent_classifier)), "vae": vae,
                "out": str(s_dir), "real_counts": str(c_tgt)}, {
                "ratio": n_sample, "real_subset": cfg.subset, "seed": cfg.seeds[0] if cfg.seeds else 0, **start},
                "sample")),
            # class-balanced selection: every class keeps the largest ratio's quota from its ranked list
            Step(f"select{suffix}", "select", L.select(suffix), fields(f"select{key}", {
                "samples": str(s_dir), "data": str(d_tgt), "out": str(L.select(suffix))}, {
                "subset": cfg.subset, "quota_ratio": max(evaluate["ratios"]), **ranking}, "select")),
            Step(f"evaluate{suffix}", "evaluate", L.evaluation(suffix), evaluate),
        ]
        if not suffix:  # what a user trains on: the real subset + selected@R as files, its measured effect quoted
            measured = "selected" in evaluate.get("arms", C.EvaluateConfig().arms)
            steps.append(Step("export dataset", "export-dataset", L.augmented, fields("export-dataset", {
                "data": str(d_tgt), "samples": str(s_dir), "selection": str(L.select()), "out": str(L.augmented),
                "evaluation": str(L.evaluation()) if measured else ""}, {
                "subset": cfg.subset, "ratio": max(evaluate["ratios"])})))
    return steps


def _base(cfg: C.RunConfig) -> dict | None:
    """The verified base record (None with --base none); refuses options that contradict it."""
    from .models.base import resolve_base, verify_base

    if cfg.base == "none":
        return None
    if cfg.unlabeled:
        raise HistoError("--unlabeled is for pretraining from scratch: add --base none (a base is already pretrained)")
    info = verify_base(resolve_base(cfg.base))
    tile = info["base"]["tile_size"]
    if cfg.tile_size != tile:
        raise HistoError(f"base {info['path']} works on {tile} px tiles, not --tile-size {cfg.tile_size}: "
                         f"use --tile-size {tile}, or --base none to pretrain at {cfg.tile_size} px")
    return info


# config fields that name a subset of the dataset or cache the stage reads
SUBSET_FIELDS = {"train-latent-classifier": ("subset", "val_subset"), "finetune-decoder": ("subset", "unlabeled_subset"),
                 "sample": ("real_subset",), "select": ("subset",), "evaluate": ("subset",), "report": ("subset",),
                 "pretrain": ("subset",)}


def _check_steps(cfg: C.RunConfig, steps: list[Step], of_dataset: dict[str, str], target: str,
                 labels_csv: str) -> None:
    """Plan-time checks of what would otherwise fail only when a late stage starts: every stage's config
    (fields, types, ranges), the subsets stages ask of the run's datasets and caches (`of_dataset`: path
    -> the dataset it holds or encodes; prepare must make the subset), and a labels CSV of >= 2 classes."""
    from .diffusers_pipeline import start_index
    from .runtime.artifacts import HOLDOUT_SPLIT, SPLITS, UNLABELED_SPLIT
    from .stages.prepare import read_labels_csv

    where = f"stage_config {cfg.stage_config}" if cfg.stage_config else "run"
    configs = []
    for step in steps:
        try:
            configs.append(build(step.stage, step.fields))
            if isinstance(configs[-1], C.SampleConfig):  # a strength that runs no sampling step
                start_index(configs[-1].steps, configs[-1].strength)
        except HistoError as e:
            raise HistoError(f"{where}: stage {step.name!r}: {e}") from None
    read_labels_csv(Path(labels_csv))
    missing = [p for p in cfg.target_unlabeled if not Path(p).exists()]
    if missing:
        raise HistoError(f"--target-unlabeled {missing[0]}: no such file or folder")
    made = {}  # dataset -> the subsets its prepare step makes
    for c in configs:
        if isinstance(c, C.PrepareConfig) and c.out in of_dataset:
            fewshot = set(fewshot_names(c.fewshot_fracs, c.fewshot_k, c.fewshot_draws))
            made[c.out] = ({*SPLITS, "all", *fewshot} if c.labels_csv or c.class_folders else
                           {"all", UNLABELED_SPLIT, *((HOLDOUT_SPLIT,) if c.holdout_frac else ())})
    for step, sc in zip(steps, configs):
        reads = {str(v) for k in ("data", "cache", "real_counts") for v in _as_tuple(getattr(sc, k, ()))}
        if step.stage == "report" and not sc.data:
            reads = {target}  # the report's default dataset
        datasets = {of_dataset[r] for r in reads if r in of_dataset} & set(made)
        for name in SUBSET_FIELDS.get(step.stage, ()):
            value = getattr(sc, name)
            for d in datasets:
                if value and value not in made[d]:
                    origin = "--subset" if value == cfg.subset else f"{step.stage}.{name}"
                    raise HistoError(
                        f"subset {value!r} ({origin}, stage {step.name!r}) is not made by prepare: dataset {d} will "
                        f"have {sorted(made[d])}; use one of them, or make it with prepare's fewshot_fracs / "
                        f"fewshot_k in --stage-config (e.g. {{\"prepare-target\": {{\"fewshot_fracs\": [0.2]}}}})")


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) if v else ()


def _scale_warnings(target: Path, unlabeled: Path, target_fields: dict) -> list[str]:
    from .data.resolution import check_scale

    tolerance = target_fields.get("scale_tolerance", C.PrepareConfig.scale_tolerance)
    return check_scale(target, [unlabeled], tolerance) if (unlabeled / "meta.json").is_file() else []


def _sources(cfg: C.RunConfig) -> tuple[tuple[str, ...], str]:
    from .data import default

    unl = tuple(cfg.unlabeled) or tuple(str(p) for p in default.unlabeled_sources())
    lab = cfg.labels_csv or str(default.labels_csv())
    return unl, lab


def run(cfg: C.RunConfig) -> Path:
    base = _base(cfg)
    steps = plan(cfg, base)  # validates the run config and the stage overrides before anything is written
    if cfg.reuse_from:
        check_source(cfg.reuse_from, cfg.out)
    root = start_run_dir(cfg.out, cfg, "run", neutral=("until", "procs", "reuse_from"))
    with log_to(RunLayout(root).log):  # every stage's lines, with the pipeline's
        if base:
            from .models.base import base_summary

            write_json_atomic(RunLayout(root).base_record, {k: base[k] for k in ("id", "path")} | {
                k: base["base"][k] for k in ("name", "version", "tile_size")} | {"vae_hash": base["vae_hash"]})
            get_logger("run").info(f"adapting base {base_summary(base)}: pretraining stages skipped")
        return _run_steps(cfg, steps, root)


def _run_steps(cfg: C.RunConfig, steps: list[Step], root: Path) -> Path:
    log = get_logger("run")
    layout = RunLayout(root)
    timings = _read_timings(layout.timings)  # a stage a re-run skips keeps the time measured when it ran
    order = [s.name for s in steps]
    if cfg.until:
        stages = [s.stage for s in steps]
        if cfg.until not in stages:
            raise HistoError(f"until: unknown stage {cfg.until!r}; stages of this run: {sorted(set(stages))}")
        last = stages.index(cfg.until)
        while last + 1 < len(stages) and stages[last + 1] == cfg.until:
            last += 1
        steps = steps[:last + 1]
    t_all = time.time()
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.name}"
        stage_cfg = build(step.stage, step.fields)
        if cfg.reuse_from:  # a stage finished in the other run with this config and these inputs: copied
            copied = reuse_stage(step.out, root, Path(cfg.reuse_from), stage_cfg)
            if copied:
                log.info(f"{head}: {copied}")
        if check_complete(step.out, stage_cfg):  # same config, same inputs (a changed input: a clear error)
            log.info(f"{head}: complete, skipped ({step.out})")
            for warning in step.on_skip() if step.on_skip else []:
                log.warning(warning)
            seconds = timings.get(step.name, (None, ""))[0]
            timings[step.name] = (seconds, "skipped (time of the run that made it)" if seconds is not None
                                  else "skipped (made outside this run)")
            _write_timings(layout.timings, timings, order)
            continue
        log.info(f"{head} -> {step.out}")
        t0 = time.time()
        # evaluate's classifiers are independent: one process each with --procs
        run_stage(step.stage, stage_cfg, cfg.procs if step.stage == "evaluate" else 1)
        dt = time.time() - t0
        timings[step.name] = (dt, "ran")
        _write_timings(layout.timings, timings, order)
        log.info(f"{head}: done in {human_time(dt)}")
    if cfg.until:
        log.info(f"stopped after stage {cfg.until!r} as asked ({human_time(time.time() - t_all)})")
        return root
    if cfg.ablations:
        _ablation_table(root)
    report = layout.report_index
    log.info(f"finished in {human_time(time.time() - t_all)}; report: {report.resolve()}")
    return report


def _read_timings(path: Path) -> dict[str, tuple[float | None, str]]:
    """stage name -> (seconds or None, status) from the timings.md an earlier run wrote."""
    out: dict[str, tuple[float | None, str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("stage", "---"):
            try:
                out[cells[0]] = (float(cells[1]), cells[2])
            except ValueError:
                out[cells[0]] = (None, cells[2])
    return out


def _write_timings(path: Path, timings: dict[str, tuple[float | None, str]], order: list[str]) -> None:
    names = [n for n in order if n in timings] + [n for n in timings if n not in order]
    rows = [f"| {n} | {'—' if timings[n][0] is None else f'{timings[n][0]:.1f}'} | {timings[n][1]} |" for n in names]
    write_text_atomic(path, "\n".join(["| stage | seconds | |", "|---|---:|---|"] + rows) + "\n")


def _ablation_table(root: Path) -> None:
    """One table over the main evaluation and the no-pretraining evaluation (same seeds, same harness)."""
    import json

    from .core.evalsummary import format_ci as _ci
    from .data.evalarms import REAL_KINDS as real_kinds  # imports torch: only when the table is written

    rows = ["| arm | accuracy (mean, 95% CI) | macro-F1 (mean, 95% CI) | delta acc vs real |", "|---|---|---|---|"]
    layout = RunLayout(root)
    for suffix, label in (("", ""), ("_nopretrain", " (no pretraining)")):
        path = layout.evaluation(suffix) / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        for arm, res in m.get("arms", {}).items():
            if suffix and arm in real_kinds:
                continue
            acc, f1 = res.get("accuracy", {}), res.get("macro_f1", {})
            d = m.get("deltas", {}).get(arm, {}).get("accuracy", {})
            rows.append(f"| {arm}{label} | {_ci(acc)} | {_ci(f1)} | {_ci(d) if d else '—'} |")
    write_text_atomic(layout.ablation_table, "\n".join(rows) + "\n")
