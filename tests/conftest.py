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
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's strategies read the task identity that a real ServerApp process sets: tests
    that drive a strategy or ``run_study`` directly, without one, set it here."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture()
def tiny_study() -> StudyConfig:
    """A study small enough for a unit test: 16x16 images, narrow networks, few steps."""
    return StudyConfig().replace(
        run={"rounds": 2, "num_sites": 2, "device": "cpu"},
        task={"image_size": 16, "batch_size": 8, "local_steps": 3, "width": 8, "z_dim": 8, "eval_samples": 16},
    )


@pytest.fixture(scope="session")
def federated_run(tiny_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real simulated federation (2 sites x 2 rounds, DP on, seeded) that several test files
    read: what it wrote, what the sites sent, the live-display events, and the TCP sockets the
    simulation's processes listened on in round 1."""
    from medgan.simulation import simulate_federation
    from tests.process_tree import descendants, listening_addresses

    study = StudyConfig().replace(
        run={"rounds": 2, "num_sites": 2, "device": "cpu", "tracking": "tensorboard"},
        task={"image_size": 16, "batch_size": 8, "local_steps": 3, "width": 8, "z_dim": 8, "eval_samples": 16},
        privacy={"secure_rng": False},  # seeded DP noise, so that two runs can be compared
    )
    run_dir = tmp_path_factory.mktemp("run")
    received: dict = {}
    summaries: list = []
    events: list = []
    listening: dict[str, str] = {}

    def progress(summary: object) -> None:
        summaries.append(summary)
        if getattr(summary, "server_round", 0) == 1:  # mid-study: Ray and its workers still up
            listening.update(listening_addresses({os.getpid(), *descendants(os.getpid())}))

    simulate_federation(
        study, tiny_sites, run_dir, progress=progress,
        on_train_replies=lambda rnd, replies: received.__setitem__(rnd, replies), watch=events.append,
    )
    return {"study": study, "run_dir": run_dir, "received": received, "summaries": summaries, "events": events,
            "listening": listening}

