"""Stage `train-autoencoder`: the KL autoencoder (diffusers AutoencoderKL) on unlabeled tiles.

Loss = L1(x, x_rec) + kl_weight * KL / (3 H W) [+ adv_weight * hinge PatchGAN loss from adv_start]
[+ lpips_weight * LPIPS with local VGG16 weights]. (Dividing the KL by the number of pixel values
makes kl_weight mean what it means in the LDM code, whose reconstruction term is summed per image.)

`init_from` starts from an exported autoencoder; with `train_part="decoder"` only the decoder (and
post_quant_conv) learns: the encoder, and so every latent, the scaling factor and a UNet pretrained on those
latents, stay exactly as they were. That is how a base's decoder is trained longer (for example on whole
tiles after training on crops) without pretraining its UNet again.

A deterministic held-out set (every k-th tile, holdout.csv) gives PSNR / SSIM and a reconstruction
grid (real | reconstruction) every eval_every steps and at the end. At the end the latent scaling
factor is measured on training tiles as 1 / std(z) and stored in the exported model
(model/vae/config.json "scaling_factor" and histodiffusion.json), so every later encode of any
dataset uses the same factor.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from ..core.grids import to_uint8, write_grid
from ..data.mixture import EpochIndex, IdRecorder, MixtureDataset, make_loader
from ..models.autoencoder import downsample_factor
from ..models.cards import CARD, autoencoder_card
from ..runtime.config import AutoencoderConfig
from ..runtime.contract import completion_record
from ..runtime.distributed import check_finite
from ..runtime.distributed import (load_latest_checkpoint, make_accelerator, save_checkpoint, save_final_checkpoint,
                                   seed_everything)
from ..runtime.errors import HistoError
from ..runtime.fileio import write_csv_atomic, write_text_atomic
from ..runtime.log import MetricsLog, closes_stage_logs, human_time, progress
from ..runtime.rundirs import check_checkpoint_within, mark_complete, reopen_for_steps, start_stage

STAGE = "train-autoencoder"
TRAIN_PARTS = ("all", "decoder")


class AEWithKL(nn.Module):
    """forward(x) -> (reconstruction, KL per image): one forward, so DDP synchronises the gradients."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample()).sample
        return rec, post.kl()


def build_lpips(path: str):
    """torchmetrics' LPIPS (its bundled linear heads) on a VGG16 backbone loaded from a local file of
    torchvision ImageNet weights (.pth state dict, weights_only, or .safetensors). Nothing is downloaded."""
    import torchvision
    from torchmetrics.functional.image.lpips import _LPIPS

    p = Path(path)
    if not p.is_file():
        raise HistoError(f"LPIPS weights file not found: {p} (torchvision VGG16 ImageNet weights)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        vgg = torchvision.models.vgg16(weights=None)
        vgg.load_state_dict(sd)
    except Exception as e:
        raise HistoError(f"cannot load VGG16 weights for LPIPS from {p}: {type(e).__name__}: {e}") from None
    lp = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)
    for k in range(1, 6):
        for name, mod in getattr(lp.net, f"slice{k}").named_children():
            mod.load_state_dict(vgg.features[int(name)].state_dict())
    return lp.eval().requires_grad_(False)


