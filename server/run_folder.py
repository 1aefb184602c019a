"""The folder every run writes: config.toml, metrics.jsonl, checkpoints/, samples/, report.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgan_core.config import StudyConfig, dump_study
from medgan_core.fileio import append_jsonl, atomic_write_text, read_jsonl
from server.checkpoints import checkpoint_path


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def checkpoint(self, server_round: int) -> Path:
        return checkpoint_path(self.root, server_round)

    def samples(self, server_round: int) -> Path:
        return self.root / "samples" / f"round-{server_round:03d}.png"

    def start(self, study: StudyConfig) -> "RunFolder":
        """Create the folder and record the exact config; refuses to mix two runs' metrics."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.metrics.exists():
            self.metrics.unlink()  # a fresh run owns its folder; resume is a separate path
        atomic_write_text(self.config, dump_study(study))
        return self

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics) if self.metrics.exists() else []
