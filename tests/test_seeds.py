"""The one seed derivation (seeds.py): stable values, no collisions between keys."""
import numpy as np
import torch

from histodiffusion.core.seeds import derive_seed, numpy_rng, sample_seed, torch_generator


def test_seeds_are_stable_and_keys_do_not_collide():
    assert (sample_seed(0, 0), sample_seed(1234, 7)) == (6375474603054492659, 4590300641203951083)  # samples.csv of older runs stays valid
    seeds = {derive_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2 ** 63 for s in seeds)  # seed + i offsets would collide
    assert derive_seed(3, 1, 2) != derive_seed(3, 2, 1) != derive_seed(3, 1)
    assert torch.equal(torch.randn(4, generator=torch_generator(5, 1)),
                       torch.randn(4, generator=torch.Generator().manual_seed(sample_seed(5, 1))))
    assert (numpy_rng(3, 1).permutation(50) == np.random.default_rng([3, 1]).permutation(50)).all()
