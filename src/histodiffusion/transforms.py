"""Pure tensor transforms shared by the stages (no I/O, no randomness of their own)."""
from __future__ import annotations

DIHEDRAL = 8  # rotations by 0/90/180/270 degrees, each with and without a horizontal flip


def dihedral(img, k: int):
    """The k-th of the 8 dihedral transforms of a [..., H, W] tensor (k=0: identity)."""
    import torch

    out = torch.rot90(img, k % 4, dims=(-2, -1))
    return torch.flip(out, dims=(-1,)) if k >= 4 else out