def random_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Independent random size x size crops of a batch (the global torch RNG: resumable); 0 = whole tiles."""
    h = x.shape[-1]
    if size <= 0 or size >= h:
        return x
    oy, ox = torch.randint(0, h - size + 1, (2, len(x))).tolist()
    return torch.stack([img[:, y:y + size, x0:x0 + size] for img, y, x0 in zip(x, oy, ox)])


def _check_config(cfg: AutoencoderConfig) -> None:
    if cfg.lpips_weight > 0 and not cfg.lpips_weights:
        raise HistoError("lpips_weight > 0 needs --lpips-weights (a local VGG16 weights file; nothing is downloaded)")
    if cfg.lpips_weight < 0 or cfg.adv_weight < 0 or cfg.kl_weight < 0:
        raise HistoError("kl_weight, adv_weight and lpips_weight must be >= 0")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise HistoError(f"steps and batch_size must be >= 1, got {cfg.steps}, {cfg.batch_size}")
    if not cfg.data:
        raise HistoError("no unlabeled dataset given (--data)")
    if cfg.train_part not in TRAIN_PARTS:
        raise HistoError(f"train_part must be one of {', '.join(TRAIN_PARTS)}, not {cfg.train_part!r}")
    if cfg.train_part == "decoder" and not cfg.init_from:
        raise HistoError("train_part 'decoder' needs --init-from (the autoencoder whose encoder is kept)")
    if cfg.init_from:
        _init_folder(cfg)


def _init_folder(cfg: AutoencoderConfig) -> Path:
    """The autoencoder folder of `init_from` (itself, or a base's vae/), checked to be the architecture the
    config names (before anything is written)."""
    from ..models.autoencoder import check_vae_folder
    from ..runtime.artifacts import LDM_VAE
    from ..runtime.fileio import read_json

    src = Path(cfg.init_from)
    folder = check_vae_folder(src / LDM_VAE if (src / LDM_VAE).is_dir() else src)
    have = read_json(folder / "config.json", "autoencoder config")
    want = {"block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "latent_channels": cfg.latent_channels}
    wrong = [f"{k} {have.get(k)} (config: {v})" for k, v in want.items() if have.get(k) != v]
    if wrong:
        raise HistoError(f"init_from {folder} has {', '.join(wrong)}: pass the same architecture flags")
    return folder


def _init_steps(cfg: AutoencoderConfig) -> int | None:
    """Training steps of the init_from autoencoder (from its histodiffusion.json), None when unknown."""
    from ..runtime.artifacts import MODEL_INFO
    from ..runtime.fileio import read_json

    info = _init_folder(cfg) / MODEL_INFO if cfg.init_from else None
    return read_json(info, "autoencoder info").get("steps") if info is not None and info.is_file() else None


def initial_vae(cfg: AutoencoderConfig, tile: int):
    """(A fresh AutoencoderKL from the config and None) or (the autoencoder of `init_from`, its scaling factor)."""
    from ..models.autoencoder import build_vae_from_config, load_vae

    if not cfg.init_from:
        return build_vae_from_config(cfg, tile), None
    vae = load_vae(_init_folder(cfg)).float().train()
    return vae, float(vae.config.scaling_factor)


def trainable(vae, part: str) -> list:
    """The parameters that learn: all of them, or the decoder's (encoder and quant_conv frozen)."""
    if part == "decoder":
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    return [p for p in vae.parameters() if p.requires_grad]


def load_sources(cfg: AutoencoderConfig, holdout: int):
    """(train MixtureDataset, evaluation datasets, held-out [(dataset, local index)], tile size, held-out rows).

    Held-out tiles are the datasets' `holdout` split (whole groups kept out by `prepare --holdout-frac`),
    up to `holdout` of them evenly spaced; a dataset without that split lends every k-th tile instead."""
    from torch.utils.data import Subset

    from ..runtime.artifacts import HOLDOUT_SPLIT
    from ..data.datasets import PixelDataset

    sources = [PixelDataset(d, "all") for d in cfg.data]
    names = [s.meta.get("name") or Path(d).name for s, d in zip(sources, cfg.data)]
    sizes = {int(s.uint8(0).shape[0]) for s in sources}
    if len(sizes) != 1:
        raise HistoError(f"datasets {list(cfg.data)} have different tile sizes {sorted(sizes)}; prepare them alike")
    tile = sizes.pop()
    f = downsample_factor(cfg.block_out_channels)
    if tile % f or (0 < cfg.crop < tile and cfg.crop % f):
        raise HistoError(f"tile size {tile} / crop {cfg.crop} is not divisible by the downsampling factor {f}")
    held_sets = [PixelDataset(d, HOLDOUT_SPLIT) if any(r["split"] == HOLDOUT_SPLIT for r in s.all_rows) else None
                 for s, d in zip(sources, cfg.data)]
    eval_sets = [h if h is not None else s for s, h in zip(sources, held_sets)]
    per = holdout // max(1, len(sources)) if holdout > 0 else 0
    held, train_parts, rows = [], [], []
    for si, (s, h) in enumerate(zip(sources, held_sets)):
        if h is not None:  # the prepared held-out groups: train on everything else
            pick = _evenly(len(h), per)
            keep = list(range(len(s)))
        else:  # every k-th tile
            pick = _evenly(len(s), per)
            keep = sorted(set(range(len(s))) - set(pick))
        held += [(si, i) for i in pick]
        rows += [{"source": names[si], "id": eval_sets[si].rows[i]["id"]} for i in pick]
        train_parts.append(Subset(s, keep))
    return MixtureDataset(train_parts, names), eval_sets, held, tile, rows


def _evenly(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)})


def random_dihedral(x: torch.Tensor) -> torch.Tensor:
    """A random one of the 8 rotations/flips per image (the global torch RNG: resumable)."""
    from ..core.transforms import DIHEDRAL, dihedral

    ks = torch.randint(0, DIHEDRAL, (len(x),)).tolist()
    return torch.stack([dihedral(img, k) for img, k in zip(x, ks)])


