"""Stage: adapt the pretrained (unconditional, unlabeled) model to the small labeled target set.

Two entry points (CLI `train-latent-classifier` and `finetune-decoder`):

* run_latent_classifier: a noise-aware classifier p(y | z_t, t) on latents of the labeled few-shot
  subset, noised at random timesteps with the LDM's own noise schedule (`add_noise`), class-balanced
  batches, AdamW. Reports validation accuracy per timestep bucket (metrics.json) next to an image-space
  classifier trained on the same subset with the same budget (latent_strength.py; the ratio per
  bucket and the goal, >= 0.9 at the lowest noise, are in metrics.json). Exports <out>/model/.
* run_finetune_decoder: fine-tune the autoencoder's decoder on the labeled subset with an L1
  reconstruction loss plus aux_weight * cross-entropy of an auxiliary image classifier (trained on the
  real labeled subset first, then frozen) on decoded images. The encoder is frozen, so latents of the
  base autoencoder stay valid: the exported <out>/model/vae/histodiffusion.json names the base hash.

Fine-tuning the UNet unconditionally on target latents is `pretrain --init-from <model> --cache <target>`.
Batches are drawn from a generator seeded by (seed, step, rank), so a resumed run continues the same
sequence of batches; every process draws its own batch and accelerate averages the gradients.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .runtime.artifacts import MODEL_INFO, format_meta, read_meta
from .runtime.config import FinetuneDecoderConfig, LatentClassifierConfig
from .runtime.contract import completion_record
from .models.cards import CARD, autoencoder_card, latent_classifier_card
from .runtime.errors import HistoError
from .runtime.log import MetricsLog, closes_stage_logs, get_logger
from .runtime.fileio import atomic_path, read_json, write_json_atomic, write_text_atomic
from .runtime.rundirs import is_complete, mark_complete, start_run_dir
from .runtime.distributed import load_latest_checkpoint, make_accelerator, save_checkpoint, seed_everything
from .core.seeds import torch_generator
from .core.transforms import DIHEDRAL, dihedral

N_BUCKETS = 4  # validation accuracy per timestep bucket [k*T/4, (k+1)*T/4)


def balanced_batch(by_class: list[np.ndarray], batch: int, g: torch.Generator) -> np.ndarray:
    """Indices of a class-balanced batch: a uniformly drawn class, then a uniformly drawn member."""
    cls = torch.randint(len(by_class), (batch,), generator=g).numpy()
    pick = torch.rand(batch, generator=g).numpy()
    return np.array([by_class[c][int(p * len(by_class[c]))] for c, p in zip(cls, pick)])


def _class_members(labels: np.ndarray, classes: list[str], where: str) -> list[np.ndarray]:
    if (labels < 0).any():
        raise HistoError(f"{where} holds unlabeled items; use a labeled subset")
    by_class = [np.flatnonzero(labels == c) for c in range(len(classes))]
    present = [m for m in by_class if len(m)]
    if len(present) < 2:
        raise HistoError(f"{where} has examples of {len(present)} class(es); a classifier needs at least 2")
    return present  # balanced over the classes present (item indices, so class ids are unaffected)


def _start(cfg, stage: str):
    acc = make_accelerator()
    out = start_run_dir(cfg.out, cfg, stage, acc.is_main_process)
    acc.wait_for_everyone()
    log = get_logger(stage, out / "log.txt", is_main=acc.is_main_process)
    return acc, out, log


# --------------------------------------------------------------------------------------------------
# Noise-aware latent classifier
# --------------------------------------------------------------------------------------------------
def _load_training_scheduler(path: str, space):
    from .runtime.latent_space import check_compatible, of_model
    from .models.unet import load_scheduler

    sched = load_scheduler(path)
    if (Path(path).parent / MODEL_INFO).is_file():  # scheduler of an exported LDM: its latents must be the cache's
        try:
            check_compatible(space, of_model(Path(path).parent, "LDM"), "the latent cache", f"the LDM of {path}")
        except HistoError as e:
            raise HistoError(f"{e}; encode the target data with the LDM's autoencoder") from None
    return sched


def noised_batch(ds, idx, sched, g: torch.Generator, max_t: int, augment: bool = False):
    """(z_t, t, y) for items `idx` of a LatentDataset: z_t = add_noise(z, eps, t), t ~ U[0, max_t).

    augment: each latent gets one of the 8 dihedral transforms (drawn from g), applied in latent space.
    """
    items = [ds[int(i)] for i in idx]
    z = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items])
    if augment:
        ks = torch.randint(DIHEDRAL, (len(idx),), generator=g)
        z = torch.stack([dihedral(zi, int(k)) for zi, k in zip(z, ks)])
    t = torch.randint(0, max_t, (len(idx),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    return sched.add_noise(z, noise, t), t, y


@torch.no_grad()
def bucket_accuracy(model, ds, sched, seed: int = 1234, batch: int = 256) -> dict[str, float]:
    """Accuracy on (clean-mean) latents noised at a fixed random t inside each timestep bucket."""
    T = int(sched.config.num_train_timesteps)
    edges = np.linspace(0, T, N_BUCKETS + 1).astype(int)
    labels = torch.tensor(ds.labels())
    z_all = torch.stack([ds[i][0] for i in range(len(ds))])
    out = {}
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        g = torch.Generator().manual_seed(seed + b)
        t = torch.randint(int(lo), int(hi), (len(ds),), generator=g)
        zt = sched.add_noise(z_all, torch.randn(z_all.shape, generator=g), t)
        pred = torch.cat([model(zt[i:i + batch], t[i:i + batch]).argmax(-1) for i in range(0, len(ds), batch)])
        out[f"[{lo},{hi})"] = float((pred == labels).float().mean())
    return out


@closes_stage_logs
def run_latent_classifier(cfg: LatentClassifierConfig) -> Path:
    from .data.datasets import LatentDataset
    from .models import norm_groups
    from .models.latent_classifier import LatentClassifier

    acc, out, log = _start(cfg, "train-latent-classifier")
    if is_complete(out):
        log.info("latent classifier already complete: %s", out / "model")
        return out
    for name in ("steps", "batch_size", "width", "depth"):
        if getattr(cfg, name) <= 0:
            raise HistoError(f"{name} must be positive, got {getattr(cfg, name)}")
    # 1. data: latents of the labeled subset (z sampled from the posterior mean/std at each step)
    meta = read_meta(cfg.cache, "latent cache")
    classes = list(meta.get("classes") or [])
    if len(classes) < 2:
        raise HistoError(f"latent cache {cfg.cache} has classes {classes}: need a labeled dataset with >= 2 classes")
    ds = LatentDataset(cfg.cache, cfg.subset, sample=True, seed=cfg.seed)
    by_class = _class_members(ds.labels(), classes, f"subset {cfg.subset!r} of {cfg.cache}")
    sched = _load_training_scheduler(cfg.scheduler, ds.space)
    T = int(sched.config.num_train_timesteps)
    max_t = cfg.max_timestep or T
    if not 0 < max_t <= T:
        raise HistoError(f"max_timestep must be in [1, {T}] (or 0 for all), got {cfg.max_timestep}")
    val = LatentDataset(cfg.cache, cfg.val_subset, sample=False) if cfg.val_subset else None
    if val is not None and cfg.image_baseline:  # checked before training: its dataset must be readable
        from .latent_strength import baseline_data

        image_data = baseline_data(cfg, meta)
    # 2. model and optimiser, resumed from the newest checkpoint
    seed_everything(cfg.seed)
    c = int(ds[0][0].shape[0])
    model = LatentClassifier(in_channels=c, num_classes=len(classes), width=cfg.width, depth=cfg.depth,
                             norm_num_groups=norm_groups(cfg.width, most=8), class_names=classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    step, _ = load_latest_checkpoint(acc, out)
    if step:
        log.info("resumed from step %d", step)
    log.info("latent classifier: %d latents of %s (%s), %d classes, t < %d, %d steps x %d x %d process(es)",
             len(ds), cfg.subset, cfg.cache, len(classes), max_t, cfg.steps, cfg.batch_size, acc.num_processes)
    metrics = MetricsLog(out / "metrics.jsonl", acc.is_main_process)
    model.train()
    t0, run_loss, run_acc, n = time.time(), 0.0, 0.0, 0
    # 3. training: class-balanced batches of noised latents
    while step < cfg.steps:
        g = torch_generator(cfg.seed, step, acc.process_index)
        ds.set_epoch(step)
        zt, t, y = noised_batch(ds, balanced_batch(by_class, cfg.batch_size, g), sched, g, max_t, cfg.augment)
        logits = model(zt, t)
        loss = F.cross_entropy(logits, y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(-1) == y).float().mean())
        n += 1
        if step % 50 == 0 or step == cfg.steps:
            metrics.log(step=step, loss=run_loss / n, train_acc=run_acc / n, seconds=time.time() - t0)
            log.info("step %d/%d loss %.4f train acc %.3f", step, cfg.steps, run_loss / n, run_acc / n)
            run_loss, run_acc, n = 0.0, 0.0, 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(acc, out, step, cfg.keep_checkpoints)
    # 4. validation per timestep bucket, export
    model = acc.unwrap_model(model).eval()
    if acc.is_main_process:
        result = {"steps": cfg.steps, "classes": classes, "train_subset": cfg.subset, "n_train": len(ds),
                  "chance": 1.0 / len(classes)}
        if val is not None:
            by_t = bucket_accuracy(model, val, sched)
            result.update(val_subset=cfg.val_subset, n_val=len(val), val_accuracy_by_t=by_t,
                          val_accuracy=float(np.mean(list(by_t.values()))))
            log.info("validation accuracy by timestep: %s", ", ".join(f"t in {k}: {v:.3f}" for k, v in by_t.items()))
            if cfg.image_baseline:
                from .latent_strength import image_baseline, strength_lines, strength_summary

                image = image_baseline(cfg, image_data, _base_ids(ds), _base_ids(val), classes, out, log)
                result.update(image_classifier=image, **strength_summary(by_t, image["val_accuracy"]))
                for line in strength_lines(by_t, image, result):
                    log.info("latent vs image classifier: %s", line)
        write_json_atomic(out / "metrics.json", result)
        with atomic_path(out / "model") as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            write_json_atomic(tmp / MODEL_INFO, format_meta(
                kind="latent_classifier", classes=classes, **ds.space.fields(),
                cache=str(Path(cfg.cache).resolve()), subset=cfg.subset,
                scheduler=dict(sched.config), max_timestep=max_t))
            write_text_atomic(tmp / CARD, latent_classifier_card(tmp, str(out / "model"), result))
        mark_complete(out, **completion_record(cfg))
        log.info("latent classifier exported: %s", out / "model")
    acc.wait_for_everyone()
    return out


def _base_ids(ds) -> list[str]:
    """Tile ids of a latent dataset without the dihedral copies' suffix (<id>~d1..d7), in order."""
    return list(dict.fromkeys(r["id"].split("~")[0] for r in ds.rows))


