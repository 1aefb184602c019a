"""A site's slices at clinical geometry (and any task's decoded site data), kept on disk and
read lazily.

A hospital site holds thousands of 512×512 slices: more than a site process should hold
in memory several times over (inputs and targets, train and test). Each split's slices
are resampled once to the task's pixel size, written to one ``.npy`` file in the site's
private state folder, and opened memory-mapped: training reads only the patches its
batches touch, and the operating system may drop pages it has not touched recently.
The file's name is a hash of what made it (the source files' names, sizes and
modification times, the pixel size, the intensity scale), so a changed series or setting
makes a new one; a half-written file never has the final name. The folder is the site
user's alone (0700, files 0600): it holds images derived from patients' scans.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from medgan_core.data.cache_admin import SCRATCH_PREFIX, mark_used

#: Bumped when what a cache file holds changes meaning; old files are then not reused
#: (2: recon's coarser k-space matrices centre their pixels in the field).
CACHE_FORMAT = 2
#: The value a slice is padded with to the split's common canvas: air (-1 in [-1, 1]).
PAD_VALUE = -1.0


def source_fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of every file under ``paths`` (a DICOM folder: each file)."""
    found = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            found.append((str(file), stat.st_size, stat.st_mtime_ns))
    return found


def cache_key(what: dict) -> str:
    """A short hash of a JSON-able description of a cache file's content."""
    text = json.dumps({"format": CACHE_FORMAT, **what}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def pad_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (rows, cols) slice centred on a canvas of ``shape`` padded with air (never cropped)."""
    rows, cols = image.shape
    top, left = (shape[0] - rows) // 2, (shape[1] - cols) // 2
    out = np.full(shape, PAD_VALUE, np.float32)
    out[top : top + rows, left : left + cols] = image
    return out


def stack_series(
    series: Iterable[tuple[np.ndarray, ...]], roles: int, cache_dir: Path | None, key: str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``roles`` aligned (n, 1, H, W) tensors (e.g. input and target) from series that each
    yield ``roles`` arrays of (k, rows, cols) slices in [-1, 1], padded to one canvas, and
    each series' slice count in order (``context_rows`` finds a slice's neighbours by it).

    With ``cache_dir``: built one series at a time (memory: one series), stored as
    ``<key>-<role>.npy`` (the counts as ``<key>-series.npy``) and returned memory-mapped;
    existing files of that key are reused without reading a source. Without: ordinary
    in-memory tensors.
    """
    if cache_dir is None:
        parts = list(series)
        canvas = _canvas(part[0].shape[1:] for part in parts)
        lengths = torch.tensor([part[0].shape[0] for part in parts], dtype=torch.int64)
        return [torch.from_numpy(np.concatenate([_padded(part[r], canvas) for part in parts]))[:, None]
                for r in range(roles)], lengths
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cache_dir, 0o700)  # derived from patient images: the site's user only, like its other state
    finals = [cache_dir / f"{key}-{role}.npy" for role in range(roles)]
    counts = cache_dir / f"{key}-series.npy"
    if all(f.is_file() for f in (*finals, counts)):  # a cache written before the counts were kept is rebuilt
        return [_open(f) for f in finals], torch.from_numpy(np.load(counts))
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=SCRATCH_PREFIX) as scratch:
        paths: list[list[Path]] = [[] for _ in range(roles)]
        for index, part in enumerate(series):  # each series to its own file first: the canvas is not known yet
            for role in range(roles):
                path = Path(scratch) / f"{index}-{role}.npy"
                np.save(path, np.asarray(part[role], np.float32))
                paths[role].append(path)
        shapes = [np.load(p, mmap_mode="r").shape for p in paths[0]]
        canvas = _canvas(s[1:] for s in shapes)
        for role in range(roles):
            partial = Path(scratch) / f"stack-{role}.npy"
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                            shape=(sum(s[0] for s in shapes), 1, *canvas))
            start = 0
            for path, shape in zip(paths[role], shapes):
                out[start : start + shape[0], 0] = _padded(np.load(path, mmap_mode="r"), canvas)
                start += shape[0]
            out.flush()  # on disk before the file takes its final name
            del out
            os.chmod(partial, 0o600)
            os.replace(partial, finals[role])
        partial = Path(scratch) / "series.npy"
        np.save(partial, np.array([shape[0] for shape in shapes], np.int64))
        os.chmod(partial, 0o600)
        os.replace(partial, counts)  # last: a cache hit needs every file of the key
    return [_open(f) for f in finals], torch.from_numpy(np.load(counts))


