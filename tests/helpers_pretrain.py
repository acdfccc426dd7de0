"""Tiny artifacts for tests of the pretraining stages (and of later stages that need them):
prepared datasets of real-looking 16x16 tiles, an exported (untrained) autoencoder, a latent cache,
and a tiny exported LDM. Everything is small enough to build in about a second."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def he_like_tiles(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] H&E-looking tiles: pink stroma with purple nuclei-like blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.array([230, 170, 200], float) + rng.normal(0, 12, 3)
        img = np.broadcast_to(img, (size, size, 3)).copy()
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.5, size / 4)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            img[mask] = np.array([110, 60, 150]) + rng.normal(0, 15, 3)
        img += rng.normal(0, 6, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_dataset(out: str | Path, n: int = 24, size: int = 16, seed: int = 0, name: str | None = None,
                 classes: tuple[str, ...] = (), shard_size: int = 1024) -> Path:
    """A prepared dataset directory (unlabeled, or labeled with `classes` assigned round-robin;
    labeled sets get a train/val/test split and a 'frac0.5' subset of train)."""
    from histodiffusion.data.writer import DatasetWriter

    out = Path(out)
    name = name or out.name
    w = DatasetWriter(out, size, shard_size=shard_size)
    tiles = he_like_tiles(n, size, seed)
    splits = ("train", "train", "train", "val", "test")
    for i, t in enumerate(tiles):
        label = classes[i % len(classes)] if classes else ""
        split = splits[i % len(splits)] if classes else "unlabeled"
        w.add(t, id=f"{name}_{i:05d}", source=f"{name}_src{i % 2}", label=label, split=split)
    subsets = {}
    if classes:
        train = [r["id"] for r in w.rows if r["split"] == "train"]
        subsets["frac0.5"] = train[::2]
    meta = {"name": name, "kind": "labeled" if classes else "unlabeled", "classes": list(classes),
            "tile_size": size, "counts": {"all": n}}
    return w.finish(meta, subsets)


def make_vae(folder: str | Path, block_out_channels=(8, 16), latent_channels: int = 4, size: int = 16,
             scaling_factor: float = 1.0, seed: int = 0) -> Path:
    """An exported (untrained) autoencoder folder with a recorded scaling factor (f = 2 by default)."""
    import torch

    from histodiffusion.models.autoencoder import build_vae, save_vae

    torch.manual_seed(seed)
    vae = build_vae(block_out_channels, 1, latent_channels, size)
    return save_vae(vae, folder, scaling_factor, trained_on=["test"])


def make_cache(tmp: str | Path, name: str = "unl", n: int = 24, vae: str | Path | None = None,
               classes: tuple[str, ...] = (), seed: int = 0, shard_size: int = 4096) -> Path:
    """dataset + (vae) + latent cache under `tmp`; returns the cache directory."""
    from histodiffusion.runtime.config import EncodeConfig
    from histodiffusion.stages.encode import run

    tmp = Path(tmp)
    data = make_dataset(tmp / "data" / name, n=n, seed=seed, classes=classes)
    if vae is None:
        vae = tmp / "vae"
        if not vae.exists():
            make_vae(vae)
    return run(EncodeConfig(data=str(data), vae=str(vae), out=str(tmp / "cache" / name), batch_size=16,
                            shard_size=shard_size))
