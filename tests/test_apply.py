"""Apply what a federation trained: `medgan export` and `medgan infer`, NIfTI and DICOM in
their own format, geometry and values checked, reruns skipped, bad inputs reported."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from client.infer import Applier, infer
from medgan.cli import app
from medgan_core.checkpoints import save_checkpoint
from medgan_core.data.dicom_io import read_dicom_series
from medgan_core.data.manifest import read_manifest
from medgan_core.data.nifti_io import read_nifti
from medgan_core.errors import MedGANError
from medgan_core.model_file import load_model
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data
from server.export import export_model
from server.run_folder import RunFolder
from tests.dicom_samples import variant_of

runner = CliRunner()



def _applied(model: object, volume: object) -> np.ndarray:
    """What the model makes of a canonical volume's slices, at its pixel spacing (rows, columns)."""
    col_mm, row_mm, _ = volume.spacing  # type: ignore[attr-defined]
    return Applier(model).apply(volume.axial_slices(), (row_mm, col_mm))  # type: ignore[arg-type]

def _run(tmp_path: Path, study: StudyConfig, data_site: Path | None = None) -> Path:
    """A run folder as a finished study leaves it: config, study id, a round-1 checkpoint, metrics."""
    folder = RunFolder(tmp_path / "run").start(study)
    task = build_task(study.task)
    if data_site is not None:  # a few steps, so the model is not the initial one
        task.train(load_task_data(data_site, study.task), 3, seed=0)
    save_checkpoint(folder.checkpoint(1), task.get_weights(), {"round": 1, "study": study.to_dict()})
    folder.append_metrics({"round": 1, "sites": [{"node": 7, "train": {"epsilon": 1.25}}], "evaluate": {"psnr": 31.0}})
    return folder.root


@pytest.fixture(scope="module")
def denoise_model(tmp_path_factory: pytest.TempPathFactory, tiny_sites: list[Path]) -> Path:
    tmp = tmp_path_factory.mktemp("model")
    study = StudyConfig().replace(task={"name": "denoise", "image_size": 32, "width": 8, "batch_size": 4})
    return export_model(_run(tmp, study, tiny_sites[0]), tmp / "denoise.medgan")


def test_export_bundles_task_and_provenance_and_loads_back(denoise_model: Path) -> None:
    model = load_model(denoise_model)
    assert model.task.name == "denoise" and model.task.image_size == 32
    assert model.provenance["round"] == 1 and model.provenance["privacy"]["epsilon-per-site"] == [1.25]
    assert model.provenance["site-kept-layers"] == "none: every array was shared"
    assert len(model.provenance["study-id"]) == 32 and model.provenance["code-version"]


def test_export_refuses_site_kept_layers_unless_told_where_they_come_from(tmp_path: Path) -> None:
    study = StudyConfig().replace(task={"name": "denoise", "image_size": 16, "width": 8},
                                  aggregation={"local_norm": True})
    run = _run(tmp_path, study)
    with pytest.raises(MedGANError, match="kept .* at its sites .* --site-state STATE_DIR, or --for-new-site"):
        export_model(run, tmp_path / "m.medgan")
    model = load_model(export_model(run, tmp_path / "m.medgan", for_new_site=True))
    assert "initial values" in model.provenance["site-kept-layers"]
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "x.medgan")])
    assert result.exit_code == 2 and "--for-new-site" in result.output


def test_export_says_how_to_apply_the_model_it_wrote(tmp_path: Path) -> None:
    """An image-to-image model is applied with 'medgan infer'; a generator draws images with 'medgan synth'."""
    for name, command in (("denoise", "medgan infer --model"), ("synthesis", "medgan synth --model")):
        run = _run(tmp_path / name, StudyConfig().replace(task={"name": name, "image_size": 16, "width": 8}))
        result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / f"{name}.medgan")])
        assert result.exit_code == 0 and command in " ".join(result.output.split()), result.output


