"""``medgan infer``: apply an image-to-image model to a hospital's scans, in their own format.

A NIfTI input gives a NIfTI output with the input's affine and orientation. A DICOM
series gives a derived series in the same study (new Series and SOP Instance UIDs,
ImageType DERIVED\\SECONDARY, a Series Description naming the model, the source images
referenced, geometry kept, rescale and pixel representation fitted to the output). Each
slice is fed to the model as training fed it (canonical orientation, the task's
intensity mapping and grid) and mapped back to the input's grid. Outputs already written
are skipped on a rerun; a bad input is reported and the rest go on.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medgan_core.data.dicom_io import GREYSCALE, MEDIA_STORAGE_DIRECTORY, frames_of
from medgan_core.data.kspace import matrix_at, read_kspace, reconstruction_input
from medgan_core.data.nifti_io import read_nifti
from medgan_core.data.preprocess import normalise_values, resample_slices, resample_to, resize_slices, to_hu
from medgan_core.data.slice_store import chunks
from medgan_core.data.volume import CANONICAL
from medgan_core.errors import DataError, MedGANError
from medgan_core.model_file import ModelFile
from medgan_core.tasks.paired import EVAL_SLICES, PairedImageTask
from medgan_core.tasks.registry import task_class
from medgan_core.tasks.synthesis import SynthesisTask

#: Type 2 attributes of the Patient, General Study, General Series, Frame of Reference and
#: CT/MR Image modules: present (maybe empty) in every output, whatever the source omitted.
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator", "AcquisitionNumber")
DONE = ".medgan-complete"  # written last into a finished DICOM output folder
APPLIES_TO = ("denoise", "superres", "translate", "cycle", "recon")


@dataclass
class Job:
    """One input: a NIfTI file, or the files of one DICOM series."""

    name: str
    nifti: Path | None = None
    dicom: list[Path] = field(default_factory=list)


@dataclass
class InferSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class Applier:
    """The model and the mapping between a scan's values and the model's [-1, 1] grid."""

    def __init__(self, model: ModelFile, device: torch.device | str = "cpu") -> None:
        if model.task.name not in APPLIES_TO:
            raise MedGANError(f"medgan infer applies {', '.join(APPLIES_TO)} models; this one is {model.task.name!r}"
                              + (" (use 'medgan synth')" if issubclass(task_class(model.task.name), SynthesisTask) else ""))
        self.model = model
        self.task = model.build(device)
        assert isinstance(self.task, PairedImageTask)
        if unready := self.task.unready_words():
            raise MedGANError(unready)
        self.scale = int(getattr(model.task.params, "scale", 1)) if model.task.name == "superres" else 1
        self.output_modality = model.task.modality
        self.input_modality = ("MR" if model.task.modality == "CT" else "CT") if model.task.name == "translate" \
            else model.task.modality

    def apply_kspace(self, kspace: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
        """(n, rows, cols) undersampled k-space whose image pixels are ``pixel_mm`` (between
        rows, between columns) -> reconstructed images (recon) on the matrix of the model's
        ``spacing`` (0: the acquired one) over the same field of view, in the measurement's
        intensities."""
        matrix = matrix_at(kspace.shape[1:], pixel_mm, self.model.task.spacing)
        inputs, top = reconstruction_input(kspace, matrix, float(getattr(self.model.task.params, "tv_start", 0.0)))
        output = self.task.restore(torch.from_numpy(inputs))[:, 0].numpy()
        return ((output + 1) / 2 * top).astype(np.float32)

    def apply(self, slices: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
        """(k, rows, cols) values in canonical display orientation, with pixel ``spacing`` (mm
        between rows, between columns) -> outputs on the input grid (times ``scale`` for
        super-resolution), in the output modality's units."""
        if self.task.clinical:
            return self._apply_clinical(slices, spacing)
        config = self.model.task
        size = config.image_size
        normalised = normalise_values(slices, self.input_modality, (config.window_low, config.window_high))
        output = self.task.restore_series(resize_slices(normalised, size))  # one series: the volume
        rows, cols = slices.shape[1], slices.shape[2]
        output = F.interpolate(output, size=(rows, cols), mode="bilinear", align_corners=False)[:, 0].numpy()
        if self.output_modality == "CT":
            return to_hu(output, config.window_low, config.window_high).astype(np.float32)
        # MR: back to the input's own intensity scale (an MR made from CT: a nominal 0-1000)
        top = (float(np.percentile(slices, 99.5)) or 1.0) if self.input_modality == "MR" else 1000.0
        return ((output + 1) / 2 * top).astype(np.float32)

    def _apply_clinical(self, slices: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
        """At the model's pixel size over the whole CT range, whole slices tile by tile, a few
        slices at a time (with the neighbours a 2.5D model reads beside them); back on the
        input grid (super-resolution: ``scale`` times finer)."""
        model_spacing = self.model.task.spacing
        scale = self.scale
        fine_shape = (slices.shape[1] * scale, slices.shape[2] * scale)
        fine_spacing = (spacing[0] / scale, spacing[1] / scale)
        ct_range = self.task.ct_range
        normalised = normalise_values(slices, self.input_modality, ct_range)  # MR: the volume's own scale, as in training
        context = self.task.context

        def prepared(rows: slice) -> torch.Tensor:
            values = torch.from_numpy(normalised[rows])[:, None]
            if scale > 1:  # the coarse acquisition interpolated bicubically, as the model was trained on
                values = resample_to(values, fine_shape, "bicubic").clamp(-1, 1)
            return resample_slices(values[:, 0], fine_spacing, model_spacing)

        outputs = []
        for part in chunks(len(slices), EVAL_SLICES):
            halo = slice(max(0, part.start - context), min(len(slices), part.stop + context))  # the part's neighbours
            model_input = self.task.with_context(prepared(halo), torch.tensor([halo.stop - halo.start]),
                                                 torch.arange(part.start - halo.start, part.stop - halo.start))
            restored = resample_to(self.task.restore(model_input), fine_shape)[:, 0].numpy()
            if self.output_modality == "CT":
                outputs.append(to_hu(restored, *ct_range))
            else:  # an MR made from CT: a nominal 0-1000
                outputs.append((restored + 1) / 2 * 1000.0)
        return np.concatenate(outputs).astype(np.float32)


def find_jobs(source: Path, exclude: Path | None = None) -> list[Job]:
    """NIfTI files and DICOM series (grouped by SeriesInstanceUID and folder) under ``source``,
    leaving out ``exclude`` (the output folder, when it lies inside the input)."""
    if not source.exists():
        raise MedGANError(f"input {source} does not exist")
    skip = exclude.resolve() if exclude is not None else None
    files = [source] if source.is_file() else sorted(
        p for p in source.rglob("*") if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(source).parts)  # hidden below the input only
        and not (skip is not None and (skip == p.resolve().parent or skip in p.resolve().parents)))
    jobs: dict[str, Job] = {}
    for path in files:
        if path.name.lower().endswith((".nii", ".nii.gz")):  # named by its place, so two scan.nii never collide
            name = path.relative_to(source).as_posix().replace("/", "_") if source.is_dir() else path.name
            jobs[str(path)] = Job(name, nifti=path)
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            continue
        uid = str(ds.get("SeriesInstanceUID", path))
        key = f"{path.parent}|{uid}"
        inside = path.parent.relative_to(source).as_posix() if source.is_dir() else ""
        name = inside.replace("/", "_") if inside not in ("", ".") else (source.name if source.is_dir() else path.stem)
        jobs.setdefault(key, Job(f"{name}-{uid[-12:]}")).dicom.append(path)
    if not jobs:
        raise MedGANError(f"{source} holds no NIfTI file or DICOM image")
    return list(jobs.values())


