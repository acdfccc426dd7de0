"""The stage registry: one record per stage (name, config class, run function, what it reads and writes).

The CLI builds one subcommand per record, `run` (pipeline.py) calls stages through it, `info` and the
API read it. A record's `run` imports its stage module only when called, so `histodiffusion --help`
answers without importing torch; these call-time imports are the only ones from runtime/ up to the
stages (nothing below the stages imports this module: cli, pipeline, api and info do). Order: pipeline
order, then the stand-alone stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import config as C
from .configtypes import input_fields


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI subcommand, e.g. "train-latent-classifier"
    config: type  # its frozen config dataclass
    run: Callable[[Any], Any]  # run(config) -> the stage's output (a directory, mostly)
    help: str  # one line: what it does
    outputs: tuple[str, ...] = ()  # what it writes into its output directory (besides config.json, _COMPLETE.json)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The config fields naming the artifacts it reads (hashed into its _COMPLETE.json; contract.py)."""
        return input_fields(self.config)

    def __call__(self, cfg: Any) -> Any:
        """Run the stage (CLI, `run` and the API call stages this way). An output complete from other
        inputs is refused first, with the inputs that changed (the completion contract, contract.py)."""
        from .contract import check_complete, output_dir

        check_complete(output_dir(cfg), cfg)
        return self.run(cfg)


# run functions: each imports its stage module on call (no module-name strings)
def _prepare(cfg):
    from ..stages.prepare import run
    return run(cfg)


def _train_autoencoder(cfg):
    from ..stages.train_autoencoder import run
    return run(cfg)


def _encode(cfg):
    from ..stages.encode import run
    return run(cfg)


def _pretrain(cfg):
    from ..stages.pretrain import run
    return run(cfg)


def _export_base(cfg):
    from ..stages.export_base import run
    return run(cfg)


def _latent_classifier(cfg):
    from ..stages.latent_classifier import run
    return run(cfg)


def _finetune_decoder(cfg):
    from ..stages.finetune_decoder import run
    return run(cfg)


def _sample(cfg):
    from ..stages.sample import run
    return run(cfg)


def _select(cfg):
    from ..stages.select import run
    return run(cfg)


def _evaluate(cfg):
    from ..stages.evaluate import run
    return run(cfg)


def _score(cfg):
    from ..stages.evaluate import run_score
    return run_score(cfg)


def _judge(cfg):
    from ..stages.judge import run
    return run(cfg)


def _export_dataset(cfg):
    from ..stages.export_dataset import run
    return run(cfg)


def _report(cfg):
    from ..stages.report import run
    return run(cfg)


def _run(cfg):
    from ..pipeline import run
    return run(cfg)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", C.PrepareConfig, _prepare, "slides / patch folders / labels CSV -> dataset directory",
          ("manifest.csv", "shards/", "subsets/", "meta.json")),
    Stage("train-autoencoder", C.AutoencoderConfig, _train_autoencoder, "train the KL autoencoder on unlabeled tiles",
          ("model/vae/", "metrics.jsonl", "checkpoints/")),
    Stage("encode", C.EncodeConfig, _encode, "cache latents (posterior mean, std) of a dataset",
          ("index.csv", "latents_*.safetensors", "subsets/", "meta.json", "latent_space.json")),
    Stage("pretrain", C.PretrainConfig, _pretrain, "train the unconditional latent diffusion UNet",
          ("model/", "metrics.jsonl", "checkpoints/")),
    Stage("export-base", C.ExportBaseConfig, _export_base,
          "pretrain's model -> a shippable base (fp16, checksums, model card)",
          ("unet_ema/", "scheduler/", "vae/", "histodiffusion.json", "checksums.json", "README.md")),
    Stage("train-latent-classifier", C.LatentClassifierConfig, _latent_classifier,
          "noise-aware latent classifier p(y | z_t, t)", ("model/", "metrics.json", "checkpoints/")),
    Stage("finetune-decoder", C.FinetuneDecoderConfig, _finetune_decoder,
          "fine-tune the decoder with an auxiliary classifier", ("model/vae/", "metrics.json", "checkpoints/")),
    Stage("sample", C.SampleConfig, _sample, "classifier-guided synthesis in latent space",
          ("images/", "samples.csv", "grids/", "pipeline/")),
    Stage("select", C.SelectConfig, _select, "score synthetic samples and write the keep-list filtered.csv",
          ("filtered.csv", "filtered.json", "generative_metrics.json", "selector/")),
    Stage("evaluate", C.EvaluateConfig, _evaluate,
          "downstream classifiers: real vs real + synthetic, seeds, CIs",
          ("keep_list.json", "classifiers/", "per_seed.csv", "curves.csv", "metrics.json", "confusion/")),
    Stage("score", C.ScoreConfig, _score,
          "re-score saved downstream classifiers on a labeled dataset; class fidelity of samples",
          ("scores.csv", "scores.json", "fidelity.json")),
    Stage("judge", C.JudgeConfig, _judge,
          "independent class-fidelity judge (train split only) -> fidelity.json of sample dirs",
          ("model/", "judge.json")),
    Stage("export-dataset", C.ExportDatasetConfig, _export_dataset,
          "real subset + kept synthetic tiles -> a labeled image folder (labels.csv, images/<class>/, card)",
          ("labels.csv", "images/", "dataset.json", "README.md")),
    Stage("report", C.ReportConfig, _report, "HTML + Markdown report of a run",
          ("index.html", "report.md", "figures/")),
    Stage("run", C.RunConfig, _run, "the whole chain in one run directory (resumable)",
          ("log.txt", "timings.md", "base.json")),
)}


def stage(name: str) -> Stage:
    """The record of stage `name`; HistoError naming the known stages otherwise."""
    from .errors import HistoError

    if name not in STAGES:
        raise HistoError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def run_stage(name: str, cfg: Any, procs: int = 1) -> Any:
    """Run stage `name` with `cfg` in this process, or with procs > 1 in that many local processes
    (torchrun; distributed.launch_stage)."""
    if procs > 1:
        from .distributed import launch_stage

        return launch_stage(name, cfg, procs)
    return stage(name)(cfg)


def stage_of_config(cfg: Any) -> Stage:
    """The record whose config class `cfg` is an instance of (every stage has its own class)."""
    for s in STAGES.values():
        if type(cfg) is s.config:
            return s
    raise KeyError(type(cfg).__name__)


def build(name: str, fields: dict) -> Any:
    """Stage `name`'s config from a dict of fields (unknown fields, wrong types and ranges are errors)."""
    return C.config_from_dict(stage(name).config, fields)
