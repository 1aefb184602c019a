"""NIfTI volumes through nibabel, turned to the canonical orientation by their affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from medgan_core.data.volume import Volume
from medgan_core.errors import DataError


def read_nifti(path: str | Path, modality: str = "MR") -> Volume:
    """Read a .nii/.nii.gz file; 4D files must have a single volume."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"NIfTI file {path} does not exist")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except ImageFileError as exc:
        raise DataError(f"{path}: not a NIfTI image ({exc})") from exc
    except (EOFError, OSError, ValueError, Exception) as exc:  # truncated gzip / data block
        raise DataError(f"{path}: NIfTI data cannot be read, the file may be truncated ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: volume contains NaN or infinite values")
    volume = Volume(data=data, affine=np.asarray(image.affine, dtype=float), modality=modality, source=str(path))
    return volume.canonical()  # the same orientation as DICOM (LPS voxel axes), whatever the file's


def write_nifti(data: np.ndarray, affine: np.ndarray, path: str | Path, dtype: type = np.float32) -> Path:
    """Write a 3D array (i, j, k) with its affine; .nii.gz compresses (label maps: uint8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path