def infer(model: ModelFile, source: Path, output: Path, *, device: torch.device | str = "cpu",
          progress: Callable[[str, int, int], None] | None = None) -> InferSummary:
    applier = Applier(model, device)
    output.mkdir(parents=True, exist_ok=True)
    summary = InferSummary()
    jobs = find_jobs(source, exclude=output)
    for done, job in enumerate(jobs, start=1):
        target = output / job.name
        if progress:
            progress(job.name, done, len(jobs))
        if (target.is_file() if job.nifti else (target / DONE).exists()):
            summary.skipped.append(target)
            continue
        try:
            (_nifti if job.nifti else _dicom)(applier, job, target)
        except MedGANError as exc:
            summary.failed.append((job.name, " ".join(str(exc).split())))
            continue
        summary.written.append(target)
    return summary


def _nifti(applier: Applier, job: Job, target: Path) -> None:
    assert job.nifti is not None
    original = nib.load(str(job.nifti))
    if applier.model.task.name == "recon":
        _kspace_nifti(applier, job.nifti, original, target)
        return
    volume = read_nifti(job.nifti, applier.input_modality)  # canonical (L, P, S)
    col_mm, row_mm, _ = volume.spacing
    out = applier.apply(volume.axial_slices(), (row_mm, col_mm)).transpose(2, 1, 0)  # back to (i, j, k)
    scale = applier.scale
    affine = volume.affine.copy()
    if scale > 1:  # finer in-plane grid: voxel centres move by half the old voxel less half the new one
        for axis in (0, 1):
            affine[:3, 3] += affine[:3, axis] * (1 / scale - 1) / 2
            affine[:3, axis] /= scale
    # Back to the input file's own orientation, so the output overlays it voxel for voxel.
    back = ornt_transform(axcodes2ornt(CANONICAL), io_orientation(original.affine))
    data = apply_orientation(out, back)
    affine = affine @ inv_ornt_aff(back, out.shape)
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine, header=original.header.copy())
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(1.0, 0.0)
    partial = target.with_name(target.name + ".partial" + "".join(target.suffixes))
    nib.save(image, str(partial))
    os.replace(partial, target)


