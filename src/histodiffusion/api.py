"""The Python API: what the CLI does, in a few lines each, with the objects the CLI uses.

Every stage function takes the stage's config fields as keyword arguments (the CLI's flags, with `_`
for `-`), builds the same frozen config the CLI builds (types and values checked the same way) and
calls the same stage entry point; it returns the stage's output directory (evaluate: its metrics.json
as a dict). Errors are `HistoError`s naming the culprit, as on the command line.

    from histodiffusion import api

    api.run(out="runs/demo")                                       # the whole chain, resumable
    print(api.info("runs/demo")["stages"][-1])                     # its stages and key figures
    pipe = api.load_pipeline("runs/demo")                          # its models as a HistoDiffusionPipeline
    tiles = pipe(class_labels=["lung_aca"] * 8, guidance_scale=10).images     # PIL images
    api.sample(model="runs/demo/ldm/model", classifier="runs/demo/adapt/latent_classifier/model",
               out="samples/more", n_per_class=16, scale=5)
    api.select(samples="samples/more", data="runs/demo/data/target", subset="frac0.25")
    metrics = api.evaluate(data="runs/demo/data/target", subset="frac0.25", samples="samples/more", out="eval/more")
    api.export_dataset(data="runs/demo/data/target", subset="frac0.25", samples="samples/more", out="augmented")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .runtime.errors import HistoError
from .runtime.fileio import read_json

__all__ = ["config", "run_stage", "prepare", "run", "train_latent_classifier", "sample", "select", "evaluate",
           "export_dataset", "report", "load_base", "load_pipeline", "info", "HistoError"]


# --------------------------------------------------------------------------------------------------
# Stages: keyword arguments -> the stage's config -> the stage's run(), as the CLI does
# --------------------------------------------------------------------------------------------------
def config(stage: str, **fields: Any):
    """The frozen config of CLI stage `stage` (e.g. "sample") from its fields, checked as the CLI checks."""
    from .runtime.registry import build

    return build(stage, fields)


def run_stage(stage: str, **fields: Any):
    """Run CLI stage `stage` with these config fields; returns what the stage returns (its output)."""
    from .runtime.registry import stage as record

    return record(stage)(config(stage, **fields))


def prepare(**fields: Any) -> Path:
    """`histodiffusion prepare`: slides / labeled tiles -> a dataset directory (e.g. labels_csv=..., out=...)."""
    return Path(run_stage("prepare", **fields))


def run(**fields: Any) -> Path:
    """`histodiffusion run`: the whole chain in one run directory; returns the report's index.html."""
    return Path(run_stage("run", **fields))


def train_latent_classifier(**fields: Any) -> Path:
    """`histodiffusion train-latent-classifier`; the exported model is <out>/model."""
    return Path(run_stage("train-latent-classifier", **fields))


def sample(**fields: Any) -> Path:
    """`histodiffusion sample`: images/, samples.csv and pipeline/ (the diffusers pipeline that made them)."""
    return Path(run_stage("sample", **fields))


def select(**fields: Any) -> Path:
    """`histodiffusion select`: writes filtered.csv (keep-list) and filtered.json into its own directory
    (default <samples>/select, with config.json and _COMPLETE.json); returns that directory."""
    return Path(run_stage("select", **fields))


def evaluate(**fields: Any) -> dict:
    """`histodiffusion evaluate`; returns its metrics.json (arms, paired deltas vs real, noise floor)."""
    out = Path(run_stage("evaluate", **fields))
    return read_json(out / "metrics.json", "evaluation metrics")


def export_dataset(**fields: Any) -> Path:
    """`histodiffusion export-dataset`: the real subset + selected@ratio samples as files (labels.csv,
    images/<class>/, dataset.json, a dataset card); returns the folder."""
    return Path(run_stage("export-dataset", **fields))


def report(**fields: Any) -> Path:
    """`histodiffusion report`: the HTML + Markdown report of a run."""
    return Path(run_stage("report", **fields))


# --------------------------------------------------------------------------------------------------
# Models and runs
# --------------------------------------------------------------------------------------------------
def load_base(spec: str = "default") -> dict:
    """A pretrained base, verified (files, format, checksums, latent shape): its record, with "path" (the
    folder: pass it as `model=` to load_pipeline or sample) and "id"."""
    from .models.base import resolve_base, verify_base

    return verify_base(resolve_base(spec))


def load_pipeline(path: str | Path = "", *, model: str | Path = "", classifier: str | Path = "",
                  vae: str | Path = "", scheduler: str = ""):
    """A HistoDiffusionPipeline from
    - a pipeline folder (model_index.json, e.g. a sample stage's pipeline/),
    - a run directory (its sample stage's pipeline/, else the run's LDM or base, latent classifier and
      decoder as `run` would sample with them), or
    - model= (an LDM folder or a base), classifier= (a latent classifier folder), optionally vae=.
    scheduler: ddim | dpmsolver++ (default: the one the folder or run used)."""
    from .diffusers_pipeline import HistoDiffusionPipeline, make_scheduler
    from .runtime.latent_space import SCHEDULE_KEYS
    from .runtime.progresslog import sync_diffusers_bars

    if model or classifier:
        if path or not (model and classifier):
            raise HistoError("load_pipeline: give a pipeline folder or run directory, or both model= and classifier=")
        return HistoDiffusionPipeline.from_models(model, classifier, vae, scheduler or "dpmsolver++")
    path = Path(path)
    if not path.is_dir():
        raise HistoError(f"load_pipeline: {path} is not a directory (a pipeline folder or a run directory)")
    folder = path if (path / "model_index.json").is_file() else None
    fields: dict = {}
    if folder is None:
        from .info import run_plan

        _, steps = run_plan(path)
        fields = next(s.fields for s in steps if s.stage == "sample")
        pipe_dir = Path(fields["out"]) / "pipeline"
        folder = pipe_dir if (pipe_dir / "model_index.json").is_file() else None
    if folder is None:
        return HistoDiffusionPipeline.from_models(fields["model"], fields["classifier"], fields.get("vae", ""),
                                                  scheduler or fields.get("scheduler") or "dpmsolver++")
    sync_diffusers_bars()
    pipe = HistoDiffusionPipeline.from_pretrained(str(folder))
    if scheduler:  # rebuilt from the noise schedule alone, as the sample stage builds it from the training one
        pipe.scheduler = make_scheduler(scheduler, {k: v for k, v in pipe.scheduler.config.items()
                                                    if k in (*SCHEDULE_KEYS, "trained_betas")})
    return pipe


def info(run_dir: str | Path) -> dict:
    """What `histodiffusion info` shows, as a dict: {"stages": [{"name", "status", "figures", ...}], ...}."""
    from .info import run_info

    return run_info(run_dir)
