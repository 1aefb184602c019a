"""Turn volumes into network-ready 2D slices in [-1, 1].

Two geometries: a whole slice resized to ``image-size`` (synthesis, and the tasks not yet
moved to clinical geometry), or the slice resampled to a physical pixel size in mm
(``resample_slices``: image-to-image tasks at clinical resolution, trained on patches).
Two CT intensity scales: the soft-tissue window (what synthesis models), or the whole
CT range ``CT_FULL_RANGE`` (image-to-image models read and write air to bone; the
window is then only a display and a metric).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from medgan_core.data.volume import Volume

T = TypeVar("T", torch.Tensor, np.ndarray)


#: The whole range of CT values (12-bit stored values from -1024 HU): what an image-to-image
#: model on CT reads and writes, linearly mapped to [-1, 1], nothing clipped inside it.
CT_FULL_RANGE = (-1024.0, 3071.0)


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


def resample_slices(
    slices: np.ndarray | torch.Tensor, spacing: tuple[float, float], target: float, mode: str = "bilinear"
) -> torch.Tensor:
    """(n, rows, cols) at ``spacing`` (row, column pixel size in mm) -> (n, 1, R, C) at
    ``target`` mm (0: unchanged), keeping the field of view (R = rows · row mm / target).

    Anti-aliased (torch's ``antialias``) when the grid gets coarser, ``mode`` ("bilinear",
    or "bicubic" for a super-resolution input) when it gets finer. torch's interpolation
    rather than MONAI's ``Spacing``: a 2D in-plane resample of slices whose affine the
    caller already handles, with anti-aliasing, is one call here."""
    tensor = torch.as_tensor(np.ascontiguousarray(slices) if isinstance(slices, np.ndarray) else slices)
    tensor = tensor.float()[:, None]
    if target <= 0:
        return tensor
    shape = tuple(max(1, round(n * s / target)) for n, s in zip(tensor.shape[-2:], spacing))
    return resample_to(tensor, shape, mode)  # type: ignore[arg-type]


def resample_to(images: torch.Tensor, shape: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(n, 1, H, W) -> (n, 1, *shape) over the same field of view (anti-aliased when shrinking)."""
    if tuple(images.shape[-2:]) == tuple(shape):
        return images
    shrinking = shape[0] < images.shape[-2] or shape[1] < images.shape[-1]
    return F.interpolate(images, size=shape, mode=mode, align_corners=False, antialias=shrinking)


def normalise_values(slices: np.ndarray, modality: str, ct_range: tuple[float, float]) -> np.ndarray:
    """CT: ``ct_range`` (a window, or ``CT_FULL_RANGE``) to [-1, 1]; MR: the percentile scale."""
    return window_ct(slices, *ct_range) if modality == "CT" else normalise_mr(slices)


def volume_to_slices(
    volume: Volume, size: int, window: tuple[float, float], spacing: float = 0.0
) -> torch.Tensor:
    """All axial slices of a volume, intensity-normalised for its modality, as (k, 1, size,
    size): the whole slice resized (``spacing`` 0), or resampled to ``spacing`` mm and the
    central ``size × spacing`` mm of it (padded with air where the scan is smaller)."""
    normalised = normalise_values(volume.axial_slices(), volume.modality, window)
    if spacing <= 0:
        return resize_slices(normalised, size)
    col_mm, row_mm, _ = volume.spacing
    return centre_square(resample_slices(normalised, (row_mm, col_mm), spacing), size)


def centre_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size``×``size`` of (n, 1, H, W), padded with -1 (air) where smaller."""
    rows, cols = images.shape[-2:]
    pad_r, pad_c = max(0, size - rows), max(0, size - cols)
    if pad_r or pad_c:
        images = F.pad(images, (pad_c // 2, pad_c - pad_c // 2, pad_r // 2, pad_r - pad_r // 2), value=-1.0)
        rows, cols = images.shape[-2:]
    top, left = (rows - size) // 2, (cols - size) // 2
    return images[..., top : top + size, left : left + size].contiguous()


def to_hu(images: T, low: float, high: float) -> T:
    """Inverse of ``window_ct`` inside the window: [-1, 1] -> HU (a tensor or an array)."""
    return (images + 1.0) / 2.0 * (high - low) + low
