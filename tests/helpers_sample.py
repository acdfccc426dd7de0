"""Tiny artifacts for tests of adaptation and sampling: a labeled two-class dataset whose classes
differ in colour, an exported autoencoder (f = 4: 32x32 tiles -> 8x8 latents), its latent cache
(through `encode.run`), an exported LDM (unet_ema/, scheduler/, vae/, histodiffusion.json) and a
latent classifier folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from helpers_pretrain import he_like_tiles

SIZE = 32
CLASSES = ("dark", "pale")


def make_labeled_dataset(out: str | Path, n: int = 40, seed: int = 0, classes=CLASSES) -> Path:
    """Labeled tiles; the classes differ in band orientation and shade, so a classifier can separate them.
    Splits train/val by item (train 3 of 5, val 1, test 1) and a subset "few" (a third of train, both classes)."""
    from histodiffusion.data.writer import DatasetWriter

    out = Path(out)
    w = DatasetWriter(out, SIZE)
    tiles = he_like_tiles(n, SIZE, seed).astype(np.int16)
    splits = ("train", "train", "train", "val", "test")
    for i, t in enumerate(tiles):
        k = i % len(classes)
        axis = k % 2  # class 0: horizontal bands, class 1: vertical bands (period 8 px), other shades
        bands = 50 * np.sign(np.sin(2 * np.pi * (np.indices((SIZE, SIZE))[axis] + 0.5) / 8))[..., None]
        img = t + bands - (40 if k == 0 else 0)
        img = np.clip(img, 0, 255).astype(np.uint8)
        w.add(img, id=f"t{i:04d}", source="toy", label=classes[k], group=f"g{i}", split=splits[i % 5])
    train = [r["id"] for r in w.rows if r["split"] == "train"]
    meta = {"name": out.name, "kind": "labeled", "classes": list(classes), "tile_size": SIZE, "counts": {"all": n}}
    return w.finish(meta, {"few": train[::3]})


def make_vae32(folder: str | Path, seed: int = 0) -> Path:
    """An untrained f=4 autoencoder whose posterior is nearly deterministic (std ~0.05), as a trained one's
    is, so the latents keep the image content instead of being drowned in posterior noise."""
    from histodiffusion.models.autoencoder import build_vae, save_vae

    torch.manual_seed(seed)
    vae = build_vae((8, 16, 16), 1, 4, SIZE)
    conv = vae.encoder.conv_out
    with torch.no_grad():
        conv.weight[4:] = 0
        conv.bias[4:] = -6.0
        conv.weight[:4] *= 3
        if vae.quant_conv is not None:  # identity: keep the mean / log-variance halves apart
            vae.quant_conv.weight.copy_(torch.eye(8)[:, :, None, None])
            vae.quant_conv.bias.zero_()
    return save_vae(vae, folder, 1.5, trained_on=["test"])


def make_labeled_cache(tmp: str | Path, n: int = 40, vae: str | Path | None = None) -> tuple[Path, Path, Path]:
    """(dataset dir, vae dir, latent cache dir) under `tmp`."""
    from histodiffusion.runtime.config import EncodeConfig
    from histodiffusion.stages.encode import run

    tmp = Path(tmp)
    data = make_labeled_dataset(tmp / "data", n=n)
    vae = Path(vae) if vae else make_vae32(tmp / "vae")
    cache = run(EncodeConfig(data=str(data), vae=str(vae), out=str(tmp / "cache"), batch_size=32))
    return data, vae, cache


def make_ldm(folder: str | Path, vae: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """An exported (untrained) LDM folder on 4x8x8 latents sharing `vae`."""
    import torch

    from histodiffusion.runtime.artifacts import MODEL_INFO
    from histodiffusion.runtime.latent_space import measured_factor
    from histodiffusion.models.autoencoder import vae_id
    from histodiffusion.models.unet import build_scheduler, build_unet

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = build_unet((16, 32), 1, False, 4, SIZE // 4)
    unet.save_pretrained(folder / "unet_ema")
    build_scheduler(prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    shutil.copytree(vae, folder / "vae")
    info = {"format_version": 1, "kind": "ldm", "vae_hash": vae_id(vae), "scaling_factor": measured_factor(vae),
            "latent_shape": [4, SIZE // 4, SIZE // 4]}
    (folder / MODEL_INFO).write_text(json.dumps(info))
    return folder


def make_latent_classifier(folder: str | Path, cache: str | Path, scheduler_dir: str | Path, seed: int = 0,
                           model=None, **overrides) -> Path:
    """An exported latent classifier folder for `cache` (untrained unless `model` is given)."""
    import torch

    from histodiffusion.runtime.artifacts import MODEL_INFO
    from histodiffusion.runtime.latent_space import of_cache
    from histodiffusion.models.latent_classifier import LatentClassifier

    meta = json.loads((Path(cache) / "meta.json").read_text())
    sched_cfg = json.loads((Path(scheduler_dir) / "scheduler_config.json").read_text())
    torch.manual_seed(seed)
    model = model or LatentClassifier(in_channels=4, num_classes=len(meta["classes"]), width=16, depth=2)
    model.save_pretrained(folder)
    info = {"format_version": 1, "kind": "latent_classifier", "classes": meta["classes"],
            **of_cache(cache).fields(), "cache": str(cache),
            "subset": "train", "scheduler": sched_cfg}
    info.update(overrides)
    (Path(folder) / MODEL_INFO).write_text(json.dumps(info))
    return Path(folder)


class ToyClassifier(torch.nn.Module):
    """A toy latent classifier: logit of class 1 = w * mean of latent channel 0 (ignores t)."""

    def __init__(self, w: float = 4.0):
        super().__init__()
        self.w = w

    def forward(self, z, t):
        m = z[:, 0].mean(dim=(1, 2)) * self.w
        return torch.stack([-m, m], dim=1)


def make_guided_chain(tmp: str | Path, n: int) -> dict:
    """A labeled dataset, its autoencoder and cache, an LDM and a latent classifier, all tiny."""
    d = Path(tmp)
    data, vae, cache = make_labeled_cache(d, n=n)
    ldm = make_ldm(d / "ldm", vae)
    clf = make_latent_classifier(d / "clf", cache, ldm / "scheduler")
    return {"data": data, "cache": cache, "ldm": ldm, "clf": clf, "vae": vae}
