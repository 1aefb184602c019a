"""Levers for training under DP: augmentation multiplicity (several views of each sampled
slice, one clipped gradient per slice, the same accounting), the generator's moving average
at the end of a round, and fine-tuning only normalisation layers and biases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medgan_core.errors import ConfigError
from medgan_core.privacy import DPSettings, SiteAccountant
from medgan_core.privacy.ghost import GhostDPOptimizer, has_ghost
from medgan_core.privacy.multiplicity import average_views, repeat_records
from medgan_core.privacy.per_sample import FastConvGradSampleModule
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, load_task_data, replace_task, task_config

CONFIG = task_config(name="denoise", image_size=32, width=8, batch_size=8, local_steps=3, lr_generator=2e-3,
                     lr_discriminator=2e-3)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.2),
                         nn.Conv2d(4, 2, 4, stride=2, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 1))


def test_repeat_records_puts_each_records_views_side_by_side() -> None:
    assert repeat_records(torch.tensor([2, 5]), 3).tolist() == [2, 2, 2, 5, 5, 5]
    assert repeat_records(torch.tensor([2, 5]), 1).tolist() == [2, 5]
    with pytest.raises(ValueError, match="at least 1"):
        repeat_records(torch.tensor([2]), 0)


def test_each_record_gets_the_gradient_of_the_mean_loss_over_its_views() -> None:
    """What the private optimiser clips after ``average_views``: per record, the gradient of
    the mean loss over its views, computed here on a plain copy record by record."""
    torch.manual_seed(0)
    records, views = 3, 4
    plain = _net()
    reference = _net()
    reference.load_state_dict(plain.state_dict())
    batch = torch.randn(records * views, 1, 8, 8)

    wrapped = FastConvGradSampleModule(plain)
    (wrapped(batch) ** 2).mean().backward()  # a mean over every view of every record
    average_views(wrapped, views)

    for record in range(records):
        reference.zero_grad()
        (reference(batch[record * views : (record + 1) * views]) ** 2).mean().backward()
        for (name, param), mine in zip(reference.named_parameters(), plain.parameters()):
            assert mine.grad_sample.shape[0] == records, name
            torch.testing.assert_close(mine.grad_sample[record], param.grad, rtol=1e-4, atol=1e-6)


def test_average_views_refuses_rows_that_are_not_whole_records_and_leaves_plain_modules() -> None:
    wrapped = FastConvGradSampleModule(_net())
    (wrapped(torch.randn(6, 1, 8, 8)) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="not whole records of 4 views"):
        average_views(wrapped, 4)
    plain = _net()
    (plain(torch.randn(6, 1, 8, 8)) ** 2).mean().backward()
    before = [p.grad.clone() for p in plain.parameters()]
    average_views(plain, 3)  # no per-sample gradients: its gradient is already the mean over every view
    assert all(torch.equal(b, p.grad) for b, p in zip(before, plain.parameters()))


def test_dp_step_clips_one_gradient_per_slice_over_several_views_and_accounts_the_same(
    tiny_sites: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import medgan_core.tasks.paired as paired

    views = 4
    config = replace_task(CONFIG, views_per_record=views)
    data = load_task_data(tiny_sites[1], config)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    clipped: list[int] = []
    original_pair = paired.PairedImageTask.training_pair
    original_clip = GhostDPOptimizer.clip_and_accumulate

    def recording_pair(self, data, idx, rng):  # type: ignore[no-untyped-def]
        low, full = original_pair(self, data, idx, rng)
        pairs.append((idx.clone(), full.clone()))
        return low, full

    def recording_clip(self):  # type: ignore[no-untyped-def]
        clipped.append(self.records_in_batch())
        return original_clip(self)

    monkeypatch.setattr(paired.PairedImageTask, "training_pair", recording_pair)
    monkeypatch.setattr(GhostDPOptimizer, "clip_and_accumulate", recording_clip)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3, expected_batch_size=6, secure_rng=False)
    accountant = SiteAccountant()
    build_task(config).train(data, steps=4, seed=0, dp=dp, accountant=accountant)

    assert accountant.steps == 4  # one joint release a step, as with one view
    reference = SiteAccountant()
    for _ in range(4):
        reference.step(1.0 / np.sqrt(2), 0.3)
    assert accountant.epsilon() == pytest.approx(reference.epsilon())
    assert pairs, "no non-empty Poisson batch in 4 steps"
    for idx, full in pairs:
        records = len(idx) // views
        assert idx.tolist() == np.repeat(idx[::views].numpy(), views).tolist()  # each slice 4 times in a row
        # its views are patches of the slice at different places (flips and turns come after), not one patch 4 times
        assert any(not torch.equal(full[r * views], full[r * views + j]) for r in range(records) for j in (1, 2, 3))
    # per step, D then G clip one gradient per sampled slice: a quarter of the rows they saw
    assert clipped == [n for idx, _ in pairs for n in (len(idx) // views,) * 2]


def test_several_views_of_whole_unturned_images_are_refused(tiny_sites: list[Path]) -> None:
    """translate neither crops (the slices are whole images of image-size here) nor flips: its
    views would all be the same image. denoise turns its pairs, so its views still differ."""
    config = task_config(name="translate", image_size=128, spacing=3.125, width=8, batch_size=4, views_per_record=2)
    data = load_task_data(tiny_sites[0], config)
    assert tuple(data.train.shape[-2:]) == (128, 128)
    with pytest.raises(ConfigError, match="task.views-per-record = 2, but this site's slices are whole 128-pixel"):
        build_task(config).train(data, steps=1, seed=0)
    build_task(replace_task(config, views_per_record=1)).train(data, steps=1, seed=0)
    whole = replace_task(CONFIG, image_size=128, spacing=3.125, views_per_record=2)
    build_task(whole).train(load_task_data(tiny_sites[0], whole), steps=1, seed=0)


def test_views_per_record_and_ema_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match=r"task.views-per-record = 0; it must be a whole number >= 1"):
        StudyConfig().replace(task={"name": "denoise", "views_per_record": 0})
    with pytest.raises(ConfigError, match=r"task.ema = 1.0; it must lie in \[0, 1\)"):
        StudyConfig().replace(task={"name": "translate", "ema": 1.0})
    assert StudyConfig().replace(task={"name": "superres", "views_per_record": 3}).task.params.views_per_record == 3
    assert StudyConfig().replace(task={"name": "cycle", "ema": 0.5}).task.params.ema == 0.5


def test_paired_ema_ends_the_round_between_the_start_and_the_last_step(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[1], CONFIG)

    def generator_after(ema: float) -> tuple[dict, dict]:
        task = build_task(replace_task(CONFIG, ema=ema))
        start = {k: v.copy() for k, v in task.get_weights().items() if k.startswith("generator.")}
        task.train(data, steps=5, seed=0)
        return start, {k: v for k, v in task.get_weights().items() if k.startswith("generator.")}

    start, last = generator_after(0.0)
    _, averaged = generator_after(0.8)
    moved = sum(float(np.abs(last[k] - start[k]).sum()) for k in start)
    moved_averaged = sum(float(np.abs(averaged[k] - start[k]).sum()) for k in start)
    assert 0 < moved_averaged < 0.8 * moved  # same seed, same steps: the average lags the last step


def test_norms_and_biases_are_all_that_train_and_all_that_dp_clips(
    tiny_sites: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medgan_core.models.weights import all_but_norms_and_biases

    config = replace_task(CONFIG, trainable="norms")
    task = build_task(config)
    frozen = {id(p) for module in task.groups.values() for p in all_but_norms_and_biases(module)}
    names = {f"{group}.{name}" for group, module in task.groups.items() for name, p in module.named_parameters()
             if id(p) not in frozen}
    norms = {f"{group}.{layer_name}.{name}" for group, module in task.groups.items()
             for layer_name, layer in module.named_modules() if isinstance(layer, nn.GroupNorm)
             for name, _ in layer.named_parameters()}
    biases = {f"{group}.{name}" for group, module in task.groups.items() for name, _ in module.named_parameters()
              if name.endswith(".bias")}
    assert norms and names == norms | biases  # no convolution weight
    clipped: list[int] = []
    original_clip = GhostDPOptimizer.clip_and_accumulate

    def recording_clip(self):  # type: ignore[no-untyped-def]
        clipped.append(sum(1 for p in self.params if has_ghost(p) or p.grad_sample is not None))
        return original_clip(self)

    monkeypatch.setattr(GhostDPOptimizer, "clip_and_accumulate", recording_clip)
    before = task.get_weights()
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=10, secure_rng=False)
    task.train(load_task_data(tiny_sites[1], config), steps=2, seed=0, dp=dp, accountant=SiteAccountant())
    after = task.get_weights()

    trained = {n for n in before if not np.array_equal(before[n], after[n])}
    assert trained and trained <= names  # noise reaches every trainable coordinate, and only those
    assert {n for n in names if n.startswith("generator.")} <= trained
    per_group = {g: sum(1 for n in names if n.startswith(g + ".")) for g in ("discriminator", "generator")}
    assert clipped and set(clipped) <= set(per_group.values())  # per-sample gradients of those alone
    assert all(p.requires_grad for module in task.groups.values() for p in module.parameters())  # thawed after


def test_trainable_norms_needs_a_trained_model_to_start_from() -> None:
    with pytest.raises(ConfigError, match=r"task.trainable = 'norms' fine-tunes a trained model; set run.initial-model"):
        StudyConfig().replace(task={"name": "translate", "trainable": "norms"})
    with pytest.raises(ConfigError, match=r"task.trainable = 'some'; choose one of all, norms"):
        StudyConfig().replace(task={"name": "denoise", "trainable": "some"})
    study = StudyConfig().replace(run={"initial_model": "public.medgan"}, task={"name": "translate", "trainable": "norms"})
    assert study.task.params.trainable == "norms"


def test_adam_beta1_reaches_both_optimisers_with_and_without_dp() -> None:
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=4, secure_rng=False)
    for setting in (None, dp):
        task = build_task(replace_task(CONFIG, adam_beta1=0.9))
        with task.training_setup(setting, seed=0) as s:
            assert [o.param_groups[0]["betas"] for o in (s.opt_g, s.opt_d)] == [(0.9, 0.999)] * 2
    with pytest.raises(ConfigError, match=r"task.adam-beta1 = 1.0; it must lie in \[0, 1\)"):
        StudyConfig().replace(task={"name": "translate", "adam_beta1": 1.0})
