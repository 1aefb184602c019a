"""The benchmarks' shared helpers: behaviour a user relies on when re-scoring a saved run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from medgan_core.config import StudyConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_common  # noqa: E402


def test_reuse_without_a_saved_run_stops_instead_of_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = StudyConfig().replace(run={"rounds": 3})
    args = argparse.Namespace(out=tmp_path, reuse=True)

    def must_not_train(*_: object) -> None:
        raise AssertionError("--reuse started a training run")

    monkeypatch.setattr(bench_common, "train_federated", must_not_train)
    with pytest.raises(SystemExit, match="round-003.safetensors does not exist"):
        bench_common.trained_or_reused(args, study, [])
    # A checkpoint from another --rounds does not count either.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "round-005.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="round-003.safetensors does not exist"):
        bench_common.trained_or_reused(args, study, [])
