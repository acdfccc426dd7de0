"""Stage: class-conditional synthesis by classifier guidance in latent space.

An unconditional latent diffusion UNet is steered towards class y by the noise-aware latent
classifier: eps' = eps - sqrt(1 - alpha_bar_t) * s * grad log p(y | z_t, t) (guidance.py), at the
steps whose t lies in the guidance window, with diffusers' DDIM (eta configurable, no clipping) or
DPM-Solver++ (multistep, order 2). Final latents are decoded with the (optionally fine-tuned) decoder.

Sample i (its place in the plan: classes in order, then k = 0..count-1) uses its own torch.Generator
seeded from (run seed, i) for its initial noise and DDIM's per-step noise, so images do not depend on
the batch size or on how ids are split over processes. Each process writes the PNGs of its share of
pending ids and appends their rows to _progress/rank<r>.jsonl; a re-run skips ids listed there whose
PNG exists. Rank 0 then writes grids/, samples.csv and _COMPLETE.json (last).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .artifacts import (INDEX, LDM_SCHEDULER, LDM_UNET, LDM_VAE, MODEL_INFO, SAMPLES_COLUMNS, SAMPLES_CSV,
                        read_dataset, read_meta, subset_ids)
from .config import SampleConfig
from .guidance import classifier_grad, eps_from_output, guided_eps, in_window
from .runtime import (HistoError, atomic_path, check_format_version, closes_stage_logs, get_logger, is_complete,
                      make_accelerator, mark_complete, read_csv, read_json, sha256_dir, start_run_dir,
                      write_csv_atomic)

SCHEDULERS = ("ddim", "dpmsolver++")
PROGRESS_DIR = "_progress"
GRID_MAX = 64
# Every model call runs on micro-batches of exactly this many rows (the last one zero-padded): CPU
# kernels (MKL gemm, oneDNN conv) give results that differ in the last bits with the number of rows,
# so a fixed shape is what makes the images independent of --batch-size and of the process split.
MICRO_BATCH = 16


# --------------------------------------------------------------------------------------------------
# Pure helpers: seeds, schedulers, the guided sampling loop, decoding
# --------------------------------------------------------------------------------------------------
def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i of a run with seed `seed` (63-bit, stable across platforms)."""
    s = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, dtype=np.uint32)
    return int(s[0]) << 31 | int(s[1]) >> 1


