"""Site data: readers (DICOM, NIfTI, PNG), manifests, preprocessing, phantom studies."""

from medgan_core.data.dicom_io import read_dicom_series, write_dicom_series
from medgan_core.data.manifest import Manifest, ManifestEntry, read_manifest, read_volume, write_manifest
from medgan_core.data.nifti_io import read_nifti, write_nifti
from medgan_core.data.png_io import read_png, write_png
from medgan_core.data.volume import Volume

__all__ = [
    "Manifest",
    "ManifestEntry",
    "Volume",
    "read_dicom_series",
    "read_manifest",
    "read_nifti",
    "read_png",
    "read_volume",
    "write_dicom_series",
    "write_manifest",
    "write_nifti",
    "write_png",
]
