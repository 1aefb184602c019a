"""A site's own intensity calibration of a generator's output: ``out · a + b``.

Scanners of the same model read differently from hospital to hospital (a calibration
offset and gain): one shared generator cannot learn every hospital's own values, and
settles between them. This layer learns them at each site; with ``[aggregation]
local-calibration`` its two numbers never leave the site (like FedBN's normalisation
layers), so the shared network learns the appearance and each site its own calibration.

A 1×1 depthwise convolution starting as the identity (a = 1, b = 0): Opacus computes its
per-sample gradients natively, so it trains under DP-SGD with the rest of the generator.
"""

from __future__ import annotations

import torch
from torch import nn


class SiteCalibration(nn.Module):
    """Per-channel gain and offset applied to an image, initially the identity."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.map = nn.Conv2d(channels, channels, 1, groups=channels)
        nn.init.ones_(self.map.weight)
        nn.init.zeros_(self.map.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.map(images)

    @property
    def gain_offset(self) -> tuple[float, float]:
        """(a, b) of the first channel, for tests and inspection."""
        return float(self.map.weight.detach().flatten()[0]), float(self.map.bias.detach().flatten()[0])
