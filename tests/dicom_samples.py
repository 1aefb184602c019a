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


def jpeg_lossless_sv1(pixels: np.ndarray) -> bytes:
    """A JPEG Lossless (process 14, selection value 1) codestream of a 16-bit greyscale image:
    none ships with the installed packages and no installed encoder writes one, so the test
    writes its own (ITU T.81 Annex H: left-neighbour prediction, one Huffman table)."""
    rows, cols = pixels.shape
    image = pixels.astype(np.int64) & 0xFFFF
    lengths = [0] * 16
    lengths[4] = 17  # the 17 difference categories 0..16 all get 5-bit codes 00000..10000
    codes = {category: format(category, "05b") for category in range(17)}
    bits: list[str] = []
    for r in range(rows):
        for c in range(cols):
            if r == 0 and c == 0:
                prediction = 1 << 15
            elif r == 0:
                prediction = image[r, c - 1]
            elif c == 0:
                prediction = image[r - 1, c]
            else:
                prediction = image[r, c - 1]
            diff = int((image[r, c] - prediction) % 65536)
            if diff >= 32768:
                diff -= 65536
            category = 0 if diff == 0 else 16 if diff == -32768 else abs(diff).bit_length()
            bits.append(codes[category])
            if 0 < category < 16:
                value = diff if diff > 0 else diff - 1
                bits.append(format(value & ((1 << category) - 1), f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i:i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing
    sof = bytes([0xFF, 0xC3, 0, 11, 16, rows >> 8, rows & 255, cols >> 8, cols & 255, 1, 1, 0x11, 0])
    dht_body = bytes([0x00, *lengths, *range(17)])
    dht = bytes([0xFF, 0xC4, (len(dht_body) + 2) >> 8, (len(dht_body) + 2) & 255]) + dht_body
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])  # predictor 1, point transform 0
    return b"\xff\xd8" + sof + dht + sos + bytes(data) + b"\xff\xd9"
