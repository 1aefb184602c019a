"""FID/KID on the project's own feature network: the formulas, the shipped weights, and
features that see anatomy rather than nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medgan_core.errors import WeightsError
from medgan_core.metrics.features import (
    WEIGHTS_FILE,
    extract_features,
    fid_kid,
    frechet_distance,
    kernel_distance,
    load_feature_net,
)
from medgan_core.tasks.registry import load_task_data, task_config


def test_frechet_distance_matches_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (4000, 3))
    b = rng.normal([1.0, 2.0, 0.0], [1.0, 1.0, 2.0], (4000, 3))
    # |mu|^2 = 5; trace term for diagonal covariances: sum (s_a - s_b)^2 = (1 - 2)^2 = 1
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same = kernel_distance(a, b, seed=0)
    shifted = kernel_distance(a, b + 0.5, seed=0)
    assert abs(same) < 0.02 and shifted > 10 * abs(same) and shifted > 0.05


def test_shipped_weights_load_and_a_damaged_file_is_refused(tmp_path: Path) -> None:
    net = load_feature_net()
    assert extract_features(net, torch.zeros(3, 1, 32, 32)).shape == (3, 96)
    record = json.loads(WEIGHTS_FILE.read_text())
    assert record["about"]["grade-accuracy"] > 0.6  # what training measured on held-out phantoms
    record["weights"] = record["weights"][:-8] + "AAAAAAAA"
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(record))
    with pytest.raises(WeightsError, match="checksum"):
        load_feature_net(damaged)
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_feature_net(tmp_path / "empty.json")
    from medgan_core.metrics.features import save_feature_net

    other = torch.nn.Linear(2, 2)
    save_feature_net(other, tmp_path / "other.json", {})  # type: ignore[arg-type]
    with pytest.raises(WeightsError, match="does not fit"):
        load_feature_net(tmp_path / "other.json")


def test_features_separate_real_anatomy_from_degraded_images(tiny_sites: list[Path]) -> None:
    """Two sites' real CT are closer to each other than either is to the same slices blurred
    and shifted: FID and KID rank what a radiologist would."""
    config = task_config(image_size=64)
    a = load_task_data(tiny_sites[0], config).train
    b = load_task_data(tiny_sites[1], config).train
    degraded = torch.nn.functional.avg_pool2d(b, 5, 1, 2).clamp(-1, 1) * 0.6
    net = load_feature_net()
    real_pair = fid_kid(net, a, b)
    fake_pair = fid_kid(net, degraded, b)
    assert real_pair["fid"] < fake_pair["fid"] and real_pair["kid"] < fake_pair["kid"]


def test_feature_training_script_writes_loadable_weights(tmp_path: Path) -> None:
    from medgan_core.metrics.features import save_feature_net
    from medgan_core.metrics.train_features import train_feature_net

    net, held_out = train_feature_net(subjects=5, steps=3, log_every=0)
    path = save_feature_net(net, tmp_path / "features.json", {"subjects": 5, **held_out})
    loaded = load_feature_net(path)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded.features(x), net.features(x))
    assert not torch.allclose(loaded.features(x), load_feature_net().features(x))


def test_diversity_precision_and_recall_see_mode_collapse(tiny_sites: list[Path]) -> None:
    """Real slices of two subjects against those of three others of the same site: varied and
    covered. A generator that collapsed onto one realistic slice: FID alone could miss it;
    diversity and recall do not. (Two sites' real slices differ in noise; with eight slices a
    site their precision is too noisy a number to test.)"""
    from medgan_core.metrics.features import feature_scores

    config = task_config(image_size=64)
    b = load_task_data(tiny_sites[1], config).train  # 5 subjects × 4 slices
    others = b[8:]
    collapsed = (b[3:4].repeat(len(others), 1, 1, 1) + 0.01 * torch.randn(len(others), 1, 64, 64)).clamp(-1, 1)
    net = load_feature_net()
    real, mode = feature_scores(net, b[:8], others), feature_scores(net, collapsed, others)
    assert 0.6 < real["diversity"] < 1.6 and real["recall"] > 0.3 and real["precision"] > 0.3
    assert mode["diversity"] < 0.1 and mode["recall"] < real["recall"] / 2
