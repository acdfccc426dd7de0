"""Stage: class-conditional synthesis by classifier guidance in latent space.

An unconditional latent diffusion UNet is steered towards class y by the noise-aware latent
classifier: eps' = eps - sqrt(1 - alpha_bar_t) * s * grad log p(y | z_t, t) (guidance.py), at the
steps whose t lies in the guidance window, with diffusers' DDIM (eta configurable, no clipping) or
DPM-Solver++ (multistep, order 2). Final latents are decoded with the (optionally fine-tuned) decoder.

With strength < 1 a sample starts instead from the latent of a real train-split tile of its class (in one
of its 8 flips/rotations), noised to that share of the schedule: SDEdit variations (Meng et al. 2022),
which keep the tile's tissue architecture; samples.csv names the tile (init_id, init_dihedral). The tile's
class is its label, or (init_labels "classifier") the latent classifier's reading of its clean latent, so
that the target's unlabeled train tiles can be the starting points, or (init_labels "ensemble") the mean of
that reading and an image classifier's on the tile's pixels, or (init_labels "image") image classifiers' alone,
e.g. the downstream classifiers an earlier round trained on real + synthetic tiles (self-training;
init_top_share: only the most confident share of each class). With detail "tile" each decoded sample gets back
what the autoencoder's round trip loses on its starting tile (core.transforms.add_detail: sample + tile - the
decoded starting latent), so it keeps the tile's nuclei and colours and carries only the denoising step's change;
with color_match "tile" it then takes its starting tile's per-channel colour statistics
(core.transforms.match_color); the pipeline does both (its `detail` and `color_match` arguments, given the tiles).

Sample i (its place in the plan: classes in order, then k = 0..count-1) uses its own torch.Generator
seeded from (run seed, i) for its initial noise and DDIM's per-step noise, so images do not depend on
the batch size or on how ids are split over processes. Each process writes the PNGs of its share of
pending ids and appends their rows to _progress/rank<r>.jsonl; a re-run skips ids listed there whose
PNG exists. Rank 0 then writes grids/, samples.csv, pipeline/ and _COMPLETE.json (last).

The models are loaded and checked together (models/bundle.py) into a HistoDiffusionPipeline, whose
call runs the one guided sampling loop (diffusers_pipeline.py). pipeline/ is that pipeline as a
diffusers folder (model_index.json, vae/, unet/, scheduler/, latent_classifier/, model card):
`DiffusionPipeline.from_pretrained` on it, given the same seeds (and starting latents and tiles), makes the same images.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..core.grids import write_grid
from ..core.seeds import sample_seed, torch_generator
from ..core.transforms import DIHEDRAL, dihedral
from ..diffusers_pipeline import class_probabilities, make_scheduler, start_index
from ..runtime.artifacts import INDEX, SAMPLES_COLUMNS, SAMPLES_CSV, read_dataset, read_meta, subset_ids
from ..runtime.config import SampleConfig
from ..runtime.contract import completion_record
from ..runtime.distributed import make_accelerator
from ..runtime.errors import HistoError
from ..runtime.fileio import atomic_path, read_csv, write_csv_atomic
from ..runtime.log import closes_stage_logs, progress
from ..runtime.rundirs import is_complete, mark_complete, start_stage

PROGRESS_DIR = "_progress"
PIPELINE_DIR = "pipeline"  # the diffusers pipeline that made the samples (model_index.json, model card)
GRID_MAX = 64


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


# --------------------------------------------------------------------------------------------------
# Loading the models into one pipeline
# --------------------------------------------------------------------------------------------------
def load_models(cfg: SampleConfig) -> dict:
    """The checked components (models/bundle.py) and "pipe": the HistoDiffusionPipeline that samples."""
    from ..diffusers_pipeline import HistoDiffusionPipeline
    from ..models.bundle import load_components

    m = load_components(cfg.model, cfg.classifier, cfg.vae)
    m["pipe"] = HistoDiffusionPipeline.from_components(m, cfg.scheduler)
    return m


def resolve_classes(wanted, classes: list[str]) -> list[int]:
    """Class names or indices -> indices into the classifier's classes."""
    if not wanted:
        return list(range(len(classes)))
    out = []
    for w in wanted:
        w = str(w)
        if w in classes:
            out.append(classes.index(w))
        elif w.isdigit() and int(w) < len(classes):
            out.append(int(w))
        else:
            raise HistoError(f"class {w!r} is not one of the latent classifier's classes {classes} "
                             f"(or an index 0..{len(classes) - 1})")
    if len(set(out)) != len(out):
        raise HistoError(f"classes listed twice: {list(wanted)}")
    return out


