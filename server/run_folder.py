"""The folder every run writes: config.toml, metrics.jsonl, checkpoints/, samples/, report.md."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgan_core.config import StudyConfig, dump_study
from medgan_core.fileio import append_jsonl, atomic_write_text, read_jsonl
import numpy as np

from medgan_core.errors import MedGANError
from server.checkpoints import checkpoint_path, load_checkpoint


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

    def server_optimizer(self, server_round: int) -> Path:
        """FedAdam/FedYogi moments after a round: a resumed run needs them to go on exactly."""
        return self.root / "checkpoints" / f"round-{server_round:03d}.server-optimizer.safetensors"

    def samples(self, server_round: int) -> Path:
        return self.root / "samples" / f"round-{server_round:03d}.png"

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
        atomic_write_text(self.root / "study-id", uuid.uuid4().hex + "\n")
        return self

    def study_id(self) -> str:
        """A random id of this study: sites keep one privacy accountant per study id."""
        return (self.root / "study-id").read_text().strip()

    def resume_point(self) -> tuple[int, dict[str, np.ndarray]]:
        """The last round whose metrics line and checkpoint were both written, and its weights.

        A crash mid-round leaves neither (the metrics line is written last), so that round
        simply runs again.
        """
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

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics) if self.metrics.exists() else []
