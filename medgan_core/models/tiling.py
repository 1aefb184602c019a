"""Whole slices through a network trained on patches: overlapping tiles, blended.

A model trained on 64×64 patches of 0.78 mm pixels is applied to a 512×512 slice tile by
tile, at the training patch size (GroupNorm's statistics then match training), with
tiles overlapping and blended by a Gaussian weight so their seams do not show. MONAI's
``sliding_window_inference`` does exactly this and is well kept; it is imported when
first needed, as it costs about two seconds to import.
"""

from __future__ import annotations

from typing import Callable

import torch

#: Share of a tile that overlaps its neighbour (MONAI's ``overlap``).
TILE_OVERLAP = 0.25


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    tile: int,
    batch: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``fn`` on (n, C, H, W) ``images`` of any size, returning (n, C', H, W) on the CPU.

    Images of exactly ``tile``×``tile`` go through ``fn`` in batches of ``batch``; any
    other size is tiled (smaller ones padded by repeating their border), ``batch`` tiles
    at a time on ``device``."""
    if tuple(images.shape[-2:]) == (tile, tile):
        return torch.cat([fn(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)])
    from monai.inferers import sliding_window_inference  # noqa: PLC0415 - a slow import, needed only here

    out = sliding_window_inference(
        images, roi_size=(tile, tile), sw_batch_size=batch, predictor=fn, overlap=TILE_OVERLAP,
        mode="gaussian", padding_mode="replicate", sw_device=torch.device(device), device=torch.device("cpu"),
        progress=False,
    )
    assert isinstance(out, torch.Tensor)
    return out
