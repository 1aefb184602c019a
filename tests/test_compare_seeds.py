"""`medgan study compare --seeds`: the whole comparison at each seed, kept per seed, and the spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import medgan.compare_seeds as compare_seeds_module
from medgan.cli import app
from medgan.compare_seeds import compare_seeds, seeds_markdown, summarise
from medgan_core.errors import MedGANError
from medgan_core.study_config import StudyConfig


def _results(federated: float, local: float, pooled: float, local_b: float | None = None) -> dict:
    """One seed's comparison of two sites, input 20 dB everywhere."""
    def scores(a: float, b: float) -> dict:
        return {"A": {"psnr": a, "psnr-input": 20.0}, "B": {"psnr": b, "psnr-input": 20.0}}

    return {"task": "translate", "headline": "psnr", "privacy": False, "rounds": 2, "local-steps": 3,
            "sites": ["A", "B"], "leave-one-out": {}, "epsilon-utility": [],
            "scores": {"federated": scores(federated, federated), "pooled": scores(pooled, pooled),
                       "local only": scores(local, local if local_b is None else local_b)}}


def test_the_summary_gives_each_seed_their_mean_and_range_and_each_target_at_how_many_seeds() -> None:
    # seed 0: gains 8 of 10 (80 %); seed 1: 10 of 10 (100 %) but B alone beats the federation by 1 dB
    summary = summarise({0: _results(28.0, 26.0, 30.0), 1: _results(30.0, 25.0, 30.0, local_b=31.0)})
    assert summary["means"]["federated"] == pytest.approx(29.0)
    assert summary["pooled-share"] == pytest.approx(9.0 / 10.0)  # the share of the mean gains
    table = seeds_markdown(summary)
    assert "| 0 | 28.000 | 26.000 | 30.000 | 80% |" in table
    assert "| 1 | 30.000 | 28.000 | 30.000 | 100% |" in table  # local only: (25 + 31) / 2
    assert "| mean | 29.000 | 27.000 | 30.000 | 90% (of the mean gains) |" in table
    assert "| range | 2.000 | 2.000 | 0.000 | 80%–100% |" in table
    assert "| B | 29.000 (28.000–30.000) | 28.500 (26.000–31.000) | 30.000 (30.000–30.000) |" in table
    assert ("- federated ≥ local only at every site: **missed** at 1 of 2 seeds (seed 0: smallest margin +2.000 at A; "
            "seed 1: smallest margin -1.000 at B)") in table
    assert ("- ≥ 95% of pooled training's gain: **missed** at 1 of 2 seeds (seed 0: 80%; seed 1: 100%); over the "
            "seeds, the share of the mean gains: 90% (**missed**)") in table
    summary = summarise({0: _results(28.0, 26.0, 28.2), 1: _results(30.0, 25.0, 30.0)})
    table = seeds_markdown(summary)
    assert "every site: met at all 2 seeds" in table and "the share of the mean gains: 99% (met)" in table


@pytest.mark.parametrize("bad", ["1", "1,1", "0,x", "-1,2", ","])
def test_bad_seeds_are_refused_in_one_line(tiny_sites: list[Path], tmp_path: Path, bad: str) -> None:
    config = tmp_path / "study.toml"
    config.write_text(f'[run]\nsites-dir = "{tiny_sites[0].parent}"\n')
    result = CliRunner().invoke(app, ["study", "compare", "--config", str(config), "--out", str(tmp_path / "c"),
                                      "--seeds", bad])
    assert result.exit_code == 2 and "--seeds" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


def test_seed_and_seeds_together_are_refused(tiny_sites: list[Path], tmp_path: Path) -> None:
    config = tmp_path / "study.toml"
    config.write_text(f'[run]\nsites-dir = "{tiny_sites[0].parent}"\n')
    result = CliRunner().invoke(app, ["study", "compare", "--config", str(config), "--out", str(tmp_path / "c"),
                                      "--seed", "1", "--seeds", "1,2"])
    assert result.exit_code == 2 and "not both" in result.output and not (tmp_path / "c").exists()


def test_a_single_comparison_s_folder_is_not_overwritten_by_a_summary(tiny_sites: list[Path], tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps({"task": "denoise", "scores": {}}))
    with pytest.raises(MedGANError, match="single comparison"):
        compare_seeds(StudyConfig(), tiny_sites, tmp_path / "c", [0, 1], progress=lambda _: None)
    assert json.loads((tmp_path / "c" / "results.json").read_text()) == {"task": "denoise", "scores": {}}


@pytest.mark.slow
def test_every_seed_is_a_whole_comparison_kept_once_finished(tiny_sites: list[Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    study = StudyConfig().replace(
        run={"rounds": 1, "num_sites": 2, "device": "cpu"},
        task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 4, "local_steps": 2, "seed": 5},
        privacy={"enabled": False})
    seen: list[str] = []
    summary = compare_seeds(study, tiny_sites, tmp_path / "cmp", [0, 3], self_ensemble=False,
                            command="medgan study compare --seeds 0,3", progress=seen.append)
    for seed in (0, 3):
        results = json.loads((tmp_path / "cmp" / f"seed-{seed}" / "results.json").read_text())
        assert results["seed"] == seed and results["study"]["task"]["seed"] == seed  # --seeds wins over task.seed
        assert (tmp_path / "cmp" / f"seed-{seed}" / "federated" / "config.toml").exists()
        assert summary["seeds"][str(seed)]["means"]["federated"] == pytest.approx(
            sum(results["scores"]["federated"][s.name]["psnr"] for s in tiny_sites) / 2)
    assert summary["seeds"]["0"]["means"] != summary["seeds"]["3"]["means"]  # another seed, another model
    assert any(line.startswith("seed 3 (2/2): federated: round 1/1") for line in seen)
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "at 2 seeds" in table and "| range |" in table and "Command: `medgan study compare --seeds 0,3`" in table
    assert (tmp_path / "cmp" / "seeds.png").stat().st_size > 1000

    # Run again: both seeds are finished, so nothing trains, and the summary is the same.
    def must_not_run(*_: object, **__: object) -> None:
        raise AssertionError("a finished seed was run again")

    monkeypatch.setattr(compare_seeds_module, "compare_study", must_not_run)
    seen.clear()
    again = compare_seeds(study, tiny_sites, tmp_path / "cmp", [0, 3], self_ensemble=False,
                          command="medgan study compare --seeds 0,3", progress=seen.append)
    assert again == json.loads(json.dumps(summary)) and "seed 0 (1/2): finished earlier" in seen[0]
    # Another study in the same folder is refused before anything runs; its results stay.
    with pytest.raises(MedGANError, match="another comparison"):
        compare_seeds(study.replace(task={"local_steps": 3}), tiny_sites, tmp_path / "cmp", [0, 3],
                      self_ensemble=False, progress=seen.append)
    with pytest.raises(MedGANError, match="another comparison"):
        compare_seeds(study, tiny_sites, tmp_path / "cmp", [0, 3], progress=seen.append)  # with the self-ensemble
    with pytest.raises(MedGANError, match="summarises another comparison"):  # other seeds, but the summary is theirs
        compare_seeds(study.replace(task={"local_steps": 3}), tiny_sites, tmp_path / "cmp", [7, 8],
                      self_ensemble=False, progress=seen.append)
    assert not (tmp_path / "cmp" / "seed-7").exists()
    assert json.loads((tmp_path / "cmp" / "seed-0" / "results.json").read_text())["seed"] == 0
