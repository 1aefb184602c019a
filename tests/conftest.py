"""Shared fixtures: tiny phantom sites written to disk once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from medgan_core.study_config import StudyConfig  # noqa: E402
from medgan_core.data.simulate import DEFAULT_SITES, simulate_site  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two hospitals of different sizes (4 and 7 subjects), 4 slices of 128x128 each."""
    root = tmp_path_factory.mktemp("sites")
    return [
        simulate_site(DEFAULT_SITES[0], root / "site-a", n_subjects=4, n_slices=4, size=128, seed=1),
        simulate_site(DEFAULT_SITES[2], root / "site-c", n_subjects=7, n_slices=4, size=128, seed=60),
    ]


@pytest.fixture()
def tiny_study() -> StudyConfig:
    """A study small enough for a unit test: 16x16 images, narrow networks, few steps."""
    return StudyConfig().replace(
        run={"rounds": 2, "num_sites": 2, "device": "cpu"},
        task={"image_size": 16, "batch_size": 8, "local_steps": 3, "width": 8, "z_dim": 8, "eval_samples": 16},
    )
