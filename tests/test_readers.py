"""Readers: round trips of files the tests write, and clear errors for broken ones."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medgan_core.data import (
    ManifestEntry,
    read_dicom_series,
    read_manifest,
    read_nifti,
    read_png,
    read_volume,
    write_dicom_series,
    write_manifest,
    write_nifti,
    write_png,
)
from medgan_core.errors import DataError


def _ramp_volume() -> np.ndarray:
    """(k, rows, cols) HU volume whose slices are distinguishable: slice k has mean 100 k."""
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1500, size=(5, 12, 10)).astype(np.float32)
    vol += (np.arange(5) * 100.0)[:, None, None]
    return np.clip(vol, -1024, 3000)


def test_dicom_series_round_trip_orders_by_position_and_applies_rescale(tmp_path: Path) -> None:
    hu = _ramp_volume()
    folder = write_dicom_series(hu, tmp_path / "ct", spacing=(0.7, 0.8, 2.5), patient_id="p1",
                                rescale_intercept=-1024.0, rescale_slope=1.0, seed=3)
    files = sorted(folder.iterdir())
    # File names are shuffled and InstanceNumber runs backwards: only positions give the order.
    positions = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    assert positions != sorted(positions)
    volume = read_dicom_series(folder)
    np.testing.assert_allclose(volume.axial_slices(), np.round(hu), atol=0.5)
    assert volume.modality == "CT"
    assert volume.spacing == pytest.approx((0.7, 0.8, 2.5))
    assert volume.data.shape == (10, 12, 5)  # (i=cols, j=rows, k=slices)


def test_dicom_rescale_slope_and_intercept_give_hounsfield_units(tmp_path: Path) -> None:
    hu = _ramp_volume()
    folder = write_dicom_series(hu, tmp_path / "ct", spacing=(1, 1, 1), patient_id="p",
                                rescale_intercept=-2048.0, rescale_slope=2.0)
    stored = pydicom.dcmread(next(folder.iterdir()))
    assert float(stored.RescaleSlope) == 2.0 and float(stored.RescaleIntercept) == -2048.0
    np.testing.assert_allclose(read_dicom_series(folder).axial_slices(), hu, atol=1.0)


def test_corrupt_dicom_names_the_file(tmp_path: Path) -> None:
    folder = write_dicom_series(_ramp_volume(), tmp_path / "ct", spacing=(1, 1, 1), patient_id="p")
    victim = sorted(folder.iterdir())[2]
    victim.write_bytes(b"this is not a dicom file at all")
    with pytest.raises(DataError, match=victim.name):
        read_dicom_series(folder)


def test_truncated_dicom_pixel_data_names_the_file(tmp_path: Path) -> None:
    folder = write_dicom_series(_ramp_volume(), tmp_path / "ct", spacing=(1, 1, 1), patient_id="p")
    victim = sorted(folder.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(DataError, match=victim.name):
        read_dicom_series(folder)


def test_missing_and_empty_series(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_dicom_series(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no DICOM images"):
        read_dicom_series(tmp_path / "empty")


def test_nifti_comes_out_canonical_with_every_voxel_where_the_file_put_it(tmp_path: Path) -> None:
    data = np.random.default_rng(1).normal(size=(6, 7, 3)).astype(np.float32)
    affine = np.array([[0, -1.2, 0, 10], [0.9, 0, 0, -5], [0, 0, 3.0, 2], [0, 0, 0, 1]])  # i -> A, j -> L
    path = write_nifti(data, affine, tmp_path / "mr.nii.gz")
    volume = read_nifti(path)
    assert volume.orientation == ("L", "P", "S") and volume.data.shape == (7, 6, 3)
    assert volume.spacing == pytest.approx((1.2, 0.9, 3.0))
    for voxel in [(0, 0, 0), (5, 6, 2), (2, 3, 1)]:  # the same world point holds the same value
        world = affine @ np.array([*voxel, 1.0])
        i, j, k = np.rint(np.linalg.inv(volume.affine) @ world)[:3].astype(int)
        assert volume.data[i, j, k] == data[voxel]


def test_truncated_nifti_names_the_file(tmp_path: Path) -> None:
    path = write_nifti(np.ones((20, 20, 20), np.float32), np.eye(4), tmp_path / "mr.nii.gz")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="mr.nii.gz"):
        read_nifti(path)
    garbage = tmp_path / "junk.nii"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="junk.nii"):
        read_nifti(garbage)


def test_png_round_trip_16_bit_and_corrupt_png(tmp_path: Path) -> None:
    pixels = (np.arange(12 * 9).reshape(12, 9) * 500).astype(np.uint16)
    volume = read_png(write_png(pixels, tmp_path / "slice.png"))
    np.testing.assert_array_equal(volume.axial_slices()[0], pixels)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(DataError, match="bad.png"):
        read_png(bad)


def test_read_volume_dispatches_and_rejects_unknown_formats(tmp_path: Path) -> None:
    path = write_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), tmp_path / "a.nii")
    assert read_volume(path, "MR").modality == "MR"
    other = tmp_path / "a.jpg"
    other.write_bytes(b"x")
    with pytest.raises(DataError, match="unknown image format"):
        read_volume(other)


def _manifest(tmp_path: Path, rows: list[ManifestEntry]) -> Path:
    write_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), tmp_path / "a.nii.gz")
    write_nifti(np.ones((2, 2, 2), np.float32), np.eye(4), tmp_path / "b.nii.gz")
    return write_manifest(rows, tmp_path / "manifest.csv")


def test_manifest_reads_entries_and_selects(tmp_path: Path) -> None:
    path = _manifest(tmp_path, [ManifestEntry("a.nii.gz", "s1", "MR", "train", label="normal"),
                                ManifestEntry("b.nii.gz", "s2", "MR", "test")])
    manifest = read_manifest(tmp_path)
    assert [e.subject for e in manifest.select(split="train")] == ["s1"]
    assert manifest.load(manifest.entries[0]).data.shape == (2, 2, 2)
    assert manifest.path == path


def test_manifest_errors_name_line_and_column(tmp_path: Path) -> None:
    _manifest(tmp_path, [ManifestEntry("a.nii.gz", "s1", "MR", "train"), ManifestEntry("gone.nii", "s2", "MR", "test")])
    with pytest.raises(DataError, match=r"line 3: file gone.nii does not exist"):
        read_manifest(tmp_path / "manifest.csv")
    (tmp_path / "m2.csv").write_text("file,subject,split\na.nii.gz,s1,train\n")
    with pytest.raises(DataError, match="missing column"):
        read_manifest(tmp_path / "m2.csv")
    (tmp_path / "m3.csv").write_text("file,subject,modality,split\na.nii.gz,s1,MR,training\n")
    with pytest.raises(DataError, match="line 2: split 'training'"):
        read_manifest(tmp_path / "m3.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")
    _ = nib  # nibabel is the NIfTI backend under test
