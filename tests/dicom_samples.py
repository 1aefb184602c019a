"""DICOM test inputs: pydicom's bundled files, and objects built from them or from the phantom."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

PYDICOM_FILES = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def bundled(name: str) -> Path:
    return PYDICOM_FILES / name


def enhanced_ct(classic_folder: Path, path: Path, shuffle_seed: int = 0) -> Path:
    """The classic series in ``classic_folder`` as one Enhanced CT object: pixel data in one
    multi-frame file, geometry per frame (frames in shuffled order), orientation, spacing and
    rescale in the shared functional groups."""
    slices = [pydicom.dcmread(p) for p in sorted(classic_folder.iterdir())]
    order = np.random.default_rng(shuffle_seed).permutation(len(slices))
    first = slices[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_CT, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, generate_uid()
    ds.Modality, ds.PatientID = "CT", first.PatientID
    ds.Rows, ds.Columns, ds.NumberOfFrames = first.Rows, first.Columns, len(slices)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = first.RescaleSlope, \
        first.RescaleIntercept, "HU"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for index in order:
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = slices[index].ImagePositionPatient
        group.PlanePositionSequence = Sequence([position])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(slices[i].PixelData for i in order)
    ds.save_as(path, enforce_file_format=True)
    return path


def variant_of(source: Path, path: Path, **changes: object) -> Path:
    """A copy of a DICOM file with some attributes changed (PixelData given as an array is stored)."""
    ds = pydicom.dcmread(source)
    for key, value in changes.items():
        if key == "PixelData" and isinstance(value, np.ndarray):
            value = value.tobytes()
        setattr(ds, key, value)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(path)
    return path
