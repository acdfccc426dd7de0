"""Stage `finetune-decoder`: fine-tune the autoencoder's decoder on the labeled subset with an L1
reconstruction loss plus aux_weight * cross-entropy of an auxiliary image classifier (trained on the real
labeled subset first, then frozen) on decoded images. With `unlabeled_subset` (beyond the paper), a second
stream of the target's own tiles without labels (e.g. the whole train split) adds an L1 reconstruction loss,
so the decoder learns the cohort's stains and structures from every tile a user has, not only labeled ones;
validation and test tiles are refused. The encoder is frozen, so latents of the base
autoencoder stay valid: the exported <out>/model/vae/histodiffusion.json names the base hash.

Fine-tuning the UNet unconditionally on target latents is `pretrain --init-from <model> --cache <target>`.
Batches are drawn from a generator seeded by (seed, step, rank), so a resumed run continues the same
sequence of batches; every process draws its own batch and accelerate averages the gradients.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.seeds import torch_generator
from ..data.batches import accuracy, balanced_batch, class_members, pixel_batch, train_balanced
from ..models.cards import CARD, autoencoder_card
from ..runtime.config import FinetuneDecoderConfig
from ..runtime.contract import completion_record
from ..runtime.distributed import load_latest_checkpoint, make_accelerator, save_checkpoint, seed_everything
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json, write_json_atomic, write_text_atomic
from ..runtime.log import MetricsLog, closes_stage_logs
from ..runtime.rundirs import is_complete, mark_complete, start_stage

AUX_SEED_OFFSET = 7919  # the auxiliary classifier's batches: its own stream of the stage's seed


class _Decoder(torch.nn.Module):
    """The trainable half of the autoencoder (post_quant_conv + decoder) as one module for DDP."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def _aux_classifier(cfg: FinetuneDecoderConfig, acc, ds, by_class, size: int, out: Path, log):
    """The frozen auxiliary classifier of <out>/aux_classifier, trained there by the main process first."""
    from ..models.classifier import load_classifier

    aux_dir = out / "aux_classifier"
    if acc.is_main_process and not (aux_dir / "classifier.json").is_file():
        log.info("training the auxiliary classifier on %d real images (%d steps)", len(ds), cfg.aux_steps)
        log.info("aux classifier train accuracy %.3f",
                 _train_aux_classifier(cfg, ds, by_class, ds.classes, size, aux_dir, log))
    acc.wait_for_everyone()
    clf, _ = load_classifier(aux_dir)
    clf.requires_grad_(False)
    return clf


def _train_aux_classifier(cfg: FinetuneDecoderConfig, ds, by_class, classes, size: int, path: Path, log):
    """small_cnn on the real labeled subset (class-balanced), saved to `path`; returns its train accuracy."""
    from ..models.classifier import build_classifier, save_classifier

    torch.manual_seed(cfg.seed)
    clf = build_classifier("small_cnn", len(classes), size)
    train_balanced(clf, ds, by_class, cfg.aux_steps, cfg.batch_size, 1e-3, 1e-4, cfg.seed + AUX_SEED_OFFSET,
                   log=log, what="aux classifier")
    acc = accuracy(clf, ds, range(len(ds)))
    save_classifier(clf, path, {"name": "small_cnn", "classes": classes, "image_size": size,
                                "trained_on": f"{cfg.data}:{cfg.subset}", "steps": cfg.aux_steps,
                                "train_accuracy": acc})
    return acc


@torch.no_grad()
def _eval_decoder(vae, clf, ds, idx) -> dict:
    """Reconstruction L1 and (with an aux classifier) its accuracy on reconstructions of items `idx`."""
    idx = list(idx)
    l1, correct = 0.0, 0
    for i in range(0, len(idx), 32):
        x, y = pixel_batch(ds, idx[i:i + 32])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        l1 += float((rec - x).abs().mean()) * len(x)
        if clf is not None:
            correct += int((clf(rec).argmax(-1) == y).sum())
    res = {"recon_l1": l1 / len(idx)}
    if clf is not None:
        res["aux_accuracy_on_recon"] = correct / len(idx)
    return res


def _unlabeled_tiles(cfg: FinetuneDecoderConfig):
    """The PixelDataset of cfg.unlabeled_subset, or None; refuses validation/test tiles (leakage guard)."""
    from ..data.datasets import PixelDataset
    from ..data.leakage import evaluation_tiles

    if not cfg.unlabeled_subset:
        return None
    ds = PixelDataset(cfg.data, cfg.unlabeled_subset)
    held = evaluation_tiles(ds.rows)
    if held:
        raise HistoError(f"unlabeled_subset {cfg.unlabeled_subset!r} of {cfg.data} holds {len(held)} validation/test "
                         f"tiles, e.g. {held[0]}: the decoder must not see them; use train or a subset of it")
    return ds


