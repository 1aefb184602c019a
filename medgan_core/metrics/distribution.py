"""Distances between a set of generated images and a set of real images.

No pretrained network is needed (hospitals are offline and Inception weights are not
ours to download): the sliced Wasserstein distance compares multi-scale local patch
distributions (Laplacian pyramid, 7x7 patches, as used to evaluate progressive GANs),
and the intensity distance compares the two histograms of pixel values.
Both are 0 for identical distributions and grow as the generator drifts from the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH = 7


def _laplacian_pyramid(images: torch.Tensor, min_size: int = 16) -> list[torch.Tensor]:
    levels = []
    current = images
    while current.shape[-1] >= min_size:
        smaller = F.avg_pool2d(current, 2)
        up = F.interpolate(smaller, size=current.shape[-2:], mode="bilinear", align_corners=False)
        levels.append(current - up if smaller.shape[-1] >= min_size else current)
        current = smaller
    return levels


def _patches(level: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = level.shape
    ys = torch.randint(0, h - PATCH + 1, (n, per_image), generator=generator)
    xs = torch.randint(0, w - PATCH + 1, (n, per_image), generator=generator)
    offsets = torch.arange(PATCH)
    rows = (ys[..., None] + offsets)[..., :, None].expand(n, per_image, PATCH, PATCH)
    cols = (xs[..., None] + offsets)[..., None, :].expand(n, per_image, PATCH, PATCH)
    batch = torch.arange(n)[:, None, None, None].expand_as(rows)
    out = level[:, 0][batch, rows, cols]  # (n, per_image, PATCH, PATCH)
    return out.reshape(n * per_image, PATCH * PATCH)


def sliced_wasserstein(
    fake: torch.Tensor,
    real: torch.Tensor,
    *,
    patches_per_image: int = 64,
    projections: int = 256,
    seed: int = 0,
) -> float:
    """Mean over pyramid levels of the sliced Wasserstein-1 distance between patch sets.

    Patches are standardised with the real set's statistics, so intensity shifts of the
    generator count as distance.
    """
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"image shapes differ: fake {tuple(fake.shape)}, real {tuple(real.shape)}")
    generator = torch.Generator().manual_seed(seed)
    fake, real = fake.detach().float().cpu(), real.detach().float().cpu()
    distances = []
    for fake_level, real_level in zip(_laplacian_pyramid(fake), _laplacian_pyramid(real)):
        a = _patches(fake_level, patches_per_image, generator)
        b = _patches(real_level, patches_per_image, generator)
        mean, std = b.mean(0, keepdim=True), b.std(0, keepdim=True) + 1e-6
        a, b = (a - mean) / std, (b - mean) / std
        directions = torch.randn(a.shape[1], projections, generator=generator)
        directions /= directions.norm(dim=0, keepdim=True)
        count = min(a.shape[0], b.shape[0])
        pa = torch.sort(_subsample(a, count, generator) @ directions, dim=0).values
        pb = torch.sort(_subsample(b, count, generator) @ directions, dim=0).values
        distances.append(float((pa - pb).abs().mean()))
    return float(sum(distances) / len(distances))


def intensity_distance(fake: torch.Tensor, real: torch.Tensor, quantiles: int = 512) -> float:
    """Wasserstein-1 distance between the pixel-value distributions (image units)."""
    q = torch.linspace(0, 1, quantiles)
    return float((torch.quantile(fake.detach().float().flatten(), q) - torch.quantile(real.detach().float().flatten(), q)).abs().mean())


def _subsample(x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    if x.shape[0] == count:
        return x
    return x[torch.randperm(x.shape[0], generator=generator)[:count]]
