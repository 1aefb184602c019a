"""``medgan site index``: a draft manifest from a PACS export, for the site to review.

It never moves or writes anything in the export. It groups DICOM files by
SeriesInstanceUID (nested folders, DICOMDIRs and folders that mix series are all fine),
decodes each candidate series as training would, so what it lists can be trained on,
adds NIfTI files, and says why each series it leaves out cannot be used. Subjects are
split into train/val/test by a seeded shuffle, never a subject in two.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medgan_core.data.dicom_io import GREYSCALE, MEDIA_STORAGE_DIRECTORY, read_dicom_series
from medgan_core.data.manifest import ManifestEntry, write_manifest
from medgan_core.errors import ConfigError, MedGANError

#: Image storage SOP classes a CT or MR volume comes in (classic, enhanced, legacy converted).
VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "MR",
}
#: ImageType values of a derived series that is a reformat or projection of an acquisition.
REFORMATS = {"PROJECTION IMAGE", "MIP", "MINIP", "MPR", "REFORMATTED", "CURVED", "VOLUME RENDERING"}
#: Series descriptions scanners give localisers whose ImageType does not say so.
LOCALISER_WORDS = re.compile(r"\b(locali[sz]er|scout|survey|pilot|topogram|scanogram)\b", re.IGNORECASE)
SPLIT_SHARES = (("train", 0.7), ("val", 0.15), ("test", 0.15))
PSEUDONYM_KEY = ".medgan-pseudonym-key"


@dataclass
class Series:
    """One DICOM series of the export, from its files' headers."""

    uid: str
    files: list[Path] = field(default_factory=list)
    modality: str = ""
    sop_class: str = ""
    patient: str = ""
    description: str = ""
    image_type: tuple[str, ...] = ()
    photometric: str = ""


@dataclass
class IndexResult:
    entries: list[ManifestEntry]
    skipped: list[tuple[str, str]]  # (what, why)


def index_export(
    export: Path, manifest: Path, *, seed: int = 0, nifti_modality: str = "MR", pseudonymise: bool = False
) -> IndexResult:
    """The manifest rows for every usable series under ``export`` (paths relative to
    ``manifest``'s folder), and what was left out and why. Writes nothing."""
    export, root = export.resolve(), manifest.parent.resolve()
    if not export.is_dir():
        raise ConfigError(f"export folder {export} does not exist")
    if root != export and root not in export.parents:
        raise ConfigError(f"{manifest} must sit in {export} or a folder above it: a manifest lists paths inside "
                          "its own folder")
    series: dict[str, Series] = {}
    niftis: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for path in sorted(_files(export)):
        if path.name.lower().endswith((".nii", ".nii.gz")):
            niftis.append(path)
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            skipped.append((_rel(path, root), "not a DICOM or NIfTI file"))
            continue
        sop = str(ds.get("SOPClassUID", ""))
        if sop == MEDIA_STORAGE_DIRECTORY:
            continue  # a DICOMDIR indexes the same files we read directly
        uid = str(ds.get("SeriesInstanceUID", "")) or f"no-uid:{path}"
        item = series.setdefault(uid, Series(uid))
        item.files.append(path)
        item.modality, item.sop_class = str(ds.get("Modality", "")), sop
        item.patient = str(ds.get("PatientID", "")).strip()
        item.description = str(ds.get("SeriesDescription", ""))
        item.image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
        item.photometric = str(ds.get("PhotometricInterpretation", ""))

    rows: list[tuple[str, str, str, str, str]] = []  # (file, patient, modality, domain, series uid)
    for item in series.values():
        folders = {p.parent for p in item.files}
        what = f"series {item.uid} ({item.modality or '?'} '{item.description}', {len(item.files)} file(s))"
        if reason := _unusable(item):
            skipped.append((what, reason))
        elif len(folders) > 1:
            skipped.append((what, f"split over {len(folders)} folders; gather its files in one folder"))
        elif not item.patient:
            skipped.append((what, "no PatientID, so no subject to split by; add one, or list it by hand"))
        elif problem := _unreadable(item.files[0] if len(item.files) == 1 else next(iter(folders)), item):
            skipped.append((what, problem))
        else:
            target = item.files[0] if len(item.files) == 1 else folders.pop()
            rows.append((_rel(target, root), item.patient, item.modality, _domain(item.description, item.modality),
                         item.uid))
    for path in niftis:
        subject = path.name.split(".")[0]
        rows.append((_rel(path, root), subject, nifti_modality, _domain(path.parent.name, nifti_modality), ""))

    subjects = sorted({patient for _, patient, *_ in rows})
    splits = assign_splits(subjects, seed)
    names = _pseudonyms(subjects, root) if pseudonymise else {s: s for s in subjects}
    entries = [ManifestEntry(file, names[patient], modality, splits[patient], domain, series=uid)
               for file, patient, modality, domain, uid in sorted(rows)]
    return IndexResult(entries, skipped)


