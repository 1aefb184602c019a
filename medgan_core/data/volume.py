"""The in-memory image every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Volume:
    """A 3D image in voxel order (i, j, k) with the affine mapping voxels to RAS+ mm.

    ``i`` runs along image columns, ``j`` along rows and ``k`` across slices, the
    convention NIfTI files use; DICOM series are converted to it (LPS -> RAS).
    CT values are Hounsfield units; MR values are scanner intensities.
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str
    source: str

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume data must be 3D, got shape {self.data.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def axial_slices(self) -> np.ndarray:
        """Slices as an array (k, rows, cols), each slice displayed as on a scanner console."""
        return np.ascontiguousarray(self.data.transpose(2, 1, 0))