@torch.no_grad()
def evaluate(vae, sources, held, device, out: Path, step: int, batch: int = 32) -> dict:
    """PSNR / SSIM of posterior-mean reconstructions of the held-out tiles; writes recon/step_N.png."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    was_training = vae.training
    vae.eval()
    psnr, ssim, n, first = 0.0, 0.0, 0, None
    for b in range(0, len(held), batch):
        x = torch.stack([sources[s][i][0] for s, i in held[b:b + batch]]).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        x01, r01 = x.add(1).div(2), rec.add(1).div(2)
        psnr += peak_signal_noise_ratio(r01, x01, data_range=1.0, reduction="none", dim=(1, 2, 3)).sum().item()
        ssim += structural_similarity_index_measure(r01, x01, data_range=1.0, reduction="none").sum().item()
        n += len(x)
        if first is None:
            first = (x[:8], rec[:8])
    vae.train(was_training)
    x, rec = first
    pairs = torch.stack([x, rec], 1).flatten(0, 1)  # real, reconstruction, real, ...
    write_grid(to_uint8(pairs), out / "recon" / f"step_{step}.png", cols=4)
    return {"psnr": psnr / n, "ssim": ssim / n}


@torch.no_grad()
def measure_scaling_factor(vae, dataset, device, max_items: int = 1024, batch: int = 64, seed: int = 0) -> float:
    """1 / std of sampled latents z ~ q(z|x) over (up to max_items) training tiles."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:max_items].tolist()
    s1 = s2 = cnt = 0.0
    vae.eval()
    for b in range(0, len(idx), batch):
        x = torch.stack([dataset[i][0] for i in idx[b:b + batch]]).to(device)
        post = vae.encode(x).latent_dist
        z = (post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)).double()
        s1, s2, cnt = s1 + z.sum().item(), s2 + (z * z).sum().item(), cnt + z.numel()
    var = s2 / cnt - (s1 / cnt) ** 2
    return 1.0 / math.sqrt(var) if var > 0 else float("inf")


def train_step(cfg, acc, model, opt, disc, opt_d, lpips, x, step: int, out: Path) -> dict:
    """One optimisation step of the autoencoder (and of the discriminator once adv_start is reached)."""
    from ..models.discriminator import hinge_d_loss, hinge_g_loss

    use_adv = disc is not None
    with acc.autocast():
        rec, kl = model(x)
        l1 = (x - rec).abs().mean()
        kl_term = kl.mean() / x[0].numel()
        loss = l1 + cfg.kl_weight * kl_term
        if lpips is not None:
            loss = loss + cfg.lpips_weight * lpips(rec.float().clamp(-1, 1), x, normalize=False).mean()
        adv_on = use_adv and step >= cfg.adv_start
        g_loss = hinge_g_loss(disc(rec)) if adv_on else torch.zeros((), device=acc.device)
        loss = loss + cfg.adv_weight * g_loss
    check_finite(acc, loss, step, out)
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    opt.step()
    d_loss = torch.zeros(())
    if adv_on:
        opt_d.zero_grad(set_to_none=True)
        with acc.autocast():
            logits = disc(torch.cat([x, rec.detach()]))  # one forward (DDP-friendly)
            d_loss = hinge_d_loss(logits[:len(x)], logits[len(x):])
        acc.backward(d_loss)
        opt_d.step()
    return {"loss": loss.item(), "l1": l1.item(), "kl": kl_term.item(), "g_loss": g_loss.item(),
            "d_loss": d_loss.item()}


