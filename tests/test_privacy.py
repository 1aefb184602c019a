"""DP-SGD at the site: accounting that matches Opacus, budgets, clipping, refusal, restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from medgan_core.config import PrivacyConfig, SiteConfig
from medgan_core.study_config import StudyConfig
from medgan_core.data.dataset import load_site_data
from medgan_core.errors import PrivacyBudgetExhausted, PrivacyError
from medgan_core.models import DCGANDiscriminator
from medgan_core.privacy import (
    DPSettings,
    SiteAccountant,
    make_private,
    plan_dp,
    poisson_batch,
    validate_private_modules,
)
from medgan_core.site_round import accountant_path, train_site_round
from medgan_core.tasks.registry import build_task


def _opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    reference = RDPAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    return reference.get_epsilon(delta=delta)


def test_derived_noise_spends_the_target_over_the_planned_steps() -> None:
    dp = plan_dp(PrivacyConfig(target_epsilon=4.0, delta=1e-5), num_examples=500, batch_size=25, planned_steps=300)
    assert dp.sample_rate == pytest.approx(0.05)
    assert _opacus_epsilon(dp.noise_multiplier, dp.sample_rate, 300, 1e-5) == pytest.approx(4.0, rel=0.02)
    assert plan_dp(PrivacyConfig(noise_multiplier=1.3), 500, 25, 300).noise_multiplier == 1.3


def test_reported_epsilon_equals_opacus_for_the_same_steps(tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path) -> None:
    privacy = PrivacyConfig(noise_multiplier=1.1, target_epsilon=50.0, secure_rng=False)
    task = build_task(tiny_study.task)
    data = load_site_data(tiny_sites[1], tiny_study.task)
    site = SiteConfig(str(tiny_sites[1]), state_dir=str(tmp_path))
    metrics = train_site_round(task, data, site, privacy, planned_rounds=3, study_id="s1", seed=0)
    q = tiny_study.task.batch_size / data.num_train
    steps = tiny_study.task.local_steps
    assert metrics["sample-rate"] == pytest.approx(q)
    assert metrics["dp-steps"] == steps
    assert metrics["epsilon"] == pytest.approx(_opacus_epsilon(1.1, q, steps, privacy.delta), rel=1e-9)
    assert metrics["noise-multiplier"] == 1.1 and metrics["dp"] == 1.0


def test_budget_stop_happens_at_the_right_round(tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path) -> None:
    sigma, steps = 0.8, tiny_study.task.local_steps
    data = load_site_data(tiny_sites[0], tiny_study.task)
    q = tiny_study.task.batch_size / data.num_train
    budget = _opacus_epsilon(sigma, q, 3 * steps, 1e-5) + 1e-6  # exactly three rounds fit
    privacy = PrivacyConfig(noise_multiplier=sigma, secure_rng=False)
    site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path), epsilon_budget=budget)
    spent = []
    for server_round in (1, 2, 3):
        task = build_task(tiny_study.task)
        spent.append(train_site_round(task, data, site, privacy, planned_rounds=10, study_id="s", seed=server_round,
                                      server_round=server_round)["epsilon"])
    assert spent == sorted(spent) and spent[-1] <= budget
    with pytest.raises(PrivacyBudgetExhausted, match="budget"):
        train_site_round(build_task(tiny_study.task), data, site, privacy, planned_rounds=10, study_id="s", seed=4,
                         server_round=4)
    saved = json.loads(accountant_path(tmp_path, "s").read_text())
    assert saved["steps"] == 3 * steps  # the refused round spent nothing


def test_restart_resumes_the_accountant(tmp_path: Path) -> None:
    path = tmp_path / "acc.json"
    first = SiteAccountant("rdp", 1e-5, path)
    for _ in range(20):
        first.step(1.0, 0.1)
    first.save()
    restarted = SiteAccountant("rdp", 1e-5, path)
    assert restarted.steps == 20 and restarted.epsilon() == pytest.approx(first.epsilon())
    restarted.step(1.0, 0.1)
    assert restarted.epsilon() > first.epsilon()
    path.write_text("{not json")
    with pytest.raises(PrivacyError, match="unreadable"):
        SiteAccountant("rdp", 1e-5, path)


def test_per_sample_gradients_are_clipped() -> None:
    torch.manual_seed(0)
    model = DCGANDiscriminator(16, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=0.5, expected_batch_size=4)
    wrapped, private = make_private(model, optimizer, dp)
    images = torch.randn(4, 1, 16, 16) * 10
    (wrapped(images) * 100).mean().backward()
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in wrapped.parameters()], dim=1).norm(dim=1)
    assert torch.all(per_sample > 0.5)  # clipping has work to do
    private.pre_step()  # clip, (zero) noise, scale
    summed = torch.cat([p.summed_grad.flatten() for p in wrapped.parameters()]).norm()
    assert summed <= 4 * 0.5 + 1e-4


def test_single_sample_gradient_norm_is_exactly_the_clip() -> None:
    torch.manual_seed(1)
    model = DCGANDiscriminator(16, 8)
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=0.25, sample_rate=1.0, expected_batch_size=1)
    wrapped, private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), dp)
    (wrapped(torch.randn(1, 1, 16, 16) * 10) * 100).sum().backward()
    private.pre_step()
    norm = torch.cat([p.grad.flatten() for p in wrapped.parameters()]).norm()
    assert norm == pytest.approx(0.25, rel=1e-4)


def test_batchnorm_model_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(PrivacyError, match=r"discriminator\.1 \(BatchNorm2d\)"):
        validate_private_modules({"discriminator": model})
    validate_private_modules({"discriminator": DCGANDiscriminator(16, 8)})


def test_poisson_batches_vary_and_have_the_expected_size() -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [poisson_batch(1000, 0.05, generator).numel() for _ in range(200)]
    assert len(set(sizes)) > 5
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.1)


def test_secure_rng_noise_is_not_reproducible_from_the_seed(tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path) -> None:
    data = load_site_data(tiny_sites[0], tiny_study.task)
    results = []
    for secure, run in ((True, "a"), (True, "b"), (False, "c"), (False, "d")):
        task = build_task(tiny_study.task)
        site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / run))
        privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0, secure_rng=secure)
        train_site_round(task, data, site, privacy, planned_rounds=1, study_id="x", seed=7)
        results.append(task.get_weights()["discriminator.net.0.weight"])
    assert not torch.equal(torch.from_numpy(results[0]), torch.from_numpy(results[1]))
    assert torch.equal(torch.from_numpy(results[2]), torch.from_numpy(results[3]))


def test_privacy_off_reports_no_epsilon(tiny_sites: list[Path], tiny_study: StudyConfig) -> None:
    task = build_task(tiny_study.task)
    data = load_site_data(tiny_sites[0], tiny_study.task)
    metrics = train_site_round(task, data, SiteConfig(str(tiny_sites[0])), PrivacyConfig(enabled=False),
                               planned_rounds=1, study_id="x", seed=0)
    assert metrics["dp"] == 0.0 and "epsilon" not in metrics


def test_privacy_needs_a_state_folder(tiny_sites: list[Path], tiny_study: StudyConfig) -> None:
    from medgan_core.errors import ConfigError

    task = build_task(tiny_study.task)
    data = load_site_data(tiny_sites[0], tiny_study.task)
    with pytest.raises(ConfigError, match="state-dir"):
        train_site_round(task, data, SiteConfig(str(tiny_sites[0])), PrivacyConfig(), planned_rounds=1, study_id="x", seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check.py covers every task)")
def test_dp_training_runs_on_cuda(tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path) -> None:
    """Opacus draws the noise where the weights are: a CPU noise generator fails on CUDA."""
    task = build_task(tiny_study.task, "cuda")
    before = task.get_weights()
    data = load_site_data(tiny_sites[0], tiny_study.task)
    site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path))
    metrics = train_site_round(task, data, site, PrivacyConfig(target_epsilon=8.0), planned_rounds=2, study_id="s", seed=0)
    after = task.get_weights()
    assert 0 < metrics["epsilon"] <= 8.0
    assert all(p.is_cuda for p in task.generator.parameters())
    assert any(not torch.equal(torch.from_numpy(before[k]), torch.from_numpy(after[k])) for k in before)