# --------------------------------------------------------------------------------------------------
# Decoder fine-tune with an auxiliary image classifier
# --------------------------------------------------------------------------------------------------
class _Decoder(torch.nn.Module):
    """The trainable half of the autoencoder (post_quant_conv + decoder) as one module for DDP."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def _pixel_batch(ds, idx, g: torch.Generator | None = None):
    items = [ds[int(i)] for i in idx]
    x = torch.stack([it[0] for it in items])
    if g is not None:  # random dihedral augmentation: tissue has no orientation
        k = int(torch.randint(4, (1,), generator=g))  # quarter turns, then a flip with probability 1/2
        x = dihedral(x, k + 4 * int(torch.randint(2, (1,), generator=g)))
    return x, torch.tensor([it[1] for it in items])


def _train_aux_classifier(cfg: FinetuneDecoderConfig, ds, by_class, classes, size: int, path: Path, log):
    """small_cnn on the real labeled subset (class-balanced), saved to `path`; returns its train accuracy."""
    from .models.classifier import build_classifier, save_classifier

    torch.manual_seed(cfg.seed)
    clf = build_classifier("small_cnn", len(classes), size)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    clf.train()
    for step in range(cfg.aux_steps):
        g = torch_generator(cfg.seed + 7919, step, 0)
        x, y = _pixel_batch(ds, balanced_batch(by_class, cfg.batch_size, g), g)
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log.info("aux classifier step %d/%d loss %.4f", step + 1, cfg.aux_steps, float(loss))
    clf.eval()
    acc = _accuracy(clf, ds, range(len(ds)))
    save_classifier(clf, path, {"name": "small_cnn", "classes": classes, "image_size": size,
                                "trained_on": f"{cfg.data}:{cfg.subset}", "steps": cfg.aux_steps,
                                "train_accuracy": acc})
    return acc


@torch.no_grad()
def _accuracy(clf, ds, idx, transform=None, batch: int = 64) -> float:
    idx = list(idx)
    correct = 0
    for i in range(0, len(idx), batch):
        x, y = _pixel_batch(ds, idx[i:i + batch])
        if transform is not None:
            x = transform(x)
        correct += int((clf(x).argmax(-1) == y).sum())
    return correct / max(1, len(idx))


@torch.no_grad()
def _eval_decoder(vae, clf, ds, idx) -> dict:
    """Reconstruction L1 and (with an aux classifier) its accuracy on reconstructions of items `idx`."""
    idx = list(idx)
    l1, correct = 0.0, 0
    for i in range(0, len(idx), 32):
        x, y = _pixel_batch(ds, idx[i:i + 32])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        l1 += float((rec - x).abs().mean()) * len(x)
        if clf is not None:
            correct += int((clf(rec).argmax(-1) == y).sum())
    res = {"recon_l1": l1 / len(idx)}
    if clf is not None:
        res["aux_accuracy_on_recon"] = correct / len(idx)
    return res


@closes_stage_logs
def run_finetune_decoder(cfg: FinetuneDecoderConfig) -> Path:
    from .data.datasets import PixelDataset
    from .runtime.latent_space import latent_hash, of_autoencoder
    from .models.autoencoder import load_vae, save_vae
    from .models.classifier import load_classifier

    acc, out, log = _start(cfg, "finetune-decoder")
    if is_complete(out):
        log.info("fine-tuned decoder already complete: %s", out / "model" / "vae")
        return out
    if cfg.aux_weight < 0 or cfg.steps <= 0 or cfg.batch_size <= 0:
        raise HistoError(f"need aux_weight >= 0, steps > 0, batch_size > 0 (got {cfg.aux_weight}, {cfg.steps}, "
                         f"{cfg.batch_size})")
    # 1. data, base autoencoder (encoder frozen), auxiliary classifier (trained once, then frozen)
    ds = PixelDataset(cfg.data, cfg.subset)
    classes = ds.classes
    by_class = _class_members(np.array([ds.label_index(i) for i in range(len(ds))]), classes,
                              f"subset {cfg.subset!r} of {cfg.data}")
    size = int(ds[0][0].shape[-1])
    vae = load_vae(cfg.vae)
    base_hash = latent_hash(cfg.vae)
    scaling = of_autoencoder(cfg.vae, vae).scaling_factor  # a foreign autoencoder's default is not trusted
    clf = None
    if cfg.aux_weight > 0:
        aux_dir = out / "aux_classifier"
        if acc.is_main_process and not (aux_dir / "classifier.json").is_file():
            log.info("training the auxiliary classifier on %d real images (%d steps)", len(ds), cfg.aux_steps)
            log.info("aux classifier train accuracy %.3f",
                     _train_aux_classifier(cfg, ds, by_class, classes, size, aux_dir, log))
        acc.wait_for_everyone()
        clf, _ = load_classifier(aux_dir)
        clf.requires_grad_(False)
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
    # 3. training: L1 reconstruction + aux_weight * CE(aux classifier(decoded), y)
    while step < cfg.steps:
        g = torch_generator(cfg.seed, step, acc.process_index)
        x, y = _pixel_batch(ds, balanced_batch(by_class, cfg.batch_size, g), g)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        rec = dec(z)
        rec_loss = (rec - x).abs().mean()
        aux_loss = F.cross_entropy(clf(rec), y) if clf is not None else torch.zeros(())
        loss = rec_loss + cfg.aux_weight * aux_loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 25 == 0 or step == cfg.steps:
            metrics.log(step=step, loss=float(loss.detach()), l1=float(rec_loss.detach()), aux_ce=float(aux_loss.detach()))
            log.info("step %d/%d l1 %.4f aux ce %.4f", step, cfg.steps, float(rec_loss.detach()), float(aux_loss.detach()))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(acc, out, step, cfg.keep_checkpoints)
    # 4. evaluate and export the whole autoencoder (encoder untouched) naming its base
    vae = acc.unwrap_model(dec).vae.eval()
    if acc.is_main_process:
        after = _eval_decoder(vae, clf, ds, eval_idx)
        write_json_atomic(out / "metrics.json", {"before": before, "after": after, "aux_weight": cfg.aux_weight,
                                                 "steps": cfg.steps, "n_train": len(ds)})
        log.info("decoder fine-tune: before %s, after %s", before, after)
        save_vae(vae, out / "model" / "vae", scaling, base_vae_hash=base_hash, base_vae=str(Path(cfg.vae).resolve()),
                 finetuned="decoder", aux_weight=cfg.aux_weight, classes=classes, data=str(cfg.data),
                 subset=cfg.subset)
        write_text_atomic(out / "model" / "vae" / CARD, autoencoder_card(
            out / "model" / "vae", str(out / "model" / "vae"), read_json(out / "metrics.json")))
        mark_complete(out, **completion_record(cfg))
    acc.wait_for_everyone()
    return out
