"""A site's images for one task: what a client trains and evaluates on. Never leaves the site."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medgan_core.config import TaskConfig
from medgan_core.data.manifest import Manifest, ManifestEntry, read_manifest
from medgan_core.data.preprocess import volume_to_slices
from medgan_core.errors import DataError

SINGLE, LOW_DOSE_PAIRS = "single", "low-dose-pairs"


@dataclass
class SiteData:
    """Preprocessed slices of one site, by split, for the task's modality.

    ``train``/``test`` are the images to model (targets of paired tasks); paired tasks
    also have ``train_input``/``test_input``, slice for slice.
    """

    site: str
    train: torch.Tensor
    test: torch.Tensor
    train_input: torch.Tensor | None = None
    test_input: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.train.shape[0])


def load_site_data(data_path: str | Path, task: TaskConfig, kind: str = SINGLE) -> SiteData:
    """Read the site manifest and every image the task needs.

    The held-out metric uses the ``test`` split; ``val`` stands in when a site has no
    test subjects. ``kind`` is ``single`` (one image per slice) or ``low-dose-pairs``
    (a reduced-dose series and its full-dose partner, matched by ``pair_id``).
    """
    manifest = read_manifest(data_path)
    test_split = "test" if manifest.select(modality=task.modality, split="test") else "val"
    if kind == SINGLE:
        train = _stack(manifest, task, _need(manifest, task, "train"))
        test_entries = manifest.select(modality=task.modality, split=test_split)
        if not test_entries:
            raise DataError(f"{manifest.path}: no test or val images of modality {task.modality} to evaluate on")
        return SiteData(manifest.root.name, train, _stack(manifest, task, test_entries))
    if kind == LOW_DOSE_PAIRS:
        train_in, train = _pairs(manifest, task, "train")
        test_in, test = _pairs(manifest, task, test_split)
        return SiteData(manifest.root.name, train, test, train_in, test_in)
    raise ValueError(f"unknown data kind {kind!r}")


def _need(manifest: Manifest, task: TaskConfig, split: str) -> list[ManifestEntry]:
    entries = manifest.select(modality=task.modality, split=split)
    if not entries:
        raise DataError(f"{manifest.path}: no {split} images of modality {task.modality}")
    return entries


def _pairs(manifest: Manifest, task: TaskConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-dose inputs, full-dose targets) of a split, matched by pair_id."""
    full = {e.pair_id or e.subject: e for e in manifest.select(modality=task.modality, split=split)}
    low = {e.pair_id or e.subject: e for e in manifest.select(modality=task.modality, split=split, low_dose=True)}
    keys = sorted(full.keys() & low.keys())
    if not keys:
        raise DataError(
            f"{manifest.path}: no {split} pairs of low-dose and full-dose {task.modality} series "
            "(a low-dose series has a domain ending in '-low-dose' and the pair_id of its full-dose partner)"
        )
    inputs = _stack(manifest, task, [low[k] for k in keys])
    targets = _stack(manifest, task, [full[k] for k in keys])
    if inputs.shape != targets.shape:
        raise DataError(f"{manifest.path}: low-dose and full-dose series of a pair differ in slice count")
    return inputs, targets


def _stack(manifest: Manifest, task: TaskConfig, entries: list[ManifestEntry]) -> torch.Tensor:
    window = (task.window_low, task.window_high)
    return torch.cat([volume_to_slices(manifest.load(e), task.image_size, window) for e in entries])
