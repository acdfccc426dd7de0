"""Stage `pretrain`: the unconditional latent diffusion UNet on a mixture of latent caches.

Set-up: the caches must come from one autoencoder (same content hash, scaling factor and latent
shape); each source is sampled with its weight (data/mixture.py; ranks read disjoint positions).
Loop: z ~ q(z|x) from the cache (already scaled), DDPM noise at a uniform t (scheduler.add_noise),
L1/L2 loss on eps (or v), AdamW with warm-up, gradient accumulation and clipping, EMA, optional
mixed precision. A NaN/inf loss stops every rank with a clear error; the last good checkpoint stays.
Save: resumable state under checkpoints/step_N (model, optimizer, LR schedule, RNG, EMA as
safetensors), and the export model/{unet_ema, scheduler, vae, histodiffusion.json}.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from ..core.grids import write_grid
from ..data.mixture import EpochIndex, IdRecorder, MixtureDataset, make_loader
from ..models.cards import CARD, ldm_card
from ..runtime.artifacts import LDM_SCHEDULER, LDM_UNET, LDM_VAE, MODEL_INFO, format_meta
from ..runtime.config import PretrainConfig
from ..runtime.contract import completion_record
from ..runtime.distributed import check_finite
from ..runtime.distributed import (load_latest_checkpoint, make_accelerator, save_checkpoint, save_final_checkpoint,
                                   seed_everything)
from ..runtime.errors import HistoError
from ..runtime.fileio import atomic_path, write_json_atomic, write_text_atomic
from ..runtime.log import MetricsLog, closes_stage_logs, human_time, progress
from ..runtime.rundirs import check_checkpoint_within, mark_complete, reopen_for_steps, start_stage

STAGE = "pretrain"
EMA_FILE = "ema.safetensors"


def _check_config(cfg: PretrainConfig) -> None:
    if not cfg.cache:
        raise HistoError("no latent cache given (--cache)")
    if cfg.weights and len(cfg.weights) != len(cfg.cache):
        raise HistoError(f"{len(cfg.weights)} weight(s) for {len(cfg.cache)} cache(s) {list(cfg.cache)}")
    if cfg.loss not in ("l1", "l2"):
        raise HistoError(f"loss must be l1 or l2, not {cfg.loss!r}")
    if min(cfg.steps, cfg.batch_size, cfg.grad_accum) < 1:
        raise HistoError(f"steps, batch_size and grad_accum must be >= 1, got {cfg.steps}, {cfg.batch_size}, "
                         f"{cfg.grad_accum}")
    if not 0 <= cfg.ema_decay < 1:
        raise HistoError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")


def load_caches(paths, subset: str = "all") -> tuple[list, list[str], object]:
    """LatentDatasets of the caches, their names, and their one latent space (latent_space.py)."""
    from ..data.datasets import LatentDataset
    from ..data.leakage import evaluation_tiles
    from ..runtime.latent_space import check_compatible

    sets = [LatentDataset(p, subset, sample=True) for p in paths]
    names = [ds.meta.get("dataset_name") or Path(p).name for ds, p in zip(sets, paths)]
    for ds, p in zip(sets, paths):  # leakage guard: evaluation tiles of a labeled set never train a generator
        held = evaluation_tiles(ds.rows)
        if held:
            raise HistoError(f"latent cache {p} (subset {subset!r}) holds {len(held)} validation/test tiles, e.g. "
                             f"{held[0]}: pretraining must not see them; use --subset train or a few-shot subset")
    for ds, p in zip(sets[1:], paths[1:]):
        try:
            check_compatible(sets[0].space, ds.space, f"latent cache {paths[0]}", f"latent cache {p}")
        except HistoError as e:
            raise HistoError(f"latent caches were not made with one autoencoder and scaling: {e}; "
                             f"re-encode them with the same --vae") from None
    return sets, names, sets[0].space


def check_vae(vae_dir: str | Path, vae_hash: str, where: str) -> Path:
    """The autoencoder folder named by a cache must still hold the weights the cache was made with."""
    from ..runtime.latent_space import latent_hash

    vae_dir = Path(vae_dir)
    if latent_hash(vae_dir) != vae_hash:
        raise HistoError(f"autoencoder {vae_dir} does not match latent cache {where} (content hash "
                         f"{latent_hash(vae_dir)[:12]} != {vae_hash[:12]}): it was retrained or replaced; "
                         f"re-run encode")
    return vae_dir


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    return F.l1_loss(pred.float(), target.float()) if kind == "l1" else F.mse_loss(pred.float(), target.float())


def build_model(cfg: PretrainConfig, shared, log):
    """A fresh UNet from cfg, or the UNet of an exported model (init_from) after checking it fits."""
    from ..runtime.latent_space import check_compatible, of_model
    from ..models.unet import build_unet_from_config, load_unet

    if not cfg.init_from:
        return build_unet_from_config(cfg, shared.latent_shape)
    src = Path(cfg.init_from)
    check_compatible(of_model(src, "init_from"), shared, f"init_from {src}", "the latent caches")
    unet = load_unet(src / LDM_UNET)
    c, h, _ = shared.latent_shape
    if unet.config.in_channels != c or unet.config.sample_size != h:
        raise HistoError(f"init_from {src} expects {unet.config.in_channels}x{unet.config.sample_size} latents, "
                         f"the caches hold {list(shared.latent_shape)}")
    log.info("starting from the weights of %s (its architecture replaces block_out_channels)", src)
    return unet.train()


def register_ema(acc, ema) -> None:
    """Save/load the EMA weights with every checkpoint, as safetensors (no pickle) via accelerate hooks."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if acc.is_main_process:
            sd = ema.state_dict()
            tensors = {f"shadow.{i}": p.detach().contiguous() for i, p in enumerate(sd.pop("shadow_params"))}
            save_file(tensors, str(Path(output_dir) / EMA_FILE), metadata={"state": json.dumps(sd)})

    def load_hook(models, input_dir):
        from safetensors import safe_open

        path = Path(input_dir) / EMA_FILE
        if not path.is_file():
            raise HistoError(f"checkpoint {input_dir} has no {EMA_FILE} (truncated?)")
        with safe_open(str(path), framework="pt") as f:
            sd = json.loads(f.metadata()["state"])
        tensors = load_file(str(path))
        sd["shadow_params"] = [tensors[f"shadow.{i}"] for i in range(len(tensors))]
        ema.load_state_dict(sd)

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)