def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    study = StudyConfig().replace(task={"name": "denoise", "image_size": 16, "width": 8})
    checkpoint = RunFolder(_run(tmp_path, study)).checkpoint(1)
    with pytest.raises(MedGANError, match="is not a MedGAN-FL model file"):
        load_model(checkpoint)


def test_older_recon_and_cycle_models_are_refused_and_an_older_denoise_model_still_loads(denoise_model: Path,
                                                                                          tmp_path: Path) -> None:
    """Format 3 changed what a recon model's grid means (the acquired matrix, not the central
    image-size), format 4 what a cycle model reads (clinical geometry, two views); an older
    file of any other task means what it meant."""
    from medgan_core.checkpoints import load_checkpoint

    arrays, meta = load_checkpoint(denoise_model)
    assert meta["format"] == "medgan-model/4"
    for older_format in ("medgan-model/2", "medgan-model/3"):
        older = {**meta, "format": older_format}
        save_checkpoint(tmp_path / "denoise-old.medgan", arrays, older)
        assert load_model(tmp_path / "denoise-old.medgan").task.name == "denoise"
        save_checkpoint(tmp_path / "cycle-old.medgan", arrays, {**older, "task": {**meta["task"], "name": "cycle"}})
        with pytest.raises(MedGANError, match="cycle model made by an older version .*whole CT range"):
            load_model(tmp_path / "cycle-old.medgan")
    save_checkpoint(tmp_path / "recon-2.medgan", arrays, {**meta, "format": "medgan-model/2",
                                                          "task": {**meta["task"], "name": "recon"}})
    with pytest.raises(MedGANError, match="recon model made by an older version"):
        load_model(tmp_path / "recon-2.medgan")
    save_checkpoint(tmp_path / "no-task.medgan", arrays, {**meta, "task": "denoise"})
    with pytest.raises(MedGANError, match="holds no task settings"):
        load_model(tmp_path / "no-task.medgan")


def _ct_series(site: Path) -> Path:
    return site / read_manifest(site).select(modality="CT", split="test")[0].file


def test_nifti_in_nifti_out_with_the_inputs_affine(denoise_model: Path, tiny_sites: list[Path], tmp_path: Path) -> None:
    volume = read_dicom_series(_ct_series(tiny_sites[0]))
    affine = np.array([[0, 0.8, 0, -40], [-0.8, 0, 0, 30], [0, 0, 2.5, 5], [0, 0, 0, 1]])  # rows, columns swapped
    stored = volume.data.transpose(1, 0, 2)[::-1].copy()
    nib.save(nib.Nifti1Image(stored, affine), str(tmp_path / "ct.nii.gz"))
    model = load_model(denoise_model)
    summary = infer(model, tmp_path / "ct.nii.gz", tmp_path / "out")
    assert summary.written == [tmp_path / "out" / "ct.nii.gz"] and not summary.failed
    out = nib.load(str(tmp_path / "out" / "ct.nii.gz"))
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert out.shape == stored.shape
    expected = _applied(model, read_nifti(tmp_path / "ct.nii.gz", "CT"))
    np.testing.assert_allclose(read_nifti(tmp_path / "out" / "ct.nii.gz", "CT").axial_slices(), expected, atol=1e-3)
    again = infer(model, tmp_path / "ct.nii.gz", tmp_path / "out")
    assert again.skipped == [tmp_path / "out" / "ct.nii.gz"] and not again.written


