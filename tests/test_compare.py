"""`medgan study compare`: the federated study against local-only and pooled training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medgan.cli import app
from medgan.compare import compare_study
from medgan_core.study_config import StudyConfig

pytestmark = pytest.mark.slow


def test_every_arm_is_scored_at_every_site(tiny_sites: list[Path], tmp_path: Path) -> None:
    study = StudyConfig().replace(
        run={"rounds": 1, "num_sites": 2, "device": "cpu"},
        task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 4, "local_steps": 2},
        privacy={"enabled": False})
    seen: list[str] = []
    results = compare_study(study, tiny_sites, tmp_path / "cmp", leave_one_out=True, progress=seen.append)
    names = [s.name for s in tiny_sites]
    assert set(results["scores"]) == {"federated", "local only", "pooled"}
    for arm, per_site in results["scores"].items():
        assert set(per_site) == set(names) and all("psnr" in m and "psnr-input" in m for m in per_site.values())
    # local-only models differ between sites; the federated arm's are one shared model
    local = results["scores"]["local only"]
    assert local[names[0]]["psnr"] != results["scores"]["federated"][names[0]]["psnr"]
    assert set(results["leave-one-out"]) == set(names)
    assert set(results["leave-one-out"][names[0]]["single sites"]) == {names[1]}
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["headline"] == "psnr"
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| mean |" in table and "of pooled training's gain" in table and "Leave one site out" in table
    assert any("federated: round 1/1" in line for line in seen) and any("pooled" in line for line in seen)
    from PIL import Image

    for chart in ("per-site.png", "gain.png"):  # matplotlib is a dev dependency: the plots must be there
        with Image.open(tmp_path / "cmp" / chart) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_a_comparison_needs_two_sites(tiny_sites: list[Path], tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    config = tmp_path / "study.toml"
    config.write_text(f'[run]\nsites-dir = "{tmp_path / "one"}"\n')
    result = CliRunner().invoke(app, ["study", "compare", "--config", str(config), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "a comparison needs at least two" in result.output