@torch.no_grad()
def sample_grid(unet, scheduler, vae, scaling_factor: float, path: Path, n: int = 16, steps: int = 25,
                seed: int = 0, prediction_type: str = "epsilon") -> None:
    """A quick unguided DDIM sample of n latents, decoded through the autoencoder, as a PNG grid: the sample
    stage's loop (diffusers_pipeline.guided_sample) with guidance scale 0 and no classifier."""
    from ..diffusers_pipeline import decode_uint8, guided_sample, make_scheduler

    device = next(unet.parameters()).device
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g).to(device)
    was_training = unet.training
    unet.eval()
    z = guided_sample(unet, None, make_scheduler("ddim", scheduler.config), noise,
                      torch.zeros(n, dtype=torch.long, device=device), None, steps=steps, scale=0,
                      prediction_type=prediction_type)
    unet.train(was_training)
    write_grid(decode_uint8(vae, z, scaling_factor), path, cols=4)


@closes_stage_logs
def run(cfg: PretrainConfig) -> Path:
    _check_config(cfg)
    acc = make_accelerator(cfg.mixed_precision, cfg.grad_accum)
    main = acc.is_main_process
    out, log = start_stage(acc, cfg, STAGE, neutral=("steps",))
    model_dir = out / "model"
    if reopen_for_steps(out, cfg.steps, acc, log):
        log.info("%s is complete: skipped (model: %s)", out, model_dir)
        return model_dir
    sets, names, shared = load_caches(cfg.cache, cfg.subset)
    vae_dir = check_vae(shared.vae, shared.vae_hash, ", ".join(cfg.cache))
    data = MixtureDataset(sets, names)
    index = EpochIndex([len(s) for s in sets], cfg.weights, cfg.batch_size, acc.process_index, acc.num_processes,
                       cfg.seed, names)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    unet = build_model(cfg, shared, log)
    trainer = _Trainer(cfg, acc, unet, out, log)
    step = trainer.resume()
    batches = make_loader(data, index, step * cfg.grad_accum, cfg.num_workers)
    log.info("pretrain: %s, %.2fM UNet params, latents %s, %d process(es), %d batches/epoch per process",
             ", ".join(f"{n} ({len(s)}, p={p:.2f})" for n, s, p in zip(names, sets, index.probs)),
             sum(p.numel() for p in unet.parameters()) / 1e6, list(shared.latent_shape), acc.num_processes,
             index.batches_per_epoch)
    vae = None
    if main:  # sample grids (every sample_every steps and at the end) are decoded on the main process
        from ..models.autoencoder import load_vae

        vae = load_vae(vae_dir).to(acc.device)
    t0 = time.time()
    trainer.train(batches, step, vae, shared.scaling_factor)
    if main:
        trainer.export(model_dir, vae_dir, shared, names, index.probs)
        sample_grid(trainer.ema_unet(), trainer.noise, vae, shared.scaling_factor,
                    out / "samples" / f"step_{cfg.steps}.png", seed=cfg.seed, prediction_type=cfg.prediction_type)
        mark_complete(out, **completion_record(cfg), model=str(model_dir), steps=cfg.steps)
        log.info("pretrain finished in %s: exported %s", human_time(time.time() - t0), model_dir)
    acc.wait_for_everyone()
    return model_dir