def test_dicom_in_a_derived_dicom_series_out(denoise_model: Path, tiny_sites: list[Path], tmp_path: Path) -> None:
    series = _ct_series(tiny_sites[0])
    model = load_model(denoise_model)
    summary = infer(model, series, tmp_path / "out")
    assert len(summary.written) == 1 and not summary.failed
    folder = summary.written[0]
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in series.iterdir())}
    outputs = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    assert len(outputs) == len(sources)
    assert len({str(ds.SeriesInstanceUID) for ds in outputs}) == 1
    for ds in outputs:
        source = sources[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
        assert ds.StudyInstanceUID == source.StudyInstanceUID and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "MedGAN-FL denoise" in ds.SeriesDescription and "generative model" in ds.DerivationDescription
        assert list(ds.ImagePositionPatient) == list(source.ImagePositionPatient)
        assert list(ds.PixelSpacing) == list(source.PixelSpacing)
    original, derived = read_dicom_series(series), read_dicom_series(folder)
    np.testing.assert_allclose(derived.affine, original.affine)
    expected = _applied(model, original)
    assert np.abs(derived.axial_slices() - expected).max() <= 0.5  # stored to the nearest HU
    # the whole CT range, not a window: air and cortical bone keep their HU (a 240 HU clip was a defect)
    assert derived.axial_slices().min() < -900 and derived.axial_slices().max() > 800
    assert "whole CT range" in model.provenance["trained-on"]
    assert (folder / ".medgan-complete").exists()


def test_a_series_stored_upside_down_comes_out_upside_down(denoise_model: Path, tiny_sites: list[Path],
                                                           tmp_path: Path) -> None:
    """The model sees every slice as a console shows it; the output is stored as the input was."""
    series = _ct_series(tiny_sites[0])
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        y += (int(ds.Rows) - 1) * float(ds.PixelSpacing[0])
        variant_of(path, flipped / path.name, ImageOrientationPatient=[1, 0, 0, 0, -1, 0],
                   ImagePositionPatient=[x, y, z], PixelData=ds.pixel_array[::-1].copy())
    model = load_model(denoise_model)
    straight = read_dicom_series(infer(model, series, tmp_path / "a").written[0])
    upside_down = read_dicom_series(infer(model, flipped, tmp_path / "b").written[0])
    np.testing.assert_array_equal(upside_down.data, straight.data)  # the same anatomy, voxel for voxel


def test_a_bad_input_is_reported_and_the_rest_go_on(denoise_model: Path, tiny_sites: list[Path],
                                                    tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    good = studies / "good"
    good.mkdir(parents=True)
    for path in _ct_series(tiny_sites[0]).iterdir():
        (good / path.name).write_bytes(path.read_bytes())
    mr = read_manifest(tiny_sites[0]).select(modality="MR")[0]
    (studies / "mr.nii.gz").write_bytes((tiny_sites[0] / mr.file).read_bytes())  # an MR: this model reads CT?
    bad = studies / "bad"
    bad.mkdir()
    source = next(_ct_series(tiny_sites[0]).iterdir())
    variant_of(source, bad / "oblique.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])
    result = runner.invoke(app, ["infer", "--model", str(denoise_model), "--input", str(studies),
                                 "--output", str(tmp_path / "out"), "--device", "cpu"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "not an axial slice" in text
    assert "2 written, 0 skipped, 1 failed" in text  # the CT series and the NIfTI (read as the model's CT)
    again = runner.invoke(app, ["infer", "--model", str(denoise_model), "--input", str(studies),
                                "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert "0 written, 2 skipped, 1 failed" in " ".join(again.output.split())


def test_infer_refuses_a_synthesis_model(tmp_path: Path) -> None:
    study = StudyConfig().replace(task={"name": "synthesis", "image_size": 16, "width": 8, "z_dim": 8})
    model = load_model(export_model(_run(tmp_path, study), tmp_path / "s.medgan"))
    with pytest.raises(MedGANError, match="use 'medgan synth'"):
        Applier(model)


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dicom3tools is not installed ('make test' installs it with apt-get where it can)")
def test_derived_dicom_passes_dciodvfy(denoise_model: Path, tiny_sites: list[Path], tmp_path: Path) -> None:
    series = _ct_series(tiny_sites[0])
    folder = infer(load_model(denoise_model), series, tmp_path / "out").written[0]
    for path in [*sorted(folder.glob("*.dcm"))[:2], next(series.iterdir())]:  # outputs, and the simulator's input
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (path, errors)


@pytest.mark.parametrize("tv_start", [0.0, 0.01])
def test_recon_reads_undersampled_kspace_and_writes_the_image_over_the_same_field(tiny_sites: list[Path],
                                                                                  tmp_path: Path, tv_start: float) -> None:
    from medgan_core.data.kspace import read_kspace

    # the sites' MR is 128×128 at 3.125 mm; at 12.5 mm the model works on the central 32×32 of k-space;
    # with tv-start the scan's own TV-CS reconstruction is computed and fed to the model too
    study = StudyConfig().replace(task={"name": "recon", "modality": "MR", "image_size": 16, "spacing": 12.5,
                                        "width": 8, "tv_start": tv_start})
    model = load_model(export_model(_run(tmp_path, study), tmp_path / "recon.medgan"))
    entry = next(e for e in read_manifest(tiny_sites[0]).entries if e.domain.endswith("-kspace-r4"))
    source = tiny_sites[0] / entry.file
    summary = infer(model, source, tmp_path / "out")
    assert len(summary.written) == 1 and not summary.failed
    out, original = nib.load(str(summary.written[0])), nib.load(str(source))
    kspace = read_kspace(source)
    assert out.shape == (32, 32, kspace.shape[0])
    np.testing.assert_allclose(np.asarray(out.dataobj).transpose(2, 1, 0), Applier(model).apply_kspace(kspace, (3.125, 3.125)),
                               rtol=1e-5, atol=1e-5)
    # the same field of view: the outer edges of the first and last pixels coincide
    def corners(image: nib.Nifti1Image, shape: tuple[int, ...]) -> np.ndarray:
        return np.array([image.affine @ np.array([i, j, 0, 1.0]) for i, j in ((-0.5, -0.5), (shape[0] - 0.5,
                                                                                             shape[1] - 0.5))])
    np.testing.assert_allclose(corners(out, out.shape), corners(original, original.shape), atol=1e-4)


def test_a_recon_output_on_a_coarser_grid_lies_where_the_scan_does(tmp_path: Path) -> None:
    """A fully sampled scan passes a recon model unchanged (data consistency keeps every measured
    line), so on a 4× coarser grid its content must land at the same place in the scanner's
    coordinates: the coarser pixels centred within the field, as the output's affine says. A
    grid that started at the first fine pixel would move it by 1.5 fine pixels (4.7 mm here)."""
    from medgan_core.data.kspace import undersample, write_kspace

    rows = cols = 128  # 3.125 mm pixels, 400 mm field
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    blob = 1.0 + np.exp(-((y - 40.3) ** 2 + (x - 85.6) ** 2) / (2 * 7.0**2))  # off-centre, band-limited
    slices = np.stack([blob, blob])
    affine = np.array([[-3.125, 0, 0, 190.0], [0, -3.125, 0, 170.0], [0, 0, 5.0, -30.0], [0, 0, 0, 1]])
    source = write_kspace(undersample(slices, np.ones(cols, dtype=bool)), affine, tmp_path / "full.nii.gz")
    study = StudyConfig().replace(task={"name": "recon", "modality": "MR", "image_size": 16, "spacing": 12.5,
                                        "width": 8})
    model = load_model(export_model(_run(tmp_path, study), tmp_path / "recon.medgan"))
    summary = infer(model, source, tmp_path / "out")
    assert len(summary.written) == 1 and not summary.failed
    out = nib.load(str(summary.written[0]))
    assert out.shape == (32, 32, 2)

    def centre_of_blob(data: np.ndarray, image_affine: np.ndarray) -> np.ndarray:
        """The scanner position of the blob's intensity-weighted centre on the first slice."""
        weights = data[:, :, 0] - np.median(data[:, :, 0])  # the flat background off
        i, j = np.mgrid[0 : data.shape[0], 0 : data.shape[1]]
        index = np.array([(weights * i).sum(), (weights * j).sum()]) / weights.sum()
        return (image_affine @ np.array([index[0], index[1], 0.0, 1.0]))[:3]

    truth = centre_of_blob(slices.transpose(2, 1, 0), affine)  # voxel order i, j, k: columns, rows, slices
    np.testing.assert_allclose(centre_of_blob(np.asarray(out.dataobj), out.affine), truth, atol=0.2)


def test_an_enhanced_multiframe_ct_comes_out_as_a_derived_enhanced_object(denoise_model: Path, tiny_sites: list[Path],
                                                                          tmp_path: Path) -> None:
    from tests.dicom_samples import enhanced_ct

    (tmp_path / "in").mkdir()
    source = enhanced_ct(_ct_series(tiny_sites[0]), tmp_path / "in" / "enhanced.dcm", shuffle_seed=2)
    model = load_model(denoise_model)
    summary = infer(model, source, tmp_path / "out")
    assert len(summary.written) == 1 and not summary.failed, summary.failed
    files = list(summary.written[0].glob("*.dcm"))
    assert len(files) == 1
    ds, original = pydicom.dcmread(files[0]), pydicom.dcmread(source)
    assert int(ds.NumberOfFrames) == int(original.NumberOfFrames) and ds.SOPClassUID == original.SOPClassUID
    assert ds.SeriesInstanceUID != original.SeriesInstanceUID and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    derived, volume = read_dicom_series(files[0]), read_dicom_series(source)
    np.testing.assert_allclose(derived.affine, volume.affine)
    expected = _applied(model, volume)
    assert np.abs(derived.axial_slices() - expected).max() <= 0.5


def test_two_scans_of_one_name_in_different_studies_both_come_out(denoise_model: Path, tiny_sites: list[Path],
                                                                   tmp_path: Path) -> None:
    volume = read_dicom_series(_ct_series(tiny_sites[0]))
    for study in ("study-1", "study-2"):
        (tmp_path / "in" / study).mkdir(parents=True)
        nib.save(nib.Nifti1Image(volume.data, volume.affine), str(tmp_path / "in" / study / "ct.nii.gz"))
    summary = infer(load_model(denoise_model), tmp_path / "in", tmp_path / "out")
    assert sorted(p.name for p in summary.written) == ["study-1_ct.nii.gz", "study-2_ct.nii.gz"]


def test_an_output_folder_inside_the_input_is_not_read_as_input(denoise_model: Path, tiny_sites: list[Path],
                                                                tmp_path: Path) -> None:
    volume = read_dicom_series(_ct_series(tiny_sites[0]))
    (tmp_path / "data").mkdir()
    nib.save(nib.Nifti1Image(volume.data, volume.affine), str(tmp_path / "data" / "ct.nii.gz"))
    model = load_model(denoise_model)
    assert len(infer(model, tmp_path / "data", tmp_path / "data" / "denoised").written) == 1
    again = infer(model, tmp_path / "data", tmp_path / "data" / "denoised")
    assert not again.written and len(again.skipped) == 1  # its own outputs were not taken for new scans


def test_a_cycle_model_harmonises_the_whole_hu_range_at_the_scans_pixels(tiny_sites: list[Path],
                                                                          tmp_path: Path) -> None:
    """A cycle model applies at clinical geometry: an untrained one (the generators start
    as the identity) hands scanner B's slice back on its own grid with its HU, bone and air
    included, not clipped to the soft-tissue window; the site's real calibration is learnt."""
    study = StudyConfig().replace(task={"name": "cycle", "image_size": 16, "width": 8, "batch_size": 4})
    model = load_model(export_model(_run(tmp_path, study), tmp_path / "cycle.medgan"))
    scanner_b = read_manifest(tiny_sites[0]).select(modality="CT", variant="scanner-b")[0]
    volume = read_dicom_series(tiny_sites[0] / scanner_b.file)
    out = _applied(model, volume)
    slices = volume.axial_slices()
    assert out.shape == slices.shape
    assert slices.max() > 600 and out.max() > 600 and out.min() < -900  # bone and air, whole range
    assert np.abs(out - np.clip(slices, -1024, 3071)).mean() < 5.0  # within a few HU of the identity