def _open(path: Path) -> torch.Tensor:
    mark_used(path)  # what 'medgan site cache --prune-older-than' goes by
    # copy-on-write: torch wants a writable array; nothing is ever written back to the file
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _canvas(shapes: Iterable[tuple[int, ...]]) -> tuple[int, int]:
    shapes = list(shapes)
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def _padded(part: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    if tuple(part.shape[1:]) == canvas:
        return np.asarray(part, np.float32)
    return np.stack([pad_to(np.asarray(s, np.float32), canvas) for s in part])


def context_rows(series: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """(len(rows), 2k + 1) indices into a stack of series of ``series`` slices each: every row
    first, then its neighbours at -1, +1, -2, +2, ... slices, never beyond its own series
    (a series' first or last slice stands in past its end), so no input mixes two subjects."""
    ends = torch.cumsum(series.to(torch.int64), 0)
    rows = rows.to(torch.int64)
    which = torch.searchsorted(ends, rows, right=True)
    if bool((which >= len(ends)).any()) or bool((rows < 0).any()):
        raise IndexError(f"a row outside the {int(ends[-1]) if len(ends) else 0} slices of these series")
    first, last = ends[which] - series[which], ends[which] - 1
    offsets = [0] + [sign * step for step in range(1, k + 1) for sign in (-1, 1)]
    return torch.stack([torch.clamp(rows + offset, first, last) for offset in offsets], dim=1)


def gather_context(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(n, m·C, H, W): for each of the n rows of ``rows`` (n, m), the m slices it names stacked
    as channels; only those slices are read from a memory-mapped stack."""
    n, m = rows.shape
    picked = images[rows.reshape(-1)]
    return picked.reshape(n, m * picked.shape[1], *picked.shape[2:])


def random_crops(
    images: list[torch.Tensor], idx: torch.Tensor, size: int, generator: torch.Generator,
    centre_above: float | None = None, tries: int = 8, anywhere: float = 0.0,
    neighbours: dict[int, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One ``size``×``size`` patch of each record ``idx`` of every tensor in ``images``
    (aligned tensors of one canvas: input and target), at the same random place for all;
    only those patches are read from a memory-mapped tensor. A record is one slice,
    whichever patch of it is drawn: Poisson sampling under DP samples slices.

    ``centre_above``: redraw a place (up to ``tries`` times) until the patch's centre pixel
    in the last tensor (the target) is above it, so that patches fall on the patient rather
    than the air around; a share ``anywhere`` of the records still draws its place
    uniformly, for a network that must learn the air too (whole slices are restored tile
    by tile, air included). A per-record choice: under DP each record is still one
    clipped gradient.

    ``neighbours``: for the tensor at that position in ``images``, each record's (2.5D)
    context rows (``context_rows``, aligned with ``idx``): its patch is the same place in
    each of those slices, stacked as channels."""
    neighbours = neighbours or {}
    rows, cols = images[0].shape[-2:]
    if rows < size or cols < size:
        whole = [gather_context(im, neighbours[j]) if j in neighbours else im[idx] for j, im in enumerate(images)]
        padded = [torch.nn.functional.pad(im, _padding(rows, cols, size), value=PAD_VALUE) for im in whole]
        return random_crops(padded, torch.arange(len(idx)), size, generator, centre_above, tries, anywhere)
    places = []
    for i in idx.tolist():
        targeted = centre_above is not None and float(torch.rand((), generator=generator)) >= anywhere
        for _ in range(tries if targeted else 1):
            top = int(torch.randint(0, rows - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, cols - size + 1, (1,), generator=generator))
            if not targeted or float(images[-1][i, 0, top + size // 2, left + size // 2]) > centre_above:
                break
        places.append((i, top, left))

    def crop(j: int, im: torch.Tensor) -> torch.Tensor:
        if j not in neighbours:
            return torch.stack([im[i, :, t : t + size, l : l + size] for i, t, l in places])
        return torch.stack([im[r, :, t : t + size, l : l + size].reshape(-1, size, size)
                            for r, (_, t, l) in zip(neighbours[j], places)])

    return [crop(j, im) for j, im in enumerate(images)]


def _padding(rows: int, cols: int, size: int) -> tuple[int, int, int, int]:
    extra_r, extra_c = max(0, size - rows), max(0, size - cols)
    return extra_c // 2, extra_c - extra_c // 2, extra_r // 2, extra_r - extra_r // 2


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def store_arrays(arrays: dict[str, torch.Tensor], cache_dir: Path, key: str) -> dict[str, torch.Tensor]:
    """Write each tensor to ``<key>-<name>.npy`` (atomically, 0600) and return them memory-mapped,
    so that every process of a site on this machine reads one copy through the page cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cache_dir, 0o700)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=SCRATCH_PREFIX) as scratch:
        for name, tensor in arrays.items():
            partial = Path(scratch) / f"{name}.npy"
            np.save(partial, tensor.detach().cpu().numpy())
            os.chmod(partial, 0o600)
            os.replace(partial, cache_dir / f"{key}-{name}.npy")
    return {name: _open(cache_dir / f"{key}-{name}.npy") for name in arrays}


def open_arrays(names: Iterable[str], cache_dir: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors ``store_arrays`` wrote under ``key``, memory-mapped (None unless all are there)."""
    paths = {name: cache_dir / f"{key}-{name}.npy" for name in names}
    if not paths or not all(p.is_file() for p in paths.values()):
        return None
    return {name: _open(path) for name, path in paths.items()}
