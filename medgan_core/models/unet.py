"""Image-to-image networks: a small residual U-Net generator and a conditional PatchGAN.

Fully convolutional (any input size divisible by 4 works, e.g. 512×512 clinical CT),
GroupNorm only, upsampling by nearest-neighbour + convolution rather than transposed
convolutions, no in-place ops: all Opacus-compatible.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(min(8, c_out), c_out), nn.LeakyReLU(0.2)
    )


class ResidualUNet(nn.Module):
    """x -> x + r(x): learns the correction (noise, artefact) rather than the whole image."""

    def __init__(self, width: int = 16, channels: int = 1) -> None:
        super().__init__()
        self.enc1 = _block(channels, width)
        self.enc2 = _block(width, 2 * width, stride=2)
        self.enc3 = _block(2 * width, 4 * width, stride=2)
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _block(4 * width, 2 * width))
        self.dec2 = _block(4 * width, 2 * width)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _block(2 * width, width))
        self.dec1 = _block(2 * width, width)
        self.out = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(self.out.weight)  # start as the identity: output = input
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return x + self.out(d1)


class PatchDiscriminator(nn.Module):
    """(input, candidate) -> one real/fake logit per sample (mean over 70×70-style patches)."""

    def __init__(self, width: int = 16, channels: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False),
            nn.GroupNorm(min(8, 2 * width), 2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, condition: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([condition, candidate], dim=1)).mean(dim=(1, 2, 3))
