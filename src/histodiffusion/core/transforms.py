"""Pure tensor transforms shared by the stages (no I/O, no randomness of their own)."""
from __future__ import annotations

DIHEDRAL = 8  # rotations by 0/90/180/270 degrees, each with and without a horizontal flip


def dihedral(img, k: int, dims: tuple[int, int] = (-2, -1)):
    """The k-th of the 8 dihedral transforms of a tensor whose image axes (height, width) are `dims`
    ([..., H, W] by default; (1, 2) for [N, H, W, C]): rotation by k % 4 quarter turns, then, for k >= 4,
    a horizontal flip (k=0: identity)."""
    import torch

    out = torch.rot90(img, k % 4, dims=dims)
    return torch.flip(out, dims=(dims[1],)) if k >= 4 else out


def flip_then_rotate(flip: bool, quarter_turns: int) -> int:
    """The dihedral index k of a horizontal flip followed by `quarter_turns` rotations: a flip moved past a
    rotation reverses it, so rot(flip(x), r) == flip(rot(x, -r)) == dihedral(x, 4 + (-r) % 4)."""
    return 4 + (-quarter_turns) % 4 if flip else quarter_turns % 4


def match_color(image, reference):
    """uint8 [H, W, 3] `image` with each RGB channel's mean and standard deviation set to `reference`'s (a flat
    channel takes the reference's mean): a per-sample colour transfer (Reinhard et al. 2001, in RGB)."""
    import numpy as np

    x, ref = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    mu, sd = x.mean((0, 1)), x.std((0, 1))
    scale = np.divide(ref.std((0, 1)), sd, out=np.zeros(3), where=sd > 0)
    return np.clip(np.round((x - mu) * scale + ref.mean((0, 1))), 0, 255).astype(np.uint8)


def add_detail(image, tile, reconstruction):
    """uint8 [H, W, 3] `image` + (`tile` - `reconstruction`), clipped to 0..255: what an autoencoder's round trip
    lost on `tile` (its decoded latent `reconstruction`) added back onto an image decoded from a latent that
    started as that tile's, so the image keeps the tile's detail and carries only what changed in latent space."""
    import numpy as np

    x = np.asarray(image, dtype=np.int16) + np.asarray(tile, dtype=np.int16) - np.asarray(reconstruction, dtype=np.int16)
    return np.clip(x, 0, 255).astype(np.uint8)
