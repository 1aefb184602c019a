"""What a site's data cache holds, and pruning what no study has used lately.

Every setting or changed series makes new cache files (``slice_store``), and nothing else
ever deletes them: on a site of thousands of 512×512 slices each setting costs gigabytes
of the hospital's disk. An entry is every file of one cache key (input and target, train
and test); opening an entry marks it used (its files' modification time), so the entries
a running study reads are never the old ones. Scratch folders of a build that was killed
(``.building-*``) are listed and pruned the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from medgan_core.errors import ConfigError

#: The hash every cache file name carries (``slice_store.cache_key``).
_KEY = re.compile(r"(?:^|-)([0-9a-f]{24})(?:-|$)")
#: A folder a build writes into before its files take their final names.
SCRATCH_PREFIX = ".building-"


@dataclass(frozen=True)
class CacheEntry:
    """One cache key's files (or one unfinished build's scratch folder)."""

    name: str  # the key's hash, or the scratch folder's name
    paths: tuple[Path, ...]
    size: int  # bytes on disk
    last_used: float  # seconds since the epoch: the newest modification of its files
    unfinished: bool = False


def mark_used(*paths: Path) -> None:
    """Note that an entry's files were opened now (best effort: a read-only cache stays as it is)."""
    for path in paths:
        try:
            os.utime(path)
        except OSError:
            pass


def cache_entries(cache_dir: Path) -> list[CacheEntry]:
    """The entries under ``cache_dir``, least recently used first (none if it does not exist)."""
    if not cache_dir.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    entries = []
    for path in sorted(cache_dir.iterdir()):
        if path.is_dir() and path.name.startswith(SCRATCH_PREFIX):
            stats = [p.stat() for p in path.rglob("*") if p.is_file()]
            last = max([path.stat().st_mtime, *(s.st_mtime for s in stats)])
            entries.append(CacheEntry(path.name, (path,), sum(s.st_size for s in stats), last, True))
        elif path.is_file() and (match := _KEY.search(path.name)):
            groups.setdefault(match.group(1), []).append(path)
    for key, paths in groups.items():
        stats = [p.stat() for p in paths]
        entries.append(CacheEntry(key, tuple(paths), sum(s.st_size for s in stats), max(s.st_mtime for s in stats)))
    return sorted(entries, key=lambda e: e.last_used)


def prune_cache(cache_dir: Path, older_than_days: float, now: float | None = None) -> list[CacheEntry]:
    """Delete the entries not used for ``older_than_days`` days; the ones deleted. Only cache
    files (named by a cache key) and scratch folders are touched, never anything else."""
    if not older_than_days >= 0:  # NaN too: it would compare as older than any entry
        raise ConfigError(f"--prune-older-than {older_than_days}; give a number of days >= 0")
    cutoff = (time.time() if now is None else now) - older_than_days * 86400
    removed = []
    for entry in cache_entries(cache_dir):
        if entry.last_used >= cutoff:
            continue
        for path in entry.paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)  # a process that maps it keeps its pages until it closes
        removed.append(entry)
    return removed
