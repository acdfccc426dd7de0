"""The one place that knows artifact file names, schemas and format versions.

Dataset directory (`prepare`):
    manifest.csv            one row per tile, MANIFEST_COLUMNS
    shards/pixels_00000.safetensors   tensor "images": uint8 [N, H, W, 3]; metadata {"format_version", "first_row"}
    subsets/<name>.csv      few-shot subsets of the train split: column "id" (e.g. frac0.05, k5)
    meta.json               format_version, name, kind, classes, tile_size, counts, source hashes, config
    _COMPLETE.json          written last

Latent cache (`encode`):
    index.csv               INDEX_COLUMNS (same ids as the manifest)
    latents_00000.safetensors  "mean", "std": float32 [N, C, h, w] (posterior of the autoencoder)
    subsets/                copied from the dataset
    meta.json               format_version, dataset, classes, count
    latent_space.json       the latent-space record (latent_space.py): vae, vae_hash, scaling_factor, latent_shape
    _COMPLETE.json

Model folders: diffusers/ModelMixin `save_pretrained` folders (config.json + *.safetensors) plus, for
our own models, `histodiffusion.json` (MODEL_INFO) naming classes and the latent-space record they were
trained in (autoencoder hash, scaling factor, latent shape: latent_space.LatentSpace.fields).

Samples (`sample`): images/<id>.png, samples.csv (SAMPLES_COLUMNS), grids/<class>.png, config.json.
Selection (`select`): its own directory, by default <samples>/select/ (SELECT_DIR): config.json,
filtered.csv (FILTERED_COLUMNS: a keep-list, no copies), filtered.json, _COMPLETE.json last. Sample
directories of format 1 held filtered.csv beside samples.csv: they are refused with a clear error.
"""
from __future__ import annotations

from pathlib import Path

from .. import FORMAT_VERSION
from .errors import HistoError
from .fileio import read_csv, read_json
from .rundirs import check_format_version, is_complete

# dataset directory
MANIFEST = "manifest.csv"
META = "meta.json"
SHARDS_DIR = "shards"
SUBSETS_DIR = "subsets"
MANIFEST_COLUMNS = ["id", "source", "path", "x", "y", "width", "height", "label", "group", "split",
                    "shard", "index", "hash"]
SPLITS = ("train", "val", "test")
UNLABELED_SPLIT = "unlabeled"  # the split of every tile of an unlabeled dataset
HOLDOUT_SPLIT = "holdout"  # groups of an unlabeled dataset kept out of training, for measurement only


def pixel_shard_name(i: int) -> str:
    return f"pixels_{i:05d}.safetensors"


# latent cache
INDEX = "index.csv"
INDEX_COLUMNS = ["id", "label", "group", "split", "shard", "index"]


def latent_shard_name(i: int) -> str:
    return f"latents_{i:05d}.safetensors"


# models
MODEL_INFO = "histodiffusion.json"
LDM_UNET = "unet_ema"
IMAGE_BASELINE_DIR = "image_baseline"  # train-latent-classifier: its image-space baseline classifier (a classifier folder)
LDM_SCHEDULER = "scheduler"
LDM_VAE = "vae"

# samples and selection
SAMPLES_CSV = "samples.csv"
SAMPLES_COLUMNS = ["id", "file", "seed", "target", "target_index", "scale", "scheduler", "steps", "eta",
                   "window_lo", "window_hi", "confidence", "unet_id", "classifier_id", "vae_id",
                   "strength", "init_id", "init_dihedral"]  # init_*: the real tile a strength < 1 sample starts from
FILTERED_CSV = "filtered.csv"
SELECT_DIR = "select"  # select's output directory inside a sample directory (its default)
FILTERED_COLUMNS = ["id", "target", "pred", "confidence", "nearest_centroid", "centroid_dist",
                    "nn_real_id", "nn_real_dist", "memorized", "keep", "rank", "reason"]


# --------------------------------------------------------------------------------------------
# Readers with clear errors
# --------------------------------------------------------------------------------------------
def read_meta(directory: str | Path, what: str) -> dict:
    """meta.json of a complete artifact directory, with its format version checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HistoError(f"{what} not found: {directory}")
    if not is_complete(directory):
        raise HistoError(f"{what} {directory} is incomplete (no _COMPLETE.json): re-run the stage that writes it")
    meta = read_json(directory / META, f"{what} meta")
    check_format_version(meta, directory / META)
    return meta


def read_dataset(directory: str | Path) -> tuple[dict, list[dict]]:
    """(meta, manifest rows) of a prepared dataset directory."""
    meta = read_meta(directory, "dataset")
    rows = read_csv(Path(directory) / MANIFEST, MANIFEST_COLUMNS, "manifest")
    return meta, rows


def subset_ids(directory: str | Path, rows: list[dict], subset: str) -> list[str]:
    """Ids of `subset`: a split name (train/val/test/unlabeled/holdout), "all" (every tile meant for
    training: all but the held-out groups), or a few-shot subset file."""
    if subset == "all":
        return [r["id"] for r in rows if r["split"] != HOLDOUT_SPLIT]
    if subset in SPLITS or subset in (UNLABELED_SPLIT, HOLDOUT_SPLIT):
        ids = [r["id"] for r in rows if r["split"] == subset]
        if not ids:
            raise HistoError(f"split {subset!r} of {directory} is empty")
        return ids
    path = Path(directory) / SUBSETS_DIR / f"{subset}.csv"
    if not path.is_file():
        have = sorted(p.stem for p in (Path(directory) / SUBSETS_DIR).glob("*.csv"))
        raise HistoError(f"unknown subset {subset!r} in {directory}: use a split ({', '.join(SPLITS)}, all) "
                         f"or one of {have}")
    ids = [r["id"] for r in read_csv(path, ["id"], "subset file")]
    if not ids:
        raise HistoError(f"subset file {path} is empty")
    return ids


def selection_dir(samples: str | Path, out: str | Path = "") -> Path:
    """Where `select` writes the keep-list of sample directory `samples`: `out`, else <samples>/select."""
    return Path(out) if out else Path(samples) / SELECT_DIR


def model_info(directory: str | Path) -> dict:
    return read_json(Path(directory) / MODEL_INFO, "model info")


def format_meta(**fields) -> dict:
    return {"format_version": FORMAT_VERSION, **fields}


def confusion_name(testset: str, arm: str) -> str:
    """File name of an arm's confusion matrix PNG under confusion/."""
    return f"{testset}__{arm.replace('@', '_at_').replace('/', '_')}.png"
