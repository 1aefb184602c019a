"""The synthesis task trains, and its metric tells a trained generator from an untrained one."""

from pathlib import Path

import numpy as np
import pytest
import torch

from medgan_core.study_config import StudyConfig
from medgan_core.data.dataset import load_site_data
from medgan_core.errors import WeightsError
from medgan_core.metrics import intensity_distance, sliced_wasserstein
from medgan_core.tasks.registry import build_task


def test_swd_is_small_for_same_distribution_and_large_for_noise(tiny_sites: list[Path]) -> None:
    task = StudyConfig().task.__class__(image_size=32)
    data = load_site_data(tiny_sites[1], task)
    half = data.train.shape[0] // 2
    same = sliced_wasserstein(data.train[:half], data.train[half:])
    noise = sliced_wasserstein(torch.rand_like(data.train[:half]) * 2 - 1, data.train[half:])
    assert same < 0.5 * noise
    assert intensity_distance(data.train, data.train) == pytest.approx(0.0, abs=1e-6)


def test_training_changes_weights_and_improves_held_out_metric(tiny_sites: list[Path], tiny_study: StudyConfig) -> None:
    config = tiny_study.replace(task={"width": 16, "z_dim": 16, "batch_size": 16, "eval_samples": 32}).task
    data = load_site_data(tiny_sites[1], config)
    task = build_task(config)
    before = task.get_weights()
    untrained = task.evaluate(data)
    metrics = task.train(data, steps=150, seed=0)
    after = task.get_weights()
    trained = task.evaluate(data)
    assert set(metrics) == {"loss-d", "loss-g", "d-real", "d-fake"}
    for group in ("generator", "discriminator"):
        changed = [k for k in before if k.startswith(group) and not np.array_equal(before[k], after[k])]
        assert changed, f"{group} did not change"
    assert trained["swd"] < 0.7 * untrained["swd"]
    assert trained["intensity-w1"] < untrained["intensity-w1"]


def test_same_seed_same_model_and_training(tiny_sites: list[Path], tiny_study: StudyConfig) -> None:
    data = load_site_data(tiny_sites[0], tiny_study.task)
    a, b = build_task(tiny_study.task), build_task(tiny_study.task)
    a.train(data, 2, seed=4)
    b.train(data, 2, seed=4)
    for name, value in a.get_weights().items():
        np.testing.assert_array_equal(value, b.get_weights()[name])


def test_set_weights_rejects_wrong_names_shapes_and_nan(tiny_study: StudyConfig) -> None:
    task = build_task(tiny_study.task)
    weights = task.get_weights()
    name = next(iter(weights))
    with pytest.raises(WeightsError, match="unexpected"):
        task.set_weights({**weights, "generator.extra": np.zeros(2, np.float32)})
    with pytest.raises(WeightsError, match="shape"):
        task.set_weights({**weights, name: np.zeros((1,), np.float32)})
    bad = weights[name].copy()
    bad.flat[0] = np.nan
    with pytest.raises(WeightsError, match="NaN"):
        task.set_weights({**weights, name: bad})


def test_ema_ends_the_round_on_the_average_of_the_generators_steps(tiny_sites: list[Path], tiny_study) -> None:
    """task.ema: the generator sent is the moving average of its steps, which lags the last step."""
    from medgan_core.tasks.registry import replace_task

    def generator_after(ema: float) -> tuple[dict, dict]:
        task = build_task(replace_task(tiny_study.task, ema=ema))
        before = {k: v.copy() for k, v in task.get_weights().items() if k.startswith("generator.")}
        task.train(load_site_data(tiny_sites[0], task.config), 6, seed=0)
        return before, {k: v for k, v in task.get_weights().items() if k.startswith("generator.")}

    start, plain = generator_after(0.0)
    _, averaged = generator_after(0.9)
    moved = sum(float(np.abs(plain[k] - start[k]).sum()) for k in start)
    moved_averaged = sum(float(np.abs(averaged[k] - start[k]).sum()) for k in start)
    assert 0 < moved_averaged < moved  # same seed, same steps: the average sits between start and end


