"""ε is what the report says, and the hospital decides it (issue 19, points 6-9).

Each test tries to break a privacy promise: a joint release counted as two, a study
that lowers a site's policy, a ledger deleted or edited, a round charged twice.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from medgan_core.config import PrivacyConfig, SiteConfig, load_site, privacy_config_from_flat
from medgan_core.study_config import StudyConfig
from medgan_core.data.dataset import SiteData
from medgan_core.errors import ConfigError, PrivacyError
from medgan_core.privacy import DPSettings, SiteAccountant, plan_dp
from medgan_core.privacy.dp_sgd import joint_noise_multiplier
from medgan_core.privacy.ghost import GhostDPOptimizer
from medgan_core.site_round import accountant_path, train_site_round
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, task_config

pytestmark = pytest.mark.security
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
DENOISE = task_config(name="denoise", image_size=16, batch_size=8, local_steps=3, width=8, seed=0)


def _rdp_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    """An independent computation: RDP of the sampled Gaussian mechanism, converted to (ε, δ)."""
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])


# --- 6: several private networks on one Poisson batch are one mechanism ------------------------
@pytest.mark.parametrize(("q", "sigma", "steps", "counted", "actual"),
                         [(0.19, 2.56, 800, 18.6, 19.6), (0.1, 1.0, 1000, 42.3, 56.7)])
def test_two_releases_on_one_batch_are_one_joint_mechanism(q: float, sigma: float, steps: int, counted: float,
                                                           actual: float) -> None:
    """The issue's numbers: counting two independent releases under-counts the joint one."""
    naive = _rdp_epsilon(sigma, q, 2 * steps)
    joint = _rdp_epsilon(joint_noise_multiplier(sigma, 2), q, steps)
    assert naive == pytest.approx(counted, abs=0.1) and joint == pytest.approx(actual, abs=0.1)
    task = build_task(DENOISE)  # generator and discriminator both private: two networks per batch
    assert task.dp_releases_per_step == 2
    accountant = SiteAccountant()
    for _ in range(steps):
        task.account_step(DPSettings(sigma, 1.0, q, 1), accountant)  # type: ignore[attr-defined]
    assert accountant.epsilon() == pytest.approx(joint, rel=1e-6)


def test_a_trained_round_is_accounted_as_the_joint_mechanism(tiny_sites: list[Path], tmp_path: Path) -> None:
    data = load_task_data(tiny_sites[1], DENOISE)
    privacy = PrivacyConfig(noise_multiplier=1.3, target_epsilon=100.0, secure_rng=False)
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path))
    metrics = train_site_round(build_task(DENOISE), data, site, privacy, planned_rounds=1, study_id="j", seed=0)
    q = DENOISE.batch_size / data.num_train
    assert metrics["epsilon"] == pytest.approx(_rdp_epsilon(1.3 / math.sqrt(2), q, DENOISE.local_steps), rel=1e-6)
    assert metrics["epsilon"] > _rdp_epsilon(1.3, q, 2 * DENOISE.local_steps)  # the old count was too low


@pytest.mark.parametrize("k", [1, 2])
def test_planned_noise_meets_the_target_without_exceeding_it(k: int) -> None:
    target, q, steps = 8.0, 0.19, 800
    dp = plan_dp(PrivacyConfig(target_epsilon=target), num_examples=100, batch_size=19, planned_steps=steps,
                 releases_per_step=k)
    spent = _rdp_epsilon(joint_noise_multiplier(dp.noise_multiplier, k), q, steps)
    assert target - 0.1 <= spent <= target


# --- 7: the site's policy wins over the coordinator's study --------------------------------------
HOSPITAL = dict(require_dp=True, require_secure_rng=True, max_delta=1e-5, release_test_metrics=False)


@pytest.mark.parametrize(("privacy", "reason"), [
    (PrivacyConfig(enabled=False), "requires differential privacy"),
    (PrivacyConfig(secure_rng=False), "secure-rng = false"),
    (PrivacyConfig(delta=1e-3), "δ up to 1e-05"),
])
def test_a_study_cannot_lower_the_sites_policy(tiny_sites: list[Path], tmp_path: Path, privacy: PrivacyConfig,
                                               reason: str) -> None:
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path), epsilon_budget=3.0, **HOSPITAL)
    task = build_task(DENOISE)
    before = task.get_weights()
    with pytest.raises(PrivacyError, match=reason):
        train_site_round(task, load_task_data(tiny_sites[1], DENOISE), site, privacy, planned_rounds=1,
                         study_id="p", seed=0)
    after = task.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing was trained
    assert not list(tmp_path.glob("accountant-*"))


def test_a_site_budget_below_the_target_plans_for_the_site(tiny_sites: list[Path], tmp_path: Path) -> None:
    data = load_task_data(tiny_sites[1], DENOISE)
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path), epsilon_budget=3.0)
    spent = [train_site_round(build_task(DENOISE), data, site, PrivacyConfig(target_epsilon=8.0, delta=1e-3),
                              planned_rounds=2, study_id="b", seed=r, server_round=r)["epsilon"] for r in (1, 2)]
    assert spent[-1] <= 3.0 and spent[-1] > 2.8  # every planned round ran, within the site's own budget


