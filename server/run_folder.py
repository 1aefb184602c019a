"""The folder every run writes: config.toml, metrics.jsonl, checkpoints/, samples/, report.md."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medgan_core.study_config import StudyConfig, dump_study
from medgan_core.fileio import append_jsonl, atomic_write_text, read_jsonl
import numpy as np

from medgan_core.errors import MedGANError
from medgan_core.run_layout import RunLayout
from medgan_core.checkpoints import load_checkpoint


@dataclass(frozen=True)
class RunFolder(RunLayout):
    """A run folder's operations (start, lock, repair, resume, metrics) over ``RunLayout``'s paths."""

    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the run folder for one run; a second run on it is refused, not interleaved.

        An OS file lock (flock): it is released when the process ends, even by a crash or a
        kill, so a stale lock never blocks a resumed run.
        """
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = self.lock_file.open("a+")
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise MedGANError(f"run folder {self.root} is in use by another run ({holder}); wait for it to end "
                                  "or choose another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            yield self
        finally:
            handle.close()  # closing releases the lock

    def check_free(self) -> None:
        """Raise MedGANError if another run holds the folder (the lock is not kept)."""
        with self.lock():
            pass

    def repair(self) -> list[str]:
        """Undo what a power loss or a kill left: a torn last metrics line (cut off, so the next
        line does not merge into it) and orphaned temporary files of atomic writes. Returns what
        was repaired, for the log."""
        repaired = []
        if self.metrics.exists():
            text = self.metrics.read_text(encoding="utf-8", errors="replace")
            lines = text.splitlines(keepends=True)
            good = []
            for line in lines:
                try:
                    if line.endswith("\n"):
                        json.loads(line)
                        good.append(line)
                        continue
                except json.JSONDecodeError:
                    pass
                repaired.append(f"dropped a torn line of {self.metrics.name}")
            if len(good) != len(lines):
                atomic_write_text(self.metrics, "".join(good))
        for tmp in self.root.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink()
                repaired.append(f"removed orphaned {tmp.relative_to(self.root)}")
        return repaired

    def archive_previous(self) -> Path | None:
        """Rename a non-empty folder (an earlier run) to ``NAME.1``, ``NAME.2``, …

        Two runs never mix their files and nothing is deleted. Returns the new name.
        """
        if not (self.root.exists() and any(self.root.iterdir())):
            return None
        index = 1
        while (moved := self.root.with_name(f"{self.root.name}.{index}")).exists():
            index += 1
        self.root.rename(moved)
        return moved

    def start(self, study: StudyConfig) -> "RunFolder":
        """Create a fresh folder (archiving an earlier run) and record the exact config."""
        self.archive_previous()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, dump_study(study))
        atomic_write_text(self.study_id_file, uuid.uuid4().hex + "\n")
        return self

    def study_id(self) -> str:
        """A random id of this study: sites keep one privacy accountant per study id."""
        return self.study_id_file.read_text().strip()

    def resume_point(self) -> tuple[int, dict[str, np.ndarray]]:
        """The last round whose metrics line and checkpoint were both written, and its weights.

        A crash mid-round leaves neither (the metrics line is written last), so that round
        simply runs again.
        """
        self.repair()
        records = self.read_metrics()
        if not records or not self.config.exists():
            raise MedGANError(f"{self.root} holds no run to resume (no config.toml or metrics.jsonl)")
        last = records[-1]["round"]
        arrays, metadata = load_checkpoint(self.checkpoint(last))
        if metadata.get("round") != last:
            raise MedGANError(f"{self.checkpoint(last)} belongs to round {metadata.get('round')}, expected {last}")
        return last, arrays

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics, record)

    def trained_rounds(self) -> list[int]:
        """Rounds whose metrics line shows an update from at least one site (not ``round-failed``)."""
        return [r["round"] for r in self.read_metrics()
                if r.get("round", 0) > 0 and not r.get("round-failed") and any("train" in s for s in r.get("sites", []))]

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics) if self.metrics.exists() else []
