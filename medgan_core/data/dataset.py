"""A site's images for one task: what a client trains and evaluates on. Never leaves the site."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from medgan_core.config import TaskConfig
from medgan_core.data.kspace import matrix_at, read_kspace, reconstruction_pair
from medgan_core.data.manifest import SEGMENTATION, Manifest, ManifestEntry, read_manifest
from medgan_core.data.preprocess import (
    CT_FULL_RANGE,
    normalise_values,
    resample_slices,
    resample_to,
    volume_to_slices,
)
from medgan_core.data.slice_store import cache_key, open_arrays, source_fingerprint, stack_series, store_arrays
from medgan_core.data.volume import Volume
from medgan_core.data.labels import lesion_burden
from medgan_core.errors import DataError
from medgan_core.fileio import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slices:
    """One image per slice of ``task.modality`` (synthesis)."""


@dataclass(frozen=True)
class SlicesWithBurden:
    """Slices and each slice's lesion burden, from the subject's label map (conditional synthesis)."""


@dataclass(frozen=True)
class DegradedPairs:
    """(degraded, original) slices of the same subject, matched by ``pair_id``: the
    degraded series' domain ends in ``-<variant>`` (``low-dose``, ``low-res-x2``).

    ``clinical``: at clinical geometry. Whole slices resampled to ``task.spacing`` mm
    (0: the original series' own pixels), CT over its whole range (``CT_FULL_RANGE``), the
    degraded series resampled onto the original's grid (bicubic: what a viewer shows of a
    coarser acquisition, and the classical baseline); kept on disk when the site has a
    cache folder. Otherwise both are resized whole to ``image-size`` (the test pairs of
    unpaired harmonisation). ``scale``: how much coarser the degraded grid is."""

    variant: str
    scale: int = 1
    clinical: bool = False


@dataclass(frozen=True)
class KSpacePairs:
    """(undersampled k-space, fully sampled image) of MR at an ``acceleration`` (4, 10), as
    whole slices on the acquired matrix (``task.spacing`` 0) or on the coarser one of
    ``task.spacing`` mm over the same field of view (k-space cropped: the measured lines
    stay exact). ``tv_weight`` > 0: each input also carries its TV compressed-sensing
    reconstruction at that λ (``task.tv-start``)."""

    acceleration: int
    tv_weight: float = 0.0


@dataclass(frozen=True)
class ModalityPairs:
    """The same subject's ``source``-modality slices as inputs to ``task.modality`` targets.

    ``clinical``: at clinical geometry, as ``DegradedPairs``: targets at ``task.spacing``
    (0: their own pixels), CT over its whole range, each input resampled onto its target's
    grid (the same field of view: an MR of 256 pixels onto a CT of 512)."""

    source: str
    clinical: bool = False


@dataclass(frozen=True)
class UnpairedDomains:
    """Images of two domains (the main scanner, and a ``variant`` series such as
    ``scanner-b``) from disjoint training subjects; held out, paired by subject.

    ``clinical``: at clinical geometry, as ``DegradedPairs``: whole slices of both domains at
    ``task.spacing`` (0: each series' own pixels), CT over its whole range, kept on disk when
    the site has a cache folder; the held-out pairs as ``DegradedPairs(clinical=True)``."""

    variant: str
    clinical: bool = False


#: What a task reads from a site (``Task.data_spec``).
DataSpec = Slices | SlicesWithBurden | DegradedPairs | KSpacePairs | ModalityPairs | UnpairedDomains


@dataclass
class SiteData:
    """Preprocessed slices of one site, by split, for the task's modality.

    ``train``/``test`` are the images to model (targets of paired tasks); paired tasks
    also have ``train_input``/``test_input``, slice for slice. Unpaired tasks have a
    ``train_input`` of its own length (the other domain, other subjects). Conditional
    tasks have ``train_condition``/``test_condition``: one severity score per slice.
    Paired data at clinical geometry has ``train_series``/``test_series``: the slice count
    of each series in the order they are stacked, so a slice's neighbours (2.5D context,
    ``task.context-slices``) are found within its own series. ``train_subjects`` numbers each
    training row's patient (``train_input`` rows alike, but for unpaired data, whose other
    domain has ``train_input_subjects``): DP at the patient level samples patients, not slices.
    """

    site: str
    train: torch.Tensor
    test: torch.Tensor
    train_input: torch.Tensor | None = None
    test_input: torch.Tensor | None = None
    train_condition: torch.Tensor | None = None
    test_condition: torch.Tensor | None = None
    train_series: torch.Tensor | None = None
    test_series: torch.Tensor | None = None
    train_subjects: torch.Tensor | None = None
    train_input_subjects: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.train.shape[0])


#: Task settings that shape training steps, not the data read: they do not key the decoded
#: data, so a site's own ``physical-batch`` or a new learning rate reuses the same cache.
STEP_SETTINGS = frozenset({"batch_size", "physical_batch", "local_steps", "lr_generator", "lr_discriminator",
                           "width", "lr_schedule", "precision"})


def load_site_data(
    data_path: str | Path, task: TaskConfig, spec: DataSpec = Slices(), cache_dir: Path | None = None
) -> SiteData:
    """Read the site manifest and every image the task's ``spec`` names.

    The held-out metric uses the ``test`` split; ``val`` stands in when a site has no
    test subjects. With ``cache_dir`` (a folder private to the site) the decoded data is
    kept there memory-mapped (``medgan_core.data.slice_store``): clinical-geometry slices
    series by series; any other task's arrays whole, keyed by the source files' names, sizes
    and times and the task settings, so every process of the site on the machine (simulated
    sites share a few Ray workers) maps one copy instead of decoding its own.
    """
    manifest = read_manifest(data_path)
    if cache_dir is None or _is_clinical(spec):
        return _load(manifest, task, spec, cache_dir)
    # Decoded once for all of this site's processes on the machine, then memory-mapped.
    sources = [manifest.path, *(manifest.root / e.file for e in manifest.entries)]
    settings = {k: v for k, v in asdict(task).items() if k not in STEP_SETTINGS}
    arrays = [f.name for f in fields(SiteData) if f.name != "site"]
    key = "site-" + cache_key({"spec": repr(spec), "task": settings, "sources": source_fingerprint(sources),
                               "fields": arrays})  # a cache written before a field existed lacks it
    names = cache_dir / f"{key}-fields.json"
    if names.is_file() and (found := open_arrays(json.loads(names.read_text()), cache_dir, key)) is not None:
        return SiteData(manifest.root.name, **found)  # type: ignore[arg-type]
    data = _load(manifest, task, spec, None)
    present = {name: getattr(data, name) for name in arrays if getattr(data, name) is not None}
    stored = store_arrays(present, cache_dir, key)
    atomic_write_text(names, json.dumps(sorted(present)))  # last: the files it names are all in place
    os.chmod(names, 0o600)
    return SiteData(data.site, **stored)  # type: ignore[arg-type]


def _is_clinical(spec: DataSpec) -> bool:
    return isinstance(spec, (DegradedPairs, ModalityPairs, UnpairedDomains)) and spec.clinical


def load_validation_data(data_path: str | Path, task: TaskConfig, spec: DataSpec,
                         cache_dir: Path | None = None) -> SiteData | None:
    """The site's validation subjects (split ``val``) as ``test``/``test_input`` (and as the
    training fields: a ``SiteData`` needs them; nothing trains on them), or None where the
    site has none. Read only when a fine-tune chooses its model by them, so a round never
    pays for it; slices at clinical geometry are cached like the other splits."""
    manifest = read_manifest(data_path)
    if not manifest.select(modality=task.modality, split="val"):
        return None
    return _load(manifest, task, spec, cache_dir if _is_clinical(spec) else None, splits=("val", "val"))


_Split = TypeVar("_Split")  # what a paired spec reads of one split: (inputs, targets[, series])


def _load(manifest: Manifest, task: TaskConfig, spec: DataSpec, cache_dir: Path | None,
          splits: tuple[str, str] | None = None) -> SiteData:
    """The ``splits`` (training, held-out) of the site; by default train and test, or val
    where the site has no test subjects."""
    train_split, test_split = splits or (
        "train", "test" if manifest.select(modality=task.modality, split="test") else "val")
    site = manifest.root.name

    def both(pairs: Callable[[str], _Split]) -> tuple[_Split, _Split]:
        """A paired spec's (inputs, targets) of both splits, read once where they are one split."""
        train = pairs(train_split)
        return train, (train if test_split == train_split else pairs(test_split))

    match spec:
        case Slices():
            train, subjects = _stack_with_subjects(manifest, task, _need(manifest, task, train_split))
            test_entries = manifest.select(modality=task.modality, split=test_split)
            if not test_entries:
                raise DataError(f"{manifest.path}: no test or val images of modality {task.modality} to evaluate on")
            return SiteData(site, train, _stack(manifest, task, test_entries), train_subjects=subjects)
        case SlicesWithBurden():
            train, train_c, subjects = _with_burden(manifest, task, train_split)
            test, test_c, _ = _with_burden(manifest, task, test_split)
            return SiteData(site, train, test, train_condition=train_c, test_condition=test_c,
                            train_subjects=subjects)
        case UnpairedDomains(variant=variant, clinical=clinical):
            domain_b, domain_a, keys = _variant_pairs(manifest, task, train_split, variant,
                                                      "main-scanner and scanner-B")
            if len(keys) < 2:
                raise DataError(f"{manifest.path}: unpaired training needs at least 2 training subjects (one per scanner)")
            keys_a, keys_b = unpaired_subjects(keys)
            entries_a, entries_b = [domain_a[k] for k in keys_a], [domain_b[k] for k in keys_b]
            if clinical:
                train_a, subjects_a = _clinical_series(manifest, task, entries_a, cache_dir, "train-a")
                train_b, subjects_b = _clinical_series(manifest, task, entries_b, cache_dir, f"train-{variant}")
                test_b, test_a, _, _ = _clinical_pairs(manifest, task, test_split,
                                                       DegradedPairs(variant, clinical=True), cache_dir)
            else:
                train_a, subjects_a = _stack_with_subjects(manifest, task, entries_a)
                train_b, subjects_b = _stack_with_subjects(manifest, task, entries_b)
                test_b, test_a, _ = _pairs(manifest, task, test_split, DegradedPairs(variant))
            return SiteData(site, train_a, test_a, train_b, test_b, train_subjects=subjects_a,
                            train_input_subjects=subjects_b)
        case DegradedPairs(clinical=True) | ModalityPairs(clinical=True):
            (train_in, train, train_series, subjects), (test_in, test, test_series, _) = both(
                lambda split: _clinical_pairs(manifest, task, split, spec, cache_dir))
            return SiteData(site, train, test, train_in, test_in, train_series=train_series, test_series=test_series,
                            train_subjects=subjects)
        case ModalityPairs(source=source):
            (train_in, train, subjects), (test_in, test, _) = both(
                lambda split: _modality_pairs(manifest, task, split, source))
            return SiteData(site, train, test, train_in, test_in, train_subjects=subjects)
        case DegradedPairs():
            (train_in, train, subjects), (test_in, test, _) = both(lambda split: _pairs(manifest, task, split, spec))
            return SiteData(site, train, test, train_in, test_in, train_subjects=subjects)
        case KSpacePairs(acceleration=acceleration, tv_weight=tv_weight):
            (train_in, train, subjects), (test_in, test, _) = both(
                lambda split: _kspace_pairs(manifest, task, split, f"kspace-r{acceleration}", tv_weight))
            return SiteData(site, train, test, train_in, test_in, train_subjects=subjects)
    raise TypeError(f"{spec!r} is not a DataSpec")