def test_d_steps_steps_the_generator_once_every_d_private_discriminator_steps(tiny_sites: list[Path], tiny_study) -> None:
    """task.d-steps: the generator steps after every d-th discriminator step; under DP the
    accountant counts each discriminator step (the private mechanism) once, and the
    generator's steps, post-processing of the private D, not at all."""
    from medgan_core.privacy.accountant import SiteAccountant
    from medgan_core.privacy.dp_sgd import DPSettings
    from medgan_core.tasks.registry import replace_task

    def optimiser_steps(task, group: str) -> int:
        return int(task._optimizer_states[group]["state"][0]["step"])

    config = replace_task(tiny_study.task, d_steps=3)
    data = load_site_data(tiny_sites[0], config)
    task = build_task(config)
    start = task.get_weights()
    metrics = task.train(data, steps=2, seed=0)  # fewer steps than d: the generator never steps
    assert "loss-g" not in metrics and "loss-d" in metrics
    after = task.get_weights()
    assert all(np.array_equal(start[k], after[k]) for k in start if k.startswith("generator."))
    assert any(not np.array_equal(start[k], after[k]) for k in start if k.startswith("discriminator."))

    task = build_task(config)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=4, secure_rng=False)
    accountant = SiteAccountant("rdp", 1e-5)
    metrics = task.train(data, steps=7, seed=0, dp=dp, accountant=accountant)
    assert (optimiser_steps(task, "discriminator"), optimiser_steps(task, "generator")) == (7, 2)
    assert accountant.steps == 7 and "loss-g" in metrics
    same_epsilon = SiteAccountant("rdp", 1e-5)
    for _ in range(7):
        same_epsilon.step(1.0, 0.5)
    assert accountant.epsilon() == pytest.approx(same_epsilon.epsilon())


def test_d_steps_is_checked_at_load(tiny_study) -> None:
    from medgan_core.errors import ConfigError

    with pytest.raises(ConfigError, match="task.d-steps = 0; it must be a positive number"):
        tiny_study.replace(task={"d_steps": 0})
    with pytest.raises(ConfigError, match="task.d-steps = 9 exceeds task.local-steps = 4"):
        tiny_study.replace(task={"local_steps": 4, "d_steps": 9})
    assert tiny_study.replace(task={"local_steps": 8, "d_steps": 4}).task.params.d_steps == 4
    # a site makes its evaluation images in one batch: a study cannot ask it for a million
    with pytest.raises(ConfigError, match="task.eval-samples = 1000000; at most 2048"):
        tiny_study.replace(task={"eval_samples": 10**6})
    # nor networks too large for any site: the width and the latent code are bounded too
    with pytest.raises(ConfigError, match="task.width = 4096; at most 256"):
        tiny_study.replace(task={"width": 4096})
    with pytest.raises(ConfigError, match="task.z-dim = 100000; at most 1024"):
        tiny_study.replace(task={"z_dim": 100_000})
    assert tiny_study.replace(task={"width": 256, "z_dim": 1024}).task.width == 256


def test_mode_seeking_penalty_is_large_for_a_collapsed_generator_and_reads_no_data() -> None:
    from medgan_core.tasks.synthesis import mode_seeking_penalty

    codes = torch.cat([torch.zeros(2, 8), torch.full((2, 8), 2.0)])
    varied = torch.cat([torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)])
    assert float(mode_seeking_penalty(varied, codes)) == pytest.approx(2.0, rel=1e-4)  # gap 1 for codes 2 apart
    assert float(mode_seeking_penalty(torch.zeros(4, 1, 4, 4), codes)) > 1e4
    assert float(mode_seeking_penalty(torch.zeros(1, 1, 4, 4), torch.zeros(1, 8))) == 0.0


def test_mode_seeking_changes_only_the_generators_steps(tiny_sites: list[Path], tiny_study) -> None:
    """The term is in the generator's loss only: the same seed gives the same first
    discriminator step and a different generator."""
    from medgan_core.errors import ConfigError
    from medgan_core.tasks.registry import replace_task

    data = load_site_data(tiny_sites[0], tiny_study.task)

    def after_one_step(weight: float) -> dict:
        task = build_task(replace_task(tiny_study.task, mode_seeking=weight))
        task.train(data, 1, seed=3)
        return task.get_weights()

    plain, seeking = after_one_step(0.0), after_one_step(1.0)
    for name in plain:
        same = np.array_equal(plain[name], seeking[name])
        assert same == name.startswith("discriminator."), name
    with pytest.raises(ConfigError, match="task.mode-seeking = -1.0"):
        tiny_study.replace(task={"mode_seeking": -1.0})
