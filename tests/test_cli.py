"""The command line: clear messages, no tracebacks, files where it says."""

from pathlib import Path

from typer.testing import CliRunner

from medgan_core.data import read_manifest
from medgan.cli import app

runner = CliRunner()


def test_sites_simulate_writes_sites_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "study"
    args = ["sites", "simulate", "--sites", "2", "--out", str(out), "--subjects", "3", "--slices", "2", "--size", "32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    sites = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in sites] == ["site-01-hospital-a", "site-02-hospital-b"]
    # 3 subjects x (CT, quarter-dose CT, CT on 2x and 4x coarser grids, second-scanner CT, MR,
    # MR k-space at 4x and 10x, label map)
    assert len(read_manifest(sites[0]).entries) == 27
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, args + ["--force"]).exit_code == 0


def test_sites_simulate_writes_only_what_a_task_reads(tmp_path: Path) -> None:
    import json

    base = ["sites", "simulate", "--sites", "1", "--subjects", "3", "--slices", "1", "--size", "32"]
    result = runner.invoke(app, base + ["--out", str(tmp_path / "d"), "--task", "denoise"])
    assert result.exit_code == 0, result.output
    site = next(p for p in (tmp_path / "d").iterdir() if p.is_dir())
    assert {e.domain.removeprefix("hospital-a-") for e in read_manifest(site).entries} == {"ct", "ct-low-dose"}
    assert json.loads((tmp_path / "d" / "study.json").read_text())["series"] == ["ct", "ct-low-dose"]
    result = runner.invoke(app, base + ["--out", str(tmp_path / "m"), "--series", "mr,seg"])
    assert result.exit_code == 0, result.output
    assert {e.modality for e in read_manifest(tmp_path / "m" / "site-01-hospital-a").entries} == {"MR", "SEG"}
    bad = runner.invoke(app, base + ["--out", str(tmp_path / "x"), "--series", "ct,pet"])
    assert bad.exit_code == 2 and "series pet; choose from" in bad.output and "Traceback" not in bad.output
    unknown = runner.invoke(app, base + ["--out", str(tmp_path / "y"), "--task", "segment"])
    assert unknown.exit_code == 2 and "segment" in unknown.output
    mr = runner.invoke(app, ["sites", "simulate", "--sites", "1", "--subjects", "3", "--slices", "1", "--size", "64",
                             "--mr-matrix", "48", "--task", "recon", "--out", str(tmp_path / "r")])
    assert mr.exit_code == 0, mr.output
    assert json.loads((tmp_path / "r" / "study.json").read_text())["mr-matrix"] == 48
    mr_entry = next(e for e in read_manifest(tmp_path / "r" / "site-01-hospital-a").entries if e.domain.endswith("-mr"))
    assert read_manifest(tmp_path / "r" / "site-01-hospital-a").load(mr_entry).data.shape[:2] == (48, 48)
    odd = runner.invoke(app, base + ["--out", str(tmp_path / "z"), "--mr-matrix", "50"])
    assert odd.exit_code == 2 and "MR matrix 50" in odd.output and "Traceback" not in odd.output


