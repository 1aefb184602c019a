"""The learning-rate schedule over a study's rounds (task.lr-schedule)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from medgan_core.config import PrivacyConfig, SiteConfig
from medgan_core.study_config import StudyConfig, load_study
from medgan_core.errors import ConfigError
from medgan_core.site_round import train_site_round
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.base import COSINE_FLOOR, lr_scale
from medgan_core.tasks.registry import load_task_data, task_config

DENOISE = task_config(name="denoise", image_size=16, width=8, batch_size=8, local_steps=3,
                     lr_generator=2e-3, lr_discriminator=1e-3, lr_schedule="cosine")


def test_constant_keeps_the_configured_rate() -> None:
    assert {lr_scale("constant", r, 8) for r in range(1, 12)} == {1.0}


def test_cosine_falls_from_one_towards_the_floor() -> None:
    scales = [lr_scale("cosine", r, 8) for r in range(1, 9)]
    assert scales[0] == 1.0
    assert all(a > b for a, b in zip(scales, scales[1:]))
    assert scales[-1] == pytest.approx(COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert scales[-1] > COSINE_FLOOR  # the last planned round still learns
    assert lr_scale("cosine", 4, 8) == pytest.approx(COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * 3 / 8)))
    assert lr_scale("cosine", 12, 8) == pytest.approx(COSINE_FLOOR)  # a study extended past its plan
    assert lr_scale("cosine", 1, 1) == 1.0


def test_unknown_schedule_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[task]\nlr-schedule = 'step'\n")
    with pytest.raises(ConfigError, match="task.lr-schedule = 'step'; choose one of constant, cosine"):
        load_study(path)
    assert StudyConfig().replace(task={"lr_schedule": "cosine"}).task.lr_schedule == "cosine"


@pytest.mark.parametrize("private", [False, True])
def test_a_site_trains_at_the_scheduled_rate(tiny_sites: list[Path], tmp_path: Path, private: bool) -> None:
    """Both optimisers run at the scheduled share of their own rates, and a late round
    moves the weights less than the first one from the same start (with DP too)."""
    data = load_task_data(tiny_sites[0], DENOISE)
    privacy = PrivacyConfig(enabled=private, secure_rng=False)
    moved, rates = {}, {}
    for config in (DENOISE, dataclasses.replace(DENOISE, lr_schedule="constant")):
        for server_round in (1, 8):
            task = build_task(config)
            before = task.get_weights()
            site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / f"{config.lr_schedule}-{server_round}"))
            train_site_round(task, data, site, privacy, planned_rounds=8, study_id="s", seed=3, server_round=server_round)
            after = task.get_weights()
            key = (config.lr_schedule, server_round)
            moved[key] = sum(float(np.abs(after[n] - before[n]).sum()) for n in before if n.startswith("generator."))
            rates[key] = {g: s["param_groups"][0]["lr"] for g, s in task._optimizer_states.items()}
    late = lr_scale("cosine", 8, 8)
    assert rates[("cosine", 1)] == pytest.approx({"generator": 2e-3, "discriminator": 1e-3})
    assert rates[("cosine", 8)] == pytest.approx({"generator": 2e-3 * late, "discriminator": 1e-3 * late})
    assert rates[("constant", 8)] == rates[("constant", 1)] == rates[("cosine", 1)]
    assert moved[("constant", 8)] == pytest.approx(moved[("constant", 1)])  # same seed, same rate: same update
    assert moved[("cosine", 8)] < 0.5 * moved[("cosine", 1)]