def real_class_counts(path: str | Path, subset: str) -> dict[str, int]:
    """Per-class counts of `subset` of a latent cache or a prepared dataset."""
    path = Path(path)
    if (path / INDEX).is_file():
        read_meta(path, "latent cache")
        rows = read_csv(path / INDEX, ["id", "label", "split"], "latent index")
    else:
        _, rows = read_dataset(path)
    ids = set(subset_ids(path, rows, subset))
    counts: dict[str, int] = {}
    for r in rows:
        if r["id"] in ids and r["label"]:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
    return counts


def plan_samples(cfg: SampleConfig, classes: list[str], default_real: str = "") -> list[dict]:
    """One entry per sample: index i (its seed), id, target class, k (its place within the class); the order defines i.

    With a ratio, per-class counts come from cfg.real_counts (else `default_real`: the latent
    classifier's own cache) restricted to cfg.real_subset."""
    targets = resolve_classes(cfg.classes, classes)
    if cfg.n_per_class < 0:
        raise HistoError(f"n_per_class must be positive (or 0 to use ratio), got {cfg.n_per_class}")
    if cfg.n_per_class > 0:
        counts = {c: cfg.n_per_class for c in targets}
    else:
        if not cfg.ratio > 0:
            raise HistoError(f"ratio must be positive, got {cfg.ratio}")
        source = cfg.real_counts or default_real
        if not source:
            raise HistoError("give n_per_class, or ratio with real_counts (the labeled cache or dataset)")
        real = real_class_counts(source, cfg.real_subset)
        counts = {c: int(round(cfg.ratio * real.get(classes[c], 0))) for c in targets}
        zero = [classes[c] for c, n in counts.items() if n <= 0]
        if zero:
            raise HistoError(f"ratio {cfg.ratio} of subset {cfg.real_subset!r} of {source} gives no "
                             f"samples for class(es) {zero} (real counts {real})")
    plan, i = [], 0
    for c in targets:
        for k in range(counts[c]):
            sid = f"{safe_name(classes[c])}_{k:05d}"
            plan.append({"i": i, "id": sid, "target": classes[c], "target_index": c, "k": k})
            i += 1
    return plan


def init_cache_dir(cfg: SampleConfig, info: dict) -> str:
    """The latent cache of the starting tiles: init_cache, or the latent classifier's ("" when neither is known)."""
    return cfg.init_cache or str(info.get("cache") or "")


