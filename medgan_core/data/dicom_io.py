"""DICOM in: classic series (one file per slice) and enhanced multi-frame objects, as a Volume.

What a PACS sends is decoded through pydicom's pixel-data plugins (pylibjpeg for JPEG,
JPEG-LS via pyjpegls, JPEG 2000 and RLE; deflate and big endian natively). Values are the
Modality LUT's output (``apply_modality_lut``: Rescale Slope/Intercept or a LUT sequence;
Hounsfield units for CT), never a VOI window; MONOCHROME1 is turned to MONOCHROME2 in the
stored values first; colour images are refused. Slices are ordered by their position
along the slice normal, never by file name or InstanceNumber, and the volume comes out in
the canonical orientation (``Volume.canonical``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medgan_core.data.volume import Volume
from medgan_core.errors import DataError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: an index, not an image
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
_CLASSIC_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


@dataclass(frozen=True)
class Frame:
    """One 2D image placed in the patient: position of its first pixel, row and column
    directions (LPS), pixel spacing (between rows, between columns) and values."""

    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    values: np.ndarray
    source: str
    thickness: float = 1.0  # the slice step of a volume of one slice


def read_dicom_series(path: str | Path, series_uid: str = "") -> Volume:
    """A volume from a folder of one series' files, or from one (multi-frame) file.

    A folder holding several series needs ``series_uid`` to pick one. Raises DataError
    naming the file for corrupt, incomplete, colour, mixed or oblique data.
    """
    path = Path(path)
    if path.is_file():
        datasets = [(_read(path), path)]
        if datasets[0][0] is None:
            raise DataError(f"{path} is a DICOMDIR, an index of files; name the series' folder or file instead")
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        # Picking one series from an export folder: other files there (notes, viewers, other
        # formats) are not this series' business. A series folder of its own must hold only it.
        datasets = [(ds, p) for p in files if (ds := _read(p, skip_foreign=bool(series_uid))) is not None]
        if not datasets:
            raise DataError(f"DICOM series folder {path} holds no DICOM images")
    else:
        raise DataError(f"DICOM series {path} does not exist")
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds, _ in datasets})
    if series_uid:
        datasets = [(ds, p) for ds, p in datasets if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not datasets:
            raise DataError(f"{path} holds no DICOM series {series_uid}")
    elif len(uids) > 1:
        raise DataError(f"{path} mixes {len(uids)} DICOM series; name one in the manifest's series column "
                        "('medgan site index' writes it)")
    frames = [frame for ds, p in datasets for frame in frames_of(ds, p)]
    first_ds = datasets[0][0]
    return _stack(frames, str(first_ds.get("Modality", "OT")), str(path)).canonical()


def _read(path: Path, skip_foreign: bool = False) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        if skip_foreign:
            return None  # type: ignore[return-value]
        raise DataError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises several types for truncated files
        raise DataError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    if str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
        return None  # type: ignore[return-value]  # a DICOMDIR beside the images
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')})")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in GREYSCALE or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(f"{path}: a {photometric or 'colour'} image holds colours, not one intensity per pixel; "
                        "refused (CT and MR are MONOCHROME1 or MONOCHROME2)")
    return ds


def frames_of(ds: Dataset, path: Path) -> list[Frame]:
    """The frames of one file: a classic slice, or every frame of an enhanced multi-frame object."""
    try:
        stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise DataError(f"{path}: pixel data ({name}) cannot be decoded ({type(exc).__name__}: {exc})") from exc
    n = int(ds.get("NumberOfFrames", 1) or 1)
    stored = stored.reshape(n, int(ds.Rows), int(ds.Columns))
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":  # minimum shown white: turn to MONOCHROME2
        bits = int(ds.BitsStored)
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.PixelRepresentation) else (0, 2**bits - 1)
        stored = (low + high - stored.astype(np.int64)).astype(stored.dtype)
    if "PerFrameFunctionalGroupsSequence" in ds:
        return [_enhanced_frame(ds, path, i, stored[i]) for i in range(n)]
    if n > 1:
        raise DataError(f"{path}: a multi-frame image without per-frame geometry (functional groups); refused")
    missing = [tag for tag in _CLASSIC_GEOMETRY if tag not in ds]
    if missing:
        raise DataError(f"{path}: DICOM slice lacks {', '.join(missing)}; cannot place it in a volume")
    values = np.asarray(apply_modality_lut(stored[0], ds), dtype=np.float32)
    return [_frame(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, values, str(path),
                   ds.get("SliceThickness"))]


def _enhanced_frame(ds: Dataset, path: Path, index: int, stored: np.ndarray) -> Frame:
    """Frame ``index`` of an enhanced object: geometry and rescale from its per-frame
    functional group, or the shared one."""
    per_frame = ds.PerFrameFunctionalGroupsSequence[index]
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()

    def item(sequence: str) -> Dataset | None:
        for group in (per_frame, shared):
            if sequence in group and len(group[sequence].value):
                return group[sequence].value[0]
        return None

    position, orientation, measures = item("PlanePositionSequence"), item("PlaneOrientationSequence"), \
        item("PixelMeasuresSequence")
    if position is None or orientation is None or measures is None:
        raise DataError(f"{path}: frame {index + 1} lacks its plane position, orientation or pixel spacing")
    values = stored.astype(np.float64)
    transform = item("PixelValueTransformationSequence")
    if transform is not None:
        values = values * float(transform.get("RescaleSlope", 1.0)) + float(transform.get("RescaleIntercept", 0.0))
    return _frame(position.ImagePositionPatient, orientation.ImageOrientationPatient, measures.PixelSpacing,
                  values.astype(np.float32), f"{path} frame {index + 1}", measures.get("SliceThickness"))


def _frame(
    position: object, orientation: object, spacing: object, values: np.ndarray, source: str, thickness: object = None
) -> Frame:
    try:
        pos = np.asarray(position, dtype=float).reshape(3)
        ori = np.asarray(orientation, dtype=float).reshape(6)
        row_spacing, col_spacing = (float(v) for v in spacing)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: malformed position, orientation or pixel spacing ({exc})") from None
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(ori)) and row_spacing > 0 and col_spacing > 0):
        raise DataError(f"{source}: position, orientation or pixel spacing is not a finite positive geometry")
    try:
        step = float(thickness) if thickness not in (None, "") else 1.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        step = 1.0
    return Frame(pos, ori, (row_spacing, col_spacing), values, source, step if step > 0 else 1.0)


def _stack(frames: list[Frame], modality: str, source: str) -> Volume:
    """Frames of one orientation and size, sorted along their normal, as a Volume (LPS -> RAS affine)."""
    first = frames[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    for frame in frames:
        if frame.values.shape != first.values.shape:
            raise DataError(f"{frame.source}: image is {frame.values.shape[0]}x{frame.values.shape[1]} but "
                            f"{first.source} is {first.values.shape[0]}x{first.values.shape[1]}")
        if not np.allclose(frame.orientation, first.orientation, atol=1e-4):
            raise DataError(f"{frame.source}: ImageOrientationPatient differs from the rest of the series")
    positions = np.asarray([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(positions, kind="stable")
    steps = np.diff(positions[order])
    if len(steps) and np.any(steps < 1e-6):
        raise DataError(f"{frames[order[int(np.argmin(steps))]].source}: two slices share one position; "
                        "the series has duplicates")
    if len(steps) and not np.allclose(steps, np.median(steps), rtol=0.1, atol=0.05):
        raise DataError(f"{source}: slices are unevenly spaced ({steps.min():.2f} to {steps.max():.2f} mm; "
                        "missing slices?); a volume needs one slice step")
    values = np.stack([frames[i].values for i in order])  # (k, rows, cols)
    row_spacing, col_spacing = first.spacing
    slice_step = float(np.median(steps)) if len(steps) else first.thickness
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # i: along a row, i.e. across columns
    affine_lps[:3, 1] = col_dir * row_spacing  # j: down the rows
    affine_lps[:3, 2] = normal * slice_step
    affine_lps[:3, 3] = frames[order[0]].position
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return Volume(values.transpose(2, 1, 0).astype(np.float32), lps_to_ras @ affine_lps, modality, source)


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
    description: str = "",
    derived: bool = False,
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
        ds.PatientName = patient_id.replace("-", "^")  # PN components, not a retired form
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
        ds.StudyID, ds.AccessionNumber, ds.PositionReferenceIndicator = "1", "", ""
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "ABDOMEN"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if derived else ["ORIGINAL", "PRIMARY", "AXIAL"]
        if description:
            ds.SeriesDescription = description[:64]
        ds.AcquisitionNumber = 1
        if modality == "CT":
            ds.KVP = 120
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