class _Trainer:
    """Optimiser, schedule, EMA and the loop of one pretrain run (kept apart from the set-up in run())."""

    def __init__(self, cfg: PretrainConfig, acc, unet, out: Path, log):
        from diffusers import UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from ..models.unet import build_scheduler_from_config

        self.cfg, self.acc, self.out, self.log = cfg, acc, out, log
        self.noise = build_scheduler_from_config(cfg)
        self.ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=UNet2DModel, model_config=unet.config)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # accelerate steps a prepared LR schedule once per process per optimiser step: scale its lengths
        sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup * acc.num_processes,
                              num_training_steps=cfg.steps * acc.num_processes)
        self.unet, self.opt, self.sched = acc.prepare(unet, opt, sched)
        register_ema(acc, self.ema)
        self.metrics = MetricsLog(out / "metrics.jsonl", acc.is_main_process)
        self.ids = IdRecorder(out, acc.process_index)

    def resume(self) -> int:
        seed_everything(self.cfg.seed + self.acc.process_index)
        step, _ = load_latest_checkpoint(self.acc, self.out)
        check_checkpoint_within(step, self.cfg.steps, self.out)
        self.ema.to(self.acc.device)
        if step:
            state = self.opt.optimizer.state
            adam_step = int(next(iter(state.values()))["step"]) if state else 0
            self.log.info("resumed from checkpoint step %d (optimizer at step %d)", step, adam_step)
            self.metrics.log(resumed_from=step, optimizer_step=adam_step, ema_step=self.ema.optimization_step)
        return step

    def train(self, batches, step: int, vae, scaling_factor: float) -> None:
        cfg, acc = self.cfg, self.acc
        bar = progress(total=cfg.steps, initial=step, desc="pretrain", disable=not acc.is_main_process,
                       log=self.log)
        t0, n_img, T = time.time(), 0, self.noise.config.num_train_timesteps
        self.unet.train()
        while step < cfg.steps:
            for _ in range(cfg.grad_accum):
                z, _, ids = next(batches)
                self.ids.record(step, ids)
                z = z.to(acc.device)
                with acc.accumulate(self.unet), acc.autocast():
                    noise = torch.randn_like(z)
                    t = torch.randint(0, T, (len(z),), device=z.device)
                    noisy = self.noise.add_noise(z, noise, t)
                    target = noise if cfg.prediction_type == "epsilon" else self.noise.get_velocity(z, noise, t)
                    loss = diffusion_loss(self.unet(noisy, t).sample, target, cfg.loss)
                    check_finite(acc, loss, step, self.out)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.grad_clip > 0:
                        acc.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
                    self.opt.step()
                    self.sched.step()
                    self.opt.zero_grad(set_to_none=True)
                n_img += len(z) * acc.num_processes
            self.ema.step(self.unet.parameters())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % 10 == 0 or step == cfg.steps:
                self.metrics.log(step=step, loss=loss.item(), lr=self.sched.get_last_lr()[0],
                                 img_per_s=n_img / max(1e-9, time.time() - t0))
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps and acc.is_main_process:
                sample_grid(self.ema_unet(), self.noise, vae, scaling_factor, self.out / "samples" / f"step_{step}.png",
                            seed=cfg.seed, prediction_type=cfg.prediction_type)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint(acc, self.out, step, cfg.keep_checkpoints)
        bar.close()
        if cfg.checkpoint_every:
            save_final_checkpoint(acc, self.out, step, cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def ema_unet(self):
        """A copy of the UNet holding the EMA weights."""
        from diffusers import UNet2DModel

        unet = self.acc.unwrap_model(self.unet)
        copy = UNet2DModel.from_config(unet.config).to(self.acc.device)
        self.ema.copy_to(copy.parameters())
        return copy.eval()

    def export(self, model_dir: Path, vae_dir: Path, shared, names, probs) -> None:
        """model/{unet_ema, scheduler, vae (copy of the caches' autoencoder), histodiffusion.json}, atomically."""
        cfg = self.cfg
        with atomic_path(model_dir) as tmp:
            self.ema_unet().save_pretrained(str(tmp / LDM_UNET), safe_serialization=True)
            self.noise.save_pretrained(str(tmp / LDM_SCHEDULER))
            shutil.copytree(vae_dir, tmp / LDM_VAE)
            write_json_atomic(tmp / MODEL_INFO, format_meta(
                kind="ldm", **shared.fields(), caches=[str(Path(c).resolve()) for c in cfg.cache],
                sources=list(names), weights=[round(p, 6) for p in probs], steps=cfg.steps,
                prediction_type=cfg.prediction_type, loss=cfg.loss, init_from=cfg.init_from))
            write_text_atomic(tmp / CARD, ldm_card(tmp, str(model_dir)))