def write_index(result: IndexResult, manifest: Path, force: bool = False) -> Path:
    if manifest.exists() and not force:
        raise ConfigError(f"{manifest} exists (perhaps reviewed by hand); pass --force to replace it")
    if not result.entries:
        raise ConfigError("no usable CT or MR series found; nothing written")
    return write_manifest(result.entries, manifest)


def assign_splits(subjects: list[str], seed: int) -> dict[str, str]:
    """Subjects to train/val/test (about 70/15/15) by a seeded shuffle; with three or more
    subjects val and test get at least one each."""
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    n = len(order)
    n_test = max(1, round(n * SPLIT_SHARES[2][1])) if n >= 3 else 0
    n_val = max(1, round(n * SPLIT_SHARES[1][1])) if n >= 3 else 0
    return {s: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, s in enumerate(order)}


def _unusable(item: Series) -> str:
    if item.sop_class not in VOLUME_SOP_CLASSES:
        name = getattr(pydicom.uid.UID(item.sop_class), "name", item.sop_class) if item.sop_class else "unknown"
        return f"{name} (modality {item.modality or '?'}) is not a CT or MR image series"
    if item.modality != VOLUME_SOP_CLASSES[item.sop_class]:
        return f"modality {item.modality or '?'} does not match its SOP class ({VOLUME_SOP_CLASSES[item.sop_class]})"
    if "LOCALIZER" in item.image_type:
        return "a localiser (ImageType LOCALIZER), not a diagnostic series"
    if LOCALISER_WORDS.search(item.description):
        return f"a localiser (series description '{item.description}'), not a diagnostic series"
    if "DERIVED" in item.image_type and REFORMATS & set(item.image_type):
        return f"derived ({'/'.join(item.image_type)}), a reformat or projection, not an acquisition"
    if item.photometric and item.photometric not in GREYSCALE:
        return f"{item.photometric} holds colours, not intensities"
    return ""


def _unreadable(path: Path, item: Series) -> str:
    """Why the series cannot be read as a volume ('' when it reads), decoded as training would."""
    try:
        read_dicom_series(path, item.uid)
    except MedGANError as exc:
        return " ".join(str(exc).split())
    return ""


def _domain(description: str, modality: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", description.lower()).strip("-")
    return words or modality.lower()


def _files(root: Path):  # type: ignore[no-untyped-def]
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                yield Path(folder) / name


def _rel(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root).as_posix()


def _pseudonyms(subjects: list[str], root: Path) -> dict[str, str]:
    """``subject-`` + a keyed hash of the PatientID: stable across runs (the key is kept beside
    the manifest, readable by its owner only), meaningless without the key."""
    key_file = root / PSEUDONYM_KEY
    if key_file.exists():
        key = bytes.fromhex(key_file.read_text().strip())
    else:
        key = secrets.token_bytes(32)
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(key.hex())
    return {s: "subject-" + hmac.new(key, s.encode(), hashlib.sha256).hexdigest()[:12] for s in subjects}
