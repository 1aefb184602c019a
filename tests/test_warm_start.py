"""A warm start (``run.initial-model``): the study starts from the file's weights, refuses a
model made for other settings before anything starts. (A federation from it, SecAgg+ included, and
its export: ``test_server_privacy_options``.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medgan_core.errors import MedGANError
from medgan_core.model_file import load_model, save_model
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, replace_task
from server.warm_start import initial_weights

STUDY = StudyConfig().replace(
    run={"rounds": 1, "num_sites": 2, "device": "cpu"},
    task={"name": "denoise", "image_size": 16, "batch_size": 4, "local_steps": 1, "width": 8},
    privacy={"enabled": False})


def _public_model(tmp_path: Path, study: StudyConfig = STUDY) -> Path:
    """A model of the study's task with other weights than the study's seeded start."""
    task = build_task(replace_task(study.task, seed=7))
    return save_model(tmp_path / "public.medgan", task.get_weights(), study.task,
                      {"trained-on": "the project's simulator (public phantoms)"})


def test_no_initial_model_keeps_the_seeded_start() -> None:
    assert initial_weights(STUDY) is None


def test_the_initial_model_gives_the_starting_weights(tmp_path: Path) -> None:
    path = _public_model(tmp_path)
    warm = initial_weights(STUDY.replace(run={"initial_model": str(path)}))
    seeded = build_task(STUDY.task).get_weights()
    assert warm is not None and set(warm) == set(seeded)
    assert all(np.array_equal(warm[k], v) for k, v in load_model(path).arrays.items())
    assert any(not np.array_equal(warm[k], seeded[k]) for k in seeded)


@pytest.mark.parametrize("change, key", [({"width": 16}, "width"), ({"spacing": 1.0}, "spacing"),
                                         ({"name": "superres"}, "name")])
def test_a_model_made_for_other_settings_is_refused_naming_the_key(tmp_path: Path, change: dict, key: str) -> None:
    path = _public_model(tmp_path)
    study = STUDY.replace(run={"initial_model": str(path)}, task=change)
    with pytest.raises(MedGANError, match=f"was made for task.{key} = .*; this study trains task.{key}"):
        initial_weights(study)


def test_a_missing_or_foreign_file_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(MedGANError, match="run.initial-model = .*no such file"):
        initial_weights(STUDY.replace(run={"initial_model": str(tmp_path / "absent.medgan")}))
    (tmp_path / "junk.medgan").write_bytes(b"not a model")
    with pytest.raises(MedGANError):
        initial_weights(STUDY.replace(run={"initial_model": str(tmp_path / "junk.medgan")}))


def test_a_bad_initial_model_stops_the_simulation_before_it_starts(tiny_sites: list[Path], tmp_path: Path) -> None:
    from medgan.simulation import simulate_federation

    path = _public_model(tmp_path)
    study = STUDY.replace(run={"initial_model": str(path)}, task={"width": 16})
    with pytest.raises(MedGANError, match="task.width"):
        simulate_federation(study, tiny_sites, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no run folder, no Ray
