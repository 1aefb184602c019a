"""Conditional synthesis: graded lesions in the simulator, per-slice conditions from the
label maps, a generator that uses its condition, and the privacy of the condition prior."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federation_checks import site_without
from medgan_core.data.dataset import label_slices
from medgan_core.data.manifest import read_manifest
from medgan_core.data.labels import LESION, LIVER, lesion_burden
from medgan_core.data.simulate import phantom_labels
from medgan_core.errors import ConfigError, DataError
from medgan_core.metrics.features import burden_grade
from medgan_core.privacy import DPSettings
from medgan_core.tasks.registry import build_task
from medgan_core.tasks.registry import load_task_data, replace_task, task_config

CONFIG = task_config(name="conditional", image_size=16, width=8, z_dim=16, batch_size=8, local_steps=3, eval_samples=32)


def test_severity_grows_lesion_burden() -> None:
    burdens = []
    for severity in (0.0, 0.2, 0.5, 0.9):
        labels = phantom_labels(np.random.default_rng(3), 96, 12, 1.0, severity)
        burdens.append(float(lesion_burden(labels).max()))
    assert burdens[0] == 0.0
    assert burdens[1] < burdens[2] < burdens[3]


def test_burden_is_the_lesion_share_of_the_liver() -> None:
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[0, :5] = LIVER
    labels[0, 0, :5] = LESION  # 5 of 50 liver pixels
    assert lesion_burden(labels).tolist() == pytest.approx([0.1, 0.0])
    assert burden_grade(torch.tensor([0.0, 0.01, 0.05, 0.1, 0.5])).tolist() == [0, 1, 1, 2, 3]


def test_conditions_come_from_each_slices_label_map(tiny_sites: list[Path]) -> None:
    data = load_task_data(tiny_sites[1], CONFIG)
    assert data.train_condition is not None and data.train_condition.shape == (data.num_train,)
    manifest = read_manifest(tiny_sites[1])
    expected = np.concatenate([
        lesion_burden(np.round(manifest.load(e).axial_slices()).astype(np.uint8))
        for e in sorted(manifest.select(modality="SEG", split="train"), key=lambda e: e.pair_id)
    ])
    np.testing.assert_allclose(data.train_condition.numpy(), expected)
    assert (data.train_condition > 0).any() and (data.train_condition == 0).any()


def test_missing_label_maps_are_a_clear_error(tmp_path: Path, tiny_sites: list[Path]) -> None:
    site = site_without(tiny_sites[0], tmp_path, ",SEG,")
    with pytest.raises(DataError, match="label map"):
        load_task_data(site, CONFIG)
    with pytest.raises(ConfigError, match="task.condition"):
        task_config(name="conditional", condition="stage")


def test_label_maps_resize_by_nearest_neighbour() -> None:
    labels = np.zeros((1, 8, 8), np.uint8)
    labels[0, :4, :4] = LESION
    resized = label_slices(labels, (4, 4))
    assert resized.dtype == torch.long and set(resized.unique().tolist()) == {0, LESION}
    assert int((resized == LESION).sum()) == 4  # the lesion's quarter of the slice, not shifted by a pixel


@pytest.mark.parametrize("condition, dim", [("grade", 4), ("severity", 1)])
def test_generator_output_depends_on_the_condition(condition: str, dim: int) -> None:
    task = build_task(replace_task(CONFIG, **{"condition": condition}))
    encoded = task.encode(torch.tensor([0.0, 0.3]))
    assert encoded.shape == (2, dim)
    mild = task.sample(4, seed=1, conditions=task.encode(torch.full((4,), 0.01)))
    severe = task.sample(4, seed=1, conditions=task.encode(torch.full((4,), 0.4)))
    assert not torch.allclose(mild, severe)  # same z, other condition


def test_generated_conditions_never_read_the_sites_labels(tiny_sites: list[Path]) -> None:
    """Under DP the generator is post-processing of D only if the conditions it generates
    for come from the public prior: changing the real slices' labels must not change a
    single condition the generator is given (same seed), while D's training does change."""
    data = load_task_data(tiny_sites[0], CONFIG)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=4, secure_rng=False)

    def generator_conditions() -> tuple[list[torch.Tensor], dict[str, np.ndarray]]:
        task = build_task(CONFIG)
        given: list[torch.Tensor] = []
        task.generator.register_forward_pre_hook(lambda _m, args: given.append(args[1].clone()))
        task.train(data, steps=3, seed=0, dp=dp)
        return given, task.get_weights()

    first, weights_first = generator_conditions()
    assert data.train_condition is not None
    data.train_condition = torch.rand_like(data.train_condition) * 0.5
    second, weights_second = generator_conditions()
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    changed = [n for n in weights_first if n.startswith("discriminator.")
               and not np.array_equal(weights_first[n], weights_second[n])]
    assert changed  # the labels did reach D


def test_evaluation_and_preview_rows(tiny_sites: list[Path]) -> None:
    task = build_task(CONFIG)
    data = load_task_data(tiny_sites[0], CONFIG)
    metrics = task.evaluate(data)
    assert {"fid", "kid", "swd", "grade-accuracy", "grade-accuracy-real"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["grade-accuracy"] <= 1.0
    assert task.preview(16).shape == (16, 1, 16, 16)  # 4 grades x 4 samples


@pytest.mark.slow
def test_conditional_federated_two_sites_two_rounds(tiny_sites: list[Path], tmp_path: Path) -> None:
    from federation_checks import run_paired_task, site_metrics

    records = run_paired_task(tiny_sites, tmp_path / "run", name="conditional", image_size=16,
                              z_dim=16, eval_samples=32)
    assert all({"fid", "kid", "grade-accuracy"} <= set(m) for m in site_metrics(records))
