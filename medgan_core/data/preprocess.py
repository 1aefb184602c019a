"""Turn volumes into network-ready 2D slices in [-1, 1]."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from medgan_core.data.volume import Volume

T = TypeVar("T", torch.Tensor, np.ndarray)


def window_ct(slices_hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map a HU window to [-1, 1], clipping outside it (what a radiologist would look at)."""
    return (np.clip((slices_hu - low) / (high - low), 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def normalise_mr(slices: np.ndarray) -> np.ndarray:
    """Scale MR intensities by the volume's 99.5th percentile: scanner gain differs per site."""
    top = float(np.percentile(slices, 99.5))
    scaled = slices / top if top > 0 else slices
    return (np.clip(scaled, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def resize_slices(slices: np.ndarray, size: int) -> torch.Tensor:
    """(n, rows, cols) -> (n, 1, size, size) by area averaging (anti-aliased downsampling)."""
    tensor = torch.from_numpy(np.ascontiguousarray(slices))[:, None]
    if tensor.shape[-2:] == (size, size):
        return tensor
    mode = "area" if tensor.shape[-1] >= size and tensor.shape[-2] >= size else "bilinear"
    return F.interpolate(tensor, size=(size, size), mode=mode)


def volume_to_slices(volume: Volume, size: int, window: tuple[float, float]) -> torch.Tensor:
    """All axial slices of a volume, intensity-normalised for its modality and resized."""
    slices = volume.axial_slices()
    if volume.modality == "CT":
        normalised = window_ct(slices, *window)
    else:
        normalised = normalise_mr(slices)
    return resize_slices(normalised, size)


def to_hu(images: T, low: float, high: float) -> T:
    """Inverse of ``window_ct`` inside the window: [-1, 1] -> HU (a tensor or an array)."""
    return (images + 1.0) / 2.0 * (high - low) + low