def make_scheduler(name: str, config: dict):
    """A sampling scheduler built from the training scheduler's config (predicting epsilon)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, thresholding=False, prediction_type="epsilon")
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, thresholding=False, prediction_type="epsilon",
            timestep_spacing="linspace", lower_order_final=True)
    raise HistoError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}")


def by_rows(fn, x: torch.Tensor, *rows: torch.Tensor, micro_batch: int | None = MICRO_BATCH) -> torch.Tensor:
    """fn(x, *rows) evaluated on micro-batches of exactly `micro_batch` rows (zero-padded); None: at once."""
    if not micro_batch:
        return fn(x, *rows)
    outs = []
    for s in range(0, len(x), micro_batch):
        parts = [a[s:s + micro_batch] for a in (x, *rows)]
        n = len(parts[0])
        if n < micro_batch:
            parts = [torch.cat([a, a.new_zeros((micro_batch - n, *a.shape[1:]))]) for a in parts]
        outs.append(fn(*parts)[:n])
    return torch.cat(outs)


def guided_sample(unet, classifier, scheduler, noise: torch.Tensor, y: torch.Tensor, generators, *, steps: int,
                  scale: float, window=(0, 0), eta: float = 0.0, prediction_type: str = "epsilon",
                  micro_batch: int | None = MICRO_BATCH) -> torch.Tensor:
    """Run the reverse process from unit-Gaussian `noise` [B, C, h, w] to latents z_0 (scaled space).

    `generators`: one per sample (DDIM's eta noise). Model calls run on fixed-size micro-batches.
    """
    from diffusers import DDIMScheduler

    # 1. timesteps of the sampling schedule
    scheduler.set_timesteps(steps)
    # 2. initial latents (unit noise scaled to the scheduler's initial sigma)
    z = noise * scheduler.init_noise_sigma
    extra = {"eta": eta, "generator": generators} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        # 3. scheduler-specific input scaling (identity for DDIM and DPM-Solver++)
        z_in = scheduler.scale_model_input(z, t)
        # 4. predict the noise eps(z_t, t) with the unconditional UNet
        with torch.no_grad():
            out = by_rows(lambda zz: unet(zz, t).sample, z_in, micro_batch=micro_batch)
        alpha_bar = scheduler.alphas_cumprod[int(t)]
        eps = eps_from_output(out, z_in, alpha_bar, prediction_type)
        # 5. classifier guidance inside the window: eps' = eps - sqrt(1 - alpha_bar_t) * s * grad log p(y | z_t, t)
        if scale != 0 and in_window(t, window):
            grad = by_rows(lambda zz, yy: classifier_grad(classifier, zz, t, yy), z_in, y, micro_batch=micro_batch)
            eps = guided_eps(eps, grad, alpha_bar, scale)
        # 6. compute the previous latents z_{t-1} (DDIM draws its eta noise from each sample's generator)
        z = scheduler.step(eps, t, z, **extra).prev_sample
    return z


@torch.no_grad()
def decode_uint8(vae, z: torch.Tensor, scaling_factor: float, micro_batch: int | None = MICRO_BATCH) -> np.ndarray:
    """Latents (scaled space) -> uint8 images [B, H, W, 3]."""
    x = by_rows(lambda zz: vae.decode(zz).sample, z / scaling_factor, micro_batch=micro_batch)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def target_confidence(classifier, z: torch.Tensor, y: torch.Tensor, micro_batch: int | None = MICRO_BATCH):
    """p(y | z, t=0) of the final latents."""
    probs = torch.softmax(by_rows(lambda zz: classifier(zz, 0), z, micro_batch=micro_batch).float(), dim=-1)
    return probs[torch.arange(len(y)), y]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


# --------------------------------------------------------------------------------------------------
# Loading and checking the models
# --------------------------------------------------------------------------------------------------
def load_models(cfg: SampleConfig) -> dict:
    from .models.autoencoder import load_vae
    from .models.latent_classifier import load_latent_classifier, vae_latent_hash
    from .models.unet import load_scheduler, load_unet

    model_dir = Path(cfg.model)
    if not (model_dir / LDM_UNET).is_dir():
        raise HistoError(f"LDM folder not found or incomplete: {model_dir} (needs {LDM_UNET}/, {LDM_SCHEDULER}/; "
                         f"run pretrain)")
    if not Path(cfg.classifier).is_dir():
        raise HistoError(f"latent classifier folder not found: {cfg.classifier} (run train-latent-classifier)")
    vae_dir = Path(cfg.vae) if cfg.vae else model_dir / LDM_VAE
    unet = load_unet(model_dir / LDM_UNET)
    train_sched = load_scheduler(model_dir / LDM_SCHEDULER)
    vae = load_vae(vae_dir)
    clf, cinfo, clf_id = load_latent_classifier(cfg.classifier)
    ldm_info = read_json(model_dir / MODEL_INFO, "LDM info") if (model_dir / MODEL_INFO).is_file() else {}
    if ldm_info:
        check_format_version(ldm_info, model_dir / MODEL_INFO)
    # the classifier, the UNet and the decoder must share one latent space (same encoder, same scaling)
    latent_hash = vae_latent_hash(vae_dir)
    for what, h in (("autoencoder " + str(vae_dir), latent_hash), ("LDM " + str(model_dir), ldm_info.get("vae_hash"))):
        if h and h != cinfo.get("vae_hash"):
            raise HistoError(f"latent classifier {cfg.classifier} was trained on latents of autoencoder "
                             f"{str(cinfo.get('vae_hash'))[:12]}, but {what} uses {h[:12]}: retrain the classifier "
                             f"on a cache encoded with this autoencoder")
    sf = float(cinfo["scaling_factor"])
    if ldm_info.get("scaling_factor") and not math.isclose(float(ldm_info["scaling_factor"]), sf, rel_tol=1e-6):
        raise HistoError(f"scaling factor of the LDM ({ldm_info['scaling_factor']}) differs from the latent "
                         f"classifier's ({sf})")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    cs = cinfo.get("scheduler") or {}
    diff = [k for k in keys if k in cs and cs[k] != train_sched.config.get(k)]
    if diff:
        raise HistoError(f"latent classifier {cfg.classifier} was trained with another noise schedule "
                         f"({', '.join(f'{k}={cs[k]}' for k in diff)}) than the LDM {model_dir}")
    if clf.config.in_channels != unet.config.in_channels:
        raise HistoError(f"latent classifier expects {clf.config.in_channels} latent channels, the UNet "
                         f"{unet.config.in_channels}")
    return {"unet": unet, "vae": vae, "classifier": clf, "info": cinfo, "scheduler_config": dict(train_sched.config),
            "scaling_factor": sf, "unet_id": sha256_dir(model_dir / LDM_UNET), "classifier_id": clf_id,
            "vae_id": sha256_dir(vae_dir), "prediction_type": train_sched.config.get("prediction_type", "epsilon"),
            "T": int(train_sched.config.num_train_timesteps)}


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
    """One entry per sample: index i (its seed), id, target class; the order defines i.

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
            plan.append({"i": i, "id": sid, "target": classes[c], "target_index": c})
            i += 1
    return plan


def check_sampling_args(cfg: SampleConfig, T: int) -> tuple[int, int]:
    if cfg.scheduler not in SCHEDULERS:
        raise HistoError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {cfg.scheduler!r}")
    if cfg.steps <= 0 or cfg.steps > T:
        raise HistoError(f"steps must be in [1, {T}], got {cfg.steps}")
    if cfg.batch_size <= 0:
        raise HistoError(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.scale < 0:
        raise HistoError(f"guidance scale must be >= 0, got {cfg.scale}")
    if not 0 <= cfg.eta <= 1 or (cfg.eta and cfg.scheduler != "ddim"):
        raise HistoError(f"eta must be in [0, 1] and is only used by ddim, got eta={cfg.eta} with {cfg.scheduler}")
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
        ims = [np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in rs[:GRID_MAX]]
        cols = math.ceil(math.sqrt(len(ims)))
        nrows = math.ceil(len(ims) / cols)
        h, w, _ = ims[0].shape
        grid = np.full((nrows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
        for k, im in enumerate(ims):
            y, x = divmod(k, cols)
            grid[2 + y * (h + 2):2 + y * (h + 2) + h, 2 + x * (w + 2):2 + x * (w + 2) + w] = im
        with atomic_path(out / "grids" / f"{safe_name(cls)}.png") as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")


def generate(items: list[dict], m: dict, cfg: SampleConfig, window: tuple[int, int]) -> tuple[list[dict], np.ndarray]:
    """Images and samples.csv rows of plan entries `items` (one batch)."""
    unet = m["unet"]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, it["i"])) for it in items]
    noise = torch.cat([torch.randn((1, *shape), generator=g) for g in gens])
    y = torch.tensor([it["target_index"] for it in items])
    sched = make_scheduler(cfg.scheduler, m["scheduler_config"])
    z0 = guided_sample(unet, m["classifier"], sched, noise, y, gens, steps=cfg.steps, scale=cfg.scale,
                       window=window, eta=cfg.eta, prediction_type=m["prediction_type"])
    conf = target_confidence(m["classifier"], z0, y)
    images = decode_uint8(m["vae"], z0, m["scaling_factor"])
    rows = [{"id": it["id"], "file": f"images/{it['id']}.png", "seed": sample_seed(cfg.seed, it["i"]),
             "target": it["target"], "target_index": it["target_index"], "scale": cfg.scale,
             "scheduler": cfg.scheduler, "steps": cfg.steps, "eta": cfg.eta, "window_lo": window[0],
             "window_hi": window[1], "confidence": f"{float(c):.6f}", "unet_id": m["unet_id"],
             "classifier_id": m["classifier_id"], "vae_id": m["vae_id"]} for it, c in zip(items, conf)]
    return rows, images


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
@closes_stage_logs
def run(cfg: SampleConfig) -> Path:
    acc = make_accelerator()
    out = start_run_dir(cfg.out, cfg, "sample", acc.is_main_process, neutral=("batch_size",))
    acc.wait_for_everyone()
    log = get_logger("sample", out / "log.txt", is_main=acc.is_main_process)
    if is_complete(out):
        if acc.is_main_process:  # a run killed after its completion marker: drop the progress files
            shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
        log.info("samples already complete: %s", out)
        return out
    m = load_models(cfg)
    window = check_sampling_args(cfg, m["T"])
    plan = plan_samples(cfg, list(m["info"]["classes"]), str(m["info"].get("cache") or ""))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    done = read_progress(out)
    acc.wait_for_everyone()  # every rank sees the same finished set before anyone writes
    pending = [p for p in plan if p["id"] not in done]
    mine = pending[acc.process_index::acc.num_processes]
    log.info("sampling %d images (%d done before, %d pending) with %s, %d steps, scale %g, window %s, %d process(es)",
             len(plan), len(plan) - len(pending), len(pending), cfg.scheduler, cfg.steps, cfg.scale, window,
             acc.num_processes)
    for b in range(0, len(mine), cfg.batch_size):
        rows, images = generate(mine[b:b + cfg.batch_size], m, cfg, window)
        _save_batch(out, acc.process_index, rows, images)
        log.info("rank %d: %d/%d", acc.process_index, min(b + cfg.batch_size, len(mine)), len(mine))
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
        mark_complete(out, stage="sample", count=len(rows))
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
        log.info("wrote %d samples to %s", len(rows), out)
    acc.wait_for_everyone()
    return out
