"""``medgan site check``: decode every image a site would train on, before any round.

Each manifest row is read the way training reads it (same decoders, Modality LUT,
orientation, modality check); with a task, the task's own data is assembled too, so
missing pairs or labels show here rather than mid-study. Every problem is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from medgan_core.data.kspace import read_kspace
from medgan_core.data.manifest import ManifestEntry, read_manifest, variant_of
from medgan_core.errors import MedGANError


@dataclass(frozen=True)
class SeriesReport:
    """What one manifest row holds, or why it cannot be read."""

    file: str
    modality: str
    split: str
    slices: int = 0
    size: str = ""
    spacing: str = ""
    value_range: str = ""
    problem: str = ""


def check_site_data(
    data_path: str | Path, task: str = "", progress: Callable[[int, int], None] | None = None
) -> tuple[list[SeriesReport], list[str]]:
    """A report per manifest row, and the problems (empty: every image reads). A broken
    manifest (missing file, duplicate row, subject in two splits, path outside) is the
    first and only problem."""
    try:
        manifest = read_manifest(data_path)
    except MedGANError as exc:
        return [], [str(exc)]
    reports = []
    for done, entry in enumerate(manifest.entries, start=1):
        if variant_of(entry.domain).startswith("kspace-"):  # complex k-space, not an image
            reports.append(_kspace_report(manifest.root, entry))
        else:
            reports.append(_report(manifest.load, entry))
        if progress is not None:
            progress(done, len(manifest.entries))
    problems = [f"{r.file}: {r.problem}" if r.file not in r.problem else r.problem for r in reports if r.problem]
    if task and not problems:
        problems += _task_problems(data_path, task, manifest.entries)
    return reports, problems


def _report(load: Callable[[ManifestEntry], object], entry: ManifestEntry) -> SeriesReport:
    base = SeriesReport(entry.file, entry.modality, entry.split)
    try:
        volume = load(entry)
    except MedGANError as exc:
        return SeriesReport(entry.file, entry.modality, entry.split, problem=" ".join(str(exc).split()))
    data = volume.data  # type: ignore[attr-defined]
    if not np.all(np.isfinite(data)):
        return SeriesReport(entry.file, entry.modality, entry.split, problem="holds NaN or infinite values")
    i, j, k = volume.spacing  # type: ignore[attr-defined]
    return SeriesReport(base.file, base.modality, base.split, slices=int(data.shape[2]),
                        size=f"{data.shape[1]}×{data.shape[0]}", spacing=f"{j:.2f}×{i:.2f}×{k:.2f}",
                        value_range=f"{float(data.min()):.0f} … {float(data.max()):.0f}")


def _kspace_report(root: Path, entry: ManifestEntry) -> SeriesReport:
    try:
        kspace = read_kspace(root / entry.file)
    except MedGANError as exc:
        return SeriesReport(entry.file, entry.modality, entry.split, problem=" ".join(str(exc).split()))
    return SeriesReport(entry.file, entry.modality, entry.split, slices=int(kspace.shape[0]),
                        size=f"{kspace.shape[1]}×{kspace.shape[2]} k-space",
                        value_range=f"|k| ≤ {float(np.abs(kspace).max()):.3g}")


def _task_problems(data_path: str | Path, task: str, entries: tuple[ManifestEntry, ...]) -> list[str]:
    """Assemble the task's training data (pairs, labels, splits) as a round would."""
    from medgan_core.tasks.registry import load_task_data, task_class, task_config

    try:
        cls = task_class(task)
        modalities = cls.modalities or tuple(m for m in ("CT", "MR") if any(e.modality == m for e in entries)) or ("CT",)
        config = task_config(name=task, modality=modalities[0])
        load_task_data(data_path, config)
    except MedGANError as exc:
        return [f"task {task}: " + " ".join(str(exc).split())]
    return []