def test_site_toml_defaults_to_the_hospital_policy(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('[site]\ndata-path = "data"\nstate-dir = "state"\n[connection]\nprivate-key = "k"\n')
    site, _ = load_site(config)
    assert (site.require_dp, site.require_secure_rng, site.max_delta, site.release_test_metrics) == (
        True, True, 1e-5, False)


def test_a_site_warns_when_delta_is_above_one_over_its_records(tiny_sites: list[Path], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    data = load_task_data(tiny_sites[1], DENOISE)
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="medgan_core.site_round"):
        train_site_round(build_task(DENOISE), data, site, PrivacyConfig(target_epsilon=50.0, delta=0.09),
                         planned_rounds=1, study_id="w", seed=0)
    assert any("above 1/N" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="medgan_core.site_round"):
        train_site_round(build_task(DENOISE), data, site, PrivacyConfig(target_epsilon=50.0, delta=1e-5),
                         planned_rounds=1, study_id="w2", seed=0)
    assert not any("above 1/N" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_privacy_settings_from_the_coordinator_are_refused(value: float) -> None:
    flat = {f"privacy.{k}": v for k, v in StudyConfig().to_dict()["privacy"].items()}
    flat["privacy.target-epsilon"] = value
    with pytest.raises(ConfigError, match="finite"):
        privacy_config_from_flat(flat)


# --- 8: a ledger that was deleted or edited stops the site ----------------------------------------
def _trained_site(tiny_sites: list[Path], tmp_path: Path) -> tuple[SiteConfig, PrivacyConfig, Path]:
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path / "state"))
    privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0, secure_rng=False)
    _round(site, privacy, tiny_sites, 1)
    return site, privacy, accountant_path(site.state_dir, "L")


def _round(site: SiteConfig, privacy: PrivacyConfig, tiny_sites: list[Path], server_round: int,
           task=None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return train_site_round(task or build_task(DENOISE), load_task_data(tiny_sites[1], DENOISE), site, privacy,
                            planned_rounds=5, study_id="L", seed=server_round, server_round=server_round)


def test_a_deleted_accountant_fails_closed(tiny_sites: list[Path], tmp_path: Path) -> None:
    site, privacy, path = _trained_site(tiny_sites, tmp_path)
    path.unlink()
    with pytest.raises(PrivacyError, match="missing, but this site has trained"):
        _round(site, privacy, tiny_sites, 2)


def test_an_edited_accountant_fails_closed(tiny_sites: list[Path], tmp_path: Path) -> None:
    site, privacy, path = _trained_site(tiny_sites, tmp_path)
    state = json.loads(path.read_text())
    state["history"] = []  # "reset ε to 0"
    state["steps"] = 0
    path.write_text(json.dumps(state))
    with pytest.raises(PrivacyError, match="altered"):
        _round(site, privacy, tiny_sites, 2)


def test_an_older_copy_of_the_accountant_fails_closed(tiny_sites: list[Path], tmp_path: Path) -> None:
    site, privacy, path = _trained_site(tiny_sites, tmp_path)
    old = path.read_bytes()
    _round(site, privacy, tiny_sites, 2)
    path.write_bytes(old)  # a validly sealed file, one round behind
    with pytest.raises(PrivacyError, match="older copy"):
        _round(site, privacy, tiny_sites, 3)


@pytest.mark.parametrize("victim", ["ledger-index.json", "ledger.key"])
def test_a_deleted_ledger_index_or_key_fails_closed(tiny_sites: list[Path], tmp_path: Path, victim: str) -> None:
    site, privacy, _ = _trained_site(tiny_sites, tmp_path)
    (Path(site.state_dir) / victim).unlink()
    with pytest.raises(PrivacyError, match="missing|gone"):
        _round(site, privacy, tiny_sites, 2)


def test_a_planted_accountant_for_a_new_study_fails_closed(tiny_sites: list[Path], tmp_path: Path) -> None:
    site, privacy, path = _trained_site(tiny_sites, tmp_path)
    shutil.copy(path, accountant_path(site.state_dir, "other"))
    with pytest.raises(PrivacyError):
        SiteAccountant("rdp", 1e-5, accountant_path(site.state_dir, "other"))


def test_an_intact_ledger_carries_on(tiny_sites: list[Path], tmp_path: Path) -> None:
    site, privacy, path = _trained_site(tiny_sites, tmp_path)
    second = _round(site, privacy, tiny_sites, 2)
    assert second["dp-steps"] == 2 * DENOISE.local_steps


# --- 9: a repeated round re-sends the released update, charging nothing -----------------------------
def test_a_repeated_round_resends_the_same_update_without_a_new_charge(tiny_sites: list[Path], tmp_path: Path) -> None:
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path / "state"))
    privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0)  # secret noise: a retrain would differ
    first_task = build_task(DENOISE)
    first = _round(site, privacy, tiny_sites, 1, first_task)
    again_task = build_task(DENOISE)
    again = _round(site, privacy, tiny_sites, 1, again_task)
    assert again == first
    w1, w2 = first_task.get_weights(), again_task.get_weights()
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)  # the very update already released
    assert SiteAccountant("rdp", 1e-5, accountant_path(site.state_dir, "L")).steps == DENOISE.local_steps
    second = _round(site, privacy, tiny_sites, 2)  # a new round is trained and charged
    assert second["dp-steps"] == 2 * DENOISE.local_steps