@closes_stage_logs
def run(cfg: FinetuneDecoderConfig) -> Path:
    from ..data.datasets import PixelDataset
    from ..runtime.latent_space import latent_hash, of_autoencoder
    from ..models.autoencoder import load_vae, save_vae

    acc = make_accelerator()
    unl = _unlabeled_tiles(cfg)  # before anything is written: a leaking subset is refused up front
    out, log = start_stage(acc, cfg, "finetune-decoder")
    if is_complete(out):
        log.info("fine-tuned decoder already complete: %s", out / "model" / "vae")
        return out
    if cfg.aux_weight < 0 or cfg.steps <= 0 or cfg.batch_size <= 0:
        raise HistoError(f"need aux_weight >= 0, steps > 0, batch_size > 0 (got {cfg.aux_weight}, {cfg.steps}, "
                         f"{cfg.batch_size})")
    # 1. data, base autoencoder (encoder frozen), auxiliary classifier (trained once, then frozen)
    ds = PixelDataset(cfg.data, cfg.subset)
    classes = ds.classes
    by_class = class_members(np.array([ds.label_index(i) for i in range(len(ds))]), classes,
                             f"subset {cfg.subset!r} of {cfg.data}")
    size = int(ds[0][0].shape[-1])
    vae = load_vae(cfg.vae)
    base_hash = latent_hash(cfg.vae)
    scaling = of_autoencoder(cfg.vae, vae).scaling_factor  # a foreign autoencoder's default is not trusted
    clf = _aux_classifier(cfg, acc, ds, by_class, size, out, log) if cfg.aux_weight > 0 else None
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    if vae.post_quant_conv is not None:
        vae.post_quant_conv.requires_grad_(True)
    eval_idx = range(min(len(ds), 128))
    before = _eval_decoder(vae, clf, ds, eval_idx) if acc.is_main_process else {}
    # 2. optimiser over decoder parameters only, resumed from the newest checkpoint
    seed_everything(cfg.seed)
    dec = _Decoder(vae)
    opt = torch.optim.AdamW([p for p in dec.parameters() if p.requires_grad], lr=cfg.lr)
    dec, opt = acc.prepare(dec, opt)
    step, _ = load_latest_checkpoint(acc, out)
    if step:
        log.info("resumed from step %d", step)
    metrics = MetricsLog(out / "metrics.jsonl", acc.is_main_process)
    dec.train()
    # 3. training: L1 reconstruction + aux_weight * CE(aux classifier(decoded), y) [+ L1 on unlabeled tiles]
    if unl is not None:
        log.info("unlabeled stream: %d tiles of subset %r (reconstruction only)", len(unl), cfg.unlabeled_subset)
    while step < cfg.steps:
        g = torch_generator(cfg.seed, step, acc.process_index)
        x, y = pixel_batch(ds, balanced_batch(by_class, cfg.batch_size, g), g)
        n_lab = len(x)
        if unl is not None:
            x_u, _ = pixel_batch(unl, torch.randint(len(unl), (cfg.unlabeled_batch_size,), generator=g), g)
            x = torch.cat([x, x_u])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        rec = dec(z)
        rec_loss = (rec[:n_lab] - x[:n_lab]).abs().mean()
        unl_loss = (rec[n_lab:] - x[n_lab:]).abs().mean() if unl is not None else torch.zeros(())
        aux_loss = F.cross_entropy(clf(rec[:n_lab]), y) if clf is not None else torch.zeros(())
        loss = rec_loss + unl_loss + cfg.aux_weight * aux_loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 25 == 0 or step == cfg.steps:
            metrics.log(step=step, loss=float(loss.detach()), l1=float(rec_loss.detach()), aux_ce=float(aux_loss.detach()),
                        **({"l1_unlabeled": float(unl_loss.detach())} if unl is not None else {}))
            log.info("step %d/%d l1 %.4f aux ce %.4f", step, cfg.steps, float(rec_loss.detach()), float(aux_loss.detach()))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(acc, out, step, cfg.keep_checkpoints)
    # 4. evaluate and export the whole autoencoder (encoder untouched) naming its base
    vae = acc.unwrap_model(dec).vae.eval()
    if acc.is_main_process:
        after = _eval_decoder(vae, clf, ds, eval_idx)
        write_json_atomic(out / "metrics.json", {"before": before, "after": after, "aux_weight": cfg.aux_weight,
                                                 "steps": cfg.steps, "n_train": len(ds),
                                                 "n_unlabeled": len(unl) if unl is not None else 0})
        log.info("decoder fine-tune: before %s, after %s", before, after)
        save_vae(vae, out / "model" / "vae", scaling, base_vae_hash=base_hash, base_vae=str(Path(cfg.vae).resolve()),
                 finetuned="decoder", aux_weight=cfg.aux_weight, classes=classes, data=str(cfg.data),
                 subset=cfg.subset, unlabeled_subset=cfg.unlabeled_subset)
        write_text_atomic(out / "model" / "vae" / CARD, autoencoder_card(
            out / "model" / "vae", str(out / "model" / "vae"), read_json(out / "metrics.json")))
        mark_complete(out, **completion_record(cfg))
    acc.wait_for_everyone()
    return out
