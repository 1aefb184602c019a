"""A site keeps the σ it searched for, and uses a kept σ only after checking what it spends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgan_core.config import PrivacyConfig, SiteConfig
from medgan_core.data.dataset import load_site_data
from medgan_core.privacy import planning
from medgan_core.privacy import SiteAccountant
from medgan_core.privacy.planning import SEARCH_TOLERANCE, noise_for, plan_dp
from medgan_core.site_round import NOISE_PLANS, train_site_round
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task

TARGET, DELTA, Q, STEPS = 4.0, 1e-5, 0.05, 300


def epsilon_of(sigma: float) -> float:
    return SiteAccountant("rdp", DELTA).epsilon_after(sigma, Q, STEPS)


def _no_search(**_: object) -> float:
    raise AssertionError("searched again")


def test_a_kept_sigma_is_reused_without_a_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plans = tmp_path / "plans.json"
    sigma = noise_for(TARGET, DELTA, Q, STEPS, "rdp", plans)
    assert TARGET - SEARCH_TOLERANCE <= epsilon_of(sigma) <= TARGET
    assert list(json.loads(plans.read_text()).values()) == [sigma]
    monkeypatch.setattr(planning, "get_noise_multiplier", _no_search)
    assert noise_for(TARGET, DELTA, Q, STEPS, "rdp", plans) == sigma
    dp = plan_dp(PrivacyConfig(target_epsilon=TARGET, delta=DELTA), num_examples=500, batch_size=25,
                 planned_steps=STEPS, plans=plans)
    assert dp.noise_multiplier == sigma
    with pytest.raises(AssertionError, match="searched again"):  # other inputs are another plan
        noise_for(TARGET, DELTA, Q, STEPS + 1, "rdp", plans)


@pytest.mark.security
@pytest.mark.parametrize("edit", ["less noise", "more noise", "not a number", "not json"])
def test_an_edited_plan_costs_a_search_never_privacy(tmp_path: Path, edit: str) -> None:
    """Someone (or a bug) edits the site's kept σ: less noise would overspend ε, more would
    waste utility; neither is used, and the searched σ replaces it."""
    plans = tmp_path / "plans.json"
    searched = noise_for(TARGET, DELTA, Q, STEPS, "rdp", plans)
    key = next(iter(json.loads(plans.read_text())))
    edited = {"less noise": searched * 0.8, "more noise": searched * 1.2, "not a number": "0.1"}
    plans.write_text("{" if edit == "not json" else json.dumps({key: edited[edit]}))
    assert noise_for(TARGET, DELTA, Q, STEPS, "rdp", plans) == searched
    assert json.loads(plans.read_text())[key] == searched
    if edit == "less noise":
        assert epsilon_of(searched * 0.8) > TARGET  # what it would have spent


def test_a_site_round_keeps_its_plan_in_its_state_folder(tiny_sites: list[Path], tiny_study: StudyConfig,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    privacy = PrivacyConfig(target_epsilon=8.0, secure_rng=False)
    data = load_site_data(tiny_sites[1], tiny_study.task)
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path))
    first = train_site_round(build_task(tiny_study.task), data, site, privacy, planned_rounds=3, study_id="s1", seed=0)
    assert list(json.loads((tmp_path / NOISE_PLANS).read_text()).values()) == [first["noise-multiplier"]]
    monkeypatch.setattr(planning, "get_noise_multiplier", _no_search)  # round 2: the kept plan, checked
    second = train_site_round(build_task(tiny_study.task), data, site, privacy, planned_rounds=3, study_id="s1",
                              seed=1, server_round=2)
    assert second["noise-multiplier"] == first["noise-multiplier"]
    assert first["epsilon"] < second["epsilon"] <= 8.0
