"""The in-memory image every reader returns, in one known orientation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from medgan_core.errors import DataError

#: Voxel axes of every Volume a reader returns: i towards the patient's Left, j towards
#: Posterior, k towards Superior. An axial slice (k) is then, as an array (rows = j,
#: columns = i), the image a console shows: anterior at the top, the patient's right on
#: the left. DICOM's own patient axes (LPS), so a standard axial series needs no flip.
CANONICAL = ("L", "P", "S")
#: A volume whose axes lie further than this from the patient's axes is oblique: refused,
#: since taking its slices as axial would mislabel the anatomy.
MAX_OBLIQUE_DEGREES = 5.0


@dataclass(frozen=True)
class Volume:
    """A 3D image in voxel order (i, j, k) with the affine mapping voxels to RAS+ mm.

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

    @property
    def orientation(self) -> tuple[str, ...]:
        """Where each voxel axis points, e.g. ``("L", "P", "S")``."""
        return tuple(aff2axcodes(self.affine))

    def obliquity(self) -> float:
        """Degrees by which the voxel axes deviate from the patient's axes (the largest)."""
        directions = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        cosines = np.abs(directions).max(axis=0).clip(0, 1)
        return float(np.degrees(np.arccos(cosines)).max())

    def canonical(self) -> "Volume":
        """The same image with its axes flipped and permuted to ``CANONICAL`` (no resampling);
        an oblique volume is refused."""
        tilt = self.obliquity()
        if tilt > MAX_OBLIQUE_DEGREES:
            raise DataError(f"{self.source}: the slices are oblique ({tilt:.0f}° from the patient's axes; at most "
                            f"{MAX_OBLIQUE_DEGREES:g}° is taken as axial); resample the series to axial first")
        transform = ornt_transform(io_orientation(self.affine), axcodes2ornt(CANONICAL))
        data = apply_orientation(self.data, transform)
        affine = self.affine @ inv_ornt_aff(transform, self.data.shape)
        return Volume(np.ascontiguousarray(data), affine, self.modality, self.source)

    def axial_slices(self) -> np.ndarray:
        """Slices along the patient's axial axis as (k, rows, cols), each as a console shows it
        (for a ``canonical`` volume: anterior at the top, the patient's right on the left)."""
        return np.ascontiguousarray(self.data.transpose(2, 1, 0))
