"""A model file that applies itself: trained weights plus what applying them needs.

One safetensors file (no pickle: loading a model cannot run code) whose metadata holds
the format, the task's settings (name, modality, image size, pixel spacing, CT window, the task's own
keys: everything preprocessing and the network need), and the provenance a reader of
its outputs should know: study id, round, sites, aggregation policy, ε per site and δ,
what it was trained on, where site-kept layers came from, and the code version.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medgan_core.checkpoints import load_checkpoint, save_checkpoint
from medgan_core.config import TaskConfig
from medgan_core.errors import MedGANError
from medgan_core.tasks.base import Task
from medgan_core.tasks.registry import build_task, task_config_from_items

#: 2: image-to-image CT models work at a pixel size (``spacing``) over the whole CT range.
#: 3: ``recon`` works on the acquired k-space matrix (or ``spacing``), no longer the central
#: ``image-size``.
#: 4: ``cycle`` works at clinical geometry too, its discriminators reading two views of an image.
#: An older model of a task whose format did not change since reads the same and still loads.
FORMAT = "medgan-model/4"
STILL_READ = ("medgan-model/2", "medgan-model/3", FORMAT)
#: A task's models made before the format that changed how it reads images, and why they are refused.
CHANGED_IN = {
    "recon": ("medgan-model/3", "it reconstructs the central image-size of k-space; this version reconstructs the "
                                "acquired matrix or task.spacing"),
    "cycle": ("medgan-model/4", "it harmonises whole slices resized to image-size in the CT window; this version "
                                "works at task.spacing over the whole CT range"),
}
SUFFIX = ".medgan"


@dataclass(frozen=True)
class ModelFile:
    arrays: dict[str, np.ndarray]
    task: TaskConfig
    provenance: dict[str, Any]

    def build(self, device: torch.device | str = "cpu") -> Task:
        """The task with these weights, ready to apply (a shape or name mismatch is an error)."""
        task = build_task(self.task, device)
        task.set_weights(self.arrays, source="model file")
        return task


def code_version() -> str:
    try:
        return metadata.version("medgan-fl")
    except metadata.PackageNotFoundError:
        return "unknown"


def save_model(path: str | Path, arrays: Mapping[str, np.ndarray], task: TaskConfig,
               provenance: Mapping[str, Any]) -> Path:
    build_task(task).set_weights(dict(arrays), source="weights to export")  # refuse a model that cannot load
    return save_checkpoint(path, arrays, {"format": FORMAT, "task": task.to_items(),
                                          "provenance": {**provenance, "code-version": code_version()}})


def load_model(path: str | Path) -> ModelFile:
    path = Path(path)
    arrays, meta = load_checkpoint(path)
    if meta.get("format") == "medgan-model/1":
        raise MedGANError(f"{path} was made by an older version (whole slices resized, CT windowed); this version "
                          "applies models trained at clinical geometry: train and export the study again")
    if meta.get("format") not in STILL_READ:
        raise MedGANError(f"{path} is not a MedGAN-FL model file (format {meta.get('format')!r}, expected {FORMAT}); "
                          "make one with 'medgan export'")
    task_items = meta.get("task")
    if not isinstance(task_items, dict):
        raise MedGANError(f"{path}: its metadata holds no task settings; make the model again with 'medgan export'")
    name = task_items.get("name")
    if name in CHANGED_IN and STILL_READ.index(meta["format"]) < STILL_READ.index(CHANGED_IN[name][0]):
        raise MedGANError(f"{path} is a {name} model made by an older version ({CHANGED_IN[name][1]}): train and "
                          "export the study again")
    task = task_config_from_items(task_items, str(path))
    model = ModelFile(arrays, task, dict(meta.get("provenance", {})))
    model.build()  # names and shapes checked now, not halfway through a folder of scans
    return model
