"""histodiffusion: latent diffusion synthetic augmentation for histopathology classification."""

__version__ = "0.1.0"
FORMAT_VERSION = 1  # bumped when an on-disk artifact layout changes incompatibly
