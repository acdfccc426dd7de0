"""RunLayout: every path of a run directory, named once (`run` plans with it, `info`, the report and the
tests read it).

    R/config.json  log.txt  timings.md  base.json  ablation.md
    R/data/{unlabeled,target}            prepare
    R/ae/                                train-autoencoder (model/vae)
    R/cache/{unlabeled,target}           encode
    R/ldm/ ldm_target/ ldm_nopretrain/   pretrain (model/: unet_ema, scheduler, vae)
    R/adapt/latent_classifier/           train-latent-classifier (model/)
    R/adapt/decoder/                     finetune-decoder (model/vae)
    R/samples<arm>/                      sample
    R/samples<arm>/select/               select (filtered.csv; its own config.json and marker)
    R/eval<arm>/                         evaluate
    R/augmented/                         export-dataset (labels.csv, images/<class>/: real + selected@R)
    R/report/                            report (index.html)
An arm is "" (the main chain) or "_nopretrain" (the no-pretraining ablation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARMS = ("", "_nopretrain")  # the main chain and the no-pretraining ablation


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # files of the run itself
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def timings(self) -> Path:
        return self.root / "timings.md"

    @property
    def base_record(self) -> Path:
        return self.root / "base.json"

    @property
    def ablation_table(self) -> Path:
        return self.root / "ablation.md"

    # datasets and latent caches
    @property
    def data_unlabeled(self) -> Path:
        return self.root / "data" / "unlabeled"

    @property
    def data_target(self) -> Path:
        return self.root / "data" / "target"

    @property
    def cache_unlabeled(self) -> Path:
        return self.root / "cache" / "unlabeled"

    @property
    def cache_target(self) -> Path:
        return self.root / "cache" / "target"

    # trained models (a stage directory, and the exported model folder inside it)
    @property
    def ae(self) -> Path:
        return self.root / "ae"

    @property
    def ae_vae(self) -> Path:
        return self.ae / "model" / "vae"

    @property
    def ldm(self) -> Path:
        return self.root / "ldm"

    @property
    def ldm_target(self) -> Path:
        return self.root / "ldm_target"

    @property
    def ldm_nopretrain(self) -> Path:
        return self.root / "ldm_nopretrain"

    @property
    def adapt(self) -> Path:
        return self.root / "adapt"

    @property
    def latent_classifier(self) -> Path:
        return self.adapt / "latent_classifier"

    @property
    def decoder(self) -> Path:
        return self.adapt / "decoder"

    @staticmethod
    def model(stage_dir: Path) -> Path:
        """The exported model folder of a training stage's directory."""
        return Path(stage_dir) / "model"

    # synthesis, selection, evaluation, report (per arm)
    def samples(self, arm: str = "") -> Path:
        return self.root / f"samples{arm}"

    def select(self, arm: str = "") -> Path:
        from .artifacts import selection_dir

        return selection_dir(self.samples(arm))

    def evaluation(self, arm: str = "") -> Path:
        return self.root / f"eval{arm}"

    @property
    def augmented(self) -> Path:
        """The main chain's augmented training set (export-dataset)."""
        return self.root / "augmented"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_index(self) -> Path:
        return self.report / "index.html"

    def training_dirs(self) -> list[Path]:
        """The training stages' directories (their config.json files are shown by the report)."""
        return [self.ae, self.ldm, self.ldm_target, self.ldm_nopretrain, self.adapt]
