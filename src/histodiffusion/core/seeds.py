"""The one derivation of seeds from a run's seed and keys (a sample's index, a training step and rank, a
class, an epoch and item): numpy's SeedSequence of the integers (seed, *keys). It is stable across
platforms, processes and Python versions, and keys never collide the way `seed + i` offsets do."""
from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for (seed, *keys), e.g. sample i of a run: derive_seed(seed, i)."""
    state = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i of a run with seed `seed` (samples.csv's `seed`: one torch.Generator per image)."""
    return derive_seed(seed, i)


def torch_generator(seed: int, *keys: int):
    """A CPU torch.Generator seeded with derive_seed(seed, *keys)."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator on the same SeedSequence of (seed, *keys)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(k) for k in keys)]))
