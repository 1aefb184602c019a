"""DICOM series: read a folder of slices into a Volume in Hounsfield units, and write one.

Slices are ordered by their position along the slice normal (from ImagePositionPatient
and ImageOrientationPatient), never by file name or InstanceNumber, which scanners and
PACS exports do not keep reliable.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medgan_core.data.volume import Volume
from medgan_core.errors import DataError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def read_dicom_series(folder: str | Path) -> Volume:
    """Read every DICOM file in ``folder`` (one series) into a Volume.

    Values are converted with RescaleSlope/RescaleIntercept (HU for CT).
    Raises DataError naming the file for corrupt, incomplete or mixed series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"DICOM series folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"DICOM series folder {folder} holds no files")

    slices = [_read_slice(path) for path in files]
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds, _ in slices}
    if len(series_uids) > 1:
        raise DataError(f"{folder} mixes {len(series_uids)} DICOM series; put one series per folder")

    first, first_path = slices[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = []
    for ds, path in slices:
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise DataError(
                f"{path}: slice is {ds.Rows}x{ds.Columns} but {first_path.name} is {first.Rows}x{first.Columns}"
            )
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-4):
            raise DataError(f"{path}: ImageOrientationPatient differs from the rest of the series")
        positions.append(float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)))
    order = np.argsort(positions)
    sorted_pos = np.asarray(positions)[order]
    if len(sorted_pos) > 1 and np.any(np.diff(sorted_pos) < 1e-6):
        dup = slices[order[int(np.argmin(np.diff(sorted_pos)))]][1]
        raise DataError(f"{dup}: two slices share one position; the series has duplicates")

    pixels = np.stack([_hounsfield(*slices[i]) for i in order])  # (k, rows, cols)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    if len(sorted_pos) > 1:
        slice_step = float(np.median(np.diff(sorted_pos)))
    else:
        slice_step = float(first.get("SliceThickness", 1.0) or 1.0)
    origin = np.asarray(slices[order[0]][0].ImagePositionPatient, dtype=float)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # i: along a row, i.e. across columns
    affine_lps[:3, 1] = col_dir * row_spacing  # j: down the rows
    affine_lps[:3, 2] = normal * slice_step
    affine_lps[:3, 3] = origin
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    modality = str(first.get("Modality", "OT"))
    return Volume(
        data=pixels.transpose(2, 1, 0).astype(np.float32),
        affine=lps_to_ras @ affine_lps,
        modality=modality,
        source=str(folder),
    )


def _read_slice(path: Path) -> tuple[pydicom.Dataset, Path]:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise DataError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises several types for truncated files
        raise DataError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    missing = [tag for tag in _REQUIRED if tag not in ds]
    if missing:
        raise DataError(f"{path}: DICOM slice lacks {', '.join(missing)}; cannot place it in a volume")
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    return ds, path


def _hounsfield(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    try:
        stored = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise DataError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if stored.shape != (ds.Rows, ds.Columns):
        raise DataError(f"{path}: pixel data has shape {stored.shape}, header says {ds.Rows}x{ds.Columns}")
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    return stored * slope + intercept


def write_dicom_series(
    volume_hu: np.ndarray,
    folder: str | Path,
    *,
    spacing: tuple[float, float, float],
    patient_id: str,
    modality: str = "CT",
    manufacturer: str = "MedGAN-FL phantom",
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write a (k, rows, cols) array as one DICOM series, one file per slice.

    Files are named by a shuffled index so that readers cannot rely on file order.
    Pixel values are stored as uint16 = (value - intercept) / slope.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    n_slices, rows, cols = volume_hu.shape
    names = np.random.default_rng(seed).permutation(n_slices)
    stored_all = np.clip(np.round((volume_hu - rescale_intercept) / rescale_slope), 0, 65535).astype(np.uint16)
    now = datetime.datetime(2026, 1, 1)
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{names[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.Manufacturer = manufacturer
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.SeriesNumber = 1
        ds.InstanceNumber = int(n_slices - k)  # deliberately reversed
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-cols * spacing[0] / 2, -rows * spacing[1] / 2, k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = rescale_intercept
        ds.RescaleSlope = rescale_slope
        ds.PixelData = stored_all[k].tobytes()
        ds.save_as(path, enforce_file_format=True)
    return folder
