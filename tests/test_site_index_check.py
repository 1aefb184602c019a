"""From a PACS export to a checked site: `medgan site index` and `medgan site check` on real
DICOM (pydicom's bundled DICOMDIR study: CT, MR, CR, localisers, a projection, mixed folders)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from client.site_check import check_site_data
from client.site_index import assign_splits, index_export
from medgan.cli import app
from medgan_core.data.manifest import read_manifest
from medgan_core.data.simulate import DEFAULT_SITES, simulate_site
from tests.dicom_samples import PYDICOM_FILES, bundled

runner = CliRunner()


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    """A site folder holding a PACS export: the DICOMDIR study plus a mixed folder."""
    root = tmp_path / "site" / "export"
    shutil.copytree(PYDICOM_FILES / "dicomdirtests", root / "pacs")
    mixed = root / "mixed"
    mixed.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm", "test-SR.dcm", "rtdose.dcm"):
        shutil.copy(bundled(name), mixed / name)
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_index_lists_usable_series_says_why_others_are_left_out_and_never_touches_the_export(export: Path) -> None:
    before = _digest(export)
    manifest = export.parent / "manifest.csv"
    result = runner.invoke(app, ["site", "index", str(export), "--out", str(manifest), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert _digest(export) == before  # nothing moved, changed or added in the export
    rows = read_manifest(manifest).entries
    by_file = {e.file: e for e in rows}
    assert by_file["export/pacs/98892001/CT5N"].modality == "CT" and "export/pacs/77654033/CT2" not in by_file
    assert "export/mixed/CT_small.dcm" in by_file and "export/mixed/MR_small.dcm" in by_file
    assert all(e.series for e in rows)  # each row names its series: folders may mix several
    assert len({(e.subject, e.split) for e in rows}) == len({e.subject for e in rows})  # a subject in one split
    output = " ".join(result.output.split())
    for reason in ("a localiser (ImageType LOCALIZER)", "a localiser (series description 'FAST LOCALIZER')",
                   "Computed Radiography Image Storage (modality CR) is not a CT",
                   "derived (DERIVED/SECONDARY/PROJECTION IMAGE)", "Ultrasound Image Storage (modality US) is not a CT",
                   "RT Dose Storage (modality RTDOSE) is not a CT"):
        assert reason in output, reason
    again = runner.invoke(app, ["site", "index", str(export), "--out", str(manifest)])
    assert again.exit_code == 2 and "exists (perhaps reviewed by hand); pass --force" in again.output


def test_index_refuses_a_manifest_outside_the_export_tree(export: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["site", "index", str(export), "--out", str(tmp_path / "elsewhere" / "m.csv")])
    assert result.exit_code == 2 and "must sit in" in result.output


def test_index_pseudonymises_subjects_stably(export: Path) -> None:
    manifest = export.parent / "manifest.csv"
    first = index_export(export, manifest, pseudonymise=True)
    second = index_export(export, manifest, pseudonymise=True)
    patients = {str(pydicom.dcmread(bundled("CT_small.dcm")).PatientID)}
    assert [e.subject for e in first.entries] == [e.subject for e in second.entries]
    assert all(e.subject.startswith("subject-") and e.subject not in patients for e in first.entries)
    assert (export.parent / ".medgan-pseudonym-key").stat().st_mode & 0o077 == 0


def test_splits_are_by_subject_seeded_and_cover_val_and_test() -> None:
    subjects = [f"p{i}" for i in range(20)]
    splits = assign_splits(subjects, seed=1)
    assert splits == assign_splits(subjects, seed=1) and splits != assign_splits(subjects, seed=2)
    counts = {s: list(splits.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 14, "val": 3, "test": 3}
    assert set(assign_splits(["a", "b", "c"], 0).values()) == {"train", "val", "test"}


def test_index_decodes_what_it_lists_so_check_passes(export: Path) -> None:
    manifest = export.parent / "manifest.csv"
    result = runner.invoke(app, ["site", "index", str(export), "--out", str(manifest)])
    output = " ".join(result.output.split())
    # pydicom's sample study keeps a few slices of a brain CT and pixel-less files: left out, and why
    assert "slices are unevenly spaced" in output and "has no pixel data" in output
    reports, problems = check_site_data(export.parent)
    assert problems == []
    by_file = {r.file: r for r in reports}
    smartscore = by_file["export/pacs/98892001/CT5N"]
    assert smartscore.slices > 1 and smartscore.spacing and smartscore.value_range
    assert "export/mixed/CT_small.dcm" in by_file and "export/pacs/77654033/CT2" not in by_file
    result = runner.invoke(app, ["site", "check", str(export.parent)])
    assert result.exit_code == 0 and f"{len(reports)} series" in " ".join(result.output.split())


def test_check_names_each_problem_in_one_line(export: Path) -> None:
    manifest = export.parent / "manifest.csv"
    assert runner.invoke(app, ["site", "index", str(export), "--out", str(manifest)]).exit_code == 0
    text = manifest.read_text()  # a reviewer adds the uneven brain CT back by hand
    uid = str(pydicom.dcmread(next((export / "pacs/77654033/CT2").iterdir()), stop_before_pixels=True)
              .SeriesInstanceUID)
    manifest.write_text(text + f"export/pacs/77654033/CT2,77654033,CT,train,brain,,,{uid}\n")
    reports, problems = check_site_data(export.parent)
    assert len(problems) == 1 and "slices are unevenly spaced" in problems[0] and "\n" not in problems[0]
    result = runner.invoke(app, ["site", "check", str(export.parent)])
    assert result.exit_code == 1 and "1 problem(s)" in " ".join(result.output.split())


@pytest.fixture(scope="module")
def good_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_site(DEFAULT_SITES[0], tmp_path_factory.mktemp("site") / "a", n_subjects=3, n_slices=3, size=32,
                         seed=1)


def test_check_passes_a_good_site_with_its_task(good_site: Path) -> None:
    result = runner.invoke(app, ["site", "check", str(good_site), "--task", "denoise"])
    assert result.exit_code == 0, result.output
    assert "read without problems" in result.output


def test_check_fails_on_a_corrupt_slice_in_one_line(good_site: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(good_site, site)
    entry = read_manifest(site).select(modality="CT")[0]
    victim = sorted((site / entry.file).iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated mid-header
    reports, problems = check_site_data(site)
    assert len(problems) == 1 and victim.name in problems[0]
    result = runner.invoke(app, ["site", "check", str(site)])
    assert result.exit_code == 1 and "1 problem(s)" in result.output


def test_check_with_a_task_finds_missing_pairs(good_site: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(good_site, site)
    lines = (site / "manifest.csv").read_text().splitlines()
    (site / "manifest.csv").write_text("\n".join(l for l in lines if "low-dose" not in l) + "\n")
    _, problems = check_site_data(site, task="denoise")
    assert problems and problems[0].startswith("task denoise: ") and "low-dose" in problems[0]


def test_site_start_checks_the_data_before_joining(good_site: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import client.commands as commands
    import client.daemon as daemon

    site = tmp_path / "site"
    shutil.copytree(good_site, site)
    victim = sorted((site / read_manifest(site).select(modality="CT")[0].file).iterdir())[0]
    victim.write_bytes(b"not dicom")
    (tmp_path / "site.toml").write_text(f'[site]\ndata-path = "{site}"\nstate-dir = "{tmp_path / "state"}"\n'
                                        '[connection]\nprivate-key = "keys/a"\n')
    started: list[object] = []
    monkeypatch.setattr(daemon, "supernode_command", lambda *args: (["true"], {}))
    monkeypatch.setattr(commands, "run_foreground", lambda *args: started.append(args))
    result = runner.invoke(app, ["site", "start", "--config", str(tmp_path / "site.toml")])
    assert result.exit_code == 1 and "not a DICOM file" in " ".join(result.output.split())
    assert not started  # the SuperNode never dialled the coordinator


def test_a_pacs_export_is_indexed_checked_and_trained_on_without_hand_work(good_site: Path, tmp_path: Path) -> None:
    """Every CT series of a phantom site thrown into one PACS-style folder (files renamed,
    series mixed), plus one nested study folder: index, check, and a training step."""
    from medgan_core.tasks.registry import build_task, load_task_data, task_config

    export = tmp_path / "site" / "export"
    flat, nested = export / "DICOM", export / "STUDY1" / "SERIES1"
    flat.mkdir(parents=True)
    manifest = read_manifest(good_site)
    ct = manifest.select(modality="CT", variant=None)
    for n, entry in enumerate(ct):
        for m, path in enumerate(sorted((good_site / entry.file).iterdir())):
            target = nested if n == 0 else flat
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / f"IM{n:02d}{m:04d}")
    result = runner.invoke(app, ["site", "index", str(export), "--out", str(tmp_path / "site" / "manifest.csv")])
    assert result.exit_code == 0, result.output
    indexed = read_manifest(tmp_path / "site").entries
    assert len(indexed) == len(ct) and {e.subject for e in indexed} == {e.subject for e in ct}
    assert {e.split for e in indexed} == {"train", "val", "test"}
    assert runner.invoke(app, ["site", "check", str(tmp_path / "site"), "--task", "synthesis"]).exit_code == 0
    config = task_config(name="synthesis", image_size=16, width=8, batch_size=4, local_steps=2, z_dim=8)
    data = load_task_data(tmp_path / "site", config)
    losses = build_task(config).train(data, 2, seed=0)
    assert data.num_train > 0 and all(np.isfinite(v) for v in losses.values())
