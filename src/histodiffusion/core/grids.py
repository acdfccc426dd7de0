"""The one image-grid writer: tiles in rows, a white gap between them and around them.

Used by the autoencoder's reconstruction grids, the pretraining preview grids, the sample stage's grids per
class and the report's figures (which frame dropped tiles on top)."""
from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1] ([N, 3, H, W] tensor) -> uint8 [N, H, W, 3]."""
    x = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    return x.mul(255).round().byte().permute(0, 2, 3, 1).numpy()


def tile_grid(images, cols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 tiles [N, H, W, 3] -> one uint8 image: rows of `cols` tiles (None: a near-square grid), `pad`
    pixels of `fill` between the tiles and around them."""
    ims = np.asarray(images, dtype=np.uint8)
    n, h, w = len(ims), ims.shape[1], ims.shape[2]
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), fill, np.uint8)
    for k, im in enumerate(ims):
        y, x = divmod(k, cols)
        grid[pad + y * (h + pad):pad + y * (h + pad) + h, pad + x * (w + pad):pad + x * (w + pad) + w] = im
    return grid


def write_grid(images, path: str | os.PathLike, cols: int | None = None) -> None:
    """Atomically write uint8 tiles [N, H, W, 3] as one PNG grid (see tile_grid)."""
    from PIL import Image

    from ..runtime.fileio import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(tile_grid(images, cols)).save(tmp, format="PNG")
