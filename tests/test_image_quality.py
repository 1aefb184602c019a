"""The torch SSIM used as a training loss is the SSIM the benchmarks report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medgan_core.config import PrivacyConfig, SiteConfig
from medgan_core.metrics.image_quality import psnr_ssim, ssim_per_image
from medgan_core.site_round import train_site_round
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, replace_task, task_config


def test_torch_ssim_equals_scikit_image() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 24, 20, generator=g) * 2 - 1
    output = (target + 0.3 * torch.randn(3, 1, 24, 20, generator=g)).clamp(-1, 1)
    per_image = ssim_per_image(output.double(), target.double())
    assert per_image.shape == (3,)
    assert per_image.mean().item() == pytest.approx(psnr_ssim(output, target)[1], abs=1e-5)
    assert ssim_per_image(target, target).allclose(torch.ones(3))


def test_the_ssim_term_is_trained_only_when_weighted_and_works_under_dp(tiny_sites: list[Path], tmp_path: Path) -> None:
    config = task_config(name="denoise", image_size=32, width=8, batch_size=8, local_steps=2)
    data = load_task_data(tiny_sites[0], config)
    assert "loss-ssim" not in build_task(config).train(data, 2, seed=0)
    weighted = replace_task(config, **{"ssim_weight": 50.0})
    losses = build_task(weighted).train(data, 2, seed=0)
    assert 0.0 < losses["loss-ssim"] < 2.0
    # Under DP-SGD the term goes through the per-sample clipping like the others.
    task = build_task(weighted)
    before = task.get_weights()
    metrics = train_site_round(task, data, SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path)),
                               PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0), planned_rounds=1,
                               study_id="s", seed=0)
    assert metrics["dp-steps"] == weighted.local_steps and "loss-ssim" in metrics  # one joint release per step
    after = task.get_weights()
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("generator"))
