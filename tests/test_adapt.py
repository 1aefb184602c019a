"""``medgan adapt``: a hospital outside a FedBN study fits the site-kept layers to its own images;
the shared arrays stay exactly the study's, and the file says what was done."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.adapt import adapt_model, site_kept_arrays
from medgan.cli import app
from medgan_core.checkpoints import save_checkpoint
from medgan_core.errors import MedGANError
from medgan_core.model_file import load_model
from medgan_core.sharing import norm_array_names
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data
from server.export import export_model
from server.run_folder import RunFolder

runner = CliRunner()


def _exported(tmp_path: Path, site: Path, **aggregation: object) -> Path:
    study = StudyConfig().replace(task={"name": "denoise", "image_size": 16, "width": 8, "batch_size": 8},
                                  aggregation=aggregation)
    folder = RunFolder(tmp_path / "run").start(study)
    task = build_task(study.task)
    task.train(load_task_data(site, study.task), 3, seed=0)
    save_checkpoint(folder.checkpoint(1), task.get_weights(), {"round": 1, "study": study.to_dict()})
    folder.append_metrics({"round": 1, "sites": [{"node": 1, "train": {}}], "evaluate": {}})
    return export_model(folder.root, tmp_path / "study.medgan", for_new_site=bool(aggregation))


def test_adapt_trains_only_the_site_kept_layers(tiny_sites: list[Path], tmp_path: Path) -> None:
    model = load_model(_exported(tmp_path, tiny_sites[0], local_norm=True))
    kept = site_kept_arrays(model)
    assert kept and kept == norm_array_names(model.build().groups)  # FedBN's layers, from the provenance
    result = adapt_model(model, tiny_sites[1], tmp_path / "ours.medgan", steps=4)
    adapted = load_model(result.path)
    for name, value in model.arrays.items():
        if name in kept:
            continue
        np.testing.assert_array_equal(adapted.arrays[name], value)  # shared arrays: exactly the study's
    assert any(not np.array_equal(adapted.arrays[n], model.arrays[n]) for n in kept)  # fitted to this site
    record = adapted.provenance["adapted"]
    assert record["steps"] == 4 and record["training-records"] > 0 and "psnr" in record["held-out-after"]
    assert record["held-out-before"]["psnr"] != record["held-out-after"]["psnr"]
    assert adapted.provenance["study-id"] == model.provenance["study-id"]  # the study it came from, kept


def test_adapt_refuses_a_model_without_site_kept_layers_unless_all_layers(tiny_sites: list[Path],
                                                                           tmp_path: Path) -> None:
    model = load_model(_exported(tmp_path, tiny_sites[0]))
    with pytest.raises(MedGANError, match="kept no layers .* --all-layers"):
        adapt_model(model, tiny_sites[1], tmp_path / "x.medgan", steps=2)
    result = adapt_model(model, tiny_sites[1], tmp_path / "all.medgan", steps=2, all_layers=True)
    assert result.layers == len(model.arrays)
    with pytest.raises(MedGANError, match="at least one step"):
        adapt_model(model, tiny_sites[1], tmp_path / "y.medgan", steps=0)


def test_the_command_prints_the_scores_and_refuses_to_overwrite(tiny_sites: list[Path], tmp_path: Path) -> None:
    exported = _exported(tmp_path, tiny_sites[0], local_norm=True)
    out = tmp_path / "ours.medgan"
    result = runner.invoke(app, ["adapt", "--model", str(exported), "--data", str(tiny_sites[1]), "--out", str(out),
                                 "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "held-out at this site: psnr" in result.output and out.is_file()
    again = runner.invoke(app, ["adapt", "--model", str(exported), "--data", str(tiny_sites[1]), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    missing = runner.invoke(app, ["adapt", "--model", str(exported), "--data", str(tmp_path / "nowhere"),
                                  "--out", str(tmp_path / "z.medgan")])
    assert missing.exit_code == 2 and "manifest" in missing.output and "Traceback" not in missing.output


def test_adapt_keeps_the_best_model_on_the_sites_validation_subjects(tiny_sites: list[Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With validation subjects the model kept is the best scored there (the study's own
    model included), not the last; without them, or with --validate-every 0, the last."""
    from medgan_core.tasks.paired import PairedImageTask

    model = load_model(_exported(tmp_path, tiny_sites[0], local_norm=True))
    def adapted(name: str, steps: int, every: int, validation: list[float]):  # type: ignore[no-untyped-def]
        scores = iter(validation)  # before any step, then after each part of ``every`` steps
        monkeypatch.setattr(PairedImageTask, "validation_score", lambda self, held_out: next(scores))
        return adapt_model(model, tiny_sites[1], tmp_path / f"{name}.medgan", steps=steps, validate_every=every)

    chosen = adapted("best", 6, 2, [0.0, 5.0, 1.0, 2.0])  # the first part of 2 steps scores best
    assert chosen.kept_steps == 2
    record = load_model(chosen.path).provenance["adapted"]
    assert record["steps"] == 2 and record["steps-asked"] == 6 and "validation slices" in record["kept"]
    improving = adapted("improving", 6, 2, [0.0, 1.0, 2.0, 3.0])
    two = adapted("two", 2, 2, [0.0, 1.0])
    assert (improving.kept_steps, two.kept_steps) == (6, 2)
    # the model kept is the one its first 2 steps gave, not the one 6 steps give
    best, after_two, after_six = (load_model(r.path).arrays for r in (chosen, two, improving))
    kept = site_kept_arrays(model)
    assert all(np.array_equal(best[n], after_two[n]) for n in kept)
    assert any(not np.allclose(best[n], after_six[n]) for n in kept)
    last = adapt_model(model, tiny_sites[1], tmp_path / "last.medgan", steps=6, validate_every=0)
    assert last.kept_steps == 6 and load_model(last.path).provenance["adapted"]["kept"] == "the last step"
    with pytest.raises(MedGANError, match="--validate-every -1"):
        adapt_model(model, tiny_sites[1], tmp_path / "bad.medgan", steps=2, validate_every=-1)
