"""`medgan study compare`: the federated study against local-only and pooled training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medgan.cli import app
from medgan.compare import compare_study
from medgan_core.errors import ConfigError
from medgan_core.study_config import StudyConfig


@pytest.mark.slow
def test_every_arm_is_scored_at_every_site(tiny_sites: list[Path], tmp_path: Path) -> None:
    """DP on: the three arms, leave-one-out, and the ε–utility curve (ε = 8 as configured and the
    same federation without DP; another ε's arm: ``test_another_epsilon_is_the_same_study_at_that_target``)."""
    study = StudyConfig().replace(
        run={"rounds": 1, "num_sites": 2, "device": "cpu"},
        task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 4, "local_steps": 2},
        privacy={"enabled": True, "target_epsilon": 8.0})
    seen: list[str] = []
    results = compare_study(study, tiny_sites, tmp_path / "cmp", leave_one_out=True, epsilons=[8.0],
                            progress=seen.append)
    names = [s.name for s in tiny_sites]
    assert set(results["scores"]) == {"federated", "federated, no DP", "local only", "pooled"}
    for arm, per_site in results["scores"].items():
        assert set(per_site) == set(names) and all("psnr" in m and "psnr-input" in m for m in per_site.values())
    # local-only models differ between sites; the federated arm's are one shared model
    local = results["scores"]["local only"]
    assert local[names[0]]["psnr"] != results["scores"]["federated"][names[0]]["psnr"]
    assert set(results["leave-one-out"]) == set(names)
    assert set(results["leave-one-out"][names[0]]["single sites"]) == {names[1]}
    # The curve: the DP point at the ε its sites spent, within its target (the configured ε once).
    curve = results["epsilon-utility"]
    assert [p["arm"] for p in curve] == ["federated"]
    assert 4.0 < curve[0]["epsilon-spent"] <= 8.0 + 1e-6
    assert results["scores"]["federated, no DP"] != results["scores"]["federated"]
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["headline"] == "psnr"
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| mean |" in table and "of pooled training's gain" in table and "Leave one site out" in table
    assert "ε–utility" in table and "| no DP | ∞ |" in table and "share of the non-DP gain" in table
    assert any("federated: round 1/1" in line for line in seen) and any("pooled" in line for line in seen)
    assert any("federated, no DP: round 1/1" in line for line in seen)
    assert f"pooled: scoring {names[1]}'s held-out slices" in seen
    from PIL import Image

    for chart in ("per-site.png", "gain.png", "epsilon-utility.png"):  # matplotlib is a dev dependency
        with Image.open(tmp_path / "cmp" / chart) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_another_epsilon_is_the_same_study_at_that_target(tiny_sites: list[Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``--epsilons`` arm changes the privacy target only, and lets the noise multiplier follow
    it (a fixed one would spend the configured study's ε); it runs in its own run folder."""
    import medgan.compare as compare

    study = StudyConfig().replace(
        run={"rounds": 3, "num_sites": 2, "device": "cpu"},
        task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 4, "local_steps": 2},
        privacy={"enabled": True, "target_epsilon": 8.0, "noise_multiplier": 1.3})
    arms: list[tuple[StudyConfig, Path]] = []

    class Stop(Exception):
        pass

    def record(arm_study: StudyConfig, sites: list[Path], run_dir: Path, **_: object) -> None:
        arms.append((arm_study, run_dir))
        if len(arms) == 2:
            raise Stop

    monkeypatch.setattr(compare, "simulate_federation", record)
    monkeypatch.setattr(compare, "site_models", lambda *a, **k: {})
    monkeypatch.setattr(compare, "spent_epsilon", lambda run_dir: 7.5)
    with pytest.raises(Stop):
        compare.compare_study(study, tiny_sites, tmp_path / "cmp", epsilons=[8.0, 2.0], progress=lambda _: None)
    (configured, first), (other, second) = arms
    assert configured == study.replace(run={"evaluate_every": 0}) and first.name == "federated"  # compare scores it
    assert second.name == "federated,-ε=2" and other.privacy.target_epsilon == 2.0
    assert other.privacy.noise_multiplier == 0.0  # found for ε = 2, not the configured 1.3
    assert other.replace(privacy={"target_epsilon": 8.0, "noise_multiplier": 1.3}) == configured  # nothing else


def test_a_comparison_needs_two_sites(tiny_sites: list[Path], tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    config = tmp_path / "study.toml"
    config.write_text(f'[run]\nsites-dir = "{tmp_path / "one"}"\n')
    result = CliRunner().invoke(app, ["study", "compare", "--config", str(config), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "a comparison needs at least two" in result.output


def test_bad_epsilons_are_refused_in_one_line(tiny_sites: list[Path], tmp_path: Path) -> None:
    config = tmp_path / "study.toml"
    config.write_text(f'[run]\nsites-dir = "{tiny_sites[0].parent}"\n')
    for bad in ("4,x", "0", "-1", "inf"):
        result = CliRunner().invoke(app, ["study", "compare", "--config", str(config), "--out", str(tmp_path / "c"),
                                          "--epsilons", bad])
        assert result.exit_code == 2 and "--epsilons" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "c" / "results.json").exists()


@pytest.mark.usefixtures("flower_task_identity")
def test_a_run_with_evaluate_every_0_asks_no_site_to_evaluate(tmp_path: Path) -> None:
    """``run.evaluate-every = 0``: every round trains and is checkpointed, none is evaluated
    (the compare's arms: it scores them itself), and the report says no grid was drawn."""
    from server.run_folder import RunFolder
    from server.study import run_study
    from test_server_momentum import ShiftingSites, _study

    sent: list[str] = []

    class CountingSites(ShiftingSites):
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            sent.extend(m.metadata.message_type for m in messages)
            return super().send_and_receive(messages, timeout=timeout)

    folder = RunFolder(tmp_path / "run")
    study = _study(3, folder.root, momentum=0.0).replace(run={"evaluate_every": 0})
    run_study(CountingSites({1: 0.01, 2: 0.03}), study, folder)  # type: ignore[arg-type]
    assert sent and all(kind.startswith("train") for kind in sent) and len(sent) == 3 * 2
    assert all(folder.checkpoint(r).is_file() for r in range(4)) and not list(folder.root.glob("samples/*.png"))
    assert "no round was evaluated" in folder.report.read_text()
    with pytest.raises(ConfigError, match="run.evaluate-every = -1"):
        study.replace(run={"evaluate_every": -1})


def _without_training(monkeypatch: pytest.MonkeyPatch, model: type, runs: list[StudyConfig]) -> StudyConfig:
    """A tiny denoise study whose comparison trains nothing: every arm's model is ``model()``
    and each federated arm's study is recorded in ``runs``."""
    import medgan.compare as compare

    monkeypatch.setattr(compare, "simulate_federation", lambda arm_study, *a, **k: runs.append(arm_study))
    monkeypatch.setattr(compare, "site_models", lambda study, sites, *a, **k: {s.name: model() for s in sites})
    monkeypatch.setattr(compare, "pooled_model", lambda *a: model())
    monkeypatch.setattr(compare, "_plot", lambda *a: None)
    return StudyConfig().replace(run={"rounds": 1, "num_sites": 2, "device": "cpu"},
                                 task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 4},
                                 privacy={"enabled": False})


def test_compare_scores_every_arm_once_and_without_the_self_ensemble_when_asked(
        tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medgan.compare as compare

    class Model:
        self_ensemble = True

        def evaluate(self, data: object) -> dict[str, float]:  # 1 with the ensemble, 0 without
            return {"psnr": float(self.self_ensemble), "psnr-input": 0.0}

    runs: list[StudyConfig] = []
    study = _without_training(monkeypatch, Model, runs)
    seen: list[str] = []
    for ensemble in (True, False):
        results = compare.compare_study(study, tiny_sites, tmp_path / f"cmp-{ensemble}", leave_one_out=True,
                                        self_ensemble=ensemble, progress=seen.append)
        scored = [m["psnr"] for arm in results["scores"].values() for m in arm.values()]
        scored += [row["federated (others)"]["psnr"] for row in results["leave-one-out"].values()]
        scored += [m["psnr"] for row in results["leave-one-out"].values() for m in row["single sites"].values()]
        assert len(scored) == 3 * 2 + 2 + 2 and set(scored) == {float(ensemble)}
        assert results["self-ensemble"] is ensemble
        assert ("--no-self-ensemble" in (tmp_path / f"cmp-{ensemble}" / "results.md").read_text()) is not ensemble
    assert runs and all(r.run.evaluate_every == 0 for r in runs)
    assert results["command"] == "" and "CPUs" in results["machine"]
    # A task without a self-ensemble (translate) is scored as always, and the results do not claim otherwise.
    monkeypatch.setattr(compare, "load_task_data", lambda site, task: None)
    results = compare.compare_study(study.replace(task={"name": "translate"}), tiny_sites, tmp_path / "cmp-translate",
                                    self_ensemble=False, progress=seen.append)
    assert results["self-ensemble"] is None
    assert "--no-self-ensemble" not in (tmp_path / "cmp-translate" / "results.md").read_text()
    first, second = (site.name for site in tiny_sites)
    assert f"without {first}: scoring {first}'s held-out slices" in seen  # scoring takes minutes: it says so
    assert f"local only at {second}: scoring {first}'s held-out slices" in seen


def test_eval_slices_is_overridden_for_the_comparison_and_said_in_its_results(
        tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--eval-slices``: the scored slices a comparison's arms use (a demo's study scores a few
    a round); the results say when they are a subset; a task without held-out slices refuses it."""
    import medgan.compare as compare

    asked: list[StudyConfig] = []

    def fake_compare(study: StudyConfig, sites: list[Path], out: Path, **_: object) -> dict:
        asked.append(study)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("table\n")
        return {"task": study.task.name}

    monkeypatch.setattr(compare, "compare_study", fake_compare)
    config = tmp_path / "study.toml"
    config.write_text(f'[run]\nsites-dir = "{tiny_sites[0].parent}"\n[task]\nname = "denoise"\neval-slices = 4\n')
    for flags, expected in (([], 4), (["--eval-slices", "0"], 0), (["--eval-slices", "2"], 2)):
        result = CliRunner().invoke(app, ["study", "compare", "--config", str(config), "--out", str(tmp_path / "c"),
                                          *flags])
        assert result.exit_code == 0, result.output
        assert asked[-1].task.params.eval_slices == expected
    config.write_text(f'[run]\nsites-dir = "{tiny_sites[0].parent}"\n[task]\nname = "synthesis"\n')
    result = CliRunner().invoke(app, ["study", "compare", "--config", str(config), "--out", str(tmp_path / "c"),
                                      "--eval-slices", "0"])
    assert result.exit_code == 2 and "--eval-slices: task 'synthesis'" in result.output and len(asked) == 3
    assert "Traceback" not in result.output

    class Model:
        def evaluate(self, data: object) -> dict[str, float]:
            return {"psnr": 1.0, "psnr-input": 0.0}

    monkeypatch.undo()
    study = _without_training(monkeypatch, Model, [])
    for slices in (3, 0):
        out = tmp_path / f"cmp-{slices}"
        results = compare.compare_study(study.replace(task={"eval_slices": slices}), tiny_sites, out,
                                        progress=lambda _: None)
        assert results["eval-slices"] == slices
        said = "Each site scores 3 of its held-out slices" in (out / "results.md").read_text()
        assert said is (slices == 3)