def _need(manifest: Manifest, task: TaskConfig, split: str) -> list[ManifestEntry]:
    entries = manifest.select(modality=task.modality, split=split)
    if not entries:
        raise DataError(f"{manifest.path}: no {split} images of modality {task.modality}")
    return entries


def _pairs(manifest: Manifest, task: TaskConfig, split: str,
           spec: DegradedPairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(degraded inputs, original targets, each row's subject) of a split, matched by pair_id, resized whole."""
    variant = spec.variant
    what = "low-dose and full-dose" if variant == "low-dose" else f"{variant} and original"
    low, full, keys = _variant_pairs(manifest, task, split, variant, what)
    targets, subjects = _stack_with_subjects(manifest, task, [full[k] for k in keys])
    inputs = _stack(manifest, task, [low[k] for k in keys])
    if inputs.shape != targets.shape:
        raise DataError(f"{manifest.path}: the {what} series of a pair differ in slice count")
    return inputs, targets, subjects


def _clinical_pairs(
    manifest: Manifest, task: TaskConfig, split: str, spec: DegradedPairs | ModalityPairs, cache_dir: Path | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, each series' slice count, each row's subject) of a split at clinical
    geometry (``DegradedPairs``, ``ModalityPairs``)."""
    if isinstance(spec, DegradedPairs):
        what = "low-dose and full-dose" if spec.variant == "low-dose" else f"{spec.variant} and original"
        low, full, keys = _variant_pairs(manifest, task, split, spec.variant, what)
        mode, tag = ("bicubic" if spec.scale > 1 else "bilinear"), spec.variant
    else:
        what = f"{spec.source} and {task.modality}"
        low, full, keys = _modality_matched(manifest, task, split, spec.source)
        mode, tag = "bilinear", f"{spec.source}-{task.modality}"

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for key in keys:
            target_volume, input_volume = manifest.load(full[key]), manifest.load(low[key])
            target = clinical_slices(target_volume, task.spacing, CT_FULL_RANGE)
            inputs = clinical_slices(input_volume, 0.0, CT_FULL_RANGE)
            if inputs.shape[0] != target.shape[0]:
                raise DataError(f"{manifest.path}: the {what} series of {key} differ in slice count")
            if not same_field_of_view(input_volume, target_volume):
                raise DataError(f"{manifest.path}: the {what} series of {key} cover different fields of view")
            yield resample_to(inputs, tuple(target.shape[-2:]), mode)[:, 0].clamp(-1, 1).numpy(), target[:, 0].numpy()

    sources = [manifest.root / e.file for k in keys for e in (low[k], full[k])]
    key = cache_key({"spec": repr(spec), "split": split, "spacing": task.spacing, "range": CT_FULL_RANGE,
                     "modality": task.modality, "sources": source_fingerprint(sources)})
    (inputs, targets), series = stack_series(pairs(), 2, cache_dir, f"{split}-{tag}-{key}")
    return inputs, targets, series, subject_rows([full[k].subject for k in keys], series.tolist())


def _clinical_series(
    manifest: Manifest, task: TaskConfig, entries: list[ManifestEntry], cache_dir: Path | None, tag: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slices of ``entries`` at clinical geometry (``task.spacing``, the whole CT range),
    one canvas, stored memory-mapped in ``cache_dir`` when given; and each slice's subject."""
    def series() -> Iterator[tuple[np.ndarray]]:
        for entry in entries:
            yield (clinical_slices(manifest.load(entry), task.spacing, CT_FULL_RANGE)[:, 0].numpy(),)

    key = cache_key({"split": tag, "spacing": task.spacing, "range": CT_FULL_RANGE, "modality": task.modality,
                     "sources": source_fingerprint([manifest.root / e.file for e in entries])})
    (slices,), counts = stack_series(series(), 1, cache_dir, f"{tag}-{key}")
    return slices, subject_rows([e.subject for e in entries], counts.tolist())


def clinical_slices(volume: Volume, spacing: float, ct_range: tuple[float, float]) -> torch.Tensor:
    """A volume's axial slices as (k, 1, R, C) in [-1, 1] at ``spacing`` mm (0: its own)."""
    slices = normalise_values(volume.axial_slices(), volume.modality, ct_range)
    col_mm, row_mm, _ = volume.spacing
    return resample_slices(slices, (row_mm, col_mm), spacing)


def same_field_of_view(a: Volume, b: Volume) -> bool:
    """Whether two volumes' slices cover the same in-plane extent (within one coarse pixel)."""
    extent = lambda v: np.array(v.data.shape[:2]) * np.array(v.spacing[:2])  # noqa: E731
    tolerance = max(max(a.spacing[:2]), max(b.spacing[:2])) * 1.01
    return bool(np.all(np.abs(extent(a) - extent(b)) <= tolerance))


def _matched(
    manifest: Manifest, inputs: list[ManifestEntry], targets: list[ManifestEntry], problem: str
) -> tuple[dict[str, ManifestEntry], dict[str, ManifestEntry], list[str]]:
    """Input and target entries keyed by pair_id (or subject), and the keys both have;
    none in common is a DataError that ends with ``problem``."""
    low = {e.pair_id or e.subject: e for e in inputs}
    full = {e.pair_id or e.subject: e for e in targets}
    keys = sorted(full.keys() & low.keys())
    if not keys:
        raise DataError(f"{manifest.path}: {problem}")
    return low, full, keys


def _variant_pairs(
    manifest: Manifest, task: TaskConfig, split: str, variant: str, what: str
) -> tuple[dict[str, ManifestEntry], dict[str, ManifestEntry], list[str]]:
    """Entries of a degraded ``variant`` series and of its original, matched."""
    return _matched(
        manifest,
        manifest.select(modality=task.modality, split=split, variant=variant),
        manifest.select(modality=task.modality, split=split),
        f"no {split} pairs of {what} {task.modality} series "
        f"(a {variant} series has a domain ending in '-{variant}' and the pair_id of its original partner; "
        f"a simulated study written for another task lacks it: run 'medgan sites simulate --force --task {task.name}')",
    )


def _modality_pairs(manifest: Manifest, task: TaskConfig, split: str,
                    source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``source``-modality inputs, ``task.modality`` targets, each row's subject) of the same
    subjects, matched by pair_id; each normalised the way its modality is (CT window, MR percentile)."""
    inputs, target, keys = _modality_matched(manifest, task, split, source)
    x = _stack(manifest, task, [inputs[k] for k in keys])
    y, subjects = _stack_with_subjects(manifest, task, [target[k] for k in keys])
    if x.shape != y.shape:
        raise DataError(f"{manifest.path}: the {source} and {task.modality} series of a subject differ in slice count")
    return x, y, subjects


def _modality_matched(
    manifest: Manifest, task: TaskConfig, split: str, source: str
) -> tuple[dict[str, ManifestEntry], dict[str, ManifestEntry], list[str]]:
    """``source``-modality and ``task.modality`` entries of a split, matched by pair_id."""
    return _matched(
        manifest, manifest.select(modality=source, split=split), manifest.select(modality=task.modality, split=split),
        f"no {split} subjects with both a {source} and a {task.modality} series (they are matched by pair_id)",
    )


def _kspace_pairs(manifest: Manifest, task: TaskConfig, split: str, variant: str,
                  tv_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(undersampled inputs, fully sampled targets, each row's subject) for compressed-sensing
    MR reconstruction (see ``medgan_core.data.kspace.reconstruction_pair``), every subject on one matrix."""
    low, full, keys = _variant_pairs(manifest, task, split, variant, f"{variant} and fully sampled")
    inputs, targets = [], []
    for number, key in enumerate(keys, 1):
        if tv_weight > 0:  # the slow part of loading (about 0.4-0.5 CPU s per 256×256 slice): say where it is
            log.info("%s: %s split, TV start of subject %d of %d", manifest.root.name, split, number, len(keys))
        try:
            kspace, volume = read_kspace(manifest.root / low[key].file), manifest.load(full[key])
            col_mm, row_mm, _ = volume.spacing
            matrix = matrix_at(kspace.shape[1:], (row_mm, col_mm), task.spacing)
            x, y = reconstruction_pair(kspace, volume.axial_slices(), matrix, tv_weight)
        except DataError as exc:
            raise DataError(f"{manifest.path}: {low[key].file}: {exc}") from exc
        if inputs and x.shape[-2:] != inputs[0].shape[-2:]:
            raise DataError(f"{manifest.path}: {low[key].file}: a {x.shape[-2]}×{x.shape[-1]} matrix where the "
                            f"site's other subjects have {inputs[0].shape[-2]}×{inputs[0].shape[-1]}; reconstruction "
                            "needs one matrix at a site: one field of view, and task.spacing for one pixel size")
        inputs.append(x)
        targets.append(y)
    subjects = subject_rows([full[k].subject for k in keys], [len(y) for y in targets])
    return torch.from_numpy(np.concatenate(inputs)), torch.from_numpy(np.concatenate(targets)), subjects


def unpaired_subjects(keys: list[str]) -> tuple[list[str], list[str]]:
    """Alternate subjects between the two domains of unpaired training: no subject is in both."""
    return keys[0::2], keys[1::2]


def label_slices(volume_labels: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """(k, rows, cols) integer labels -> (k, *shape) long, nearest-neighbour resampled over the same field."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume_labels, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=shape, mode="nearest-exact")[:, 0].round().long()


def labelled_slices(
    data_path: str | Path, task: TaskConfig, split: str, variant: str = "", clinical: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, label maps) of a split, matched by pair_id: images of ``task.modality``
    (of a ``variant`` series when given, e.g. ``scanner-b``), label maps from the SEG
    entries on the images' grid (nearest neighbour). ``clinical``: the images as a
    clinical-geometry task reads them (``clinical_slices``: ``task.spacing``, the whole CT
    range); else resized to ``image-size`` in the window. For segmenters that check an adaptation."""
    manifest = read_manifest(data_path)
    images, labels, keys = _labelled(manifest, task, split, variant)
    if clinical:
        x = torch.cat([clinical_slices(manifest.load(images[k]), task.spacing, CT_FULL_RANGE) for k in keys])
    else:
        x = _stack(manifest, task, [images[k] for k in keys])
    y = torch.cat([label_slices(_label_volume(manifest, labels[k]), tuple(x.shape[-2:])) for k in keys])
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{manifest.path}: label maps and images of a subject differ in slice count")
    return x, y


def _labelled(
    manifest: Manifest, task: TaskConfig, split: str, variant: str = ""
) -> tuple[dict[str, ManifestEntry], dict[str, ManifestEntry], list[str]]:
    return _matched(
        manifest, manifest.select(modality=task.modality, split=split, variant=variant),
        manifest.select(modality=SEGMENTATION, split=split),
        f"no {split} subjects with both a {task.modality} series and a label map (modality {SEGMENTATION}, "
        "matched by pair_id; a simulated study written for another task lacks them: "
        f"run 'medgan sites simulate --force --task {task.name}')",
    )


def _label_volume(manifest: Manifest, entry: ManifestEntry) -> np.ndarray:
    labels = manifest.load(entry).axial_slices()
    if labels.min() < 0 or labels.max() > 255 or not np.allclose(labels, np.round(labels)):
        raise DataError(f"{manifest.root / entry.file}: a label map must hold integer labels from 0 to 255")
    return np.round(labels).astype(np.uint8)


def _with_burden(manifest: Manifest, task: TaskConfig, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of a split, each slice's lesion burden (from the matching label map) and its subject."""
    images, labels, keys = _labelled(manifest, task, split)
    x, subjects = _stack_with_subjects(manifest, task, [images[k] for k in keys])
    burden = [lesion_burden(_label_volume(manifest, labels[k])) for k in keys]
    c = torch.from_numpy(np.concatenate(burden))
    if c.shape[0] != x.shape[0]:
        raise DataError(f"{manifest.path}: label maps and images of a subject differ in slice count")
    return x, c, subjects


def upsample(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic interpolation by ``scale``, clipped to the intensity range [-1, 1]."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


def _stack(manifest: Manifest, task: TaskConfig, entries: list[ManifestEntry]) -> torch.Tensor:
    return _stack_with_subjects(manifest, task, entries)[0]


def _stack_with_subjects(manifest: Manifest, task: TaskConfig,
                         entries: list[ManifestEntry]) -> tuple[torch.Tensor, torch.Tensor]:
    """The slices of ``entries`` resized whole, and each slice's subject (``subject_rows``)."""
    window = (task.window_low, task.window_high)
    volumes = [volume_to_slices(manifest.load(e), task.image_size, window, task.spacing) for e in entries]
    return torch.cat(volumes), subject_rows([e.subject for e in entries], [len(v) for v in volumes])


def subject_rows(subjects: Sequence[str], counts: Sequence[int]) -> torch.Tensor:
    """Each stacked row's subject as a number (0, 1, … in order of first appearance): series
    ``i`` gave ``counts[i]`` rows and belongs to ``subjects[i]``; one patient's several series
    share a number."""
    numbers: dict[str, int] = {}
    per_series = [numbers.setdefault(subject, len(numbers)) for subject in subjects]
    return torch.repeat_interleave(torch.tensor(per_series, dtype=torch.int64),
                                   torch.tensor(list(counts), dtype=torch.int64))
