"""DCGAN generator and discriminator, Opacus-compatible.

GroupNorm replaces BatchNorm (no running statistics, per-sample gradients stay
per-sample) and no activation is in-place, so Opacus can wrap either network.

``skips``: the multi-scale form for larger images (MSG-GAN, Karnewar & Wang 2020, in
StyleGAN2's skip form, Karras et al. 2020). The generator draws an image at every
resolution from 8×8 up and sums them, each upsampled, so its coarse layers get a gradient
from the image directly instead of only through every finer layer; the discriminator
reads the image average-pooled to every resolution it works at, so coarse anatomy is
judged at the depth where it fits the receptive field. Both still take and give one
tensor, and their extra layers are 1×1 convolutions, which Opacus handles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    return min(8, channels)


class DCGANGenerator(nn.Module):
    """z (n, z_dim) -> image (n, channels, size, size) in [-1, 1]."""

    def __init__(self, z_dim: int = 64, image_size: int = 64, width: int = 32, channels: int = 1,
                 skips: bool = False) -> None:
        super().__init__()
        self.z_dim = z_dim
        n_up = int(math.log2(image_size)) - 3  # 4x4 -> size/2 by doubling, last layer doubles to size
        self.n_up = n_up
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
        # one image per resolution 8 .. size/2 (1×1), summed with the last layer's (``skips``)
        self.to_image = nn.ModuleList(nn.Conv2d(top // 2 ** (k + 1), channels, 1) for k in range(n_up)) \
            if skips else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.to_image is None:
            return self.net(z[:, :, None, None])
        h = self.net[:3](z[:, :, None, None])  # 4×4
        image: torch.Tensor | None = None
        for k, to_image in enumerate(self.to_image):
            h = self.net[3 + 3 * k : 6 + 3 * k](h)
            image = to_image(h) if image is None else _up(image) + to_image(h)
        last = self.net[3 + 3 * self.n_up](h)  # the full-size layer, before its tanh
        return torch.tanh(last if image is None else _up(image) + last)


def _up(image: torch.Tensor) -> torch.Tensor:
    return F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)


class DCGANDiscriminator(nn.Module):
    """image (n, channels, size, size) -> real/fake logit (n,)."""

    def __init__(self, image_size: int = 64, width: int = 32, channels: int = 1, skips: bool = False) -> None:
        super().__init__()
        n_down = int(math.log2(image_size)) - 3
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        # the image pooled to each block's input resolution, projected to its channels (``skips``)
        self.from_image = nn.ModuleList(nn.Conv2d(channels, width * 2**k, 1) for k in range(n_down)) \
            if skips else None
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
        if self.from_image is None:
            return self.net(images).flatten()
        h, pooled = self.net[:2](images), images
        for k, from_image in enumerate(self.from_image):
            pooled = F.avg_pool2d(pooled, 2)
            h = self.net[2 + 3 * k : 5 + 3 * k](h + from_image(pooled))
        return self.net[-1](h).flatten()


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

    def __init__(self, z_dim: int, cond_dim: int, image_size: int = 64, width: int = 32, skips: bool = False) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.net = DCGANGenerator(z_dim + cond_dim, image_size, width, skips=skips)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, y], dim=1))


class ConditionalDiscriminator(nn.Module):
    """(image, y) -> logit: y enters as constant extra image channels, so every layer can
    check the image against its condition."""

    def __init__(self, cond_dim: int, image_size: int = 64, width: int = 32, skips: bool = False) -> None:
        super().__init__()
        self.net = DCGANDiscriminator(image_size, width, channels=1 + cond_dim, skips=skips)

    def forward(self, images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        planes = y[:, :, None, None].expand(-1, -1, *images.shape[-2:])
        return self.net(torch.cat([images, planes], dim=1))
