"""PatchGAN discriminator (NLayerDiscriminator of pix2pix / taming-transformers, trained from
scratch) and the hinge GAN losses used by the autoencoder's optional adversarial term."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class NLayerDiscriminator(nn.Module):
    """Conv(4x4, stride 2) + LeakyReLU, `n_layers` strided conv-BN-LeakyReLU blocks, then a
    stride-1 block and a 1-channel conv: one real/fake logit per receptive-field patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build_discriminator(tile_size: int, ndf: int = 64) -> NLayerDiscriminator:
    """Fewer layers for small tiles so the patch map stays at least 2x2 (3 layers from 64 px up)."""
    n_layers = 3 if tile_size >= 64 else (2 if tile_size >= 32 else 1)
    return NLayerDiscriminator(3, ndf, n_layers)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
