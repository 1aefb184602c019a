"""MR k-space: undersampled acquisitions as files, sampling masks, and k-space cropping.

An undersampled Cartesian acquisition is stored as a complex64 NIfTI volume in k-space
(voxel order i, j, k like every NIfTI here; ``np.fft`` layout, orthonormal FFT), with
exact zeros on the phase-encoding lines that were not acquired. That keeps the raw data
on disk, readable by nibabel, with the image's affine. (Clinical raw data would come as
ISMRMRD or vendor files; a site converts them once.)
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medgan_core.data.compressed_sensing import tv_reconstruction
from medgan_core.errors import DataError

ACCELERATIONS = (4, 10)  # undersampling factors: 25 % and 10 % of the k-space lines

KSPACE_SCALE = 10.0  # 1 in the network's units: 10x the mean intensity (brightest tissue is 5-9x)


def sampling_mask(columns: int, acceleration: int, rng: np.random.Generator, center_fraction: float) -> np.ndarray:
    """A random Cartesian mask over phase-encoding columns (``np.fft`` order): a fully
    sampled centre of ``center_fraction`` plus random lines, ``columns / acceleration`` in all."""
    shifted = np.zeros(columns, dtype=bool)
    n_center = max(2, int(round(columns * center_fraction)))
    start = (columns - n_center) // 2
    shifted[start : start + n_center] = True
    wanted = max(n_center, int(round(columns / acceleration)))
    others = np.flatnonzero(~shifted)
    shifted[rng.choice(others, size=wanted - n_center, replace=False)] = True
    return np.fft.ifftshift(shifted)


def undersample(slices: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, rows, cols) real images -> their orthonormal k-space with unacquired columns zeroed."""
    kspace = np.fft.fft2(slices, norm="ortho")
    return (kspace * mask[None, None, :]).astype(np.complex64)


def write_kspace(kspace: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write (n, rows, cols) complex k-space as a complex64 NIfTI (voxel order i, j, k)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(kspace.transpose(2, 1, 0)).astype(np.complex64), affine)
    nib.save(image, str(path))
    return path


def read_kspace(path: str | Path) -> np.ndarray:
    """(n, rows, cols) complex64 k-space from a file written by ``write_kspace``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"k-space file {path} does not exist")
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many kinds for a truncated or foreign file
        raise DataError(f"{path}: k-space cannot be read ({exc})") from exc
    if not np.iscomplexobj(data):
        raise DataError(f"{path}: holds {data.dtype} values; k-space must be complex")
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D k-space volume, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: k-space contains NaN or infinite values")
    return np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.complex64)


def acquired_columns(kspace: np.ndarray) -> np.ndarray:
    """The sampling mask of an acquisition: columns with any non-zero sample."""
    return np.any(np.abs(kspace) > 0, axis=(0, 1))


def crop_kspace(images: np.ndarray, size: int | tuple[int, int], centred: bool = False) -> np.ndarray:
    """(n, rows, cols) images -> (n, *size) on a coarser grid over the same field of view by
    keeping the central k-space (exact band-limited resampling; intensities preserved). The
    coarse grid starts at the first fine pixel, or with ``centred`` at the centres of the
    coarser pixels, so both grids' fields coincide (as when a scanner acquires that matrix)."""
    n, rows, cols = images.shape
    out_rows, out_cols = (size, size) if isinstance(size, int) else size
    if out_rows > rows or out_cols > cols:
        raise DataError(f"image size {out_rows}×{out_cols} is larger than the {rows}×{cols} k-space matrix")
    spectrum = np.fft.fft2(images, norm="forward")
    if centred:  # a sub-pixel shift: the first coarse pixel's centre, in fine pixels
        spectrum = (spectrum * np.exp(2j * np.pi * np.fft.fftfreq(rows) * (rows / out_rows - 1) / 2)[:, None]
                    * np.exp(2j * np.pi * np.fft.fftfreq(cols) * (cols / out_cols - 1) / 2)[None, :])
    spectrum = np.fft.fftshift(spectrum, axes=(-2, -1))
    r0, c0 = (rows - out_rows) // 2, (cols - out_cols) // 2
    cropped = np.fft.ifftshift(spectrum[:, r0 : r0 + out_rows, c0 : c0 + out_cols], axes=(-2, -1))
    return np.fft.ifft2(cropped, norm="forward")


