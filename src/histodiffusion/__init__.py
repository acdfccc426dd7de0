"""histodiffusion: latent diffusion synthetic augmentation for histopathology classification."""

__version__ = "0.1.0"
FORMAT_VERSION = 1  # bumped when an on-disk artifact layout changes incompatibly


def __getattr__(name: str):
    """`from histodiffusion import HistoDiffusionPipeline` (imported on first use: `histodiffusion --help`
    stays fast without torch)."""
    if name == "HistoDiffusionPipeline":
        from .diffusers_pipeline import HistoDiffusionPipeline

        return HistoDiffusionPipeline
    raise AttributeError(f"module 'histodiffusion' has no attribute {name!r}")