def test_a_crash_before_accounting_never_resends_an_unaccounted_update(
    tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path / "state"))
    privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0)

    def crash(self: SiteAccountant) -> None:
        raise KeyboardInterrupt("power loss")

    with monkeypatch.context() as patch:
        patch.setattr(SiteAccountant, "save", crash)
        with pytest.raises(KeyboardInterrupt):
            _round(site, privacy, tiny_sites, 1)
    metrics = _round(site, privacy, tiny_sites, 1)  # nothing left the site: the round is trained once
    assert metrics["dp-steps"] == DENOISE.local_steps


def test_an_altered_release_copy_is_refused(tiny_sites: list[Path], tmp_path: Path) -> None:
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path / "state"))
    privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0)
    _round(site, privacy, tiny_sites, 1)
    copy = next((tmp_path / "state" / "released-L").glob("round-001.safetensors"))
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(PrivacyError, match="altered"):
        _round(site, privacy, tiny_sites, 1)


# --- a generated image must not carry a record's presence --------------------------------------
def _synthesis_data(records: int = 40) -> SiteData:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(records, 1, 16, 16, generator=generator) * 2 - 1
    burden = torch.rand(records, generator=generator) * 0.3
    return SiteData("s", images, images, train_condition=burden, test_condition=burden)


@pytest.mark.parametrize("name", ["synthesis", "conditional"])
def test_one_more_record_moves_the_discriminators_clipped_sum_by_the_clip_and_no_more(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accountant assumes a record changes a step's clipped sum by at most C. Were the
    step to generate as many images as the Poisson batch holds real ones, a record would
    also bring one more generated image, another clipped gradient: 2C, and the ε reported
    half of what the noise protects. Every per-sample gradient here is longer than C (a tiny
    C), so the record's own clipped gradient moves the sum by exactly C."""
    clip = 1e-4
    task = build_task(task_config(name=name, image_size=16, width=8, batch_size=8, z_dim=8, seed=0))
    data = _synthesis_data()
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.2, expected_batch_size=8,
                    secure_rng=False)
    sums: list[torch.Tensor] = []
    original = GhostDPOptimizer.clip_and_accumulate

    def spy(optimizer: GhostDPOptimizer) -> None:
        original(optimizer)
        sums.append(torch.cat([p.summed_grad.flatten() for p in optimizer.params]).clone())

    monkeypatch.setattr(GhostDPOptimizer, "clip_and_accumulate", spy)
    for batch in (torch.arange(6), torch.arange(7)):  # the second: the same batch and one more record
        fresh = copy.deepcopy(task)  # the same networks before each step
        with fresh.training_setup(dp, seed=0) as s:
            fresh.train_step(s, data, "train", batch)
    assert len(sums) == 2  # only the discriminator is private
    assert float((sums[1] - sums[0]).norm()) == pytest.approx(clip, rel=1e-3)


def test_an_empty_poisson_batch_is_still_a_noisy_discriminator_step_and_a_generator_step() -> None:
    """Skipping a step whose Poisson batch came out empty would tell whether it did (the
    released model moves, or not); the synthesis step has its generated images to step on."""
    task = build_task(task_config(name="synthesis", image_size=16, width=8, batch_size=8, z_dim=8, seed=0))
    before = {k: v.copy() for k, v in task.get_weights().items()}
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-12, expected_batch_size=8,
                    secure_rng=False)
    metrics = task.train(_synthesis_data(), 2, seed=0, dp=dp)
    after = task.get_weights()
    for group in ("discriminator", "generator"):
        assert any(not np.array_equal(before[k], after[k]) for k in after if k.startswith(group)), group
    assert "d-real" not in metrics and "d-fake" in metrics  # no real image was read


@pytest.mark.parametrize("name", ["denoise", "cycle"])
def test_an_empty_poisson_batch_is_still_a_noisy_step_of_every_private_network(name: str, tiny_sites: list[Path]) -> None:
    """An image-to-image step has nothing to train on without records, but its private
    networks still take their noise (as Opacus does), and the step is accounted."""
    config = task_config(name=name, image_size=16, batch_size=8, local_steps=2, width=8, seed=0)
    task = build_task(config)
    before = {k: v.copy() for k, v in task.get_weights().items()}
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-12, expected_batch_size=8,
                    secure_rng=False)
    accountant = SiteAccountant()
    assert task.train(load_task_data(tiny_sites[1], config), 2, seed=0, dp=dp, accountant=accountant) == {}
    after = task.get_weights()
    for group in task.private_groups:
        assert all(not np.array_equal(before[k], after[k]) for k in after if k.startswith(group)), group
    assert accountant.steps == 2
