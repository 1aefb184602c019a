"""A site manifest: the CSV that lists a hospital's images and how to use them.

Columns: ``file`` (relative to the manifest; a folder means a DICOM series),
``subject``, ``modality`` (CT, MR, or SEG for a label map: integer tissue labels as in
``medgan_core.data.simulate.TISSUES``, aligned with the subject's images), ``split`` (train, val or test), and optionally
``domain`` (scanner / protocol; a domain ending in ``-low-dose`` marks a reduced-dose
series, ``-low-res-x2``/``-low-res-x4`` a series acquired on a 2×/4× coarser grid,
``-kspace-r4``/``-kspace-r10`` undersampled MR k-space, see ``medgan_core.data.kspace``,
``-scanner-b`` the site's second scanner, for unpaired harmonisation),
``label`` (class), ``pair_id`` (links images of one subject across modalities, doses
or resolutions for paired tasks) and ``series`` (the SeriesInstanceUID to read where a
folder holds several series, as PACS exports do; ``medgan site index`` fills it in).
A DICOM ``file`` is a series folder or one (enhanced multi-frame) file.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath, PureWindowsPath

from medgan_core.data.dicom_io import read_dicom_series
from medgan_core.data.nifti_io import read_nifti
from medgan_core.data.png_io import read_png
from medgan_core.data.volume import Volume
from medgan_core.errors import DataError

REQUIRED_COLUMNS = ("file", "subject", "modality", "split")
LOW_DOSE = "-low-dose"  # a domain ending in this marks a reduced-dose acquisition
SCANNER_B = "-scanner-b"  # ... a series from the site's second scanner
SEGMENTATION = "SEG"  # the modality of label maps
#: Other acquisitions of an original series (degraded, or another scanner), marked by
#: the end of their domain.
VARIANTS = ("low-dose", "low-res-x2", "low-res-x4", "kspace-r4", "kspace-r10", "scanner-b")


def variant_of(domain: str) -> str:
    """``"hospital-a-ct-low-res-x2"`` -> ``"low-res-x2"``; an original series -> ``""``."""
    return next((v for v in VARIANTS if domain.endswith("-" + v)), "")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestEntry:
    file: str
    subject: str
    modality: str
    split: str
    domain: str = ""
    label: str = ""
    pair_id: str = ""
    series: str = ""


@dataclass(frozen=True)
class Manifest:
    path: Path
    entries: tuple[ManifestEntry, ...]

    @property
    def root(self) -> Path:
        return self.path.parent

    def select(
        self, *, modality: str | None = None, split: str | None = None, variant: str | None = ""
    ) -> list[ManifestEntry]:
        """Entries by modality and split; original series by default, a degraded variant
        (``"low-dose"``, ``"low-res-x2"``, …) when asked, every series with None."""
        return [
            e
            for e in self.entries
            if (modality is None or e.modality == modality)
            and (split is None or e.split == split)
            and (variant is None or variant_of(e.domain) == variant)
        ]

    def load(self, entry: ManifestEntry) -> Volume:
        return read_volume(self.root / entry.file, entry.modality, entry.series)


def read_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Parse and check a manifest; errors name the file, the row and the column."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
            known = {f.name for f in fields(ManifestEntry)}
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 CSV file ({exc})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc

    entries = []
    first_line: dict[tuple[str, str, str], int] = {}
    subject_split: dict[str, tuple[str, int]] = {}
    for line, row in enumerate(rows, start=2):
        values = {k: (row.get(k) or "").strip() for k in known}
        for column in REQUIRED_COLUMNS:
            if not values[column]:
                raise DataError(f"{path}, line {line}: column '{column}' is empty")
        if values["split"] not in SPLITS:
            raise DataError(f"{path}, line {line}: split {values['split']!r} is not one of {', '.join(SPLITS)}")
        entry = ManifestEntry(**values)
        _check_inside(path, line, entry.file)
        key = (str(PurePosixPath(entry.file.replace("\\", "/"))), entry.modality, entry.series)
        if key in first_line:
            series = f", series {entry.series}" if entry.series else ""
            raise DataError(f"{path}, line {line}: {entry.file} ({entry.modality}{series}) is already listed on line "
                            f"{first_line[key]}; a duplicate row would count its images twice and understate ε")
        first_line[key] = line
        earlier = subject_split.setdefault(entry.subject, (entry.split, line))
        if earlier[0] != entry.split:
            raise DataError(f"{path}, line {line}: subject {entry.subject!r} is in split {entry.split!r} here and "
                            f"in {earlier[0]!r} on line {earlier[1]}; a subject must be in one split only, "
                            "or held-out scores measure memory")
        if check_files and not (path.parent / entry.file).exists():
            raise DataError(f"{path}, line {line}: file {entry.file} does not exist under {path.parent}")
        entries.append(entry)
    if not entries:
        raise DataError(f"{path}: the manifest lists no images")
    return Manifest(path=path, entries=tuple(entries))


def _check_inside(manifest: Path, line: int, file: str) -> None:
    """Manifest paths stay inside the site folder: relative, no ``..``."""
    posix = PurePosixPath(file.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(file).drive or ".." in posix.parts:
        raise DataError(f"{manifest}, line {line}: file {file!r} leaves the site folder; list paths relative to "
                        "the manifest, without '..'")


def write_manifest(entries: list[ManifestEntry], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(ManifestEntry)])
        writer.writeheader()
        writer.writerows(asdict(e) for e in entries)
    tmp.replace(path)
    return path


#: Modalities whose DICOM header must agree with the manifest (a label map's may differ).
CHECKED_MODALITIES = ("CT", "MR")


def read_volume(path: str | Path, modality: str = "OT", series: str = "") -> Volume:
    """Pick the reader by what the path is: a folder or .dcm file (DICOM), .nii/.nii.gz,
    .png. The manifest's modality wins; a DICOM header that says otherwise is an error."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path, modality)
    if name.endswith(".png"):
        return read_png(path, modality)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir() or name.endswith((".dcm", ".dicom", ".ima")) or series or _is_dicom(path):
        volume = read_dicom_series(path, series)
        if modality in CHECKED_MODALITIES and volume.modality != modality:
            raise DataError(f"{path}: the manifest says {modality} but the DICOM header says {volume.modality}; "
                            "correct the manifest's modality column or pick the right series")
        return dataclasses.replace(volume, modality=modality)
    raise DataError(f"{path}: unknown image format; use a DICOM series folder or file, .nii/.nii.gz or .png")


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False
