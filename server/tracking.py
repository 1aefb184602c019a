"""Experiment tracking of a study's rounds (``run.tracking``; off by default).

``tensorboard`` writes, beside the run's own files in ``RUN_DIR/tensorboard/``, what the
coordinator already records: each round's aggregated training and held-out scalars, ε,
the update norms, and the sample grid. Nothing more leaves a site for it: it reads the
round's metrics line and sample grid after they are written. MLflow's file store, the
other server-free tracker, is refused by MLflow 3.x unless re-enabled by hand, so
TensorBoard's event files are what this writes (``tensorboard --logdir RUN_DIR/tensorboard``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from medgan_core.config import TRACKERS
from medgan_core.errors import ConfigError


class Tracker(Protocol):
    def log_round(self, record: Mapping[str, Any], samples: Path | None) -> None: ...

    def close(self) -> None: ...


class NoTracking:
    def log_round(self, record: Mapping[str, Any], samples: Path | None) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars as ``train/…``, ``evaluate/…``, ``update-norm/…``; the sample grid as ``samples``."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("run.tracking = 'tensorboard' needs the tensorboard package: "
                              "pip install -e '.[tracking]' (or set run.tracking = 'none')") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_round(self, record: Mapping[str, Any], samples: Path | None) -> None:
        step = int(record["round"])
        for section in ("train", "evaluate", "update-norm"):
            for key, value in (record.get(section) or {}).items():
                if isinstance(value, (int, float)) and np.isfinite(value):
                    self.writer.add_scalar(f"{section}/{key}", float(value), step)
        self.writer.add_scalar("sites/answered", len(record.get("sites", [])), step)
        self.writer.add_scalar("sites/left-out", len(record.get("excluded", [])), step)
        if samples is not None and samples.exists():
            from PIL import Image

            with Image.open(samples) as image:
                grid = np.asarray(image.convert("RGB"))
            self.writer.add_image("samples", grid, step, dataformats="HWC")
        self.writer.flush()  # a crash loses no round already recorded

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, run_dir: Path) -> Tracker:
    """The tracker ``run.tracking`` names, writing under ``run_dir`` (checked before any round)."""
    if kind == "none":
        return NoTracking()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard")
    raise ConfigError(f"run.tracking = {kind!r}; choose one of {', '.join(TRACKERS)}")
