"""`medgan synth`: synthetic images in three formats, marked synthetic, carrying nothing of the
sites' patients."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from client.synth import synthesise
from medgan.cli import app
from medgan_core.data.manifest import read_manifest
from medgan_core.errors import MedGANError
from medgan_core.model_file import load_model
from medgan_core.study_config import StudyConfig
from server.export import export_model
from tests.test_apply import _run

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_sites: list[Path]) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("models")
    out = {}
    for name, task in (("synthesis", {}), ("conditional", {"condition": "grade"})):
        study = StudyConfig().replace(task={"name": name, "image_size": 16, "width": 8, "z_dim": 8, **task})
        out[name] = export_model(_run(tmp / name, study, tiny_sites[0]), tmp / f"{name}.medgan")
    return out


@pytest.mark.parametrize("fmt", ["png", "nifti", "dicom"])
def test_each_format_with_a_manifest_and_provenance(models: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    result = runner.invoke(app, ["synth", "--model", str(models["synthesis"]), "--n", "5", "--out",
                                 str(tmp_path / "out"), "--format", fmt])
    assert result.exit_code == 0, result.output
    entries = read_manifest(tmp_path / "out").entries
    assert len(entries) == 5 and all(e.domain.startswith("synthetic-") and e.subject.startswith("synthetic-")
                                     for e in entries)
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["synthetic"] and provenance["model"]["round"] == 1
    assert provenance["model"]["privacy"]["epsilon-per-site"] == [1.25]
    volumes = [read_manifest(tmp_path / "out").load(e) for e in entries]
    assert all(v.data.shape[:2] == (16, 16) for v in volumes)
    assert len({v.data.tobytes() for v in volumes}) == 5  # five different images


def test_synthetic_dicom_carries_no_identity_of_the_training_data(models: dict[str, Path], tiny_sites: list[Path],
                                                                  tmp_path: Path) -> None:
    synthesise(load_model(models["synthesis"]), 3, tmp_path / "out", fmt="dicom")
    real = {str(getattr(ds, tag)) for site in tiny_sites for path in site.rglob("*.dcm")
            for ds in [pydicom.dcmread(path, stop_before_pixels=True)]
            for tag in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    for path in (tmp_path / "out").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert str(ds.PatientID).startswith("synthetic-") and "synthetic" in str(ds.PatientName)
        assert ds.SeriesDescription.startswith("SYNTHETIC") and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert not {str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)} & real
        if shutil.which("dciodvfy"):
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            assert not [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_conditional_takes_its_condition_and_refuses_the_wrong_one(models: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(models["conditional"])
    entries = synthesise(model, 4, tmp_path / "g3", label=3)
    assert {e.label for e in entries} == {"grade-3"}
    low, high = (np.stack([np.asarray(Image.open(tmp_path / name / e.file)) for e in
                           synthesise(model, 4, tmp_path / name, label=grade, seed=1)])
                 for name, grade in (("g0", 0), ("g3b", 3)))
    assert not np.array_equal(low, high)  # the same codes, another grade: other images
    with pytest.raises(MedGANError, match="pass --label 0 to 3"):
        synthesise(model, 2, tmp_path / "x", severity=0.5)
    with pytest.raises(MedGANError, match="unconditional"):
        synthesise(load_model(models["synthesis"]), 2, tmp_path / "y", label=1)
    with pytest.raises(MedGANError, match="not empty"):
        synthesise(model, 2, tmp_path / "g3", label=3)
