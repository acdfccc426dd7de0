"""Data layer: slide tiling, dataset preparation, torch Datasets over pixel shards and latent caches."""
