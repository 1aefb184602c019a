"""A site's histogram matching of one CT scanner's body pixels to another's, as a layer.

The classical way to harmonise a second scanner is to match the histogram of its pixels
inside the body to the main scanner's (per site, air left as it is). ``IntensityMap`` is
that mapping as a monotone piecewise-linear curve through quantile pairs, so a generator
can start from it (``task.histogram-start``) and learn only what matching cannot: texture,
noise and edges. Its inverse (the same curve read the other way) starts the reverse
direction of a CycleGAN.

The curve is fitted from the site's own training images; its knots are quantiles of the
site's pixel values, so they are site data: ``medgan_core.sharing`` keeps every
``IntensityMap`` at its site whatever the aggregation settings. It has no parameters
(buffers only), and fitting reads every training image at once, outside DP-SGD's
per-record guarantee, which is why the task refuses it under DP.
"""

from __future__ import annotations

import torch
from torch import nn

#: Quantile pairs fitted inside the body; two more knots keep the air (below the body
#: level) as it is and one reaches the top of the range.
QUANTILES = 253
KNOTS = QUANTILES + 3
#: Pixels read per slice for the fit: every ``FIT_STRIDE``-th row and column.
FIT_STRIDE = 2
#: Slices read for the fit at most (evenly spaced over the site's training slices).
FIT_SLICES = 64


class IntensityMap(nn.Module):
    """``x -> f(x)``, ``f`` monotone and piecewise linear (identity until ``fit``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("source", torch.linspace(-1, 1, KNOTS))
        self.register_buffer("target", torch.linspace(-1, 1, KNOTS))

    def forward(self, images: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if not self.fitted:  # exactly the input, not the identity curve's rounding of it
            return images
        xs, ys = (self.target, self.source) if inverse else (self.source, self.target)
        return piecewise_linear(images, xs, ys)

    @property
    def fitted(self) -> bool:
        return not torch.equal(self.source, self.target)

    @torch.no_grad()
    def fit(self, source: torch.Tensor, target: torch.Tensor, level: float) -> None:
        """Match the pixels of ``source`` images above ``level`` (inside the body) to the
        distribution of ``target``'s; values below ``level`` stay as they are."""
        src, tgt = body_quantiles(source, level), body_quantiles(target, level)
        low = torch.tensor([-1.0, level])
        self.source.copy_(torch.cat([low, src, torch.ones(1)]).clamp(-1, 1))
        self.target.copy_(torch.cat([low, tgt, torch.ones(1)]).clamp(-1, 1))


def body_quantiles(images: torch.Tensor, level: float) -> torch.Tensor:
    """``QUANTILES`` evenly spaced quantiles (0 to 1) of the pixels above ``level`` in a
    strided sample of up to ``FIT_SLICES`` slices of ``images`` (n, 1, H, W)."""
    rows = torch.linspace(0, len(images) - 1, min(FIT_SLICES, len(images))).round().long()
    pixels = torch.as_tensor(images[rows])[..., ::FIT_STRIDE, ::FIT_STRIDE].float().flatten()
    body = pixels[pixels > level].sort().values
    if len(body) < QUANTILES:
        raise ValueError(f"only {len(body)} pixels inside the body to fit a histogram match to; "
                         f"at least {QUANTILES} are needed")
    at = torch.linspace(0, len(body) - 1, QUANTILES).round().long()
    return body[at]


def piecewise_linear(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The curve through ``(xs, ys)`` (``xs`` non-decreasing) at ``x``, extended linearly
    beyond its ends; differentiable in ``x``."""
    index = torch.searchsorted(xs, x.detach().contiguous(), right=True).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    return y0 + (x - x0) / (x1 - x0).clamp_min(1e-6) * (y1 - y0)
