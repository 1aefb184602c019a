"""PNG grids of generated images: what a researcher looks at to judge a GAN."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medgan_core.fileio import atomic_write_bytes


#: Images up to this side are shown twice as large (thumbnails); clinical slices as they are.
UPSCALE_BELOW = 256
#: Dark pixels around and between a grid's images.
GRID_PAD = 2


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = GRID_PAD,
               upscale: int | None = None) -> np.ndarray:
    """(n, 1, H, W) in [-1, 1] -> one uint8 (rows, cols) mosaic with a dark border."""
    images = images.detach().float().cpu().clamp(-1, 1)
    n, _, h, w = images.shape
    if upscale is None:
        upscale = 2 if max(h, w) < UPSCALE_BELOW else 1
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.uint8)
    pixels = ((images[:, 0].numpy() + 1.0) * 127.5).round().astype(np.uint8)
    for index in range(n):
        r, c = divmod(index, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = pixels[index]
    return np.kron(grid, np.ones((upscale, upscale), dtype=np.uint8)) if upscale > 1 else grid


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(image_grid(images, columns)).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
