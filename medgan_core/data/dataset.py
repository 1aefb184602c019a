"""A site's images for one task: what a client trains and evaluates on. Never leaves the site."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medgan_core.config import TaskConfig
from medgan_core.data.manifest import Manifest, read_manifest
from medgan_core.data.preprocess import volume_to_slices
from medgan_core.errors import DataError


@dataclass
class SiteData:
    """Preprocessed slices of one site, by split, for the task's modality."""

    site: str
    train: torch.Tensor
    test: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.train.shape[0])


def load_site_data(data_path: str | Path, task: TaskConfig) -> SiteData:
    """Read the site manifest and every image it lists for the task's modality.

    The held-out metric uses the ``test`` split; ``val`` falls back to it when a site
    has no test subjects.
    """
    manifest = read_manifest(data_path)
    train = _stack(manifest, task, "train")
    test = _stack(manifest, task, "test", allow_empty=True)
    if test is None:
        test = _stack(manifest, task, "val", allow_empty=True)
    if test is None:
        raise DataError(f"{manifest.path}: no test or val images of modality {task.modality} to evaluate on")
    return SiteData(site=manifest.root.name, train=train, test=test)


def _stack(manifest: Manifest, task: TaskConfig, split: str, allow_empty: bool = False) -> torch.Tensor | None:
    entries = manifest.select(modality=task.modality, split=split)
    if not entries:
        if allow_empty:
            return None
        raise DataError(f"{manifest.path}: no {split} images of modality {task.modality}")
    window = (task.window_low, task.window_high)
    return torch.cat([volume_to_slices(manifest.load(e), task.image_size, window) for e in entries])
