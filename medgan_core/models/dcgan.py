"""DCGAN generator and discriminator, Opacus-compatible.

GroupNorm replaces BatchNorm (no running statistics, per-sample gradients stay
per-sample) and no activation is in-place, so Opacus can wrap either network.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _groups(channels: int) -> int:
    return min(8, channels)


class DCGANGenerator(nn.Module):
    """z (n, z_dim) -> image (n, channels, size, size) in [-1, 1]."""

    def __init__(self, z_dim: int = 64, image_size: int = 64, width: int = 32, channels: int = 1) -> None:
        super().__init__()
        self.z_dim = z_dim
        n_up = int(math.log2(image_size)) - 3  # 4x4 -> size/2 by doubling, last layer doubles to size
        top = width * 2**n_up
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, top, 4, 1, 0, bias=False),
            nn.GroupNorm(_groups(top), top),
            nn.ReLU(),
        ]
        channels_in = top
        for _ in range(n_up):
            channels_out = channels_in // 2
            layers += [
                nn.ConvTranspose2d(channels_in, channels_out, 4, 2, 1, bias=False),
                nn.GroupNorm(_groups(channels_out), channels_out),
                nn.ReLU(),
            ]
            channels_in = channels_out
        layers += [nn.ConvTranspose2d(channels_in, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """image (n, channels, size, size) -> real/fake logit (n,)."""

    def __init__(self, image_size: int = 64, width: int = 32, channels: int = 1) -> None:
        super().__init__()
        n_down = int(math.log2(image_size)) - 3
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels_in = width
        for _ in range(n_down):
            channels_out = channels_in * 2
            layers += [
                nn.Conv2d(channels_in, channels_out, 4, 2, 1, bias=False),
                nn.GroupNorm(_groups(channels_out), channels_out),
                nn.LeakyReLU(0.2),
            ]
            channels_in = channels_out
        layers += [nn.Conv2d(channels_in, 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten()


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN paper initialisation: N(0, 0.02) convolutions, N(1, 0.02) norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class ConditionalGenerator(nn.Module):
    """(z, y) -> image: the condition vector y is appended to the latent code (cGAN)."""

    def __init__(self, z_dim: int, cond_dim: int, image_size: int = 64, width: int = 32) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.net = DCGANGenerator(z_dim + cond_dim, image_size, width)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, y], dim=1))


class ConditionalDiscriminator(nn.Module):
    """(image, y) -> logit: y enters as constant extra image channels, so every layer can
    check the image against its condition."""

    def __init__(self, cond_dim: int, image_size: int = 64, width: int = 32) -> None:
        super().__init__()
        self.net = DCGANDiscriminator(image_size, width, channels=1 + cond_dim)

    def forward(self, images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        planes = y[:, :, None, None].expand(-1, -1, *images.shape[-2:])
        return self.net(torch.cat([images, planes], dim=1))
