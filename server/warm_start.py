"""A study's starting weights: the task's seeded initialisation, or a warm start.

``run.initial-model`` names a ``.medgan`` model file (``medgan export``) whose weights start
round 0 instead. It is meant for a model trained on public data, such as the project's own
simulator: DP-SGD protects only what the sites' images add from round 1 on, so whatever the
starting model learned is outside every site's ε. A model made for another task, modality,
pixel size, patch or width is refused in one line that names the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medgan_core.errors import MedGANError
from medgan_core.model_file import load_model
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.base import Task

#: Task settings a starting model must share with the study: they fix what the weights mean.
MUST_MATCH = ("name", "modality", "image-size", "spacing", "width")


def initial_weights(study: StudyConfig) -> dict[str, np.ndarray] | None:
    """The warm start's arrays (None: the task's own initialisation)."""
    if not study.run.initial_model:
        return None
    path = Path(study.run.initial_model).expanduser()
    if not path.is_file():
        raise MedGANError(f"run.initial-model = {study.run.initial_model!r}: no such file; make one with 'medgan export'")
    model = load_model(path)
    theirs, ours = model.task.to_items(), study.task.to_items()
    for key in MUST_MATCH:
        if theirs.get(key) != ours.get(key):
            raise MedGANError(f"run.initial-model {path} was made for task.{key} = {theirs.get(key)!r}; this study "
                              f"trains task.{key} = {ours.get(key)!r}")
    return model.arrays


def start_from_initial_model(task: Task, study: StudyConfig) -> None:
    """Put the warm start's weights on ``task`` (nothing without ``run.initial-model``)."""
    warm = initial_weights(study)
    if warm is not None:
        task.set_weights(warm, source=f"run.initial-model {study.run.initial_model}")


def initial_model_provenance(study: StudyConfig) -> dict[str, Any] | None:
    """What a model file records about the warm start it grew from (None: no warm start)."""
    if not study.run.initial_model:
        return None
    path = Path(study.run.initial_model).expanduser()
    try:
        trained_on = load_model(path).provenance.get("trained-on", "unknown")
    except MedGANError:
        trained_on = "unknown (the file is no longer readable)"
    return {"file": path.name, "trained-on": trained_on,
            "note": "its weights started round 0; what it learned is outside the sites' ε"}