def test_demo_with_bad_config_fails_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[task]\nname = 'pix2pixx'\n")
    result = runner.invoke(app, ["demo", "--config", str(config)])
    assert result.exit_code == 2
    assert "task.name = 'pix2pixx' is not a known task" in result.output
    assert "Traceback" not in result.output
    missing = runner.invoke(app, ["demo", "--config", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_privacy_report_command(tmp_path: Path) -> None:
    from medgan_core.study_config import StudyConfig
    from server.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run").start(StudyConfig())
    dp = {"epsilon": 2.5, "epsilon-budget": 8.0, "delta": 1e-5, "noise-multiplier": 1.2, "max-grad-norm": 1.0,
          "sample-rate": 0.05, "dp-steps": 100.0}
    folder.append_metrics({"round": 1, "sites": [{"node": 7, "site": "hospital-a", "train": dp},
                                                 {"node": 8, "train": dp}],
                           "excluded": [{"node": 9, "site": "hospital-c", "reason": "site error: privacy budget reached"}],
                           "train": {}, "evaluate": {}, "checkpoint": "checkpoints/round-001.safetensors"})
    result = runner.invoke(app, ["privacy", "report", str(folder.root)])
    assert result.exit_code == 0, result.output
    text = (folder.root / "privacy-report.md").read_text()
    # sites by the name they announced, and their node; one that announced none by its node
    assert "| 1 | hospital-a (node 7) | 2.5000 | 8.0000 | 1e-05 | 1.2000 | 1.0000 | 0.0500 | 100 |" in text
    assert "| 1 | node 8 | 2.5000 |" in text
    assert "Final ε per site: hospital-a (node 7): 2.500, node 8: 2.500" in text
    assert "round 1, hospital-c (node 9): site error: privacy budget reached" in text
    assert "A record is a **slice**" in text and "covered only as a group of k" in text  # the default unit, said
    patient = RunFolder(tmp_path / "patient").start(StudyConfig().replace(privacy={"unit": "patient"}))
    patient.append_metrics({"round": 1, "sites": [{"node": 7, "train": dp}], "train": {}, "evaluate": {}})
    assert runner.invoke(app, ["privacy", "report", str(patient.root)]).exit_code == 0
    assert "A record is a **patient**" in (patient.root / "privacy-report.md").read_text()
    written = runner.invoke(app, ["report", str(folder.root)])
    assert written.exit_code == 0, written.output
    assert "| hospital-c (node 9): site error: privacy budget reached |" in (folder.root / "report.md").read_text()
    missing = runner.invoke(app, ["privacy", "report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "error" in missing.output


def test_paths_with_brackets_are_printed_as_they_are(tmp_path: Path) -> None:
    """Console markup would eat '[study]' from a path and fail on '[/]'."""
    odd = tmp_path / "Study [CT] [/]" / "study.toml"
    result = runner.invoke(app, ["demo", "--config", str(odd)])
    assert result.exit_code == 2, result.output
    assert f"config file {odd} does not exist" in " ".join(result.output.split())


def test_report_of_a_metrics_line_it_cannot_read_is_one_line(tmp_path: Path) -> None:
    from medgan_core.study_config import StudyConfig
    from server.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run").start(StudyConfig())
    folder.append_metrics({"round": 1, "sites": []})  # no checkpoint, no metrics: not a line this version writes
    result = runner.invoke(app, ["report", str(folder.root)])
    assert result.exit_code == 2, result.output  # bad input: exit 2, no traceback
    assert "has a line this report cannot read" in result.output and "metrics.jsonl" in result.output


def test_demo_on_sites_simulated_for_another_task_says_how_to_add_the_series(tmp_path: Path) -> None:
    """The default demo (denoise) on sites an earlier synthesis demo simulated (CT only): one
    line naming the missing series and the command that adds them, before any site starts;
    that command's study is one the demo accepts."""
    sites = tmp_path / "data"
    made = runner.invoke(app, ["sites", "simulate", "--sites", "2", "--subjects", "3", "--slices", "1", "--size", "64",
                               "--task", "synthesis", "--out", str(sites)])
    assert made.exit_code == 0, made.output
    config = tmp_path / "study.toml"
    config.write_text(f"[run]\nnum-sites = 2\nsites-dir = '{sites}'\nout-dir = '{tmp_path / 'run'}'\n"
                      "[task]\nname = 'denoise'\n[privacy]\nenabled = false\n")
    result = runner.invoke(app, ["demo", "--config", str(config)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "task denoise also reads ct-low-dose" in text and not (tmp_path / "run").exists()
    command = text.split("simulator wrote are replaced): ")[1].strip()
    assert command == (f"medgan sites simulate --force --out {sites} --task denoise --sites 2 --subjects 3 "
                       "--slices 1 --size 64 --seed 0")
    redo = runner.invoke(app, command.split()[1:])
    assert redo.exit_code == 0, redo.output
    from medgan_core.data.simulate import missing_series

    assert missing_series(sites, ("ct", "ct-low-dose"), "denoise") == ""


def test_demo_round_line_names_the_initial_model_and_the_fine_tuned_last_round() -> None:
    """The last round of a study with a personal fine-tune scores each site's fine-tuned model;
    the demo's line says so, and compares every round with round 0's score."""
    from medgan.cli import round_line
    from server.study import RoundSummary

    first: dict[str, float] = {}
    start = round_line(RoundSummary(0, 4, 3.0, evaluate={"psnr": 45.8}, sites_ok=3), "psnr", first, 3, 25)
    assert "held-out PSNR 45.8000 (round 0: 45.8000)" in start and "initial model" in start
    middle = round_line(RoundSummary(2, 4, 2.0, train={"epsilon": 5.9}, evaluate={"psnr": 46.9}, sites_ok=3),
                        "psnr", first, 3, 25)
    assert "(round 0: 45.8000)" in middle and "ε 5.90" in middle and "fine-tune" not in middle
    last = round_line(RoundSummary(4, 4, 2.0, evaluate={"psnr": 47.3}, sites_ok=2), "psnr", first, 3, 25)
    assert "sites 2/3" in last and "after its 25-step fine-tune" in last
    plain = round_line(RoundSummary(4, 4, 2.0, evaluate={"psnr": 47.3}, sites_ok=3), "psnr", first, 3, 0)
    assert "fine-tune" not in plain and "[dim]" not in plain


def test_seed_option_changes_the_task_seed_and_nothing_else() -> None:
    from medgan.cli import _demo_config
    from medgan_core.study_config import load_study

    config = Path("sites_example/translate-compare.toml")
    shipped = load_study(config)
    seeded = _demo_config(config, None, None, None, None, None, seed=2)
    assert shipped.task.seed == 0 and seeded.task.seed == 2
    assert seeded.replace(task={"seed": 0}) == shipped
    assert _demo_config(config, None, 30, None, None, None, seed=None).task.seed == 0
    for command in (["demo"], ["study", "compare"]):
        refused = runner.invoke(app, [*command, "--config", str(config), "--seed", "-1"])
        assert refused.exit_code == 2 and "--seed" in refused.output and "Traceback" not in refused.output


def test_a_resumed_run_refuses_to_change_its_study(tmp_path: Path) -> None:
    """`--resume` with `--no-privacy` would otherwise finish a DP study without DP."""
    for change in (["--no-privacy"], ["--seed", "3"], ["--rounds", "9", "--local-steps", "2"]):
        refused = runner.invoke(app, ["demo", "--resume", str(tmp_path), *change])
        assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
        assert "cannot change it" in refused.output and change[0] in refused.output
    missing = runner.invoke(app, ["demo", "--resume", str(tmp_path / "none"), "--device", "cpu"])
    assert missing.exit_code == 2 and "cannot change it" not in missing.output and "Traceback" not in missing.output


def test_a_resumed_run_keeps_its_study_and_may_only_move_device(tmp_path: Path) -> None:
    from medgan.cli import _resumed_config
    from medgan_core.study_config import load_study
    from server.run_folder import RunFolder

    started = load_study(Path("sites_example/demo.toml")).replace(run={"out_dir": str(tmp_path / "run")})
    RunFolder(tmp_path / "run").start(started)
    same = _resumed_config(tmp_path / "run", None, {"--seed": None, "--no-privacy": None})
    assert same.privacy.enabled and same.run.resume and same.run.device == "auto"
    assert same.replace(run={"resume": False}) == started
    moved = _resumed_config(tmp_path / "run", "cpu", {"--seed": None})
    assert moved.run.device == "cpu" and moved.replace(run={"device": "auto"}) == same