def crop_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The columns of a (np.fft-ordered) mask that survive ``crop_kspace`` to ``size``."""
    shifted = np.fft.fftshift(mask)
    start = (len(mask) - size) // 2
    return np.fft.ifftshift(shifted[start : start + size])


def matrix_at(shape: tuple[int, int], pixel_mm: tuple[float, float], spacing: float) -> tuple[int, int]:
    """The (rows, cols) matrix over the same field of view at ``spacing`` mm (0: the
    acquired matrix ``shape``; rows and columns ``pixel_mm`` apart), a multiple of 4 each
    way (the U-Net halves it twice). Cropping k-space can only make pixels coarser: a finer
    spacing than acquired is a DataError."""
    if spacing <= 0:
        return (shape[0] - shape[0] % 4, shape[1] - shape[1] % 4)
    matrix = tuple(max(16, 4 * round(n * mm / spacing / 4)) for n, mm in zip(shape, pixel_mm))
    if matrix[0] > shape[0] or matrix[1] > shape[1]:
        raise DataError(f"task.spacing = {spacing:g} mm is finer than the acquisition's "
                        f"{pixel_mm[0]:g} × {pixel_mm[1]:g} mm pixels; k-space holds no finer detail "
                        "(set task.spacing = 0 for the acquired matrix)")
    return matrix  # type: ignore[return-value]


def reconstruction_pair(
    kspace: np.ndarray, image: np.ndarray, size: int | tuple[int, int], tv_weight: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """One subject's (network input, target) for compressed-sensing reconstruction.

    Both are brought to the matrix ``size`` by cropping k-space (so the measured lines stay exact),
    the coarser pixels centred as a scanner acquiring that matrix centres them,
    scaled so that 1 is ``KSPACE_SCALE`` × the subject's mean intensity (its k-space
    centre, which every protocol samples: known from the measurement alone), and mapped
    to [-1, 1] linearly (no clipping: data consistency needs linearity). Inputs have three
    channels: the zero-filled image's real and imaginary parts, and the sampling mask; with
    a ``tv_weight`` λ > 0 a fourth, the TV compressed-sensing reconstruction at that λ
    (``task.tv-start``: what the model starts from).
    """
    if image.shape != kspace.shape:
        raise DataError(f"k-space of shape {kspace.shape} does not match its image's {image.shape}")
    inputs, top = reconstruction_input(kspace, size, tv_weight)
    target = crop_kspace(image.astype(np.float32), size, centred=True).real
    return inputs, (2 * target / top - 1)[:, None].astype(np.float32)


def reconstruction_input(kspace: np.ndarray, size: int | tuple[int, int],
                         tv_weight: float = 0.0) -> tuple[np.ndarray, float]:
    """The network input of ``reconstruction_pair`` from the measurement alone, and the
    intensity ``top`` that maps the network's [-1, 1] back to image values."""
    zero_filled = crop_kspace(np.fft.ifft2(kspace, norm="ortho"), size, centred=True)  # where the output's affine puts it
    top = KSPACE_SCALE * float(np.mean(zero_filled.real)) or 1.0
    mask = np.broadcast_to(crop_mask(acquired_columns(kspace), zero_filled.shape[-1])[None, :], zero_filled.shape)
    inputs = np.stack([2 * zero_filled.real / top - 1, 2 * zero_filled.imag / top, mask], axis=1).astype(np.float32)
    if tv_weight > 0:
        inputs = np.concatenate([inputs, tv_reconstruction(inputs, tv_weight)], axis=1)
    return inputs, top