def _kspace_nifti(applier: Applier, source: Path, original: nib.Nifti1Image, target: Path) -> None:
    """Undersampled k-space (a complex NIfTI, voxel order i, j, k like its image) -> the
    reconstructed images on the model's grid over the same field of view."""
    kspace = read_kspace(source)  # (n, rows, cols)
    col_mm, row_mm = (float(z) for z in original.header.get_zooms()[:2])
    images = applier.apply_kspace(kspace, (row_mm, col_mm))
    affine = np.asarray(original.affine, dtype=float).copy()
    for axis, count, size in ((0, kspace.shape[2], images.shape[2]), (1, kspace.shape[1], images.shape[1])):
        factor = count / size  # the same field of view on fewer, larger pixels
        affine[:3, 3] += affine[:3, axis] * (factor - 1) / 2
        affine[:3, axis] *= factor
    image = nib.Nifti1Image(np.ascontiguousarray(images.transpose(2, 1, 0)), affine)
    image.header.set_xyzt_units("mm")
    partial = target.with_name(target.name + ".partial" + "".join(target.suffixes))
    nib.save(image, str(partial))
    os.replace(partial, target)


def _dicom(applier: Applier, job: Job, target: Path) -> None:
    """A derived series: each source slice, turned to the canonical display orientation,
    through the model, turned back, and written as a new instance referencing its source."""
    if applier.model.task.name == "recon":
        raise DataError(f"{job.dicom[0]}: a recon model reads undersampled k-space (a complex NIfTI), not DICOM images")
    sources = []
    for path in job.dicom:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 - a truncated file: this series fails, others go on
            raise DataError(f"{path}: unreadable DICOM file ({type(exc).__name__})") from exc
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            if len(job.dicom) > 1:
                raise DataError(f"{path}: a multi-frame object shares its series with other files; infer it alone")
            _enhanced(applier, ds, path, target)
            return
        if str(ds.get("PhotometricInterpretation", "")) not in GREYSCALE or "ImageOrientationPatient" not in ds:
            raise DataError(f"{path}: not a greyscale image with a patient geometry")
        modality = str(ds.get("Modality", ""))
        if modality != applier.input_modality:
            raise DataError(f"{path}: a {modality} image; this model reads {applier.input_modality}")
        sources.append(ds)
    flips = [_display_flips(ds) for ds in sources]
    values = np.stack([_displayed(np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32), f)
                       for ds, f in zip(sources, flips)])
    outputs = applier.apply(values, _pixel_spacing(sources[0]))
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    series_uid = generate_uid()
    description = _description(applier)
    for number, (ds, flip, out) in enumerate(zip(sources, flips, outputs), start=1):
        derived = _derived(ds, _displayed(out, flip), series_uid, description, applier.scale)
        derived.save_as(partial / f"IM{number:05d}.dcm", enforce_file_format=True)
    (partial / DONE).write_text(f"{len(sources)} slices from {job.name}\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)


def _enhanced(applier: Applier, ds: Dataset, path: Path, target: Path) -> None:
    """An enhanced multi-frame object in, a derived enhanced object out: every frame through
    the model in the display orientation, written back into one file with the same
    functional groups, a fitted shared rescale, and new UIDs."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise DataError(f"{path}: a multi-frame image without per-frame geometry; refused")
    modality = str(ds.get("Modality", ""))
    if modality != applier.input_modality:
        raise DataError(f"{path}: a {modality} image; this model reads {applier.input_modality}")
    frames = frames_of(ds, path)
    flips = [_flips(frame.orientation, frame.source) for frame in frames]
    outputs = applier.apply(np.stack([_displayed(f.values, flip) for f, flip in zip(frames, flips)]), frames[0].spacing)
    stored_frames = [_displayed(out, flip) for out, flip in zip(outputs, flips)]
    derived = _derived_copy(ds, generate_uid(), _description(applier),
                            list(ds.get("ImageType") or ["", "", "VOLUME", "NONE"])[2:4])
    values = np.stack(stored_frames)
    stored, intercept = _stored(values, path)
    for group in derived.PerFrameFunctionalGroupsSequence:  # one shared rescale for every frame
        if "PixelValueTransformationSequence" in group:
            del group.PixelValueTransformationSequence
    if "SharedFunctionalGroupsSequence" not in derived:
        derived.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 1.0, intercept
    transform.RescaleType = "HU" if applier.output_modality == "CT" else "US"
    derived.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = Sequence([transform])
    if applier.scale > 1:
        _rescale_enhanced_grid(derived, applier.scale)
    derived.Rows, derived.Columns = values.shape[1:]
    _set_pixels(derived, stored)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    derived.save_as(partial / "enhanced.dcm", enforce_file_format=True)
    (partial / DONE).write_text(f"{len(frames)} frames from {path.name}\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)


def _rescale_enhanced_grid(ds: Dataset, scale: int) -> None:
    """A super-resolved enhanced object: finer pixel spacing, each frame's first pixel moved
    half an old pixel less half a new one along the rows and columns."""
    groups = [*ds.PerFrameFunctionalGroupsSequence, *ds.get("SharedFunctionalGroupsSequence", [])]
    for group in groups:
        if "PixelMeasuresSequence" in group:
            measures = group.PixelMeasuresSequence[0]
            measures.PixelSpacing = [float(v) / scale for v in measures.PixelSpacing]
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    for group in ds.PerFrameFunctionalGroupsSequence:
        orientation = (group if "PlaneOrientationSequence" in group else shared).PlaneOrientationSequence[0]
        measures = (group if "PixelMeasuresSequence" in group else shared).PixelMeasuresSequence[0]
        direction = np.asarray(orientation.ImageOrientationPatient, dtype=float)
        row_spacing, col_spacing = (float(v) * scale for v in measures.PixelSpacing)  # the old spacing
        position = group.PlanePositionSequence[0]
        shift = (direction[:3] * col_spacing + direction[3:] * row_spacing) * (1 / scale - 1) / 2
        position.ImagePositionPatient = [float(v) for v in np.asarray(position.ImagePositionPatient, float) + shift]


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(mm between rows, between columns) of a classic image; display flips keep them."""
    try:
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{ds.filename}: no usable PixelSpacing; the model works in mm") from None
    if not (row_mm > 0 and col_mm > 0):
        raise DataError(f"{ds.filename}: PixelSpacing {list(ds.PixelSpacing)} is not positive")
    return row_mm, col_mm


def _description(applier: Applier) -> str:
    provenance = applier.model.provenance
    return (f"MedGAN-FL {applier.model.task.name} (study {str(provenance.get('study-id', '?'))[:8]}, "
            f"round {provenance.get('round', '?')})")


def _display_flips(ds: Dataset) -> tuple[bool, bool]:
    return _flips(np.asarray(ds.ImageOrientationPatient, dtype=float), str(ds.filename))


def _flips(orientation: np.ndarray, source: str) -> tuple[bool, bool]:
    """(flip rows, flip columns) that turn a stored axial slice into the canonical display
    (rows running to posterior, columns to the patient's left)."""
    row_dir, col_dir = orientation[:3], orientation[3:]
    if abs(row_dir[0]) < 0.9 or abs(col_dir[1]) < 0.9:
        raise DataError(f"{source}: not an axial slice (ImageOrientationPatient {list(orientation)}); "
                        "this model takes axial slices")
    return bool(col_dir[1] < 0), bool(row_dir[0] < 0)


def _displayed(image: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    """Apply (or undo: the flips are their own inverse) the display flips."""
    if flips[0]:
        image = image[::-1]
    if flips[1]:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def _derived_copy(source: Dataset, series_uid: str, description: str, image_type: list[str]) -> Dataset:
    """A copy of ``source`` as a new derived instance of a new series that references it."""
    ds = copy.deepcopy(source)  # Dataset.copy() is shallow: the source's UIDs would change too
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(source.get("SeriesNumber", 0) or 0) + 1000
    ds.SeriesDescription = description[:64]
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type]
    ds.DerivationDescription = f"{description}; values from a generative model, not measured"[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    ds.SourceImageSequence = Sequence([reference])
    return ds


def _stored(values: np.ndarray, source: object) -> tuple[np.ndarray, float]:
    """Unsigned 16-bit stored values and the intercept that maps them back (slope 1)."""
    intercept = float(np.floor(min(values.min(), 0.0)))
    stored = np.rint(values - intercept)
    if stored.max() > 65535:
        raise DataError(f"{source}: output values exceed what 16 bits can store")
    return stored.astype(np.uint16), intercept


def _set_pixels(ds: Dataset, stored: np.ndarray) -> None:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"


def _derived(source: Dataset, values: np.ndarray, series_uid: str, description: str, scale: int) -> Dataset:
    ds = _derived_copy(source, series_uid, description, list(source.get("ImageType") or ["", "", "AXIAL"])[2:3])
    for keyword in TYPE_2:  # empty but present, as the IOD requires, where the source left them out
        if keyword not in ds:
            setattr(ds, keyword, "")
    for tag in ("VOILUTSequence", "ModalityLUTSequence", "WindowCenterWidthExplanation"):
        if tag in ds:
            del ds[tag]
    if scale > 1:
        spacing = [float(v) / scale for v in source.PixelSpacing]
        ds.PixelSpacing = spacing
        ds.Rows, ds.Columns = values.shape
        origin = np.asarray(source.ImagePositionPatient, dtype=float)
        orientation = np.asarray(source.ImageOrientationPatient, dtype=float)
        shift = (orientation[:3] * float(source.PixelSpacing[1]) + orientation[3:] * float(source.PixelSpacing[0])) \
            * (1 / scale - 1) / 2
        ds.ImagePositionPatient = [float(v) for v in origin + shift]
    stored, intercept = _stored(values, source.get("filename", "output"))
    ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
    for tag in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue"):
        if tag in ds:
            del ds[tag]
    _set_pixels(ds, stored)
    return ds