@closes_stage_logs
def run(cfg: AutoencoderConfig) -> Path:
    from ..models.discriminator import build_discriminator

    _check_config(cfg)
    acc = make_accelerator(cfg.mixed_precision)
    main = acc.is_main_process
    out, log = start_stage(acc, cfg, STAGE, neutral=("steps",))
    model_dir = out / "model" / "vae"
    if reopen_for_steps(out, cfg.steps, acc, log):
        log.info("%s is complete: skipped (model: %s)", out, model_dir)
        return model_dir
    seed_everything(cfg.seed + acc.process_index)
    train_ds, sources, held, tile, held_rows = load_sources(cfg, cfg.holdout)
    if main:
        write_csv_atomic(out / "holdout.csv", held_rows, ["source", "id"])
    index = EpochIndex([len(p) for p in train_ds.sources], [], cfg.batch_size, acc.process_index,
                       acc.num_processes, cfg.seed, train_ds.names)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    vae, init_scaling = initial_vae(cfg, tile)
    model = AEWithKL(vae)
    opt = torch.optim.AdamW(trainable(vae, cfg.train_part), lr=cfg.lr, betas=(0.5, 0.9))
    use_adv = cfg.adv_weight > 0
    disc = build_discriminator(tile) if use_adv else None
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9)) if use_adv else None
    lpips = build_lpips(cfg.lpips_weights).to(acc.device) if cfg.lpips_weight > 0 else None
    model, opt = acc.prepare(model, opt)
    if use_adv:
        disc, opt_d = acc.prepare(disc, opt_d)
    seed_everything(cfg.seed + acc.process_index)
    step, _ = load_latest_checkpoint(acc, out)
    check_checkpoint_within(step, cfg.steps, out)
    if step:
        log.info("resumed from checkpoint step %d", step)
    batches = make_loader(train_ds, index, step, cfg.num_workers)
    metrics, ids = MetricsLog(out / "metrics.jsonl", main), IdRecorder(out, acc.process_index)
    if step:
        metrics.log(resumed_from=step)
    vae = acc.unwrap_model(model).vae
    log.info("autoencoder: %d train + %d held-out tiles of %d px, f=%d, %.2fM params (%.2fM trained%s), "
             "%d process(es)", len(train_ds), len(held), tile, downsample_factor(cfg.block_out_channels),
             sum(p.numel() for p in vae.parameters()) / 1e6,
             sum(p.numel() for p in vae.parameters() if p.requires_grad) / 1e6,
             f", from {cfg.init_from}" if cfg.init_from else "", acc.num_processes)
    bar = progress(total=cfg.steps, initial=step, desc="autoencoder", disable=not main, log=log)
    t0, n_img = time.time(), 0
    model.train()
    while step < cfg.steps:
        x, _, batch_ids = next(batches)
        x = random_crop(random_dihedral(x) if cfg.flips else x, cfg.crop).to(acc.device)
        ids.record(step, batch_ids)
        m = train_step(cfg, acc, model, opt, disc, opt_d, lpips, x, step, out)
        step += 1
        n_img += len(x) * acc.num_processes
        bar.update(1)
        bar.set_postfix(l1=f"{m['l1']:.4f}")
        if step % 10 == 0 or step == cfg.steps:
            metrics.log(step=step, **m, img_per_s=n_img / max(1e-9, time.time() - t0))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and main and held:
            ev = evaluate(vae, sources, held, acc.device, out, step)
            metrics.log(step=step, **ev)
            log.info("step %d: held-out PSNR %.2f dB, SSIM %.4f", step, ev["psnr"], ev["ssim"])
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(acc, out, step, cfg.keep_checkpoints)
    bar.close()
    if cfg.checkpoint_every:
        save_final_checkpoint(acc, out, step, cfg.keep_checkpoints)
    acc.wait_for_everyone()
    if main:
        _finish(cfg, vae, train_ds, sources, held, acc.device, out, model_dir, metrics, log, time.time() - t0,
                init_scaling if cfg.train_part == "decoder" else None)
    acc.wait_for_everyone()
    return model_dir


def _finish(cfg, vae, train_ds, sources, held, device, out, model_dir, metrics, log, seconds,
            kept_scaling: float | None) -> None:
    """Evaluate, measure the scaling factor (or keep the one of an unchanged encoder), export, mark complete."""
    from ..models.autoencoder import save_vae

    final = evaluate(vae, sources, held, device, out, cfg.steps) if held else {}
    sf = kept_scaling if kept_scaling is not None else measure_scaling_factor(vae, train_ds, device, seed=cfg.seed)
    save_vae(vae, model_dir, sf, trained_on=[str(Path(d).resolve()) for d in cfg.data], steps=cfg.steps,
             holdout_metrics=final, init_from=cfg.init_from, train_part=cfg.train_part, init_steps=_init_steps(cfg))
    write_text_atomic(model_dir / CARD, autoencoder_card(model_dir, str(model_dir)))
    metrics.log(step=cfg.steps, scaling_factor=sf, **final)
    mark_complete(out, **completion_record(cfg), model=str(model_dir), scaling_factor=sf, steps=cfg.steps, **final)
    log.info("autoencoder exported to %s in %s: held-out PSNR %s dB, SSIM %s, scaling factor %.5f", model_dir,
             human_time(seconds), f"{final.get('psnr', float('nan')):.2f}", f"{final.get('ssim', float('nan')):.4f}", sf)
