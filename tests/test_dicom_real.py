"""Real DICOM, as PACS exports send it: pydicom's bundled files in every common encoding,
values checked against pydicom's own decoding with the Modality LUT, geometry against the
header, and one clear line for what is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.pixels import apply_modality_lut, get_decoder

from medgan_core.data.dicom_io import read_dicom_series
from medgan_core.data.manifest import read_volume
from medgan_core.data.simulate import DEFAULT_SITES, simulate_site
from medgan_core.data.volume import CANONICAL
from medgan_core.errors import DataError
from tests.dicom_samples import bundled, enhanced_ct, jpeg_lossless_sv1, variant_of

#: MR_small in other transfer syntaxes, all lossless: the same values must come out.
MR_SMALL_ENCODINGS = ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm",
                      "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]


def _reference(name: str) -> np.ndarray:
    """pydicom's decoding with the Modality LUT, as (rows, cols)."""
    ds = pydicom.dcmread(bundled(name))
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)


def _slice(volume) -> np.ndarray:  # type: ignore[no-untyped-def]
    slices = volume.axial_slices()
    assert slices.shape[0] == 1
    return slices[0]


@pytest.mark.parametrize("syntax", [uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1, uid.JPEGLossless,
                                    uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
                                    uid.RLELossless], ids=lambda u: u.name)
def test_every_common_pacs_encoding_has_a_decoder_installed(syntax: uid.UID) -> None:
    assert get_decoder(syntax).is_available, f"no pixel-data plugin for {syntax.name}"


@pytest.mark.parametrize("name", MR_SMALL_ENCODINGS)
def test_lossless_encodings_read_the_same_values(name: str) -> None:
    expected = _reference("MR_small.dcm")
    values = _slice(read_dicom_series(bundled(name)))
    np.testing.assert_array_equal(values, expected)