def assign_init(plan: list[dict], cfg: SampleConfig, m: dict, log) -> dict:
    """With strength < 1: give every plan entry the real tile it starts from and returns {id: clean latent}
    (logs how many tiles each class's pool holds).

    Sample k of class c starts from the (k mod n_c)-th tile of class c's pool in its (k div n_c mod 8)-th
    flip/rotation, so oversampling cycles through the tiles, then their variants. The pool of class c: the
    tiles labeled c, ids in order (init_labels "tiles"), or the tiles the latent classifier reads as c on
    their clean latents (the init_top_share most confident of them), in an order shuffled by the run seed
    (init_labels "classifier": labels are never read). Only train-split tiles may be used (the latents of
    validation or test tiles would leak into training)."""
    from ..data.datasets import LatentDataset

    info = m["info"]
    cache = init_cache_dir(cfg, info)
    subset = cfg.init_subset or ("train" if cfg.init_labels != "tiles" else str(info.get("subset") or ""))
    if not cache or not subset:
        raise HistoError("strength < 1 needs init_cache and init_subset (the latent classifier records none)")
    ds = LatentDataset(cache, subset, sample=False)
    wrong = [r["id"] for r in ds.rows if r.get("split") != "train"]
    if wrong:
        raise HistoError(f"init tiles must be train-split tiles: subset {subset!r} of {cache} holds {len(wrong)} "
                         f"of another split (e.g. {wrong[0]!r})")
    if cfg.init_labels == "tiles":
        by_class = {}
        for i, r in sorted(enumerate(ds.rows), key=lambda x: x[1]["id"]):
            by_class.setdefault(r["label"], []).append(i)
    else:
        probs = pool_probabilities(ds, m["classifier"], list(info["classes"]), cfg)
        by_class = predicted_pools(probs, list(info["classes"]), cfg.seed, cfg.init_top_share)
    who = {"tiles": "by their labels", "classifier": "as read by the latent classifier",
           "ensemble": "as read by the latent and the image classifier together",
           "image": f"as read by {len(cfg.init_image_classifier)} image classifier(s)"}[cfg.init_labels]
    log.info("starting tiles: %s of the %d tiles of subset %r, %s", ", ".join(
        f"{c} {len(by_class.get(c, []))}" for c in info["classes"]), len(ds), subset, who)
    latents = {}
    for p in plan:
        rows = by_class.get(p["target"])
        if not rows:
            how = {"tiles": "of", "classifier": "the latent classifier reads as",
                   "ensemble": "the ensemble reads as", "image": "the image classifiers read as"}[cfg.init_labels]
            raise HistoError(f"subset {subset!r} of {cache} has no tile {how} class {p['target']!r} to start from")
        idx = rows[p["k"] % len(rows)]
        p["init_id"], p["init_dihedral"] = ds.rows[idx]["id"], (p["k"] // len(rows)) % DIHEDRAL
        if p["init_id"] not in latents:
            latents[p["init_id"]] = ds[idx][0]
    return latents


def pool_probabilities(ds, classifier, classes: list[str], cfg: SampleConfig, batch: int = 256):
    """[N, C] class probabilities of the pool's tiles: the latent classifier's on their clean latents at t = 0;
    with init_labels "ensemble" averaged with the image classifiers' on their pixels (two views of a tile whose
    confident mistakes differ: BENCHMARKS.md, "Pseudo-labels from two views"); with "image" the image
    classifiers' alone."""
    import torch

    if cfg.init_labels == "image":
        return image_probabilities(ds, classes, cfg)
    probs = []
    with torch.no_grad():
        for b in range(0, len(ds), batch):
            z = torch.stack([ds[i][0] for i in range(b, min(b + batch, len(ds)))])
            probs.append(class_probabilities(classifier, z, micro_batch=None))
    probs = torch.cat(probs)
    if cfg.init_labels == "ensemble":
        probs = (probs + image_probabilities(ds, classes, cfg)) / 2
    return probs


def image_probabilities(ds, classes: list[str], cfg: SampleConfig):
    """[N, C] probabilities of the init_image_classifier folders (their mean) on the pixels of the latent dataset's
    rows (pool_pixels), each folder checked by folder_probabilities."""
    import torch

    images, directory = pool_pixels(ds, cfg)
    return torch.stack([folder_probabilities(f, images, classes, directory) for f in cfg.init_image_classifier]).mean(0)


def pool_pixels(ds, cfg: SampleConfig):
    """(uint8 [N, H, W, 3] pixels of the latent dataset's rows, the dataset directory they come from): init_data,
    or the dataset the cache was encoded from."""
    return tile_pixels(cfg, ds.meta, [r["id"] for r in ds.rows], f"init_labels={cfg.init_labels}")


def tile_pixels(cfg: SampleConfig, cache_meta: dict, ids: list[str], what: str):
    """(uint8 [len(ids), H, W, 3] pixels of tiles `ids`, in that order, the dataset directory they come from):
    init_data, or the dataset the latent cache (its meta.json `cache_meta`) was encoded from; `what` names the
    option that needs them in the error for an unreadable dataset or missing tiles."""
    import torch

    from ..data.datasets import cache_pixels

    tiles = cache_pixels(cfg.init_data or cache_meta.get("dataset") or "", ids, what, "--init-data")
    pos = {r["id"]: i for i, r in enumerate(tiles.rows)}
    return torch.stack([tiles.uint8(pos[i]) for i in ids]), tiles.directory


def folder_probabilities(folder: str, images, classes: list[str], directory):
    """[N, C] probabilities of one image classifier folder on `images` (pool_pixels), checked: its classes are
    the latent classifier's and it reads tiles of their size."""
    from ..models.classifier import load_classifier, predict

    model, info = load_classifier(folder)
    if list(info.get("classes") or []) != list(classes):
        raise HistoError(f"init_image_classifier {folder} has classes {info.get('classes')}, the latent "
                         f"classifier {classes}")
    if images.shape[1] != int(info["image_size"]):
        raise HistoError(f"init_image_classifier {folder} reads {info['image_size']} px tiles, dataset "
                         f"{directory} holds {images.shape[1]} px tiles")
    return predict(model, images)[0]


def predicted_pools(probs, classes: list[str], seed: int, top_share: float = 1.0) -> dict[str, list[int]]:
    """{class: pool indices read as that class (argmax of probs [N, C])}: of each class, the `top_share` most
    confident (by the predicted class's probability; at least one tile), in a seeded random order."""
    conf, pred = probs.max(dim=1)
    kept = set()
    for c in pred.unique().tolist():
        idx = (pred == c).nonzero().flatten()
        n = max(1, int(round(top_share * len(idx))))
        kept.update(idx[conf[idx].argsort(descending=True, stable=True)[:n]].tolist())
    order = np.random.default_rng([seed, len(probs)]).permutation(len(probs))
    pools: dict[str, list[int]] = {}
    for i in order:
        if int(i) in kept:
            pools.setdefault(classes[int(pred[i])], []).append(int(i))
    return pools


def check_sampling_args(cfg: SampleConfig, T: int) -> tuple[int, int]:
    """The checks that need the model's T or relate fields; single-field ranges and choices (scheduler, batch size,
    scale, init_labels, init_top_share, eta) are configrules' VALUE_RULES, applied when the run directory starts."""
    if cfg.steps <= 0 or cfg.steps > T:
        raise HistoError(f"steps must be in [1, {T}], got {cfg.steps}")
    start_index(cfg.steps, cfg.strength)  # strength in (0, 1], running at least one step
    if cfg.strength == 1 and (cfg.init_cache or cfg.init_subset or cfg.init_labels != "tiles" or cfg.init_image_classifier):
        raise HistoError("init_cache/init_subset/init_labels/init_image_classifier are used only with strength < 1 "
                         "(1 starts from pure noise)")
    if cfg.init_top_share != 1 and cfg.init_labels == "tiles":
        raise HistoError(f"init_top_share is only used with init_labels=classifier, ensemble or image, got "
                         f"{cfg.init_top_share} with init_labels={cfg.init_labels}")
    reads_pixels = cfg.init_labels in ("ensemble", "image")
    if reads_pixels != bool(cfg.init_image_classifier) or (
            cfg.init_data and not cfg.init_image_classifier and not reads_tiles(cfg)):
        raise HistoError("init_labels=ensemble or image needs init_image_classifier, and init_image_classifier/"
                         "init_data are used only with them or detail/color_match=tile (got "
                         f"init_labels={cfg.init_labels}, "
                         f"init_image_classifier={list(cfg.init_image_classifier)}, init_data={cfg.init_data!r})")
    for name, does in (("detail", "adds back what the round trip loses on each sample's starting tile"),
                       ("color_match", "sets each sample's colours to its starting tile's")):
        if getattr(cfg, name) != "none" and cfg.strength == 1:
            raise HistoError(f"{name}={getattr(cfg, name)} {does}: it needs strength < 1 (1 starts from pure noise)")
    if cfg.eta and cfg.scheduler != "ddim":
        raise HistoError(f"eta is only used by ddim, got eta={cfg.eta} with {cfg.scheduler}")
    lo, hi = cfg.guidance_window
    if not (0 <= lo <= hi <= T):
        raise HistoError(f"guidance_window {lo},{hi} must satisfy 0 <= lo <= hi <= T={T}")
    return lo, hi


# --------------------------------------------------------------------------------------------------
# Progress (resume) and outputs
# --------------------------------------------------------------------------------------------------
def read_progress(out: Path) -> dict[str, dict]:
    """Rows of finished samples (listed in a progress file and with their PNG on disk)."""
    done: dict[str, dict] = {}
    for f in sorted((out / PROGRESS_DIR).glob("rank*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if isinstance(row, dict) and (out / row.get("file", "\0")).is_file():
                done[row["id"]] = row
    return done


def _save_batch(out: Path, rank: int, rows: list[dict], images: np.ndarray) -> None:
    from PIL import Image

    for row, img in zip(rows, images):
        with atomic_path(out / row["file"]) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    with open(out / PROGRESS_DIR / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_grids(out: Path, rows: list[dict]) -> None:
    from PIL import Image

    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["target"], []).append(r)
    for cls, rs in by_class.items():
        ims = np.stack([np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in rs[:GRID_MAX]])
        write_grid(ims, out / "grids" / f"{safe_name(cls)}.png")  # a near-square grid


def reads_tiles(cfg: SampleConfig) -> bool:
    """Whether the decoded samples are finished with their starting tiles' pixels (detail or color_match)."""
    return cfg.detail == "tile" or cfg.color_match == "tile"


def start_pixels(cfg: SampleConfig, m: dict, ids) -> dict:
    """{tile id: uint8 [H, W, 3]} of the starting tiles `ids` (detail or color_match=tile): from init_data, or
    the dataset the init cache was encoded from."""
    ids = sorted(ids)
    what = "detail=tile" if cfg.detail == "tile" else "color_match=tile"
    images, _ = tile_pixels(cfg, read_meta(init_cache_dir(cfg, m["info"]), "latent cache"), ids, what)
    return dict(zip(ids, images))


def generate(items: list[dict], m: dict, cfg: SampleConfig, window: tuple[int, int],
             init: dict | None = None, pixels: dict | None = None) -> tuple[list[dict], np.ndarray]:
    """Images and samples.csv rows of plan entries `items` (one batch), through the pipeline; `init`:
    {tile id: clean latent} when the entries start from real tiles (assign_init); `pixels`: {tile id: uint8
    tile} when each decoded image is finished with its starting tile (detail and/or color_match=tile)."""
    import torch

    pipe = m["pipe"]
    pipe.scheduler = make_scheduler(cfg.scheduler, m["scheduler_config"])  # fresh solver state per batch
    gens = [torch_generator(cfg.seed, it["i"]) for it in items]
    z_init = tiles = None
    if init:
        z_init = torch.stack([dihedral(init[it["init_id"]], it["init_dihedral"]) for it in items])
    if pixels:  # the starting tiles, turned as the samples started: the pipeline finishes the samples with them
        tiles = np.stack([dihedral(pixels[it["init_id"]], it["init_dihedral"], dims=(0, 1)) for it in items])
    out = pipe(class_labels=[it["target_index"] for it in items], guidance_scale=cfg.scale,
               num_inference_steps=cfg.steps, generator=gens, guidance_window=window, eta=cfg.eta,
               output_type="np", init_latents=z_init, strength=cfg.strength, image=tiles,
               detail=cfg.detail == "tile", color_match=cfg.color_match == "tile")
    images = np.rint(out.images * 255).astype(np.uint8)  # the decoded uint8 values (np output: them / 255)
    rows = [{"id": it["id"], "file": f"images/{it['id']}.png", "seed": sample_seed(cfg.seed, it["i"]),
             "target": it["target"], "target_index": it["target_index"], "scale": cfg.scale,
             "scheduler": cfg.scheduler, "steps": cfg.steps, "eta": cfg.eta, "window_lo": window[0],
             "window_hi": window[1], "confidence": f"{float(c):.6f}", "unet_id": m["unet_id"],
             "classifier_id": m["classifier_id"], "vae_id": m["vae_id"], "strength": cfg.strength,
             "init_id": it.get("init_id", ""), "init_dihedral": it.get("init_dihedral", "")}
            for it, c in zip(items, out.confidence)]
    return rows, images


def write_pipeline(folder: Path, m: dict, cfg: SampleConfig, window: tuple[int, int]) -> Path:
    """The pipeline that made the samples, as a diffusers folder (DiffusionPipeline.from_pretrained)."""
    from ..diffusers_pipeline import export_pipeline

    m["pipe"].scheduler = make_scheduler(cfg.scheduler, m["scheduler_config"])
    record = {**{k: str(Path(m[f"{k}_dir"]).resolve()) for k in ("model", "classifier", "vae")},
              "unet_id": m["unet_id"], "classifier_id": m["classifier_id"], "vae_id": m["vae_id"],
              "classifier_cache": m["info"].get("cache"), "classifier_subset": m["info"].get("subset"),
              "sampling": {"scheduler": cfg.scheduler, "steps": cfg.steps, "scale": cfg.scale,
                           "guidance_window": list(window), "eta": cfg.eta, "seed": cfg.seed,
                           "strength": cfg.strength, "detail": cfg.detail, "color_match": cfg.color_match}}
    return export_pipeline(m["pipe"], folder, record)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
@closes_stage_logs
def run(cfg: SampleConfig) -> Path:
    acc = make_accelerator()
    out, log = start_stage(acc, cfg, "sample", neutral=("batch_size",))
    if is_complete(out):
        if acc.is_main_process:  # a run killed after its completion marker: drop the progress files
            shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
        log.info("samples already complete: %s", out)
        return out
    m = load_models(cfg)
    window = check_sampling_args(cfg, m["T"])
    plan = plan_samples(cfg, list(m["info"]["classes"]), str(m["info"].get("cache") or ""))
    init = assign_init(plan, cfg, m, log) if cfg.strength < 1 else None
    pixels = start_pixels(cfg, m, init) if reads_tiles(cfg) else None
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    done = read_progress(out)
    acc.wait_for_everyone()  # every rank sees the same finished set before anyone writes
    pending = [p for p in plan if p["id"] not in done]
    mine = pending[acc.process_index::acc.num_processes]
    log.info("sampling %d images (%d done before, %d pending) with %s, %d steps, scale %g, window %s, %s, %d process(es)",
             len(plan), len(plan) - len(pending), len(pending), cfg.scheduler, cfg.steps, cfg.scale, window,
             f"from {len(init)} real tiles at strength {cfg.strength:g}" if init else "from noise", acc.num_processes)
    bar = progress(total=len(mine), desc="sample", disable=not acc.is_main_process, log=log)
    for b in range(0, len(mine), cfg.batch_size):
        rows, images = generate(mine[b:b + cfg.batch_size], m, cfg, window, init, pixels)
        _save_batch(out, acc.process_index, rows, images)
        bar.update(len(rows))
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        done = read_progress(out)
        missing = [p["id"] for p in plan if p["id"] not in done]
        if missing:
            raise HistoError(f"{len(missing)} sample(s) missing after sampling (e.g. {missing[:3]}); re-run to resume")
        rows = [{k: done[p["id"]][k] for k in SAMPLES_COLUMNS} for p in plan]
        if cfg.grid:
            write_grids(out, rows)
        write_csv_atomic(out / SAMPLES_CSV, rows, SAMPLES_COLUMNS)
        write_pipeline(out / PIPELINE_DIR, m, cfg, window)
        mark_complete(out, **completion_record(cfg), count=len(rows))
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
        log.info("wrote %d samples to %s", len(rows), out)
    acc.wait_for_everyone()
    return out
