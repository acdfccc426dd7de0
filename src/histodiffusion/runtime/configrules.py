"""The value rules of the stage configs (config.py): ranges and choices per field, applied to every config
built from flags or a config file (config_from_dict) and to every stage's config at plan time, so a bad
value is refused before a stage writes anything. Stages keep their own input checks. Knows the config
classes by name only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .errors import HistoError

RANK_BY = ("centroid", "confidence", "hard", "coverage")  # select's orders within a class (select.rank_members)
INIT_LABELS = ("tiles", "classifier", "ensemble", "image")  # where sample's init tiles get their class (sample.assign_init)
COLOR_MATCH = ("none", "tile")  # sample --color-match: a decoded sample's colours set to its starting tile's, or not
DETAIL = ("none", "tile")  # sample --detail: what the round trip loses on the starting tile added back, or not
LATENT_TRUNKS = ("small", "unet")  # run --latent-classifier-trunk (pipeline._synthesis_steps)
START_FROM = ("noise", "unlabeled")  # run --start-from: where the main chain's samples start (pipeline._synthesis_steps)
START_LABELS = ("latent", "ensemble")  # run --start-labels: who reads the starting tiles' class (sample init_labels)
START_STRENGTH = 0.05  # run --start-strength's default
ARM_KINDS = ("real", "real_aa", "classic", "classic_aa", "selected", "unselected", "pseudo",
             "pseudo+selected", "start", "roundtrip")  # evaluate's arm kinds
PSEUDO_RANKS = ("confidence", "random")  # evaluate --pseudo-rank (data.evalarms.pseudo_sets)


# --------------------------------------------------------------------------------------------
def _at_least(lo):
    return lambda v: v >= lo, f">= {lo}"


def _above(lo):
    return lambda v: v > lo, f"> {lo}"


def _within(lo, hi, hi_open: bool = False, lo_open: bool = False):
    return (lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)), \
        f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _zero_or_at_least(lo):
    return lambda v: v == 0 or v >= lo, f"0 (off) or >= {lo}"


def _one_of(*choices):
    return lambda v: v in choices, f"one of {', '.join(choices)}"


def _each(rule):
    ok, what = rule
    return lambda v: all(ok(x) for x in v), f"a list of values {what}"


_PRECISION = _one_of("no", "bf16", "fp16")
_COMMON_RULES = {"steps": _at_least(1), "batch_size": _at_least(1), "lr": _above(0), "num_workers": _at_least(0),
                 "shard_size": _at_least(1), "keep_checkpoints": _at_least(0), "checkpoint_every": _at_least(0),
                 "mixed_precision": _PRECISION, "weight_decay": _at_least(0)}
VALUE_RULES: dict[str, dict] = {
    "PrepareConfig": {"kind": _one_of("labeled", "unlabeled", "auto"), "tile_size": _at_least(1),
                      "val_frac": _within(0, 1, True), "test_frac": _within(0, 1, True),
                      "min_tissue": _within(0, 1), "min_saturation": _within(0, 1), "max_ink": _within(0, 1),
                      "image_mode": _one_of("convert", "refuse"), "tissue_method": _one_of("fixed", "otsu"),
                      "fewshot_fracs": _each(_within(0, 1)), "fewshot_k": _each(_at_least(1)), "fewshot_draws": _at_least(1),
                      "holdout_frac": _within(0, 1, True), "group_px": _at_least(0),
                      "scale_sample": _at_least(0), "scale_tolerance": _zero_or_at_least(1)},
    "AutoencoderConfig": {"latent_channels": _at_least(1), "layers_per_block": _at_least(1), "crop": _at_least(0),
                          "kl_weight": _at_least(0), "adv_weight": _at_least(0), "lpips_weight": _at_least(0),
                          "holdout": _at_least(0), "eval_every": _at_least(0),
                          "block_out_channels": _each(_at_least(1))},
    "EncodeConfig": {"scaling_factor": _at_least(0)},
    "ExportBaseConfig": {"dtype": _one_of("fp16", "fp32")},
    "PretrainConfig": {"beta_schedule": _one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
                       "prediction_type": _one_of("epsilon", "v_prediction"), "loss": _one_of("l1", "l2"),
                       "num_train_timesteps": _at_least(2), "grad_accum": _at_least(1), "warmup": _at_least(0),
                       "ema_decay": _within(0, 1, True), "grad_clip": _at_least(0), "sample_every": _at_least(0),
                       "layers_per_block": _at_least(1), "weights": _each(_at_least(0)),
                       "block_out_channels": _each(_at_least(1))},
    "LatentClassifierConfig": {"width": _at_least(1), "depth": _at_least(1), "max_timestep": _at_least(0),
                               "checkpoint_every": _at_least(1)},
    "FinetuneDecoderConfig": {"aux_weight": _at_least(0), "aux_steps": _at_least(0), "checkpoint_every": _at_least(1),
                              "unlabeled_batch_size": _at_least(1)},
    "SampleConfig": {"scheduler": _one_of("ddim", "dpmsolver++"), "eta": _within(0, 1), "scale": _at_least(0),
                     "n_per_class": _at_least(0), "ratio": _at_least(0), "init_labels": _one_of(*INIT_LABELS),
                     "color_match": _one_of(*COLOR_MATCH), "detail": _one_of(*DETAIL),
                     "init_top_share": _within(0, 1, lo_open=True)},
    "SelectConfig": {"feature_steps": _at_least(1), "min_confidence": _within(0, 1),
                     "memorization_quantile": _within(0, 1), "max_ratio": _at_least(0), "quota_ratio": _at_least(0),
                     "rank_by": _one_of(*RANK_BY), "coverage_k": _at_least(1)},
    "RunConfig": {"oversample": _at_least(1), "ratios": _each(_above(0)), "adapt_unlabeled_steps": _at_least(0),
                  "procs": _at_least(1), "start_from": _one_of(*START_FROM), "start_labels": _one_of(*START_LABELS),
                  "latent_classifier_trunk": _one_of(*LATENT_TRUNKS),
                  "start_strength": _within(0, 1, hi_open=True, lo_open=True)},
    "JudgeConfig": {},  # the common rules (steps, batch_size, lr)
    "ExportDatasetConfig": {"ratio": _above(0)},
    "ReportConfig": {"grid_per_class": _at_least(1), "grid_scale": _at_least(0),
                     "embedding": _one_of("auto", "umap", "tsne", "pca")},
    "EvaluateConfig": {"arms": _each(_one_of(*ARM_KINDS)), "pseudo_rank": _one_of(*PSEUDO_RANKS),
                       "epochs": _at_least(0), "steps_per_epoch": _at_least(0), "val_every": _at_least(0),
                       "ratios": _each(_above(0)), "ema_decay": _within(0, 1, True),
                       "synthetic_weight": _above(0), "real_finish": _within(0, 1, hi_open=True)},
}


def validate_config(cfg: Any) -> None:
    """Raise a HistoError naming the first field whose value is out of range or not an allowed choice, or a list
    field given a bare string (from Python, ("a",) and "a" differ: a string would be read letter by letter)."""
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if str(f.type).startswith("tuple") and isinstance(value, str):
            raise HistoError(f"config field {f.name} ({name}.{f.name}) is a list: give ({value!r},), not the string "
                             f"{value!r}")
    rules = VALUE_RULES.get(name)
    if rules is None:
        return
    fields = {f.name for f in dataclasses.fields(cfg)}
    for field_name in sorted(fields):
        rule = rules.get(field_name) or _COMMON_RULES.get(field_name)
        if rule is None:
            continue
        ok, what = rule
        value = getattr(cfg, field_name)
        if not ok(value):
            shown = list(value) if isinstance(value, tuple) else value
            raise HistoError(f"config field {field_name} ({name}.{field_name}) must be {what}, not {shown!r}")