def test_a_jpeg_lossless_ct_slice_reads_in_hu(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.PixelData = encapsulate([jpeg_lossless_sv1(ds.pixel_array.view(np.uint16))])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEGLosslessSV1
    ds.save_as(tmp_path / "jpeg-lossless.dcm")
    np.testing.assert_array_equal(_slice(read_dicom_series(tmp_path / "jpeg-lossless.dcm")), _reference("CT_small.dcm"))


def test_jpeg_extended_and_lossy_jpeg2000_decode() -> None:
    for name in ("JPGExtended.dcm", "JPEG2000.dcm"):
        assert pydicom.dcmread(bundled(name)).pixel_array.shape == (1024, 256)


def test_deflate_reads_the_same_values(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm")
    np.testing.assert_array_equal(_slice(read_dicom_series(tmp_path / "deflated.dcm")), _reference("MR_small.dcm"))


def test_ct_values_are_the_modality_lut_output_in_hu() -> None:
    volume = read_dicom_series(bundled("CT_small.dcm"))
    np.testing.assert_array_equal(_slice(volume), _reference("CT_small.dcm"))
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    assert float(ds.RescaleIntercept) != 0  # the rescale mattered
    assert volume.modality == "CT" and volume.spacing[:2] == pytest.approx(tuple(map(float, ds.PixelSpacing)))


def test_a_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    """A LUT instead of Rescale Slope/Intercept: each stored value looked up."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    table = (np.arange(4096) * 3 + 7).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = table.tobytes()
    ds.ModalityLUTSequence = Sequence([item])
    ds.save_as(tmp_path / "lut.dcm")
    stored = pydicom.dcmread(bundled("MR_small.dcm")).pixel_array
    np.testing.assert_array_equal(_slice(read_dicom_series(tmp_path / "lut.dcm")), table[stored].astype(np.float32))


def test_monochrome1_is_turned_to_monochrome2(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    bits = int(ds.BitsStored)
    inverted = ((-(2 ** (bits - 1))) + (2 ** (bits - 1) - 1) - ds.pixel_array.astype(np.int32)).astype(np.int16)
    path = variant_of(bundled("MR_small.dcm"), tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1",
                      PixelData=inverted)
    np.testing.assert_array_equal(_slice(read_dicom_series(path)), _reference("MR_small.dcm"))


def test_bits_above_bits_stored_are_ignored(tmp_path: Path) -> None:
    """12 bits stored in 16 allocated, the top 4 bits holding garbage (an overlay, say)."""
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    stored = ds.pixel_array.astype(np.uint16)  # MR_small's values fit in 12 bits
    assert stored.max() < 4096
    path = variant_of(bundled("MR_small.dcm"), tmp_path / "12bit.dcm", BitsStored=12, HighBit=11,
                      PixelRepresentation=0, PixelData=stored | np.uint16(0xA000))
    np.testing.assert_array_equal(_slice(read_dicom_series(path)), stored.astype(np.float32))


@pytest.mark.parametrize("name", ["examples_palette.dcm", "examples_rgb_color.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_colour_images_are_refused_in_one_line(name: str) -> None:
    with pytest.raises(DataError, match="holds colours, not one intensity per pixel; refused") as info:
        read_dicom_series(bundled(name))
    assert "\n" not in str(info.value) and name in str(info.value)


def test_a_file_without_geometry_is_refused() -> None:
    with pytest.raises(DataError, match="lacks ImagePositionPatient"):
        read_dicom_series(bundled("JPGExtended.dcm"))


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_site(DEFAULT_SITES[0], tmp_path_factory.mktemp("site") / "a", n_subjects=3, n_slices=4,
                         size=64, seed=3)


def _ct_folder(site: Path) -> Path:
    from medgan_core.data.manifest import read_manifest

    entry = read_manifest(site).select(modality="CT")[0]
    return site / entry.file


def test_enhanced_multiframe_ct_reads_as_its_classic_series(phantom_site: Path, tmp_path: Path) -> None:
    classic = read_dicom_series(_ct_folder(phantom_site))
    enhanced = read_dicom_series(enhanced_ct(_ct_folder(phantom_site), tmp_path / "enhanced.dcm", shuffle_seed=5))
    np.testing.assert_array_equal(enhanced.data, classic.data)
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-6)
    assert enhanced.data.shape[2] == 4 and enhanced.spacing == pytest.approx(classic.spacing)


def test_dicom_and_nifti_of_one_subject_come_out_in_the_same_orientation(phantom_site: Path) -> None:
    """The phantom's CT is DICOM and its label map NIfTI: the body must lie on the body."""
    from medgan_core.data.manifest import read_manifest

    manifest = read_manifest(phantom_site)
    ct_entry = manifest.select(modality="CT")[0]
    seg_entry = next(e for e in manifest.select(modality="SEG") if e.pair_id == ct_entry.pair_id)
    ct, seg = manifest.load(ct_entry), manifest.load(seg_entry)
    assert ct.orientation == seg.orientation == CANONICAL
    hu, labels = ct.axial_slices(), np.rint(seg.axial_slices()).astype(int)
    body = hu > -500

    def explained(tissues: np.ndarray) -> float:
        """Share of the CT's variance inside the body its tissue labels explain (1: each tissue one value)."""
        values, tissues = hu[body], tissues[body]
        means = np.zeros(tissues.max() + 1)
        for t in np.unique(tissues):
            means[t] = values[tissues == t].mean()
        return 1 - float(((values - means[tissues]) ** 2).mean() / values.var())

    # The phantom is nearly symmetric left to right, so that axis is checked against the header
    # (test_orientation_follows_the_header_not_the_file); anterior/posterior is not symmetric.
    aligned, upside_down = explained(labels), explained(labels[:, ::-1, :])
    assert aligned > 0.7 and aligned > upside_down + 0.2, (aligned, upside_down)


def test_orientation_follows_the_header_not_the_file(phantom_site: Path, tmp_path: Path) -> None:
    """A series stored upside down (rows running anterior, IOP saying so) reads as the original."""
    folder = _ct_folder(phantom_site)
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        rows = int(ds.Rows)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        spacing = float(ds.PixelSpacing[0])
        variant_of(path, flipped / path.name, ImageOrientationPatient=[1, 0, 0, 0, -1, 0],
                   ImagePositionPatient=[x, y + (rows - 1) * spacing, z], PixelData=ds.pixel_array[::-1].copy())
    np.testing.assert_array_equal(read_dicom_series(flipped).data, read_dicom_series(folder).data)


def test_an_oblique_series_is_refused(tmp_path: Path) -> None:
    angle = np.radians(20)
    path = variant_of(bundled("MR_small.dcm"), tmp_path / "oblique.dcm",
                      ImageOrientationPatient=[1, 0, 0, 0, float(np.cos(angle)), float(np.sin(angle))])
    with pytest.raises(DataError, match=r"oblique \(20° from the patient's axes"):
        read_dicom_series(path)


def test_the_manifest_modality_wins_and_a_disagreement_is_an_error() -> None:
    assert read_volume(bundled("MR_small.dcm"), "MR").modality == "MR"
    with pytest.raises(DataError, match="the manifest says CT but the DICOM header says MR"):
        read_volume(bundled("MR_small.dcm"), "CT")


def test_a_folder_of_several_series_needs_the_series_named(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(bundled(name).read_bytes())
    with pytest.raises(DataError, match="mixes 2 DICOM series; name one in the manifest's series column"):
        read_dicom_series(folder)
    mr_uid = str(pydicom.dcmread(bundled("MR_small.dcm")).SeriesInstanceUID)
    np.testing.assert_array_equal(_slice(read_dicom_series(folder, mr_uid)), _reference("MR_small.dcm"))


@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"])
def test_nibabels_bundled_nifti_comes_out_canonical_voxel_for_voxel(name: str) -> None:
    """Real NIfTI files in other orientations: every voxel stays at its world position."""
    import nibabel as nib

    from medgan_core.data.nifti_io import read_nifti

    path = Path(nib.__file__).parent / "tests" / "data" / name
    original = nib.load(path)
    data = np.asarray(original.get_fdata(dtype=np.float32))
    volume = read_nifti(path)
    assert volume.orientation == CANONICAL
    rng = np.random.default_rng(0)
    for voxel in zip(*(rng.integers(0, n, 20) for n in data.shape[:3])):
        world = original.affine @ np.array([*voxel, 1.0])
        i, j, k = np.rint(np.linalg.inv(volume.affine) @ world)[:3].astype(int)
        assert volume.data[i, j, k] == data[voxel]


def test_picking_a_series_from_an_export_folder_ignores_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "MR_small.dcm").write_bytes(bundled("MR_small.dcm").read_bytes())
    (folder / "README.txt").write_text("exported by the PACS")
    uid_ = str(pydicom.dcmread(bundled("MR_small.dcm")).SeriesInstanceUID)
    np.testing.assert_array_equal(_slice(read_dicom_series(folder, uid_)), _reference("MR_small.dcm"))
    with pytest.raises(DataError, match="README.txt: not a DICOM file"):
        read_dicom_series(folder)  # a series folder of its own must hold only that series
