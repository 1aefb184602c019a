"""A site's decoded data is kept on disk once, memory-mapped by every process that needs it:
simulated sites share a few Ray workers, and a worker's in-memory cache holds only a few
sites, so without it a study of many sites decoded every site's images again every round."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medgan_core.data.manifest import Manifest, read_manifest
from medgan_core.tasks.registry import load_task_data, task_config

SYNTHESIS = task_config(name="synthesis", image_size=16)
CONDITIONAL = task_config(name="conditional", image_size=16)


@pytest.mark.parametrize("config", [SYNTHESIS, CONDITIONAL], ids=["slices", "slices-with-burden"])
def test_whole_slice_data_is_decoded_once_and_mapped_after(tiny_sites: list[Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, config) -> None:
    cache = tmp_path / "cache"
    plain = load_task_data(tiny_sites[1], config)
    first = load_task_data(tiny_sites[1], config, cache)
    for field in ("train", "test", "train_condition", "test_condition"):
        expected, got = getattr(plain, field), getattr(first, field)
        assert (expected is None) == (got is None)
        if expected is not None:
            torch.testing.assert_close(got, expected)  # the same data as decoding it directly
    assert cache.stat().st_mode & 0o777 == 0o700  # derived from patients' images: the site's user only
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cache.iterdir())
    assert isinstance(np.load(next(cache.glob("*-train.npy")), mmap_mode="r"), np.memmap)

    loads: list[str] = []
    original = Manifest.load
    monkeypatch.setattr(Manifest, "load", lambda self, entry: loads.append(entry.file) or original(self, entry))
    again = load_task_data(tiny_sites[1], config, cache)
    assert loads == []  # mapped, not decoded
    torch.testing.assert_close(again.train, first.train)
    entries = sorted(p.name for p in cache.iterdir())
    stepped = dataclasses.replace(config, physical_batch=4, batch_size=8, lr_generator=1e-3, local_steps=7, width=8)
    load_task_data(tiny_sites[1], stepped, cache)  # settings of the steps, not of the data read
    assert loads == [] and sorted(p.name for p in cache.iterdir()) == entries

    other = load_task_data(tiny_sites[1], task_config(name=config.name, image_size=32), cache)
    assert loads and other.train.shape[-1] == 32  # another setting is another entry, not a stale one


def test_a_changed_source_file_is_decoded_again(tiny_sites: list[Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    load_task_data(tiny_sites[1], SYNTHESIS, cache)
    loads: list[str] = []
    original = Manifest.load
    monkeypatch.setattr(Manifest, "load", lambda self, entry: loads.append(entry.file) or original(self, entry))
    manifest = read_manifest(tiny_sites[1])
    touched = next((tiny_sites[1] / manifest.select(modality="CT", split="train")[0].file).iterdir())
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        load_task_data(tiny_sites[1], SYNTHESIS, cache)
    finally:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert loads  # a new key: the site's images were read again
    assert len(list(cache.glob("*-fields.json"))) == 2 and not list(cache.glob(".building-*"))


def _age(paths, days: float) -> None:  # type: ignore[no-untyped-def]
    stamp = time.time() - days * 86400
    for path in paths:
        os.utime(path, (stamp, stamp))


def test_old_cache_entries_are_pruned_and_nothing_else(tiny_sites: list[Path], tmp_path: Path) -> None:
    """Each setting leaves its own cache files behind: ``medgan site cache --prune-older-than``
    deletes the entries no study opened for that long (opening one marks it used), and killed
    builds' scratch folders, and keeps everything else in the folder."""
    from typer.testing import CliRunner

    from medgan.cli import app
    from medgan_core.data.cache_admin import cache_entries

    state = tmp_path / "state"
    cache = state / "data-cache"
    load_task_data(tiny_sites[1], SYNTHESIS, cache)
    old = set(cache.iterdir())
    load_task_data(tiny_sites[1], task_config(name="synthesis", image_size=32), cache)
    scratch = cache / ".building-x1"
    scratch.mkdir()
    (scratch / "0-0.npy").write_bytes(b"0" * 100)
    notes = cache / "README-hospital.txt"
    notes.write_text("ours")
    entries = cache_entries(cache)
    assert len(entries) == 3 and sum(e.unfinished for e in entries) == 1
    _age([*old, scratch, *scratch.iterdir(), notes], days=40)

    load_task_data(tiny_sites[1], SYNTHESIS, cache)  # opened again: used now, whatever its files' age
    assert all(time.time() - p.stat().st_mtime < 3600 for p in old if p.suffix == ".npy")
    _age(old, days=40)

    runner = CliRunner()
    result = runner.invoke(app, ["site", "cache", "--state-dir", str(state), "--prune-older-than", "30"])
    assert result.exit_code == 0, result.output
    assert "removed 2 entries not used for 30 days" in result.output and "1 entry" in result.output
    assert not any(p.exists() for p in old) and not scratch.exists() and notes.read_text() == "ours"
    kept = cache_entries(cache)
    assert len(kept) == 1 and not kept[0].unfinished
    assert load_task_data(tiny_sites[1], SYNTHESIS, cache).train.shape[-1] == 16  # rebuilt when needed
    _age([p for e in cache_entries(cache) for p in e.paths], days=40)

    for args, message in ((["--state-dir", str(tmp_path / "none")], "does not exist"),
                          (["--state-dir", str(state), "--prune-older-than", "-2"], "give a number of days >= 0"),
                          (["--state-dir", str(state), "--prune-older-than", "nan"], "give a number of days >= 0"),
                          ([], "one of them")):
        result = runner.invoke(app, ["site", "cache", *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(cache_entries(cache)) == 2  # a refused prune deletes nothing, however old
